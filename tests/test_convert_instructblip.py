"""InstructBLIP's Q-Former and Q-Formers of any depth against tiny random HF torch models:
InstructBlipQFormerModel with a right-padded instruction beside the queries, the Q-Former
inside InstructBlipForConditionalGeneration (its learned queries; read through a view
without the 'qformer.' prefix too), Blip2QFormerModel / InstructBlipQFormerModel of depths
3 and 5 (a shorter last group), scanned and not, each written back for from_pretrained."""

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from unifer_jax import convert
from unifer_jax.convert import check, hf_io
from unifer_jax.convert import qformer as cq
from unifer_jax.models import qformer as qf

from test_convert_qformer import randomise, save, torch_out

TOL = 1e-5  # float32 on both sides
H, HEADS, MLP, VOCAB, ENC, Q, T = 32, 4, 48, 99, 24, 5, 7


def hf_qformer(kind: str, depth: int, freq: int, seed: int):
  common = dict(hidden_size=H, num_hidden_layers=depth, num_attention_heads=HEADS,
                intermediate_size=MLP, encoder_hidden_size=ENC, cross_attention_frequency=freq)
  torch.manual_seed(seed)
  if kind == 'instructblip':
    model = tf.InstructBlipQFormerModel(tf.InstructBlipQFormerConfig(
        vocab_size=VOCAB, max_position_embeddings=16, **common))
  else:
    model = tf.Blip2QFormerModel(tf.Blip2QFormerConfig(**common))
  return randomise(model, seed)


def batch(seed: int):
  """Queries, image tokens, instruction ids and HF's mask over [queries; instruction]
  (the second instruction right-padded after 4 tokens)."""
  r = np.random.RandomState(seed)
  mask = np.ones((2, Q + T), np.int64)
  mask[1, Q + 4:] = 0
  return (r.randn(2, Q, H).astype(np.float32), r.randn(2, 6, ENC).astype(np.float32),
          r.randint(1, VOCAB, (2, T)), mask)


def hf_forward(kind, model, queries, image, ids, mask) -> np.ndarray:
  with torch.no_grad():
    kw = dict(query_embeds=torch.tensor(queries), encoder_hidden_states=torch.tensor(image))
    if kind == 'instructblip':
      kw.update(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return model(**kw).last_hidden_state.numpy()


@nnx.jit
def instruct_forward(model, queries, image, ids, mask):
  return model(ids, mask, queries, image)


@nnx.jit
def queries_forward(model, queries, image):
  return model(queries, image)


@pytest.mark.parametrize('scan', [True, False])
@pytest.mark.parametrize('kind,depth,freq', [
    ('instructblip', 4, 2), ('instructblip', 3, 2), ('instructblip', 5, 2),
    ('instructblip', 5, 3), ('blip2', 3, 2), ('blip2', 5, 2)])
def test_parity_and_round_trip(kind, depth, freq, scan, tmp_path):
  hf = hf_qformer(kind, depth, freq, seed=10 * depth + freq)
  model = convert.load_hf(save(hf, tmp_path / 'hf'), scan_layers=scan)
  assert type(model) is (qf.InstructQFormer if kind == 'instructblip' else qf.QFormer)
  assert (model.tail is not None) == bool(depth % freq)
  assert model.query_tokens is None  # the standalone models take query_embeds

  queries, image, ids, mask = batch(depth)
  want = hf_forward(kind, hf, queries, image, ids, mask)
  if kind == 'instructblip':
    got = np.asarray(instruct_forward(model, queries, image, ids, mask))
    valid = mask.astype(bool)  # every query and every unpadded instruction position
    assert got.shape == (2, Q + T, H) and valid.sum() == 2 * Q + T + 4
  else:
    got = np.asarray(queries_forward(model, queries, image))
    valid = np.ones(got.shape[:2], bool)
  assert np.abs(got - want)[valid].max() <= TOL

  cfg = cq.config_from_hf(hf_io.read_hf_config(tmp_path / 'hf'))
  cfg.scan_layers = scan
  hf_config = cq.hf_config_from(cfg)
  assert hf_config['model_type'] == ('instructblip_qformer' if kind == 'instructblip'
                                     else 'blip_2_qformer')
  hf_io.write_hf_dir(tmp_path / 'out', hf_config,
                     cq.params_to_hf(convert.as_numpy(convert.params_of(model)), cfg))
  back, info = type(hf).from_pretrained(tmp_path / 'out', output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  np.testing.assert_array_equal(hf_forward(kind, back.eval(), queries, image, ids, mask), want)


class StrippedView:
  """What the whole-VLM converter hands over: the Q-Former's names without 'qformer.',
  and 'query_tokens' as is (no .dir)."""

  def __init__(self, reader, prefix='qformer.'):
    self._reader = reader
    self._names = {k[len(prefix):] if k.startswith(prefix) else k: k for k in reader.keys()
                   if k.startswith(prefix) or k == 'query_tokens'}

  def keys(self):
    return list(self._names)

  def __contains__(self, name):
    return name in self._names

  def shape(self, name):
    return self._reader.shape(self._names[name])

  def get(self, name):
    return self._reader.get(self._names[name])


def test_qformer_inside_instructblip_for_conditional_generation(tmp_path):
  config = tf.InstructBlipConfig(
      vision_config=dict(hidden_size=ENC, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8),
      qformer_config=dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=3,
                          num_attention_heads=HEADS, intermediate_size=MLP,
                          cross_attention_frequency=2, max_position_embeddings=16),
      text_config=dict(model_type='llama', vocab_size=64, hidden_size=20, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
      num_query_tokens=4, image_token_index=63)
  torch.manual_seed(6)
  hf = randomise(tf.InstructBlipForConditionalGeneration(config), seed=6)
  save(hf, tmp_path)
  model = convert.load_hf(tmp_path).qformer   # the whole UniFER's Q-Former
  assert isinstance(model, qf.QFormer) and model.instruction_aware
  assert model.query_tokens[...].shape == (4, H) and model.tail is not None

  pixels = np.random.RandomState(7).randn(2, 3, 16, 16).astype(np.float32)
  _, _, ids, mask = batch(7)
  text_mask = mask[:, Q:]
  feats = torch_out(hf.get_image_features, pixels, ids, text_mask)
  image = feats.last_hidden_state.numpy()  # ViT tokens, as the Q-Former sees them
  prefix = np.asarray(nnx.jit(lambda m, *a: m.encode_queries(*a))(model, image, None, ids,
                                                                   text_mask))
  want = feats.qformer_outputs.last_hidden_state.numpy()[:, :4]
  assert np.abs(prefix - want).max() <= TOL
  # The instruction matters: other (valid) tokens give another prefix.
  other = np.asarray(nnx.jit(lambda m, *a: m.encode_queries(*a))(model, image, None,
                                                                  (ids + 1) % VOCAB, text_mask))
  assert np.abs(other - prefix).max() > 1e-3

  reader = hf_io.TensorReader(tmp_path)
  cfg = cq.config_from_hf(hf_io.read_hf_config(tmp_path))
  proj = cq.projection_from_hf(reader, cfg)
  assert np.abs(prefix @ proj['kernel'] + proj['bias'] - feats.pooler_output.numpy()).max() <= TOL
  params = cq.params_from_hf(reader, cfg)
  jax.tree.map(np.testing.assert_array_equal, cq.params_from_hf(StrippedView(reader), cfg),
               params)

  # Back: exactly HF's qformer.* / query_tokens / language_projection tensors and config.
  ours = dict(cq.instructblip_params_to_hf(params, cfg))
  ours.update(cq.projection_to_hf(proj))
  theirs = {k: v.numpy() for k, v in hf.state_dict().items()
            if k.startswith(('qformer.', 'query_tokens', 'language_projection.'))}
  assert set(ours) == set(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  entries = cq.instructblip_config_entries(cfg)
  assert entries['num_query_tokens'] == 4
  hf_q = hf.config.qformer_config.to_dict()
  assert {k: hf_q[k] for k in entries['qformer_config']} == entries['qformer_config']
  with pytest.raises(hf_io.ConversionError, match='instructblip_params_to_hf'):
    cq.hf_config_from(cfg)  # learned queries: only inside the whole model
  # `unifer convert check` on the whole model compares the logits over the prefix and text.
  result = check.check(tmp_path, tmp_path, atol=TOL)
  assert result.ok and result.max_abs <= TOL, result.lines
  assert 'random vlm' in result.lines[0]
  with pytest.raises(hf_io.ConversionError, match='blip2_params_to_hf: needs'):
    dict(cq.blip2_params_to_hf(params, cfg))


def test_text_side_that_no_hf_class_holds_is_named():
  cfg = qf.default_config(hidden=H, depth=3, heads=HEADS, mlp_dim=MLP, num_queries=0,
                          encoder_width=ENC, vocab_size=VOCAB, type_vocab_size=2,
                          instruction_aware=True)
  with pytest.raises(hf_io.ConversionError, match=r'an ITG head \(lm_head\), token types'):
    cq.hf_config_from(cfg)
  cfg.update(lm_head=False, type_vocab_size=0)
  assert cq.hf_config_from(cfg)['architectures'] == ['InstructBlipQFormerModel']

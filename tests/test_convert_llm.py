"""HF LlamaForCausalLM / Qwen2ForCausalLM / OPTForCausalLM <-> models.llm.LLM: logit parity
(OPT: unpadded, left- and right-padded rows), greedy generation against HF generate (OPT),
to-hf round trip through from_pretrained, sharded checkpoints, bf16 kept, parameter
counts, and error reporting (unsupported OPT variants named)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from unifer_jax import convert
from unifer_jax.convert import hf_io
from unifer_jax.convert import llm as convert_llm
from unifer_jax.models import llm as llm_lib

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
              max_position_embeddings=64)
CASES = {
    # GQA 4:1, untied, Llama 3 rope rescaling with a non-default theta.
    'llama_gqa': (transformers.LlamaConfig, dict(
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        rope_parameters=dict(rope_type='llama3', rope_theta=50000.0, factor=4.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    # MQA, tied, every bias Llama has, head_dim != hidden / heads.
    'llama_mqa_tied_bias': (transformers.LlamaConfig, dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5)),
    # Qwen2: qkv bias, GQA 2:1, 3 layers, theta 1e6.
    'qwen2_gqa': (transformers.Qwen2Config, dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters=dict(rope_type='default', rope_theta=1e6))),
    # Qwen2: MQA and tied embeddings (as Qwen2.5-0.5B).
    'qwen2_mqa_tied': (transformers.Qwen2Config, dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        tie_word_embeddings=True)),
}


def hf_model(case, dtype=torch.float32):
  """A tiny HF model with every weight random (HF inits biases to 0 and norms to 1,
  which would hide a bias or norm mapped to the wrong place)."""
  config_cls, kw = CASES[case]
  torch.manual_seed(0)
  model = config_cls(**COMMON, **kw)
  model = transformers.AutoModelForCausalLM.from_config(model).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.1 * torch.randn_like(p) + (1.0 if 'norm' in name else 0.0))
  return model.to(dtype)


def save(model, path, **kw):
  model.save_pretrained(path, **kw)
  return path


def jitted_forward(module):
  graphdef, state = nnx.split(module)
  fn = jax.jit(lambda s, ids, mask, pos: nnx.merge(graphdef, s)(
      ids, attention_mask=mask, positions=pos))
  return lambda ids, mask=None, pos=None: np.asarray(fn(state, ids, mask, pos))


def hf_logits(model, ids, mask=None, pos=None):
  with torch.no_grad():
    kw = {} if mask is None else dict(attention_mask=torch.tensor(mask, dtype=torch.long),
                                      position_ids=torch.tensor(pos))
    return model(torch.tensor(ids), **kw).logits.float().numpy()


def inputs(b=2, t=11):
  ids = np.random.default_rng(0).integers(0, VOCAB, (b, t))
  mask = np.ones((b, t), np.int32)
  mask[1, :4] = 0  # left padding
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return ids, mask, pos


@pytest.mark.parametrize('case', list(CASES))
def test_logits_match_hf_and_round_trip(case, tmp_path):
  hf = hf_model(case)
  src = save(hf, tmp_path / 'hf')
  ids, mask, pos = inputs()
  ref, ref_padded = hf_logits(hf, ids), hf_logits(hf, ids, mask, pos)

  ours = convert.load_hf(src)
  forward = jitted_forward(ours)
  assert np.abs(forward(ids) - ref).max() <= 1e-4
  # Left padding: our default positions (cumsum of the mask) are what HF is given here.
  diff = np.abs(forward(ids, jnp.asarray(mask, bool)) - ref_padded)[mask.astype(bool)]
  assert diff.max() <= 1e-4

  # to-hf: from_pretrained sees exactly its own key set, and gives the same logits.
  cfg = ours.cfg
  out = tmp_path / 'roundtrip'
  hf_io.write_hf_dir(out, convert_llm.hf_config_from(cfg),
                     convert_llm.params_to_hf(convert.params_of(ours), cfg))
  back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert type(back) is type(hf)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  np.testing.assert_array_equal(hf_logits(back.eval(), ids), ref)
  assert set(load_file(out / 'model.safetensors')) == set(load_file(src / 'model.safetensors'))


def test_unscanned_load_and_sharded_checkpoint(tmp_path):
  hf = hf_model('qwen2_gqa')
  src = save(hf, tmp_path / 'hf', max_shard_size='40KB')
  index = json.loads((src / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 3
  ids, _, _ = inputs()
  ref = hf_logits(hf, ids)
  ours = convert.load_hf(src, scan_layers=False)
  params = convert.params_of(ours)
  assert set(params['layers']) == {0, 1, 2}
  assert np.abs(jitted_forward(ours)(ids) - ref).max() <= 1e-4

  # Unscanned params export too, sharded by our writer, and HF reads the index.
  out = tmp_path / 'roundtrip'
  paths = hf_io.write_hf_dir(out, convert_llm.hf_config_from(ours.cfg),
                             convert_llm.params_to_hf(params, ours.cfg),
                             max_shard_bytes=50_000)
  assert len(paths) > 3
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(back, ids), ref)


def test_bf16_checkpoint_stays_bf16(tmp_path):
  hf = hf_model('llama_gqa', dtype=torch.bfloat16)
  src = save(hf, tmp_path / 'hf')
  cfg = convert_llm.config_from_hf(hf_io.read_hf_config(src))
  assert cfg.param_dtype == 'bfloat16'
  params = convert_llm.params_from_hf(hf_io.TensorReader(src), cfg)
  dtypes = {str(a.dtype) for a in jax.tree.leaves(params)}
  assert dtypes == {'bfloat16'}
  exported = dict(convert_llm.params_to_hf(params, cfg))
  original = load_file(src / 'model.safetensors')
  assert set(exported) == set(original)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name


def test_config_round_trip():
  for case, (config_cls, kw) in CASES.items():
    hf_config = config_cls(**COMMON, **kw).to_dict()
    again = convert_llm.hf_config_from(convert_llm.config_from_hf(hf_config))
    for key in ('model_type', 'vocab_size', 'hidden_size', 'intermediate_size',
                'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim',
                'rms_norm_eps', 'tie_word_embeddings', 'rope_parameters',
                'max_position_embeddings'):
      expected = hf_config.get(key)
      if key == 'head_dim' and expected is None:  # Qwen2 stores none
        expected = hf_config['hidden_size'] // hf_config['num_attention_heads']
      assert again[key] == expected, (case, key)
  # Pre-v5 files: rope_theta / rope_scaling at the top level, defaults omitted.
  old = dict(model_type='llama', hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
             intermediate_size=96, vocab_size=VOCAB, rope_theta=500000.0,
             rope_scaling=dict(rope_type='llama3', factor=32.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=8192))
  cfg = convert_llm.config_from_hf(old)
  assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (500000.0, 'llama3', 32.0)
  assert cfg.kv_heads == 4 and cfg.head_dim == 16 and cfg.rms_eps == 1e-6


@pytest.mark.parametrize('change,message', [
    (dict(model_type='gpt2'), "model_type='gpt2'"),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(use_sliding_window=True, model_type='qwen2'), 'use_sliding_window'),
    (dict(rope_parameters=dict(rope_type='yarn', rope_theta=1e4, factor=2.0)), 'yarn'),
    (dict(rope_parameters=dict(rope_type='llama3', rope_theta=1e4, factor=2.0)),
     'low_freq_factor'),
])
def test_unsupported_configs_are_named(change, message):
  hf_config = transformers.LlamaConfig(**COMMON).to_dict()
  hf_config.update(change)
  with pytest.raises(hf_io.ConversionError, match=message):
    convert_llm.config_from_hf(hf_config)


def test_bad_checkpoint_reports_every_problem_at_once(tmp_path):
  src = save(hf_model('llama_gqa'), tmp_path / 'hf')
  tensors = load_file(src / 'model.safetensors')
  del tensors['model.layers.1.mlp.up_proj.weight']
  tensors['model.layers.0.self_attn.extra.weight'] = np.zeros((2, 2), np.float32)
  tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((8, 64), np.float32)
  tensors['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.zeros((4,), np.float32)
  bad = tmp_path / 'bad'
  hf_io.write_hf_dir(bad, hf_io.read_hf_config(src), tensors.items())
  with pytest.raises(hf_io.ConversionError) as err:
    convert.load_hf(bad)
  text = str(err.value)
  assert 'missing (1): model.layers.1.mlp.up_proj.weight' in text
  assert 'unexpected (1): model.layers.0.self_attn.extra.weight' in text
  assert ('shape mismatch model.layers.0.self_attn.k_proj.weight: expected (16, 64), '
          'found (8, 64)') in text
  assert 'inv_freq' not in text  # old checkpoints' RoPE buffers are ignored
  assert str(bad) in text

  # A tied config with an lm_head in the file (some exports keep it): ignored, loads.
  tensors = load_file(src / 'model.safetensors')
  config = hf_io.read_hf_config(src)
  config['tie_word_embeddings'] = True
  hf_io.write_hf_dir(tmp_path / 'tied', config, tensors.items())
  assert 'lm_head' not in convert.params_of(convert.load_hf(tmp_path / 'tied'))


def test_no_hf_family_for_o_bias_without_qkv_bias():
  cfg = convert_llm.config_from_hf(transformers.LlamaConfig(**COMMON).to_dict())
  cfg.o_bias = True
  with pytest.raises(hf_io.ConversionError, match='o_bias'):
    convert_llm.hf_config_from(cfg)


# -- OPT (BLIP-2's usual language model) -----------------------------------------------

OPT_COMMON = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=48)
OPT_CASES = {
    'tied_bias': dict(),  # as opt-1.3b .. 66b: biases everywhere, lm_head tied
    'untied_no_bias': dict(enable_bias=False, tie_word_embeddings=False, num_hidden_layers=3),
}


def opt_model(case, seed=0):
  """A tiny OPTForCausalLM with every weight random (LayerNorm weights around 1)."""
  torch.manual_seed(seed)
  model = transformers.OPTForCausalLM(
      transformers.OPTConfig(**{**OPT_COMMON, **OPT_CASES[case]})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = 'layer_norm' in name and name.endswith('weight')
      p.copy_(0.1 * torch.randn_like(p) + (1.0 if is_scale else 0.0))
  return model


def padded_batch(t=13):
  """Rows: unpadded, left-padded by 5, right-padded by 4 (ids, int mask)."""
  ids = np.random.default_rng(1).integers(3, VOCAB, (3, t))
  mask = np.ones((3, t), np.int64)
  mask[1, :5] = 0
  mask[2, t - 4:] = 0
  return ids, mask


@pytest.mark.parametrize('case', list(OPT_CASES))
def test_opt_logits_match_hf_padded_and_round_trip(case, tmp_path):
  hf = opt_model(case)
  src = save(hf, tmp_path / 'hf')
  ours = convert.load_hf(src)
  cfg = ours.cfg
  assert (cfg.norm, cfg.position_embedding, cfg.mlp) == ('layer', 'learned', 'relu')
  params = convert.params_of(ours)
  assert params['pos_embed']['embedding'].shape == (48 + 2, 64)
  assert ('lm_head' in params) == (case == 'untied_no_bias')
  assert ('bias' in params['layers']['mlp']['up']) == (case == 'tied_bias')

  ids, mask = padded_batch()
  forward = jitted_forward(ours)
  # No mask: every row unpadded.
  assert np.abs(forward(ids) - hf_logits(hf, ids)).max() <= 1e-5
  # Padded rows: HF OPT derives positions from the mask itself (no position_ids given),
  # ours too; every unpadded position of every row is compared.
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  diff = np.abs(forward(ids, jnp.asarray(mask, bool)) - ref)
  valid = mask.astype(bool)
  assert diff[valid].max() <= 1e-5, diff.max(-1)
  # The padded rows really differ from the unpadded forward (positions moved).
  assert np.abs(ref[1, 5:] - hf_logits(hf, ids)[1, 5:]).max() > 1e-2

  # to-hf: OPTForCausalLM.from_pretrained sees exactly its own keys, same logits.
  out = tmp_path / 'roundtrip'
  hf_io.write_hf_dir(out, convert_llm.hf_config_from(cfg),
                     convert_llm.params_to_hf(params, cfg))
  back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert type(back) is transformers.OPTForCausalLM
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  with torch.no_grad():
    again = back.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert np.abs(again - ref).max() <= 1e-5
  assert set(load_file(out / 'model.safetensors')) == set(load_file(src / 'model.safetensors'))


def _greedy(graphdef, state, ids, mask, new):
  return llm_lib.generate(nnx.merge(graphdef, state), ids, attention_mask=mask,
                          max_new_tokens=new, eos_id=2, pad_id=1)


def test_opt_greedy_generate_matches_hf_generate_with_left_padding(tmp_path):
  """16 greedy tokens through our KV cache == HF generate (do_sample=False) from
  left-padded prompts (HF's generate pads on the left; OPT's eos 2, pad 1)."""
  hf = opt_model('tied_bias', seed=3)
  # Larger weights: logits spread, so no step is a near-tie the two float orders could
  # break differently (the margin is asserted below).
  with torch.no_grad():
    for p in hf.parameters():
      p.mul_(2.0)
  ours = convert.load_hf(save(hf, tmp_path / 'hf'))
  prompt = np.random.default_rng(2).integers(3, VOCAB, (3, 7))
  mask = np.ones((3, 7), np.int64)
  mask[1, :3] = mask[2, :6] = 0
  prompt[mask == 0] = 1
  new = 16
  with torch.no_grad():
    res = hf.generate(torch.tensor(prompt), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=new, min_new_tokens=0, pad_token_id=1, eos_token_id=2,
                      output_scores=True, return_dict_in_generate=True)
  ref = res.sequences[:, 7:].numpy()
  top2 = torch.stack(res.scores, 1).topk(2, -1).values.numpy()
  assert (top2[..., 0] - top2[..., 1]).min() > 1e-3  # no near-ties
  graphdef, state = nnx.split(ours)
  got = np.asarray(jax.jit(_greedy, static_argnums=(0, 4))(
      graphdef, state, prompt, jnp.asarray(mask, bool), new))
  # HF stops once every row has emitted eos; ours pads the rest with pad_id.
  np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
  assert np.all(got[:, ref.shape[1]:] == 1)
  assert ref.shape[1] == new or np.all((ref == 2).any(1))


def test_opt_parameter_count_equals_hf():
  for case in OPT_CASES:
    config = transformers.OPTConfig(**{**OPT_COMMON, **OPT_CASES[case]})
    ours = convert_llm.build(convert_llm.config_from_hf(config.to_dict()), rngs=nnx.Rngs(0))
    count = sum(x.size for x in jax.tree.leaves(convert.params_of(ours)))
    assert count == transformers.OPTForCausalLM(config).num_parameters(), case


def test_opt_config_round_trip():
  for case, kw in OPT_CASES.items():
    hf_config = transformers.OPTConfig(**{**OPT_COMMON, **kw}).to_dict()
    again = convert_llm.hf_config_from(convert_llm.config_from_hf(hf_config))
    for key in ('model_type', 'vocab_size', 'hidden_size', 'ffn_dim', 'num_hidden_layers',
                'num_attention_heads', 'max_position_embeddings', 'word_embed_proj_dim',
                'do_layer_norm_before', 'enable_bias', 'activation_function',
                'tie_word_embeddings', 'layer_norm_elementwise_affine', 'dropout'):
      assert again[key] == hf_config[key], (case, key)
  # A real config.json omits defaults (opt-2.7b's lists few keys): HF's defaults apply.
  cfg = convert_llm.config_from_hf(dict(model_type='opt', hidden_size=2560,
                                        num_attention_heads=32, num_hidden_layers=32,
                                        ffn_dim=10240, torch_dtype='float16'))
  assert (cfg.vocab_size, cfg.max_seq_len, cfg.tie_embeddings, cfg.qkv_bias) == \
      (50272, 2048, True, True)
  assert (cfg.head_dim, cfg.kv_heads, cfg.param_dtype) == (80, 32, 'float16')


@pytest.mark.parametrize('change,message', [
    (dict(do_layer_norm_before=False), 'do_layer_norm_before=false'),
    (dict(word_embed_proj_dim=32), 'word_embed_proj_dim=32 != hidden_size=64'),
    (dict(_remove_final_layer_norm=True), '_remove_final_layer_norm'),
    (dict(activation_function='gelu'), "activation_function='gelu'"),
    (dict(layer_norm_elementwise_affine=False), 'layer_norm_elementwise_affine=false'),
])
def test_unsupported_opt_variants_are_named(change, message):
  hf_config = transformers.OPTConfig(**OPT_COMMON).to_dict()
  hf_config.update(change)
  with pytest.raises(hf_io.ConversionError, match=message):
    convert_llm.config_from_hf(hf_config)


def test_opt_350m_lists_both_of_its_differences():
  hf_config = transformers.OPTConfig(**OPT_COMMON, do_layer_norm_before=False,
                                     word_embed_proj_dim=32).to_dict()
  with pytest.raises(hf_io.ConversionError) as err:
    convert_llm.config_from_hf(hf_config)
  assert 'do_layer_norm_before=false' in str(err.value)
  assert 'word_embed_proj_dim=32' in str(err.value)


def test_half_opt_llm_configs_have_no_hf_family():
  cfg = convert_llm.config_from_hf(transformers.OPTConfig(**OPT_COMMON).to_dict())
  cfg.position_embedding = 'rope'  # LayerNorm + ReLU with RoPE: neither OPT nor Llama
  with pytest.raises(hf_io.ConversionError, match="position_embedding='rope' .OPT: 'learned'"):
    convert_llm.hf_config_from(cfg)
  cfg = convert_llm.config_from_hf(transformers.OPTConfig(**OPT_COMMON).to_dict())
  cfg.o_bias = False
  with pytest.raises(hf_io.ConversionError, match='all or none'):
    convert_llm.hf_config_from(cfg)


def test_opt_checkpoint_errors_name_opt_tensors(tmp_path):
  src = save(opt_model('tied_bias'), tmp_path / 'hf')
  tensors = load_file(src / 'model.safetensors')
  del tensors['model.decoder.layers.1.fc2.bias']
  tensors['model.decoder.embed_positions.weight'] = np.zeros((64, 64), np.float32)
  tensors['lm_head.weight'] = tensors['model.decoder.embed_tokens.weight']  # tied: ignored
  bad = tmp_path / 'bad'
  hf_io.write_hf_dir(bad, hf_io.read_hf_config(src), tensors.items())
  with pytest.raises(hf_io.ConversionError) as err:
    convert.load_hf(bad)
  text = str(err.value)
  assert 'OPT checkpoint' in text and str(bad) in text
  assert 'missing (1): model.decoder.layers.1.fc2.bias' in text
  assert ('shape mismatch model.decoder.embed_positions.weight: expected (50, 64), '
          'found (64, 64)') in text
  assert 'lm_head' not in text

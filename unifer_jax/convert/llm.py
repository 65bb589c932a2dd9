"""Hugging Face Llama / Qwen2 / OPT causal-LM checkpoints <-> ``models.llm.LLM``.

model_type  HF class            differences handled
'llama'     LlamaForCausalLM    ``attention_bias`` (q, k, v and o), ``mlp_bias``,
                                rope_type 'default' or 'llama3'
'qwen2'     Qwen2ForCausalLM    bias on q, k, v (never o); sliding window refused
'opt'       OPTForCausalLM      LayerNorm, learned positions (offset 2), ReLU fc1/fc2,
                                ``enable_bias``; tensors ``model.decoder.*``. Only the
                                pre-LN variant without projections: every released size
                                but opt-350m (BLIP-2 uses opt-2.7b and opt-6.7b).
                                Refused by name: ``do_layer_norm_before=false``,
                                ``word_embed_proj_dim != hidden_size`` (project_in/out),
                                ``_remove_final_layer_norm``,
                                ``layer_norm_elementwise_affine=false``, activations
                                other than relu.

Layouts: torch Linear ``[out, in]`` -> kernel ``[in, out]``; heads stay flattened
(``[D, N*H]``), in HF's head-major order, so no reshuffling of q/k is needed (HF applies
RoPE in the rotate-half convention, as ``models.llm`` does). With ``scan_layers`` the
per-layer tensors are stacked on a leading ``layers`` axis while reading, into one
preallocated buffer per parameter, so the model is held in memory once.

OPT names (HF -> ours, under ``model.decoder.``): ``embed_positions`` -> ``pos_embed``,
``self_attn_layer_norm`` -> ``attn_norm``, ``out_proj`` -> ``attn/o``, ``final_layer_norm``
of a layer -> ``mlp_norm`` (of the decoder -> ``final_norm``), ``fc1``/``fc2`` ->
``mlp/up``/``mlp/down``; LayerNorm ``weight`` -> ``scale``.

Tied embeddings (``tie_word_embeddings``, OPT's default): no ``lm_head.weight`` is
expected (one found anyway is ignored, as HF does) and none is written.
``rotary_emb.inv_freq`` buffers of old checkpoints are ignored too (recomputed from the
config).
"""

from __future__ import annotations

import logging
from typing import Iterator

import ml_collections
import numpy as np
from flax import nnx

from unifer_jax.convert.hf_io import ConversionError, check_keys
from unifer_jax.models import layers, llm

log = logging.getLogger(__name__)

MODEL_TYPES = ('llama', 'qwen2', 'opt')

_HF_CLASS = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'opt': 'OPTForCausalLM'}
# HF config defaults (transformers 5.23), for config.json files that omit default keys.
_HF_DEFAULTS = {
    'llama': dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, hidden_act='silu',
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False),
    'qwen2': dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  hidden_act='silu', max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, use_sliding_window=False),
    'opt': dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                max_position_embeddings=2048, do_layer_norm_before=True,
                _remove_final_layer_norm=False, word_embed_proj_dim=None,
                num_attention_heads=12, activation_function='relu', enable_bias=True,
                layer_norm_elementwise_affine=True, tie_word_embeddings=True),
}
# What HF OPT fixes in code rather than in its config: nn.LayerNorm's eps and the
# position table's offset (OPTLearnedPositionalEmbedding).
_OPT_FIXED = dict(norm='layer', layer_norm_eps=1e-5, position_embedding='learned',
                  position_offset=2, mlp='relu')
_DTYPES = ('float32', 'bfloat16', 'float16')
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------

def _rope_from_hf(c: dict, model_type: str) -> dict:
  # transformers 5 writes ``rope_parameters``; older files ``rope_theta`` + ``rope_scaling``.
  rope = dict(c.get('rope_scaling') or {})
  rope.update(c.get('rope_parameters') or {})
  theta = float(rope.get('rope_theta', c.get('rope_theta', 10000.0)))
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if float(rope.get('partial_rotary_factor', c.get('partial_rotary_factor', 1.0))) != 1.0:
    raise ConversionError(f'config.json ({model_type}): partial_rotary_factor != 1 is not '
                          'supported')
  if rope_type == 'default':
    return dict(rope_theta=theta, rope_scaling='default')
  if rope_type == 'llama3':
    try:
      return dict(rope_theta=theta, rope_scaling='llama3', rope_factor=float(rope['factor']),
                  rope_low_freq_factor=float(rope['low_freq_factor']),
                  rope_high_freq_factor=float(rope['high_freq_factor']),
                  rope_original_max_len=int(rope['original_max_position_embeddings']))
    except KeyError as e:
      raise ConversionError(f'config.json ({model_type}): rope_type llama3 needs '
                            f'rope_parameters.{e.args[0]}') from None
  raise ConversionError(f'config.json ({model_type}): rope_type={rope_type!r}; supported: '
                        'default, llama3')


def _opt_config_from_hf(c: dict) -> ml_collections.ConfigDict:
  hidden, heads = int(c['hidden_size']), int(c['num_attention_heads'])
  problems = []
  if not c['do_layer_norm_before']:
    problems.append('do_layer_norm_before=false (post-LN, as opt-350m)')
  proj = c.get('word_embed_proj_dim')
  if proj is not None and int(proj) != hidden:
    problems.append(f'word_embed_proj_dim={proj} != hidden_size={hidden} (project_in / '
                    'project_out, as opt-350m)')
  if c['_remove_final_layer_norm']:
    problems.append('_remove_final_layer_norm=true')
  if not c['layer_norm_elementwise_affine']:
    problems.append('layer_norm_elementwise_affine=false')
  if c['activation_function'] != 'relu':
    problems.append(f'activation_function={c["activation_function"]!r} (only relu)')
  if hidden % heads:
    problems.append(f'hidden_size={hidden} not divisible by num_attention_heads={heads}')
  if problems:
    raise ConversionError('config.json (opt): not supported: ' + '; '.join(problems) +
                          '. Supported: the pre-LN OPTs without projections (every released '
                          'size but opt-350m; BLIP-2 uses opt-2.7b and opt-6.7b)')
  bias = bool(c['enable_bias'])
  declared = c.get('dtype') or c.get('torch_dtype')
  return llm.default_config(
      vocab_size=int(c['vocab_size']), hidden=hidden, depth=int(c['num_hidden_layers']),
      heads=heads, kv_heads=heads, head_dim=hidden // heads, mlp_dim=int(c['ffn_dim']),
      tie_embeddings=bool(c['tie_word_embeddings']),
      max_seq_len=int(c['max_position_embeddings']),
      param_dtype=declared if declared in _DTYPES else 'float32',
      qkv_bias=bias, o_bias=bias, mlp_bias=bias, **_OPT_FIXED)


def config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """Our LLM config for an HF Llama / Qwen2 / OPT config.json dict."""
  model_type = hf_config.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ConversionError(f'config.json: model_type={model_type!r} is not a decoder LLM; '
                          f'expected one of {MODEL_TYPES}')
  c = {**_HF_DEFAULTS[model_type], **hf_config}
  if model_type == 'opt':
    return _opt_config_from_hf(c)
  if c['hidden_act'] not in ('silu', 'swish'):
    raise ConversionError(f'config.json ({model_type}): hidden_act={c["hidden_act"]!r}; '
                          'only silu (SwiGLU) is supported')
  if model_type == 'qwen2':
    sliding = c.get('use_sliding_window') or 'sliding_attention' in (c.get('layer_types') or ())
    if sliding:
      raise ConversionError('config.json (qwen2): use_sliding_window / sliding_attention '
                            'layers are not supported')
    biases = dict(qkv_bias=True, o_bias=False, mlp_bias=False)
  else:
    attn_bias = bool(c['attention_bias'])
    biases = dict(qkv_bias=attn_bias, o_bias=attn_bias, mlp_bias=bool(c['mlp_bias']))
  hidden, heads = int(c['hidden_size']), int(c['num_attention_heads'])
  declared = c.get('dtype') or c.get('torch_dtype')
  return llm.default_config(
      vocab_size=int(c['vocab_size']), hidden=hidden, depth=int(c['num_hidden_layers']),
      heads=heads, kv_heads=int(c.get('num_key_value_heads') or heads),
      head_dim=int(c.get('head_dim') or hidden // heads), mlp_dim=int(c['intermediate_size']),
      rms_eps=float(c['rms_norm_eps']), tie_embeddings=bool(c['tie_word_embeddings']),
      max_seq_len=int(c['max_position_embeddings']),
      param_dtype=declared if declared in _DTYPES else 'float32',
      **_rope_from_hf(c, model_type), **biases)


def _opt_problems(cfg) -> list[str]:
  """What keeps an LLM config with one of OPT's switches from being an HF OPT."""
  problems = [f'{k}={cfg.get(k)!r} (OPT: {v!r})' for k, v in _OPT_FIXED.items()
              if cfg.get(k) != v]
  head_dim = cfg.get('head_dim') or cfg.hidden // cfg.heads
  if cfg.kv_heads != cfg.heads or head_dim * cfg.heads != cfg.hidden:
    problems.append(f'kv_heads={cfg.kv_heads}, head_dim={head_dim} (OPT: kv_heads = heads '
                    f'= {cfg.heads}, head_dim = hidden / heads)')
  biases = {k: bool(cfg.get(k, False)) for k in ('qkv_bias', 'o_bias', 'mlp_bias')}
  if len(set(biases.values())) > 1:
    problems.append(f'{biases} (OPT: all or none, enable_bias)')
  return problems


def _model_type_of(cfg) -> str:
  """OPT is the family of LayerNorm + learned positions + ReLU; of the RoPE ones, Qwen2
  has bias on q, k, v only, Llama none or q, k, v and o."""
  defaults = llm.default_config()
  switches = [k for k in ('norm', 'position_embedding', 'mlp')
              if cfg.get(k, defaults[k]) != defaults[k]]
  if switches:
    problems = _opt_problems(cfg)
    if problems:
      raise ConversionError(f'{", ".join(switches)} set as in OPT, but no HF family has '
                            f'this LLM: {"; ".join(problems)}')
    return 'opt'
  qkv, o, mlp = cfg.qkv_bias, cfg.get('o_bias', False), cfg.get('mlp_bias', False)
  if qkv and not o and not mlp:
    return 'qwen2'
  if qkv != o:
    raise ConversionError(f'qkv_bias={qkv}, o_bias={o}: no HF family has that (Llama '
                          'biases q, k, v and o together, Qwen2 q, k and v only)')
  return 'llama'


def _opt_hf_config(cfg) -> dict:
  return dict(
      architectures=[_HF_CLASS['opt']], model_type='opt', vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden, word_embed_proj_dim=cfg.hidden, ffn_dim=cfg.mlp_dim,
      num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
      max_position_embeddings=cfg.max_seq_len, activation_function='relu',
      do_layer_norm_before=True, _remove_final_layer_norm=False,
      layer_norm_elementwise_affine=True, enable_bias=bool(cfg.qkv_bias),
      tie_word_embeddings=bool(cfg.tie_embeddings),
      # Training-time only (our model has none): the released OPTs' values.
      dropout=0.1, attention_dropout=0.0, layerdrop=0.0,
      dtype=str(np.dtype(layers.dtype_of(cfg.param_dtype))), use_cache=True)


def hf_config_from(cfg) -> dict:
  """An HF config.json dict (LlamaForCausalLM, Qwen2ForCausalLM or OPTForCausalLM) for
  our LLM config."""
  model_type = _model_type_of(cfg)
  if model_type == 'opt':
    return _opt_hf_config(cfg)
  head_dim = cfg.get('head_dim') or cfg.hidden // cfg.heads
  rope = dict(rope_type=cfg.get('rope_scaling', 'default'), rope_theta=float(cfg.rope_theta))
  if rope['rope_type'] == 'llama3':
    rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  out = dict(
      architectures=[_HF_CLASS[model_type]], model_type=model_type,
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
      num_key_value_heads=cfg.kv_heads, head_dim=head_dim, hidden_act='silu',
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_eps,
      rope_parameters=rope, tie_word_embeddings=bool(cfg.tie_embeddings),
      dtype=str(np.dtype(layers.dtype_of(cfg.param_dtype))), use_cache=True)
  if model_type == 'llama':
    out.update(attention_bias=bool(cfg.qkv_bias), mlp_bias=bool(cfg.get('mlp_bias', False)))
  else:
    out.update(use_sliding_window=False)
  return out


def build(cfg, *, rngs: nnx.Rngs) -> llm.LLM:
  return llm.LLM(cfg, rngs=rngs)


# ---------------------------------------------------------------------------------------
# Tensor names: (HF name, our path, HF shape); kernels are the transposed torch weights.
# ---------------------------------------------------------------------------------------

def _is_opt(cfg) -> bool:
  return cfg.get('position_embedding', 'rope') == 'learned'


def _norm_rows(hf_name: str, path: tuple, d: int, opt: bool) -> list[tuple[str, tuple, tuple]]:
  rows = [(f'{hf_name}.weight', (*path, 'scale'), (d,))]
  return rows + [(f'{hf_name}.bias', (*path, 'bias'), (d,))] if opt else rows


def _global_tensors(cfg) -> list[tuple[str, tuple, tuple]]:
  if _is_opt(cfg):
    rows = [('model.decoder.embed_tokens.weight', ('token_embed', 'embedding'),
             (cfg.vocab_size, cfg.hidden)),
            ('model.decoder.embed_positions.weight', ('pos_embed', 'embedding'),
             (cfg.max_seq_len + cfg.position_offset, cfg.hidden)),
            *_norm_rows('model.decoder.final_layer_norm', ('final_norm',), cfg.hidden, True)]
  else:
    rows = [('model.embed_tokens.weight', ('token_embed', 'embedding'),
             (cfg.vocab_size, cfg.hidden)),
            ('model.norm.weight', ('final_norm', 'scale'), (cfg.hidden,))]
  if not cfg.tie_embeddings:
    rows.append(('lm_head.weight', ('lm_head', 'kernel'), (cfg.vocab_size, cfg.hidden)))
  return rows


def _layer_tensors(cfg) -> list[tuple[str, tuple, tuple]]:
  """Per-layer rows; the HF name is relative to the layer (:func:`_layer_name`)."""
  d, f, opt = cfg.hidden, cfg.mlp_dim, _is_opt(cfg)
  h = cfg.get('head_dim') or d // cfg.heads
  q, kv = cfg.heads * h, cfg.kv_heads * h
  rows = [*_norm_rows('self_attn_layer_norm' if opt else 'input_layernorm', ('attn_norm',),
                      d, opt),
          *_norm_rows('final_layer_norm' if opt else 'post_attention_layernorm',
                      ('mlp_norm',), d, opt)]

  def linear(hf_name, path, n_in, n_out, bias):
    rows.append((f'{hf_name}.weight', (*path, 'kernel'), (n_out, n_in)))
    if bias:
      rows.append((f'{hf_name}.bias', (*path, 'bias'), (n_out,)))

  for name, out in {'q': q, 'k': kv, 'v': kv}.items():
    linear(f'self_attn.{name}_proj', ('attn', name), d, out, cfg.qkv_bias)
  linear('self_attn.out_proj' if opt else 'self_attn.o_proj', ('attn', 'o'), q, d,
         cfg.get('o_bias', False))
  mlp = ({'fc1': ('up', d, f), 'fc2': ('down', f, d)} if opt else
         {f'mlp.{n}_proj': (n, a, b) for n, a, b in (('gate', d, f), ('up', d, f),
                                                     ('down', f, d))})
  for hf_name, (name, n_in, n_out) in mlp.items():
    linear(hf_name, ('mlp', name), n_in, n_out, cfg.get('mlp_bias', False))
  return rows


def _layer_name(cfg, i: int, name: str) -> str:
  return f'model.decoder.layers.{i}.{name}' if _is_opt(cfg) else f'model.layers.{i}.{name}'


def _to_ours(path: tuple, array: np.ndarray) -> np.ndarray:
  return array.T if path[-1] == 'kernel' else array


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key] if key in tree else tree[str(key)]
  return tree


def expected_hf_shapes(cfg) -> dict[str, tuple]:
  shapes = {name: shape for name, _, shape in _global_tensors(cfg)}
  for i in range(cfg.depth):
    shapes.update({_layer_name(cfg, i, name): shape for name, _, shape in _layer_tensors(cfg)})
  return shapes


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------

def params_from_hf(reader, cfg) -> dict:
  """Pure dict of our LLM params from a TensorReader, in the checkpoint's dtype."""
  found = {k: tuple(reader.shape(k)) for k in reader.keys()}
  ignored = sorted(k for k in found if k.endswith(_IGNORED_SUFFIXES)
                   or (cfg.tie_embeddings and k == 'lm_head.weight'))
  if ignored:
    log.info('ignoring %d tensors not used by the model: %s', len(ignored), ignored[:4])
  for k in ignored:
    del found[k]
  where = getattr(reader, 'dir', 'checkpoint')
  family = 'OPT' if _is_opt(cfg) else 'Llama/Qwen2'
  check_keys(expected_hf_shapes(cfg), found, f'{family} checkpoint {where}')

  params: dict = {}
  for name, path, _ in _global_tensors(cfg):
    _set(params, path, np.ascontiguousarray(_to_ours(path, reader.get(name))))
  for name, path, _ in _layer_tensors(cfg):
    if cfg.get('scan_layers', True):
      # One preallocated [L, ...] buffer filled layer by layer (np.stack would hold
      # the parameter twice).
      first = _to_ours(path, reader.get(_layer_name(cfg, 0, name)))
      stacked = np.empty((cfg.depth, *first.shape), first.dtype)
      stacked[0] = first
      for i in range(1, cfg.depth):
        stacked[i] = _to_ours(path, reader.get(_layer_name(cfg, i, name)))
      _set(params, ('layers', *path), stacked)
    else:
      for i in range(cfg.depth):
        _set(params, ('layers', i, *path),
             np.ascontiguousarray(_to_ours(path, reader.get(_layer_name(cfg, i, name)))))
  return params


def params_to_hf(params: dict, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """HF (name, array) pairs in HF layout, one tensor at a time (dtype kept)."""
  for name, path, _ in _global_tensors(cfg):
    yield name, np.ascontiguousarray(_to_ours(path, np.asarray(_get(params, path))))
  scan = cfg.get('scan_layers', True)
  for i in range(cfg.depth):
    for name, path, _ in _layer_tensors(cfg):
      # Index before converting: np.asarray of a whole stacked device array per layer
      # would copy it depth times.
      value = _get(params, ('layers', *path))[i] if scan else _get(params, ('layers', i, *path))
      yield _layer_name(cfg, i, name), np.ascontiguousarray(_to_ours(path, np.asarray(value)))

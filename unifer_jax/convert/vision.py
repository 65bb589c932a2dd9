"""Hugging Face ViT / CLIP-vision / SigLIP-vision checkpoints <-> ``models.vit.ViT``.

model_type            HF class            tensors read
'vit'                 ViTModel            ``*`` (or ``vit.*`` of a ViTFor... checkpoint)
'clip_vision_model'   CLIPVisionModel     ``*`` (or the older ``vision_model.*`` form)
'siglip_vision_model' SiglipVisionModel   ``*`` (or the older ``vision_model.*`` form)
'clip'                CLIPModel           ``vision_model.*`` only; text tower ignored
'siglip'              SiglipModel         ``vision_model.*`` only; text tower ignored

Tensors outside the vision tower (text tower, projections, logit scale, classifier) are
skipped with one log line. ``params_to_hf`` always writes the vision model itself
(ViTModel / CLIPVisionModel / SiglipVisionModel), also for 'clip'/'siglip' sources:
the composite's text tower is not part of this model.

Layouts: torch Linear ``[out, in]`` -> kernel ``[in, out]``; the patch conv
``[D, C, p, p]`` -> Dense kernel ``[p*p*C, D]`` (row, col, channel order, as ViT.embed
flattens NHWC patches); SigLIP's fused MAP ``in_proj`` ``[3D, D]`` -> query/key/value.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterator

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unifer_jax.convert.hf_io import ConversionError, check_keys
from unifer_jax.models import vit

log = logging.getLogger(__name__)

MODEL_TYPES = ('vit', 'clip_vision_model', 'clip', 'siglip_vision_model', 'siglip')

_FAMILY = {'vit': 'vit', 'clip_vision_model': 'clip', 'clip': 'clip',
           'siglip_vision_model': 'siglip', 'siglip': 'siglip'}
# HF config defaults (transformers 5.23), for configs that store only non-default keys.
_HF_DEFAULTS = {
    'vit': dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act='gelu', layer_norm_eps=1e-12,
                image_size=224, patch_size=16, num_channels=3, qkv_bias=True),
    'clip': dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act='quick_gelu', layer_norm_eps=1e-5,
                 image_size=224, patch_size=32, num_channels=3),
    'siglip': dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, hidden_act='gelu_pytorch_tanh',
                   layer_norm_eps=1e-6, image_size=224, patch_size=16, num_channels=3,
                   vision_use_head=True),
}
_ACT_FROM_HF = {'gelu': 'gelu', 'quick_gelu': 'quick_gelu', 'gelu_pytorch_tanh': 'gelu_tanh',
                'gelu_new': 'gelu_tanh', 'gelu_python_tanh': 'gelu_tanh'}
_ACT_TO_HF = {'gelu': 'gelu', 'quick_gelu': 'quick_gelu', 'gelu_tanh': 'gelu_pytorch_tanh'}
_HF_CLASS = {'vit': 'ViTModel', 'clip': 'CLIPVisionModel', 'siglip': 'SiglipVisionModel'}
_HF_MODEL_TYPE = {'vit': 'vit', 'clip': 'clip_vision_model', 'siglip': 'siglip_vision_model'}


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------

def _square(value, key: str, model_type: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConversionError(f'config.json ({model_type}): {key}={value}; only square '
                            'images/patches are supported')
    value = value[0]
  return int(value)


def config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """Our ViT config for an HF ViT / CLIP(-vision) / SigLIP(-vision) config.json dict."""
  model_type = hf_config.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ConversionError(f'config.json: model_type={model_type!r} is not a vision tower; '
                          f'expected one of {MODEL_TYPES}')
  family = _FAMILY[model_type]
  c = hf_config
  if model_type in ('clip', 'siglip'):
    if not isinstance(hf_config.get('vision_config'), dict):
      raise ConversionError(f'config.json ({model_type}): no "vision_config" object')
    log.info('%s checkpoint: converting the vision tower only; the text tower is ignored',
             model_type)
    c = hf_config['vision_config']
  c = {**_HF_DEFAULTS[family], **c}
  act = _ACT_FROM_HF.get(c['hidden_act'])
  if act is None:
    raise ConversionError(f'config.json ({model_type}): hidden_act={c["hidden_act"]!r}; '
                          f'supported: {sorted(_ACT_FROM_HF)}')
  width, heads = int(c['hidden_size']), int(c['num_attention_heads'])
  if c.get('head_dim') not in (None, width // heads):
    raise ConversionError(f'config.json ({model_type}): head_dim={c["head_dim"]} != '
                          f'hidden_size / num_attention_heads = {width // heads}')
  pooler = False
  if family == 'vit':
    # ViTModel carries a dense+tanh pooler; ViTFor* heads do not, nor do ViTModels we
    # export without one (hf_config_from marks them "unifer_pooler": false; the key
    # cannot be "add_pooling_layer", which would swallow that from_pretrained argument).
    archs = hf_config.get('architectures') or ['ViTModel']
    pooler = bool(hf_config.get('unifer_pooler', 'ViTModel' in archs))
    if pooler and (c.get('pooler_output_size') or width) != width:
      raise ConversionError(f'config.json (vit): pooler_output_size={c["pooler_output_size"]} '
                            f'!= hidden_size={width} is not supported')
    if pooler and c.get('pooler_act', 'tanh') != 'tanh':
      raise ConversionError(f'config.json (vit): pooler_act={c["pooler_act"]!r}; only tanh')
  pool = 'cls'
  if family == 'siglip':
    pool = 'map' if c['vision_use_head'] else 'none'
  return vit.default_config(
      image_size=_square(c['image_size'], 'image_size', model_type),
      patch_size=_square(c['patch_size'], 'patch_size', model_type),
      num_channels=int(c['num_channels']), width=width, depth=int(c['num_hidden_layers']),
      heads=heads, mlp_dim=int(c['intermediate_size']), variant=family, pool=pool, act=act,
      layer_norm_eps=float(c['layer_norm_eps']), qkv_bias=bool(c.get('qkv_bias', True)),
      pooler=pooler)


def _check_exportable(cfg) -> None:
  problems = []
  if cfg.get('stem', 'patch') != 'patch':
    problems.append(f"stem={cfg.stem!r} (HF vision towers patchify with one conv)")
  if cfg.variant != 'vit' and not cfg.qkv_bias:
    problems.append(f'qkv_bias=False (HF {_HF_CLASS[cfg.variant]} always has q/k/v biases)')
  if cfg.pool == 'map' and cfg.variant != 'siglip':
    problems.append(f"pool='map' (only SigLIP has a MAP head in HF)")
  if problems:
    raise ConversionError(f'vit config (variant {cfg.variant!r}) has no HF equivalent: '
                          + '; '.join(problems))


def hf_config_from(cfg) -> dict:
  """The config.json of the HF vision model (ViTModel / CLIPVisionModel / SiglipVisionModel)."""
  _check_exportable(cfg)
  family = cfg.variant
  out = dict(model_type=_HF_MODEL_TYPE[family], architectures=[_HF_CLASS[family]],
             hidden_size=cfg.width, num_hidden_layers=cfg.depth,
             num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
             hidden_act=_ACT_TO_HF[cfg.act], layer_norm_eps=cfg.layer_norm_eps,
             image_size=cfg.image_size, patch_size=cfg.patch_size,
             num_channels=cfg.num_channels, dtype=jnp.dtype(cfg.param_dtype).name)
  if family == 'vit':
    out.update(qkv_bias=cfg.qkv_bias, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, pooler_act='tanh',
               pooler_output_size=cfg.width)
    if not cfg.get('pooler', False):  # HF loads it with from_pretrained(dir, add_pooling_layer=False)
      out.update(unifer_pooler=False)
  else:
    out.update(attention_dropout=0.0)
  if family == 'siglip':
    out.update(vision_use_head=cfg.pool == 'map')
  return out


def build(cfg, *, rngs: nnx.Rngs) -> vit.ViT:
  return vit.ViT(cfg, rngs=rngs)


# ---------------------------------------------------------------------------------------
# The tensor map: one entry per HF tensor
# ---------------------------------------------------------------------------------------

Path = tuple  # a path into our pure param dict; per-layer paths start with ('blocks',)


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor, the parameter(s) of ours it fills, and the layout change both ways."""
  hf: str
  hf_shape: tuple
  ours: tuple[Path, ...]
  layer: int | None = None
  to_ours: Callable = lambda a: (a,)  # hf array -> one array per path in ``ours``
  to_hf: Callable = lambda *a: a[0]  # our arrays -> hf array


def _linear(hf: str, ours: Path, d_in: int, d_out: int, bias: bool = True, layer=None):
  out = [_Entry(hf + '.weight', (d_out, d_in), (ours + ('kernel',),), layer,
                lambda a: (a.T,), lambda k: k.T)]
  if bias:
    out.append(_Entry(hf + '.bias', (d_out,), (ours + ('bias',),), layer))
  return out


def _norm(hf: str, ours: Path, d: int, layer=None):
  return [_Entry(hf + '.weight', (d,), (ours + ('scale',),), layer),
          _Entry(hf + '.bias', (d,), (ours + ('bias',),), layer)]


def _reshaped(hf: str, hf_shape: tuple, ours: Path, our_shape: tuple):
  return _Entry(hf, hf_shape, (ours,), None, lambda a: (a.reshape(our_shape),),
                lambda x: x.reshape(hf_shape))


def _block_entries(cfg, i: int) -> list[_Entry]:
  d, m, b = cfg.width, cfg.mlp_dim, ('blocks',)
  if cfg.variant == 'vit':
    pre = f'encoder.layer.{i}.'
    names = dict(attn_norm='layernorm_before', query='attention.attention.query',
                 key='attention.attention.key', value='attention.attention.value',
                 out='attention.output.dense', mlp_norm='layernorm_after',
                 fc1='intermediate.dense', fc2='output.dense')
  else:
    pre = f'encoder.layers.{i}.'
    names = dict(attn_norm='layer_norm1', query='self_attn.q_proj', key='self_attn.k_proj',
                 value='self_attn.v_proj', out='self_attn.out_proj', mlp_norm='layer_norm2',
                 fc1='mlp.fc1', fc2='mlp.fc2')
  entries = _norm(pre + names['attn_norm'], b + ('attn_norm',), d, i)
  for proj in ('query', 'key', 'value'):
    entries += _linear(pre + names[proj], b + ('attn', proj), d, d, cfg.qkv_bias, i)
  entries += _linear(pre + names['out'], b + ('attn', 'out'), d, d, True, i)
  entries += _norm(pre + names['mlp_norm'], b + ('mlp_norm',), d, i)
  entries += _linear(pre + names['fc1'], b + ('mlp', 'fc1'), d, m, True, i)
  entries += _linear(pre + names['fc2'], b + ('mlp', 'fc2'), m, d, True, i)
  return entries


def _map_head_entries(cfg) -> list[_Entry]:
  d, h = cfg.width, ('map_head',)
  qkv = tuple(h + ('attn', p) for p in ('query', 'key', 'value'))
  return [
      _reshaped('head.probe', (1, 1, d), h + ('probe',), (d,)),
      # torch MultiheadAttention fuses q/k/v: rows [0:D] query, [D:2D] key, [2D:3D] value.
      _Entry('head.attention.in_proj_weight', (3 * d, d), tuple(p + ('kernel',) for p in qkv),
             None, lambda a: tuple(w.T for w in np.split(a, 3, axis=0)),
             lambda q, k, v: np.concatenate([q.T, k.T, v.T], axis=0)),
      _Entry('head.attention.in_proj_bias', (3 * d,), tuple(p + ('bias',) for p in qkv),
             None, lambda a: tuple(np.split(a, 3)), lambda q, k, v: np.concatenate([q, k, v])),
      *_linear('head.attention.out_proj', h + ('attn', 'out'), d, d),
      *_norm('head.layernorm', h + ('norm',), d),
      *_linear('head.mlp.fc1', h + ('mlp', 'fc1'), d, cfg.mlp_dim),
      *_linear('head.mlp.fc2', h + ('mlp', 'fc2'), cfg.mlp_dim, d),
  ]


def _conv(hf: str, cfg) -> _Entry:
  d, p, c = cfg.width, cfg.patch_size, cfg.num_channels
  # [D, C, kh, kw] -> [kh, kw, C, D] -> [kh*kw*C, D]: ViT.embed flattens (row, col, channel).
  return _Entry(hf, (d, c, p, p), (('patch_embed', 'kernel'),), None,
                lambda a: (a.transpose(2, 3, 1, 0).reshape(p * p * c, d),),
                lambda k: k.reshape(p, p, c, d).transpose(3, 2, 0, 1))


def _entries(cfg) -> list[_Entry]:
  """Every HF tensor of the vision model for ``cfg``, in HF's un-prefixed names."""
  d = cfg.width
  n_pos = (cfg.image_size // cfg.patch_size) ** 2 + (cfg.variant != 'siglip')
  if cfg.variant == 'vit':
    out = [_reshaped('embeddings.cls_token', (1, 1, d), ('cls_token',), (d,)),
           _reshaped('embeddings.position_embeddings', (1, n_pos, d), ('pos_embed',), (n_pos, d)),
           _conv('embeddings.patch_embeddings.projection.weight', cfg),
           _Entry('embeddings.patch_embeddings.projection.bias', (d,), (('patch_embed', 'bias'),))]
  else:
    out = [_conv('embeddings.patch_embedding.weight', cfg),
           _Entry('embeddings.position_embedding.weight', (n_pos, d), (('pos_embed',),))]
    if cfg.variant == 'clip':
      out += [_Entry('embeddings.class_embedding', (d,), (('cls_token',),)),
              *_norm('pre_layrnorm', ('pre_norm',), d)]
    else:
      out.append(_Entry('embeddings.patch_embedding.bias', (d,), (('patch_embed', 'bias'),)))
  for i in range(cfg.depth):
    out += _block_entries(cfg, i)
  if cfg.variant == 'vit':
    out += _norm('layernorm', ('final_norm',), d)
    if cfg.get('pooler', False):
      out += _linear('pooler.dense', ('pooler',), d, d)
  elif cfg.variant == 'clip':
    out += _norm('post_layernorm', ('pool_norm',), d)  # applied to the pooled cls only
  else:
    out += _norm('post_layernorm', ('final_norm',), d)
  if cfg.pool == 'map':
    out += _map_head_entries(cfg)
  return out


# ---------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------

def _tower_prefix(keys: list[str], family: str) -> str:
  """Where the vision tensors live: '' (the HF vision model as transformers 5 saves it),
  'vision_model.' (composite CLIP/SigLIP, or the older standalone CLIP/SigLIP-vision form)
  or 'vit.' (ViTFor... checkpoints)."""
  candidate = 'vit.' if family == 'vit' else 'vision_model.'
  if not any(k.startswith('embeddings.') for k in keys) and any(k.startswith(candidate) for k in keys):
    return candidate
  return ''


def _get(tree: dict, path: Path):
  for k in path:
    tree = tree[k]
  return tree


def _our_path(cfg, entry_path: Path, layer: int | None) -> tuple[Path, int | None]:
  """(path in the pure dict, index along the stacked layer axis or None)."""
  if layer is None:
    return entry_path, None
  if cfg.scan_layers:
    return entry_path, layer
  return (entry_path[0], layer) + entry_path[1:], None


def params_from_hf(reader, cfg) -> dict:
  """The pure param dict of ``build(cfg)`` filled from an HF checkpoint (dtypes kept)."""
  entries = _entries(cfg)
  keys = list(reader.keys())
  prefix = _tower_prefix(keys, cfg.variant)
  found = {k[len(prefix):]: tuple(reader.shape(k)) for k in keys if k.startswith(prefix)}
  skipped = len(keys) - len(found)
  if skipped:
    log.info('vision checkpoint: reading the %d tensors under %r; skipping %d others '
             '(text tower / projections / classifier)', len(found), prefix, skipped)
  where = f' (tensors under {prefix!r})' if prefix else ''
  check_keys({e.hf: e.hf_shape for e in entries}, found,
             f'{_HF_CLASS[cfg.variant]} checkpoint {getattr(reader, "dir", "")}{where}')

  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))),
                                        nnx.Param))
  params: dict = {}
  for entry in entries:  # one tensor read at a time
    arrays = entry.to_ours(reader.get(prefix + entry.hf))
    for sub, array in zip(entry.ours, arrays):
      path, index = _our_path(cfg, sub, entry.layer)
      want = _get(abstract, path).shape
      want = want[1:] if index is not None else want
      if tuple(array.shape) != tuple(want):  # a mapping bug, not a checkpoint problem
        raise ConversionError(f'{entry.hf} -> {"/".join(map(str, path))}: converted shape '
                              f'{array.shape}, the model expects {want}')
      node = params
      for k in path[:-1]:
        node = node.setdefault(k, {})
      if index is None:
        node[path[-1]] = np.asarray(array)
      else:  # fill the stacked [layers, ...] array in place: no second copy of the model
        if path[-1] not in node:
          node[path[-1]] = np.empty((cfg.depth, *want), array.dtype)
        node[path[-1]][index] = array
  return params


def params_to_hf(params: dict, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) pairs of the HF vision model (ViTModel / CLIPVisionModel /
  SiglipVisionModel), un-prefixed, as transformers 5 saves them."""
  _check_exportable(cfg)
  for entry in _entries(cfg):
    ours = []
    for sub in entry.ours:
      path, index = _our_path(cfg, sub, entry.layer)
      array = _get(params, path)
      ours.append(np.asarray(array if index is None else array[index]))  # one layer to host
    yield entry.hf, np.ascontiguousarray(entry.to_hf(*ours))

"""Hugging Face ViT / CLIP-vision / SigLIP-vision / BLIP-2-vision checkpoints <->
``models.vit.ViT``.

model_type                   HF class            tensors read
'vit'                        ViTModel            ``*`` (or ``vit.*`` of a ViTFor... model)
'clip_vision_model'          CLIPVisionModel     ``*`` (or the older ``vision_model.*`` form)
'siglip_vision_model'        SiglipVisionModel   ``*`` (or the older ``vision_model.*`` form)
'clip'                       CLIPModel           ``vision_model.*`` only; text tower ignored
'siglip'                     SiglipModel         ``vision_model.*`` only; text tower ignored
'blip_2_vision_model'        Blip2VisionModel    ``*``; attention biases fused (``qkv.bias``)
                                                 or the EVA form (``q_bias``, ``v_bias``)
'instructblip_vision_model'  InstructBlip-       the same as Blip2VisionModel
                             VisionModel

``convert.load_hf(dir)``, ``unifer convert from-hf`` and ``config.init.vision=`` all read
a directory through ``convert.hf_tower_config``: ``config_from_hf`` (config.json), then
``config_for_tensors`` (what only the tensors tell: whether a ViTModel has its pooler),
then ``params_from_hf``. Tensors outside the vision tower (text tower, projections, logit
scale, classifier) are skipped with one log line. ``params_to_hf`` always writes the
vision model itself, also for 'clip'/'siglip' sources (the composite's text tower is not
part of this model), and BLIP-2 biases in the fused form transformers 5.23 loads. The
tensor map itself (names, shapes, layouts) is ``convert.vision_layout``.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unifer_jax.convert import vision_layout
from unifer_jax.convert.hf_io import ConversionError, check_keys
from unifer_jax.convert.vision_layout import Path
from unifer_jax.models import vit

log = logging.getLogger(__name__)

MODEL_TYPES = ('vit', 'clip_vision_model', 'clip', 'siglip_vision_model', 'siglip',
               'blip_2_vision_model', 'instructblip_vision_model')

_FAMILY = {'vit': 'vit', 'clip_vision_model': 'clip', 'clip': 'clip',
           'siglip_vision_model': 'siglip', 'siglip': 'siglip',
           'blip_2_vision_model': 'blip2', 'instructblip_vision_model': 'blip2'}
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
    # Blip2VisionConfig and InstructBlipVisionConfig share these (EVA ViT-g/14). Their
    # patch conv always takes 3 channels: the config has no num_channels.
    'blip2': dict(hidden_size=1408, num_hidden_layers=39, num_attention_heads=16,
                  intermediate_size=6144, hidden_act='gelu', layer_norm_eps=1e-6,
                  image_size=224, patch_size=14, qkv_bias=True),
}
_ACT_FROM_HF = {'gelu': 'gelu', 'quick_gelu': 'quick_gelu', 'gelu_pytorch_tanh': 'gelu_tanh',
                'gelu_new': 'gelu_tanh', 'gelu_python_tanh': 'gelu_tanh'}
_ACT_TO_HF = {'gelu': 'gelu', 'quick_gelu': 'quick_gelu', 'gelu_tanh': 'gelu_pytorch_tanh'}
_HF_CLASS = {'vit': 'ViTModel', 'clip': 'CLIPVisionModel', 'siglip': 'SiglipVisionModel',
             'blip2': 'Blip2VisionModel'}
_HF_MODEL_TYPE = {'vit': 'vit', 'clip': 'clip_vision_model', 'siglip': 'siglip_vision_model',
                  'blip2': 'blip_2_vision_model'}
# model_types with the layout of a family but their own HF class (hf_config_from(model_type=)).
_SAME_LAYOUT = {'instructblip_vision_model': ('blip2', 'InstructBlipVisionModel')}


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
  """Our ViT config for an HF ViT / CLIP(-vision) / SigLIP(-vision) / BLIP-2-vision
  config.json dict. A ViT's pooler is only guessed here (from ``architectures``):
  :func:`config_for_tensors` settles it from the checkpoint."""
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
    # The guess when only config.json is at hand: ViTModel carries a dense+tanh pooler,
    # ViTFor* heads do not, nor do ViTModels we export without one (hf_config_from marks
    # them "unifer_pooler": false; the key cannot be "add_pooling_layer", which would
    # swallow that from_pretrained argument).
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
      num_channels=3 if family == 'blip2' else int(c['num_channels']), width=width,
      depth=int(c['num_hidden_layers']), heads=heads, mlp_dim=int(c['intermediate_size']),
      variant=family, pool=pool, act=act, layer_norm_eps=float(c['layer_norm_eps']),
      qkv_bias=bool(c.get('qkv_bias', True)), pooler=pooler)


def config_for_tensors(cfg, names: Iterable[str]) -> ml_collections.ConfigDict:
  """``cfg`` settled by the checkpoint's tensor names where config.json cannot tell:
  whether a ViTModel has its pooler (one saved with ``add_pooling_layer=False`` writes the
  same config.json as one with it). ``convert.hf_tower_config`` calls this."""
  if cfg.variant != 'vit':
    return cfg
  names = set(names)
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.pooler = _tower_prefix(names, 'vit') + 'pooler.dense.weight' in names
  return out


def _check_exportable(cfg) -> None:
  problems = []
  if cfg.get('stem', 'patch') != 'patch':
    problems.append(f"stem={cfg.stem!r} (HF vision towers patchify with one conv)")
  if cfg.variant in ('clip', 'siglip') and not cfg.qkv_bias:
    problems.append(f'qkv_bias=False (HF {_HF_CLASS[cfg.variant]} always has q/k/v biases)')
  if cfg.pool == 'map' and cfg.variant != 'siglip':
    problems.append(f"pool='map' (only SigLIP has a MAP head in HF)")
  if cfg.get('pooler', False) and cfg.variant != 'vit':
    problems.append('pooler=True (only HF ViTModel has a dense+tanh pooler)')
  if cfg.variant == 'blip2' and cfg.num_channels != 3:
    problems.append(f'num_channels={cfg.num_channels} (HF Blip2VisionModel\'s patch conv '
                    'takes 3 channels)')
  if problems:
    raise ConversionError(f'vit config (variant {cfg.variant!r}) has no HF equivalent: '
                          + '; '.join(problems))


def _hf_class(family: str, model_type: str | None) -> tuple[str, str]:
  """(model_type, class) to write for a ``family`` tower that came from ``model_type``."""
  if model_type in _SAME_LAYOUT and _SAME_LAYOUT[model_type][0] == family:
    return model_type, _SAME_LAYOUT[model_type][1]
  if model_type is not None and _FAMILY.get(model_type) != family:
    raise ConversionError(f'model_type={model_type!r} does not hold a vit of variant '
                          f'{family!r} (that is {_HF_MODEL_TYPE[family]!r})')
  return _HF_MODEL_TYPE[family], _HF_CLASS[family]


def hf_config_from(cfg, model_type: str | None = None) -> dict:
  """The config.json of the HF vision model (ViTModel / CLIPVisionModel / SiglipVisionModel
  / Blip2VisionModel). ``model_type``: the one the tower came from, where several share a
  layout ('instructblip_vision_model' writes an InstructBlipVisionModel); by default the
  family's own."""
  _check_exportable(cfg)
  family = cfg.variant
  hf_type, hf_class = _hf_class(family, model_type)
  out = dict(model_type=hf_type, architectures=[hf_class],
             hidden_size=cfg.width, num_hidden_layers=cfg.depth,
             num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
             hidden_act=_ACT_TO_HF[cfg.act], layer_norm_eps=cfg.layer_norm_eps,
             image_size=cfg.image_size, patch_size=cfg.patch_size,
             dtype=jnp.dtype(cfg.param_dtype).name)
  if family == 'blip2':  # no num_channels: BLIP-2's patch conv always takes 3
    out.update(qkv_bias=cfg.qkv_bias)
  else:
    out.update(num_channels=cfg.num_channels)
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
  keys = list(reader.keys())
  prefix = _tower_prefix(keys, cfg.variant)
  found = {k[len(prefix):]: tuple(reader.shape(k)) for k in keys if k.startswith(prefix)}
  # BLIP-2's attention biases: fused qkv.bias (transformers 5) or EVA's q_bias / v_bias.
  qv_bias = cfg.variant == 'blip2' and any(k.endswith('self_attn.q_bias') for k in found)
  entries = vision_layout.entries(cfg, qv_bias=qv_bias)
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
  SiglipVisionModel / Blip2VisionModel), un-prefixed, as transformers 5 saves them."""
  _check_exportable(cfg)
  for entry in vision_layout.entries(cfg):
    ours = []
    for sub in entry.ours:
      path, index = _our_path(cfg, sub, entry.layer)
      array = _get(params, path)
      ours.append(np.asarray(array if index is None else array[index]))  # one layer to host
    yield entry.hf, np.ascontiguousarray(entry.to_hf(*ours))

"""The tensor map of every HF vision tower ``convert.vision`` reads and writes: one
:class:`Entry` per HF tensor, naming the parameter(s) of ``models.vit.ViT`` it fills and
the layout change both ways. ``entries(cfg)`` lists them for a ViT config, in HF's
un-prefixed names (as the vision model itself saves them).

Layouts: torch Linear ``[out, in]`` -> kernel ``[in, out]``; the patch conv
``[D, C, p, p]`` -> Dense kernel ``[p*p*C, D]`` (row, col, channel order, as ViT.embed
flattens NHWC patches); a fused q/k/v projection ``[3D, D]`` (SigLIP's MAP ``in_proj``,
BLIP-2's ``self_attn.qkv``) -> query/key/value, rows ``[0:D]`` query, ``[D:2D]`` key,
``[2D:3D]`` value.

BLIP-2's attention bias comes in two forms. transformers 5.23 holds one fused
``self_attn.qkv.bias [3D]`` (a parameter like any other: its key slice is whatever was
trained or loaded). The original EVA / LAVIS attention, and checkpoints written with it,
hold ``q_bias`` and ``v_bias`` and no key bias: the fused bias is ``cat(q_bias, 0,
v_bias)``, which is what ``entries(cfg, qv_bias=True)`` reads (our key bias gets zeros).
transformers 5.23 has no conversion rule for that form: its ``from_pretrained`` reports
``q_bias`` / ``v_bias`` unexpected and leaves ``qkv.bias`` at zeros (checked 2026-12-07).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Path = tuple  # a path into our pure param dict; per-layer paths start with ('blocks',)

_QKV = ('query', 'key', 'value')


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor, the parameter(s) of ours it fills, and the layout change both ways."""
  hf: str
  hf_shape: tuple
  ours: tuple[Path, ...]
  layer: int | None = None
  to_ours: Callable = lambda a: (a,)  # hf array -> one array per path in ``ours``
  to_hf: Callable = lambda *a: a[0]  # our arrays -> hf array


def _linear(hf: str, ours: Path, d_in: int, d_out: int, bias: bool = True, layer=None):
  out = [Entry(hf + '.weight', (d_out, d_in), (ours + ('kernel',),), layer,
               lambda a: (a.T,), lambda k: k.T)]
  if bias:
    out.append(Entry(hf + '.bias', (d_out,), (ours + ('bias',),), layer))
  return out


def _norm(hf: str, ours: Path, d: int, layer=None):
  return [Entry(hf + '.weight', (d,), (ours + ('scale',),), layer),
          Entry(hf + '.bias', (d,), (ours + ('bias',),), layer)]


def _reshaped(hf: str, hf_shape: tuple, ours: Path, our_shape: tuple):
  return Entry(hf, hf_shape, (ours,), None, lambda a: (a.reshape(our_shape),),
               lambda x: x.reshape(hf_shape))


def _fused_qkv(hf_weight: str, hf_bias: str | None, attn: Path, d: int, layer=None):
  """A torch ``[3D, D]`` q/k/v weight (and ``[3D]`` bias) <-> our three projections."""
  paths = tuple(attn + (p,) for p in _QKV)
  out = [Entry(hf_weight, (3 * d, d), tuple(p + ('kernel',) for p in paths), layer,
               lambda a: tuple(w.T for w in np.split(a, 3, axis=0)),
               lambda q, k, v: np.concatenate([q.T, k.T, v.T], axis=0))]
  if hf_bias is not None:
    out.append(Entry(hf_bias, (3 * d,), tuple(p + ('bias',) for p in paths), layer,
                     lambda a: tuple(np.split(a, 3)), lambda q, k, v: np.concatenate([q, k, v])))
  return out


def _conv(hf: str, cfg) -> Entry:
  d, p, c = cfg.width, cfg.patch_size, cfg.num_channels
  # [D, C, kh, kw] -> [kh, kw, C, D] -> [kh*kw*C, D]: ViT.embed flattens (row, col, channel).
  return Entry(hf, (d, c, p, p), (('patch_embed', 'kernel'),), None,
               lambda a: (a.transpose(2, 3, 1, 0).reshape(p * p * c, d),),
               lambda k: k.reshape(p, p, c, d).transpose(3, 2, 0, 1))


# -- per family ------------------------------------------------------------------------

def _block_entries(cfg, i: int) -> list[Entry]:
  """One layer of HF ViT (separate q/k/v) or CLIP / SigLIP."""
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
  for proj in _QKV:
    entries += _linear(pre + names[proj], b + ('attn', proj), d, d, cfg.qkv_bias, i)
  entries += _linear(pre + names['out'], b + ('attn', 'out'), d, d, True, i)
  entries += _norm(pre + names['mlp_norm'], b + ('mlp_norm',), d, i)
  entries += _linear(pre + names['fc1'], b + ('mlp', 'fc1'), d, m, True, i)
  entries += _linear(pre + names['fc2'], b + ('mlp', 'fc2'), m, d, True, i)
  return entries


def _blip2_block_entries(cfg, i: int, qv_bias: bool) -> list[Entry]:
  """One layer of BLIP-2's vision encoder: fused ``qkv``, out projection ``projection``."""
  d, m, b = cfg.width, cfg.mlp_dim, ('blocks',)
  pre, attn = f'encoder.layers.{i}.', b + ('attn',)
  entries = _norm(pre + 'layer_norm1', b + ('attn_norm',), d, i)
  fused_bias = pre + 'self_attn.qkv.bias' if cfg.qkv_bias and not qv_bias else None
  entries += _fused_qkv(pre + 'self_attn.qkv.weight', fused_bias, attn, d, i)
  if cfg.qkv_bias and qv_bias:  # the EVA form: no key bias, i.e. zeros
    entries += [Entry(pre + 'self_attn.q_bias', (d,), (attn + ('query', 'bias'),
                                                      attn + ('key', 'bias')), i,
                      lambda a: (a, np.zeros_like(a))),
                Entry(pre + 'self_attn.v_bias', (d,), (attn + ('value', 'bias'),), i)]
  entries += _linear(pre + 'self_attn.projection', attn + ('out',), d, d, True, i)
  entries += _norm(pre + 'layer_norm2', b + ('mlp_norm',), d, i)
  entries += _linear(pre + 'mlp.fc1', b + ('mlp', 'fc1'), d, m, True, i)
  entries += _linear(pre + 'mlp.fc2', b + ('mlp', 'fc2'), m, d, True, i)
  return entries


def _map_head_entries(cfg) -> list[Entry]:
  d, h = cfg.width, ('map_head',)
  return [
      _reshaped('head.probe', (1, 1, d), h + ('probe',), (d,)),
      # torch MultiheadAttention fuses q/k/v.
      *_fused_qkv('head.attention.in_proj_weight', 'head.attention.in_proj_bias',
                  h + ('attn',), d),
      *_linear('head.attention.out_proj', h + ('attn', 'out'), d, d),
      *_norm('head.layernorm', h + ('norm',), d),
      *_linear('head.mlp.fc1', h + ('mlp', 'fc1'), d, cfg.mlp_dim),
      *_linear('head.mlp.fc2', h + ('mlp', 'fc2'), cfg.mlp_dim, d),
  ]


def _embedding_entries(cfg, n_pos: int) -> list[Entry]:
  d = cfg.width
  if cfg.variant == 'vit':
    return [_reshaped('embeddings.cls_token', (1, 1, d), ('cls_token',), (d,)),
            _reshaped('embeddings.position_embeddings', (1, n_pos, d), ('pos_embed',),
                      (n_pos, d)),
            _conv('embeddings.patch_embeddings.projection.weight', cfg),
            Entry('embeddings.patch_embeddings.projection.bias', (d,),
                  (('patch_embed', 'bias'),))]
  if cfg.variant == 'blip2':
    return [_reshaped('embeddings.class_embedding', (1, 1, d), ('cls_token',), (d,)),
            _reshaped('embeddings.position_embedding', (1, n_pos, d), ('pos_embed',),
                      (n_pos, d)),
            _conv('embeddings.patch_embedding.weight', cfg),
            Entry('embeddings.patch_embedding.bias', (d,), (('patch_embed', 'bias'),))]
  out = [_conv('embeddings.patch_embedding.weight', cfg),
         Entry('embeddings.position_embedding.weight', (n_pos, d), (('pos_embed',),))]
  if cfg.variant == 'clip':
    out += [Entry('embeddings.class_embedding', (d,), (('cls_token',),)),
            *_norm('pre_layrnorm', ('pre_norm',), d)]
  else:
    out.append(Entry('embeddings.patch_embedding.bias', (d,), (('patch_embed', 'bias'),)))
  return out


def entries(cfg, *, qv_bias: bool = False) -> list[Entry]:
  """Every HF tensor of the vision model for ``cfg``, in HF's un-prefixed names.
  ``qv_bias``: BLIP-2 attention biases as ``q_bias`` / ``v_bias`` (read only)."""
  d = cfg.width
  n_pos = (cfg.image_size // cfg.patch_size) ** 2 + (cfg.variant != 'siglip')
  out = _embedding_entries(cfg, n_pos)
  for i in range(cfg.depth):
    out += (_blip2_block_entries(cfg, i, qv_bias) if cfg.variant == 'blip2'
            else _block_entries(cfg, i))
  if cfg.variant == 'vit':
    out += _norm('layernorm', ('final_norm',), d)
    if cfg.get('pooler', False):
      out += _linear('pooler.dense', ('pooler',), d, d)
  elif cfg.variant == 'clip':
    out += _norm('post_layernorm', ('pool_norm',), d)  # applied to the pooled cls only
  else:  # siglip, blip2 (LAVIS's ln_vision): every token
    out += _norm('post_layernorm', ('final_norm',), d)
  if cfg.pool == 'map':
    out += _map_head_entries(cfg)
  return out

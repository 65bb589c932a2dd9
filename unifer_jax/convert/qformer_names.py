"""HF tensor names of every Q-Former/BERT parameter (``convert.qformer`` reads and writes
through this table).

Name mapping (per layer; torch Linear ``weight [out, in]`` is our ``kernel [in, out]``;
layer ``i`` is ``blocks`` group ``i // freq`` member ``i % freq``, or ``tail`` member
``i - groups * freq`` past the whole groups):

| ours (``Layer``)                   | BERT                     | Blip2 / InstructBlip QFormer   |
|------------------------------------|--------------------------|--------------------------------|
| attention.{query,key,value}        | attention.self.*         | attention.attention.*          |
| attention.out / attention.norm     | attention.output.dense / .LayerNorm (both)                |
| cross_attention.*                  | --                       | crossattention.{attention,output}.* |
| query_mlp.{up,down,norm}           | (init: intermediate/output) | intermediate_query.dense, output_query.{dense,LayerNorm} |
| text_mlp.{up,down,norm}            | intermediate.dense, output.{dense,LayerNorm} (BERT, InstructBLIP) |
| word_embed / pos_embed             | embeddings.{word,position}_embeddings (BERT, InstructBLIP) |
| embed_norm                         | embeddings.LayerNorm     | layernorm / embeddings.layernorm |
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
from flax import traverse_util

from unifer_jax.convert.hf_io import TensorReader
from unifer_jax.models import qformer as qf


@dataclasses.dataclass(frozen=True)
class Leaf:
  path: tuple  # into the pure param dict
  hf: tuple  # HF tensor names: one per scanned group (stacked on axis 0), or just one
  kind: str  # 'T': torch Linear weight (transposed); 'q': [1, Q, H] query tokens; '': as is


def _to_ours(kind, a):
  return a.T if kind == 'T' else a[0] if kind == 'q' else a


def _to_hf(kind, a):
  return np.ascontiguousarray(a.T) if kind == 'T' else a[None] if kind == 'q' else a


def _hf_shape(kind, shape):
  return tuple(reversed(shape)) if kind == 'T' else (1, *shape) if kind == 'q' else tuple(shape)


def layer_names(style: str, layer: int, group_index: int, cfg, text_into_query: bool):
  """(sub-path inside a Layer, HF name suffix after ``encoder.layer.{layer}.``, kind)."""
  out = []

  def dense(ours, hf):
    out.extend([((*ours, 'kernel'), f'{hf}.weight', 'T'), ((*ours, 'bias'), f'{hf}.bias', '')])

  def norm(ours, hf):
    out.extend([((*ours, 'scale'), f'{hf}.weight', ''), ((*ours, 'bias'), f'{hf}.bias', '')])

  def attention(ours, hf_self, hf_out):
    for n in ('query', 'key', 'value'):
      dense((ours, n), f'{hf_self}.{n}')
    dense((ours, 'out'), f'{hf_out}.dense')
    norm((ours, 'norm'), f'{hf_out}.LayerNorm')

  def mlp(ours, hf_in, hf_out):
    dense((ours, 'up'), f'{hf_in}.dense')
    dense((ours, 'down'), f'{hf_out}.dense')
    norm((ours, 'norm'), f'{hf_out}.LayerNorm')

  attention('attention', 'attention.self' if style == 'bert' else 'attention.attention',
            'attention.output')
  if cfg.cross_attention_freq and group_index == 0 and style != 'bert':
    attention('cross_attention', 'crossattention.attention', 'crossattention.output')
  if cfg.cross_attention_freq:
    if style != 'bert':
      mlp('query_mlp', 'intermediate_query', 'output_query')
    elif text_into_query:  # LAVIS: the query FFN starts as a copy of BERT's FFN
      mlp('query_mlp', 'intermediate', 'output')
  if cfg.vocab_size:
    mlp('text_mlp', 'intermediate', 'output')
  return [(sub, f'encoder.layer.{layer}.{hf}', kind) for sub, hf, kind in out]


def leaves(cfg, style: str, prefix: str = '', *, text_into_query: bool = False) -> list[Leaf]:
  """Every parameter with an HF source in ``style`` ('bert' | 'blip2' | 'instructblip');
  ``prefix`` is 'bert.' / 'qformer.' where the checkpoint nests the encoder."""
  leaves = []
  add = lambda path, hf, kind='': leaves.append(Leaf(tuple(path), tuple(hf), kind))
  if style == 'bert':
    e = f'{prefix}embeddings.'
    add(('word_embed', 'embedding'), [e + 'word_embeddings.weight'])
    add(('pos_embed',), [e + 'position_embeddings.weight'])
    if cfg.type_vocab_size:
      add(('type_embed',), [e + 'token_type_embeddings.weight'])
    add(('embed_norm', 'scale'), [e + 'LayerNorm.weight'])
    add(('embed_norm', 'bias'), [e + 'LayerNorm.bias'])
    if cfg.get('pooler', False):
      add(('pooler', 'kernel'), [f'{prefix}pooler.dense.weight'], 'T')
      add(('pooler', 'bias'), [f'{prefix}pooler.dense.bias'])
    if qf.has_lm_head(cfg):  # BertForPreTraining / BertLMHeadModel layout, never prefixed
      t = 'cls.predictions.transform.'
      add(('lm_head', 'dense', 'kernel'), [t + 'dense.weight'], 'T')
      add(('lm_head', 'dense', 'bias'), [t + 'dense.bias'])
      add(('lm_head', 'norm', 'scale'), [t + 'LayerNorm.weight'])
      add(('lm_head', 'norm', 'bias'), [t + 'LayerNorm.bias'])
      add(('lm_head', 'bias'), ['cls.predictions.bias'])
  else:
    norm = f'{prefix}layernorm.' if style == 'blip2' else f'{prefix}embeddings.layernorm.'
    if style == 'instructblip':
      add(('word_embed', 'embedding'), [f'{prefix}embeddings.word_embeddings.weight'])
      add(('pos_embed',), [f'{prefix}embeddings.position_embeddings.weight'])
    add(('embed_norm', 'scale'), [norm + 'weight'])
    add(('embed_norm', 'bias'), [norm + 'bias'])
    if cfg.num_queries:
      add(('query_tokens',), ['query_tokens'], 'q')
  n, groups = qf.group_size(cfg), qf.num_groups(cfg)
  for i in range(n):
    per_group = [layer_names(style, g * n + i, i, cfg, text_into_query) for g in range(groups)]
    for j, (sub, _, kind) in enumerate(per_group[0]):
      names = [prefix + per_group[g][j][1] for g in range(groups)]
      if cfg.scan_layers:
        add(('blocks', 'layers', i, *sub), names, kind)
      else:
        for g in range(groups):
          add(('blocks', g, 'layers', i, *sub), [names[g]], kind)
  for i in range(qf.tail_size(cfg)):  # never scanned: one HF tensor per leaf
    for sub, name, kind in layer_names(style, groups * n + i, i, cfg, text_into_query):
      add(('tail', 'layers', i, *sub), [prefix + name], kind)
  return leaves


def expected(leaves, shapes) -> dict[str, tuple]:
  """HF name -> HF shape, from our (abstract) parameter shapes."""
  out = {}
  for leaf in leaves:
    shape = tuple(shapes[leaf.path].shape)
    shape = shape[1:] if scanned(leaf) else shape  # one HF tensor per scanned group
    for name in leaf.hf:
      out[name] = _hf_shape(leaf.kind, shape)
  return out


def canonical(name: str) -> str:
  """Old BERT checkpoints (TF-converted) name LayerNorm parameters gamma/beta."""
  return name.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta',
                                                                    'LayerNorm.bias')


def found(reader: TensorReader, keep) -> dict[str, str]:
  """canonical name -> name in the checkpoint, for the keys ``keep`` accepts."""
  return {canonical(k): k for k in reader.keys() if keep(canonical(k))}


def read(reader: TensorReader, leaves, real: dict[str, str], dtype=None) -> Iterator:
  """(path, numpy value) per leaf, reading one HF tensor at a time."""
  for leaf in leaves:
    parts = [_to_ours(leaf.kind, reader.get(real[n])) for n in leaf.hf]
    value = np.stack(parts) if scanned(leaf) else parts[0]
    yield leaf.path, value if dtype is None else value.astype(dtype)


def scanned(leaf: Leaf) -> bool:
  return leaf.path[0] == 'blocks' and leaf.path[1] == 'layers'


def write(params: dict, leaves) -> Iterator[tuple[str, np.ndarray]]:
  flat = traverse_util.flatten_dict(params)
  for leaf in leaves:
    value = np.asarray(flat[leaf.path])
    parts = list(value) if scanned(leaf) else [value]
    for name, part in zip(leaf.hf, parts):
      yield name, _to_hf(leaf.kind, part)



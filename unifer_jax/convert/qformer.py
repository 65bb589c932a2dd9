"""Hugging Face <-> unifer for the Q-Former family (``unifer_jax.models.qformer``).

| model_type        | HF class                                  | becomes                              |
|-------------------|-------------------------------------------|--------------------------------------|
| ``bert``          | BertModel (with/without ``bert.`` prefix) | ``Bert``: ``model(ids, mask)``       |
| ``blip_2_qformer``| Blip2QFormerModel (no text input)         | ``QFormer`` without learned queries  |
| ``blip-2``        | Blip2ForConditionalGeneration's Q-Former  | ``QFormer`` with ``query_tokens``    |

For ``blip-2`` only ``qformer.*`` and ``query_tokens`` are read (the vision tower and
LLM belong to other converters); ``projection_from_hf`` reads ``language_projection``.
``init_qformer_from_bert`` starts a Q-Former from a BERT checkpoint as BLIP-2 does.

Name mapping (per layer; torch Linear ``weight [out, in]`` is our ``kernel [in, out]``):

| ours (``Layer``)                   | BERT                     | Blip2QFormer                   |
|------------------------------------|--------------------------|--------------------------------|
| attention.{query,key,value}        | attention.self.*         | attention.attention.*          |
| attention.out / attention.norm     | attention.output.dense / .LayerNorm (both)                |
| cross_attention.*                  | --                       | crossattention.{attention,output}.* |
| query_mlp.{up,down,norm}           | (init: intermediate/output) | intermediate_query.dense, output_query.{dense,LayerNorm} |
| text_mlp.{up,down,norm}            | intermediate.dense, output.{dense,LayerNorm} (both)      |
| embed_norm                         | embeddings.LayerNorm     | layernorm                      |
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import ml_collections
import numpy as np
from flax import nnx, traverse_util

from unifer_jax.convert.hf_io import ConversionError, TensorReader, check_keys, read_hf_config
from unifer_jax.models import qformer as qf

MODEL_TYPES = ('bert', 'blip_2_qformer')

_ACTS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
         'relu': 'relu'}
_ACTS_TO_HF = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu'}
# BERT classes whose checkpoints hold no pooler (HF builds them with add_pooling_layer=False).
_NO_POOLER = ('BertForMaskedLM', 'BertLMHeadModel', 'BertForTokenClassification',
              'BertForQuestionAnswering')
# Task heads and buffers a BERT checkpoint may carry that a BertModel does not read.
_BERT_IGNORED_PREFIXES = ('cls.', 'classifier.', 'qa_outputs.')


# -- configs ---------------------------------------------------------------------------

def _act(hf: dict, where: str) -> str:
  act = hf.get('hidden_act', 'gelu')
  if act not in _ACTS:
    raise ConversionError(f'{where}: hidden_act={act!r} is not supported; expected one of '
                          f'{sorted(_ACTS)}')
  return _ACTS[act]


def _common(hf: dict, where: str, **kw) -> ml_collections.ConfigDict:
  return qf.default_config(
      hidden=hf.get('hidden_size', 768), depth=hf.get('num_hidden_layers', 12),
      heads=hf.get('num_attention_heads', 12), mlp_dim=hf.get('intermediate_size', 3072),
      max_position=hf.get('max_position_embeddings', 512),
      layer_norm_eps=hf.get('layer_norm_eps', 1e-12), act=_act(hf, where), **kw)


def config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """Our Q-Former/BERT config for an HF config.json dict."""
  model_type = hf_config.get('model_type')
  if model_type == 'bert':
    where = 'config.json (bert)'
    if hf_config.get('position_embedding_type', 'absolute') != 'absolute':
      raise ConversionError(f'{where}: position_embedding_type='
                            f'{hf_config["position_embedding_type"]!r}; only "absolute" is supported')
    for key in ('is_decoder', 'add_cross_attention'):
      if hf_config.get(key):
        raise ConversionError(f'{where}: {key}=true is not supported (bidirectional BertModel only)')
    archs = hf_config.get('architectures') or ['BertModel']
    return _common(hf_config, where, num_queries=0, cross_attention_freq=0, encoder_width=0,
                   vocab_size=hf_config.get('vocab_size', 30522),
                   type_vocab_size=hf_config.get('type_vocab_size', 2), lm_head=False,
                   pooler=not any(a in _NO_POOLER for a in archs))
  if model_type == 'blip_2_qformer':
    return _qformer_config(hf_config, 'config.json (blip_2_qformer)',
                           hf_config.get('encoder_hidden_size', 1408), num_queries=0)
  if model_type == 'blip-2':
    q = hf_config.get('qformer_config') or {}
    # Blip2Config.__post_init__ overrides the Q-Former's encoder width with the ViT's.
    width = (hf_config.get('vision_config') or {}).get('hidden_size',
                                                       q.get('encoder_hidden_size', 1408))
    return _qformer_config(q, 'config.json (blip-2) qformer_config', width,
                           num_queries=hf_config.get('num_query_tokens', 32))
  raise ConversionError(f'config.json: model_type={model_type!r} is not a Q-Former/BERT '
                        f'type; expected one of {MODEL_TYPES}')


def _qformer_config(hf: dict, where: str, encoder_width: int, num_queries: int):
  if hf.get('use_qformer_text_input', False):
    raise ConversionError(f'{where}: use_qformer_text_input=true (a Q-Former whose text '
                          'embeddings live outside it) is not supported; initialise the text '
                          'side from BERT with init_qformer_from_bert instead')
  return _common(hf, where, num_queries=num_queries, encoder_width=encoder_width,
                 cross_attention_freq=hf.get('cross_attention_frequency', 2), vocab_size=0,
                 type_vocab_size=0, lm_head=False, pooler=False)


def _style(cfg) -> str:
  if cfg.cross_attention_freq == 0:
    return 'bert'
  if cfg.vocab_size == 0:
    return 'blip2'
  raise ConversionError(
      'to-hf: no Hugging Face class holds a Q-Former with a text side (vocab_size > 0: '
      'text embeddings, text FFN, ITG head); convert the BERT (cross_attention_freq=0) or a '
      'Q-Former without text side (vocab_size=0) instead')


def hf_config_from(cfg) -> dict:
  """config.json of BertModel (plain BERT) or Blip2QFormerModel (Q-Former, no text side)."""
  common = dict(hidden_size=cfg.hidden, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
                hidden_act=_ACTS_TO_HF[cfg.act], layer_norm_eps=cfg.layer_norm_eps,
                max_position_embeddings=cfg.max_position, pad_token_id=0,
                initializer_range=0.02)
  if _style(cfg) == 'bert':
    if not cfg.get('pooler', False) or qf.has_lm_head(cfg):
      raise ConversionError('to-hf (BertModel): needs pooler=True and lm_head=False, the '
                            'parameters a BertModel checkpoint holds')
    return dict(model_type='bert', architectures=['BertModel'], vocab_size=cfg.vocab_size,
                type_vocab_size=max(cfg.type_vocab_size, 1), **common)
  if cfg.num_queries:
    raise ConversionError('to-hf: a Q-Former with learned queries is part of a BLIP-2 model; '
                          'write it with blip2_params_to_hf / blip2_config_entries')
  return dict(model_type='blip_2_qformer', architectures=['Blip2QFormerModel'],
              vocab_size=30522, encoder_hidden_size=cfg.encoder_width,
              cross_attention_frequency=cfg.cross_attention_freq,
              use_qformer_text_input=False, **common)


def blip2_config_entries(cfg) -> dict:
  """The Q-Former part of a ``blip-2`` config.json (``qformer_config``, ``num_query_tokens``)."""
  q = hf_config_from(_with(cfg, num_queries=0))
  q.pop('architectures')
  return dict(qformer_config=q, num_query_tokens=cfg.num_queries)


def _with(cfg, **changes) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.update(changes)
  return out


def build(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  return (qf.Bert if cfg.cross_attention_freq == 0 else qf.QFormer)(cfg, rngs=rngs)


# -- the name table --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Leaf:
  path: tuple  # into the pure param dict
  hf: tuple  # HF tensor names: one per scanned group (stacked on axis 0), or just one
  kind: str  # 'T': torch Linear weight (transposed); 'q': [1, Q, H] query tokens; '': as is


def _to_ours(kind, a):
  return a.T if kind == 'T' else a[0] if kind == 'q' else a


def _to_hf(kind, a):
  return np.ascontiguousarray(a.T) if kind == 'T' else a[None] if kind == 'q' else a


def _hf_shape(kind, shape):
  return tuple(reversed(shape)) if kind == 'T' else (1, *shape) if kind == 'q' else tuple(shape)


def _layer_names(style: str, layer: int, group_index: int, cfg, text_into_query: bool):
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
  if cfg.cross_attention_freq and group_index == 0 and style == 'blip2':
    attention('cross_attention', 'crossattention.attention', 'crossattention.output')
  if cfg.cross_attention_freq:
    if style == 'blip2':
      mlp('query_mlp', 'intermediate_query', 'output_query')
    elif text_into_query:  # LAVIS: the query FFN starts as a copy of BERT's FFN
      mlp('query_mlp', 'intermediate', 'output')
  if cfg.vocab_size:
    mlp('text_mlp', 'intermediate', 'output')
  return [(sub, f'encoder.layer.{layer}.{hf}', kind) for sub, hf, kind in out]


def _leaves(cfg, style: str, prefix: str = '', *, text_into_query: bool = False) -> list[_Leaf]:
  """Every parameter with an HF source in ``style`` ('bert' | 'blip2'); ``prefix`` is
  'bert.' / 'qformer.' where the checkpoint nests the encoder."""
  leaves = []
  add = lambda path, hf, kind='': leaves.append(_Leaf(tuple(path), tuple(hf), kind))
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
    add(('embed_norm', 'scale'), [f'{prefix}layernorm.weight'])
    add(('embed_norm', 'bias'), [f'{prefix}layernorm.bias'])
    if cfg.num_queries:
      add(('query_tokens',), ['query_tokens'], 'q')
  n = qf.group_size(cfg)
  groups = cfg.depth // n
  for i in range(n):
    per_group = [_layer_names(style, g * n + i, i, cfg, text_into_query) for g in range(groups)]
    for j, (sub, _, kind) in enumerate(per_group[0]):
      names = [prefix + per_group[g][j][1] for g in range(groups)]
      if cfg.scan_layers:
        add(('blocks', 'layers', i, *sub), names, kind)
      else:
        for g in range(groups):
          add(('blocks', g, 'layers', i, *sub), [names[g]], kind)
  return leaves


def _abstract_params(cfg) -> dict:
  """Path tuple -> ShapeDtypeStruct of every parameter of ``build(cfg)``."""
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _expected(leaves, shapes) -> dict[str, tuple]:
  """HF name -> HF shape, from our (abstract) parameter shapes."""
  out = {}
  for leaf in leaves:
    shape = tuple(shapes[leaf.path].shape)
    shape = shape[1:] if _scanned(leaf) else shape  # one HF tensor per scanned group
    for name in leaf.hf:
      out[name] = _hf_shape(leaf.kind, shape)
  return out


def _canonical(name: str) -> str:
  """Old BERT checkpoints (TF-converted) name LayerNorm parameters gamma/beta."""
  return name.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta',
                                                                    'LayerNorm.bias')


def _found(reader: TensorReader, keep) -> dict[str, str]:
  """canonical name -> name in the checkpoint, for the keys ``keep`` accepts."""
  return {_canonical(k): k for k in reader.keys() if keep(_canonical(k))}


def _read(reader: TensorReader, leaves, real: dict[str, str], dtype=None) -> Iterator:
  """(path, numpy value) per leaf, reading one HF tensor at a time."""
  for leaf in leaves:
    parts = [_to_ours(leaf.kind, reader.get(real[n])) for n in leaf.hf]
    value = np.stack(parts) if _scanned(leaf) else parts[0]
    yield leaf.path, value if dtype is None else value.astype(dtype)


def _scanned(leaf: _Leaf) -> bool:
  return leaf.path[0] == 'blocks' and leaf.path[1] == 'layers'


# -- from HF ---------------------------------------------------------------------------

def _bert_prefix(reader: TensorReader) -> str:
  return 'bert.' if any(k.startswith('bert.') for k in reader.keys()) else ''


def _bert_keep(cfg, prefix: str, *, lm_head: bool):
  def keep(name: str) -> bool:
    if name.endswith('position_ids'):  # a non-persistent buffer some old files carry
      return False
    if name.startswith('cls.predictions.') and lm_head:
      return not name.startswith('cls.predictions.decoder.')  # tied to word embeddings
    if name.startswith(_BERT_IGNORED_PREFIXES):
      return False
    if name.startswith(f'{prefix}pooler.') and not cfg.get('pooler', False):
      return False
    return True
  return keep


def _layout(reader: TensorReader, cfg):
  """(leaves, keep) of the checkpoint layout that ``cfg`` reads."""
  if cfg.cross_attention_freq == 0:
    prefix = _bert_prefix(reader)
    return _leaves(cfg, 'bert', prefix), _bert_keep(cfg, prefix, lm_head=False)
  if qf.has_lm_head(cfg) or cfg.vocab_size:
    raise ConversionError('from-hf: Hugging Face Q-Formers hold no text side; the config asks '
                          f'for vocab_size={cfg.vocab_size} (use init_qformer_from_bert)')
  if 'query_tokens' in reader or any(k.startswith('qformer.') for k in reader.keys()):
    keep = lambda k: k.startswith('qformer.') or k == 'query_tokens'
    return _leaves(cfg, 'blip2', 'qformer.'), keep
  return _leaves(cfg, 'blip2'), lambda k: True


def params_from_hf(reader: TensorReader, cfg) -> dict:
  """The pure param dict of ``build(cfg)`` from a BertModel / Blip2QFormerModel /
  Blip2ForConditionalGeneration checkpoint (its Q-Former part)."""
  shapes = _abstract_params(cfg)
  leaves, keep = _layout(reader, cfg)
  covered = {leaf.path for leaf in leaves}
  uncovered = [p for p in shapes if p not in covered]
  if uncovered:  # a config the HF layout cannot fill (e.g. an lm_head on a BertModel)
    raise ConversionError(f'{reader.dir}: the config has parameters no HF tensor fills: '
                          + ', '.join('/'.join(map(str, p)) for p in uncovered))
  real = _found(reader, keep)
  check_keys(_expected(leaves, shapes), {k: reader.shape(v) for k, v in real.items()},
             f'{reader.dir} (Q-Former/BERT)')
  return traverse_util.unflatten_dict(dict(_read(reader, leaves, real)))


def projection_from_hf(reader: TensorReader, cfg) -> dict:
  """BLIP-2's ``language_projection`` as ``{'kernel': [H, D_llm], 'bias': [D_llm]}``."""
  w, b = 'language_projection.weight', 'language_projection.bias'
  if w not in reader or b not in reader:
    raise ConversionError(f'{reader.dir}: {w} / {b} not found (a Blip2ForConditionalGeneration '
                          'checkpoint holds them)')
  out_dim = reader.shape(w)[0]
  check_keys({w: (out_dim, cfg.hidden), b: (out_dim,)}, {w: reader.shape(w), b: reader.shape(b)},
             f'{reader.dir} (language_projection)')
  return {'kernel': reader.get(w).T, 'bias': reader.get(b)}


# -- to HF -----------------------------------------------------------------------------

def _write(params: dict, leaves) -> Iterator[tuple[str, np.ndarray]]:
  flat = traverse_util.flatten_dict(params)
  for leaf in leaves:
    value = np.asarray(flat[leaf.path])
    parts = list(value) if _scanned(leaf) else [value]
    for name, part in zip(leaf.hf, parts):
      yield name, _to_hf(leaf.kind, part)


def params_to_hf(params: dict, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """HF tensors of BertModel or Blip2QFormerModel (see ``hf_config_from``)."""
  hf_config_from(cfg)  # refuses configs no HF class holds
  style = _style(cfg)
  yield from _write(params, _leaves(cfg, style))
  if style == 'bert' and not cfg.type_vocab_size:
    # BertModel always adds a token-type row; an all-zero one adds nothing.
    h = np.asarray(params['pos_embed'])
    yield 'embeddings.token_type_embeddings.weight', np.zeros((1, h.shape[1]), h.dtype)


def blip2_params_to_hf(params: dict, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """The ``qformer.*`` and ``query_tokens`` tensors of a Blip2ForConditionalGeneration."""
  if cfg.vocab_size or not cfg.cross_attention_freq or not cfg.num_queries:
    raise ConversionError('blip2_params_to_hf: needs a Q-Former with learned queries and no '
                          'text side (num_queries > 0, cross_attention_freq > 0, vocab_size=0)')
  yield from _write(params, _leaves(cfg, 'blip2', 'qformer.'))


def projection_to_hf(projection: dict) -> Iterator[tuple[str, np.ndarray]]:
  yield 'language_projection.weight', np.ascontiguousarray(np.asarray(projection['kernel']).T)
  yield 'language_projection.bias', np.asarray(projection['bias'])


# -- BLIP-2 initialisation from BERT ---------------------------------------------------

_MUST_MATCH = (('hidden', 'hidden_size'), ('depth', 'num_hidden_layers'),
               ('heads', 'num_attention_heads'), ('mlp_dim', 'intermediate_size'),
               ('max_position', 'max_position_embeddings'), ('layer_norm_eps', 'layer_norm_eps'),
               ('act', 'hidden_act'))


def init_qformer_from_bert(bert_dir, qformer_cfg, rngs: nnx.Rngs) -> tuple[dict, list[str]]:
  """BLIP-2's start: a Q-Former whose self-attention, text FFN, embeddings (and ITG head,
  when the checkpoint has ``cls.predictions``) come from BERT, whose query FFN copies
  BERT's FFN of the same layer, and whose cross-attention and query tokens are fresh.

  Returns ``(params, fresh)``: the pure param dict of ``QFormer(qformer_cfg)`` and the
  paths initialised randomly ('/'-joined; a row range when only new vocabulary rows
  are fresh). BERT's token-type row 0 is folded into the position embeddings when the
  Q-Former has no token types (exactly what BERT adds when no types are given).
  """
  hf = read_hf_config(bert_dir)
  if hf['model_type'] != 'bert':
    raise ConversionError(f'{bert_dir}/config.json: model_type={hf["model_type"]!r}; '
                          'init_qformer_from_bert needs a BERT checkpoint')
  bert = config_from_hf(hf)
  q = qformer_cfg
  bad = [f'qformer.{ours}={q[ours]!r} but BERT {theirs}={bert[ours]!r}'
         for ours, theirs in _MUST_MATCH if q[ours] != bert[ours]]
  if not q.cross_attention_freq:
    bad.append('qformer.cross_attention_freq must be > 0 (a Q-Former, not a plain BERT)')
  if q.vocab_size < bert.vocab_size:
    bad.append(f'qformer.vocab_size={q.vocab_size} is smaller than BERT vocab_size='
               f'{bert.vocab_size} (it may only grow, e.g. by a [DEC] token)')
  if q.type_vocab_size not in (0, bert.type_vocab_size):
    bad.append(f'qformer.type_vocab_size={q.type_vocab_size} must be 0 or BERT\'s '
               f'{bert.type_vocab_size}')
  if bad:
    raise ConversionError(f'{bert_dir}: BERT does not fit the Q-Former config:\n  '
                          + '\n  '.join(bad))

  reader = TensorReader(bert_dir)
  lm_head = qf.has_lm_head(q) and 'cls.predictions.transform.dense.weight' in reader
  # The layout to read: the Q-Former's own (scan grouping), BERT's vocabulary/types.
  src = _with(q, vocab_size=bert.vocab_size, type_vocab_size=bert.type_vocab_size,
              lm_head=lm_head, pooler=False, num_queries=0)
  prefix = _bert_prefix(reader)
  leaves = _leaves(src, 'bert', prefix, text_into_query=True)
  real = _found(reader, _bert_keep(src, prefix, lm_head=lm_head))
  check_keys(_expected(leaves, _abstract_params(src)),
             {k: reader.shape(v) for k, v in real.items()}, f'{bert_dir} (BERT for Q-Former)')

  model = qf.QFormer(q, rngs=rngs)
  params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  del model
  params = {k: np.asarray(v) for k, v in params.items()}
  fresh = {'/'.join(map(str, p)) for p in params}
  folded_type = None
  for path, value in _read(reader, leaves, real, params[('embed_norm', 'scale')].dtype):
    if path == ('type_embed',) and not q.type_vocab_size:
      folded_type = value[0]
      continue
    name = '/'.join(map(str, path))
    fresh.discard(name)
    if value.shape != params[path].shape:  # vocabulary rows added after BERT's stay fresh
      value = np.concatenate([value, params[path][value.shape[0]:]])
      fresh.add(f'{name}[{bert.vocab_size}:]')
    params[path] = value
  if folded_type is not None:
    params[('pos_embed',)] = params[('pos_embed',)] + folded_type
  return traverse_util.unflatten_dict(params), sorted(fresh)

"""Hugging Face <-> unifer for the Q-Former family (``unifer_jax.models.qformer``).

| model_type              | HF class                                  | becomes                        |
|-------------------------|-------------------------------------------|--------------------------------|
| ``bert``                | BertModel (with/without ``bert.`` prefix) | ``Bert``: ``model(ids, mask)`` |
| ``blip_2_qformer``      | Blip2QFormerModel (no text input)         | ``QFormer``, no learned queries |
| ``instructblip_qformer``| InstructBlipQFormerModel                  | ``InstructQFormer``, no learned queries |

and, for ``convert.vlm`` (whose model types ``blip-2`` / ``instructblip`` are), the
Q-Former of Blip2ForConditionalGeneration (``QFormer`` with ``query_tokens``) and of
InstructBlipForConditionalGeneration (``InstructQFormer`` with ``query_tokens``).

A BERT has a pooler when its checkpoint holds ``pooler.dense.*`` (``config_for_tensors``
is given the tensors' names; a BertModel saved with ``add_pooling_layer=False`` has none).

For the whole VLMs only ``qformer.*`` and ``query_tokens`` are read (the vision tower and
LLM belong to other converters); a reader whose names have ``qformer.`` stripped (a view
of that part, ``query_tokens`` as is) reads the same. The whole-VLM converter calls:

| direction | BLIP-2                              | InstructBLIP                               |
|-----------|-------------------------------------|--------------------------------------------|
| config    | ``config_from_hf(blip-2 config)``   | ``config_from_hf(instructblip config)``    |
| weights   | ``params_from_hf(reader, cfg)``     | ``params_from_hf(reader, cfg)``            |
| back      | ``blip2_params_to_hf`` / ``blip2_config_entries`` | ``instructblip_params_to_hf`` / ``instructblip_config_entries`` |
| projection| ``projection_from_hf`` / ``projection_to_hf`` (``language_projection``, both) |

``*_params_to_hf`` yield ``qformer.*`` and ``query_tokens [1, Q, H]``; ``*_config_entries``
the ``qformer_config`` and ``num_query_tokens`` of the VLM's config.json.
``init_qformer_from_bert`` starts a Q-Former from a BERT checkpoint as BLIP-2 does.

BLIP-2 checkpoints saved by transformers 4.x also carry a text FFN per layer
(``encoder.layer.*.intermediate.dense`` / ``output.{dense,LayerNorm}``, LAVIS's, unused
by its forward); 5.x's Blip2QFormerModel has no such module and drops them on load as
unexpected keys. So do we, with one log line: a text FFN without the text embeddings it
was trained with (absent from those files) is no text side worth loading.

The tensor names of every parameter: ``convert.qformer_names``.
"""

from __future__ import annotations

import logging
import re
from typing import Iterator

import ml_collections
import numpy as np
from flax import nnx, traverse_util

from unifer_jax.convert import qformer_names as names
from unifer_jax.convert.hf_io import ConversionError, TensorReader, check_keys, read_hf_config
from unifer_jax.models import qformer as qf

MODEL_TYPES = ('bert', 'blip_2_qformer', 'instructblip_qformer')

log = logging.getLogger(__name__)

_ACTS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
         'relu': 'relu'}
_ACTS_TO_HF = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu'}
# BERT classes whose checkpoints hold no pooler (HF builds them with add_pooling_layer=False):
# the guess when only config.json is at hand.
_NO_POOLER = ('BertForMaskedLM', 'BertLMHeadModel', 'BertForTokenClassification',
              'BertForQuestionAnswering')
# transformers 4.x BLIP-2 Q-Former layers' text FFN (see the module docstring).
_LEGACY_TEXT_FFN = re.compile(r'encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.\w+')
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


def config_for_tensors(cfg, names) -> ml_collections.ConfigDict:
  """``cfg`` settled by the checkpoint's tensor names: whether a BERT holds its pooler
  (``BertModel(add_pooling_layer=False)`` writes the same config.json); called by
  ``convert.hf_tower_config``."""
  if cfg.cross_attention_freq:
    return cfg
  names = set(names)
  prefix = 'bert.' if any(k.startswith('bert.') for k in names) else ''
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.pooler = f'{prefix}pooler.dense.weight' in names
  return out


def config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """Our Q-Former/BERT config for an HF config.json dict (``blip-2`` / ``instructblip``:
  the Q-Former of the whole model). A BERT's pooler is guessed from ``architectures``
  here and settled by :func:`config_for_tensors`."""
  model_type = hf_config.get('model_type')
  if model_type == 'bert':
    where = 'config.json (bert)'
    if hf_config.get('position_embedding_type', 'absolute') != 'absolute':
      raise ConversionError(f'{where}: position_embedding_type='
                            f'{hf_config["position_embedding_type"]!r}; only "absolute" is supported')
    for key in ('is_decoder', 'add_cross_attention'):
      if hf_config.get(key):
        raise ConversionError(f'{where}: {key}=true is not supported (bidirectional BertModel only)')
    pooler = not any(a in _NO_POOLER for a in hf_config.get('architectures') or ['BertModel'])
    return _common(hf_config, where, num_queries=0, cross_attention_freq=0, encoder_width=0,
                   vocab_size=hf_config.get('vocab_size', 30522),
                   type_vocab_size=hf_config.get('type_vocab_size', 2), lm_head=False,
                   pooler=pooler)
  if model_type in ('blip_2_qformer', 'instructblip_qformer'):
    return _qformer_config(hf_config, f'config.json ({model_type})',
                           hf_config.get('encoder_hidden_size', 1408), num_queries=0,
                           instruction=model_type == 'instructblip_qformer')
  if model_type in ('blip-2', 'instructblip'):
    q = hf_config.get('qformer_config') or {}
    # Blip2Config / InstructBlipConfig.__post_init__ override the Q-Former's encoder
    # width with the ViT's.
    width = (hf_config.get('vision_config') or {}).get('hidden_size',
                                                       q.get('encoder_hidden_size', 1408))
    return _qformer_config(q, f'config.json ({model_type}) qformer_config', width,
                           num_queries=hf_config.get('num_query_tokens', 32),
                           instruction=model_type == 'instructblip')
  raise ConversionError(f'config.json: model_type={model_type!r} is not a Q-Former/BERT '
                        f'type; expected one of {MODEL_TYPES}')


def _qformer_config(hf: dict, where: str, encoder_width: int, num_queries: int,
                    instruction: bool):
  if hf.get('use_qformer_text_input', False):
    raise ConversionError(f'{where}: use_qformer_text_input=true (a Q-Former whose text '
                          'embeddings live outside it) is not supported; initialise the text '
                          'side from BERT with init_qformer_from_bert instead')
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise ConversionError(f'{where}: position_embedding_type='
                          f'{hf["position_embedding_type"]!r}; only "absolute" is supported')
  # InstructBLIP's Q-Former embeds the instruction (word + position, no token types).
  text = dict(vocab_size=hf.get('vocab_size', 30522), instruction_aware=True) if instruction \
      else dict(vocab_size=0)
  return _common(hf, where, num_queries=num_queries, encoder_width=encoder_width,
                 cross_attention_freq=hf.get('cross_attention_frequency', 2),
                 type_vocab_size=0, lm_head=False, pooler=False, **text)


def _style(cfg) -> str:
  """The HF layout of ``cfg``: 'bert' | 'blip2' (no text side) | 'instructblip'."""
  if cfg.cross_attention_freq == 0:
    return 'bert'
  if cfg.vocab_size == 0:
    return 'blip2'
  extra = [what for what, has in (('an ITG head (lm_head)', qf.has_lm_head(cfg)),
                                  ('token types', cfg.type_vocab_size),
                                  ('a pooler', cfg.get('pooler', False))) if has]
  if extra:
    raise ConversionError(
        f'to-hf: no Hugging Face class holds a Q-Former with a text side and {", ".join(extra)} '
        '(InstructBlipQFormerModel has text embeddings and the text FFN only); set lm_head=False, '
        'type_vocab_size=0, pooler=False, or convert a Q-Former without text side '
        '(vocab_size=0)')
  return 'instructblip'


def hf_config_from(cfg) -> dict:
  """config.json of BertModel (plain BERT), Blip2QFormerModel (Q-Former, no text side)
  or InstructBlipQFormerModel (Q-Former with a text side, no ITG head)."""
  common = dict(hidden_size=cfg.hidden, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
                hidden_act=_ACTS_TO_HF[cfg.act], layer_norm_eps=cfg.layer_norm_eps,
                max_position_embeddings=cfg.max_position, pad_token_id=0,
                initializer_range=0.02)
  style = _style(cfg)
  if style == 'bert':
    if qf.has_lm_head(cfg):
      raise ConversionError('to-hf (BertModel): needs lm_head=False (a BertModel checkpoint '
                            'holds no MLM head)')
    # Without a pooler HF loads it with BertModel.from_pretrained(dir, add_pooling_layer=False);
    # from-hf sees no pooler.dense tensor and builds none.
    return dict(model_type='bert', architectures=['BertModel'], vocab_size=cfg.vocab_size,
                type_vocab_size=max(cfg.type_vocab_size, 1), **common)
  if cfg.num_queries:
    vlm = 'BLIP-2' if style == 'blip2' else 'InstructBLIP'
    raise ConversionError(f'to-hf: a Q-Former with learned queries is part of a {vlm} model; '
                          f'write it with {style}_params_to_hf / {style}_config_entries')
  common.update(encoder_hidden_size=cfg.encoder_width,
                cross_attention_frequency=cfg.cross_attention_freq)
  if style == 'instructblip':
    return dict(model_type='instructblip_qformer', architectures=['InstructBlipQFormerModel'],
                vocab_size=cfg.vocab_size, **common)
  return dict(model_type='blip_2_qformer', architectures=['Blip2QFormerModel'],
              vocab_size=30522, use_qformer_text_input=False, **common)


def _config_entries(cfg, style: str) -> dict:
  if _style(cfg) != style or not cfg.num_queries:
    raise ConversionError(f'{style}_config_entries: needs a Q-Former with learned queries '
                          f'and the {style} layout (see _style)')
  q = hf_config_from(_with(cfg, num_queries=0))
  q.pop('architectures')
  return dict(qformer_config=q, num_query_tokens=cfg.num_queries)


def blip2_config_entries(cfg) -> dict:
  """The Q-Former part of a ``blip-2`` config.json (``qformer_config``, ``num_query_tokens``)."""
  return _config_entries(cfg, 'blip2')


def instructblip_config_entries(cfg) -> dict:
  """The Q-Former part of an ``instructblip`` config.json (as ``blip2_config_entries``)."""
  return _config_entries(cfg, 'instructblip')


def _with(cfg, **changes) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.update(changes)
  return out


def build(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """``Bert``, ``InstructQFormer`` (called like InstructBlipQFormerModel) or ``QFormer``
  (like Blip2QFormerModel); all three hold the same parameters for the same config."""
  if cfg.cross_attention_freq == 0:
    return qf.Bert(cfg, rngs=rngs)
  cls = qf.InstructQFormer if cfg.get('instruction_aware', False) else qf.QFormer
  return cls(cfg, rngs=rngs)


def _abstract_params(cfg) -> dict:
  """Path tuple -> ShapeDtypeStruct of every parameter of ``build(cfg)``."""
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


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


def _where(reader) -> str:
  return str(getattr(reader, 'dir', 'checkpoint'))  # a view of a VLM may have no dir


def _layout(reader: TensorReader, cfg):
  """(leaves, keep) of the checkpoint layout that ``cfg`` reads."""
  if cfg.cross_attention_freq == 0:
    prefix = _bert_prefix(reader)
    return names.leaves(cfg, 'bert', prefix), _bert_keep(cfg, prefix, lm_head=False)
  # A whole VLM nests the Q-Former under 'qformer.' (query_tokens at the top); a view of
  # that part has the prefix stripped.
  prefix = 'qformer.' if any(k.startswith('qformer.') for k in reader.keys()) else ''
  style = 'instructblip' if cfg.vocab_size else 'blip2'
  if style == 'instructblip' and f'{prefix}embeddings.word_embeddings.weight' not in reader:
    raise ConversionError(f'{_where(reader)}: the config asks for a text side (vocab_size='
                          f'{cfg.vocab_size}) but the checkpoint holds no '
                          f'{prefix}embeddings.word_embeddings (BLIP-2 Q-Formers have none; '
                          'use init_qformer_from_bert)')
  ours = lambda k: (k.startswith(prefix) and not k.endswith('position_ids')) or k == 'query_tokens'
  if style == 'instructblip':
    return names.leaves(cfg, style, prefix), ours
  legacy = sorted(k for k in reader.keys()
                  if k.startswith(prefix) and _LEGACY_TEXT_FFN.fullmatch(k[len(prefix):]))
  if legacy:
    log.info('%s: skipping %d text-FFN tensors of a transformers 4.x BLIP-2 Q-Former (e.g. '
             '%s; 5.x Blip2QFormerModel has no text FFN and drops them too)', _where(reader),
             len(legacy), legacy[0])
  skip = set(legacy)
  return names.leaves(cfg, style, prefix), lambda k: ours(k) and k not in skip


def params_from_hf(reader: TensorReader, cfg) -> dict:
  """The pure param dict of ``build(cfg)`` from a BertModel / Blip2QFormerModel /
  InstructBlipQFormerModel checkpoint, or the Q-Former part of a
  Blip2/InstructBlipForConditionalGeneration one (``qformer.*`` and ``query_tokens``, or
  those names with ``qformer.`` stripped)."""
  shapes = _abstract_params(cfg)
  leaves, keep = _layout(reader, cfg)
  covered = {leaf.path for leaf in leaves}
  uncovered = [p for p in shapes if p not in covered]
  if uncovered:  # a config the HF layout cannot fill (e.g. an lm_head on a BertModel)
    raise ConversionError(f'{_where(reader)}: the config has parameters no HF tensor fills: '
                          + ', '.join('/'.join(map(str, p)) for p in uncovered))
  real = names.found(reader, keep)
  check_keys(names.expected(leaves, shapes), {k: reader.shape(v) for k, v in real.items()},
             f'{_where(reader)} (Q-Former/BERT)')
  return traverse_util.unflatten_dict(dict(names.read(reader, leaves, real)))


def projection_from_hf(reader: TensorReader, cfg) -> dict:
  """BLIP-2's ``language_projection`` as ``{'kernel': [H, D_llm], 'bias': [D_llm]}``."""
  w, b = 'language_projection.weight', 'language_projection.bias'
  if w not in reader or b not in reader:
    raise ConversionError(f'{_where(reader)}: {w} / {b} not found (a Blip2 / '
                          'InstructBlipForConditionalGeneration checkpoint holds them)')
  out_dim = reader.shape(w)[0]
  check_keys({w: (out_dim, cfg.hidden), b: (out_dim,)}, {w: reader.shape(w), b: reader.shape(b)},
             f'{_where(reader)} (language_projection)')
  return {'kernel': reader.get(w).T, 'bias': reader.get(b)}


# -- to HF -----------------------------------------------------------------------------

def params_to_hf(params: dict, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """HF tensors of BertModel, Blip2QFormerModel or InstructBlipQFormerModel (see
  ``hf_config_from``)."""
  hf_config_from(cfg)  # refuses configs no HF class holds
  style = _style(cfg)
  yield from names.write(params, names.leaves(cfg, style))
  if style == 'bert' and not cfg.type_vocab_size:
    # BertModel always adds a token-type row; an all-zero one adds nothing.
    h = np.asarray(params['pos_embed'])
    yield 'embeddings.token_type_embeddings.weight', np.zeros((1, h.shape[1]), h.dtype)


def _vlm_params_to_hf(params: dict, cfg, style: str) -> Iterator[tuple[str, np.ndarray]]:
  if not cfg.cross_attention_freq or not cfg.num_queries or _style(cfg) != style:
    text = 'a text side' if style == 'instructblip' else 'no text side'
    raise ConversionError(f'{style}_params_to_hf: needs a Q-Former with learned queries and '
                          f'{text} (num_queries > 0, cross_attention_freq > 0, vocab_size '
                          f'{"> 0" if style == "instructblip" else "= 0"})')
  yield from names.write(params, names.leaves(cfg, style, 'qformer.'))


def blip2_params_to_hf(params: dict, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """The ``qformer.*`` and ``query_tokens`` tensors of a Blip2ForConditionalGeneration."""
  yield from _vlm_params_to_hf(params, cfg, 'blip2')


def instructblip_params_to_hf(params: dict, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """The ``qformer.*`` and ``query_tokens`` tensors of an
  InstructBlipForConditionalGeneration."""
  yield from _vlm_params_to_hf(params, cfg, 'instructblip')


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
  leaves = names.leaves(src, 'bert', prefix, text_into_query=True)
  real = names.found(reader, _bert_keep(src, prefix, lm_head=lm_head))
  check_keys(names.expected(leaves, _abstract_params(src)),
             {k: reader.shape(v) for k, v in real.items()}, f'{bert_dir} (BERT for Q-Former)')

  model = qf.QFormer(q, rngs=rngs)
  params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  del model
  params = {k: np.asarray(v) for k, v in params.items()}
  fresh = {'/'.join(map(str, p)) for p in params}
  folded_type = None
  for path, value in names.read(reader, leaves, real, params[('embed_norm', 'scale')].dtype):
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

"""BLIP-2 Q-Former (LAVIS ``Qformer.py`` recipe) with its BERT text side.

One BERT-style post-LN encoder runs two kinds of positions through shared
self-attention: ``num_queries`` learned query tokens (first) and text tokens (after).
Query positions additionally cross-attend to the image tokens every
``cross_attention_freq`` layers and use their own FFN (``query_mlp``); text positions
use ``text_mlp``. Who sees whom is only the attention mask, which gives the three
BLIP-2 stage-1 passes:

| entry point        | positions       | mask                                                   |
|--------------------|-----------------|--------------------------------------------------------|
| ``encode_queries`` | queries         | queries see queries (ITC image side, LLM prefix)       |
| ... + instruction  | queries + text  | everyone sees every valid position (InstructBLIP prefix) |
| ``encode_text``    | text            | bidirectional over valid text (ITC text side; BERT)    |
| ``match``          | queries + text  | everyone sees every valid position (ITM)               |
| ``caption_logits`` | queries + text  | queries see queries; text sees queries + earlier text (ITG) |

One concatenated pass under the ITG mask equals LAVIS's two passes (queries first,
then text attending to the cached query keys/values): the queries never see text, so
their keys/values are the same. Text position ids start at 0 in every pass (as in HF's
InstructBlipQFormerEmbeddings: the queries take no position embedding).

InstructBLIP (``instruction_aware=True``) feeds the prompt's tokens to the Q-Former
beside the queries: ``encode_queries(image, instruction_ids=..., instruction_mask=...)``
is the ITM pass (same mask, same FFN routing) read at the query positions.

Config switches (0 turns a part off):
* ``cross_attention_freq=0`` and ``num_queries=0``: plain BERT (``Bert``, no query FFN);
* ``num_queries=0`` with ``cross_attention_freq>0``: an HF ``Blip2QFormerModel`` (query
  embeddings come from outside, ``model(query_embeds, image_tokens)``);
* ``vocab_size=0``: no text side (no text embeddings, text FFN or LM head) -- the
  Q-Former as shipped inside ``Blip2ForConditionalGeneration``;
* ``instruction_aware``: the LLM prefix reads the instruction (InstructBLIP; needs the
  text side). ``InstructQFormer`` is called like HF's ``InstructBlipQFormerModel``.

Layer ``i`` cross-attends when ``i % cross_attention_freq == 0`` (HF's rule). Layers are
stacked in groups of ``cross_attention_freq`` (the first of each group cross-attends)
so ``scan_layers`` scans one traced group; when the depth is not a multiple of the
frequency the last ``depth % freq`` layers form one shorter group, ``tail``, which is
never scanned (a Q-Former shallower than its frequency is a single group). Dropout is
not modelled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unifer_jax.models import layers

ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # erf form (HF/BERT 'gelu')
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),  # HF 'gelu_new'
    'relu': jax.nn.relu,
}


def default_config(**overrides) -> ml_collections.ConfigDict:
  """BLIP-2's Q-Former: BERT-base, 32 queries, cross-attention every 2nd layer."""
  cfg = ml_collections.ConfigDict(dict(
      hidden=768, depth=12, heads=12, mlp_dim=3072, num_queries=32, cross_attention_freq=2,
      encoder_width=1408, vocab_size=30522, max_position=512, type_vocab_size=0,
      layer_norm_eps=1e-12, act='gelu', lm_head=None, pooler=False, instruction_aware=False,
      dtype='float32', param_dtype='float32', scan_layers=True, unroll_layers=False,
      remat='none'))
  unknown = sorted(set(overrides) - set(cfg))
  if unknown:
    raise ValueError(f'qformer.default_config: unknown keys {unknown}; expected {sorted(cfg)}')
  cfg.update(overrides)
  return cfg


def has_lm_head(cfg) -> bool:
  """``cfg.lm_head`` (None/absent = auto: a Q-Former with a text side has the ITG head,
  since stage 1 trains captioning; a plain BERT has none)."""
  flag = cfg.get('lm_head', None)
  return bool(cfg.vocab_size > 0 and cfg.cross_attention_freq > 0 if flag is None else flag)


def group_size(cfg) -> int:
  """Layers per scanned group: one cross-attention layer and ``freq - 1`` plain ones
  (the whole depth when it is smaller than the frequency)."""
  return max(min(int(cfg.cross_attention_freq), int(cfg.depth)), 1)


def num_groups(cfg) -> int:
  """Whole groups in the (scanned) ``blocks`` stack."""
  return int(cfg.depth) // group_size(cfg)


def tail_size(cfg) -> int:
  """Layers after the whole groups (``tail``; its first one cross-attends)."""
  return int(cfg.depth) % group_size(cfg)


def check_config(cfg) -> None:
  if cfg.act not in ACTIVATIONS:
    raise ValueError(f'qformer.act={cfg.act!r}; expected one of {tuple(ACTIVATIONS)}')
  if cfg.hidden % cfg.heads:
    raise ValueError(f'qformer.hidden={cfg.hidden} is not divisible by qformer.heads={cfg.heads}')
  if cfg.cross_attention_freq < 0 or cfg.num_queries < 0 or cfg.vocab_size < 0:
    raise ValueError('qformer.cross_attention_freq, num_queries and vocab_size must be >= 0')
  if cfg.depth < 1:
    raise ValueError(f'qformer.depth={cfg.depth}; expected at least 1 layer')
  if cfg.cross_attention_freq == 0:
    if cfg.num_queries:
      raise ValueError(f'qformer.num_queries={cfg.num_queries} needs cross_attention_freq > 0 '
                       '(cross_attention_freq=0 is plain BERT, which has no queries)')
    if not cfg.vocab_size:
      raise ValueError('qformer: cross_attention_freq=0 (plain BERT) needs vocab_size > 0')
  if has_lm_head(cfg) and not cfg.vocab_size:
    raise ValueError('qformer.lm_head needs a text side (vocab_size > 0)')
  if cfg.get('pooler', False) and not cfg.vocab_size:
    raise ValueError('qformer.pooler (BERT pooler) needs a text side (vocab_size > 0)')
  if cfg.get('instruction_aware', False) and not (cfg.vocab_size and cfg.cross_attention_freq):
    raise ValueError('qformer.instruction_aware needs a text side (vocab_size > 0, to embed '
                     'the instruction) and cross-attention (cross_attention_freq > 0); got '
                     f'vocab_size={cfg.vocab_size}, '
                     f'cross_attention_freq={cfg.cross_attention_freq}')


class Attention(nnx.Module):
  """BERT attention block: multi-head attention, output dense, post-LN residual."""

  def __init__(self, cfg, kv_width: int, *, rngs: nnx.Rngs):
    self.heads = cfg.heads
    d = cfg.hidden
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.query = layers.Dense(d, d, axes=('embed', 'heads'), **kw)
    self.key = layers.Dense(kv_width, d, axes=('embed', 'heads'), **kw)
    self.value = layers.Dense(kv_width, d, axes=('embed', 'heads'), **kw)
    self.out = layers.Dense(d, d, axes=('heads', 'embed'), **kw)
    self.norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array | None) -> jax.Array:
    split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
    y = layers.attention(split(self.query(x)), split(self.key(kv)), split(self.value(kv)),
                         mask=mask)
    return self.norm(self.out(y.reshape(x.shape)) + x)


class MLP(nnx.Module):
  """BERT FFN block (intermediate + output): dense, act, dense, post-LN residual."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.act = ACTIVATIONS[cfg.act]
    self.up = layers.Dense(cfg.hidden, cfg.mlp_dim, axes=('embed', 'mlp'), **kw)
    self.down = layers.Dense(cfg.mlp_dim, cfg.hidden, axes=('mlp', 'embed'), **kw)
    self.norm = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.down(self.act(self.up(x))) + x)


class Layer(nnx.Module):
  """One Q-Former layer over ``[queries; text]``; the first ``num_query`` positions are
  queries (cross-attention if this layer has it, then ``query_mlp``)."""

  def __init__(self, cfg, cross: bool, *, rngs: nnx.Rngs):
    self.attention = Attention(cfg, cfg.hidden, rngs=rngs)
    self.cross_attention = Attention(cfg, cfg.encoder_width, rngs=rngs) if cross else None
    self.query_mlp = MLP(cfg, rngs=rngs) if cfg.cross_attention_freq > 0 else None
    self.text_mlp = MLP(cfg, rngs=rngs) if cfg.vocab_size > 0 else None

  def __call__(self, x, mask, num_query: int, image=None, image_mask=None):
    x = self.attention(x, x, mask)
    parts = []
    if num_query:
      q = x[:, :num_query]
      if self.cross_attention is not None:
        q = self.cross_attention(q, image, image_mask)
      parts.append(self.query_mlp(q))
    if x.shape[1] > num_query:
      parts.append(self.text_mlp(x[:, num_query:]))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


class Block(nnx.Module):
  """``size`` consecutive layers, the first with cross-attention: the unit that
  ``scan_layers`` scans over (``group_size``), or the shorter ``tail``."""

  def __init__(self, cfg, size: int, *, rngs: nnx.Rngs):
    cross = cfg.cross_attention_freq > 0
    self.layers = nnx.List([Layer(cfg, cross and i == 0, rngs=rngs) for i in range(size)])

  def __call__(self, x, mask, num_query, image, image_mask):
    for layer in self.layers:
      x = layer(x, mask, num_query, image, image_mask)
    return x


class LMHead(nnx.Module):
  """BERT's MLM/LM head: dense, act, LayerNorm, then the tied word-embedding decoder."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.act = ACTIVATIONS[cfg.act]
    self.dense = layers.Dense(cfg.hidden, cfg.hidden, axes=('embed', 'embed'), **kw)
    self.norm = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
    self.bias = layers.param(rngs, layers.zeros, (cfg.vocab_size,), ('vocab',),
                             layers.dtype_of(cfg.param_dtype))

  def __call__(self, x: jax.Array, word_embed: layers.Embed) -> jax.Array:
    h = self.norm(self.act(self.dense(x)))
    return word_embed.attend(h) + self.bias[...].astype(h.dtype)


class QFormer(nnx.Module):
  """The BLIP-2 Q-Former; see the module docstring for the entry points and masks."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    check_config(cfg)
    self.num_queries = int(cfg.num_queries)
    self.max_position = int(cfg.max_position)
    self.scan, self.remat = bool(cfg.scan_layers), cfg.remat
    self.unroll = bool(cfg.get('unroll_layers', False))
    self.has_cross = cfg.cross_attention_freq > 0
    self.dtype = layers.dtype_of(cfg.dtype)
    d, pd = cfg.hidden, layers.dtype_of(cfg.param_dtype)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.query_tokens = (layers.param(rngs, layers.default_kernel_init, (cfg.num_queries, d),
                                      ('queries', 'embed'), pd) if cfg.num_queries else None)
    text = cfg.vocab_size > 0
    self.word_embed = layers.Embed(cfg.vocab_size, d, **kw) if text else None
    self.pos_embed = (layers.param(rngs, layers.default_kernel_init, (cfg.max_position, d),
                                   (None, 'embed'), pd) if text else None)
    self.type_embed = (layers.param(rngs, layers.default_kernel_init, (cfg.type_vocab_size, d),
                                    (None, 'embed'), pd)
                       if text and cfg.type_vocab_size else None)
    # LAVIS's embeddings LayerNorm / HF Blip2QFormerModel.layernorm: on queries and text.
    self.embed_norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
    self.instruction_aware = bool(cfg.get('instruction_aware', False))
    self.blocks = layers.make_stack(lambda r: Block(cfg, group_size(cfg), rngs=r),
                                    num_groups(cfg), cfg.scan_layers, rngs)
    # Outside the stack, so the stack (and every checkpoint of a depth that is a multiple
    # of the frequency) keeps its layout; None for those depths.
    self.tail = Block(cfg, tail_size(cfg), rngs=rngs) if tail_size(cfg) else None
    self.lm_head = LMHead(cfg, rngs=rngs) if has_lm_head(cfg) else None
    self.pooler = (layers.Dense(d, d, axes=('embed', 'embed'), **kw)
                   if cfg.get('pooler', False) else None)

  # -- pieces --------------------------------------------------------------------------

  def _require(self, what: str, ok: bool, why: str):
    if not ok:
      raise ValueError(f'QFormer.{what}: {why}')

  def _queries(self, batch: int) -> jax.Array:
    self._require('queries', self.query_tokens is not None,
                  'this Q-Former has no learned queries (num_queries=0, e.g. converted from a '
                  'Blip2QFormerModel); call model(query_embeds, image_tokens) instead')
    q = self.query_tokens[...].astype(self.dtype)
    # Broadcast from a replicated parameter: pinned, or every device holds all rows.
    return layers.constrain_hidden(jnp.broadcast_to(q[None], (batch, *q.shape)))

  def _text_embeddings(self, input_ids: jax.Array, token_type_ids=None) -> jax.Array:
    """word + token type + position (BERT's order); LayerNorm comes later, jointly with
    the queries."""
    self._require('text', self.word_embed is not None,
                  'this Q-Former has no text side (vocab_size=0)')
    t = input_ids.shape[1]
    if t > self.max_position:
      raise ValueError(f'QFormer: text length {t} exceeds max_position={self.max_position}')
    x = self.word_embed(input_ids)
    if self.type_embed is not None:
      types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
      x = x + jnp.take(self.type_embed[...], types, axis=0).astype(self.dtype)
    return x + self.pos_embed[...][:t].astype(self.dtype)

  def _encode(self, x, mask, num_query: int, image=None, image_mask=None) -> jax.Array:
    """LayerNorm on the embedded sequence, then every layer."""
    if num_query and self.has_cross and image is None:
      raise ValueError('QFormer: image tokens (encoder_hidden_states) are required for '
                       'query positions')
    # The cross-attention keys/values: per example, like the query/text stream.
    image = None if image is None else layers.constrain_hidden(image.astype(self.dtype))
    image_mask = None if image_mask is None else layers.padding_mask(image_mask)
    x = layers.constrain_hidden(self.embed_norm(x))
    fn = lambda block, h, _: (block(h, mask, num_query, image, image_mask), None)
    x, _ = layers.run_stack(self.blocks, x, fn, scan=self.scan, remat=self.remat,
                            unroll=self.unroll)
    if self.tail is not None:
      x, _ = layers.run_stack([self.tail], x, fn, scan=False, remat=self.remat)
    return x

  def _queries_and_text(self, queries, input_ids, text_mask=None):
    """[queries; text] embeddings before the LayerNorm, and their key validity (every
    query valid; ``text_mask`` None = all text valid)."""
    b, q = queries.shape[:2]
    x = jnp.concatenate([queries, self._text_embeddings(input_ids)], axis=1)
    text_valid = (jnp.ones(input_ids.shape, bool) if text_mask is None
                  else text_mask.astype(bool))
    return x, jnp.concatenate([jnp.ones((b, q), bool), text_valid], 1)

  def _joint(self, queries, image, input_ids, text_mask, image_mask):
    """Queries and text in one fully bidirectional pass over the valid positions, the
    queries cross-attending to the image: ``[B, Q + T, H]`` (ITM; InstructBLIP)."""
    x, valid = self._queries_and_text(queries, input_ids, text_mask)
    return self._encode(x, layers.padding_mask(valid), queries.shape[1], image, image_mask)

  # -- entry points --------------------------------------------------------------------

  def __call__(self, query_embeds: jax.Array, encoder_hidden_states: jax.Array,
               encoder_mask: jax.Array | None = None) -> jax.Array:
    """HF ``Blip2QFormerModel(query_embeds, encoder_hidden_states=...)`` last hidden
    state ``[B, Q, H]``: LayerNorm on the given query embeddings, then the layers."""
    return self._query_pass(query_embeds, encoder_hidden_states, encoder_mask)

  def _query_pass(self, query_embeds, image, image_mask):
    self._require('query pass', self.has_cross,
                  'plain BERT (cross_attention_freq=0) has no query path; use encode_text')
    return self._encode(query_embeds.astype(self.dtype), None, query_embeds.shape[1], image,
                        image_mask)

  def encode_queries(self, image_embeds: jax.Array, image_mask: jax.Array | None = None,
                     instruction_ids: jax.Array | None = None,
                     instruction_mask: jax.Array | None = None) -> jax.Array:
    """The learned queries after attending to the image ``[B, Q, H]`` (ITC image side
    and the LLM prefix). With ``instruction_ids`` ``[B, T]`` (``instruction_aware``
    only; ``instruction_mask`` 1 = token, 0 = padding) the queries also see the
    instruction: InstructBLIP's pass, HF ``qformer(...)[:, :Q]``."""
    queries = self._queries(image_embeds.shape[0])
    if instruction_ids is None:
      return self._query_pass(queries, image_embeds, image_mask)
    self._require('encode_queries', self.instruction_aware,
                  'instruction_ids given, but this Q-Former is not instruction-aware '
                  '(qformer.instruction_aware=False)')
    out = self._joint(queries, image_embeds, instruction_ids, instruction_mask, image_mask)
    return out[:, :self.num_queries]

  def encode_text(self, input_ids: jax.Array, text_mask: jax.Array | None = None,
                  token_type_ids: jax.Array | None = None) -> jax.Array:
    """Text-only bidirectional pass ``[B, T, H]`` (ITC text side); equals HF
    ``BertModel(input_ids, attention_mask).last_hidden_state``."""
    mask = None if text_mask is None else layers.padding_mask(text_mask)
    return self._encode(self._text_embeddings(input_ids, token_type_ids), mask, 0)

  def match(self, image_embeds: jax.Array, input_ids: jax.Array, text_mask: jax.Array,
            image_mask: jax.Array | None = None) -> jax.Array:
    """ITM: queries + text, fully bidirectional; the query outputs ``[B, Q, H]``."""
    queries = self._queries(image_embeds.shape[0])
    return self._joint(queries, image_embeds, input_ids, text_mask, image_mask)[
        :, :self.num_queries]

  def caption_logits(self, image_embeds: jax.Array, input_ids: jax.Array,
                     text_mask: jax.Array, image_mask: jax.Array | None = None) -> jax.Array:
    """ITG (teacher forcing): logits ``[B, T, V]`` at the text positions under the causal
    multimodal mask. Logit t predicts token t + 1; the stage loss shifts."""
    self._require('caption_logits', self.lm_head is not None, 'this Q-Former has no lm_head')
    x, valid = self._queries_and_text(self._queries(input_ids.shape[0]), input_ids, text_mask)
    out = self._encode(x, multimodal_causal_mask(self.num_queries, valid), self.num_queries,
                       image_embeds, image_mask)
    return self.lm_head(out[:, self.num_queries:], self.word_embed)

  def pool(self, hidden: jax.Array) -> jax.Array:
    """BERT's pooler output (dense + tanh on the first token), when ``cfg.pooler``."""
    self._require('pool', self.pooler is not None, 'built without a pooler (cfg.pooler=False)')
    return jnp.tanh(self.pooler(hidden[:, 0]))


def multimodal_causal_mask(num_query: int, valid: jax.Array) -> jax.Array:
  """``[B, 1, L, L]`` ITG mask (LAVIS's UniLM-style mask): query rows see query columns
  only; text row i sees every query and text columns <= i; padded columns are hidden."""
  n = valid.shape[1]
  row, col = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
  allowed = (col < num_query) | ((row >= num_query) & (col <= row))
  return allowed[None, None] & layers.padding_mask(valid)


class Bert(QFormer):
  """A plain BERT (``cross_attention_freq=0``) called as HF ``BertModel``:
  ``model(input_ids, attention_mask, token_type_ids=None)`` -> last hidden state."""

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    return self.encode_text(input_ids, attention_mask, token_type_ids)


class InstructQFormer(QFormer):
  """An instruction-aware Q-Former called as HF ``InstructBlipQFormerModel``:
  ``model(input_ids, attention_mask=None, query_embeds=None, encoder_hidden_states=None,
  encoder_attention_mask=None)`` -> last hidden state ``[B, Q + T, H]`` over
  [queries; text]. As in HF, ``attention_mask`` covers both (``[B, Q + T]``; None = all
  valid), and either ``input_ids`` (a text-only pass) or ``query_embeds`` (a
  queries-only pass) may be None."""

  def __call__(self, input_ids: jax.Array | None, attention_mask: jax.Array | None = None,
               query_embeds: jax.Array | None = None,
               encoder_hidden_states: jax.Array | None = None,
               encoder_attention_mask: jax.Array | None = None) -> jax.Array:
    parts = []
    if query_embeds is not None:
      parts.append(query_embeds.astype(self.dtype))
    if input_ids is not None:
      parts.append(self._text_embeddings(input_ids))
    if not parts:
      raise ValueError('InstructQFormer: give input_ids, query_embeds or both')
    x = jnp.concatenate(parts, axis=1)
    if attention_mask is not None and attention_mask.shape != x.shape[:2]:
      raise ValueError(f'InstructQFormer: attention_mask has shape {attention_mask.shape}; '
                       f'expected {x.shape[:2]} (it covers the queries, then the text)')
    mask = None if attention_mask is None else layers.padding_mask(attention_mask)
    num_query = 0 if query_embeds is None else query_embeds.shape[1]
    return self._encode(x, mask, num_query, encoder_hidden_states, encoder_attention_mask)

"""Decoder-only LLM of the Llama/Qwen2 family and of OPT, one module with config switches,
and a pure-functional KV cache (decoding loop: ``models.generation``, re-exported here).

=====================  ===============================  ================================
switch                 Llama / Qwen2 (default)          OPT
=====================  ===============================  ================================
``norm``               'rms': RMSNorm (``rms_eps``)     'layer': LayerNorm with bias
                                                        (``layer_norm_eps``)
``position_embedding`` 'rope' (``rope_*`` keys)         'learned': a table of
                                                        ``max_seq_len + position_offset``
                                                        rows added to the input
``mlp``                'swiglu' (gate, up, down)        'relu': ``down(relu(up(x)))``
biases                 Qwen2 ``qkv_bias``; Llama        all of ``qkv_bias``, ``o_bias``,
                       none or all three                ``mlp_bias`` (or none)
attention              grouped-query (``kv_heads``)     ``kv_heads == heads``
=====================  ===============================  ================================

Both are pre-norm with a final norm; ``tie_embeddings`` (OPT's default, Llama 3.2 / Qwen2.5
small) reads the logits off the token embedding. ``position_offset`` is HF OPT's: the
token at position p reads row p + 2 of the table.

Parameter tree (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``)::

  token_embed/embedding           [V, D]           ('vocab', 'embed')
  pos_embed/embedding             [S + 2, D]       (None, 'embed')  S = max_seq_len ('learned')
  layers/attn_norm/scale          [L, D]           ('layers', 'norm')   (+ bias: norm='layer')
  layers/attn/{q,k,v,o}/kernel    [L, D, N*H] ...  ('layers', 'embed', 'heads'|'kv_heads')
  layers/attn/{q,k,v}/bias        (cfg.qkv_bias)   o/bias (cfg.o_bias)
  layers/mlp_norm/scale           [L, D]                                (+ bias: norm='layer')
  layers/mlp/{gate,up,down}/kernel                 (no gate: mlp='relu'; biases: cfg.mlp_bias)
  final_norm/scale                [D]                                   (+ bias: norm='layer')
  lm_head/kernel                  [D, V]           (absent when cfg.tie_embeddings)

With ``scan_layers=False`` ``layers`` is an ``nnx.List``: ``layers/<i>/...`` without the
leading L axis.

Positions: unless given, a token's position (RoPE angle or learned-table row) is the
number of valid tokens before it in its row (``cumsum(attention_mask) - 1``), so a
left-padded prompt gets exactly the logits of the unpadded one. HF ``generate`` does the
same for every family, and so does HF OPT's ``forward`` (``cumsum(mask) * mask - 1``;
padding tokens read row 1, ours a valid row: they are never attended to); HF Llama's
``forward`` without ``position_ids`` uses ``arange`` instead.

Packed rows (several examples per row, ``data/packing.py``): ``segment_ids`` [B, T]
(1, 2, ... per example, 0 = padding) restrict attention to a token's own segment, and
positions restart at 0 in each segment (``positions_from_segments``, or the pipeline's
``positions``), so each example gets exactly the logits it has alone in a row.

KV cache (a dict; passed in and returned, so it works under ``jax.jit``)::

  k, v   [L, B, S, K, H]  keys (after RoPE) and values per layer and slot
  valid  [B, S] bool      slot holds a real token (padding slots stay False)
  index  int32 []         next slot to write (shared by the batch)
  pos    int32 [B]        position of each row's next token
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unifer_jax import sharding
from unifer_jax.models import layers
from unifer_jax.models.generation import generate, sample_logits  # noqa: F401  (llm.generate)

# Logical names of [batch, length, vocab] logits.
LOGIT_AXES = ('activation_batch', 'activation_length', 'activation_vocab')

Cache = dict[str, jax.Array]


def default_config(**overrides) -> ml_collections.ConfigDict:
  """A tiny Llama-shaped config (CPU tests and smoke runs); keyword overrides win."""
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=256, hidden=64, depth=2, heads=4, kv_heads=2, head_dim=None, mlp_dim=128,
      rope_theta=10000.0,
      # 'default' or 'llama3' (Llama 3.1+ frequency rescaling; the four fields below).
      rope_scaling='default', rope_factor=8.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_len=8192,
      rms_eps=1e-6, qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False,
      # Architecture switches (module docstring); OPT: 'layer', 'learned', 'relu'.
      norm='rms', layer_norm_eps=1e-5, position_embedding='rope', position_offset=2,
      mlp='swiglu',
      max_seq_len=2048, dtype='float32', param_dtype='float32', scan_layers=True,
      # With scan_layers: run the stacked layers unrolled (layers.run_stack).
      unroll_layers=False, remat='none'))
  cfg.update(overrides)
  return cfg


def rope_inv_freq(cfg, head_dim: int) -> np.ndarray:
  """Inverse frequencies ``[head_dim // 2]`` (f32), with Llama 3 rescaling if configured."""
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  scaling = cfg.get('rope_scaling', 'default')
  if scaling == 'default':
    return inv_freq.astype(np.float32)
  if scaling != 'llama3':
    raise ValueError(f'rope_scaling={scaling!r}; supported: default, llama3')
  factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_len
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | None) -> jax.Array:
  """HF rotate-half RoPE on ``x [B, T, N, H]`` at ``positions [B, T]`` (computed in f32);
  ``x`` unchanged when ``inv_freq`` is None (learned absolute positions)."""
  if inv_freq is None:
    return x
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
  cos, sin = jnp.cos(freqs)[:, :, None], jnp.sin(freqs)[:, :, None]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention; K = kv_heads divides N = heads (K = 1: multi-query)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, n, k = cfg.hidden, cfg.heads, cfg.kv_heads
    if n % k:
      raise ValueError(f'heads={n} must be a multiple of kv_heads={k}')
    self.num_heads, self.num_kv_heads = n, k
    self.head_dim = h = cfg.get('head_dim') or d // n
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q = layers.Dense(d, n * h, axes=('embed', 'heads'), use_bias=cfg.qkv_bias, **kw)
    self.k = layers.Dense(d, k * h, axes=('embed', 'kv_heads'), use_bias=cfg.qkv_bias, **kw)
    self.v = layers.Dense(d, k * h, axes=('embed', 'kv_heads'), use_bias=cfg.qkv_bias, **kw)
    self.o = layers.Dense(n * h, d, axes=('heads', 'embed'), use_bias=cfg.get('o_bias', False),
                          **kw)

  def __call__(self, x, positions, mask, inv_freq, kv_cache=None, index=None):
    """``x [B, T, D]``; ``mask`` broadcastable to ``[B, N, T, S]``. With ``kv_cache``
    (``(k, v)`` each ``[B, S, K, H]``) the new keys/values are written at slot ``index``
    and attention runs over the whole cache; returns ``(y, new kv_cache or None)``."""
    b, t, _ = x.shape
    q = apply_rope(self.q(x).reshape(b, t, self.num_heads, self.head_dim), positions, inv_freq)
    k = apply_rope(self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim), positions,
                   inv_freq)
    v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      start = (0, index, 0, 0)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      kv_cache = (k_cache, v_cache)
      k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    y = layers.attention(q, k, v, mask=mask)
    return self.o(y.reshape(b, t, self.num_heads * self.head_dim)), kv_cache


class MLP(nnx.Module):
  """SwiGLU ``down(silu(gate(x)) * up(x))``, or with ``mlp='relu'`` OPT's
  ``down(relu(up(x)))`` (HF fc1 = up, fc2 = down: LoRA targets name both alike)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    kind = cfg.get('mlp', 'swiglu')
    if kind not in ('swiglu', 'relu'):
      raise ValueError(f"llm.mlp={kind!r}; expected 'swiglu' or 'relu'")
    kw = dict(use_bias=cfg.get('mlp_bias', False), dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate = (layers.Dense(cfg.hidden, cfg.mlp_dim, axes=('embed', 'mlp'), **kw)
                 if kind == 'swiglu' else None)
    self.up = layers.Dense(cfg.hidden, cfg.mlp_dim, axes=('embed', 'mlp'), **kw)
    self.down = layers.Dense(cfg.mlp_dim, cfg.hidden, axes=('mlp', 'embed'), **kw)

  def __call__(self, x):
    if self.gate is None:
      return self.down(jax.nn.relu(self.up(x)))
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def make_norm(cfg, rngs: nnx.Rngs) -> nnx.Module:
  """RMSNorm (``norm='rms'``) or LayerNorm with bias (``norm='layer'``, OPT)."""
  kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
  kind = cfg.get('norm', 'rms')
  if kind == 'rms':
    return layers.RMSNorm(cfg.hidden, eps=cfg.rms_eps, **kw)
  if kind == 'layer':
    return layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
  raise ValueError(f"llm.norm={kind!r}; expected 'rms' or 'layer'")


class DecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.attn_norm = make_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = make_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, mask, inv_freq, kv_cache=None, index=None):
    y, kv_cache = self.attn(self.attn_norm(x), positions, mask, inv_freq, kv_cache, index)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), kv_cache


def positions_from_mask(mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
  """Positions ``[B, T]``: ``start`` + number of valid tokens before each token."""
  mask = mask.astype(jnp.int32)
  start = jnp.asarray(start, jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) + (start[:, None] if start.ndim else start)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions ``[B, T]`` that restart at 0 where each segment starts (packed rows)."""
  t = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class LLM(nnx.Module):
  """Decoder-only LM; ``model(input_ids)`` -> f32 logits ``[B, T, V]``."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    # Frozen: hashable, so the graphdef can be a static jit argument.
    self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
    self.dtype = layers.dtype_of(cfg.dtype)
    self.head_dim = cfg.get('head_dim') or cfg.hidden // cfg.heads
    self.scan = cfg.get('scan_layers', True)
    self.token_embed = layers.Embed(cfg.vocab_size, cfg.hidden, axes=('vocab', 'embed'),
                                    dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    kind = cfg.get('position_embedding', 'rope')
    if kind not in ('rope', 'learned'):
      raise ValueError(f"llm.position_embedding={kind!r}; expected 'rope' or 'learned'")
    # Rows, like the ViT's and the Q-Former's position tables, are not sharded.
    self.pos_embed = layers.Embed(
        cfg.max_seq_len + cfg.position_offset, cfg.hidden, axes=(None, 'embed'),
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs) if kind == 'learned' else None
    self.layers = layers.make_stack(lambda r: DecoderLayer(cfg, rngs=r), cfg.depth, self.scan,
                                    rngs)
    self.final_norm = make_norm(cfg, rngs)
    self.lm_head = None if cfg.tie_embeddings else layers.Dense(
        cfg.hidden, cfg.vocab_size, axes=('embed', 'vocab'), use_bias=False, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, rngs=rngs)

  # ---------------------------------------------------------------- full forward
  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.token_embed(input_ids)

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """f32 logits ``[B, (T,) V]``, the vocab dimension over the rules' tensor axis (the
    largest activation of a step: never let it be replicated)."""
    if self.lm_head is None:
      logits = self.token_embed.attend(h).astype(jnp.float32)
    else:
      logits = self.lm_head(h).astype(jnp.float32)
    axes = LOGIT_AXES if logits.ndim == 3 else (LOGIT_AXES[0], LOGIT_AXES[2])
    return sharding.constrain(logits, axes)

  def _inputs(self, input_ids, inputs_embeds, attention_mask):
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError('pass exactly one of input_ids and inputs_embeds')
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    if attention_mask is None:
      attention_mask = jnp.ones(x.shape[:2], bool)
    return x, attention_mask.astype(bool)

  def _run_layers(self, x, positions, mask, cache_kv=None, index=None):
    inv_freq = None
    if self.pos_embed is None:
      # Recomputed per call (a few flops at trace time): a numpy array as module
      # attribute would land in the graphdef.
      inv_freq = rope_inv_freq(self.cfg, self.head_dim)
    else:
      # Positions count valid tokens, so they stay below the key slots S: checking S
      # (static) keeps every row inside the table (jnp.take would read NaN past it).
      if mask.shape[-1] > self.cfg.max_seq_len:
        raise ValueError(f'{mask.shape[-1]} token slots exceed the learned position table '
                         f'(llm.max_seq_len={self.cfg.max_seq_len})')
      x = x + self.pos_embed(positions + self.cfg.position_offset)

    def layer_fn(layer, h, kv):  # kv: this layer's (k, v) cache slices, or None
      return layer(h, positions, mask, inv_freq, kv, index)

    return layers.run_stack(self.layers, x, layer_fn, scan=self.scan,
                            remat=self.cfg.get('remat', 'none'), xs=cache_kv,
                            unroll=self.cfg.get('unroll_layers', False))

  def hidden_states(self, input_ids=None, *, inputs_embeds=None, attention_mask=None,
                    positions=None, segment_ids=None) -> jax.Array:
    """Final-normed hidden states ``[B, T, D]`` (``dtype``); logits are
    ``logits_from_hidden`` of them (compute them only where a loss needs them).
    ``segment_ids`` [B, T]: packed rows (module docstring)."""
    x, valid = self._inputs(input_ids, inputs_embeds, attention_mask)
    if positions is None:
      positions = (positions_from_mask(valid) if segment_ids is None
                   else positions_from_segments(segment_ids))
    t = x.shape[1]
    mask = layers.causal_mask(t) & layers.padding_mask(valid)
    if segment_ids is not None:
      mask = mask & layers.segment_mask(segment_ids)
    x, _ = self._run_layers(x, positions, mask)
    return self.final_norm(x)

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None,
               positions=None, segment_ids=None) -> jax.Array:
    return self.logits_from_hidden(self.hidden_states(
        input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
        positions=positions, segment_ids=segment_ids))

  # ---------------------------------------------------------------- KV cache
  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> Cache:
    """An empty cache for ``batch`` rows and ``max_len`` slots (default cfg.max_seq_len)."""
    max_len = max_len or self.cfg.max_seq_len
    shape = (self.cfg.depth, batch, max_len, self.cfg.kv_heads, self.head_dim)
    dtype = layers.dtype_of(dtype) if dtype is not None else self.dtype
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                pos=jnp.zeros((batch,), jnp.int32))

  def extend(self, cache: Cache, input_ids=None, *, inputs_embeds=None,
             attention_mask=None) -> tuple[jax.Array, Cache]:
    """Appends ``T`` tokens to the cache at slots ``[index, index + T)``; returns their
    final hidden states ``[B, T, D]`` and the new cache. Padding tokens (mask 0) are
    written but never attended to, so left, right and mid padding all work. The caller
    keeps ``index + T <= S`` (``index`` is traced, so it cannot be checked here)."""
    x, valid_new = self._inputs(input_ids, inputs_embeds, attention_mask)
    t, index = x.shape[1], cache['index']
    if t > cache['valid'].shape[1]:
      raise ValueError(f'{t} tokens do not fit a cache of {cache["valid"].shape[1]} slots')
    positions = positions_from_mask(valid_new, cache['pos'])
    valid = jax.lax.dynamic_update_slice(cache['valid'], valid_new, (0, index))
    mask = layers.causal_mask(t, valid.shape[1], offset=index) & layers.padding_mask(valid)
    x, (k, v) = self._run_layers(x, positions, mask, (cache['k'], cache['v']), index)
    cache = dict(k=k, v=v, valid=valid, index=index + t,
                 pos=cache['pos'] + valid_new.sum(1, dtype=jnp.int32))
    return self.final_norm(x), cache

  def prefill(self, cache: Cache, input_ids=None, *, inputs_embeds=None,
              attention_mask=None) -> tuple[jax.Array, Cache]:
    """Runs a prompt through the cache; returns f32 logits ``[B, T, V]`` and the cache."""
    h, cache = self.extend(cache, input_ids, inputs_embeds=inputs_embeds,
                           attention_mask=attention_mask)
    return self.logits_from_hidden(h), cache

  def decode_step(self, cache: Cache, token: jax.Array) -> tuple[jax.Array, Cache]:
    """One token per row (``[B]``); returns f32 logits ``[B, V]`` and the cache."""
    h, cache = self.extend(cache, token[:, None])
    return self.logits_from_hidden(h[:, 0]), cache

"""Llama/Qwen2-family decoder LLM: RMSNorm, RoPE, grouped-query attention, SwiGLU,
optional qkv bias (Qwen2), optional tied embeddings, and a pure-functional KV cache.

Parameter tree (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``)::

  token_embed/embedding           [V, D]           ('vocab', 'embed')
  layers/attn_norm/scale          [L, D]           ('layers', 'norm')
  layers/attn/{q,k,v,o}/kernel    [L, D, N*H] ...  ('layers', 'embed', 'heads'|'kv_heads')
  layers/attn/{q,k,v}/bias        (cfg.qkv_bias)   o/bias (cfg.o_bias)
  layers/mlp_norm/scale           [L, D]
  layers/mlp/{gate,up,down}/kernel
  final_norm/scale                [D]
  lm_head/kernel                  [D, V]           (absent when cfg.tie_embeddings)

With ``scan_layers=False`` ``layers`` is an ``nnx.List``: ``layers/<i>/...`` without the
leading L axis.

Positions: unless given, a token's RoPE position is the number of valid tokens before
it in its row (``cumsum(attention_mask) - 1``), so a left-padded prompt gets exactly
the logits of the unpadded one (HF ``generate`` does the same; HF ``forward`` without
``position_ids`` uses ``arange`` instead).

KV cache (a dict; passed in and returned, so it works under ``jax.jit``)::

  k, v   [L, B, S, K, H]  keys (after RoPE) and values per layer and slot
  valid  [B, S] bool      slot holds a real token (padding slots stay False)
  index  int32 []         next slot to write (shared by the batch)
  pos    int32 [B]        RoPE position of each row's next token
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unifer_jax import sharding
from unifer_jax.models import layers

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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """HF rotate-half RoPE on ``x [B, T, N, H]`` at ``positions [B, T]`` (computed in f32)."""
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
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.get('mlp_bias', False), dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate = layers.Dense(cfg.hidden, cfg.mlp_dim, axes=('embed', 'mlp'), **kw)
    self.up = layers.Dense(cfg.hidden, cfg.mlp_dim, axes=('embed', 'mlp'), **kw)
    self.down = layers.Dense(cfg.mlp_dim, cfg.hidden, axes=('mlp', 'embed'), **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    norm = dict(eps=cfg.rms_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.attn_norm = layers.RMSNorm(cfg.hidden, **norm)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.hidden, **norm)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, mask, inv_freq, kv_cache=None, index=None):
    y, kv_cache = self.attn(self.attn_norm(x), positions, mask, inv_freq, kv_cache, index)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), kv_cache


def positions_from_mask(mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
  """RoPE positions ``[B, T]``: ``start`` + number of valid tokens before each token."""
  mask = mask.astype(jnp.int32)
  start = jnp.asarray(start, jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) + (start[:, None] if start.ndim else start)


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
    self.layers = layers.make_stack(lambda r: DecoderLayer(cfg, rngs=r), cfg.depth, self.scan,
                                    rngs)
    self.final_norm = layers.RMSNorm(cfg.hidden, eps=cfg.rms_eps, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype, rngs=rngs)
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
    # Recomputed per call (a few flops at trace time): a numpy array as module attribute
    # would land in the graphdef.
    inv_freq = rope_inv_freq(self.cfg, self.head_dim)

    def layer_fn(layer, h, kv):  # kv: this layer's (k, v) cache slices, or None
      return layer(h, positions, mask, inv_freq, kv, index)

    return layers.run_stack(self.layers, x, layer_fn, scan=self.scan,
                            remat=self.cfg.get('remat', 'none'), xs=cache_kv,
                            unroll=self.cfg.get('unroll_layers', False))

  def hidden_states(self, input_ids=None, *, inputs_embeds=None, attention_mask=None,
                    positions=None) -> jax.Array:
    """Final-normed hidden states ``[B, T, D]`` (``dtype``); logits are
    ``logits_from_hidden`` of them (compute them only where a loss needs them)."""
    x, valid = self._inputs(input_ids, inputs_embeds, attention_mask)
    if positions is None:
      positions = positions_from_mask(valid)
    t = x.shape[1]
    mask = layers.causal_mask(t) & layers.padding_mask(valid)
    x, _ = self._run_layers(x, positions, mask)
    return self.final_norm(x)

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None,
               positions=None) -> jax.Array:
    return self.logits_from_hidden(self.hidden_states(
        input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
        positions=positions))

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


# ------------------------------------------------------------------ generation
def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """Next tokens ``[B]`` from logits ``[B, V]``: greedy when ``temperature == 0``."""
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, -1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, -1) < top_p, -1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, -1)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


def generate(model: LLM, input_ids=None, *, inputs_embeds=None, attention_mask=None,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, rng: jax.Array | None = None,
             eos_id: int | None = None, pad_id: int = 0, cache_dtype=None) -> jax.Array:
  """Generated tokens ``[B, max_new_tokens]`` after a (left- or right-padded) prompt.

  Prefill, then a ``jax.lax.while_loop`` of decode steps that stops early once every row
  has produced ``eos_id``; tokens after a row's eos are ``pad_id``. Jittable: call it
  inside ``jax.jit`` on ``nnx.merge(graphdef, state)``; ``max_new_tokens``,
  ``temperature``, ``top_k`` and ``top_p`` must be Python values, ``eos_id``/``pad_id``
  may be traced (a never-matching ``eos_id`` such as -1 disables stopping).
  """
  if temperature and rng is None:
    raise ValueError('sampling (temperature > 0) needs rng')
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  x, valid = model._inputs(input_ids, inputs_embeds, attention_mask)
  b, t = valid.shape
  cache = model.init_cache(b, t + max_new_tokens, cache_dtype)
  h, cache = model.extend(cache, inputs_embeds=x, attention_mask=valid)
  # The next token follows each row's last valid prompt token (right padding included).
  last = jnp.max(jnp.where(valid, jnp.arange(t), 0), axis=1)
  logits = model.logits_from_hidden(jnp.take_along_axis(h, last[:, None, None], 1)[:, 0])

  def pick(logits, step, done, out):
    tok = sample_logits(logits, jax.random.fold_in(rng, step), temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, step].set(tok)
    if eos_id is not None:
      done = done | (tok == eos_id)
    return tok, done, out

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  tok, done, out = pick(logits, 0, jnp.zeros((b,), bool), out)

  def cond(carry):
    step, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, tok, done, out, cache = carry
    logits, cache = nnx.merge(graphdef, state).decode_step(cache, tok)
    tok, done, out = pick(logits, step, done, out)
    return step + 1, tok, done, out, cache

  carry = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, done, out, cache))
  return carry[3]

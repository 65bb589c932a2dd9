"""Decoding with the LLM's KV cache: ``sample_logits`` (greedy / temperature, top-k,
top-p) and ``generate`` (prefill, then a ``lax.while_loop`` of decode steps).

Both are re-exported by ``models.llm`` (``llm.generate``), where callers find them::

  tokens = llm.generate(model, ids, attention_mask=mask, max_new_tokens=16)  # [B, 16]

``num_samples=G`` draws G completions per prompt (GRPO's groups): the prompt is
prefilled once and its cache repeated, so rows ``b * G .. b * G + G - 1`` of the result
answer prompt ``b``.

Works for every configuration of ``llm.LLM`` (Llama/Qwen2 with RoPE, OPT with learned
positions): the model derives each new token's position from the cache (``cache['pos']``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:  # llm imports this module to re-export it
  from unifer_jax.models.llm import LLM


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
             eos_id: int | None = None, pad_id: int = 0, cache_dtype=None,
             num_samples: int = 1) -> jax.Array:
  """Generated tokens ``[B * num_samples, max_new_tokens]`` after a (left- or
  right-padded) prompt.

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
  if num_samples > 1:   # one prefill per prompt, then G rows decode from its cache
    cache = _repeat_rows(cache, num_samples)
    logits = jnp.repeat(logits, num_samples, axis=0)
    b *= num_samples

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


def _repeat_rows(cache: dict, n: int) -> dict:
  """Each row of a KV cache (llm.Cache) repeated ``n`` times, in place (b -> b * n + i)."""
  out = dict(cache)
  for key in ('k', 'v'):          # [L, B, S, K, H]
    out[key] = jnp.repeat(cache[key], n, axis=1)
  for key in ('valid', 'pos'):    # [B, S], [B]
    out[key] = jnp.repeat(cache[key], n, axis=0)
  return out

"""Next-token NLL computed only where it can matter, with the vocabulary projection and
the cross-entropy fused into one pass.

Two things the plain ``token_nll(llm.logits_from_hidden(hidden), ...)`` wastes in the
instruct step (on the demo step they were ~15 % of its time):

* positions: an instruct answer is ~1/4 of the text, yet every position was projected
  onto the vocabulary (and softmaxed, and back-propagated). :func:`target_nll` gathers
  each row's target positions into the smallest of :func:`target_buckets` that holds the
  batch's longest row of targets -- a ``lax.switch`` on the data, so the result equals
  the full computation whatever the mask;
* residuals: autodiff of softmax-CE stores the ``[B, T, V]`` probabilities for the
  backward (and under the switch every branch's residuals are materialised, zeros for
  the branches not taken). :func:`projected_nll` instead computes the gradient with
  respect to the hidden states (and the projection, when it trains) in the forward pass
  -- ``softmax - onehot`` is right there -- and keeps only that ``[B, T, D]`` gradient.
  The matmuls are the same ones autodiff would run; nothing is recomputed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from unifer_jax import sharding
from unifer_jax.models.llm import LOGIT_AXES


def target_buckets(t: int) -> list[int]:
  """Static per-row target counts the projection is compiled for: T/8, T/4, T/2 (those
  >= 1) and T."""
  sizes, k = [], t // 8
  while 0 < k < t:
    sizes.append(k)
    k *= 2
  return sorted(set(sizes)) + [t]


def vocab_projection(llm):
  """(weight, transposed) of the LLM's vocabulary projection -- the tied embedding
  ``[V, D]`` (transposed) or ``lm_head`` ``[D, V]`` -- or None when it is not a plain
  matmul (adapters or a bias on the head: use ``logits_from_hidden``)."""
  if llm.lm_head is None:
    return llm.token_embed.embedding[...], True
  head = llm.lm_head
  if head.bias is not None or head.lora_a is not None:
    return None
  return head.kernel[...], False


def _stats(logits, targets, mask):
  """(loss, aux, d loss / d logits) of the masked mean NLL of f32 ``[B, T, V]`` logits."""
  logits = sharding.constrain(logits, LOGIT_AXES)
  targets = sharding.constrain(targets, LOGIT_AXES[:2])
  mask = sharding.constrain(mask, LOGIT_AXES[:2]).astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  shifted = logits - logits.max(-1, keepdims=True)
  logz = jnp.log(jnp.exp(shifted).sum(-1, keepdims=True))
  target = jnp.take_along_axis(shifted, targets[..., None], -1)[..., 0]
  nll = logz[..., 0] - target
  # Correct = the target has the top logit (shifted to 0). argmax's variadic reduce is
  # slow on XLA:CPU; this differs from it only on exact ties.
  aux = {'tokens': mask.sum(), 'token_acc': ((target >= 0) * mask).sum() / count}
  onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
  dlogits = (jnp.exp(shifted - logz) - onehot) * (mask / count)[..., None]
  return (nll * mask).sum() / count, aux, dlogits


def _project(h, w, transposed, dtype):
  w = w.astype(dtype)
  return jnp.dot(h.astype(dtype), w.T if transposed else w).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def projected_nll(hidden, weight, targets, mask, transposed: bool, dtype):
  """Masked mean NLL of ``logits = hidden @ weight(.T)`` (computed in ``dtype``, f32
  softmax) and its aux metrics; see the module docstring for the fused backward."""
  loss, aux, _ = _stats(_project(hidden, weight, transposed, dtype), targets, mask)
  return loss, aux


def _fwd(hidden, weight, targets, mask, transposed, dtype):
  h, w = hidden.value, weight.value
  loss, aux, dlogits = _stats(_project(h, w, transposed, dtype), targets.value, mask.value)
  g = dlogits.astype(dtype)
  w_c = w.astype(dtype)
  dh = jnp.dot(g, w_c if transposed else w_c.T).astype(h.dtype) if hidden.perturbed else None
  dw = None
  if weight.perturbed:  # a trainable projection: its gradient, over all tokens
    hd = h.astype(dtype).reshape(-1, h.shape[-1])
    gd = g.reshape(-1, g.shape[-1])
    dw = (jnp.dot(gd.T, hd) if transposed else jnp.dot(hd.T, gd)).astype(w.dtype)
  return (loss, aux), (dh, dw)


def _bwd(transposed, dtype, res, cotangent):
  del transposed, dtype
  dh, dw = res
  ct = cotangent[0]  # the aux metrics are not differentiated
  scale = lambda d: None if d is None else (d * ct.astype(d.dtype))
  return scale(dh), scale(dw), None, None


projected_nll.defvjp(_fwd, _bwd, symbolic_zeros=True)


def _gather(hidden, targets, mask, k: int):
  """Each row's first ``k`` target positions (rows with fewer are filled with
  non-target positions, which the gathered mask zeroes)."""
  order = jnp.argsort(mask <= 0, axis=1, stable=True)[:, :k]  # stable: targets first, in order
  return (jnp.take_along_axis(hidden, order[..., None], axis=1),
          jnp.take_along_axis(targets, order, axis=1), jnp.take_along_axis(mask, order, axis=1))


def target_nll(llm, hidden, targets, mask):
  """Masked mean next-token NLL ``(loss, {'tokens', 'token_acc'})`` of the LLM's logits
  at ``hidden [B, T, D]`` for ``targets``/``mask`` ``[B, T]`` -- the vocabulary
  projected only at target positions (module docstring)."""
  proj = vocab_projection(llm)
  if proj is None:
    from unifer_jax.train.losses import token_nll  # pylint: disable=g-import-not-at-top
    head = lambda h, y, m: token_nll(llm.logits_from_hidden(h), y, m)
  else:
    weight, transposed = proj
    head = lambda h, y, m: projected_nll(h, weight, y, m, transposed, llm.dtype)
  sizes = target_buckets(targets.shape[1])
  most = jnp.max(jnp.sum(mask > 0, axis=1))
  branch = jnp.searchsorted(jnp.asarray(sizes), most)  # the first size >= most
  branches = [lambda h, y, m, k=k: head(*_gather(h, y, m, k)) for k in sizes[:-1]]
  branches.append(head)
  return jax.lax.switch(branch, branches, hidden, targets, mask)

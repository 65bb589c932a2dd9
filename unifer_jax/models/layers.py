"""Building blocks shared by every tower: dense/embedding/norm layers that carry logical
axis names, attention through ``jax.nn.dot_product_attention``, and the layer-stack
helper that runs a transformer under ``jax.lax.scan`` (or unrolled, for debugging).

Conventions every model in ``unifer_jax.models`` follows:
* parameters are created in ``param_dtype`` (f32 by default) and computed in ``dtype``
  (bf16 or f32) -- the mixed-precision recipe: f32 master weights, bf16 matmuls;
* every ``nnx.Param`` carries logical axis names (``sharding.DEFAULT_RULES`` lists them);
* kernels are ``[in, out]`` (torch Linear weights are ``[out, in]``; the converters
  transpose);
* activations are ``[batch, length, features]``; images are NHWC. Where propagation
  could replicate them (embedding outputs, the layer-scan carry, logits) they are
  pinned by logical name with ``sharding.constrain`` (a no-op without a mesh).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unifer_jax import sharding
from unifer_jax.models import flash

Dtype = Any

# Logical names of a [batch, length, features] activation (the residual stream).
HIDDEN_AXES = ('activation_batch', 'activation_length', 'activation_embed')


def constrain_hidden(x: jax.Array) -> jax.Array:
  """Pins a ``[B, T, D]`` activation: batch over the batch axes, the rest per the rules."""
  return sharding.constrain(x, HIDDEN_AXES)

default_kernel_init = nnx.initializers.normal(0.02)
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def flatten_tokens(x: jax.Array) -> jax.Array:
  """``[..., D]`` -> ``[N, D]`` (the layout every Dense matmul runs in; see Dense)."""
  return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def flatten_for_matmul(x: jax.Array) -> bool:
  """Whether Dense runs its matmul on ``[B*T, D]`` (see Dense) rather than ``[B, T, D]``.
  Not on TPU: arrays there are tiled by (8, 128) over their last two dims, so merging
  B and T is a relayout (a copy of the activation) whenever T is not a multiple of 8 --
  a ViT-L's 257 tokens: 24 GiB of HBM traffic per chip and step at the pod batch."""
  return x.ndim > 2 and (x.shape[-2] % 8 == 0 or flash.target_platform() != 'tpu')


def dtype_of(name: str | Dtype) -> Dtype:
  return {'float32': jnp.float32, 'f32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'bf16': jnp.bfloat16, 'float16': jnp.float16}.get(name, name) if isinstance(name, str) else name


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
          dtype: Dtype = jnp.float32) -> nnx.Param:
  """An nnx.Param initialised by ``init`` and annotated with logical axis names."""
  # Sharding is applied by unifer_jax.sharding from the rules table, never eagerly here.
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                   eager_sharding=False)


class Dense(nnx.Module):
  """``y = x @ kernel + bias`` with kernel ``[in, out]`` named ``axes``."""

  def __init__(self, in_features: int, out_features: int, *, axes=('embed', 'mlp'),
               use_bias: bool = True, dtype='float32', param_dtype='float32',
               kernel_init: Callable = default_kernel_init, rngs: nnx.Rngs):
    self.dtype = dtype_of(dtype)
    pd = dtype_of(param_dtype)
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, pd)
    self.bias = param(rngs, zeros, (out_features,), axes[-1:], pd) if use_bias else None
    self.lora_a = nnx.data(None)  # adapters, set by models.lora.apply
    self.lora_b = nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    # The matmuls run on [tokens, features]: with the [B, T] dims kept, the weight
    # gradients (LoRA's) contract two dims, and XLA:CPU then lowers them to a classic
    # dot that wants its [B*T, out] operand physically transposed -- a strided copy
    # fused with the producer's elementwise backward (silu'), 30-70 ms per layer on the
    # demo step. A 2-D dot's backward is the plain TN/NT matmul it handles in place.
    lead = x.shape[:-1]
    x = x.astype(self.dtype)
    if flatten_for_matmul(x):
      x = flatten_tokens(x)
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      low = jnp.dot(x, self.lora_a[...].astype(self.dtype))
      y = y + jnp.dot(low, self.lora_b[...].astype(self.dtype)) * self.lora_scale
    return y.reshape(*lead, y.shape[-1])


class Embed(nnx.Module):
  """Token embedding ``[vocab, embed]``; ``attend`` is the tied output projection."""

  def __init__(self, num_embeddings: int, features: int, *, axes=('vocab', 'embed'),
               dtype='float32', param_dtype='float32', rngs: nnx.Rngs):
    self.dtype = dtype_of(dtype)
    self.embedding = param(rngs, default_kernel_init, (num_embeddings, features), axes,
                           dtype_of(param_dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
    # A gather from an fsdp-sharded table: without this, XLA may keep the result
    # replicated over the batch axes.
    return sharding.constrain(x, HIDDEN_AXES[:ids.ndim] + HIDDEN_AXES[-1:])

  def attend(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(flatten_tokens(x.astype(self.dtype)), self.embedding[...].astype(self.dtype).T)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class LayerNorm(nnx.Module):
  """LayerNorm computed in f32 (statistics in bf16 lose too much), output in ``dtype``."""

  def __init__(self, features: int, *, eps: float = 1e-5, use_bias: bool = True,
               dtype='float32', param_dtype='float32', rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype_of(dtype)
    pd = dtype_of(param_dtype)
    self.scale = param(rngs, ones, (features,), ('norm',), pd)
    self.bias = param(rngs, zeros, (features,), ('norm',), pd) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """Llama's RMSNorm (f32 statistics; the weight is applied after casting back, as HF does)."""

  def __init__(self, features: int, *, eps: float = 1e-6, dtype='float32',
               param_dtype='float32', rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype_of(dtype)
    self.scale = param(rngs, ones, (features,), ('norm',), dtype_of(param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return (y.astype(self.dtype) * self.scale[...].astype(self.dtype))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              is_causal: bool = False, bias: jax.Array | None = None,
              implementation: str = 'xla') -> jax.Array:
  """Multi-head attention on ``[B, T, N, H]`` queries and ``[B, S, K, H]`` keys/values.

  ``K`` may divide ``N`` (grouped-query / multi-query attention). ``mask`` is boolean,
  broadcastable to ``[B, N, T, S]``, True = attend. ``implementation='flash'`` (a
  tower's ``attention`` config key) runs the fused kernel of :mod:`models.flash` where
  the target platform and the mask allow it (TPU; no mask or a key-padding one). On
  GPU (and with ``bias`` or ``is_causal``) this is ``jax.nn.dot_product_attention``, so
  cuDNN's fused kernel can be picked; elsewhere :func:`grouped_attention`, the same
  math as its XLA path.
  """
  if implementation == 'flash' and flash.usable(q, k, mask, is_causal, bias):
    return flash.attention(q, k, v, mask)
  if bias is not None or is_causal or jax.default_backend() == 'gpu':
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal)
  return grouped_attention(q, k, v, mask)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      mask: jax.Array | None = None) -> jax.Array:
  """``jax.nn.dot_product_attention``'s XLA path (f32 logits and softmax, head n = kv head
  n // G, masked logits set to the same large negative) laid out for plain batched
  matmuls: each kv head's G query heads are stacked along the rows, ``[B, K, G*T, H] @
  [B, K, H, S]``, and the mask broadcasts inside the select. Its XLA path vmaps over G
  (strided operands) and materialises the mask at the full ``[B, N, T, S]`` size. At
  the demo LLM's shapes (B 32, T 144, 4:2 heads of 48) on XLA:CPU, forward + backward:
  97 -> 40 ms (best of 15, shared 2-core box)."""
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  rows = lambda x: x.transpose(0, 2, 1, 3)  # [B, L, K, H] -> [B, K, L, H]
  qg = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  logits = jnp.einsum('bkqh,bksh->bkqs', qg, rows(k), preferred_element_type=jnp.float32)
  logits = logits.reshape(b, kv, g, t, s) * jnp.float32(h ** -0.5)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mb, mn, mt, ms = mask.shape
    mask = mask[:, :, None] if mn == 1 else mask.reshape(mb, kv, g, mt, ms)
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, g * t, s)
  out = jnp.einsum('bkqs,bksh->bkqh', probs, rows(v)).reshape(b, kv, g, t, h)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def padding_mask(valid: jax.Array) -> jax.Array:
  """``[B, S]`` key validity -> ``[B, 1, 1, S]`` attention mask."""
  return valid.astype(bool)[:, None, None, :]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """``[B, T]`` segment ids of packed rows -> ``[B, 1, T, T]``: a token attends only to
  tokens of its own segment (several examples share a row; id 0 = padding, masked
  as keys by the padding mask)."""
  return (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])


def causal_mask(t: int, s: int | None = None, offset: int = 0) -> jax.Array:
  """``[1, 1, T, S]`` lower-triangular mask; query i sees keys <= i + offset."""
  s = t if s is None else s
  return (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + offset)[None, None]


def remat_policy(name: str | None):
  """Names of ``jax.checkpoint`` policies usable from a config (``config.model.remat``)."""
  if name in (None, '', 'none'):
    return None
  policies = {
      'full': None,  # recompute everything
      'dots': jax.checkpoint_policies.checkpoint_dots,
      'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
      'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
  }
  if name not in policies:
    raise ValueError(f'model.remat={name!r}; expected one of {["none", *policies]}')
  return policies[name]


def make_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, scan: bool,
               rngs: nnx.Rngs):
  """Creates ``num_layers`` layers: one module with a stacked leading ``layers`` axis on
  every parameter (scan), or an ``nnx.List`` of separate modules (unscanned)."""
  if not scan:
    return nnx.List([make_layer(rngs) for _ in range(num_layers)])

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers,
            transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def create(r):
    return make_layer(r)

  return create(rngs)


def run_stack(stack, x: jax.Array, layer_fn: Callable, *, scan: bool, remat: str | None = None,
              xs: Any = None, unroll: bool = False):
  """Runs ``x = layer_fn(layer, x, x_i)`` over the stack; returns ``(x, stacked outputs)``.

  ``unroll`` (with ``scan``): the stacked parameters stay as they are (same checkpoints),
  but the layers run as straight-line code on static slices of them instead of under
  ``lax.scan``. For a shallow model on CPU that is faster: a scan's backward reads its
  per-layer residuals from ``[L, ...]`` buffers that XLA zero-fills and writes with
  dynamic-update-slices every step, and no fusion crosses a layer boundary.

  ``layer_fn(layer, carry, per_layer_input) -> (carry, per_layer_output)``. Under scan
  the layer parameters are split off the stacked module and fed to ``jax.lax.scan``
  (one traced layer however deep the model: a 32-layer LLM compiles in seconds).
  The carry ``x`` is a ``[B, T, D]`` activation, pinned on the way in and after every
  layer: inside a scan body XLA cannot see the caller's sharding and would otherwise
  be free to replicate the batch (and store replicated remat residuals).
  """
  policy = remat_policy(remat)
  do_remat = remat not in (None, '', 'none')

  x = constrain_hidden(x)
  pinned = lambda fn: lambda layer, h, x_i: _pin_carry(fn(layer, h, x_i))
  if not scan:
    outs = []
    for i, layer in enumerate(stack):
      x_i = None if xs is None else jax.tree.map(lambda a: a[i], xs)
      fn = pinned(layer_fn)
      if do_remat:
        fn = nnx.remat(fn, policy=policy)
      x, out = fn(layer, x, x_i)
      outs.append(out)
    stacked = None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x, stacked

  graphdef, state = nnx.split(stack)
  if unroll:
    outs = []
    for i in range(num_layers_of(stack)):
      at = lambda a: a[i]
      fn = pinned(layer_fn)
      if do_remat:
        fn = nnx.remat(fn, policy=policy)
      x, out = fn(nnx.merge(graphdef, jax.tree.map(at, state)), x,
                  None if xs is None else jax.tree.map(at, xs))
      outs.append(out)
    stacked = None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x, stacked

  def body(carry, inp):
    layer_state, x_i = inp
    layer = nnx.merge(graphdef, layer_state)
    return pinned(layer_fn)(layer, carry, x_i)

  if do_remat:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  return jax.lax.scan(body, x, (state, xs))


def _pin_carry(out):
  carry, per_layer = out
  return constrain_hidden(carry), per_layer


def num_layers_of(stack) -> int:
  if isinstance(stack, nnx.List):
    return len(stack)
  return jax.tree.leaves(nnx.state(stack))[0].shape[0]

"""Fused attention behind a config switch (``attention='flash'`` in a tower's config).

Plain-XLA attention (:func:`layers.grouped_attention`) writes the f32 scores of every
head to HBM and reads them back around the softmax, and relayouts q/k/v around them.
A fused kernel keeps one block of scores in on-chip memory instead. Which kernel runs is
decided by the platform the step is compiled for -- the active mesh's devices
(``sharding.use_mesh``; a compile-check for a TPU topology traces on this CPU box with
TPU devices), else the default backend:

* TPU: the Pallas flash-attention kernel jax ships
  (``jax.experimental.pallas.ops.tpu.flash_attention``), one call per device under
  ``jax.shard_map`` over the batch (and tensor-parallel heads): GSPMD cannot partition
  an opaque kernel and would otherwise gather its operands whole onto every chip.
  Keys are padded to a multiple of 128 (the kernel's key block), the padding and
  masked keys excluded by segment ids; queries are one block when they fit, so a
  ViT-L's 257 tokens run as 257 x 384 scores per head.
* elsewhere (CPU tests and the demo; GPU, where ``jax.nn.dot_product_attention``
  already reaches cuDNN from :func:`layers.attention`): the XLA path, unchanged.

Today (2026-12-07, configs/align.py:pod, libtpu 0.0.42): the frozen ViT-L's forward at
128 images per chip moves 59 GiB of HBM per chip and step on XLA attention and 50 GiB on
the kernel; the whole align step is compute-bound with it (HBM 131 ms vs compute 149 ms
on v5p-128). A short sequence gains nothing: the Q-Former's (32 queries, 80 tokens) lost
more to key padding and the kernel's f32 softmax statistics than its scores cost.

Only what the kernel expresses takes it: no mask, or a key-padding mask ``[B, 1, 1, S]``
(segment ids), equal query and key/value head counts; anything else (causal,
BLIP-2's ITG mask, grouped-query heads) falls back to XLA. Numerics equal the XLA path
to ~1e-6 in f32, forward and gradient (tests/test_flash.py runs the kernel in Pallas'
TPU interpret mode on CPU). FLOPs of the kernels are counted by
``train.step_cost`` from their bodies times their grid (padding and the backward's
recompute included); their HBM bytes by ``train.hlo_memory`` from the custom call's
operands and results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from unifer_jax import sharding

IMPLEMENTATIONS = ('xla', 'flash')
KEY_BLOCK = 128     # the kernel's key block (and lane width): keys are padded to it
MAX_WHOLE = 1024    # sequences up to this length run as one block
# [B, N, T, H]'s logical axes: each device runs the kernel on its batch and head shard,
# over whole sequences (attention needs every key).
_AXES = ('activation_batch', 'activation_heads', None, None)


def check(name: str, where: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'{where}.attention={name!r}; expected one of {IMPLEMENTATIONS}')
  return name


def target_platform() -> str:
  """The platform the step is being traced for: the active mesh's devices (a compile-
  check for a TPU target sets TPU devices on this CPU box), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  return device.platform if device is not None else jax.default_backend()


def key_padding(mask, b: int, s: int):
  """``[B, S]`` key validity if ``mask`` (broadcastable to ``[B, N, T, S]``) only says
  which keys are valid (``[B or 1, 1, 1, S]``); None when there is no mask; False
  when the mask is anything else (the kernel cannot express it)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != s:
    return False
  return jnp.broadcast_to(mask[:, 0, 0, :].astype(bool), (b, s))


def head_dim_fits(head_dim: int) -> bool:
  """The kernel takes heads of at most 128 lanes, or whole multiples of 128."""
  return head_dim <= 128 or head_dim % 128 == 0


def usable(q, k, mask, is_causal: bool, bias) -> bool:
  """Whether the fused kernel can compute this attention on the target platform."""
  if target_platform() != 'tpu' or is_causal or bias is not None:
    return False
  if q.shape[2] != k.shape[2] or q.shape[-1] != k.shape[-1]:
    return False  # grouped-query heads: not in this kernel
  if not head_dim_fits(q.shape[-1]):
    return False
  return key_padding(mask, q.shape[0], k.shape[1]) is not False


def _block(length: int) -> int:
  """A block that divides ``length`` (already padded as needed), at most MAX_WHOLE."""
  if length <= MAX_WHOLE:
    return length
  return next(b for b in (1024, 512, 256, 128) if length % b == 0)


def _padded(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


def _kernel_call(q, k, v, valid):
  """The Pallas kernel on one device's ``[B, N, T, H]`` q and ``[B, N, S, H]`` k, v
  (``valid``: ``[B, S]`` key validity, or None)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # TPU-only import
  b, _, t, h = q.shape
  s = k.shape[2]
  tp = t if t <= MAX_WHOLE else _padded(t, KEY_BLOCK)
  sp = _padded(s, KEY_BLOCK)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[2]), (0, 0)))
  q, k, v = pad(q, tp), pad(k, sp), pad(v, sp)
  segments = None
  if valid is not None or sp != s or tp != t:
    kv = jnp.ones((b, s), jnp.int32) if valid is None else valid.astype(jnp.int32)
    kv = jnp.pad(kv, ((0, 0), (0, sp - s)))           # padded keys: segment 0, never seen
    q_ids = jnp.pad(jnp.ones((b, t), jnp.int32), ((0, 0), (0, tp - t)), constant_values=2)
    segments = fa.SegmentIds(q=q_ids, kv=kv)
  bq, bk = _block(tp), _block(sp)
  blocks = fa.BlockSizes(
      block_q=bq, block_k_major=bk, block_k=KEY_BLOCK, block_b=1,
      block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=KEY_BLOCK, block_q_dkv=bq,
      block_k_major_dq=bk, block_k_dq=KEY_BLOCK, block_q_dq=bq)
  out = fa.flash_attention(q, k, v, segment_ids=segments, sm_scale=h ** -0.5,
                           block_sizes=blocks)
  return out[:, :, :t]


def attention(q, k, v, mask=None):
  """Fused attention on ``[B, T, N, H]`` q and ``[B, S, N, H]`` k, v (call only where
  :func:`usable`); returns ``[B, T, N, H]`` in q's dtype. Each device runs the kernel
  on its batch (and head) shard."""
  heads_first = lambda x: x.transpose(0, 2, 1, 3)  # the kernel's [B, N, T, H]
  out = attention_heads_first(heads_first(q), heads_first(k), heads_first(v),
                              key_padding(mask, q.shape[0], k.shape[1]))
  return heads_first(out)


def attention_heads_first(q, k, v, valid=None):
  """:func:`attention` on the kernel's own layout, ``[B, N, T, H]`` q and ``[B, N, S, H]``
  k, v (``valid``: ``[B, S]`` key validity or None); returns ``[B, N, T, H]``. A tower
  that projects straight into this layout (vit.Attention) saves the relayouts."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _kernel_call(q, k, v, valid).astype(q.dtype)
  spec = sharding.activation_spec(_AXES, q.shape, mesh)
  kv_spec = sharding.activation_spec(_AXES, k.shape, mesh)
  batch_spec = P(spec[0], None)
  if kv_spec != spec:  # a batch or head count the axes divide for q but not for k/v
    spec = kv_spec = P(None, None, None, None)
    batch_spec = P(None, None)
  if valid is None:
    fn = lambda q, k, v: _kernel_call(q, k, v, None)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(spec, kv_spec, kv_spec), out_specs=spec,
                           check_vma=False)
    return mapped(q, k, v).astype(q.dtype)
  mapped = jax.shard_map(_kernel_call, mesh=mesh, in_specs=(spec, kv_spec, kv_spec, batch_spec),
                         out_specs=spec, check_vma=False)
  return mapped(q, k, v, valid).astype(q.dtype)



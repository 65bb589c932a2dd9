"""Fused attention (models/flash.py): the Pallas TPU flash kernel, run on CPU in Pallas'
TPU interpret mode, computes what the XLA path does, forward and gradient; it is used
only where it applies; and the FLOP counter counts its kernels (never as zero).

  PYTHONPATH=$PWD python -m pytest -q tests/test_flash.py   # ~40 s here (interpret mode)

A whole step's counts, the pod align step with and without the kernel, are compared in
tests/test_pod_configs.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from unifer_jax import sharding
from unifer_jax.models import flash, layers
from unifer_jax.train import step_cost


@pytest.fixture
def on_tpu(monkeypatch):
  """Trace as for a TPU target; the kernels run in Pallas' TPU interpret mode."""
  monkeypatch.setattr(flash, 'target_platform', lambda: 'tpu')
  with pltpu.force_tpu_interpret_mode():
    yield


def _qkv(b, t, s, n=2, h=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32)
  k = jax.random.normal(ks[1], (b, s, n, h), jnp.float32)
  v = jax.random.normal(ks[2], (b, s, n, h), jnp.float32)
  return q, k, v, jax.random.normal(ks[3], (b, t, n, h), jnp.float32)


def _value_and_grads(fn, q, k, v, probe, shardings=None):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * probe)
  both = lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
  return jax.jit(both, in_shardings=shardings)(q, k, v)


def _has_kernel(fn, *args) -> bool:
  return 'pallas_call' in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize('t, s, padded_keys', [
    (20, 20, False),   # self-attention (a ViT's): keys padded 20 -> 128 inside
    # cross-attention (the Q-Former's queries) with a key-padding mask, 2 key blocks
    (36, 200, True),
])
def test_kernel_equals_xla_forward_and_gradient(on_tpu, t, s, padded_keys):
  q, k, v, probe = _qkv(2, t, s)
  mask = None
  if padded_keys:  # the second item's last keys are padding
    mask = layers.padding_mask(jnp.arange(s)[None, :] < jnp.array([[s], [s - 7]]))
  fused = lambda q, k, v: layers.attention(q, k, v, mask=mask, implementation='flash')
  plain = lambda q, k, v: layers.attention(q, k, v, mask=mask)
  assert _has_kernel(fused, q, k, v) and not _has_kernel(plain, q, k, v)
  out, grads = _value_and_grads(fused, q, k, v, probe)
  want, want_grads = _value_and_grads(plain, q, k, v, probe)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  for name, got, ref in zip('qkv', grads, want_grads):
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5, err_msg=f'd{name}')


def test_kernel_under_a_mesh_runs_per_device_shard(on_tpu):
  """Under a mesh each device runs the kernel on its batch shard (shard_map): GSPMD
  cannot split an opaque kernel and would gather q/k/v onto every chip."""
  mesh = jax.make_mesh((4, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q, k, v, probe = _qkv(8, 20, 20)

  def fused(q, k, v):
    with sharding.use_mesh(mesh):
      return layers.attention(q, k, v, implementation='flash')

  jaxpr = str(jax.make_jaxpr(fused)(q, k, v))
  assert 'shard_map' in jaxpr and 'f32[2,2,20,16]' in jaxpr  # one device's 8 / 4 items
  # Inputs placed as the train step places activations (batch over the batch axes).
  batch = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp'))),) * 3
  out, grads = _value_and_grads(fused, q, k, v, probe, batch)
  want, want_grads = _value_and_grads(layers.attention, q, k, v, probe)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_falls_back_to_xla_where_the_kernel_does_not_apply(monkeypatch):
  q, k, v, _ = _qkv(2, 12, 12)
  flash_ = lambda **kw: lambda q, k, v: layers.attention(q, k, v, implementation='flash', **kw)
  # On this CPU (no TPU target): the XLA path, the same numbers.
  assert not _has_kernel(flash_(), q, k, v)
  np.testing.assert_array_equal(flash_()(q, k, v), layers.attention(q, k, v))
  monkeypatch.setattr(flash, 'target_platform', lambda: 'tpu')
  assert _has_kernel(flash_(), q, k, v)
  # What the kernel cannot express: causal / general masks, grouped-query heads.
  assert not _has_kernel(flash_(is_causal=True), q, k, v)
  assert not _has_kernel(flash_(mask=layers.causal_mask(12)), q, k, v)
  assert not _has_kernel(flash_(), q, k[:, :, :1], v[:, :, :1])


def test_kernel_flops_are_counted_from_its_body_times_its_grid(monkeypatch):
  """Forward: QK^T and PV on the padded keys, 4*B*N*T*S_pad*H. With the backward: the
  dK/dV kernel recomputes QK^T and does dV, dP, dK; the dQ kernel QK^T, dP, dQ -- 9
  matmuls where XLA's path does 6. Under a mesh: every device's shard counted."""
  monkeypatch.setattr(flash, 'target_platform', lambda: 'tpu')
  b, t, n, h = 8, 257, 2, 64
  q = jnp.ones((b, t, n, h))
  fused = lambda q, k, v: layers.attention(q, k, v, implementation='flash')
  forward = 4.0 * b * n * t * 384 * h  # 257 keys padded to 3 blocks of 128
  flops = lambda fn: step_cost.matmul_cost(jax.make_jaxpr(fn)(q, q, q))[0]
  assert flops(fused) == forward
  grads = lambda fn: jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
  assert flops(grads(fused)) == 4.5 * forward
  assert flops(grads(layers.attention)) == 3 * forward * 257 / 384  # XLA: unpadded, 6 dots
  mesh = jax.make_mesh((4, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def sharded(q, k, v):
    with sharding.use_mesh(mesh):
      return fused(q, k, v)

  assert 'shard_map' in str(jax.make_jaxpr(sharded)(q, q, q))
  assert flops(sharded) == forward


def test_vit_on_the_kernel_equals_the_xla_vit(monkeypatch):
  """A ViT with ``attention='flash'`` on a TPU target (heads-first projections into the
  kernel, un-flattened Dense matmuls for its 17 tokens) against the same weights on
  this CPU's plain path: last hidden state and parameter gradients."""
  from flax import nnx
  from unifer_jax.models import vit
  cfg = vit.default_config(image_size=28, patch_size=7, width=64, depth=2, heads=2,
                           mlp_dim=128, variant='blip2', attention='flash')
  images = jax.random.normal(jax.random.key(1), (2, 28, 28, 3), jnp.float32)
  probe = jax.random.normal(jax.random.key(2), (2, 17, 64), jnp.float32)
  graphdef, params = nnx.split(vit.ViT(cfg, rngs=nnx.Rngs(0)))

  def value_and_grad(params):
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(images) * probe)
    return (jax.jit(lambda p: nnx.merge(graphdef, p)(images))(params),
            jax.jit(jax.grad(loss))(params))

  plain = str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(images))(params))
  assert 'pallas_call' not in plain and 'f32[34,64]' in plain  # CPU: flattened tokens
  want, want_grads = value_and_grad(params)
  monkeypatch.setattr(flash, 'target_platform', lambda: 'tpu')
  fused = str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(images))(params))
  assert 'pallas_call' in fused and 'f32[34,64]' not in fused
  with pltpu.force_tpu_interpret_mode():
    out, grads = value_and_grad(params)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  for (path, got), (_, ref) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                   jax.tree_util.tree_leaves_with_path(want_grads)):
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4, err_msg=str(path))

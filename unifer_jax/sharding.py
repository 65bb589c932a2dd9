"""Mesh construction and logical-axis sharding (MaxText's mechanism, one rules table).

Every parameter is created with *logical* axis names (``embed``, ``mlp``, ``heads``,
``vocab``, ...). One table, ``config.sharding.rules``, maps each logical name to a mesh
axis (or a tuple of mesh axes, or None = replicated). Changing parallelism is then a
config edit: the model code never names a mesh axis.

The mesh always has the three axes ``('data', 'fsdp', 'tensor')``; batches are split over
``('data', 'fsdp')`` (FSDP shards parameters *and* data), weights over ``fsdp`` and
``tensor`` according to the rules.

Several TPU slices (multislice) talk over the data-centre network (DCN), ~100x slower
than the chips' own links (ICI). ``config.mesh`` gives the axis sizes inside one slice;
``config.mesh.dcn`` how many slices each axis spans (default ``data=-1``: data parallel
across however many slices there are, so only gradients cross the DCN). A mesh axis is
then ``ici size x dcn size`` long, built with JAX's hybrid mesh (slices are blocks of
it), and the rules table is unchanged. Where devices have no slices (GPUs, CPU
processes) an explicit ``dcn`` size > 1 spans processes (hosts) instead.

Activations get the same treatment (MaxText's ``nn.with_logical_constraint``): the models
call :func:`constrain` with ``activation_*`` logical names at the few places where
XLA's sharding propagation would otherwise be free to replicate them (embedding
outputs, the layer-scan carry, logits). It is a no-op unless a mesh is active, so
single-device code never sees it; the train step activates its mesh and the config's
rules table with :func:`use_mesh` while it is traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# The default rules table. Logical names not listed are replicated. The first matching
# mesh axis not already used by another dimension of the same array is taken, so
# e.g. a [embed, embed] kernel is sharded on one dimension only.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('patch', None),
    ('stem', None),  # conv-stem channels (vit.ConvStem): small, replicated
    ('layers', None),
    ('norm', None),
    ('queries', None),
    ('classes', None),
    ('kv', None),
    ('frames', None),  # a clip's time axis (models/video.py): T <= 16, replicated
    # Activations. Batch over the batch axes, the residual stream replicated over
    # tensor (Megatron: each tensor shard sees whole tokens), and the dimensions a
    # tensor-parallel matmul splits (heads, mlp, vocab) over tensor.
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
)

# Rules that constrain() uses; set with the mesh by use_mesh (DEFAULT_RULES otherwise).
_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar('unifer_sharding_rules',
                                                                default=None)


def _sizes(axis_sizes, where: str) -> list[int]:
  if hasattr(axis_sizes, "keys"):  # a dict or an ml_collections ConfigDict
    unknown = set(axis_sizes) - set(MESH_AXES) - {'dcn'}
    if unknown:
      raise ValueError(f'{where} has unknown axes {sorted(unknown)}; expected {MESH_AXES}'
                       + (' (and dcn)' if where == 'config.mesh' else ''))
    return [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  return [int(s) for s in axis_sizes]


def mesh_shape(axis_sizes: Mapping[str, int] | Sequence[int], num_devices: int,
               where: str = 'config.mesh', units: str = 'devices') -> tuple[int, ...]:
  """Resolves axis sizes (one may be -1 = fill) against the device (or slice) count."""
  sizes = _sizes(axis_sizes, where)
  if sizes.count(-1) > 1:
    raise ValueError(f'{where}: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'{where} {dict(zip(MESH_AXES, sizes))}: {num_devices} {units} '
                       f'are not divisible by the fixed axes (product {known})')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'{where} {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
                     f'{units}, but {num_devices} are available')
  return tuple(sizes)


DEFAULT_DCN = {'data': -1, 'fsdp': 1, 'tensor': 1}


def slice_count(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices ``devices`` come from (1 where devices have no slices)."""
  return len({getattr(d, 'slice_index', 0) for d in devices})


def hybrid_shape(axis_sizes, devices: Sequence[jax.Device]):
  """(ici shape, dcn shape, granule) of ``config.mesh`` over ``devices``.

  ``granule`` is what the DCN shape counts: 'slice' (TPU slices, or a single one) or
  'process' (an explicit ``dcn`` size > 1 where devices have no slices: GPU hosts,
  ``launch/local.py`` processes).
  """
  dcn = axis_sizes.get('dcn') if hasattr(axis_sizes, 'keys') else None
  dcn = DEFAULT_DCN if dcn is None else dcn
  fixed = _sizes(dcn, 'config.mesh.dcn')
  slices = slice_count(devices)
  granule, count = 'slice', slices
  if slices == 1 and -1 not in fixed and math.prod(fixed) > 1:
    granule, count = 'process', len({d.process_index for d in devices})
  units = {'slice': 'slices', 'process': 'processes'}[granule]
  dcn_shape = mesh_shape(dcn, count, where='config.mesh.dcn', units=units)
  if len(devices) % count:
    raise ValueError(f'{len(devices)} devices do not split evenly over {count} {units}')
  where = 'config.mesh' + (f' (one of {count} {units})' if count > 1 else '')
  return mesh_shape(axis_sizes, len(devices) // count, where=where), dcn_shape, granule


def make_mesh(axis_sizes, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with classic GSPMD (Auto) axes.

  Devices (default: all; or e.g. an AOT topology's) are laid out along the physical
  TPU torus, so each mesh axis runs over neighbouring chips; over several slices (or
  DCN-connected hosts) each axis is its in-slice size times its ``dcn`` size, slices
  being contiguous blocks (:func:`hybrid_shape`).
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn, granule = hybrid_shape(axis_sizes, devices)
  if math.prod(dcn) > 1:
    build = lambda **kw: mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=granule == 'process', **kw)
  else:
    build = lambda **kw: mesh_utils.create_device_mesh(ici, devices, **kw)
  try:
    grid = build()
  except (ValueError, NotImplementedError):
    # A shape the torus cannot tile whole (e.g. fsdp=32 on a 4x4x4 v5p): split an axis.
    grid = build(allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _rules_dict(rules: Iterable) -> dict[str, tuple[str, ...]]:
  out = {}
  for name, axes in rules:
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    out[str(name)] = tuple(axes)
  return out


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: Iterable,
                    mesh: Mesh | None = None) -> P:
  """Maps one array's logical axis names to a PartitionSpec with the rules table.

  A mesh axis is used at most once per array; axes of size 1 are dropped (they would
  shard nothing and only clutter the spec).
  """
  if logical_axes is None:
    return P()
  table = _rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    axes = tuple(a for a in table.get(name, ()) if a not in used
                 and (mesh is None or mesh.shape.get(a, 1) > 1)) if name is not None else ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _logical_axes_of(variable: nnx.Variable):
  meta = variable.get_metadata()
  for key in ('out_sharding', 'sharding_names', 'sharding'):  # the name moved across flax versions
    if meta.get(key) is not None:
      return tuple(meta[key])
  return None


def logical_axes(state: nnx.State) -> nnx.State:
  """The logical axis names of every variable in an nnx state (None where unnamed)."""
  return jax.tree.map(_logical_axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _fit_to_shape(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide the dimension they would shard."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape.get(a, 1) for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


@contextlib.contextmanager
def use_mesh(mesh, rules: Iterable | None = None):
  """Makes ``mesh`` (a Mesh or AbstractMesh) and ``rules`` the ones :func:`constrain`
  applies. Unlike ``jax.set_mesh`` it may be entered inside ``jax.jit`` tracing (it sets
  only the abstract mesh), which is how the train step uses it."""
  token = _ACTIVE_RULES.set(None if rules is None else tuple(tuple(r) for r in rules))
  try:
    with jax.sharding.use_abstract_mesh(getattr(mesh, 'abstract_mesh', mesh)):
      yield
  finally:
    _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` of an activation by its logical axis names.

  Maps ``logical_axes`` through the active rules table (:func:`use_mesh`, else
  ``DEFAULT_RULES``) onto the active mesh (``use_mesh`` or ``jax.set_mesh``); without
  a mesh, or on one device, ``x`` is returned untouched. A mesh axis that does not
  divide its dimension (3 heads over tensor=2, a batch of 2 over 8 devices) is left
  out, as for weights.
  """
  if len(logical_axes) != x.ndim:
    raise ValueError(f'constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} '
                     f'for an array of shape {tuple(x.shape)}')
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, activation_spec(logical_axes, x.shape, mesh))


def activation_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh) -> P:
  """The PartitionSpec :func:`constrain` gives an activation of ``shape`` on ``mesh``
  (the active rules table; axes that do not divide their dimension left out)."""
  rules = _ACTIVE_RULES.get()
  spec = logical_to_spec(logical_axes, DEFAULT_RULES if rules is None else rules, mesh)
  return _fit_to_shape(spec, tuple(shape), mesh)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Iterable) -> Any:
  """NamedShardings for every leaf of an (abstract or concrete) nnx state.

  Variables without logical names are replicated. A rule that does not divide a
  dimension (e.g. 3 heads over tensor=2) falls back to replication for that dimension,
  so tiny test models run on any mesh; big presets are checked by compile-check.
  """
  rules = tuple(rules)

  def one(variable):
    if isinstance(variable, nnx.Variable):
      value = variable.get_value() if hasattr(variable, 'get_value') else variable[...]
      spec = logical_to_spec(_logical_axes_of(variable), rules, mesh)
      spec = _fit_to_shape(spec, tuple(value.shape), mesh)
      return variable.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading dimension split over the batch axes, the rest replicated."""
  del ndim
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host-global batch on the mesh (single-process helper; multi-host input
  uses ``jax.make_array_from_process_local_data`` in the input pipeline)."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), batch)


def shard_model_state(state: nnx.State, mesh: Mesh, rules: Iterable) -> nnx.State:
  """Moves a concrete state onto the mesh with the shardings the rules give."""
  shardings = state_shardings(state, mesh, rules)
  return jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)


def param_count(state: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state) if hasattr(x, 'shape'))


def cast_floating(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

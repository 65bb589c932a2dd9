"""Evaluation on every process: eval items scored in global batches split over the
mesh's batch axes, so each process's devices score their own share of the items with
the sharded model; the per-item results are gathered so that every process holds all of
them (the metrics are then the same everywhere and process 0 writes them).

How a batch is laid out: items ``[start, start + G)`` form one global array of G rows,
sharded like a training batch (``sharding.BATCH_AXES``), a short last batch dealt out
evenly over the processes' rows and padded by repetition; each process fills only the
rows its own devices hold (``jax.make_array_from_callback``), the jitted function runs
as one SPMD program over the whole mesh, and ``multihost_utils.process_allgather``
brings the outputs back whole.
Every process must therefore call the same functions on the same items in the same
order -- which the evaluators do: each reads the whole eval set (small next to the
model) and is deterministic.

One process with one or many devices takes the same path. Each call adds the items this
process scored to the active :func:`counting` tally, which ``registry.run`` reports as
``eval NAME: process i scored n of N items``.

  from unifer_jax.evaluators import item_shards
  feats = item_shards.map_items(lambda x: image_fn(params, x), [images], 64,
                                item_shards.mesh_of(params))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unifer_jax import sharding


def mesh_of(params) -> Mesh:
  """The mesh the parameters live on (a one-device mesh for unsharded ones)."""
  for leaf in jax.tree.leaves(params):
    s = getattr(leaf, 'sharding', None)
    if isinstance(s, NamedSharding):
      return s.mesh
    if s is not None and len(s.device_set) == 1:
      return _one_device_mesh(next(iter(s.device_set)))
  return _one_device_mesh(jax.local_devices()[0])


def _one_device_mesh(device) -> Mesh:
  return Mesh(np.array([device]).reshape((1,) * len(sharding.MESH_AXES)), sharding.MESH_AXES)


def global_batch(batch_size: int, mesh: Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the batch axes' size (rows divide evenly
  over the devices that hold different rows)."""
  ways = math.prod(mesh.shape.get(a, 1) for a in sharding.BATCH_AXES)
  return max(1, -(-int(batch_size) // ways)) * ways


def replicated(tree, mesh: Mesh):
  """Host values (the same on every process) as arrays replicated over the mesh: the
  per-call constants of a sharded function (label prompts, ...)."""
  s = NamedSharding(mesh, P())

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(one, tree)


# ---- who scored what --------------------------------------------------------------------

@dataclasses.dataclass
class Tally:
  scored: int = 0      # items whose rows this process's devices held
  total: int = 0       # items of every call


_TALLIES: list[Tally] = []


@contextlib.contextmanager
def counting() -> Iterator[Tally]:
  """Counts the items scored by :func:`batches` calls inside the block."""
  tally = Tally()
  _TALLIES.append(tally)
  try:
    yield tally
  finally:
    _TALLIES.remove(tally)


# ---- the batches ----------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
  """Items [start, start + n) laid out over the rows of one global batch."""
  start: int
  arrays: list          # global arrays, G rows each, split over the batch axes
  rows: np.ndarray      # [n]: the row holding item start + j

  def results(self, out) -> Any:
    """``out`` (a pytree of arrays, rows first) gathered to every process, in item
    order, without the padding rows."""
    return jax.tree.map(lambda y: y[self.rows], gather(out))


def batches(arrays: Sequence[np.ndarray], batch_size: int, mesh: Mesh,
            count: bool = True) -> Iterator[Batch]:
  """Every batch of ``arrays`` (same length, host copies identical on every process).
  ``count``: the rows are eval items (images), not helper inputs such as the label
  prompts' texts."""
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f'item_shards.batches: arrays of lengths {[len(a) for a in arrays]}')
  g = global_batch(batch_size, mesh)
  row_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
  slots, owned = _layout(row_sharding, g)
  for start in range(0, n, g):
    m = min(g, n - start)
    rows = slots[:m]
    idx = np.full(g, start + m - 1)          # padding rows repeat the batch's last item
    idx[rows] = np.arange(start, start + m)
    chunk = [_global(np.asarray(a)[idx], row_sharding) for a in arrays]
    if count:
      for tally in _TALLIES:
        tally.scored += int(owned[rows].sum())
        tally.total += m
    yield Batch(start, chunk, rows)


def _layout(row_sharding: NamedSharding, g: int) -> tuple[np.ndarray, np.ndarray]:
  """(the row of each of G items, whether this process's devices hold each row).

  The rows form blocks, one per distinct row slice of the sharding; item j goes to the
  block whose turn it is when the blocks are dealt out process by process (a block of
  process 0, one of process 1, ..., then the next of process 0): a short last batch is
  then split evenly over the processes, not given to the first one.
  """
  blocks: dict[tuple[int, int], set[int]] = {}
  for device, index in row_sharding.devices_indices_map((g,)).items():
    start, stop, _ = index[0].indices(g)
    blocks.setdefault((start, stop), set()).add(device.process_index)
  owner = {b: min(p) for b, p in blocks.items()}
  rank = {b: sorted(x for x in blocks if owner[x] == owner[b]).index(b) for b in blocks}
  dealt = sorted(blocks, key=lambda b: (rank[b], owner[b]))
  per = g // len(blocks)
  slots = np.array([dealt[j % len(dealt)][0] + j // len(dealt) for j in range(g)], np.int64)
  me = jax.process_index()
  owned = np.zeros(g, bool)
  for (start, stop), procs in blocks.items():
    owned[start:stop] = me in procs
  assert len(set(slots.tolist())) == g and all(stop - start == per for start, stop in blocks)
  return slots, owned


def _global(x: np.ndarray, row_sharding: NamedSharding) -> jax.Array:
  spec = NamedSharding(row_sharding.mesh, P(sharding.BATCH_AXES, *([None] * (x.ndim - 1))))
  return jax.make_array_from_callback(x.shape, spec, lambda idx: x[idx])


def gather(out) -> Any:
  """Outputs of a sharded function (a pytree of arrays) as whole numpy arrays on every
  process."""
  return multihost_utils.process_allgather(out, tiled=True)


def map_items(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int, mesh: Mesh,
              count: bool = True) -> Any:
  """``fn(*batch)`` over every item of ``arrays`` -> its outputs for all N items (a
  pytree like fn's, each leaf [N, ...]) on every process."""
  parts = [b.results(fn(*b.arrays)) for b in batches(arrays, batch_size, mesh, count)]
  if not parts:
    raise ValueError('item_shards.map_items: no items')
  return jax.tree.map(lambda *ys: np.concatenate(ys), *parts)

"""Checkpoints: orbax CheckpointManager with train state + data iterator state + config.

* async saves, every N steps and/or every M minutes, keep-N plus keep-every-K;
* a state whose parameters are not all finite is never written (we raise instead);
* restore takes the newest readable checkpoint: an unreadable newest one is reported
  and the previous one used;
* restoring into a different mesh works: the abstract target carries the new shardings.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from unifer_jax import workdirs

log = logging.getLogger(__name__)


class NonFiniteStateError(RuntimeError):
  pass


@jax.jit
def _all_finite(tree) -> jax.Array:
  # x * 0 is 0 for every finite x and NaN for inf / NaN: one sum per leaf, added up.
  # (Compiles in 2.1 s for the benchmark's 99 leaves where isfinite().all() per leaf
  # took 4.7 s -- the whole of a first save's blocking time, once orbax stopped
  # compiling replica slices.)
  sums = [jnp.sum(x * 0, dtype=jnp.float32) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.isfinite(sum(sums)) if sums else jnp.array(True)


# Replica-parallel saving (a replicated array written in slices, one per replica) pays
# only where the replicas live in different processes: one process writes every slice
# anyway, and each distinct slice shape costs a compile on the first save (46 s of a
# 1 GB data-parallel state's first save here, benchmarks/checkpoint_save.py). Slices
# under MIN_SLICE_BYTES (biases, norms, small kernels) are written whole by replica 0.
MIN_SLICE_BYTES = 4 << 20


def _use_replica_parallel(on: bool):
  """orbax reads the jax.Array handler from a process-wide registry: re-register it
  only when the setting changes (each override logs a warning)."""
  on = on and jax.process_count() > 1
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, '_use_replica_parallel', None) != on or (
      getattr(current, '_min_slice_bytes_for_replica_parallel', None) != MIN_SLICE_BYTES):
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=on, min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES),
        override=True)


class Checkpointer:

  def __init__(self, directory: str | Path, cfg):
    self.directory = workdirs.path(directory)
    self.every_steps = int(cfg.get('every_steps', 0) or 0)
    self.every_minutes = float(cfg.get('every_minutes', 0) or 0)
    self._last_time = time.monotonic()
    _use_replica_parallel(bool(cfg.get('replica_parallel', True)))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(cfg.get('keep', 2)) or None,
        keep_period=int(cfg.get('keep_every', 0)) or None,
        enable_async_checkpointing=bool(cfg.get('async_save', True)),
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'config'))

  # -- saving ------------------------------------------------------------------------

  def due(self, step: int) -> bool:
    by_steps = self.every_steps and step % self.every_steps == 0
    by_time = self.every_minutes and time.monotonic() - self._last_time >= 60 * self.every_minutes
    return bool(by_steps or by_time)

  def save(self, step: int, state: Any, data_state: dict, config_json: dict,
           force: bool = False) -> bool:
    if step in self.manager.all_steps():
      return False
    if not bool(_all_finite(state['params'])):
      raise NonFiniteStateError(
          f'step {step}: parameters are not all finite; refusing to write a checkpoint '
          f'to {self.directory} (the last good one is kept)')
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json)), force=force)
    self._last_time = time.monotonic()
    return saved

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  # -- restoring ---------------------------------------------------------------------

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state: Any, step: int | None = None):
    """(step, state, data_state) of the newest readable checkpoint, or None if none.

    With ``step`` given, exactly that checkpoint (an error if it is unreadable).
    """
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for s in candidates:
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises many types for a damaged directory
        if step is not None:
          raise
        log.warning('checkpoint step %d in %s is unreadable (%s: %s); trying the previous one',
                    s, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        print(f'WARNING: checkpoint {s} unreadable ({type(e).__name__}); '
              f'falling back to an earlier one', flush=True)
        continue
      return s, restored['state'], dict(restored['data'] or {})
    return None

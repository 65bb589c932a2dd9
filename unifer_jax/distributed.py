"""Multi-host start-up: ``jax.distributed`` from flags, the environment, or the cluster.

Order: explicit arguments > ``UNIFER_COORDINATOR`` / ``UNIFER_NUM_PROCESSES`` /
``UNIFER_PROCESS_ID`` (what ``launch/local.py`` sets) > automatic detection on TPU pods
and SLURM (JAX reads their environment itself) > a single process.

With several processes a peer watch runs (peer_watch.py): a dead or hung peer stops the
others within ``peer_timeout_s`` (argument > ``UNIFER_PEER_TIMEOUT_S`` > 180 s), naming
it; JAX's heartbeat check is set a little longer, as the backstop.
"""

from __future__ import annotations

import os

import jax

from unifer_jax import peer_watch

_initialized = False


def _cluster_detected() -> bool:
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in hosts or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 120,
               peer_timeout_s: float | None = None) -> None:
  """Idempotent; a no-op for a single process with nothing configured."""
  global _initialized
  if _initialized:
    return
  coordinator = coordinator or os.environ.get('UNIFER_COORDINATOR')
  if num_processes is None and os.environ.get('UNIFER_NUM_PROCESSES'):
    num_processes = int(os.environ['UNIFER_NUM_PROCESSES'])
  if process_id is None and os.environ.get('UNIFER_PROCESS_ID'):
    process_id = int(os.environ['UNIFER_PROCESS_ID'])
  peer_timeout_s = float(peer_timeout_s or os.environ.get('UNIFER_PEER_TIMEOUT_S')
                         or peer_watch.DEFAULT_TIMEOUT_S)
  # JAX aborts a process whose peer stopped heartbeating; later than the peer watch,
  # which says who and why and exits cleanly.
  kwargs = dict(heartbeat_timeout_seconds=int(peer_timeout_s + max(30, peer_timeout_s / 2)))
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError('a coordinator address needs num_processes and process_id '
                       '(flags or UNIFER_NUM_PROCESSES / UNIFER_PROCESS_ID)')
    if coordinator.startswith(('127.', 'localhost')):
      kwargs['coordinator_bind_address'] = coordinator  # keep a local run on loopback
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s,
                               **kwargs)
  elif _cluster_detected():
    jax.distributed.initialize(**kwargs)
  _initialized = True
  peer_watch.start(peer_timeout_s)


def is_main() -> bool:
  return jax.process_index() == 0


_barriers = 0


def start_together(name: str, timeout_s: float = 3600.0) -> None:
  """Wait until every process reaches this point (a coordination-service barrier; no
  device collective), then return. A no-op for one process.

  Before the first step: gloo (CPU collectives) gives the peers 30 s to meet at the first
  collective, and a process that loaded its executables from the persistent compilation
  cache can be minutes ahead of one that compiles its own (JAX writes cache entries from
  process 0 only, so process-local computations are cached for process 0 alone).
  """
  global _barriers
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  _barriers += 1
  jax_distributed.global_state.client.wait_at_barrier(f'unifer/{name}/{_barriers}',
                                                      int(timeout_s * 1000))

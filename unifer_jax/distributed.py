"""Multi-host start-up: ``jax.distributed`` from flags, the environment, or the cluster.

Order: explicit arguments > ``UNIFER_COORDINATOR`` / ``UNIFER_NUM_PROCESSES`` /
``UNIFER_PROCESS_ID`` (what ``launch/local.py`` sets) > automatic detection on TPU pods
and SLURM (JAX reads their environment itself) > a single process.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def _cluster_detected() -> bool:
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in hosts or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 120) -> None:
  """Idempotent; a no-op for a single process with nothing configured."""
  global _initialized
  if _initialized:
    return
  coordinator = coordinator or os.environ.get('UNIFER_COORDINATOR')
  if num_processes is None and os.environ.get('UNIFER_NUM_PROCESSES'):
    num_processes = int(os.environ['UNIFER_NUM_PROCESSES'])
  if process_id is None and os.environ.get('UNIFER_PROCESS_ID'):
    process_id = int(os.environ['UNIFER_PROCESS_ID'])
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError('a coordinator address needs num_processes and process_id '
                       '(flags or UNIFER_NUM_PROCESSES / UNIFER_PROCESS_ID)')
    kwargs = {}
    if coordinator.startswith(('127.', 'localhost')):
      kwargs['coordinator_bind_address'] = coordinator  # keep a local run on loopback
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s,
                               **kwargs)
  elif _cluster_detected():
    jax.distributed.initialize()
  _initialized = True


def is_main() -> bool:
  return jax.process_index() == 0

"""Parameters only, from a workdir's newest checkpoint: a teacher for distillation or a
student to export needs neither the optimizer state nor the input state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from unifer_jax import workdirs


def newest_step(workdir: str | Path) -> int:
  """The newest checkpoint step under ``workdir/checkpoints``."""
  ckpt_dir = workdirs.path(workdir) / 'checkpoints'
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) \
      if ckpt_dir.is_dir() else []
  if not steps:
    raise FileNotFoundError(f'{workdir}: no checkpoint steps in {ckpt_dir}')
  return steps[-1]


def load_params(workdir: str | Path, abstract_params: Any) -> tuple[int, Any]:
  """(step, params) of the newest checkpoint in ``workdir``: only the ``params`` subtree
  is read (no optimizer state), into the shardings / dtypes of ``abstract_params``
  (ShapeDtypeStructs; without a sharding the arrays land on the default device)."""
  step = newest_step(workdir)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {'params': abstract_params}
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(
        workdirs.path(workdir) / 'checkpoints' / str(step) / 'state', args=ocp.args.PyTreeRestore(
            item=target, partial_restore=True, restore_args=jax.tree.map(
                lambda a: ocp.ArrayRestoreArgs(sharding=getattr(a, 'sharding', None) or default,
                                               dtype=a.dtype), target)))
  return step, restored['params']

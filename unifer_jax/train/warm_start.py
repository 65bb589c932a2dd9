"""Warm start from an earlier stage: ``config.init.checkpoint = '<workdir of stage N-1>'``.

Every parameter of the new model whose path and shape match the newest checkpoint of
that workdir is loaded; the rest (e.g. LoRA adapters added for instruction tuning)
keep their fresh initialisation. Both lists are printed, so a stage never silently
starts from scratch. The optimizer state is not carried over: a stage is a new
optimisation problem with its own schedule.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from unifer_jax import workdirs
from unifer_jax.train import optim


def _newest_step(directory: Path) -> int:
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps:
    raise FileNotFoundError(f'config.init.checkpoint: no checkpoint steps in {directory}')
  return steps[-1]


def load_matching(source: str | Path, params: dict) -> tuple[dict, list[str], list[str]]:
  """Returns (params with matching entries replaced, loaded paths, fresh paths).

  ``params``: the concrete (sharded) initial parameters, or their ShapeDtypeStructs with
  shardings (then the fresh entries stay abstract: ``fill_fresh``). Loaded arrays take
  their shardings.
  """
  source = workdirs.path(source)
  ckpt_dir = source / 'checkpoints' if (source / 'checkpoints').is_dir() else source
  step = _newest_step(ckpt_dir)
  state_dir = ckpt_dir / str(step) / 'state'
  with ocp.StandardCheckpointer() as reader:
    meta = reader.metadata(state_dir)
  tree = meta.item_metadata.tree if hasattr(meta, 'item_metadata') else meta.tree
  stored = {optim.path_str(k[1:]): v for k, v in traverse_util.flatten_dict(tree).items()
            if k and k[0] == 'params'}
  current = optim.flat(params)
  loaded = sorted(p for p, a in current.items()
                  if p in stored and tuple(stored[p].shape) == tuple(a.shape))
  fresh = sorted(set(current) - set(loaded))
  if not loaded:
    raise ValueError(f'config.init.checkpoint={source}: no parameter of the model matches '
                     f'the checkpoint at step {step}')
  # Restore only the matching subtree, directly into the shardings of the new params.
  target = {'params': traverse_util.unflatten_dict(
      {tuple(p.split('/')): current[p] for p in loaded})}
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(
                lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), target),
            partial_restore=True))
  merged = dict(current)
  merged.update(optim.flat(restored['params']))
  return _unflatten(merged), loaded, fresh


def fill_fresh(params: dict, initial: dict, fresh: list[str]) -> dict:
  """``params`` with the ``fresh`` paths taken from ``initial`` (the random init)."""
  merged, init_flat = optim.flat(params), optim.flat(initial)
  merged.update({p: init_flat[p] for p in fresh})
  return _unflatten(merged)


def _unflatten(flat_params: dict) -> dict:
  def key(part: str):
    return int(part) if part.isdigit() else part
  return traverse_util.unflatten_dict(
      {tuple(key(p) for p in path.split('/')): v for path, v in flat_params.items()})

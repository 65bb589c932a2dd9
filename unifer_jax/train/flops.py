"""Model FLOPs of one train step, for MFU.

XLA's cost analysis counts the body of a ``lax.scan`` (a while loop) once, so on a
scanned model it under-reports by about the layer count. We therefore lower the same
step with every tower unrolled (``scan_layers=False``) and read the cost analysis of
the *lowered* module: no compilation, only tracing, so even a 32-layer model takes
seconds. The unrolled and scanned steps compute the same thing.
"""

from __future__ import annotations

import ml_collections

from unifer_jax.train import state as state_lib
from unifer_jax.train import step as step_lib


def unrolled(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  model = state_lib.model_config(config)  # with the towers named in init.* applied
  for tower in state_lib.towers(model):
    model[tower].scan_layers = False
  d = config.to_dict()
  d['model'] = model.to_dict()
  d['init'] = {k: '' for k in d['init']}  # the architecture is resolved; no weights read
  return ml_collections.ConfigDict(d)


def step_flops(config: ml_collections.ConfigDict, mesh, loss_fn, batch_spec: dict) -> float:
  """Total FLOPs of one step over the whole mesh (0.0 if XLA gives no estimate)."""
  setup = state_lib.build(unrolled(config), mesh)
  # (A distill teacher stays as its workdir built it: its scanned layers count once.)
  lowered = step_lib.compile_step(setup, loss_fn, batch_spec).lower(
      *step_lib.abstract_args(setup, batch_spec))
  cost = lowered.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))

"""What one train step costs: matmul FLOPs and bytes from its jaxpr (per device, loops
expanded). What the compiled program does (collectives, HBM bytes) is :mod:`hlo_stats`.

The one FLOP counter of the code base: the train loop's MFU and ``unifer
compile-check`` both use :func:`step_flops`. XLA's ``cost_analysis()`` counts the body
of a while loop once, so for a model whose layers run under ``lax.scan`` (or a
gradient-accumulation scan) it undercounts FLOPs and bytes by about the trip count, and
it returns nothing for GPU targets; these counters read the jaxpr and multiply loop
bodies by their lengths instead.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from unifer_jax import sharding
from unifer_jax.train import state as state_lib, step as step_lib


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Matmul cost of one train step (FLOPs over all devices, traffic per device)."""
  model_flops: float        # without remat recompute: what MFU counts
  executed_flops: float     # with remat recompute: what the chips run
  hbm_traffic_bytes: float  # per device, see matmul_cost


def trace_step(config, mesh, batch_spec: dict):
  """(Setup, the traced jitted train step) for ``config`` on ``mesh``."""
  setup = state_lib.build(config, mesh)
  # The step's batch (grpo: rollouts) as the stage makes it from the input's.
  batch_spec = setup.stage.step_batch_spec(batch_spec)
  jitted = step_lib.compile_step(setup, setup.stage.loss(), batch_spec)
  return setup, jitted.trace(*step_lib.abstract_args(setup, batch_spec))


def _has_remat(model_cfg) -> bool:
  return any(model_cfg[t].get('remat', 'none') not in ('', 'none', None)
             for t in state_lib.towers(model_cfg))


def _has_flash(model_cfg) -> bool:
  return any(model_cfg[t].get('attention', 'xla') == 'flash' for t in state_lib.towers(model_cfg))


def step_flops(config, mesh, batch_spec: dict, traced=None, args=None) -> StepCost:
  """The matmul cost of ``config``'s train step on ``mesh``.

  ``traced``: the step as it will run (``jax.jit(...).trace(...)``), traced here if not
  given. With remat or fused attention configured the step is traced again with
  ``remat='none'`` and ``attention='xla'`` for the model FLOPs (tracing only: seconds
  even for a 7B model). A fused kernel (``pallas_call``) counts its body's matmuls once
  per grid point. A data-dependent ``cond`` /
  ``switch`` (the generate/instruct loss picks its target bucket from the mask) counts
  its costliest branch -- an upper bound -- unless ``args`` (concrete ``(state, batch,
  rng)``) are given: then the top-level ones count the branch these args take.
  """
  batch = int(config.input.batch_size)
  accum = int(config.optimizer.get('grad_accum_steps', 1))
  batch_sizes = {batch, batch // accum}
  batch_shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if traced is None:
    traced = trace_step(config, mesh, batch_spec)[1]
  taken = lambda t: None if args is None else taken_branches(t.jaxpr, args)
  executed, traffic = matmul_cost(traced.jaxpr, batch_sizes, batch_shards, taken(traced))
  model = executed
  model_cfg = state_lib.model_config(config)
  if _has_remat(model_cfg) or _has_flash(model_cfg):
    # The model's math: no remat recompute, and attention as XLA writes it (a fused
    # kernel's key padding and backward recompute are executed FLOPs, not the model's).
    no_remat = config.copy_and_resolve_references()
    no_remat.remat = 'none'
    no_remat.attention = 'xla'
    plain = trace_step(no_remat, mesh, batch_spec)[1]
    model, _ = matmul_cost(plain.jaxpr, batch_sizes, batch_shards, taken(plain))
  return StepCost(model_flops=model, executed_flops=executed, hbm_traffic_bytes=traffic)


def taken_branches(closed_jaxpr, args) -> dict[int, int]:
  """{eqn index: branch index} of the top-level ``cond`` eqns of ``closed_jaxpr`` on the
  concrete ``args`` (its flattened inputs). Evaluates eagerly only the eqns the branch
  indices depend on (for the target switch: a sum and a max over the loss mask)."""
  from jax.extend import core as jcore  # pylint: disable=g-import-not-at-top
  jaxpr = closed_jaxpr.jaxpr
  conds = [i for i, e in enumerate(jaxpr.eqns) if e.primitive.name == 'cond']
  producer = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars}
  needed, todo = set(), [jaxpr.eqns[i].invars[0] for i in conds]
  while todo:
    v = todo.pop()
    i = None if isinstance(v, jcore.Literal) else producer.get(v)
    if i is not None and i not in needed:
      needed.add(i)
      todo.extend(jaxpr.eqns[i].invars)
  env = dict(zip(jaxpr.constvars, closed_jaxpr.consts))
  env.update(zip(jaxpr.invars, jax.tree.leaves(args)))
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  for i in sorted(needed):
    eqn = jaxpr.eqns[i]
    out = eqn.primitive.bind(*map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params))
    env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]))
  return {i: int(read(jaxpr.eqns[i].invars[0])) for i in conds}


def _sub_jaxprs(value):
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


MATMULS = ('dot_general', 'conv_general_dilated')


def eqn_flops(eqn) -> float:
  """2*M*N*K of one dot_general / conv eqn."""
  lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
  if eqn.primitive.name == 'dot_general':
    (contract, _), _ = eqn.params['dimension_numbers']
    k = math.prod(lhs.shape[d] for d in contract)
  else:  # rhs spec: (out features, in features, spatial...)
    k = math.prod(rhs.shape[d] for d in eqn.params['dimension_numbers'].rhs_spec[1:])
  return 2.0 * math.prod(out.shape) * k


def matmul_eqns(jaxpr, branches: dict[int, int] | None = None, times: int = 1):
  """Yields (eqn, runs per call over all devices) for every dot_general / conv of a
  jaxpr: a scan body runs ``length`` times, a cond its costliest branch (or, for the
  top-level eqn index ``i`` in ``branches``, branch ``branches[i]``), a while body once
  (no static trip count; the step has none), a ``shard_map`` body once on every device
  of its mesh, a Pallas kernel's body once per grid point."""
  for eqn, runs, _ in _matmuls(jaxpr, branches, times, 1):
    yield eqn, runs


def _matmuls(jaxpr, branches, times: int, devices: int):
  """(eqn, runs over all devices, runs whose operands come from HBM per device)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for index, eqn in enumerate(jaxpr.eqns):
    name = eqn.primitive.name
    if name in MATMULS:
      yield eqn, times * devices, times
    if name == 'pallas_call':
      # A fused kernel (models/flash.py): its body runs once per grid point, on blocks
      # in on-chip memory (its HBM traffic is the custom call's operands: hlo_memory).
      # Counted from the body, not the kernel's cost estimate (the backward kernels
      # carry none): key padding and the backward's recompute are what the chip runs.
      grid = math.prod(eqn.params['grid_mapping'].grid)
      for inner, runs, _ in _matmuls(eqn.params['jaxpr'], None, times * grid, devices):
        yield inner, runs, 0
      continue
    subs = [s for v in eqn.params.values() for s in _sub_jaxprs(v)]
    if name == 'cond' and subs:
      if branches and index in branches:
        subs = [subs[branches[index]]]
      else:
        subs = [max(subs, key=lambda b: sum(n * eqn_flops(e) for e, n in matmul_eqns(b)))]
    runs = times * (1 if name == 'cond' else eqn.params.get('length', 1))
    # A shard_map body sees one device's shard: every device of the mesh runs it.
    inner_devices = devices * (eqn.params['mesh'].size if name == 'shard_map' else 1)
    for sub in subs:
      yield from _matmuls(sub, None, runs, inner_devices)


def matmul_cost(jaxpr, batch_sizes=(), batch_shards: int = 1,
                branches: dict[int, int] | None = None) -> tuple[float, float]:
  """(FLOPs on all devices, HBM bytes per device) of the matmuls of a jaxpr
  (:func:`matmul_eqns`: loops expanded, one branch per cond).

  FLOPs: 2*M*N*K per matmul. Bytes: each matmul reads its operands and writes its result
  once; an array whose leading dimension is a batch size (``batch_sizes``) is split
  over ``batch_shards`` devices, any other (weights, weight gradients) is whole on each
  device, as under data parallelism / FSDP. XLA's own cost analysis counts every loop
  body once, so it undercounts scanned layers.
  """
  def nbytes(aval):
    size = math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
    return size / batch_shards if aval.shape and aval.shape[0] in batch_sizes else size

  flops = traffic = 0.0
  for eqn, runs, hbm_runs in _matmuls(jaxpr, branches, 1, 1):
    flops += runs * eqn_flops(eqn)
    traffic += hbm_runs * sum(nbytes(v.aval) for v in (*eqn.invars[:2], eqn.outvars[0]))
  return flops, traffic

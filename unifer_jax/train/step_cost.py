"""What one train step costs: matmul FLOPs and bytes from its jaxpr, and the
collectives XLA inserted, from its compiled HLO text (per device, loops expanded).

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
import re

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


def step_flops(config, mesh, batch_spec: dict, traced=None, args=None) -> StepCost:
  """The matmul cost of ``config``'s train step on ``mesh``.

  ``traced``: the step as it will run (``jax.jit(...).trace(...)``), traced here if not
  given. With remat configured the step is traced again with ``remat='none'`` for the
  model FLOPs (tracing only: seconds even for a 7B model). A data-dependent ``cond`` /
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
  if _has_remat(state_lib.model_config(config)):
    no_remat = config.copy_and_resolve_references()
    no_remat.remat = 'none'
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
  """Yields (eqn, runs per call) for every dot_general / conv of a jaxpr: a scan body
  runs ``length`` times, a cond its costliest branch (or, for the top-level eqn index
  ``i`` in ``branches``, branch ``branches[i]``), a while body once (no static trip
  count; the step has none)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for index, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name in MATMULS:
      yield eqn, times
    subs = [s for v in eqn.params.values() for s in _sub_jaxprs(v)]
    if eqn.primitive.name == 'cond' and subs:
      if branches and index in branches:
        subs = [subs[branches[index]]]
      else:
        subs = [max(subs, key=lambda b: sum(n * eqn_flops(e) for e, n in matmul_eqns(b)))]
    runs = times * (1 if eqn.primitive.name == 'cond' else eqn.params.get('length', 1))
    for sub in subs:
      yield from matmul_eqns(sub, None, runs)


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
  for eqn, runs in matmul_eqns(jaxpr, branches):
    flops += runs * eqn_flops(eqn)
    traffic += runs * sum(nbytes(v.aval) for v in (*eqn.invars[:2], eqn.outvars[0]))
  return flops, traffic


COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_OP = re.compile(r'=\s*(\([^=]*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$')
_WHILE = re.compile(r'\bwhile\(.*\bcondition=%?([\w.-]+), body=%?([\w.-]+)')
_CALLED = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.-]+)|branch_computations=\{([^}]*)\}')
_ARRAY = re.compile(r'\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TRIP = re.compile(r'constant\((\d+)\)')
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _array_bytes(type_text: str, largest: bool) -> int:
  sizes = []
  for dtype, dims in _ARRAY.findall(type_text):
    bits = 1 if dtype == 'pred' else int(re.search(r'\d+', dtype).group())
    sizes.append(math.prod(int(d) for d in dims.split(',') if d) * max(bits // 8, 1))
  # An async *-start returns (operands, results): its largest array is the result.
  return (max(sizes) if largest else sum(sizes)) if sizes else 0


def collective_stats(hlo_text: str) -> tuple[dict, list]:
  """Collectives of compiled HLO text, per device per step.

  Returns ({op: {'ops': static count, 'runs': executions, 'bytes': result bytes moved}},
  the 3 biggest ops by bytes as (bytes, op, result type, jax op name)). Executions
  multiply an op inside a while body (the layer scan) by the loop's trip count, read from
  its condition (``i < N``); an async start/done pair counts once. TPU's compiler often
  writes an FSDP all-gather as an all-reduce of a zero-padded buffer (and a
  reduce-scatter as an all-reduce and a slice), so there the bytes say more than the
  op names. An async collective XLA moved into a loop body to overlap it with the loop
  is counted every iteration: an upper bound.
  """
  comps, current = {}, None
  for line in hlo_text.splitlines():
    head = _HEADER.match(line)
    if head and not line[0].isspace():  # computation headers start at column 0
      current = head.group(1)
      comps[current] = []
    elif current is not None:
      comps[current].append(line)
  callers = {name: [] for name in comps}  # callee -> [(caller, times per caller run)]
  for name, lines in comps.items():
    for line in lines:
      loop = _WHILE.search(line)
      trips = {}
      if loop:
        cond, body = loop.groups()
        known = _KNOWN_TRIPS.search(line)  # the GPU compiler annotates it
        found = [int(n) for l in comps.get(cond, []) for n in _TRIP.findall(l)]
        lt = any('direction=LT' in l for l in comps.get(cond, []))
        trips[body] = int(known.group(1)) if known else max(found) if found and lt else 1
      for one, many in _CALLED.findall(line):
        for callee in (c.strip().lstrip('%') for c in (one or many).split(',')):
          if callee in callers:
            callers[callee].append((name, trips.get(callee, 1)))
  runs_of = {}

  def runs(name, seen=()):
    if name not in runs_of:
      if not callers[name]:
        runs_of[name] = 1  # ENTRY (and unreferenced helpers)
      else:
        runs_of[name] = sum(runs(c, seen + (name,)) * t for c, t in callers[name] if c not in seen)
    return runs_of[name]

  stats = {op: {'ops': 0, 'runs': 0, 'bytes': 0} for op in COLLECTIVES}
  biggest = []
  for name, lines in comps.items():
    for line in lines:
      for type_text, op, start in _OP.findall(line):
        n, size = runs(name), _array_bytes(type_text, largest=bool(start))
        stats[op]['ops'] += 1
        stats[op]['runs'] += n
        stats[op]['bytes'] += n * size
        op_name = _OP_NAME.search(line)
        arrays = ['{}[{}]'.format(*a) for a in _ARRAY.findall(type_text)]
        shown = arrays[-1] if start else ', '.join(arrays)
        biggest.append((n * size, op, shown, op_name.group(1) if op_name else ''))
  return stats, sorted(biggest, reverse=True)[:3]

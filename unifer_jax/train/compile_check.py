r"""``unifer compile-check``: compile the real train step for a TPU/GPU target on this box.

  unifer compile-check --config configs/smoke.py:7b --topology v5p-128
  unifer compile-check --config configs/smoke.py:base --topology v5e-16
  unifer compile-check --config configs/smoke.py:7b --topology h100x8

Builds the target's devices without the hardware (``jax.experimental.topologies``:
libtpu for TPU, the CUDA PJRT plugin for GPU), the ('data', 'fsdp', 'tensor') mesh over
them, and then exactly what ``unifer train`` runs: ``state.build`` (abstract state and
shardings) and ``step.compile_step`` (the jitted step), lowered and compiled for the
target (MaxText's train_compile idea). It reports per device: parameter, optimizer,
temporary and peak bytes against the chip's HBM, FLOPs, the collectives XLA inserted, a
roofline step time and the MFU it implies, and exits 1 when the step does not fit.

Where the numbers come from:
* memory: ``compiled.memory_analysis()`` of the target compiler (peak = XLA's buffer
  assignment peak, at least arguments + outputs - donated aliases + temporaries).
* FLOPs: *model* FLOPs (what MFU counts) are the matmul/conv FLOPs of the step's jaxpr
  traced with ``remat='none'`` (2*M*N*K per dot, scan bodies times their length);
  *executed* FLOPs (remat recompute included) are XLA's ``cost_analysis()`` on TPU and
  the same jaxpr count of the step as configured on GPU, where the deviceless compiler
  returns no cost analysis. Elementwise FLOPs are left out of the jaxpr counts.
* HBM traffic: ``cost_analysis()['bytes accessed']`` on TPU; on GPU a coarse estimate
  (state read and written once, temporaries written and read once).
* collectives: static counts of the ops in the compiled HLO (an op inside the layer
  scan's loop body runs once per layer but is counted once).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import numpy as np

from unifer_jax import config_lib, sharding
from unifer_jax.data import inputs as inputs_lib
from unifer_jax.train import losses, metrics as metrics_lib
from unifer_jax.train import state as state_lib, step as step_lib

GiB = 1024 ** 3


# ------------------------------------------------------------------------------------ #
# Chips and topologies                                                                  #
# ------------------------------------------------------------------------------------ #
@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: HBM (GiB), HBM bandwidth (bytes/s) and how many JAX devices it
  shows (TPU7x: 2 TensorCores as 2 devices). Peak bf16 FLOP/s per chip come from
  ``metrics.PEAK_FLOPS`` (the table MFU uses in training)."""
  name: str
  hbm_gib: float
  hbm_bytes_per_s: float
  peak_key: str  # key of metrics.PEAK_FLOPS
  devices_per_chip: int = 1

  def per_device(self) -> tuple[float, float, float]:
    """(HBM bytes, HBM bytes/s, peak FLOP/s) of one device."""
    n = self.devices_per_chip
    return (self.hbm_gib * GiB / n, self.hbm_bytes_per_s / n,
            metrics_lib.PEAK_FLOPS[self.peak_key] / n)


CHIPS = {
    'v4': Chip('TPU v4', 32, 1228e9, 'tpu v4'),
    'v5e': Chip('TPU v5e', 16, 819e9, 'tpu v5e'),
    'v5p': Chip('TPU v5p', 95, 2765e9, 'tpu v5p'),
    'v6e': Chip('TPU v6e', 32, 1640e9, 'tpu v6e'),
    'tpu7x': Chip('TPU7x', 192, 7380e9, 'tpu7x', devices_per_chip=2),
    'h100': Chip('NVIDIA H100 SXM 80GB', 80, 3350e9, 'nvidia h100'),
}

# GpuTargetConfigProto (text) of an H100 SXM 80GB: what the deviceless XLA GPU compiler
# needs to know about the device (from NVIDIA's published H100 SXM figures).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPU_TARGET_CONFIGS = {'h100': H100_TARGET_CONFIG}
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Target:
  """A resolved ``--topology``."""
  name: str        # as given
  platform: str    # 'tpu' | 'cuda'
  chip: str        # key of CHIPS
  topology: str    # TPU 'v5p:4x4x4' | GPU '<slices>x<hosts>x<devices per host>'
  chips: int

  def describe(self) -> str:
    if self.platform == 'tpu':
      return f'{self.name} = {self.topology} ({self.chips} chips)'
    _, hosts, per_host = self.topology.split('x')
    return f'{self.name} = {self.chips} x {CHIPS[self.chip].name} ({hosts} host(s) x {per_host})'


def _torus_3d(chips: int) -> str:
  """v4/v5p slice shapes: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ..."""
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return 'x'.join(map(str, dims)) if math.prod(dims) == chips else ''


def _torus_2d(chips: int) -> str:
  """v5e/v6e slice shapes: 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16 (libtpu's AOT topologies
  start at one 2x2 host, so v5e-1 and v5e-2 are not offered)."""
  dims = [2, 2]
  while math.prod(dims) < chips:
    dims[1 if dims[0] == dims[1] else 0] *= 2
  return 'x'.join(map(str, dims)) if math.prod(dims) == chips else ''


# Product name prefix -> (chip, TensorCores per chip in the product name, shape function).
# v4 and v5p names count TensorCores (2 per chip: v5p-128 is 64 chips); v5e/v6e count chips.
TPU_PRODUCTS = {
    'v4': ('v4', 2, _torus_3d),
    'v5p': ('v5p', 2, _torus_3d),
    'v5e': ('v5e', 1, _torus_2d),
    'v5litepod': ('v5e', 1, _torus_2d),
    'v6e': ('v6e', 1, _torus_2d),
}
KNOWN_TOPOLOGIES = (
    'TPU products: v4-8 ... v4-4096, v5p-8 ... v5p-8192 (names count TensorCores, 2 per '
    'chip), v5e-4 ... v5e-256 and v6e-4 ... v6e-256 (names count chips), e.g. v5p-128, '
    'v5e-16, v6e-64, v4-32; explicit TPU topologies v4:2x2x4, v5p:4x4x4, v5e:4x4, '
    'v6e:8x8, tpu7x:2x2x1; GPUs h100xN or gpu:h100xN (N <= 8 on one host, else a multiple '
    'of 8 over N/8 hosts), e.g. h100x8, h100x16')


def resolve_topology(name: str) -> Target:
  """``--topology`` -> Target; a ValueError listing the known names otherwise."""
  raw = name.strip().lower()
  gpu = re.fullmatch(r'(?:gpu:)?([a-z]\d+)x(\d+)', raw)
  if gpu and gpu.group(1) in GPU_TARGET_CONFIGS:
    chip, n = gpu.group(1), int(gpu.group(2))
    if n <= GPUS_PER_HOST:
      return Target(name, 'cuda', chip, f'1x1x{n}', n)
    if n % GPUS_PER_HOST == 0:
      return Target(name, 'cuda', chip, f'1x{n // GPUS_PER_HOST}x{GPUS_PER_HOST}', n)
  explicit = re.fullmatch(r'(v4|v5p|v5e|v6e|tpu7x):(\d+(?:x\d+){1,2})', raw)
  if explicit:
    dims = [int(d) for d in explicit.group(2).split('x')]
    return Target(name, 'tpu', explicit.group(1), raw, math.prod(dims))
  product = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', raw)
  if product:
    chip, cores_per_chip, shape_fn = TPU_PRODUCTS[product.group(1)]
    count = int(product.group(2))
    shape = shape_fn(count // cores_per_chip) if count % cores_per_chip == 0 else ''
    if shape:
      return Target(name, 'tpu', chip, f'{chip}:{shape}', count // cores_per_chip)
  raise ValueError(f'--topology {name!r}: unknown target. Known: {KNOWN_TOPOLOGIES}')


def _quiet_libtpu():
  # libtpu expects a real TPU VM: it probes the metadata server and worker hostnames
  # (and prints errors when there are none), and takes a machine-wide lock that would
  # stop a second compile-check (or a parallel test) from loading it. Neither matters
  # for compiling only; the topology is given explicitly.
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def topology_devices(target: Target) -> list:
  """The target's devices, for AOT compilation only (nothing can run on them)."""
  from jax.experimental import topologies
  _quiet_libtpu()  # libtpu also loads (and probes) when the GPU plugin is asked
  if target.platform == 'tpu':
    kwargs = {'chip_config_name': 'megacore'} if target.chip == 'v4' else {}
    topo = topologies.get_topology_desc(platform='tpu', topology_name=target.topology, **kwargs)
  else:
    os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
    try:
      topo = topologies.get_topology_desc(
          platform='cuda', target_config=GPU_TARGET_CONFIGS[target.chip],
          topology=target.topology)
    except Exception as e:  # the plugin is an optional install
      raise RuntimeError(f'--topology {target.name}: GPU AOT compilation needs the CUDA PJRT '
                         f'plugin without CUDA libraries: pip install -e ".[gpu-aot]" '
                         f'({type(e).__name__}: {e})') from e
  return list(topo.devices)


# ------------------------------------------------------------------------------------ #
# Counting: matmul FLOPs and bytes from the jaxpr, collectives from the HLO            #
# ------------------------------------------------------------------------------------ #
def _sub_jaxprs(value):
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def matmul_cost(jaxpr, batch_sizes=(), batch_shards: int = 1) -> tuple[float, float]:
  """(FLOPs on all devices, HBM bytes per device) of the dot_general/conv ops of a jaxpr.

  FLOPs: 2*M*N*K per matmul. Bytes: each matmul reads its operands and writes its result
  once; an array whose leading dimension is a batch size (``batch_sizes``) is split
  over ``batch_shards`` devices, any other (weights, weight gradients) is whole on each
  device, as under data parallelism / FSDP. A scan body counts ``length`` times, a cond
  its costliest branch, a while body once (no static trip count; the step has none).
  XLA's own cost analysis counts every loop body once, so it undercounts scanned layers.
  """
  def nbytes(aval):
    size = math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
    return size / batch_shards if aval.shape and aval.shape[0] in batch_sizes else size

  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  flops = traffic = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ('dot_general', 'conv_general_dilated'):
      lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
      out = eqn.outvars[0].aval
      if name == 'dot_general':
        (contract, _), _ = eqn.params['dimension_numbers']
        k = math.prod(lhs.shape[d] for d in contract)
      else:  # rhs spec: (out features, in features, spatial...)
        k = math.prod(rhs.shape[d] for d in eqn.params['dimension_numbers'].rhs_spec[1:])
      flops += 2.0 * math.prod(out.shape) * k
      traffic += nbytes(lhs) + nbytes(rhs) + nbytes(out)
    subs = [s for v in eqn.params.values() for s in _sub_jaxprs(v)]
    if not subs:
      continue
    costs = [matmul_cost(s, batch_sizes, batch_shards) for s in subs]
    if name == 'cond':
      f, b = max(costs)
    else:
      times = eqn.params.get('length', 1)
      f, b = times * sum(c[0] for c in costs), times * sum(c[1] for c in costs)
    flops += f
    traffic += b
  return flops, traffic


COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_OP = re.compile(r'=\s*(?:\([^=]*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$')
_WHILE_BODY = re.compile(r'\bwhile\(.*\bbody=%?([\w.-]+)')
_CALLED = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?([%\w.,\s-]+)\}?')


def count_collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{op: (count, of which inside loop bodies)} in compiled HLO text.

  Static counts: an async start/done pair counts once; an op inside a while body (the
  layer scan) is counted once but runs once per iteration (per layer).
  """
  bodies, counts, calls = {}, {}, {}
  current = None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and not line[0].isspace():  # computation headers start at column 0
      current = head.group(1)
      counts[current], calls[current] = dict.fromkeys(COLLECTIVES, 0), set()
      continue
    if current is None:
      continue
    for op in _OP.findall(line):
      counts[current][op] += 1
    for group in _CALLED.findall(line):
      calls[current].update(c.strip().lstrip('%') for c in group.split(',') if c.strip())
    body = _WHILE_BODY.search(line)
    if body:
      bodies[body.group(1)] = True
  in_loop, todo = set(), list(bodies)
  while todo:  # everything a loop body calls runs inside the loop too
    name = todo.pop()
    if name in in_loop or name not in counts:
      continue
    in_loop.add(name)
    todo.extend(calls[name])
  return {op: (sum(c[op] for c in counts.values()),
               sum(counts[n][op] for n in in_loop)) for op in COLLECTIVES}


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


# ------------------------------------------------------------------------------------ #
# The check                                                                             #
# ------------------------------------------------------------------------------------ #
@dataclasses.dataclass
class Report:
  """All byte and FLOP figures are per device and per train step."""
  target: str
  platform: str
  chip: str
  devices: int
  hosts: int
  mesh: dict
  global_batch: int
  params: int                  # parameter count (whole model)
  param_bytes: int             # this device's parameter shards
  opt_bytes: int               # this device's optimizer-state shards
  argument_bytes: int          # memory_analysis: inputs (state + batch)
  output_bytes: int
  alias_bytes: int             # outputs written into donated inputs
  temp_bytes: int
  peak_bytes: int
  hbm_bytes: int
  model_flops: float           # matmul FLOPs without remat recompute: what MFU counts
  executed_flops: float        # matmul FLOPs with remat recompute: what the chip runs
  hbm_traffic_bytes: float     # estimate, see matmul_cost
  xla_flops: float | None      # XLA cost_analysis (TPU only; loop bodies counted once)
  xla_bytes: float | None
  collectives: dict            # op -> (static count, of which inside loop bodies)
  peak_flops: float            # per device, bf16 dense
  hbm_bytes_per_s: float
  trace_s: float
  lower_s: float
  compile_s: float

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def compute_time_s(self) -> float:
    return self.executed_flops / self.peak_flops

  @property
  def memory_time_s(self) -> float:
    return self.hbm_traffic_bytes / self.hbm_bytes_per_s

  @property
  def step_time_s(self) -> float:
    """Roofline: compute- or HBM-bound, whichever is slower. Communication and
    elementwise work are not modelled, so real steps are slower."""
    return max(self.compute_time_s, self.memory_time_s)

  @property
  def mfu(self) -> float:
    return self.model_flops / self.step_time_s / self.peak_flops


def _has_remat(model_cfg) -> bool:
  return any(model_cfg[t].get('remat', 'none') not in ('', 'none', None)
             for t in ('vit', 'qformer', 'llm'))


def run(config, topology: str, *, hbm_gib: float | None = None, log=None,
        hlo_path: str | None = None) -> Report:
  """Builds, lowers and compiles ``config``'s train step for ``topology``.

  ``hbm_gib`` overrides the HBM per device (e.g. to keep headroom for the runtime);
  ``log(str)`` receives progress lines (compiling a 7B step on CPU takes many minutes);
  ``hlo_path`` receives the compiled HLO text.
  """
  log = log or (lambda _: None)
  target = resolve_topology(topology)
  chip = CHIPS[target.chip]
  devices = topology_devices(target)
  mesh = sharding.make_mesh(config.mesh, devices)
  batch_size = int(config.input.batch_size)
  batch_shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if batch_size % batch_shards:
    raise ValueError(f'config.input.batch_size={batch_size} is not divisible by the batch '
                     f'axes data*fsdp={batch_shards} of mesh {dict(mesh.shape)}')
  log(f'{target.describe()}: {len(devices)} devices, mesh {dict(mesh.shape)}')

  # The same construction as train/loop.py: state.build -> compile_step -> lower.
  def traced_step(cfg):
    setup = state_lib.build(cfg, mesh)
    batch_spec = inputs_lib.make_input(cfg, setup.model_cfg).batch_spec()
    jitted = step_lib.compile_step(setup, losses.get(cfg.stage), batch_spec)
    return setup, jitted.trace(*step_lib.abstract_args(setup, batch_spec))

  accum = int(config.optimizer.get('grad_accum_steps', 1))
  batch_sizes = {batch_size, batch_size // accum}
  t0 = time.perf_counter()
  setup, traced = traced_step(config)
  executed, traffic = matmul_cost(traced.jaxpr, batch_sizes, batch_shards)
  model = executed
  if _has_remat(setup.model_cfg):  # the same step without recompute: MFU's numerator
    no_remat = config.copy_and_resolve_references()
    no_remat.remat = 'none'
    model, _ = matmul_cost(traced_step(no_remat)[1].jaxpr, batch_sizes, batch_shards)
  t1 = time.perf_counter()
  log(f'traced in {t1 - t0:.1f} s; lowering')
  lowered = traced.lower()
  t2 = time.perf_counter()
  log(f'lowered in {t2 - t1:.1f} s; compiling for {chip.name} (minutes for a 7B model)')
  compiled = lowered.compile()
  t3 = time.perf_counter()
  log(f'compiled in {t3 - t2:.1f} s')

  n = len(devices)
  mem = compiled.memory_analysis()
  args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  peak = max(int(getattr(mem, 'peak_memory_in_bytes', 0) or 0), args + out - alias + temp)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  hlo = compiled.as_text()
  if hlo_path:
    with open(hlo_path, 'w') as f:
      f.write(hlo)
  hbm, bandwidth, peak_flops = chip.per_device()
  params = setup.abstract_state['params']
  return Report(
      target=target.describe(), platform=target.platform, chip=chip.name, devices=n,
      hosts=len({d.process_index for d in devices}), mesh=dict(mesh.shape),
      global_batch=batch_size, params=sharding.param_count(params),
      param_bytes=_bytes_per_device(params),
      opt_bytes=_bytes_per_device(setup.abstract_state['opt_state']),
      argument_bytes=args, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
      peak_bytes=peak, hbm_bytes=int(hbm if hbm_gib is None else hbm_gib * GiB),
      model_flops=model / n, executed_flops=executed / n,
      hbm_traffic_bytes=traffic + args + out,
      xla_flops=cost.get('flops'), xla_bytes=cost.get('bytes accessed'),
      collectives=count_collectives(hlo), peak_flops=peak_flops, hbm_bytes_per_s=bandwidth,
      trace_s=t1 - t0, lower_s=t2 - t1, compile_s=t3 - t2)


def _gib(n: float) -> str:
  return f'{n / GiB:8.2f} GiB'


def format(report: Report) -> str:  # noqa: A001 -- the name the CLI calls
  """The human-readable report (per device, per train step)."""
  r = report
  xla = ('XLA cost_analysis (counts each loop body once, so not used): '
         f'{r.xla_flops:.4g} FLOPs, {r.xla_bytes / GiB:.2f} GiB' if r.xla_flops else
         'XLA cost_analysis: none on this platform')
  lines = [
      f'target      {r.target}: {r.devices} devices ({r.chip}), {r.hosts} host(s)',
      f'mesh        {r.mesh}, global batch {r.global_batch}',
      f'parameters  {r.params:,}',
      'memory per device',
      f'  parameters        {_gib(r.param_bytes)}',
      f'  optimizer state   {_gib(r.opt_bytes)}',
      f'  arguments         {_gib(r.argument_bytes)}  (train state + batch)',
      f'  outputs           {_gib(r.output_bytes)}  ({r.alias_bytes / GiB:.2f} GiB of it '
      'in donated input buffers)',
      f'  temporaries       {_gib(r.temp_bytes)}',
      f'  peak              {_gib(r.peak_bytes)}  of {r.hbm_bytes / GiB:.1f} GiB HBM '
      f'({100 * r.peak_bytes / r.hbm_bytes:.0f}%)',
      'per device per step',
      f'  model FLOPs       {r.model_flops:.4g}  (matmuls in the jaxpr, no remat recompute)',
      f'  executed FLOPs    {r.executed_flops:.4g}  (the same with remat recompute)',
      f'  HBM traffic       {r.hbm_traffic_bytes / GiB:.2f} GiB  (estimate: matmul operands '
      'and results once each + train state in and out)',
      f'  {xla}',
      '  collectives       ' + (', '.join(f'{k} {v[0]} ({v[1]} in loops)'
                                         for k, v in r.collectives.items() if v[0]) or 'none'),
      '                    (static op counts in the compiled HLO; one in a loop body runs '
      'once per layer)',
      f'roofline    {r.peak_flops / 1e12:.0f} TFLOP/s, {r.hbm_bytes_per_s / 1e9:.0f} GB/s per '
      f'device: compute {r.compute_time_s * 1e3:.1f} ms, HBM {r.memory_time_s * 1e3:.1f} ms',
      f'  step time >= {r.step_time_s * 1e3:.1f} ms '
      f'({"compute" if r.compute_time_s >= r.memory_time_s else "HBM"}-bound, communication '
      f'not modelled), implied MFU <= {100 * r.mfu:.1f}%',
      f'compile     trace {r.trace_s:.1f} s, lower {r.lower_s:.1f} s, compile {r.compile_s:.1f} s',
  ]
  verdict = 'fits' if r.fits else 'does not fit'
  sign = '<=' if r.fits else '>'
  lines.append(f'{verdict}: peak {r.peak_bytes / GiB:.2f} GiB {sign} '
               f'{r.hbm_bytes / GiB:.1f} GiB HBM per device')
  return '\n'.join(lines)


def to_json(report: Report) -> dict:
  """The report's fields plus the derived figures (fits, times, MFU)."""
  out = dataclasses.asdict(report)
  out.update(fits=report.fits, compute_time_s=report.compute_time_s,
             memory_time_s=report.memory_time_s, step_time_s=report.step_time_s,
             mfu=report.mfu)
  return out


def main(args, overrides=()) -> int:
  """``unifer compile-check``: 0 fits, 1 does not fit, 2 bad --topology.

  ``args``: --config, --topology, --hbm_gib, --hlo, --json (see unifer_jax/cli.py);
  ``overrides``: ['--config.key=value', ...].
  """
  try:
    resolve_topology(args.topology)
  except ValueError as e:
    print(f'unifer compile-check: {e}', file=sys.stderr)
    return 2
  config = config_lib.load(args.config, overrides)
  report = run(config, args.topology, hbm_gib=args.hbm_gib, hlo_path=args.hlo,
               log=lambda s: print(f'[compile-check] {s}', file=sys.stderr, flush=True))
  print(format(report), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(to_json(report), f, indent=2)
  if not report.fits:
    print(f'unifer compile-check: does not fit: peak {report.peak_bytes / GiB:.2f} GiB > '
          f'{report.hbm_bytes / GiB:.1f} GiB HBM per device on {report.target}', file=sys.stderr)
    return 1
  return 0

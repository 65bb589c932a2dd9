r"""``unifer compile-check``: compile the real train step for a TPU/GPU target on this box.

  unifer compile-check --config configs/smoke.py:7b --topology v5p-128
  unifer compile-check --config configs/smoke.py:base --topology v5e-16
  unifer compile-check --config configs/smoke.py:7b --topology h100x8
  unifer compile-check --config configs/smoke.py:7b --topology v5e-256 --num_slices 2

Today's figures (2026-12-07, libtpu 0.0.42; compiling takes 10-26 min and ~5 GB here):
``smoke.py:7b`` (FSDP in each slice, data parallel across slices, full remat, batch 512)
fits 2 x v5e-256 at 2.75 GiB of 16 per chip, 0.055 GiB per chip per step over the DCN
(each chip's bf16 gradient shard, 7.2B / 256), communication-bound (647 ms of in-slice
collectives); 4 x v5p-128 at 4.12 GiB of 95, 0.222 GiB over the DCN (7.2B / 64 x 2 bytes),
compute 65.8 ms, HBM 67.0 ms, in-slice 146 ms, DCN 76 ms. One v5p-128 at batch 256:
4.05 GiB, HBM 205 GiB per step by the compiled HLO (the jaxpr matmul estimate, which
counted every [batch x tokens, ...] activation whole on each chip, said 1603 GiB).

Makes the target's devices without the hardware (:mod:`aot_targets`), the ('data',
'fsdp', 'tensor') mesh over them, and then exactly what ``unifer train`` runs:
``state.build`` (abstract state and shardings) and ``step.compile_step`` (the jitted
step), lowered and compiled for the target (MaxText's train_compile idea). Reports, per
device and step: parameter, optimizer, temporary and peak bytes against the HBM; FLOPs;
the collectives XLA inserted; a roofline step time and the MFU it implies. Exits 1 when
the step does not fit.

Where the numbers come from:
* memory: ``compiled.memory_analysis()`` of the target's compiler (peak = its buffer
  assignment peak, at least arguments + outputs - donated aliases + temporaries).
* FLOPs (:func:`step_cost.step_flops`): matmul FLOPs of the step's jaxpr, scan bodies
  times their length; *model* FLOPs (MFU's numerator) from the step traced with
  ``remat='none'``, *executed* FLOPs from the step as configured (remat recompute
  included). A fused attention kernel (``attention='flash'``, a Pallas custom call XLA
  cannot see into) counts its body's matmuls once per grid point and device: its key
  padding and backward recompute are executed FLOPs; the model FLOPs are traced with
  ``attention='xla'``. Not XLA's cost analysis: it counts each loop body once (and
  returns nothing for GPU targets); its figures are shown for reference.
* HBM traffic (:func:`hlo_memory.hbm_bytes`): from the compiled HLO, each executed
  instruction (a fusion as one) reading its operands and writing its result once, loop
  bodies times their trip counts, arrays the TPU compiler placed on-chip (memory space
  S(n), n > 0) left out, and a fusion that only slices an operand reading the slice -- so
  a scanned layer's weights count once per layer and use, not as the whole [layers, ...]
  stack. The older jaxpr estimate (each matmul's operands and result once, plus the
  train state in and out) is printed beside it, and used only when XLA refused to
  compile (out of memory).
* collectives (:mod:`hlo_stats`): ops in the compiled HLO, executions with loop trip
  counts, and the bytes of their results; with ``--num_slices N`` (a multislice TPU
  target, ``config.mesh.dcn`` saying which axes span slices) the cross-slice ones apart,
  with the bytes each device receives over the data-centre network (DCN).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time

import jax
import numpy as np

from unifer_jax import config_lib, sharding
from unifer_jax.data import inputs as inputs_lib
from unifer_jax.train import aot_targets, hlo_memory, hlo_stats, step_cost
from unifer_jax.train import state as state_lib
from unifer_jax.train.aot_targets import GiB, resolve_topology


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class Report:
  """All byte and FLOP figures are per device and per train step."""
  target: str
  platform: str
  chip: str
  devices: int
  hosts: int
  slices: int
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
  hbm_traffic_bytes: float     # the roofline's: the compiled HLO's, else the jaxpr estimate
  jaxpr_hbm_bytes: float       # estimate from the jaxpr's matmuls, see matmul_cost
  biggest_hbm: list            # [(bytes, opcode, result type, jax op name)] x 5
  xla_flops: float | None      # XLA cost_analysis (TPU only; loop bodies counted once)
  xla_bytes: float | None
  collectives: dict            # op -> {'ops', 'runs', 'bytes'}, see hlo_stats
  biggest_collectives: list    # [(bytes, op, result type, jax op name)] x 3
  dcn_collectives: dict        # the same for cross-slice transfers (multislice)
  biggest_dcn: list
  peak_flops: float            # per device, bf16 dense
  hbm_bytes_per_s: float
  link_bytes_per_s: float
  dcn_bytes_per_s: float
  trace_s: float
  lower_s: float
  compile_s: float
  notes: list = dataclasses.field(default_factory=list)
  compile_error: str = ''      # XLA's RESOURCE_EXHAUSTED: memory figures are then its own

  @property
  def fits(self) -> bool:
    return not self.compile_error and self.peak_bytes <= self.hbm_bytes

  @property
  def compute_time_s(self) -> float:
    return self.executed_flops / self.peak_flops

  @property
  def memory_time_s(self) -> float:
    return self.hbm_traffic_bytes / self.hbm_bytes_per_s

  @staticmethod
  def _wire_bytes(collectives: dict) -> float:
    # all-reduce counted twice: reduce, then broadcast.
    return sum(v['bytes'] * (2 if op == 'all-reduce' else 1) for op, v in collectives.items())

  @property
  def comm_time_s(self) -> float:
    """In-slice collective result bytes over the chip's links; a rough figure (GPU
    inter-host links are not distinguished)."""
    return self._wire_bytes(self.collectives) / self.link_bytes_per_s

  @property
  def dcn_time_s(self) -> float:
    """Cross-slice bytes over the chip's share of its host's DCN bandwidth."""
    return self._wire_bytes(self.dcn_collectives) / self.dcn_bytes_per_s

  @property
  def bound(self) -> str:
    times = {'compute': self.compute_time_s, 'HBM': self.memory_time_s,
             'communication': self.comm_time_s, 'DCN': self.dcn_time_s}
    return max(times, key=times.get)

  @property
  def step_time_s(self) -> float:
    """Roofline: the slowest of compute, HBM traffic, in-slice and cross-slice
    communication, as if they overlapped perfectly (elementwise work is not counted):
    a lower bound."""
    return max(self.compute_time_s, self.memory_time_s, self.comm_time_s, self.dcn_time_s)

  @property
  def mfu(self) -> float:
    return self.model_flops / self.step_time_s / self.peak_flops


def _compile(lowered, target, notes: list, log):
  # The persistent compilation cache can store but not load executables for devices
  # that do not exist here (a warning per run and a wasted write): keep it out.
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    return _compile_once(lowered, target, notes, log)
  finally:
    jax.config.update('jax_enable_compilation_cache', cache)


def _compile_once(lowered, target, notes: list, log):
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The deviceless XLA GPU compiler (jax 0.10.2) fails to tile some dots for Triton
    # (seen: bf16[65792,128] in the 7B ViT, f32[136,4] in tiny); cuBLAS takes them.
    if target.platform != 'cuda' or "Couldn't find output tile sizes" not in str(e):
      raise
    notes.append('compiled with xla_gpu_enable_triton_gemm=False (Triton GEMM tiling '
                 f'failed: {str(e).splitlines()[0][:100]}...)')
    log(notes[-1])
    return lowered.compile(compiler_options={'xla_gpu_enable_triton_gemm': False})


def run(config, topology: str, *, num_slices: int = 1, hbm_gib: float | None = None,
        log=None, hlo_path: str | None = None) -> Report:
  """Builds, lowers and compiles ``config``'s train step for ``topology``.

  ``hbm_gib`` overrides the HBM per device (e.g. to keep headroom for the runtime);
  ``log(str)`` receives progress lines (compiling a 7B step on CPU takes many minutes);
  ``hlo_path`` receives the compiled HLO text.
  """
  log = log or (lambda _: None)
  target = resolve_topology(topology, num_slices)
  chip = aot_targets.CHIPS[target.chip]
  devices = aot_targets.topology_devices(target)
  mesh = sharding.make_mesh(config.mesh, devices)
  batch_size = int(config.input.batch_size)
  batch_shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if batch_size % batch_shards:
    raise ValueError(f'config.input.batch_size={batch_size} is not divisible by the batch '
                     f'axes data*fsdp={batch_shards} of mesh {dict(mesh.shape)}')
  ici, dcn, _ = sharding.hybrid_shape(config.mesh, devices)
  spans = f' (per slice {dict(zip(sharding.MESH_AXES, ici))}, across slices ' \
          f'{dict(zip(sharding.MESH_AXES, dcn))})' if target.slices > 1 else ''
  log(f'{target.describe()}: {len(devices)} devices, mesh {dict(mesh.shape)}{spans}')

  # The same construction as train/loop.py: state.build -> compile_step -> trace.
  t0 = time.perf_counter()
  batch_spec = inputs_lib.batch_spec(config, state_lib.model_config(config))
  setup, traced = step_cost.trace_step(config, mesh, batch_spec)
  matmuls = step_cost.step_flops(config, mesh, batch_spec, traced)
  t1 = time.perf_counter()
  log(f'traced in {t1 - t0:.1f} s; lowering')
  lowered = traced.lower()
  t2 = time.perf_counter()
  log(f'lowered in {t2 - t1:.1f} s; compiling for {chip.name} (minutes for a 7B model)')
  notes, compile_error = [], ''
  try:
    compiled = _compile(lowered, target, notes, log)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    compiled, compile_error = None, str(e).splitlines()[0]
  t3 = time.perf_counter()
  log(f'compiled in {t3 - t2:.1f} s' if compiled else f'XLA refused: {compile_error}')

  n = len(devices)
  params, opt = setup.abstract_state['params'], setup.abstract_state['opt_state']
  param_bytes, opt_bytes = _bytes_per_device(params), _bytes_per_device(opt)
  if compiled is not None:
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
    program = hlo_stats.Program(hlo)
    collectives, biggest = hlo_stats.collective_stats(program)
    dcn, biggest_dcn = hlo_stats.dcn_stats(program)
    hbm_traffic, biggest_hbm = hlo_memory.hbm_bytes(program)
  else:  # the compiler's own out-of-memory verdict: what it needed beyond the state
    needed = re.search(r'temporaries \(([\d.]+)G\)', compile_error)
    args = out = alias = param_bytes + opt_bytes
    temp = int(float(needed.group(1)) * GiB) if needed else 0
    peak, cost, collectives, biggest, dcn, biggest_dcn = args + temp, {}, {}, [], {}, []
    hbm_traffic, biggest_hbm = matmuls.hbm_traffic_bytes + args + out, []
  hbm, bandwidth, link, peak_flops = chip.per_device()
  return Report(
      target=target.describe(), platform=target.platform, chip=chip.name, devices=n,
      hosts=len({d.process_index for d in devices}), slices=target.slices,
      mesh=dict(mesh.shape),
      global_batch=batch_size, params=sharding.param_count(params),
      param_bytes=param_bytes, opt_bytes=opt_bytes,
      argument_bytes=args, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
      peak_bytes=peak, hbm_bytes=int(hbm if hbm_gib is None else hbm_gib * GiB),
      model_flops=matmuls.model_flops / n, executed_flops=matmuls.executed_flops / n,
      hbm_traffic_bytes=hbm_traffic, jaxpr_hbm_bytes=matmuls.hbm_traffic_bytes + args + out,
      biggest_hbm=biggest_hbm,
      xla_flops=cost.get('flops'), xla_bytes=cost.get('bytes accessed'),
      collectives=collectives, biggest_collectives=biggest, dcn_collectives=dcn,
      biggest_dcn=biggest_dcn, peak_flops=peak_flops, hbm_bytes_per_s=bandwidth,
      link_bytes_per_s=link, dcn_bytes_per_s=chip.dcn_bytes_per_s / chip.devices_per_chip,
      trace_s=t1 - t0, lower_s=t2 - t1, compile_s=t3 - t2, notes=notes,
      compile_error=compile_error)


def _gib(n: float) -> str:
  return f'{n / GiB:8.2f} GiB'


def format(report: Report) -> str:  # noqa: A001 -- the name the CLI calls
  """The human-readable report (per device, per train step)."""
  r = report
  xla = ('XLA cost_analysis (counts each loop body once, so not used): '
         f'{r.xla_flops:.4g} FLOPs, {r.xla_bytes / GiB:.2f} GiB' if r.xla_flops else
         'XLA cost_analysis: ' + ('not compiled' if r.compile_error else 'none on this platform'))
  in_slice = ' (inside each slice)' if r.slices > 1 else ''
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
      f'  HBM traffic       {r.hbm_traffic_bytes / GiB:.2f} GiB  (' + (
          'jaxpr estimate: not compiled' if r.compile_error else 'compiled HLO: instructions\' '
          'operands and results in HBM, loops expanded') + f'; jaxpr matmul estimate '
      f'{r.jaxpr_hbm_bytes / GiB:.2f} GiB)',
      *[f'    biggest: {op} {shape} x runs = {b / GiB:.3g} GiB  ({name or "?"})'
        for b, op, shape, name in r.biggest_hbm[:3] if b],
      f'  {xla}',
      '  collectives       ' + _collectives(r, r.collectives) + in_slice,
      *[f'    biggest: {op} {shape} x runs = {b / GiB:.3g} GiB  ({name or "?"})'
        for b, op, shape, name in r.biggest_collectives if b],
      *([f'  cross-slice (DCN) {_collectives(r, r.dcn_collectives)}',
         *[f'    biggest: {op} {shape} x runs = {b / GiB:.3g} GiB  ({name or "?"})'
           for b, op, shape, name in r.biggest_dcn if b]] if r.slices > 1 else []),
      f'roofline    per device {r.peak_flops / 1e12:.0f} TFLOP/s, HBM {r.hbm_bytes_per_s / 1e9:.0f} '
      f'GB/s, links {r.link_bytes_per_s / 1e9:.0f} GB/s'
      + (f', DCN {r.dcn_bytes_per_s / 1e9:.2f} GB/s' if r.slices > 1 else '')
      + f': compute {r.compute_time_s * 1e3:.1f} ms, HBM {r.memory_time_s * 1e3:.1f} ms, '
      f'communication {r.comm_time_s * 1e3:.1f} ms'
      + (f', DCN {r.dcn_time_s * 1e3:.1f} ms' if r.slices > 1 else ''),
      f'  step time >= {r.step_time_s * 1e3:.1f} ms ({r.bound}-bound, perfect overlap), '
      f'implied MFU <= {100 * r.mfu:.1f}%',
      f'compile     trace {r.trace_s:.1f} s, lower {r.lower_s:.1f} s, compile {r.compile_s:.1f} s',
  ]
  lines += [f'note        {n}' for n in r.notes]
  if r.compile_error:
    lines.append(f'XLA         {r.compile_error}')
  lines.append(verdict(r))
  return '\n'.join(lines)


def _collectives(r: Report, stats: dict) -> str:
  if r.compile_error:
    return 'unknown (not compiled)'
  return '; '.join(
      f'{op} {v["ops"]} ops x{v["runs"] / v["ops"]:.3g} runs = {v["bytes"] / GiB:.3g} GiB'
      for op, v in stats.items() if v['ops']) or 'none'


def verdict(r: Report) -> str:
  if r.fits:
    return f'fits: peak {r.peak_bytes / GiB:.2f} GiB <= {r.hbm_bytes / GiB:.1f} GiB HBM per device'
  at_least = 'at least ' if r.compile_error else ''
  return (f'does not fit: peak {at_least}{r.peak_bytes / GiB:.2f} GiB > '
          f'{r.hbm_bytes / GiB:.1f} GiB HBM per device'
          + (' (the compiler refused: see XLA above)' if r.compile_error else ''))


def to_json(report: Report) -> dict:
  """The report's fields plus the derived figures (fits, times, MFU)."""
  out = dataclasses.asdict(report)
  out.update(fits=report.fits, compute_time_s=report.compute_time_s,
             memory_time_s=report.memory_time_s, comm_time_s=report.comm_time_s,
             dcn_time_s=report.dcn_time_s,
             bound=report.bound, step_time_s=report.step_time_s, mfu=report.mfu)
  return out


def main(args, overrides=()) -> int:
  """``unifer compile-check``: 0 fits, 1 does not fit, 2 bad input (topology, config).

  ``args``: --config, --topology, --num_slices, --hbm_gib, --hlo, --json (see
  unifer_jax/cli.py);
  ``overrides``: ['--config.key=value', ...].
  """
  try:
    resolve_topology(args.topology, args.num_slices)
  except ValueError as e:
    print(f'unifer compile-check: {e}', file=sys.stderr)
    return 2
  config = config_lib.load(args.config, overrides)
  try:
    report = run(config, args.topology, num_slices=args.num_slices, hbm_gib=args.hbm_gib,
                 hlo_path=args.hlo,
                 log=lambda s: print(f'[compile-check] {s}', file=sys.stderr, flush=True))
  except ValueError as e:  # a topology libtpu lacks, no GPU plugin, batch vs mesh, ...
    print(f'unifer compile-check: {e}', file=sys.stderr)
    return 2
  print(format(report), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(to_json(report), f, indent=2)
  if not report.fits:
    print(f'unifer compile-check: {verdict(report)} on {report.target}', file=sys.stderr)
    return 1
  return 0

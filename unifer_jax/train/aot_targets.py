"""AOT compile targets: TPU and GPU topologies without the hardware, and chip figures.

``resolve_topology('v5p-128')`` maps a product name (or an explicit ``v5p:4x4x4``, or a
GPU ``h100x8``) to a :class:`Target`; ``topology_devices(target)`` makes its devices with
``jax.experimental.topologies`` (libtpu for TPU; the CUDA PJRT plugin, installed without
CUDA libraries as the ``gpu-aot`` extra, for GPU). Nothing can run on those devices;
``jax.jit(...).lower(...).compile()`` for them works. Used by ``unifer compile-check``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from unifer_jax.train import metrics as metrics_lib

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip (published figures): HBM (GiB), HBM bandwidth and chip-to-chip
  bandwidth (bytes/s; ICI on TPU, NVLink one way on H100), the chip's share of its host's
  data-centre network (DCN, between slices / hosts), and how many JAX devices it shows
  (TPU7x: 2 TensorCores as 2 devices). Peak bf16 FLOP/s per chip come from
  ``metrics.PEAK_FLOPS`` (the table MFU uses in training)."""
  name: str
  hbm_gib: float
  hbm_bytes_per_s: float
  link_bytes_per_s: float
  peak_key: str  # key of metrics.PEAK_FLOPS
  dcn_bytes_per_s: float
  devices_per_chip: int = 1

  def per_device(self) -> tuple[float, float, float, float]:
    """(HBM bytes, HBM bytes/s, link bytes/s, peak FLOP/s) of one device."""
    n = self.devices_per_chip
    return (self.hbm_gib * GiB / n, self.hbm_bytes_per_s / n, self.link_bytes_per_s / n,
            metrics_lib.PEAK_FLOPS[self.peak_key] / n)


# DCN per chip: v5p 50 Gbps (Cloud's v5p page); v5e 25 Gbps (6.4 Tbps per 256-chip pod, 2 x
# 100 Gbps NICs per 8-chip host); v4, v6e and TPU7x publish none per chip: v5e's figure is
# assumed (a lower bound for the newer chips). H100: one 400 Gb/s NIC per GPU (DGX H100).
V5E_DCN = 25e9 / 8
CHIPS = {
    'v4': Chip('TPU v4', 32, 1228e9, 300e9, 'tpu v4', V5E_DCN),
    'v5e': Chip('TPU v5e', 16, 819e9, 200e9, 'tpu v5e', V5E_DCN),
    'v5p': Chip('TPU v5p', 95, 2765e9, 600e9, 'tpu v5p', 50e9 / 8),
    'v6e': Chip('TPU v6e', 32, 1640e9, 448e9, 'tpu v6e', V5E_DCN),
    'tpu7x': Chip('TPU7x', 192, 7380e9, 1200e9, 'tpu7x', V5E_DCN, devices_per_chip=2),
    'h100': Chip('NVIDIA H100 SXM 80GB', 80, 3350e9, 450e9, 'nvidia h100', 400e9 / 8),
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
  chips: int       # per slice
  slices: int = 1  # TPU multislice: this many copies of the slice, joined by the DCN

  def describe(self) -> str:
    if self.platform == 'tpu' and self.slices > 1:
      return (f'{self.slices} x {self.name} = {self.slices} x {self.topology} '
              f'({self.slices * self.chips} chips over DCN)')
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


def resolve_topology(name: str, num_slices: int = 1) -> Target:
  """``--topology`` (x ``--num_slices``) -> Target; a ValueError listing the known names
  otherwise."""
  target = _resolve_one(name)
  if num_slices < 1:
    raise ValueError(f'--num_slices {num_slices}: expected 1 or more')
  if num_slices > 1 and target.platform != 'tpu':
    raise ValueError(f'--num_slices {num_slices}: multislice is a TPU topology; GPU hosts are '
                     f'given by the GPU count (h100x16 = 2 hosts), their DCN axes by '
                     f'config.mesh.dcn')
  return dataclasses.replace(target, slices=num_slices)


def _resolve_one(name: str) -> Target:
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
    if target.slices > 1:
      kwargs['num_slices'] = target.slices
    try:
      topo = topologies.get_topology_desc(platform='tpu', topology_name=target.topology,
                                          **kwargs)
    except Exception as e:  # e.g. a shape libtpu has no slice for
      raise ValueError(f'--topology {target.name}: libtpu cannot make {target.topology}: '
                       f'{str(e).splitlines()[0]}. Known: {KNOWN_TOPOLOGIES}') from e
  else:
    os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
    try:
      topo = topologies.get_topology_desc(
          platform='cuda', target_config=GPU_TARGET_CONFIGS[target.chip],
          topology=target.topology)
    except Exception as e:  # the plugin is an optional install
      raise ValueError(f'--topology {target.name}: GPU AOT compilation needs the CUDA PJRT '
                         f'plugin without CUDA libraries: pip install -e ".[gpu-aot]" '
                         f'({type(e).__name__}: {e})') from e
  return list(topo.devices)

"""Checkpoint save speed, seconds per GB, with 1 and 2 processes (issue 31, item 5).

  python benchmarks/checkpoint_save.py [--llm_depth 3] [--saves 3] [--mesh fsdp|data]
      [--dir DIR]

Measured in ONE run, the same global mesh of 8 CPU devices each time:

1. one process with 8 devices;
2. two processes with 4 devices each (``launch/local.py -n 2``), writing into one
   directory as the hosts of a pod write into one bucket.

Each saves the train state (parameters + AdamW moments) of the ``demo`` preset with a
1024-wide LLM of 32k vocabulary (``--llm_depth`` layers; 3: 80M parameters, 0.96 GB of
state, 205 arrays), sharded by the trainer's own
``train/state.build`` on ``config.mesh`` (``fsdp``: every weight split over the 8
devices, the pod configs' layout; ``data``: replicated, the CPU configs' layout), with
the trainer's own ``train/checkpoint.Checkpointer`` (orbax CheckpointManager, async
saves as in training). Per save: the seconds the train loop is blocked (``save()``) and
the seconds until the checkpoint is committed (``save()`` + ``wait()``); the first save
(orbax's warm-up) is printed apart from the median of the others. Prints seconds per GB
and the ratio 2 processes / 1 process; asserts nothing.

What was ours, and fixed (train/checkpoint.py):
* replica-parallel saving was on in one process too, and for every replicated leaf:
  orbax sliced each into one piece per device -- ~1200 eager slices of ~100 distinct
  shapes, each compiled on the first save (9-40 s of it), and the slices copied and
  written one by one on every save. Now it is on only across processes, and only for
  slices of >= 4 MiB (``checkpoint.MIN_SLICE_BYTES``); smaller arrays are written whole by
  replica 0.
* the pre-save finiteness check compiled for 4.7 s (one isfinite().all() per leaf):
  now one sum of ``x * 0`` per leaf, 2.1 s.
Not ours, and left: the 2-process saves block ~1.3-1.5x longer than the 1-process ones
(orbax's 8 device barriers per save and the cross-process finiteness check wait for the
slower process), while committing ~20 % faster (the two write in parallel).

Today's figures (2026-12-07, the shared 2-core box at load 10-12, `--saves 4`; s/GB are
medians of saves 2-4), before -> after the fixes, same hour:

| mesh | processes | first save blocked / committed (s) | blocked s/GB | committed s/GB |
|---|---|---|---|---|
| fsdp | 1 | 16.1 / 20.5 -> 1.8 / 4.4 | 0.54 -> 0.23 | 4.52 -> 3.24 |
| fsdp | 2 | 14.5 / 16.9 -> 2.6 / 4.8 | 0.88 -> 0.31 | 3.13 -> 2.68 |
| data | 1 | 17.8 / 20.8 -> 3.3 / 6.3 | 2.29 -> 1.09 | 5.45 -> 3.71 |
| data | 2 | 18.8 / 20.8 -> 3.8 / 5.3 | 1.73 -> 1.63 | 3.74 -> 3.02 |

Ratios 2 processes / 1 process after: fsdp blocked 1.33x, committed 0.83x; data blocked
1.49x, committed 0.81x. (An earlier run at load 19, before: the data mesh's first save
blocked 46 s in one process.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DEVICES = 8


# ---- one measurement (a child process; one of several under launch/local.py) ---------

def config_for(llm_depth: int, mesh: str):
  from unifer_jax import config_lib  # pylint: disable=g-import-not-at-top
  from unifer_jax.models import presets  # pylint: disable=g-import-not-at-top
  c = config_lib.load(os.path.join(REPO, 'configs/smoke.py:demo'))
  model = presets.get('demo')
  model.llm.update(vocab_size=32000, hidden=1024, heads=16, kv_heads=4, head_dim=64,
                   mlp_dim=4096, depth=llm_depth)
  with c.ignore_type():   # a preset name -> a full model config
    c.model = model
  c.mesh = dict(data=1, fsdp=-1, tensor=1) if mesh == 'fsdp' else dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint.replica_parallel = True
  return c


def measure(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unifer_jax import distributed, sharding  # pylint: disable=g-import-not-at-top
  from unifer_jax.train import checkpoint as ckpt_lib, state as state_lib  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  config = config_for(args.llm_depth, args.mesh)
  setup = state_lib.build(config, sharding.make_mesh(config.mesh))
  state = setup.init_state()
  jax.block_until_ready(state)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  params = sum(x.size for x in jax.tree.leaves(state['params']))
  ckpt = ckpt_lib.Checkpointer(os.path.join(args.dir, 'checkpoints'), config.checkpoint)
  blocked, committed = [], []
  for step in range(1, args.saves + 1):
    t = time.perf_counter()
    ckpt.save(step, state, {'input': {}}, {}, force=True)
    blocked.append(time.perf_counter() - t)
    ckpt.wait()
    committed.append(time.perf_counter() - t)
  ckpt.close()
  if jax.process_index() == 0:
    print('RESULT ' + json.dumps(dict(
        processes=jax.process_count(), devices=jax.device_count(), gb=nbytes / 1e9,
        params_m=params / 1e6, leaves=len(jax.tree.leaves(state)), blocked=blocked,
        committed=committed, files=_files(os.path.join(args.dir, 'checkpoints'), args.saves))),
        flush=True)


def _files(directory: str, step: int) -> int:
  return sum(len(files) for _, _, files in os.walk(os.path.join(directory, str(step))))


# ---- the driver ----------------------------------------------------------------------

def run(processes: int, args) -> dict:
  work = tempfile.mkdtemp(prefix=f'ckpt_{processes}p_', dir=args.dir)
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={DEVICES}']))
  child = [sys.executable, os.path.abspath(__file__), '--child', '--dir', work,
           '--llm_depth', str(args.llm_depth), '--saves', str(args.saves), '--mesh', args.mesh]
  if processes > 1:
    child = [sys.executable, os.path.join(REPO, 'launch', 'local.py'), '-n', str(processes),
             '--devices', str(DEVICES), '--'] + child
  try:
    done = subprocess.run(child, env=env, capture_output=True, text=True, timeout=1800)
    lines = [l for l in done.stdout.splitlines() if 'RESULT ' in l]
    if done.returncode or not lines:
      raise RuntimeError(f'{processes} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}')
    return json.loads(lines[0].split('RESULT ', 1)[1])
  finally:
    shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--llm_depth', type=int, default=3,
                 help='LLM layers (15M parameters each; 3: an 80M-parameter model, 0.96 GB)')
  p.add_argument('--saves', type=int, default=3, help='saves per run (the first is warm-up)')
  p.add_argument('--mesh', choices=('fsdp', 'data'), default='fsdp')
  p.add_argument('--dir', default=None, help='scratch folder (default: a new one under /tmp)')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    measure(args)
    return 0
  args.dir = tempfile.mkdtemp(prefix='checkpoint_save_', dir=args.dir)
  try:
    results = {n: run(n, args) for n in (1, 2)}
  finally:
    shutil.rmtree(args.dir, ignore_errors=True)
  one = results[1]
  print(f'state: {one["params_m"]:.1f}M parameters + AdamW moments = {one["gb"]:.3f} GB in '
        f'{one["leaves"]} arrays, mesh {args.mesh} over {DEVICES} CPU devices; load '
        f'{os.getloadavg()[0]:.1f}')
  rows = {}
  for n, r in results.items():
    steady = lambda xs: statistics.median(xs[1:]) if len(xs) > 1 else xs[0]
    rows[n] = {k: steady(r[k]) / r['gb'] for k in ('blocked', 'committed')}
    print(f'{n} process(es) x {r["devices"] // n} devices: first save blocked '
          f'{r["blocked"][0]:.2f} s, committed {r["committed"][0]:.2f} s; '
          f'then blocked {rows[n]["blocked"]:.2f} s/GB, committed {rows[n]["committed"]:.2f} s/GB '
          f'({r["files"]} files per checkpoint)')
  for k in ('blocked', 'committed'):
    print(f'ratio 2 processes / 1 process, {k}: {rows[2][k] / rows[1][k]:.2f}x')
  return 0


if __name__ == '__main__':
  sys.exit(main())

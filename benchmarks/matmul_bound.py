"""How fast could the train step go on this CPU? A bound from its matmuls alone.

  python benchmarks/matmul_bound.py [--dims demo|reference|tiny] [--top 12]

The step is made of SMALL matmuls -- [32*32, 192] x [192, 768] and the like -- and a CPU
runs those well below its big-matmul rate. This script takes every dot_general and
convolution of the real traced train step (the build of benchmarks/train_step.py:
``train/state.build`` + ``train/step.compile_step``, scan bodies times their trip count,
the loss's target switch at the branch the benchmark's batch takes), groups them by
shapes and parameters, and times each group ALONE as a jitted op (best of several runs,
minus the dispatch cost of an empty jitted call measured in the same run). The sum over
the step's matmuls of runs x isolated time is what the step would take if nothing but
its matmuls cost time, each at its own best speed: the step time no fusion can beat with
these shapes on this machine. :func:`measure` is what benchmarks/train_step.py puts next
to its step time; this script prints the shapes that cost the most too.

Asserts nothing. What to expect: see benchmarks/train_step.py's docstring (its table has
the bound of each dims, measured in the same run as the step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from unifer_jax import sharding  # noqa: E402
from unifer_jax.data import inputs  # noqa: E402
from unifer_jax.train import step_cost  # noqa: E402


# ------------------------------------------------------------------ the step's matmuls
def step_matmuls(jaxpr, branches=None) -> tuple[dict, dict, dict]:
  """({key: runs per step}, {key: FLOPs of one run}, {key: the eqn}) over the step's
  dot_generals and convolutions; loops and branches as step_cost counts them. The key is
  the primitive, operand shapes and dtypes and the eqn's parameters."""
  runs, flops, eqns = {}, {}, {}
  for eqn, n in step_cost.matmul_eqns(jaxpr, branches):
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    key = (eqn.primitive.name, lhs.shape, str(lhs.dtype), rhs.shape, str(rhs.dtype),
           repr(sorted(eqn.params.items())))
    runs[key] = runs.get(key, 0) + n
    flops[key], eqns[key] = step_cost.eqn_flops(eqn), eqn
  return runs, flops, eqns


# ------------------------------------------------------------------ timing one shape
def best_seconds(fn, args, iters: int = 9) -> float:
  """Best wall seconds of fn(*args) over ``iters`` runs after a warm-up (fn is jitted):
  the op's own speed, with the other users of a shared machine least in the way."""
  jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - t)
  return min(runs)


def isolated_seconds(eqn, rng) -> float:
  """The eqn's matmul or convolution alone, jitted, on random operands of its shapes."""
  lhs, rhs = (jnp.asarray(rng.standard_normal(v.aval.shape), v.aval.dtype)
              for v in eqn.invars[:2])
  params = eqn.primitive.get_bind_params(eqn.params)
  fn = jax.jit(lambda a, b: eqn.primitive.bind(a, b, **params))
  return best_seconds(fn, (lhs, rhs))


# ------------------------------------------------------------------ the bound
def measure(traced, branches: dict, *, log=print) -> dict:
  """The matmul-only bound of a traced train step (``step_cost.trace_step``), the loss's
  target switch at ``branches`` (``step_cost.taken_branches`` of a real batch).

  Returns ``bound_s`` (every matmul at its isolated speed, dispatch removed),
  ``with_dispatch_s``, ``flops`` (their FLOPs), ``matmuls`` / ``shapes`` (counts),
  ``dispatch_s`` and ``rows``: (key, runs, FLOPs of one run, isolated s, net s)."""
  matmuls, flops_of, eqns = step_matmuls(traced.jaxpr, branches)
  dispatch = best_seconds(jax.jit(lambda a: a), (jnp.zeros((8,)),), iters=51)
  rng = np.random.default_rng(0)
  rows, start = [], time.monotonic()
  for i, (key, runs) in enumerate(sorted(matmuls.items(), key=lambda kv: -flops_of[kv[0]] * kv[1])):
    raw = isolated_seconds(eqns[key], rng)
    net = max(raw - dispatch, 0.1 * raw)   # what the op costs inside a fused program
    rows.append((key, runs, flops_of[key], raw, net))
    if (i + 1) % 20 == 0:
      eta = (time.monotonic() - start) / (i + 1) * (len(matmuls) - i - 1)
      log(f'  matmul bound: timed {i + 1}/{len(matmuls)} shapes | ETA {eta:.0f} s')
  return dict(bound_s=sum(r * t for _, r, _, _, t in rows),
              with_dispatch_s=sum(r * t for _, r, _, t, _ in rows),
              flops=sum(flops_of[k] * n for k, n in matmuls.items()),
              matmuls=sum(matmuls.values()), shapes=len(matmuls), dispatch_s=dispatch,
              rows=rows)


# ------------------------------------------------------------------ report
def main():
  import train_step  # pylint: disable=g-import-not-at-top  (its dims, batch and peak)
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--dims', choices=list(train_step.DIMS), default='demo')
  ap.add_argument('--top', type=int, default=12, help='costliest shapes to list')
  args = ap.parse_args()
  print(f'jax {jax.__version__}, {os.cpu_count()} CPUs, load average '
        f'{os.getloadavg()[0]:.1f}', flush=True)
  config = train_step.DIMS[args.dims].config()
  batch = train_step.random_batch(config)
  peak = train_step.matmul_peak(jnp.float32, train_step.DIMS[args.dims].peak_n)['gflops']
  mesh = sharding.make_mesh(dict(config.mesh))
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  setup, traced = step_cost.trace_step(config, mesh, spec)
  step_args = (setup.init_state(), inputs.to_global(batch, mesh), jax.random.key(0))
  res = measure(traced, step_cost.taken_branches(traced.jaxpr, step_args))
  print(f'[{args.dims}] {train_step.describe(config)}')
  print(f'{res["matmuls"]} matmuls per step in {res["shapes"]} shapes, '
        f'{res["flops"] / 1e9:.2f} GFLOP; matmul peak f32 {peak:.1f} GFLOP/s; dispatch of an '
        f'empty jitted call {res["dispatch_s"] * 1e6:.0f} us')
  print('\n| op: lhs x rhs (dtype) | runs/step | GFLOP/step | isolated GFLOP/s | % of peak '
        '| share of the bound |')
  print('|---|---|---|---|---|---|')
  for key, runs, flops, _, net in sorted(res['rows'], key=lambda r: -r[1] * r[4])[:args.top]:
    print(f'| {key[0]}: {key[1]} x {key[3]} ({key[2]}) | {runs} | {runs * flops / 1e9:.2f} | '
          f'{flops / net / 1e9:.1f} | {flops / net / 1e9 / peak:.0%} | '
          f'{runs * net / res["bound_s"]:.0%} |')
  print(f'\nmatmuls alone, each at its isolated speed: {res["bound_s"] * 1e3:.0f} ms/step '
        f'({res["with_dispatch_s"] * 1e3:.0f} ms with one dispatch each) -> MFU bound '
        f'{res["flops"] / res["bound_s"] / 1e9 / peak:.1%} of the f32 peak; load average now '
        f'{os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()

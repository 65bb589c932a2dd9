"""How high MFU can the demo train step go on this CPU? An upper bound from its matmuls.

  python benchmarks/matmul_bound.py [--dims demo|reference] [--top 12]

MFU here is the step's matmul FLOP/s over the FLOP/s of one big jitted matmul (2048^3,
benchmarks/train_step.py). But the step is made of SMALL matmuls -- [32*32, 192] x
[192, 768] and the like -- and a CPU runs those well below its big-matmul rate. This
script takes every dot_general of the real traced train step (the same build as
train_step.py: ``train/state.build`` + ``train/step.compile_step``, scan bodies times
their trip count, the loss's target switch at the branch a real batch takes), groups
them by shape, dimension numbers and dtypes, and times each shape ALONE as a jitted op
(median of several runs, minus the dispatch cost of an empty jitted call measured in the
same run). The sum over the step's matmuls of count x isolated time is what the step
would take if nothing but its matmuls cost time, each at its own best speed; FLOPs over
that time, over the big-matmul peak, bounds the MFU any fusion could reach with these
matmul shapes on this machine. Prints the bound and the shapes that cost the most.

Asserts nothing. Measured on the 2-core box, 2026-12-02, load ~1:
* demo dims (49.5 GFLOP, 366 matmuls in 56 shapes): matmuls alone 273 ms/step against a
  321 GFLOP/s peak -> MFU bound 56.6 %; a later run, peak 383 GFLOP/s: 48.9 %. The LLM's 4608 x 192 x 512 projections run at
  the peak, but attention's [288, 144] score matmuls (24-29 %), the rank-16 LoRA weight
  gradients (9 %) and the Q-Former's 2080-row matmuls (50 %) cannot; so 65 % is out of
  reach at these sizes on this CPU whatever the fusion. Our step: 506 ms (26.7 %).
* reference dims (282.5 GFLOP, 554 matmuls): 1527 ms -> bound 71.4 % (peak 259 GFLOP/s
  in that run); our step 2513 ms, MFU 38.8 % (train_step.py --dims reference --no_hf,
  peak 290 GFLOP/s): the other 40 % of the step is non-matmul work (norms, softmax,
  masks, elementwise backward, AdamW), memory-bound on this CPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train_step  # noqa: E402  (its configs, batch and timers: the same step)
from unifer_jax import sharding  # noqa: E402
from unifer_jax.data import inputs  # noqa: E402
from unifer_jax.train import step_cost  # noqa: E402


# ------------------------------------------------------------------ the step's matmuls
def step_matmuls(jaxpr, branches=None) -> tuple[collections.Counter, dict]:
  """({(lhs shape, dtype, rhs shape, dtype, dimension_numbers, preferred dtype): runs per
  step}, {that key: FLOPs of one run}), loops and branches as step_cost counts them."""
  runs, flops = collections.Counter(), {}
  for eqn, n in step_cost.matmul_eqns(jaxpr, branches):
    if eqn.primitive.name != 'dot_general':
      continue   # the UniFER step has no convolutions (patch embedding is a reshape + dot)
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    key = (lhs.shape, str(lhs.dtype), rhs.shape, str(rhs.dtype),
           eqn.params['dimension_numbers'], str(eqn.params.get('preferred_element_type')))
    runs[key] += n
    flops[key] = step_cost.eqn_flops(eqn)
  return runs, flops


# ------------------------------------------------------------------ timing one shape
def best_seconds(fn, args, iters: int = 9) -> float:
  """Median wall seconds of fn(*args) after a warm-up (fn is jitted)."""
  jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - t)
  return float(np.median(runs))


def isolated_seconds(key, rng) -> float:
  lhs_shape, lhs_dtype, rhs_shape, rhs_dtype, dims, preferred = key
  lhs = jnp.asarray(rng.standard_normal(lhs_shape), lhs_dtype)
  rhs = jnp.asarray(rng.standard_normal(rhs_shape), rhs_dtype)
  out_dtype = None if preferred == 'None' else jnp.dtype(preferred)
  fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype))
  return best_seconds(fn, (lhs, rhs))


# ------------------------------------------------------------------ report
def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--dims', choices=list(train_step.CONFIGS), default='demo')
  ap.add_argument('--top', type=int, default=12, help='costliest shapes to list')
  args = ap.parse_args()
  print(f'jax {jax.__version__}, {os.cpu_count()} CPUs, load average '
        f'{os.getloadavg()[0]:.1f}', flush=True)

  config = train_step.CONFIGS[args.dims]()
  mesh = sharding.make_mesh(dict(config.mesh))
  batch = train_step.random_batch(train_step.state_lib.model_config(config))
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  setup, traced = step_cost.trace_step(config, mesh, spec)
  state = setup.init_state()
  branches = step_cost.taken_branches(traced.jaxpr, (state, inputs.to_global(batch, mesh),
                                                     jax.random.key(0)))
  matmuls, flops_of = step_matmuls(traced.jaxpr, branches)
  total_flops = sum(flops_of[k] * n for k, n in matmuls.items())
  counted = step_cost.step_flops(config, mesh, spec, traced=traced,
                                 args=(state, inputs.to_global(batch, mesh), jax.random.key(0)))
  print(f'[{args.dims}] {train_step.describe(setup.model_cfg)}')
  print(f'{sum(matmuls.values())} matmuls per step in {len(matmuls)} shapes, '
        f'{total_flops / 1e9:.2f} GFLOP (step_cost: {counted.model_flops / 1e9:.2f})', flush=True)

  peak, _ = train_step.matmul_peak(jnp.float32)
  empty = jax.jit(lambda a: a)
  dispatch = best_seconds(empty, (jnp.zeros((8,)),), iters=51)
  print(f'matmul peak f32 {peak:.1f} GFLOP/s (2048^3); dispatch of an empty jitted call '
        f'{dispatch * 1e6:.0f} us', flush=True)

  rng = np.random.default_rng(0)
  rows, start = [], time.monotonic()
  for i, (key, runs) in enumerate(sorted(matmuls.items(), key=lambda kv: -flops_of[kv[0]] * kv[1])):
    raw = isolated_seconds(key, rng)
    net = max(raw - dispatch, 0.1 * raw)   # what the op costs inside a fused program
    rows.append((key, runs, flops_of[key], raw, net))
    if (i + 1) % 10 == 0 or i + 1 == len(matmuls):
      eta = (time.monotonic() - start) / (i + 1) * (len(matmuls) - i - 1)
      print(f'  timed {i + 1}/{len(matmuls)} shapes | ETA {eta:.0f} s', flush=True)

  raw_s = sum(r * t for _, r, _, t, _ in rows)
  net_s = sum(r * t for _, r, _, _, t in rows)
  print('\n| lhs x rhs (dtype), contracting dims | runs/step | GFLOP/step | isolated GFLOP/s '
        '| % of peak | share of the bound time |')
  print('|---|---|---|---|---|---|')
  for key, runs, flops, _, net in sorted(rows, key=lambda r: -r[1] * r[4])[:args.top]:
    print(f'| {key[0]} x {key[2]} ({key[1]}), {key[4][0]} | {runs} | {runs * flops / 1e9:.2f} | '
          f'{flops / net / 1e9:.1f} | {flops / net / 1e9 / peak:.0%} | '
          f'{runs * net / net_s:.0%} |')
  print(f'\nmatmuls alone, each at its isolated speed: {net_s * 1e3:.0f} ms/step '
        f'({raw_s * 1e3:.0f} ms with one dispatch each)')
  print(f'MFU upper bound: {total_flops / net_s / 1e9 / peak:.1%} of the f32 peak '
        f'({total_flops / raw_s / 1e9 / peak:.1%} with dispatch); goal >= 65 %; load '
        f'average now {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()

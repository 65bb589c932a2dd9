"""Input pipeline throughput vs what the demo train step consumes.

  python benchmarks/data_pipeline.py [--data_dir DIR] [--size 1200] [--workers 0 1 2]

Builds (or reuses) a synthetic_faces corpus at 112 px (the demo corpus's size) and a
2048-token BPE on it, then measures, in one run:

1. the training pipeline alone: `instruct` format (decode 112 px PNG -> random resized
   crop to 64 px, flip, colour jitter, occlusion; template; tokenise; pad to seq_len),
   global batch 32, with 0, 1 and 2 grain worker processes -- images/s over `--batches`
   batches after a warm-up (worker start-up excluded);
2. the demo preset's train step on a batch of the same shape (image [32,64,64,3], tokens
   [32,seq_len]) with the `generate` loss, built by the trainer's own pieces
   (train/state.build + step.compile_step), with configs/generate.py's freeze when that
   file exists -- images/s after compile and a warm-up step;
3. the ratio pipeline / step (target >= 3: the input must not be the bottleneck), and
   the step fed by the pipeline (the real loop's pattern: next batch, then step) vs the
   step alone, which shows the contention on this 2-core box;
4. the `eval` format without augmentation (the vision and distill stages) decoded per
   record vs from the decoded-once table (`config.input.cache`, data/memory_table.py):
   this process's CPU ms per batch of 64 and the ratio (the table's one-off build time
   printed apart).

Prints numbers and ratios; asserts nothing. Expected on the 2-core CPU: the pipeline at
several hundred images/s, the step at a few tens, ratio well above 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from data_prep import synthetic_faces as sf  # noqa: E402
from unifer_jax import config_lib, sharding  # noqa: E402
from unifer_jax.data import pipeline, tokenizer as tok_lib  # noqa: E402
from unifer_jax.train import losses, state as state_lib, step as step_lib  # noqa: E402

BATCH, IMAGE = 32, 64


def prepare(data_dir: str, size: int) -> str:
  t = time.perf_counter()
  counts = sf.prepare(data_dir, size=size, seed=0, image_size=112, workers=2, samples=False)
  tok_dir = os.path.join(data_dir, 'tokenizer')
  if not tok_lib.is_tokenizer_dir(tok_dir):
    tok_lib.train_for_datasets(['synthetic_faces'], tok_dir, data_dir=data_dir, vocab_size=2048)
  print(f'corpus {counts.get("train")} train records at 112 px + tokenizer '
        f'({time.perf_counter() - t:.1f} s, reused if present)')
  return tok_dir


def input_config(data_dir, tok_dir, seq_len, workers):
  cfg = pipeline.default_input_config()
  cfg.update(dict(data_dir=data_dir, tokenizer=tok_dir, batch_size=BATCH, seq_len=seq_len,
                  workers=workers))
  return cfg


def pipeline_rate(cfg, toks, batches: int, warmup: int = 3):
  pl = pipeline.Pipeline(cfg, 'instruct', batch_size=BATCH, image_size=IMAGE, shard=(0, 1),
                         tokenizers=toks)
  first = [next(pl) for _ in range(warmup)]   # worker start-up and buffers filling
  t, cpu = time.perf_counter(), time.process_time()
  meta = [{k: next(pl)[k] for k in ('_truncated', '_no_think')} for _ in range(batches)]
  dt, cpu = time.perf_counter() - t, time.process_time() - cpu
  pl.close()
  rates = {k: float(np.mean([m[k] for m in meta])) for k in meta[0]}
  # CPU seconds of this process per image: the whole cost when there are no workers
  # (a load-independent number on a shared machine).
  rates['cpu_ms_per_image'] = 1000 * cpu / (BATCH * batches)
  return BATCH * batches / dt, first, rates


def train_step(seq_len: int):
  """The demo preset's compiled generate-loss step and a function making its batches."""
  path = 'configs/generate.py'
  if os.path.exists(path):
    config = config_lib.load(path + ':demo')
  else:
    config = config_lib.base(model='demo')
    config.stage = 'generate'
  config.input.batch_size = BATCH
  mesh = sharding.make_mesh(dict(config.mesh))
  setup = state_lib.build(config, mesh)
  spec = {'image': jax.ShapeDtypeStruct((BATCH, IMAGE, IMAGE, 3), np.float32),
          'tokens': jax.ShapeDtypeStruct((BATCH, seq_len), np.int32),
          'loss_mask': jax.ShapeDtypeStruct((BATCH, seq_len), np.float32),
          'attention_mask': jax.ShapeDtypeStruct((BATCH, seq_len), np.int32)}
  compiled = step_lib.compile_step(setup, losses.get('generate'), spec)
  state = setup.init_state()
  return compiled, state, mesh, list(spec), config.freeze


def step_rate(compiled, state, batch, iters: int):
  rng = jax.random.key(0)
  state, m = compiled(state, batch, rng)           # compile happened at lower; warm-up
  jax.block_until_ready(m['loss'])
  t = time.perf_counter()
  for _ in range(iters):
    state, m = compiled(state, batch, rng)
  jax.block_until_ready(m['loss'])
  return BATCH * iters / (time.perf_counter() - t), state


def cache_rates(data_dir: str, batches: int, batch: int = 64):
  """CPU ms per `eval` batch, per-record decode vs the decoded-once table."""
  cpu = {}
  for cache in (False, True):
    cfg = pipeline.default_input_config()
    cfg.update(dict(data_dir=data_dir, cache=cache))
    cfg.augment.enabled = False
    t = time.perf_counter()
    pl = pipeline.Pipeline(cfg, 'eval', batch_size=batch, image_size=IMAGE, shard=(0, 1),
                           tokenizers=(None, None))
    next(pl)
    build = time.perf_counter() - t
    c = time.process_time()
    for _ in range(batches):
      next(pl)
    cpu[cache] = 1000 * (time.process_time() - c) / batches
    pl.close()
    print(f'eval format, batch {batch}, cache={cache}: {cpu[cache]:.1f} CPU ms per batch '
          f'(set-up and first batch {build:.1f} s)')
  print(f'ratio per-record / cached CPU per batch: {cpu[False] / cpu[True]:.1f}x')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--data_dir', default='')
  ap.add_argument('--size', type=int, default=1200)
  ap.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  ap.add_argument('--batches', type=int, default=20)
  ap.add_argument('--seq_len', type=int, default=96, help='configs/instruct.py uses 96')
  ap.add_argument('--step_iters', type=int, default=5)
  args = ap.parse_args()
  data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), 'unifer_bench_data')
  tok_dir = prepare(data_dir, args.size)
  print(f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}')

  toks = pipeline.load_tokenizers(input_config(data_dir, tok_dir, args.seq_len, 0), 'instruct')
  rates, firsts = {}, {}
  for w in args.workers:
    cfg = input_config(data_dir, tok_dir, args.seq_len, w)
    rates[w], firsts[w], meta = pipeline_rate(cfg, toks, args.batches)
    print(f'pipeline instruct, batch {BATCH}, {IMAGE} px, seq_len {args.seq_len}, '
          f'{w} worker(s): {rates[w]:7.1f} images/s  (rows cut: {meta["_truncated"]:.1%}, '
          f'CoT rows without think to fit: {meta["_no_think"]:.1%})')
    if w == 0:
      print(f'  in-process CPU cost: {meta["cpu_ms_per_image"]:.2f} ms per image '
            f'= {1000 / meta["cpu_ms_per_image"]:.0f} images per core-second')
  same = all(np.array_equal(a[k], b[k], equal_nan=True) for w in rates for a, b in
             zip(firsts[args.workers[0]], firsts[w]) for k in a)
  print(f'batches identical across worker counts: {same}')

  compiled, state, mesh, keys, freeze = train_step(args.seq_len)
  batch = {k: firsts[args.workers[0]][0][k] for k in keys}
  from unifer_jax.data import inputs  # noqa: E402  pylint: disable=g-import-not-at-top
  device_batch = inputs.to_global(batch, mesh)
  step_ips, state = step_rate(compiled, state, device_batch, args.step_iters)
  print(f'demo train step (generate loss, freeze={freeze!r}): {step_ips:7.1f} images/s '
        f'({BATCH / step_ips * 1000:.0f} ms/step)')
  for w, r in rates.items():
    print(f'ratio pipeline/step, {w} worker(s): {r / step_ips:6.1f}x   (target >= 3x)')

  cache_rates(data_dir, args.batches)

  # The loop's pattern: fetch the next batch, then step, on the same cores.
  for w in (min(args.workers), max(args.workers)):
    cfg = input_config(data_dir, tok_dir, args.seq_len, w)
    pl = pipeline.Pipeline(cfg, 'instruct', batch_size=BATCH, image_size=IMAGE,
                           shard=(0, 1), tokenizers=toks)
    for _ in range(2):
      next(pl)
    rng = jax.random.key(0)
    t = time.perf_counter()
    for _ in range(args.step_iters):
      b = inputs.to_global({k: v for k, v in next(pl).items() if k in keys}, mesh)
      state, m = compiled(state, b, rng)
    jax.block_until_ready(m['loss'])
    fed = BATCH * args.step_iters / (time.perf_counter() - t)
    pl.close()
    print(f'step fed by the pipeline ({w} worker(s)): {fed:7.1f} images/s = '
          f'{fed / step_ips:.2f} of the step alone')


if __name__ == '__main__':
  main()

"""Input pipeline throughput vs what the demo train step consumes.

  python benchmarks/data_pipeline.py [--data_dir DIR] [--size 1200] [--workers 0 1 2]
      [--sections pipeline packing] [--demo_workdir W]

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

5. packing (``config.input.pack``, data/packing.py) for instruct at the demo preset
   (configs/instruct.py:demo: 16 queries + seq_len 112, the LLM tuned in full): the
   unpacked batch (32 rows of 128 positions) against the packed one (16 rows of 256 =
   the same 4096 LLM positions, 4 image slots a row) -- over ``--batches`` batches the
   real / padded positions (real = text + the image queries' slots; and text alone),
   examples per batch, and the trainer's compiled instruct step on each, timed in turns
   (the two steps alternate, so the load of a shared box hits both alike): real text
   tokens per second of step, packed / unpacked. ``--demo_workdir W`` reads the corpus
   and tokenizer of a finished demo (read only) instead of the benchmark's own;
   ``--pack_stages instruct lm generate`` measures those stages the same way (packed:
   half the rows at twice the length).

Prints numbers and ratios; asserts nothing. Expected on the 2-core CPU: the pipeline at
several hundred images/s, the step at a few tens, ratio well above 3.

Packing today (2026-12-07, 2-core AMD EPYC, a demo workdir's corpus and tokenizer,
``--sections packing --pack_stages instruct lm generate --batches 10 --step_iters 6``;
load 5-12 from other jobs, so steps are best of 6 taken in turns):
| stage | rows x positions | examples / batch | real / positions | text tokens/s |
| instruct unpacked | 32 x 128 | 32 | 60.5 % (text 48.0 %) | 1210 (step 1625 ms) |
| instruct packed | 16 x 256 | 48.9 | 93.0 % (text 73.9 %) | 1486 (step 2037 ms): 1.23x |
| lm unpacked / packed | 32 x 96 / 16 x 192 | 32 / 70.6 | 41.6 / 95.4 % | 2.08x (step 1.10x) |
| generate unpacked / packed | 32 x 64 / 16 x 128 | 32 / 45.5 | 64.3 / 91.7 % | 0.88x (step 1.63x) |
Instruct's step costs 1.25x at the same 4096 positions: 1.13x for the rows' 256 keys
(measured with 2 image slots a row, 32 images either way) and the rest for 64 image
slots instead of 32 -- 17 of them the images of the extra examples (real work), 15
empty. With the frozen ViT and the trained Q-Former run per example, even a packer with
no overhead would reach only ~1.45x text tokens/s at these dims; generate, whose LLM is
frozen, is bound by its image path and loses. Packing stays off in the demo's configs
until the demo's figures are checked with it (lm would gain 2x).
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
from unifer_jax.data import inputs, pipeline, tfds_input, tokenizer as tok_lib  # noqa: E402
from unifer_jax.models import interleave  # noqa: E402
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


def packed_config(stage: str, data_dir: str, tok_dir: str, pack: bool):
  """configs/STAGE.py:demo on this corpus; packed: half the rows at twice the length (the
  unpacked batch's LLM positions), 4 image slots a row."""
  config = config_lib.load(f'configs/{stage}.py:demo')
  config.input.update(data_dir=data_dir, tokenizer=tok_dir, pack=pack)
  if pack:
    config.input.update(batch_size=config.input.batch_size // 2, images_per_row=4)
  return config


def packing_rates(stage: str, data_dir: str, tok_dir: str, batches: int, iters: int):
  """Section 5 of the docstring: real / padded positions and the step's text tokens/s
  of a stage at the demo preset, packed vs not."""
  runs = {}
  for pack in (False, True):
    config = packed_config(stage, data_dir, tok_dir, pack)
    data = tfds_input.TfdsInput(config, config.model)
    slot = interleave.placeholder_id(config.model)
    q = config.model.qformer.num_queries if stage != 'lm' else 0
    rows = [data.next_local_batch() for _ in range(batches)]
    text = sum(int(((b['attention_mask'] > 0) & (b['tokens'] != slot)).sum()) for b in rows)
    # Unpacked image rows carry their image's Q queries in front of the tokens.
    images = sum(int(b['image_mask'].sum()) if pack and q else len(b['tokens']) for b in rows)
    positions = sum(b['tokens'].size + (0 if pack else q * len(b['tokens'])) for b in rows)
    examples = sum(int(b['segment_ids'].max(1).sum()) if pack else len(b['tokens'])
                   for b in rows)
    mesh = sharding.make_mesh(dict(config.mesh))
    setup = state_lib.build(config, mesh)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in rows[0].items()}
    compiled = step_lib.compile_step(setup, losses.get(stage), spec)
    runs[pack] = dict(text=text / batches, examples=examples / batches,
                      real=(text + q * images) / positions, text_frac=text / positions,
                      compiled=compiled, state=setup.init_state(), times=[],
                      shape=(len(rows[0]['tokens']), rows[0]['tokens'].shape[1] + q * (not pack)),
                      batches=[inputs.to_global(b, mesh) for b in rows[:3]])
  rng = jax.random.key(0)
  for i in range(iters + 1):   # in turns; the first of each is a warm-up
    for r in runs.values():
      t = time.perf_counter()
      r['state'], m = r['compiled'](r['state'], r['batches'][i % 3], rng)
      jax.block_until_ready(m['loss'])
      if i:
        r['times'].append(time.perf_counter() - t)
  print(f'\n| {stage}, demo preset | rows x positions | examples / batch | real / positions '
        '(text + image slots) | text / positions | step ms (best, median) | text tokens/s |')
  print('|---|---|---|---|---|---|---|')
  for pack, r in runs.items():
    best = min(r['times'])
    r['tps'] = r['text'] / best
    print(f'| {"packed" if pack else "unpacked"} | {r["shape"][0]} x {r["shape"][1]} | '
          f'{r["examples"]:.1f} | {r["real"]:.1%} | {r["text_frac"]:.1%} | {best * 1e3:.0f}, '
          f'{np.median(r["times"]) * 1e3:.0f} | {r["tps"]:.0f} |')
  print(f'{stage} packed / unpacked: real positions {runs[True]["real"] / runs[False]["real"]:.2f}x'
        f', text tokens per second of step {runs[True]["tps"] / runs[False]["tps"]:.2f}x, step '
        f'time {min(runs[True]["times"]) / min(runs[False]["times"]):.2f}x (over {batches} '
        f'batches; steps best of {iters}; load average {os.getloadavg()[0]:.1f})', flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--data_dir', default='')
  ap.add_argument('--size', type=int, default=1200)
  ap.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  ap.add_argument('--batches', type=int, default=20)
  ap.add_argument('--seq_len', type=int, default=96, help='configs/instruct.py uses 96')
  ap.add_argument('--step_iters', type=int, default=5)
  ap.add_argument('--sections', nargs='+', choices=['pipeline', 'packing'],
                  default=['pipeline', 'packing'])
  ap.add_argument('--pack_stages', nargs='+', choices=['instruct', 'generate', 'lm'],
                  default=['instruct'])
  ap.add_argument('--demo_workdir', default='',
                  help='packing: read W/data and W/tokenizer of a finished demo (read only)')
  args = ap.parse_args()
  print(f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}')
  if args.demo_workdir:
    data_dir = os.path.join(args.demo_workdir, 'data')
    tok_dir = os.path.join(args.demo_workdir, 'tokenizer')
  else:
    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), 'unifer_bench_data')
    tok_dir = prepare(data_dir, args.size)
  if 'pipeline' in args.sections:
    pipeline_sections(args, data_dir, tok_dir)
  if 'packing' in args.sections:
    for stage in args.pack_stages:
      packing_rates(stage, data_dir, tok_dir, args.batches, args.step_iters)


def pipeline_sections(args, data_dir: str, tok_dir: str):
  """Sections 1-4 of the docstring."""
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

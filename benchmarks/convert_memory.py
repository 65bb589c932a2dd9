"""Peak host memory of checkpoint conversion, as a ratio to the checkpoint size.

  python benchmarks/convert_memory.py [--gb 1.1] [--shard-mb 200] [--dir DIR]
  python benchmarks/convert_memory.py --vlm configs/hf/instructblip-vicuna-7b [--dir DIR]

``--vlm CONFIG_DIR``: a random bf16 checkpoint of that whole BLIP-2 / InstructBLIP shape
(InstructBLIP-Vicuna-7B: 7.95 B parameters, 15.8 GB in 8 shards of 2 GB; parts vit 1.97,
qformer 0.37, llm 13.48 GB), converted with `unifer convert from-hf` and back with `to-hf`
in fresh processes, one part at a time (convert/vlm.py). The goal is a peak of about the
largest part plus one shard. Needs ~50 GB of disk and ~20 GB of free memory.
Today (2026-12-07, a loaded 24 GB 2-core box; writing the checkpoint took 695 s):
from-hf peaks at 15.92 GB (net 15.69 GB = 1.00x the largest part + one shard), 270 s;
to-hf peaks at 17.00 GB (net 16.81 GB = 1.08x): the LLM part plus tensorstore's read
buffer of its largest leaf (2.9 GB, the stacked MLP weights), which one restore call
needs whole -- per-layer reads would need layer-sized chunks at save time.

Writes a random bf16 Llama-shaped checkpoint (safetensors shards + index, like HF's
``save_pretrained(max_shard_size=...)``), then in fresh processes (so each peak is its
own): (1) from-hf: ``convert.load_hf`` (numpy reads, one tensor at a time, stacked into
per-parameter [L, ...] buffers); (2) from-hf then to-hf: ``params_to_hf`` into
``write_hf_dir`` shard by shard. Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss``;
the baseline is the RSS after the imports (jax, flax).

Expected: from-hf holds the loaded model once (ratio ~1.0 above baseline; 2.0 would mean
a second copy); to-hf adds about one output shard on top.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def llama_config(target_gb: float) -> dict:
  """A Llama-2-ish shape (hidden 2048, GQA 16:4) with depth chosen to reach target_gb."""
  hidden, heads, kv, mlp, vocab = 2048, 16, 4, 5632, 32000
  head_dim = hidden // heads
  per_layer = hidden * (2 * heads * head_dim + 2 * kv * head_dim + 3 * mlp) + 2 * hidden
  fixed = 2 * vocab * hidden + hidden
  depth = max(1, int(np.ceil((target_gb * 1e9 / 2 - fixed) / per_layer)))
  return dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=vocab,
              hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=depth,
              num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
              hidden_act='silu', max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_parameters=dict(rope_type='default', rope_theta=10000.0),
              tie_word_embeddings=False, dtype='bfloat16')


def write_checkpoint(out: Path, target_gb: float, shard_mb: int) -> int:
  """Random bf16 tensors with HF names, written with safetensors.numpy by write_hf_dir,
  one ~shard_mb shard at a time; returns the total bytes."""
  from unifer_jax.convert import hf_io
  from unifer_jax.convert import llm as convert_llm

  config = llama_config(target_gb)
  cfg = convert_llm.config_from_hf(config)
  rng = np.random.default_rng(0)

  def tensors():
    for name, shape in convert_llm.expected_hf_shapes(cfg).items():
      yield name, (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

  hf_io.write_hf_dir(out, config, tensors(), max_shard_bytes=shard_mb << 20)
  return sum(p.stat().st_size for p in out.glob('*.safetensors'))


def run_phase(phase: str, src: Path, dst: Path) -> dict:
  import jax  # noqa: F401  (imported before the baseline, as a real run would)
  from unifer_jax import convert
  from unifer_jax.convert import hf_io
  from unifer_jax.convert import llm as convert_llm

  base = current_rss_bytes()
  t0 = time.perf_counter()
  model = convert.load_hf(src)
  after_load = peak_rss_bytes()
  result = dict(phase=phase, baseline=base, peak_from_hf=after_load,
                from_hf_s=time.perf_counter() - t0)
  if phase == 'roundtrip':
    t0 = time.perf_counter()
    hf_io.write_hf_dir(dst, convert_llm.hf_config_from(model.cfg),
                       convert_llm.params_to_hf(convert.params_of(model), model.cfg),
                       max_shard_bytes=200 << 20)
    result.update(peak_to_hf=peak_rss_bytes(), to_hf_s=time.perf_counter() - t0)
  return result


def write_vlm_checkpoint(out: Path, config_dir: Path, shard_mb: int) -> tuple[int, dict]:
  """Random bf16 weights in the shape of ``config_dir``'s config.json, written one part at
  a time; returns (total bytes, {part: bytes})."""
  import jax
  from flax import nnx
  from unifer_jax.convert import hf_io, vlm

  hf_config = json.loads((config_dir / 'config.json').read_text())
  cfg = vlm.config_from_hf(hf_config)
  for tower in ('vit', 'qformer', 'llm'):
    cfg[tower].param_dtype = 'bfloat16'
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: vlm.build(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  rng, sizes = np.random.default_rng(0), {}

  def random_like(a):  # filled in slices: a float32 copy of a 1.4 B-element leaf is 5.6 GB
    out = np.empty(a.shape, ml_dtypes.bfloat16)
    flat = out.reshape(-1)
    for start in range(0, flat.size, 1 << 26):
      n = min(1 << 26, flat.size - start)
      flat[start:start + n] = (0.02 * rng.standard_normal(n, np.float32)).astype(flat.dtype)
    return out

  def tensors():
    for part in vlm.PARTS:
      params = jax.tree.map(random_like, abstract[part])
      sizes[part] = sum(x.nbytes for x in jax.tree.leaves(params))
      yield from vlm.part_to_hf(params, cfg, part)
      del params

  hf_io.write_hf_dir(out, vlm.hf_config_from(cfg), tensors(), max_shard_bytes=shard_mb << 20)
  return sum(p.stat().st_size for p in out.glob('*.safetensors')), sizes


def run_vlm_phase(phase: str, scratch: Path) -> dict:
  import jax  # noqa: F401  (imported before the baseline, as a real run would)
  from unifer_jax.convert import commands
  base = current_rss_bytes()
  t0 = time.perf_counter()
  if phase == 'from_hf':
    commands.from_hf(scratch / 'hf', scratch / 'converted')
  else:
    commands.to_hf(scratch / 'converted', scratch / 'roundtrip')
  return dict(phase=phase, baseline=base, peak=peak_rss_bytes(), seconds=time.perf_counter() - t0)


def main_vlm(args, scratch: Path):
  t0 = time.perf_counter()
  size, parts = write_vlm_checkpoint(scratch / 'hf', Path(args.vlm), args.shard_mb)
  shards = len(list((scratch / 'hf').glob('*.safetensors')))
  largest = max(parts.values())
  gb = lambda b: f'{b / 1e9:.2f} GB'
  print(f'checkpoint: {gb(size)} bf16 in {shards} shards of <= {args.shard_mb} MB; parts '
        + ', '.join(f'{k} {gb(v)}' for k, v in parts.items())
        + f' ({time.perf_counter() - t0:.0f} s to write)', flush=True)
  bound = largest + (args.shard_mb << 20)
  for phase in ('from_hf', 'to_hf'):
    out = subprocess.run([sys.executable, __file__, '--phase', f'vlm_{phase}', '--dir',
                          str(scratch)], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    net = r['peak'] - r['baseline']
    print(f'{phase.replace("_", "-")}: peak RSS {gb(r["peak"])} (baseline {gb(r["baseline"])}),'
          f' net {gb(net)} = {net / size:.2f} x the checkpoint, {net / bound:.2f} x (largest '
          f'part + one shard = {gb(bound)}), {r["seconds"]:.0f} s', flush=True)
  shutil.rmtree(scratch / 'converted', ignore_errors=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--gb', type=float, default=1.1, help='checkpoint size (bf16)')
  parser.add_argument('--shard-mb', type=int, default=200)
  parser.add_argument('--dir', default=None, help='scratch dir (default: a temp dir)')
  parser.add_argument('--vlm', default=None, help='a BLIP-2 / InstructBLIP config dir')
  parser.add_argument('--phase', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  scratch = Path(args.dir or tempfile.mkdtemp(prefix='convert_memory_'))
  src, dst = scratch / 'hf', scratch / 'roundtrip'

  if args.phase:  # child process: one measurement, JSON on the last stdout line
    if args.phase.startswith('vlm_'):
      print(json.dumps(run_vlm_phase(args.phase[4:], scratch)))
    else:
      print(json.dumps(run_phase(args.phase, src, dst)))
    return

  try:
    if args.vlm:
      if args.shard_mb == 200:   # the default is for the LLM mode; hub VLMs use ~2 GB shards
        args.shard_mb = 2048
      main_vlm(args, scratch)
      return
    t0 = time.perf_counter()
    size = write_checkpoint(src, args.gb, args.shard_mb)
    shards = len(list(src.glob('*.safetensors')))
    print(f'checkpoint: {size / 1e9:.2f} GB bf16 in {shards} shards '
          f'({time.perf_counter() - t0:.0f} s to write)')
    results = {}
    for phase in ('from_hf', 'roundtrip'):
      out = subprocess.run([sys.executable, __file__, '--phase', phase, '--dir', str(scratch)],
                           check=True, capture_output=True, text=True)
      results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    gb = lambda b: f'{b / 1e9:.2f} GB'
    r = results['from_hf']
    print(f'from-hf: peak RSS {gb(r["peak_from_hf"])} (baseline after imports '
          f'{gb(r["baseline"])}), net {gb(r["peak_from_hf"] - r["baseline"])} = '
          f'{(r["peak_from_hf"] - r["baseline"]) / size:.2f} x checkpoint, '
          f'{r["from_hf_s"]:.1f} s')
    r = results['roundtrip']
    print(f'from-hf + to-hf: peak RSS {gb(r["peak_to_hf"])}, net '
          f'{gb(r["peak_to_hf"] - r["baseline"])} = '
          f'{(r["peak_to_hf"] - r["baseline"]) / size:.2f} x checkpoint '
          f'(to-hf {r["to_hf_s"]:.1f} s, shards of 200 MB)')
    out_size = sum(p.stat().st_size for p in dst.glob('*.safetensors'))
    print(f'written back: {gb(out_size)} in {len(list(dst.glob("*.safetensors")))} shards')
  finally:
    if not args.dir:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()

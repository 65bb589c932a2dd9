"""Peak host memory of LLM checkpoint conversion, as a ratio to the checkpoint size.

  python benchmarks/convert_memory.py [--gb 1.1] [--shard-mb 200] [--dir DIR]

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--gb', type=float, default=1.1, help='checkpoint size (bf16)')
  parser.add_argument('--shard-mb', type=int, default=200)
  parser.add_argument('--dir', default=None, help='scratch dir (default: a temp dir)')
  parser.add_argument('--phase', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  scratch = Path(args.dir or tempfile.mkdtemp(prefix='convert_memory_'))
  src, dst = scratch / 'hf', scratch / 'roundtrip'

  if args.phase:  # child process: one measurement, JSON on the last stdout line
    print(json.dumps(run_phase(args.phase, src, dst)))
    return

  try:
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

"""Metric sinks: ``metrics.jsonl`` + TensorBoard in the workdir, a progress line with ETA.

Only process 0 writes. Values arrive as host numbers (the loop fetches device metrics
once per log interval, never per step). The workdir may be a URL (``gs://BUCKET/run``):
object storage cannot append, so there metrics.jsonl is rewritten whole and TensorBoard's
event file uploaded at most every REMOTE_FLUSH_S and at each checkpoint (the loop calls
``flush`` before saving): after a kill -9 the bucket holds every step up to the newest
checkpoint, and uploads do not hold up every log interval.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import jax

from unifer_jax import workdirs

# Peak dense FLOP/s per device (bf16 for accelerators) used for MFU. CPU has no
# datasheet figure: benchmarks measure a matmul peak in the same run instead.
PEAK_FLOPS = {
    'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5p': 459e12,
    'tpu v5': 459e12, 'tpu v6 lite': 918e12, 'tpu v6e': 918e12, 'tpu7x': 2307e12,
    'nvidia h100': 989e12, 'nvidia h200': 989e12, 'nvidia a100': 312e12, 'nvidia b200': 2250e12,
    'cpu': 245e9,  # a jitted f32 2048^3 matmul on this project's 2-core CI machines
}
REMOTE_FLUSH_S = 30.0   # a URL workdir's metrics.jsonl / TensorBoard uploads, at most this often


def device_peak_flops(device=None) -> float:
  kind = (device or jax.devices()[0]).device_kind.lower()
  for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name) or name in kind:
      return peak
  return PEAK_FLOPS['cpu'] if 'cpu' in kind else float('nan')


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class MetricWriter:

  def __init__(self, workdir: str | Path, total_steps: int, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self.start = time.monotonic()
    self.start_step: int | None = None
    if not enabled:
      return
    workdir = workdirs.path(workdir)
    self.path = workdir / 'metrics.jsonl'
    self.remote = workdirs.is_url(workdir)
    self._flushed = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    self._file = _RewrittenFile(self.path) if self.remote else open(self.path, 'a', buffering=1)
    self._tb = None
    if tensorboard:
      with warnings.catch_warnings():
        # tensorboardX imports google-cloud-storage (its gs:// writer) when installed, which
        # warns about the grpcio that Apache Beam pins (< 1.66).
        warnings.filterwarnings('ignore', message='.*Post-Quantum', category=FutureWarning)
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(workdir / 'tensorboard'), flush_secs=30)

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _py(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def progress(self, step: int, values: dict):
    """One console line: step, loss, throughput, ETA (process 0)."""
    if not self.enabled:
      return
    if self.start_step is None:
      self.start_step, self.start = step, time.monotonic()
    elapsed = time.monotonic() - self.start
    done = step - self.start_step
    eta = elapsed / done * (self.total_steps - step) if done > 0 else float('nan')
    parts = [f'step {step}/{self.total_steps}']
    for key in ('loss', 'lr', 'grad_norm', 'img_per_s', 'mfu'):
      if key in values:
        v = values[key]
        parts.append(f'{key} {v:.3g}' if isinstance(v, float) else f'{key} {v}')
    parts.append(f'elapsed {_fmt_time(elapsed)}')
    parts.append(f'ETA {_fmt_time(eta)}' if eta == eta else 'ETA --')
    print(' | '.join(parts), file=sys.stdout, flush=True)
    if self.remote and time.monotonic() - self._flushed >= REMOTE_FLUSH_S:
      self.flush()

  def flush(self):
    """Everything written so far into the workdir (uploaded, for a URL workdir)."""
    if self.enabled:
      self._flushed = time.monotonic()
      self._file.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


class _RewrittenFile:
  """metrics.jsonl on object storage: the lines so far (a resumed run's included) kept
  here and the whole object written again at each flush."""

  def __init__(self, path):
    self.path = path
    self.text = path.read_text() if path.exists() else ''
    self.dirty = False

  def write(self, s: str):
    self.text += s
    self.dirty = True

  def flush(self):
    if self.dirty:
      self.path.write_text(self.text)
      self.dirty = False

  def close(self):
    self.flush()


def _py(v):
  if hasattr(v, 'item') and getattr(v, 'size', 2) == 1:
    return v.item()
  if hasattr(v, 'tolist'):
    return v.tolist()
  return v

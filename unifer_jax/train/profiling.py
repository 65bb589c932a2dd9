"""``config.profile = dict(start_step=S, num_steps=N)``: a jax.profiler trace of train
steps S .. S+N-1 (1-based, as metrics.jsonl counts them) on process 0.

The trace lands in ``WORKDIR/tensorboard/plugins/profile/<run>/<host>.xplane.pb``, the
layout TensorBoard's profile plugin reads, so ``tensorboard --logdir WORKDIR/tensorboard``
shows it beside the scalars (``xprof`` and Perfetto read the same file). Each step is a
``StepTraceAnnotation``, so the step view splits the trace per step. A URL workdir
(``gs://...``) gets a local trace copied into it when the capture ends.

  unifer train --config configs/smoke.py:tiny --workdir /tmp/prof \\
      --config.profile.start_step=3 --config.profile.num_steps=5

Today (configs/smoke.py:tiny, 2-core CPU): a 16 MB xplane.pb for 5 steps (tests/test_profile.py).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile

import jax

from unifer_jax import workdirs


class Profiler:
  """Starts the trace before step S, stops it after step S+N-1 (or at close)."""

  def __init__(self, cfg, workdir, enabled: bool = True):
    cfg = dict(cfg or {})
    self.start = int(cfg.get('start_step', 0) or 0)
    self.num = int(cfg.get('num_steps', 0) or 0)
    if self.num < 0 or self.start < 0 or (self.num and not self.start):
      raise ValueError(f'config.profile={cfg}: expected start_step >= 1 and num_steps >= 1 '
                       f'(num_steps=0 turns profiling off)')
    self.enabled = enabled and self.num > 0
    self.target = workdirs.path(workdir) / 'tensorboard'
    self.logdir = None   # where jax writes, while tracing

  def step(self, step: int):
    """Context of train step ``step`` (1-based): starts the trace at the first profiled
    step and annotates each profiled one."""
    if not self.enabled or not self.start <= step < self.start + self.num:
      return contextlib.nullcontext()
    if self.logdir is None:
      self.logdir = (tempfile.mkdtemp(prefix='unifer-profile-') if workdirs.is_url(self.target)
                     else str(self.target))
      jax.profiler.start_trace(self.logdir)
    return jax.profiler.StepTraceAnnotation('train', step_num=step)

  def after(self, step: int, state) -> None:
    """After train step ``step``: the last profiled step waits for the device and stops."""
    if self.logdir is not None and step >= self.start + self.num - 1:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.logdir is None:
      return
    jax.profiler.stop_trace()
    if workdirs.is_url(self.target):
      workdirs.copy_tree(self.logdir, self.target)
      shutil.rmtree(self.logdir, ignore_errors=True)
    print(f'profile: steps {self.start}..{self.start + self.num - 1} in '
          f'{self.target}/plugins/profile', flush=True)
    self.logdir, self.enabled = None, False

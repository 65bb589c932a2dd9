"""The train loop: exact resume, kill -9, SIGTERM, corrupt checkpoints, NaN policy,
and 2 processes x 4 devices equal to 1 process x 8 devices.

Subprocess runs use the real `unifer train` command (and launch/local.py); a shared
persistent compilation cache keeps their repeated compiles cheap.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from unifer_jax import config_lib
from unifer_jax.data import inputs as inputs_lib
from unifer_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
UNIFER = [sys.executable, '-m', 'unifer_jax.cli']
STEPS = 20  # the must-show: 20 steps


def _overrides(total=STEPS, every=4, **extra):
  o = {'total_steps': total, 'checkpoint.every_steps': every, 'checkpoint.keep': 3,
       'log_every_steps': 1, 'checkpoint.async_save': False}
  o.update(extra)
  return [f'--config.{k}={v}' for k, v in o.items()]


def _config(**kw):
  return config_lib.load('configs/smoke.py:tiny', _overrides(**kw))


def _losses(workdir) -> dict[int, float]:
  """step -> loss; a step logged twice (before a kill and after resume) must agree."""
  out = {}
  for line in (Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    rec = json.loads(line)
    out[rec['step']] = rec['loss']
  return out


def xla_flags(devices: int) -> str:
  """This process's XLA flags (conftest's: the same compiles, so bit-equal losses) with
  `devices` fake CPU devices."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  return ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])


def _env(cache_dir, devices=8):
  """The environment of a `unifer train` subprocess. Multi-process jobs get a cache_dir of
  their own: reading executables the single-process tests cached hung them at the
  shutdown barrier (seen here) -- a 1 x 8 and a 2 x 4 step have the same cache key, but
  the first was built without cross-process collectives."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(devices),
              JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def _train_cmd(workdir, processes=1, **kw):
  cmd = UNIFER + ['train', '--config', 'configs/smoke.py:tiny', '--workdir', str(workdir)] \
      + _overrides(**kw)
  if processes > 1:
    cmd = [sys.executable, str(REPO / 'launch' / 'local.py'), '-n', str(processes), '--'] + cmd
  return cmd


def _run_until(cmd, env, workdir, step, sig):
  """Starts cmd, sends `sig` once metrics.jsonl has logged `step`; returns the exit code."""
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True)
  metrics = Path(workdir) / 'metrics.jsonl'
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None:
    if metrics.exists() and any(json.loads(l)['step'] >= step
                                for l in metrics.read_text().splitlines() if l.strip()):
      os.killpg(proc.pid, sig)
      break
    time.sleep(0.05)
  out = proc.communicate(timeout=300)[0].decode()
  return proc.returncode, out


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """An uninterrupted in-process run on 1 process x 8 devices: (workdir, last metrics)."""
  workdir = tmp_path_factory.mktemp('reference')
  last = loop.train(_config(), workdir)
  return workdir, last


@pytest.fixture(scope='module')
def reference(reference_run):
  return _losses(reference_run[0])


class _Crash(Exception):
  pass


def _crashing_input(at: int, poison: int | None = None):
  """An input that dies when asked for batch `at` (a crash mid-run, same config) and
  optionally carries a NaN image in batch `poison`."""

  class CrashingInput(inputs_lib.RandomInput):
    def next_local_batch(self):
      position = self.position
      if position == at:
        raise _Crash(f'simulated crash before batch {at}')
      batch = super().next_local_batch()
      if position == poison:
        batch['image'][0, 0, 0, 0] = np.nan
      return batch

  return CrashingInput


@pytest.fixture
def register_input(monkeypatch):
  def register(name, cls):
    monkeypatch.setitem(inputs_lib.INPUTS, name, cls)
  return register


@pytest.fixture(scope='module')
def cache_dir():
  return os.environ['JAX_COMPILATION_CACHE_DIR']  # shared with this process (conftest)


def test_uninterrupted_run_writes_the_workdir_contract(reference_run, reference):
  workdir, last = reference_run
  assert sorted(reference) == list(range(1, STEPS + 1))
  assert reference[STEPS] < reference[1] - 0.3  # it learns the two cycled random batches
  rec = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])
  for key in ('step', 'loss', 'lr', 'grad_norm', 'step_time_s', 'img_per_s', 'tokens_per_s', 'mfu'):
    assert key in rec, key
  assert last['step'] == STEPS
  assert json.loads((workdir / 'config.json').read_text())['total_steps'] == STEPS
  assert list((workdir / 'tensorboard').iterdir())
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == [12, 16, 20]  # every 4 steps, keep 3


def test_resume_continues_exactly(reference, tmp_path, register_input):
  register_input('crash7', _crashing_input(at=7))
  with pytest.raises(_Crash):
    loop.train(_config(**{'input.type': 'crash7'}), tmp_path)
  loop.train(_config(), tmp_path)  # resumes from step 4, the last checkpoint before the crash
  got = _losses(tmp_path)
  for s in range(1, STEPS + 1):
    assert got[s] == reference[s], s


def _sigterm_input(at: int):
  """An input that sends this process SIGTERM when asked for batch `at`."""

  class SigtermInput(inputs_lib.RandomInput):
    def next_local_batch(self):
      if self.position == at:
        os.kill(os.getpid(), signal.SIGTERM)
      return super().next_local_batch()

  return SigtermInput


def test_sigterm_raises_preempted_after_a_clean_save_and_resume_is_exact(
    reference, tmp_path, register_input):
  # Raised, not returned: `unifer demo` chains stages and must not start the next one
  # from a half-trained checkpoint (it did, before Preempted existed).
  register_input('sigterm3', _sigterm_input(at=3))
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.Preempted) as stopped:
    loop.train(_config(**{'input.type': 'sigterm3', 'checkpoint.every_steps': 100}), tmp_path)
  assert stopped.value.step == 4, stopped.value   # the batch being read was still trained on
  assert signal.getsignal(signal.SIGTERM) is handler
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == [4]
  loop.train(_config(), tmp_path)
  got = _losses(tmp_path)
  for s in range(1, STEPS + 1):
    assert got[s] == reference[s], s


def test_a_preempted_demo_exits_nonzero_and_says_how_to_resume(monkeypatch, tmp_path, capsys):
  # The stages are the real loop's business (above); this is the CLI's exit contract.
  from unifer_jax import cli, demo

  asked = []

  def stopped_in_align(workdir, size, video):
    asked.append(video)
    raise loop.Preempted(Path(workdir) / 'align', 40)

  monkeypatch.setattr(demo, 'run', stopped_in_align)
  assert cli.main(['demo', '--workdir', str(tmp_path)]) == 143
  assert 'align: preempted, checkpoint saved at step 40; rerun to resume' in capsys.readouterr().err
  assert cli.main(['demo', '--workdir', str(tmp_path), '--video']) == 143
  assert asked == [False, True]


@pytest.mark.multiprocess
def test_kill9_single_process_resumes_exactly(reference, tmp_path, cache_dir):
  env = _env(cache_dir)
  # Step N is logged before checkpoint N is written, so a kill seen at step 4 can land
  # before the first checkpoint exists; from step 5 on, checkpoint 4 is committed.
  kill_at = random.Random().randint(5, STEPS - 3)
  code, out = _run_until(_train_cmd(tmp_path), env, tmp_path, kill_at, signal.SIGKILL)
  assert code == -signal.SIGKILL, out
  done = subprocess.run(_train_cmd(tmp_path), env=env, cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stdout + done.stderr
  assert 'resumed from checkpoint step' in done.stdout
  got = _losses(tmp_path)
  for s in range(1, STEPS + 1):
    assert got[s] == reference[s], (kill_at, s)


@pytest.mark.multiprocess
def test_sigterm_saves_and_exits_cleanly(tmp_path, cache_dir):
  env = _env(cache_dir)
  code, out = _run_until(_train_cmd(tmp_path, every=100), env, tmp_path, 3, signal.SIGTERM)
  assert code == 0, out
  assert 'preempted (SIGTERM)' in out
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and 3 <= saved[-1] < STEPS


@pytest.mark.multiprocess
def test_two_processes_match_one_and_survive_kill9(reference, tmp_path, capsys):
  # The three 2-process launches share a cache only they write: the 2nd and 3rd load the
  # 1st's executables instead of compiling them again.
  env = _env(tmp_path / 'two_process_jax_cache')
  # 2 processes x 4 devices, uninterrupted: same per-step losses as 1 x 8.
  two = tmp_path / 'two'
  done = subprocess.run(_train_cmd(two, processes=2), env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  got = _losses(two)
  for s in range(1, STEPS + 1):
    assert abs(got[s] - reference[s]) <= 1e-5, s
  # kill -9 at a random step, run the same command again: resumes, same losses.
  killed = tmp_path / 'killed'
  kill_at = random.Random().randint(5, STEPS - 3)  # after checkpoint 4 (for the resume below)
  code, out = _run_until(_train_cmd(killed, processes=2), env, killed, kill_at, signal.SIGKILL)
  assert code != 0, out
  cross = tmp_path / 'cross'
  shutil.copytree(killed, cross)
  done = subprocess.run(_train_cmd(killed, processes=2), env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:]
  got = _losses(killed)
  for s in range(1, STEPS + 1):
    assert abs(got[s] - reference[s]) <= 1e-5, (kill_at, s)
  # The same checkpoints (written by 2 processes x 4 devices) resume under 1 process x 8,
  # here in-process: a 2-process launch is the slowest thing in the suite.
  saved = max(int(p.name) for p in (cross / 'checkpoints').iterdir() if p.name.isdigit())
  loop.train(_config(), cross)
  assert f'resumed from checkpoint step {saved}' in capsys.readouterr().out
  got = _losses(cross)
  for s in range(saved + 1, STEPS + 1):
    assert abs(got[s] - reference[s]) <= 1e-5, (saved, s)


def test_unreadable_newest_checkpoint_falls_back(reference, tmp_path, capsys, register_input):
  register_input('crash10', _crashing_input(at=10))
  with pytest.raises(_Crash):
    loop.train(_config(**{'input.type': 'crash10'}), tmp_path)  # checkpoints 4, 8
  for f in (tmp_path / 'checkpoints' / '8').rglob('*'):
    if f.is_file() and f.stat().st_size > 0 and 'state' in str(f):
      f.write_bytes(b'\0garbage')
  loop.train(_config(), tmp_path)
  out = capsys.readouterr().out
  assert 'checkpoint 8 unreadable' in out and 'resumed from checkpoint step 4' in out
  got = _losses(tmp_path)
  for s in range(5, STEPS + 1):
    assert got[s] == reference[s], s


def test_nan_policy_skip_keeps_training_and_checkpoints_finite(tmp_path, capsys, register_input):
  register_input('poison4', _crashing_input(at=8, poison=4))  # NaN in the 5th batch
  with pytest.raises(_Crash):
    loop.train(_config(**{'input.type': 'poison4'}), tmp_path)
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['skipped'] for r in records] == [0, 0, 0, 0, 1, 0, 0, 0]
  assert all(np.isfinite(r['loss']) for i, r in enumerate(records) if i != 4)
  assert 'first non-finite gradient leaf' in capsys.readouterr().out
  assert (tmp_path / 'checkpoints' / '8').is_dir()  # written after the skipped step: finite


def test_nan_policy_stop_names_the_leaf_and_writes_no_checkpoint(tmp_path, register_input):
  register_input('poison4', _crashing_input(at=None, poison=4))
  config = _config(every=1, **{'input.type': 'poison4', 'nan_policy': 'stop'})
  with pytest.raises(loop.NonFiniteLossError, match=r'step 5: .*first non-finite gradient leaf: \w+/'):
    loop.train(config, tmp_path)
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == [2, 3, 4]  # keep 3; nothing at or after the bad step

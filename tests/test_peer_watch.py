"""A dead or hung peer (issue 31, item 3): peer_watch's verdicts against a real JAX
coordination service (in this process, two clients), and a 2-process `unifer train`
whose process 1 is killed with -9 mid-run: process 0 stops within peer_timeout_s
naming it, and the rerun resumes from the last checkpoint."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from jax._src.lib import _jax

from unifer_jax import peer_watch

import test_train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_clients():
  """A coordination service and two connected clients, as jax.distributed makes them."""
  address = f'127.0.0.1:{_free_port()}'
  service = _jax.get_distributed_runtime_service(address, 2, heartbeat_timeout=100)
  clients = [_jax.get_distributed_runtime_client(address, i, init_timeout=20,
                                                 heartbeat_timeout=100) for i in range(2)]
  _together(c.connect for c in clients)
  yield clients
  _together(c.shutdown for c in clients)   # shutdown is a barrier of both
  service.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _together(calls):
  threads = [threading.Thread(target=c) for c in calls]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=30)


def test_verdicts_name_the_hung_and_the_lost_peer(two_clients):
  w0, w1 = (peer_watch.PeerWatch(c, i, 2, timeout_s=1.0, thread=False)
            for i, c in enumerate(two_clients))
  for w in (w0, w1):
    w.progress(3)
  assert w0.check() is None and w1.check() is None
  # Both at step 3 for longer than the timeout (a long eval or save): nobody is to blame.
  time.sleep(1.2)
  assert w0.check() is None and w1.check() is None
  # Process 0 moves on to step 4 and waits there; process 1 stays alive before step 3.
  w0.progress(4)
  time.sleep(0.6)
  assert w1.check() is None and w0.check() is None
  time.sleep(0.6)
  assert w1.check() is None                     # it waits for nobody
  assert w0.check() == ('process 1 is hung: alive but still before step 3 while process 0 '
                        'has waited at step 4 for 1 s')
  # Process 1's last sign of life (then it is killed or frozen): lost, whatever its step.
  w1.progress(9)
  w1.check()
  w0.progress(10)
  assert w0.check() is None
  time.sleep(1.2)
  w0.progress(11)                               # not waiting: the verdict is not 'hung'
  assert w0.check() == 'process 1 is lost: no sign of life for 1 s'



def test_a_process_failing_on_an_exception_names_a_lost_peer_first(two_clients, monkeypatch):
  """Its collective failed at once because process 0 died (gloo saw the closed socket):
  at exit it polls on and names the lost peer (exit code 75), instead of waiting at JAX's
  shutdown barrier for the dead one. A peer that failed as well ends the wait at once."""
  w0, w1 = (peer_watch.PeerWatch(c, i, 2, timeout_s=1.0, thread=False)
            for i, c in enumerate(two_clients))
  w0.check(), w1.check()
  verdicts = []
  monkeypatch.setattr(w1, '_exit', verdicts.append)
  monkeypatch.setattr(sys, 'last_value', RuntimeError('Gloo: connection closed by peer'),
                      raising=False)
  start = time.monotonic()
  w1.stop()                          # process 0 gives no further sign of life
  assert verdicts == ['process 0 is lost: no sign of life for 1 s'], verdicts
  assert time.monotonic() - start < 3
  # Both failing (the same error everywhere): neither waits for a verdict.
  w0.failing = True
  w0.check()
  w2 = peer_watch.PeerWatch(two_clients[1], 1, 2, timeout_s=30.0, thread=False)
  monkeypatch.setattr(w2, '_exit', verdicts.append)
  start = time.monotonic()
  w2.stop()
  assert time.monotonic() - start < 5 and len(verdicts) == 1


def test_timeout_must_be_positive(two_clients):
  with pytest.raises(ValueError, match=r'peer_timeout_s=0: expected a number of seconds > 0'):
    peer_watch.PeerWatch(two_clients[0], 0, 2, timeout_s=0, thread=False)


TIMEOUT_S = 8


def _train_cmd(workdir):
  return [sys.executable, str(REPO / 'launch' / 'local.py'), '-n', '2', '--keep-going', '--',
          sys.executable, '-m', 'unifer_jax.cli', 'train', '--config', 'configs/smoke.py:tiny',
          '--workdir', str(workdir), f'--config.peer_timeout_s={TIMEOUT_S}.0',
          *test_train._overrides(total=24, every=4)]


def _steps(workdir) -> list[int]:
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(l)['step'] for l in path.read_text().splitlines() if l.strip()]


@pytest.mark.multiprocess
def test_a_killed_peer_stops_the_other_which_names_it_and_the_rerun_resumes(tmp_path,
                                                                           record_property):
  env = test_train._env(tmp_path / 'two_process_jax_cache')
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(_train_cmd(workdir), env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  lines, pids = [], {}

  def read():
    for line in proc.stdout:
      lines.append(line)
      m = re.match(r'\[launch\] process (\d): pid (\d+)', line)
      if m:
        pids[int(m.group(1))] = int(m.group(2))

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  deadline = time.monotonic() + 400
  while time.monotonic() < deadline and max(_steps(workdir), default=0) < 6:
    assert proc.poll() is None, ''.join(lines)[-3000:]
    time.sleep(0.05)
  killed_at = time.monotonic()
  os.kill(pids[1], signal.SIGKILL)                  # checkpoint 4 is committed by now
  try:
    proc.wait(timeout=TIMEOUT_S + 60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  stopped_after = time.monotonic() - killed_at
  record_property('figure', f'process 0 stopped {stopped_after:.1f} s after process 1 was '
                            f'killed (peer_timeout_s={TIMEOUT_S})')
  reader.join(timeout=10)
  out = ''.join(lines)
  assert f'[launch] process 0 exited with {peer_watch.EXIT_CODE}' in out, out[-3000:]
  assert 'peer watch: process 1 is lost: no sign of life' in out, out[-3000:]
  # Within the timeout plus one poll and the time to notice on a loaded 2-core box.
  assert stopped_after < TIMEOUT_S + 30, stopped_after
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and saved[-1] >= 4, saved
  done = subprocess.run(_train_cmd(workdir), env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert f'resumed from checkpoint step {saved[-1]}' in done.stdout
  assert max(_steps(workdir)) == 24



# Process 1 compiles for 45 s longer (its step_flops call, just after the step's compile,
# sleeps): what a process that compiles what its peer loaded from the persistent cache sees.
_SLOW_PROCESS_1 = """
import os, runpy, sys, time
from unifer_jax.train import step_cost
traced_flops = step_cost.step_flops
def slow(*args, **kwargs):
  if os.environ.get('UNIFER_PROCESS_ID') == '1':
    time.sleep(45)
  return traced_flops(*args, **kwargs)
step_cost.step_flops = slow
sys.argv = ['unifer'] + sys.argv[1:]
runpy.run_module('unifer_jax.cli', run_name='__main__')
"""


@pytest.mark.multiprocess
def test_a_peer_late_to_the_first_step_is_waited_for(tmp_path):
  """gloo gives the peers 30 s to meet at a first collective; the loop's start barrier
  (distributed.start_together) has process 0 wait for a process 1 that reaches the first
  step 45 s later, and the run finishes."""
  env = test_train._env(tmp_path / 'two_process_jax_cache')
  cmd = [sys.executable, str(REPO / 'launch' / 'local.py'), '-n', '2', '--',
         sys.executable, '-c', _SLOW_PROCESS_1, 'train', '--config', 'configs/smoke.py:tiny',
         '--workdir', str(tmp_path / 'run'), '--config.peer_timeout_s=120.0',
         *test_train._overrides(total=3, every=100)]
  done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert max(_steps(tmp_path / 'run')) == 3

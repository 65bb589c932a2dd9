"""launch/tpu_pod.py and launch/slurm.{py,sbatch}: the exact commands they would run.

The dry-run lines are parsed back with shlex (as a shell would), so quoting mistakes
fail. The sbatch script itself runs end to end with a stand-in ``srun`` that starts its
tasks on this machine with SLURM's environment: the real ``unifer train`` then finds
its peers through JAX's own SLURM detection (2 processes, CPU collectives).
"""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import test_train

REPO = Path(__file__).resolve().parents[1]
TRAIN = ['unifer', 'train', '--config', 'configs/smoke.py:7b', '--workdir', 'gs://bkt/runs/7b a',
         '--config.optimizer.name=adafactor']


def _dry_run(script, *args):
  done = subprocess.run([sys.executable, str(REPO / 'launch' / script), '--dry-run', *args],
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  return [shlex.split(line) for line in done.stdout.splitlines()]


def _flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def test_tpu_pod_gcloud_commands():
  cmds = _dry_run('tpu_pod.py', '--name', 'unifer-7b', '--zone', 'us-east5-a', '--project', 'p1',
                  '--accelerator', 'v5p-128', '--', *TRAIN)
  create, archive, scp, untar, install, train = cmds
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'unifer-7b']
  assert _flag(create, '--accelerator-type') == 'v5p-128'
  assert _flag(create, '--version') == 'v2-alpha-tpuv5'
  assert _flag(create, '--zone') == 'us-east5-a' and _flag(create, '--project') == 'p1'
  assert archive[:4] == ['git', '-C', str(REPO), 'archive'] and archive[-1] == 'HEAD'
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert scp[5] == _flag(archive, '--output') and scp[6] == 'unifer-7b:~/'
  for ssh in (untar, install, train):
    assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'unifer-7b']
    assert '--worker=all' in ssh and _flag(ssh, '--zone') == 'us-east5-a'
  install_line = shlex.split(_flag(install, '--command'))
  assert install_line[-4:] == ['--python', '.venv/bin/python', '-e', '.[tpu,gcs]']
  assert 'install' in install_line and '.[tpu,gcs]' in install_line
  # The remote shell line, split as the worker's shell would: the exact unifer argv.
  remote = shlex.split(_flag(train, '--command'))
  assert remote[:3] == ['cd', 'unifer', '&&']
  assert remote[3:] == ['.venv/bin/unifer', *TRAIN[1:]]


def test_tpu_pod_v5e_name_git_clone_detach_and_no_create():
  cmds = _dry_run('tpu_pod.py', '--name', 'pod', '--zone', 'z', '--accelerator', 'v5e-16',
                  '--skip-create', '--repo', 'https://example.org/unifer.git', '--ref', 'v1.2',
                  '--detach', '--', *TRAIN)
  assert not any('create' in c for c in cmds)
  clone, install, train = cmds
  clone_line = shlex.split(_flag(clone, '--command'))
  assert clone_line[clone_line.index('clone') + 1:][:2] == ['https://example.org/unifer.git', 'unifer']
  assert clone_line[-2:] == ['checkout', 'v1.2']
  assert shlex.split(_flag(train, '--command')) == [
      'cd', 'unifer', '&&', 'nohup', '.venv/bin/unifer', *TRAIN[1:], '>', '~/unifer-train.log',
      '2>&1', '&']


def test_tpu_pod_xpk_workload():
  (cmd,) = _dry_run('tpu_pod.py', '--xpk', '--cluster', 'c1', '--name', 'unifer-base',
                    '--accelerator', 'v5e-256', '--num-slices', '2', '--', *TRAIN)
  assert cmd[:3] == ['xpk', 'workload', 'create']
  assert _flag(cmd, '--cluster') == 'c1' and _flag(cmd, '--workload') == 'unifer-base'
  assert _flag(cmd, '--tpu-type') == 'v5litepod-256' and _flag(cmd, '--num-slices') == '2'
  assert _flag(cmd, '--script-dir') == '.'
  inner = shlex.split(_flag(cmd, '--command'))
  assert inner[:5] == ['pip', 'install', '-q', '-e', '.[tpu,gcs]'] and inner[5] == '&&'
  assert inner[6:] == TRAIN


def test_tpu_pod_multislice_is_one_queued_resource_of_n_nodes():
  cmds = _dry_run('tpu_pod.py', '--name', 'u7', '--zone', 'us-east5-a', '--accelerator', 'v5p-128',
                  '--num-slices', '4', '--spot', '--', *TRAIN)
  create, wait, archive, scp, untar, install, train = cmds
  qr = ['gcloud', 'compute', 'tpus', 'queued-resources']
  assert create[:6] == qr + ['create', 'u7'] and '--spot' in create
  assert _flag(create, '--node-count') == '4' and _flag(create, '--node-prefix') == 'u7'
  assert _flag(create, '--accelerator-type') == 'v5p-128'
  assert _flag(create, '--runtime-version') == 'v2-alpha-tpuv5'
  # Queued resources are granted later: the launcher waits until the resource is ACTIVE.
  assert wait[:2] == ['bash', '-c'] and 'ACTIVE' in wait[2]
  assert shlex.split(wait[2].split('$(')[1].split(')"')[0])[:6] == qr + ['describe', 'u7']
  assert archive[:4] == ['git', '-C', str(REPO), 'archive']
  assert scp[:5] == qr + ['scp'] and scp[6] == 'u7:~/'
  for ssh in (scp, untar, install, train):
    assert '--node=all' in ssh and '--worker=all' in ssh and _flag(ssh, '--zone') == 'us-east5-a'
  for ssh in (untar, install, train):
    assert ssh[:6] == qr + ['ssh', 'u7']
  assert shlex.split(_flag(train, '--command'))[3:] == ['.venv/bin/unifer', *TRAIN[1:]]


def test_tpu_pod_bad_arguments():
  bad = subprocess.run([sys.executable, str(REPO / 'launch' / 'tpu_pod.py'), '--dry-run',
                        '--name', 'x', '--zone', 'z', '--accelerator', 'v5p:4x4x4', '--', *TRAIN],
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and 'v5p-128' in bad.stderr
  no_cmd = subprocess.run([sys.executable, str(REPO / 'launch' / 'tpu_pod.py'), '--dry-run',
                           '--name', 'x', '--zone', 'z', '--accelerator', 'v5p-8'],
                          capture_output=True, text=True, timeout=60)
  assert no_cmd.returncode == 2 and 'after --' in no_cmd.stderr


def test_slurm_sbatch_syntax_and_submit_command():
  subprocess.run(['bash', '-n', str(REPO / 'launch' / 'slurm.sbatch')], check=True)
  (cmd,) = _dry_run('slurm.py', '--nodes', '2', '--partition', 'gpu', '--time', '02:00:00',
                    '--sbatch-arg=--exclusive', '--', *TRAIN)
  assert cmd[0] == 'sbatch'
  assert _flag(cmd, '--nodes') == '2' and _flag(cmd, '--gpus-per-node') == '8'
  assert _flag(cmd, '--ntasks-per-node') == '8'  # one task per GPU
  assert _flag(cmd, '--partition') == 'gpu' and _flag(cmd, '--time') == '02:00:00'
  assert '--exclusive' in cmd
  i = cmd.index(str(REPO / 'launch' / 'slurm.sbatch'))
  assert cmd[i + 1:] == TRAIN[1:]


SRUN = '''#!{python}
"""Stand-in for srun on one machine: starts SRUN_NTASKS copies of the command with the
variables a real srun step sets, waits for all, returns the first failure's code."""
import json, os, subprocess, sys
argv = sys.argv[1:]
while argv and argv[0].startswith('-'):
  argv.pop(0)
n = int(os.environ['SRUN_NTASKS'])
with open(os.environ['SRUN_LOG'], 'w') as f:
  f.write(json.dumps(argv))
procs = [subprocess.Popen(argv, env=dict(os.environ, SLURM_NTASKS=str(n), SLURM_PROCID=str(i),
                                         SLURM_LOCALID=str(i), SLURM_STEP_NODELIST='localhost',
                                         SLURM_STEP_NUM_NODES='1'))
         for i in range(n)]
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
'''


def _slurm_job_id_with_free_port() -> int:
  """JAX's SLURM coordinator port is 61440 + job_id % 4096: pick a job id whose port is free."""
  with socket.socket() as s:
    for port in range(65535, 61440, -1):
      try:
        s.bind(('127.0.0.1', port))
        return port - 61440
      except OSError:
        continue
  raise RuntimeError('no free port in 61440..65535')


@pytest.mark.multiprocess  # two trainer processes compile the tiny step: ~40-60 s of CPU
def test_sbatch_runs_unifer_train_as_slurm_tasks(tmp_path):
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  srun = bindir / 'srun'
  srun.write_text(SRUN.format(python=sys.executable))
  srun.chmod(0o755)
  workdir = tmp_path / 'work dir'
  env = dict(os.environ, PATH=f'{bindir}:{os.environ["PATH"]}', SRUN_NTASKS='2',
             JAX_ENABLE_COMPILATION_CACHE='false',  # see tests/test_train.py _env
             SRUN_LOG=str(tmp_path / 'srun.log'), SLURM_JOB_ID=str(_slurm_job_id_with_free_port()),
             SLURM_SUBMIT_DIR=str(REPO), UNIFER_VENV=str(Path(sys.executable).parents[1]),
             JAX_PLATFORMS='cpu', XLA_FLAGS=test_train.xla_flags(2),
             PYTHONPATH=str(REPO))
  done = subprocess.run(
      ['bash', str(REPO / 'launch' / 'slurm.sbatch'), 'train', '--config', 'configs/smoke.py:tiny',
       '--workdir', str(workdir), '--config.stage=lm', '--config.total_steps=2',
       '--config.checkpoint.every_steps=2', '--config.checkpoint.async_save=False'],
      env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert json.loads((tmp_path / 'srun.log').read_text()) == [
      str(Path(sys.executable).parent / 'unifer'), 'train', '--config', 'configs/smoke.py:tiny',
      '--workdir', str(workdir), '--config.stage=lm', '--config.total_steps=2',
      '--config.checkpoint.every_steps=2', '--config.checkpoint.async_save=False']
  # Both tasks joined one JAX runtime: 4 devices over 2 processes, one set of metrics.
  assert 'over 4 devices, 2 process(es)' in done.stdout
  steps = [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [1, 2]

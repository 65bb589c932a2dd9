"""A mesh whose data axis spans DCN-connected groups of devices, run for real.

TPU slices cannot be had here, so the test takes the other granule the hybrid mesh knows:
processes (as GPU hosts are). 2 processes x 4 CPU devices train the tiny smoke config with
FSDP inside each process and data parallelism across them (``config.mesh.dcn.data=2``):
the per-step losses equal one process's 8 devices on the same (data 2, fsdp 4) mesh.
The multislice TPU side (the hybrid mesh over libtpu's slices, the compiled cross-slice
transfers) is in test_compile_check.py.
"""

import subprocess
import sys

import pytest

import test_train
from unifer_jax.train import loop

STEPS = 4
MESH = ['--config.mesh.data=1', '--config.mesh.fsdp=-1']


@pytest.mark.multiprocess
def test_data_axis_across_processes_matches_one_process(tmp_path):
  overrides = test_train._overrides(total=STEPS, every=STEPS)
  one = tmp_path / 'one'
  loop.train(test_train.config_lib.load('configs/smoke.py:tiny', overrides + [
      '--config.mesh.data=2', '--config.mesh.fsdp=4']), one)
  two = tmp_path / 'two'
  cmd = [sys.executable, str(test_train.REPO / 'launch' / 'local.py'), '-n', '2', '--',
         *test_train.UNIFER, 'train', '--config', 'configs/smoke.py:tiny', '--workdir', str(two),
         *overrides, *MESH, '--config.mesh.dcn.data=2']
  done = subprocess.run(cmd, env=test_train._env(tmp_path / 'cache'), cwd=test_train.REPO,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "'data': 2, 'fsdp': 4" in done.stdout
  assert "2 process(es); across processes (DCN): {'data': 2}" in done.stdout
  want, got = test_train._losses(one), test_train._losses(two)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in got:
    assert abs(got[step] - want[step]) <= 1e-5, step


def test_a_dcn_size_the_processes_cannot_give_is_named(tmp_path):
  config = test_train.config_lib.load('configs/smoke.py:tiny', MESH + ['--config.mesh.dcn.data=2'])
  with pytest.raises(ValueError, match=r"config.mesh.dcn \{'data': 2.*needs 2 processes, but 1"):
    loop.train(config, tmp_path)

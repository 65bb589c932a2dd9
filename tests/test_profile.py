"""config.profile (issue 31 item 4): a jax.profiler trace of the chosen train steps in the
workdir, in the layout TensorBoard's profile plugin reads."""

from pathlib import Path

import jax
import pytest

from unifer_jax import config_lib
from unifer_jax.train import loop, profiling

REPO = Path(__file__).resolve().parents[1]


def test_a_five_step_profile_lands_in_the_workdir(tmp_path, capsys):
  config = config_lib.load(str(REPO / 'configs/smoke.py:tiny'), [
      '--config.total_steps=8', '--config.profile.start_step=3', '--config.profile.num_steps=5',
      '--config.checkpoint.every_steps=100', '--config.log_every_steps=4'])
  loop.train(config, tmp_path)
  assert f'profile: steps 3..7 in {tmp_path}/tensorboard/plugins/profile' in capsys.readouterr().out
  (xplane,) = (tmp_path / 'tensorboard' / 'plugins' / 'profile').glob('*/*.xplane.pb')
  assert xplane.stat().st_size > 0
  # The five steps are in the trace, each as its own step annotation.
  events = [e for plane in jax.profiler.ProfileData.from_file(str(xplane)).planes
            for line in plane.lines for e in line.events if e.name == 'train']
  assert sorted(int(dict(e.stats)['step_num']) for e in events) == [3, 4, 5, 6, 7]


def test_profile_config_is_checked():
  with pytest.raises(ValueError, match='expected start_step >= 1 and num_steps >= 1'):
    profiling.Profiler(dict(start_step=0, num_steps=5), '/tmp/unused')
  assert not profiling.Profiler(dict(start_step=0, num_steps=0), '/tmp/unused').enabled

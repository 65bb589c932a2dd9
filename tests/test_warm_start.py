"""``config.init.checkpoint``: a stage warm-starts from the previous stage's workdir.

On the tiny UniFER: every parameter a checkpoint holds is loaded bit for bit; what it
lacks (LoRA adapters added for instruction tuning) equals the random init of the same
seed; a checkpoint that covers the whole model is restored without running the init.
"""

import jax
import numpy as np
import pytest

from unifer_jax import config_lib, sharding
from unifer_jax.models import presets
from unifer_jax.train import checkpoint as ckpt_lib, optim, state as state_lib


def _setup(lora_rank: int = 0, init_checkpoint: str = '', seed: int = 0):
  model = presets.get('tiny')
  model.lora.rank = lora_rank
  config = config_lib.base(model=model)
  config.mesh = dict(zip(sharding.MESH_AXES, (1, 1, 1)))
  config.init.checkpoint = init_checkpoint
  config.seed = seed
  return state_lib.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))


def _flat_np(tree) -> dict:
  return {k: np.asarray(v) for k, v in optim.flat(tree).items()}


@pytest.fixture(scope='module')
def stage_workdir(tmp_path_factory):
  """A saved stage: the tiny model at seed 7 (not the seed the next stage uses)."""
  workdir = tmp_path_factory.mktemp('stage')
  setup = _setup(seed=7)
  state = setup.init_state()
  ckpt = ckpt_lib.Checkpointer(workdir / 'checkpoints', setup.config.checkpoint)
  ckpt.save(5, state, {}, {}, force=True)
  ckpt.close()
  return workdir, _flat_np(state['params'])


def test_covered_checkpoint_loads_everything_without_init(stage_workdir, monkeypatch):
  workdir, saved = stage_workdir
  setup = _setup(init_checkpoint=str(workdir))

  def no_model(*args):
    raise AssertionError('the random init ran although the checkpoint covers the model')

  monkeypatch.setattr(state_lib, 'model_class', no_model)
  state = setup.init_state()
  loaded = _flat_np(state['params'])
  assert loaded.keys() == saved.keys()
  for path, value in saved.items():
    np.testing.assert_array_equal(loaded[path], value, err_msg=path)
  assert int(state['step']) == 0   # a new stage: fresh step and optimizer state
  abstract = optim.flat(setup.abstract_state['params'])
  for path, leaf in loaded.items():
    assert (leaf.shape, leaf.dtype) == (abstract[path].shape, abstract[path].dtype), path


def test_partial_checkpoint_keeps_random_init_for_the_rest(stage_workdir, capsys):
  workdir, saved = stage_workdir
  state = _setup(lora_rank=4, init_checkpoint=str(workdir)).init_state()
  fresh_state = _setup(lora_rank=4).init_state()      # seed 0, no warm start
  warm, fresh = _flat_np(state['params']), _flat_np(fresh_state['params'])
  lora = {p for p in warm if 'lora_' in p}
  assert lora and lora.isdisjoint(saved)
  assert warm.keys() == saved.keys() | lora
  for path in lora:
    np.testing.assert_array_equal(warm[path], fresh[path], err_msg=path)
  for path, value in saved.items():
    np.testing.assert_array_equal(warm[path], value, err_msg=path)
  printed = capsys.readouterr().out
  assert f'loaded {len(saved)} parameters' in printed
  assert sorted(lora)[0] in printed

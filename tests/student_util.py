"""A distilled student with random weights, saved the way the trainer saves it and
exported with `unifer export`: for the export tests and the `unifer serve` tests."""

from pathlib import Path

import numpy as np
from flax import nnx

from unifer_jax import config_lib
from unifer_jax.export import commands
from unifer_jax.train import checkpoint as ckpt_lib, state as state_lib

import model_util

REPO = Path(__file__).resolve().parents[1]


def export_student(root: Path, *, preset: str = 'tiny', formats=('onnx',), int8: bool = False,
                   image_mean=None, seed: int = 2, out: str = 'out') -> dict:
  """``root/distill`` (config.json + an orbax checkpoint of step 3) exported into
  ``root/<out>``; returns the export reports."""
  config = config_lib.load(str(REPO / 'configs' / 'distill.py') + f':{preset}')
  if image_mean is not None:
    config.input.image_mean = image_mean
  (root / 'distill').mkdir(parents=True)
  (root / 'distill' / 'config.json').write_text(config_lib.to_json(config))
  model_cfg = state_lib.model_config(config)
  model = model_util.random_module(
      lambda: state_lib.model_class(model_cfg)(model_cfg, rngs=nnx.Rngs(0)), seed=seed, scale=0.3)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ckpt = ckpt_lib.Checkpointer(root / 'distill' / 'checkpoints', config.checkpoint)
  ckpt.save(3, {'step': np.int32(3), 'params': params, 'opt_state': {}}, {}, {}, force=True)
  ckpt.close()
  return commands.export(root / 'distill', root / out, list(formats), int8=int8)

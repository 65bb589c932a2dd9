r"""Smoke config: the generative (LM-on-image-prefix) step of any model preset on random
batches of the right shapes. Drives the trainer tests and the compile-check.

  unifer train --config configs/smoke.py:tiny --workdir /tmp/smoke \
      --config.total_steps=50 --config.checkpoint.every_steps=10
  unifer compile-check --config configs/smoke.py:7b --topology v5p-128

Expected (tiny, 1 CPU): 50 steps in well under a minute; the loss falls from ~4.9
(ln 128) as the model memorises the 2 random batches it cycles through.
Args: the model preset (tiny | demo | base | 7b), default tiny.
"""

from unifer_jax import config_lib
from unifer_jax.models import presets


def get_config(arg: str = 'tiny'):
  c = config_lib.base(model=arg or 'tiny')
  c.stage = 'generate'
  model = presets.get(c.model)
  # 7b: 512 divides every pod compile-checked (64 .. 512 devices, 2 x v5e-256 included).
  c.input.batch_size = {'tiny': 8, 'demo': 16, '7b': 512}.get(c.model, 256)
  c.input.seq_len = {'tiny': 16, 'demo': 32}.get(c.model, 256)
  c.input.image_size = model.vit.image_size
  c.input.pool = 2
  c.total_steps = 20
  c.checkpoint.replica_parallel = False  # tiny arrays: slicing them costs more than it saves
  c.log_every_steps = 1
  c.schedule = dict(name='cosine', peak_lr=3e-3, warmup_steps=2, end_lr_ratio=0.1)
  if c.model in ('base', '7b'):
    # Pod-scale defaults: FSDP over everything, bf16 compute, remat every layer.
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.remat = 'full'
  return c

"""Training inputs behind one interface, chosen by ``config.input.type``.

An input yields this process's rows of each global batch as numpy arrays and can save
and restore its position (``get_state`` / ``set_state``, JSON-able), which the trainer
stores in every checkpoint so a resumed run continues at the exact next record.
"""

from __future__ import annotations

from typing import Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unifer_jax import sharding
from unifer_jax.data import random_batches


class Input(Protocol):
  def next_local_batch(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...
  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]: ...


def local_rows(global_batch: int) -> slice:
  n, i = jax.process_count(), jax.process_index()
  if global_batch % n:
    raise ValueError(f'config.input.batch_size={global_batch} is not divisible by the '
                     f'{n} processes')
  per = global_batch // n
  return slice(i * per, (i + 1) * per)


class RandomInput:
  """Deterministic random batches: batch k is a pure function of (seed, k)."""

  def __init__(self, config, model_cfg):
    self.config, self.model_cfg, self.position = config, model_cfg, 0
    self.rows = local_rows(config.input.batch_size)

  def next_local_batch(self):
    batch = random_batches.global_batch(self.config, self.model_cfg, self.position, self.rows)
    self.position += 1
    return batch

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = int(state['position'])

  def batch_spec(self):
    return {k: jax.ShapeDtypeStruct(shape, dtype)
            for k, (shape, dtype) in random_batches.batch_spec(self.config, self.model_cfg).items()}


def _tfds_input(config, model_cfg):
  from unifer_jax.data import tfds_input  # pylint: disable=g-import-not-at-top  (grain, tfds)
  return tfds_input.TfdsInput(config, model_cfg)


INPUTS = {'synthetic_random': RandomInput, 'tfds': _tfds_input}


def batch_spec(config, model_cfg) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch's keys, shapes and dtypes without reading any data (compile-check)."""
  if config.input.type == 'tfds':
    from unifer_jax.data import tfds_input  # pylint: disable=g-import-not-at-top
    return tfds_input.global_batch_spec(config, model_cfg)
  return make_input(config, model_cfg).batch_spec()


def make_input(config, model_cfg) -> Input:
  kind = config.input.type
  if kind not in INPUTS:
    raise KeyError(f'config.input.type={kind!r}; available: {sorted(INPUTS)}')
  return INPUTS[kind](config, model_cfg)


def to_global(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the mesh's batch axes."""
  s = NamedSharding(mesh, P(sharding.BATCH_AXES))
  return {k: jax.make_array_from_process_local_data(s, v) for k, v in local.items()}

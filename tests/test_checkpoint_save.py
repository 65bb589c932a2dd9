"""train/checkpoint.Checkpointer's save path on real orbax, one process x 8 devices: a
non-finite state is refused, and a state with replicated and sharded arrays round-trips
with replica 0 writing replicated arrays whole (one process gains nothing from
replica-parallel slices; benchmarks/checkpoint_save.py has the timings)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from unifer_jax import sharding
from unifer_jax.train import checkpoint as ckpt_lib

CFG = ml_collections.ConfigDict(dict(every_steps=1, keep=2, async_save=True,
                                     replica_parallel=True))


def _state():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  rows = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  params = {'kernel': jax.device_put(rng.normal(size=(1024, 1024)).astype(np.float32), replicated),
            'rows': jax.device_put(rng.normal(size=(64, 32)).astype(np.float32), rows),
            'scale': jax.device_put(np.ones(32, np.float32), replicated)}
  return {'step': jnp.zeros((), jnp.int32), 'params': params}


def test_state_round_trips_and_one_process_writes_replicas_whole(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path / 'checkpoints', CFG)
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert handler._use_replica_parallel is False                  # pylint: disable=protected-access
  assert handler._min_slice_bytes_for_replica_parallel == ckpt_lib.MIN_SLICE_BYTES  # pylint: disable=protected-access
  state = _state()
  expected = jax.tree.map(np.asarray, state)
  assert ckpt.save(1, state, {'input': {'position': 3}}, {'seed': 0})
  ckpt.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  step, restored, data = ckpt.restore(abstract)
  ckpt.close()
  assert step == 1 and data == {'input': {'position': 3}}
  for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert restored['params']['rows'].sharding == state['params']['rows'].sharding


@pytest.mark.parametrize('bad', [np.inf, -np.inf, np.nan])
def test_a_non_finite_state_is_never_written(tmp_path, bad):
  ckpt = ckpt_lib.Checkpointer(tmp_path / 'checkpoints', CFG)
  state = _state()
  state['params']['scale'] = state['params']['scale'].at[7].set(bad)
  with pytest.raises(ckpt_lib.NonFiniteStateError, match='step 2: parameters are not all finite'):
    ckpt.save(2, state, {}, {})
  assert ckpt.steps() == []
  ckpt.close()

"""LoRA adapters: identity at init, the low-rank delta after, base paths unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unifer_jax.models import layers, llm, lora
from unifer_jax.train import optim


def test_dense_adapter_adds_the_low_rank_delta():
  d = layers.Dense(6, 5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 6))
  base = np.asarray(d(x))
  lora.add_adapter(d, rank=2, alpha=4.0, rngs=nnx.Rngs(2))
  np.testing.assert_allclose(d(x), base, atol=0)  # lora_b = 0: exactly the base layer
  d.lora_b[...] = jnp.ones((2, 5))
  expect = base + np.asarray(x) @ np.asarray(d.lora_a[...]) @ np.ones((2, 5)) * (4.0 / 2)
  np.testing.assert_allclose(d(x), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('scan', [True, False])
def test_llm_adapters_keep_base_paths_and_follow_the_scan(scan):
  model = llm.LLM(llm.default_config(scan_layers=scan), rngs=nnx.Rngs(0))
  ids = jnp.arange(10).reshape(2, 5)
  before = np.asarray(model(ids))
  base_paths = set(optim.flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  adapted = lora.apply(model, 4, 8.0, r'attn/(q|v)$', rngs=nnx.Rngs(1))
  assert len(adapted) == (1 if scan else 2) * 2
  params = optim.flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert base_paths <= set(params)  # base checkpoints still load by path
  new = sorted(set(params) - base_paths)
  assert all('lora_' in p for p in new) and len(new) == 2 * len(adapted)
  if scan:
    assert params['layers/attn/q/lora_a'].shape == (2, 64, 4)
    assert params['layers/attn/v/lora_b'].shape == (2, 4, 32)  # kv_heads * head_dim
  np.testing.assert_allclose(model(ids), before, atol=0)
  trainable, frozen = optim.split_trainable(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                            r'^(?!.*lora_)')
  assert set(optim.flat(trainable)) == set(new) and set(optim.flat(frozen)) == base_paths


def test_unmatched_targets_are_an_error():
  with pytest.raises(ValueError, match='matched no Dense'):
    lora.apply(llm.LLM(llm.default_config(), rngs=nnx.Rngs(0)), 2, 2.0, 'nothing$',
               rngs=nnx.Rngs(0))

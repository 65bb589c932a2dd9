"""The two switches a from-scratch UniFER needs (models/unifer.py): mean-pooled ITC text
features and the per-position vision token gain -- what they compute, and the reason for
each (at init, [CLS] text features are nearly equal across captions; mean pooling is not)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unifer_jax.models import presets
from unifer_jax.models.unifer import UniFER


def _model(**flags):
  cfg = presets.get('tiny')
  cfg.update(flags)
  return UniFER(cfg, rngs=nnx.Rngs(0))


def _texts(n=16, length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 128, (n, length)).astype(np.int32)
  ids[:, 0] = 1  # every caption starts with the same [CLS]-like token
  lengths = rng.integers(6, length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return jnp.asarray(ids * mask), jnp.asarray(mask)


def test_mean_pooling_ignores_padding_and_matches_the_formula():
  model = _model(text_pool='mean')
  ids, mask = _texts()
  states = model.qformer.encode_text(ids, mask)
  got = model.text_embedding(states, mask)
  m = np.asarray(mask, np.float32)[..., None]
  pooled = (np.asarray(states) * m).sum(1) / m.sum(1)
  want = np.array(model.text_proj(jnp.asarray(pooled)))
  want /= np.sqrt((want * want).sum(-1, keepdims=True) + 1e-6)  # _l2_normalize's eps
  np.testing.assert_allclose(got, want, atol=1e-5)
  garbage = jnp.where(mask[..., None] > 0, states, 1e3)  # padded states must not count
  np.testing.assert_allclose(model.text_embedding(garbage, mask), got, atol=1e-5)


def test_cls_text_features_start_nearly_equal_and_mean_ones_do_not():
  ids, mask = _texts(n=32)
  spread = {}
  for pool in ('cls', 'mean'):
    model = _model(text_pool=pool)
    feats = np.asarray(model.text_embedding(model.qformer.encode_text(ids, mask), mask))
    spread[pool] = float(feats.std(axis=0).mean())
  # The collapse seen in align (ITC stuck at ln B from step 1): [CLS] features differ
  # across captions far less than mean-pooled ones.
  assert spread['mean'] > 5 * spread['cls'], spread


def test_token_gain_scales_each_position_and_channel():
  model = _model(vision_token_gain=True)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  tokens = model.vision_norm(model.vit(images))
  gain = np.asarray(model.token_gain[...])
  assert gain.shape == tokens.shape[1:] and 0.5 < gain.std() < 2.0  # N(0, 1), not identity
  np.testing.assert_allclose(model.image_tokens(images), np.asarray(tokens) * gain, atol=1e-6)
  assert _model().token_gain is None  # off unless asked: HF towers load unchanged

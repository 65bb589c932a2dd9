"""The clip model (models/video.py): shapes, zero-initialised temporal weights = the frame
model (a static clip gives its frame's queries and logits, in both modes), the logical
axes of the new weights, an image model unchanged by the clip code, time mattering once
the temporal weights are not zero, and the clip train step compiling once per mode."""

import jax
import numpy as np
import pytest
from flax import nnx

import model_util
from unifer_jax import sharding
from unifer_jax.models import presets, video
from unifer_jax.models import unifer as unifer_lib
from unifer_jax.train import losses

T = 4


def _cfg(mode, pool='attention'):
  cfg = presets.get('tiny')
  cfg.video = video.default_config(mode=mode, frames=T, pool=pool)
  return cfg


def _model(mode, pool='attention', seed=0):
  """Random weights everywhere but the clip weights, which keep their zero init (the
  warm start: an image checkpoint has none of them)."""
  cfg = _cfg(mode, pool)
  model = model_util.random_module(lambda: unifer_lib.UniFER(cfg, rngs=nnx.Rngs(0)), seed=seed,
                                   scale=0.3)
  for name, p in vars(model.video).items():
    if isinstance(p, nnx.Param):
      p[...] = np.zeros(p.shape, p.dtype)
  return model


def _frames(b, t=T, seed=0):
  return np.random.default_rng(seed).normal(size=(b, t, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize('mode,pool', [('memory', 'attention'), ('pool', 'attention'),
                                       ('pool', 'mean')])
def test_static_clip_is_the_frame_model_at_init(mode, pool):
  model = _model(mode, pool)
  image = _frames(3, 1)[:, 0]
  clip = np.repeat(image[:, None], T, axis=1)                       # T copies of the frame
  q_clip = np.asarray(model.clip_queries(clip))
  q_image = np.asarray(model.image_queries(image))
  assert q_clip.shape == q_image.shape == (3, 4, 32)
  np.testing.assert_allclose(q_clip, q_image, rtol=2e-5, atol=2e-6)
  ids = np.array([[5, 6, 7, 8]] * 3, np.int32)
  logits_clip = model.llm(inputs_embeds=model.clip_inputs(clip, ids)[0])
  np.testing.assert_allclose(np.asarray(logits_clip), np.asarray(model(image, ids)),
                             rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('mode', video.MODES)
def test_time_matters_once_temporal_weights_move(mode):
  model = _model(mode, seed=1)
  clip = _frames(2, seed=2)
  reversed_clip = clip[:, ::-1]
  # Zero-initialised: order-free (attention over a set of tokens; a mean).
  np.testing.assert_allclose(np.asarray(model.clip_queries(clip)),
                             np.asarray(model.clip_queries(reversed_clip)), rtol=1e-4, atol=1e-5)
  rng = np.random.default_rng(3)
  for p in vars(model.video).values():
    if isinstance(p, nnx.Param):
      p[...] = rng.normal(0, 1.0, p.shape).astype(p.dtype)
  gap = np.abs(np.asarray(model.clip_queries(clip)) -
               np.asarray(model.clip_queries(reversed_clip))).max()
  assert gap > 1e-3


def test_new_weights_have_logical_axes_and_an_image_model_has_none():
  for mode, names in (('memory', {'temporal_embed'}), ('pool', {'pool_query', 'pool_time'})):
    model = nnx.eval_shape(lambda: unifer_lib.UniFER(_cfg(mode), rngs=nnx.Rngs(0)))
    state = nnx.state(model.video, nnx.Param)
    axes = {'/'.join(map(str, k)): sharding._logical_axes_of(v)
            for k, v in nnx.to_flat_state(state)}
    assert set(axes) == names
    known = {n for n, _ in sharding.DEFAULT_RULES}
    assert all(a is not None and set(a) <= known for a in axes.values()), axes
  image_model = nnx.eval_shape(lambda: unifer_lib.UniFER(presets.get('tiny'), rngs=nnx.Rngs(0)))
  assert not hasattr(image_model, 'video')
  with pytest.raises(ValueError, match='needs model.video'):
    image_model.clip_queries(_frames(1))


def test_bad_clips_and_configs_are_named():
  model = _model('memory')
  with pytest.raises(ValueError, match='a clip of 3 frames, but model.video.frames=4'):
    model.clip_queries(_frames(1, t=3))
  with pytest.raises(ValueError, match=r'expected \[B, T, H, W, C\]'):
    model.clip_queries(_frames(1)[:, 0])
  with pytest.raises(ValueError, match="model.video.mode='both'"):
    video.check_config(video.default_config(mode='both'))


@pytest.mark.parametrize('mode', video.MODES)
def test_clip_step_compiles_once(mode):
  """Forward + backward of the video loss over two batches: one compile, finite loss,
  a gradient on the zero-initialised temporal weights."""
  model = _model(mode, seed=4)
  graphdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def step(state, batch):
    traces.append(1)
    def loss_fn(state):
      return losses.LOSSES['video'](nnx.merge(graphdef, state), batch, None)[0]
    return jax.value_and_grad(loss_fn)(state)

  ids = np.tile(np.arange(3, 19, dtype=np.int32), (2, 1))
  loss_mask = (np.arange(16) >= 10).astype(np.float32)[None].repeat(2, 0)
  for seed in (5, 6):
    batch = dict(frames=_frames(2, seed=seed), tokens=ids, loss_mask=loss_mask,
                 attention_mask=np.ones_like(ids))
    loss, grads = step(state, batch)
    assert np.isfinite(float(loss))
    g = {k: np.abs(np.asarray(v)).sum() for k, v in nnx.to_flat_state(grads['video'])}
    assert g and all(v > 0 for v in g.values()), g
  assert len(traces) == 1

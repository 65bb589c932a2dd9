"""Clips through the image path: T frames -> the ViT frame by frame -> one set of Q
queries for the whole clip (issue 34 item 3). ``model.video`` switches it on::

  model.video = dict(mode='memory', frames=8, pool='attention')

``UniFER.clip_queries(frames [B, T, H, W, C])`` runs the ViT once over all B * T frames
(one batched call), then fuses time in one of two ways:

* ``mode='memory'`` (a): a learned temporal embedding ``[T, Dv]`` is added to every token
  of frame t, and the T frames' tokens, concatenated to ``[B, T * N, Dv]``, are the
  Q-Former's cross-attention memory: each query attends over space and time at once.
* ``mode='pool'`` (b): the Q-Former reads each frame alone (``[B * T, Q, Dq]``) and the
  per-frame queries are pooled over time: ``pool='mean'``, or ``'attention'`` -- per
  query, softmax over t of ``<query_t, w> + b_t``.

Both start as the frame model (so a stage warm-started from an image checkpoint starts
from what it knew): every new weight is initialised to zero. A zero temporal embedding
leaves each frame's tokens as the image path makes them, and cross-attention over T
copies of the same tokens equals attention over one copy (each key's softmax weight is
split T ways); zero pooling weights are the mean. So a static clip (T copies of a frame)
gives the frame's queries in both modes (tests/test_video_model.py).

Cost: the ViT runs on B * T frames in either mode. (a) runs the Q-Former once per clip
with a T-times longer memory (its cross-attention is O(Q * T * N)); (b) runs it T times
with the usual memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unifer_jax.models import layers

MODES = ('memory', 'pool')
POOLS = ('mean', 'attention')


def default_config(mode: str = 'memory', frames: int = 8,
                   pool: str = 'attention') -> ml_collections.ConfigDict:
  """``model.video``: the fusion (MODES), frames per clip T, and mode 'pool''s pooling."""
  return ml_collections.ConfigDict(dict(mode=mode, frames=frames, pool=pool))


def check_config(cfg) -> None:
  if cfg.mode not in MODES:
    raise ValueError(f'model.video.mode={cfg.mode!r}; expected one of {MODES}')
  if cfg.pool not in POOLS:
    raise ValueError(f'model.video.pool={cfg.pool!r}; expected one of {POOLS}')
  if int(cfg.frames) < 1:
    raise ValueError(f'model.video.frames={cfg.frames}: a clip needs at least one frame')


class ClipFusion(nnx.Module):
  """The clip model's only new weights: the temporal embedding (memory) or the pooling
  scores (pool, attention). Logical axes: 'frames' (replicated) and 'embed'."""

  def __init__(self, cfg, *, vision_width: int, query_width: int, param_dtype, rngs: nnx.Rngs):
    check_config(cfg)
    self.mode, self.frames, self.pool = str(cfg.mode), int(cfg.frames), str(cfg.pool)
    dtype = layers.dtype_of(param_dtype)
    zeros = nnx.initializers.zeros
    if self.mode == 'memory':
      self.temporal_embed = layers.param(rngs, zeros, (self.frames, vision_width),
                                         ('frames', 'embed'), dtype)
    elif self.pool == 'attention':
      self.pool_query = layers.param(rngs, zeros, (query_width,), ('embed',), dtype)
      self.pool_time = layers.param(rngs, zeros, (self.frames,), ('frames',), dtype)

  def check_frames(self, t: int) -> None:
    if t != self.frames:
      raise ValueError(f'a clip of {t} frames, but model.video.frames={self.frames} (the '
                       f'temporal weights are per frame; set config.input.frames to match)')

  def memory(self, tokens: jax.Array) -> jax.Array:
    """Mode memory: [B, T, N, D] frame tokens -> [B, T * N, D] with time added."""
    b, t, n, d = tokens.shape
    self.check_frames(t)
    x = tokens + self.temporal_embed[...].astype(tokens.dtype)[None, :, None, :]
    return x.reshape(b, t * n, d)

  def pool_queries(self, queries: jax.Array) -> jax.Array:
    """Mode pool: per-frame queries [B, T, Q, D] -> [B, Q, D]."""
    self.check_frames(queries.shape[1])
    if self.pool == 'mean':
      return queries.mean(axis=1)
    x = queries.astype(jnp.float32)
    score = x @ self.pool_query[...].astype(jnp.float32)                  # [B, T, Q]
    score = score + self.pool_time[...].astype(jnp.float32)[None, :, None]
    w = jax.nn.softmax(score, axis=1)[..., None]
    return (w * x).sum(axis=1).astype(queries.dtype)

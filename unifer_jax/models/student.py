"""The deployable FER student: a ViT-Ti-class encoder with four small heads.

Distilled from the full model (stage 4) and exported (ONNX / StableHLO / safetensors), so
the forward pass is plain jnp ops with no Python control flow on values.

Outputs of ``Student(cfg)(images)`` (images NHWC, normalised):
  basic      [B, 8]   logits over BASIC_EXPRESSIONS
  compound   [B, 11]  logits over COMPOUND_EXPRESSIONS (RAF-DB compound set)
  intensity  [B]      sigmoid, in [0, 1]
  va         [B, 2]   tanh (valence, arousal), in [-1, 1]
  embedding  [B, D]   the pooled encoder feature (for feature distillation / probes)
  feature    [B, F]   only with ``feature_dim > 0``: the embedding projected into the
                      teacher's image-embedding space (a training aid; not exported)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unifer_jax.data import labels
from unifer_jax.models import layers
from unifer_jax.models.vit import ViT, default_config as vit_config

# The logits follow the project's canonical label order (records store these indices).
BASIC_EXPRESSIONS = labels.BASIC
COMPOUND_EXPRESSIONS = labels.COMPOUND  # RAF-DB compound classes 1..11


def default_config(**overrides) -> ml_collections.ConfigDict:
  """ViT-Ti (width 192, depth 12, 3 heads) at 112 px / patch 8 (196 tokens).

  Encoder keys go under ``encoder`` (e.g. ``default_config(encoder=dict(depth=2))`` or
  ``cfg.encoder.depth = 2``); a CPU demo uses depth 2-4 at 32-64 px.
  """
  encoder_overrides = dict(overrides.pop('encoder', {}))
  cfg = ml_collections.ConfigDict(dict(
      encoder=vit_config(image_size=112, patch_size=8, width=192, depth=12, heads=3,
                         mlp_dim=768, variant='vit', pool='cls', act='gelu',
                         layer_norm_eps=1e-6),
      num_basic=len(BASIC_EXPRESSIONS), num_compound=len(COMPOUND_EXPRESSIONS),
      kind='student', feature_dim=0))
  cfg.encoder.update(encoder_overrides)
  cfg.update(overrides)
  return cfg


class Student(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    if cfg.encoder.pool == 'none':
      raise ValueError("student.encoder.pool='none': the heads need a pooled feature; use "
                       "'cls', 'gap' or 'map'")
    self.encoder = ViT(cfg.encoder, rngs=rngs)
    d = cfg.encoder.width
    kw = dict(axes=('embed', 'classes'), dtype=cfg.encoder.dtype,
              param_dtype=cfg.encoder.param_dtype, rngs=rngs)
    self.basic_head = layers.Dense(d, cfg.num_basic, **kw)
    self.compound_head = layers.Dense(d, cfg.num_compound, **kw)
    self.intensity_head = layers.Dense(d, 1, **kw)
    self.va_head = layers.Dense(d, 2, **kw)
    self.feature_head = layers.Dense(d, cfg.feature_dim, axes=('embed', 'mlp'), **{
        k: v for k, v in kw.items() if k != 'axes'}) if cfg.get('feature_dim') else None

  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    embedding = self.encoder.pooled(images, train=train)
    # Heads return f32 so losses and exported probabilities keep full precision.
    f32 = lambda y: y.astype(jnp.float32)
    out = dict(
        basic=f32(self.basic_head(embedding)),
        compound=f32(self.compound_head(embedding)),
        intensity=jax.nn.sigmoid(f32(self.intensity_head(embedding))[:, 0]),
        va=jnp.tanh(f32(self.va_head(embedding))),
        embedding=embedding,
    )
    if self.feature_head is not None:
      out['feature'] = f32(self.feature_head(embedding))
    return out

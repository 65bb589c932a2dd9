"""Abstract model construction and parameter accounting (nothing is allocated)."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from unifer_jax import sharding
from unifer_jax.models import presets
from unifer_jax.models.unifer import UniFER


def abstract_model(model_cfg: ml_collections.ConfigDict | str, seed: int = 0) -> UniFER:
  """The UniFER module with ShapeDtypeStruct leaves, via ``nnx.eval_shape``."""
  cfg = presets.resolve(model_cfg)
  return nnx.eval_shape(lambda: UniFER(cfg, rngs=nnx.Rngs(seed)))


def param_counts(model_cfg) -> dict[str, int]:
  """Parameters per top-level submodule plus 'total'."""
  state = nnx.state(abstract_model(model_cfg), nnx.Param)
  counts = {name: sharding.param_count(sub) for name, sub in state.items()}
  counts['total'] = sum(counts.values())
  return counts


def _human(n: int) -> str:
  for unit, div in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= div:
      return f'{n / div:.2f}{unit}'
  return str(n)


def format_param_counts(label: str, model_cfg) -> str:
  counts = param_counts(model_cfg)
  parts = ', '.join(f'{k} {_human(v)}' for k, v in counts.items() if k != 'total')
  return f'{label}: {counts["total"]:,} parameters ({_human(counts["total"])}) -- {parts}'

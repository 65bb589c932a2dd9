"""LoRA: low-rank adapters on chosen Dense layers of a module (Hu et al. 2021).

``apply(module, rank, alpha, targets, rngs)`` gives every ``layers.Dense`` whose path
matches ``targets`` (a regex over '/'-joined attribute paths, e.g. ``r'attn/(q|v)$'``)
two extra parameters, ``lora_a`` [in, r] and ``lora_b`` [r, out]; the layer then adds
``x @ lora_a @ lora_b * alpha / r``. The base kernel keeps its path, so checkpoints of
the base model load unchanged, and ``lora_b`` starts at zero, so the adapted model
computes exactly what the base model did until it trains. On scanned stacks the adapters
get the kernel's leading ``layers`` axis. Which parameters train is config
(``config.freeze`` freezing everything but ``lora_``).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx

from unifer_jax.models import layers


def _axes(variable: nnx.Variable) -> tuple:
  meta = variable.get_metadata()
  return tuple(meta.get('out_sharding') or meta.get('sharding_names') or (None,) * variable.ndim)


def add_adapter(dense: layers.Dense, rank: int, alpha: float, rngs: nnx.Rngs) -> None:
  kernel = dense.kernel
  *lead, d_in, d_out = kernel.shape
  *lead_names, in_name, out_name = _axes(kernel)
  dtype = kernel[...].dtype
  a = nnx.initializers.normal(1.0 / rank)(rngs.params(), (*lead, d_in, rank), dtype)
  dense.lora_a = nnx.Param(a, out_sharding=(*lead_names, in_name, None), eager_sharding=False)
  dense.lora_b = nnx.Param(jnp.zeros((*lead, rank, d_out), dtype),
                           out_sharding=(*lead_names, None, out_name), eager_sharding=False)
  dense.lora_scale = alpha / rank


def apply(module: nnx.Module, rank: int, alpha: float, targets: str, *, rngs: nnx.Rngs) -> list[str]:
  """Adds adapters in place to the matching Dense layers; returns their paths."""
  pattern = re.compile(targets)
  adapted = []
  for path, node in list(nnx.iter_graph(module)):
    path_s = '/'.join(str(p) for p in path)
    if isinstance(node, layers.Dense) and pattern.search(path_s):
      add_adapter(node, rank, alpha, rngs)
      adapted.append(path_s)
  if not adapted:
    raise ValueError(f'lora.targets={targets!r} matched no Dense layer')
  return adapted

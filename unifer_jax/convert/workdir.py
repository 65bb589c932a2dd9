"""A UniFER training workdir read as a whole-VLM checkpoint, so what a stage trained goes
back out to Hugging Face: ``unifer convert to-hf --src W/finetune --out HF_DIR``.

The newest checkpoint's parameters are read; LoRA adapters are merged into the kernels
they adapt (``kernel + lora_a @ lora_b * alpha / rank``: the HF model computes what the
adapted one did) and the stage-1 heads, which no HF BLIP-2 holds, are left out and named.
What else has no HF equivalent (a conv stem, the token gain) is refused by name
(``vlm.check_exportable``). The whole model passes through host memory once.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from unifer_jax import workdirs
from unifer_jax.convert import commands, vlm
from unifer_jax.convert.hf_io import ConversionError

STAGE1_HEADS = ('vision_proj', 'text_proj', 'itm_head', 'label_head', 'temp')


def is_workdir(path: Path, meta: dict) -> bool:
  return 'stage' in meta and 'model' in meta and (Path(path) / 'checkpoints').is_dir()


def export_config(model_cfg) -> ml_collections.ConfigDict:
  """The trained model's config as HF holds it: no adapters (merged), no stage-1 heads."""
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.lora.rank = 0
  cfg.stage1_heads = False
  return cfg


def merge_lora(params: dict, alpha: float, rank: int) -> list[str]:
  """Folds every ``lora_a`` / ``lora_b`` pair into its kernel, in place; returns the
  merged layers' paths."""
  flat = traverse_util.flatten_dict(params)
  merged = []
  for path in [p for p in flat if p[-1] == 'lora_a']:
    base = path[:-1]
    a, b = flat.pop(path).astype(np.float32), flat.pop(base + ('lora_b',)).astype(np.float32)
    kernel = flat[base + ('kernel',)]
    delta = np.einsum('...ir,...ro->...io', a, b) * (alpha / rank)
    flat[base + ('kernel',)] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
    merged.append('/'.join(map(str, base)))
  params.clear()
  params.update(traverse_util.unflatten_dict(flat))
  return merged


class WorkdirTower(commands.Tower):
  """``commands.Tower`` over a workdir's newest checkpoint (parts read from one restore)."""

  def __init__(self, path: Path, config: ml_collections.ConfigDict):
    from unifer_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    self.trained_cfg = state_lib.model_config(config)
    if state_lib.model_class(self.trained_cfg).__name__ != 'UniFER':
      raise ConversionError(f'{path}: holds a {self.trained_cfg.get("kind")} model; to-hf '
                            'writes a UniFER as BLIP-2 / InstructBLIP (export students with '
                            '`unifer export`)')
    cfg = export_config(self.trained_cfg)
    super().__init__(Path(path), vlm, vlm.model_type_of(cfg), cfg, is_hf=False)
    self._params = None
    self.step = None
    self.notes: list[str] = []

  def describe(self) -> str:
    return f'{self.path} (training workdir, step {self.step})'

  def _restore(self) -> dict:
    if self._params is None:
      from unifer_jax.models.unifer import UniFER  # pylint: disable=g-import-not-at-top
      from unifer_jax.train import param_restore  # pylint: disable=g-import-not-at-top
      abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
          lambda: UniFER(self.trained_cfg, rngs=nnx.Rngs(0))), nnx.Param))
      self.step, params = param_restore.load_params(self.path, abstract)
      params = jax.tree.map(np.asarray, params)
      lora_cfg = self.trained_cfg.get('lora') or {}
      if lora_cfg.get('rank'):
        merged = merge_lora(params, float(lora_cfg.alpha), int(lora_cfg.rank))
        self.notes.append(f'LoRA merged into {len(merged)} kernels')
      dropped = [k for k in STAGE1_HEADS if params.pop(k, None) is not None]
      if dropped:
        self.notes.append(f'left out (no HF BLIP-2 holds them): {", ".join(dropped)}')
      self._params = params
    return self._params

  def part_params(self, part: str, cfg=None) -> dict:
    del cfg  # the checkpoint's own layout
    return self._restore()[part]


def read_tower(path: Path) -> WorkdirTower:
  return WorkdirTower(Path(path), workdirs.read_config(path))

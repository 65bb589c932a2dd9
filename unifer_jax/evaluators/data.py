"""A held-out split in memory for evaluation: images preprocessed exactly as training
sees them without augmentation (the pipeline's eval format), with every label, the
caption and the rationale text of each record."""

from __future__ import annotations

import numpy as np

from unifer_jax.data import pipeline, sources


def load_split(input_cfg, split: str, image_size: int, limit: int = 0,
               batch_size: int = 64) -> dict:
  cfg = pipeline.resolve_config(input_cfg)
  cfg.split = split
  cfg.mixture = []
  pipe = pipeline.Pipeline(cfg, 'eval', batch_size=batch_size, image_size=image_size,
                           train=False, shard=(0, 1), tokenizers=(None, None))
  parts: dict[str, list] = {}
  for _ in range(pipe.num_batches):
    batch = next(pipe)
    keep = batch['valid'] > 0
    for k, v in batch.items():
      parts.setdefault(k, []).append(np.asarray(v)[keep])
    if limit and sum(len(p) for p in parts['valid']) >= limit:
      break
  pipe.close()
  data = {k: np.concatenate(v) for k, v in parts.items()}
  if limit:
    data = {k: v[:limit] for k, v in data.items()}
  src = sources.open_split(cfg.name, split, cfg.data_dir)
  records = [src[int(i)] for i in data['_index']]
  for key in ('caption', 'rationale'):
    data[key] = [_text(r[key]) for r in records]
  return data


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)

"""``config.input.type = 'synthetic_random'``: random batches of the right shapes.

Each global batch is a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted one would, and every process builds only its own rows.
``config.input.pool = k`` cycles through k fixed batches (a smoke run can then show the
loss falling as the model memorises them); 0 draws a fresh batch every step.

``config.input.images_per_row = M > 1`` makes interleaved rows (models/interleave.py):
``image`` [B, M, H, W, 3], ``image_mask`` [B, M], and each row uses 1..M of its slots, each
a run of Q placeholder ids at a random place in the tokens (never a target). What
``unifer compile-check`` lowers for several images per row::

  unifer compile-check --config configs/smoke.py:7b --topology v5p-128 \\
      --config.input.images_per_row=5

Expected (2026-12-07, libtpu 0.0.42; 12 min and 5.5 GB RSS to compile here): global batch
512 rows x 5 image slots at 224 px, seq_len 256 (5 x 32 slots + text): fits at 5.39 GiB
of 95 per chip (6 %), model FLOPs 1.028e+14 per chip (1.285e+14 executed, full remat),
roofline compute 280 ms vs HBM 123 ms and communication 146 ms: compute-bound.
"""

from __future__ import annotations

import numpy as np

from unifer_jax.models import interleave


def images_per_row(config) -> int:
  """M of ``config.input.images_per_row`` (absent or 1: one image in front of the text)."""
  return int(config.input.get('images_per_row', 1) or 1)


def batch_spec(config, model_cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  b, t = config.input.batch_size, config.input.seq_len
  s, m = model_cfg.vit.image_size, images_per_row(config)
  q = model_cfg.qformer.num_queries
  if m > 1 and m * q >= t:
    raise ValueError(f'config.input.seq_len={t} cannot hold images_per_row={m} images of '
                     f'{q} placeholder slots each and any text; raise seq_len')
  spec = {'image': ((b, s, s, 3) if m == 1 else (b, m, s, s, 3), np.float32),
          'tokens': ((b, t), np.int32), 'loss_mask': ((b, t), np.float32)}
  if m > 1:
    spec['image_mask'] = ((b, m), np.int32)
  return spec


def global_batch(config, model_cfg, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
  """Rows ``rows`` (default all) of the global batch number ``step``."""
  spec = batch_spec(config, model_cfg)
  b = spec['tokens'][0][0]
  rows = rows or slice(0, b)
  pool = int(config.input.get('pool', 0))
  step = step % pool if pool else step
  out = {k: [] for k in spec}
  for r in range(rows.start, rows.stop):
    # Per-row generators: the rows a process makes do not depend on the process count.
    rng = np.random.default_rng([config.seed, step, r])
    out['image'].append(rng.standard_normal(spec['image'][0][1:], np.float32))
    out['tokens'].append(rng.integers(0, model_cfg.llm.vocab_size, spec['tokens'][0][1:],
                                      dtype=np.int32))
    mask = np.ones(spec['loss_mask'][0][1:], np.float32)
    mask[0] = 0.0  # the first token (BOS) is context, not a target
    out['loss_mask'].append(mask)
    if 'image_mask' in spec:
      _place_images(rng, model_cfg, out['tokens'][-1], mask, out, spec['image_mask'][0][1])
  return {k: np.stack(v) for k, v in out.items()}


def _place_images(rng, model_cfg, tokens, loss_mask, out, m: int) -> None:
  """Uses 1..m random slots of the row; writes their placeholder runs into ``tokens`` at
  random non-overlapping places after the first token (in place), masked from the loss."""
  q, token = model_cfg.qformer.num_queries, interleave.placeholder_id(model_cfg)
  used = rng.permutation(m) < rng.integers(1, m + 1)
  out['image_mask'].append(used.astype(np.int32))
  n, t = int(used.sum()), len(tokens)
  tokens[tokens == token] = 0           # a random text id must not look like a slot
  # Choose n run starts among the t - 1 - n*q text positions left, then spread them.
  gaps = np.sort(rng.choice(t - 1 - n * q + 1, n, replace=True))
  for k, start in enumerate(gaps + 1 + np.arange(n) * q):
    tokens[start:start + q] = token
    loss_mask[start:start + q] = 0.0

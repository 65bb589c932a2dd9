"""``config.input.type = 'synthetic_random'``: random batches of the right shapes.

Each global batch is a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted one would, and every process builds only its own rows.
``config.input.pool = k`` cycles through k fixed batches (a smoke run can then show the
loss falling as the model memorises them); 0 draws a fresh batch every step.
"""

from __future__ import annotations

import numpy as np


def batch_spec(config, model_cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  b, t = config.input.batch_size, config.input.seq_len
  s = model_cfg.vit.image_size
  return {'image': ((b, s, s, 3), np.float32), 'tokens': ((b, t), np.int32),
          'loss_mask': ((b, t), np.float32)}


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
  return {k: np.stack(v) for k, v in out.items()}

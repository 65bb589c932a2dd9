"""Training examples decoded once and held in memory (``config.input.cache=True``).

When an example is a pure function of its record -- format ``eval`` with augmentation
off, as in the demo's vision and distill stages -- every epoch repeats the same PNG decode
and resize. On the 2-core box that is ~0.7 ms of CPU per image taken from the train step
(40 % of a distill step at batch 64: the pipeline's threads and XLA share the two cores).
The table decodes this process's records once (uint8 pixels, a quarter of the float32
bytes: 16 000 faces at 64 px are 197 MB), and a batch becomes one gather + normalise.

The sampling graph is the pipeline's own (shuffle, repeat, mix: pipeline.py), batched
over record indices, so batch k holds the same rows as without the table, and the
iterator state, resume and process sharding are unchanged (tests/test_memory_table.py
compares the two batch for batch).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import grain
import numpy as np

from unifer_jax.data import augment

log = logging.getLogger(__name__)


def check_cacheable(cfg, fmt: str, train: bool) -> None:
  """``config.input.cache`` needs examples that do not change between epochs (eval
  passes read each record once and ignore it)."""
  if not cfg.cache or not train:
    return
  if fmt != 'eval':
    raise ValueError(f'config.input.cache=True needs input format eval (fixed examples); '
                     f'format {fmt!r} samples its texts per epoch')
  if cfg.augment.get('enabled', True):
    raise ValueError('config.input.cache=True needs config.input.augment.enabled=False: '
                     'augmented examples differ in every epoch')
  if cfg.workers:
    raise ValueError(f'config.input.cache=True keeps the table in this process; set '
                     f'config.input.workers=0 (got {cfg.workers}): a cached batch is a '
                     f'gather, worker processes would only copy the table')


class Table:
  """The examples of one source's records ``shard[0], shard[0] + shard[1], ...``.

  ``maker`` is the pipeline's ExampleMaker (no augmentation); ``source`` the record's
  ``_source`` (its place in the mixture); ``name`` labels the progress line.
  """

  def __init__(self, src, maker, shard: tuple[int, int], source: int, name: str,
               threads: int = 2):
    self.shard, self.mean, self.std = shard, maker.mean, maker.std
    raw = dataclasses.replace(maker, raw_pixels=True)
    rows = grain.MapDataset.range(len(src))[shard[0]::shard[1]]
    n = len(rows)
    it = rows.map(lambda i: raw(source, int(i), src[int(i)], None)).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=256))
    columns: dict[str, np.ndarray] = {}
    t0 = last = time.monotonic()
    for r, ex in enumerate(it):
      if not columns:
        columns = {k: np.empty((n, *np.shape(v)), np.asarray(v).dtype) for k, v in ex.items()}
      for k, v in ex.items():
        columns[k][r] = v
      now = time.monotonic()
      if shard[0] == 0 and (now - last >= 10 or r + 1 == n):   # one process reports
        last, done = now, r + 1
        eta = (now - t0) / done * (n - done)
        print(f'input cache {name}: {done}/{n} records decoded | elapsed {now - t0:.0f} s '
              f'| ETA {eta:.0f} s', flush=True)
    self.columns = columns
    log.info('input cache %s: %d records, %.0f MB', name, n,
             sum(c.nbytes for c in columns.values()) / 2**20)

  def rows(self, index: np.ndarray) -> np.ndarray:
    """Record indices of this shard -> table rows."""
    return (np.asarray(index) - self.shard[0]) // self.shard[1]


class Gather:
  """A batch of (source, record index) pairs -> the batch of examples (grain map fn)."""

  def __init__(self, tables: list[Table]):
    self.tables = tables

  def __call__(self, items) -> dict[str, np.ndarray]:
    source, index = (np.asarray(a) for a in items)
    first = self.tables[0].columns
    out = {k: np.empty((len(index), *c.shape[1:]), c.dtype) for k, c in first.items()}
    for j, table in enumerate(self.tables):
      at = np.flatnonzero(source == j)
      if at.size:
        rows = table.rows(index[at])
        for k, column in table.columns.items():
          out[k][at] = column[rows]
    out['image'] = augment.normalise(out['image'], self.tables[0].mean, self.tables[0].std)
    return out

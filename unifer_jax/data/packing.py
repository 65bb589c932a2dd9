"""Packed rows for the text-heavy stages (lm, generate, instruct): several whole examples
per row, by grain's own packer, so a row carries text instead of padding.

On with ``config.input.pack = True`` (off by default; the demo's figures: see
``benchmarks/data_pipeline.py``). The examples are the ones the unpacked pipeline makes
(``config.input.seq_len`` still bounds each example's text, so truncation and CoT
shortening do not change); packing only arranges them::

  example (variable length)  ->  BestFitPackIterDataset(bins = the per-process batch)
      -> row: tokens, loss_mask, attention_mask, segment_ids, positions   [pack_len]
              image [images_per_row, S, S, 3], image_mask [images_per_row]  (generate,
              instruct; qformer_ids / qformer_mask [images_per_row, Tq] for an
              instruction-aware Q-Former)
      -> batch

* Rows with images (generate, instruct) are interleaved rows (models/interleave.py): an
  example is its run of Q placeholder ids (its image's slots) followed by its text, so
  its positions 0.. Q+n-1 are the ones the unpacked row gives [prefix; text]. The packer
  adds whole examples only -- tokens and image together, never split -- while both the
  row's ``pack_len`` positions and its ``images_per_row`` image slots have room.
* ``segment_ids`` (1, 2, ... per example, 0 = padding) keep attention inside an example
  and ``positions`` restart at 0 in each (grain's ``*_segment_ids`` / ``*_positions``);
  the loss masks the first token of each segment (models/llm.py, train/losses.py).
* Host-side counts per row: ``_examples``, ``_truncated``, ``_no_think`` (the per-example
  labels of the instruct format are not carried: no training loss reads them).
* Resume: grain's packer checkpoints its own iterator state (the parent position of the
  bins being emitted and the next bin); ``Pipeline.get_state`` stores it like any other.
  A packed row is not a pure function of its index, so unlike unpacked rows a packed
  pipeline resumes from that state only (not from a position with another worker count).

``config.input.pack_len`` is the row's length in LLM positions (0: twice an unpacked
row, ``seq_len`` (+ Q for image rows)); it must fit ``model.llm.max_seq_len``.
"""

from __future__ import annotations

import grain
import numpy as np

PACKED_FORMATS = ('lm', 'generate', 'instruct')
META = ('_truncated', '_no_think')


def enabled(cfg, fmt: str, train: bool) -> bool:
  """Whether this pipeline packs; raises on settings packing cannot honour."""
  if not cfg.get('pack', False):
    return False
  if fmt not in PACKED_FORMATS:
    raise ValueError(f'config.input.pack=True packs the formats {PACKED_FORMATS}; format '
                     f'{fmt!r} has no token rows to pack')
  if int(cfg.fewshot.max_shots) > 0:
    raise ValueError('config.input.pack=True with config.input.fewshot.max_shots > 0: '
                     'k-shot rows are interleaved rows already; pack one or the other')
  if cfg.cache:
    raise ValueError('config.input.pack=True with config.input.cache=True: the decoded '
                     'table serves the eval format only')
  return train


def image_slots(cfg, fmt: str) -> int:
  """Image slots of a packed row (0 for text-only rows)."""
  if fmt == 'lm':
    return 0
  m = int(cfg.get('images_per_row', 0))
  if m < 1:
    raise ValueError(f'config.input.images_per_row={m}: a packed {fmt!r} row needs >= 1 '
                     f'image slot')
  return m


def row_length(cfg, fmt: str, queries: int) -> int:
  """LLM positions of a packed row: ``pack_len``, or twice an unpacked row."""
  one = int(cfg.seq_len) + (queries if fmt != 'lm' else 0)
  length = int(cfg.get('pack_len', 0)) or 2 * one
  if length < one:
    raise ValueError(f'config.input.pack_len={length} is shorter than one example '
                     f'(seq_len {cfg.seq_len}' + (f' + {queries} image slots' * (fmt != 'lm'))
                     + f' = {one})')
  return length


class ExampleForm:
  """An unpacked example -> the variable-length element the packer takes: its real
  tokens (after Q placeholder ids standing for its image, in image formats), the image
  as one slot ``[1, S, S, 3]``. Picklable (grain workers)."""

  def __init__(self, fmt: str, queries: int = 0, image_token: int = -1):
    self.fmt, self.queries, self.image_token = fmt, queries, image_token
    if fmt != 'lm' and (queries <= 0 or image_token < 0):
      raise ValueError(f'packed {fmt!r} rows need the model\'s image queries and placeholder '
                       f'id; got {queries}, {image_token}')

  def __call__(self, ex: dict) -> dict:
    n = int(ex['attention_mask'].sum())
    out = {'tokens': ex['tokens'][:n], 'loss_mask': ex['loss_mask'][:n],
           **{k: np.int32(ex[k]) for k in META}}
    if self.fmt == 'lm':
      return out
    q = self.queries
    out['tokens'] = np.concatenate([np.full((q,), self.image_token, np.int32), out['tokens']])
    out['loss_mask'] = np.concatenate([np.zeros((q,), np.float32), out['loss_mask']])
    out['image'] = ex['image'][None]
    for k in ('qformer_ids', 'qformer_mask'):
      if k in ex:
        out[k] = ex[k][None]
    return out


class RowForm:
  """grain's packed element -> the row the loss reads (keys: module docstring)."""

  def __init__(self, fmt: str):
    self.fmt = fmt

  def __call__(self, packed: dict) -> dict:
    seg = packed['tokens_segment_ids']
    row = {'tokens': packed['tokens'], 'loss_mask': packed['loss_mask'],
           'attention_mask': (seg > 0).astype(np.int32), 'segment_ids': seg,
           'positions': packed['tokens_positions'],
           '_examples': np.int32(len(packed['_truncated'])),
           **{k: np.int32(sum(packed[k])) for k in META}}
    if self.fmt != 'lm':
      row['image'] = packed['image']
      row['image_mask'] = (packed['image_segment_ids'] > 0).astype(np.int32)
      for k in ('qformer_ids', 'qformer_mask'):
        if k in packed:
          row[k] = packed[k]
    return row


def pack(ds: grain.IterDataset, cfg, fmt: str, *, batch_size: int, queries: int,
         pad_id: int, seed: int, qformer_prompt: bool) -> grain.IterDataset:
  """Elements of :class:`ExampleForm` -> batches of packed rows."""
  length = row_length(cfg, fmt, queries)
  struct = {'tokens': length, 'loss_mask': length}
  padding = {'tokens': pad_id, 'loss_mask': 0.0}
  m = image_slots(cfg, fmt)
  if m:
    struct['image'] = m
    padding['image'] = 0.0     # absent slots hold zeros (models/interleave.py)
    if qformer_prompt:
      struct.update(qformer_ids=m, qformer_mask=m)
      padding.update(qformer_ids=0, qformer_mask=0)
  # One round of bins per batch: the packer emits all its bins when an example fits none,
  # so each batch is one round (and a resumed run re-packs the round it stopped in).
  ds = grain.experimental.BestFitPackIterDataset(
      ds, length_struct=struct, num_packing_bins=batch_size, seed=seed,
      meta_features=META, padding_struct=padding)
  return ds.map(RowForm(fmt)).batch(batch_size, drop_remainder=True)


def example_spec(cfg, fmt: str, image_size: int, queries: int, qformer_prompt: bool) -> dict:
  """{key: (shape, dtype)} of one packed row's device keys (no '_' metadata)."""
  length = row_length(cfg, fmt, queries)
  spec = {'tokens': ((length,), np.int32), 'loss_mask': ((length,), np.float32),
          'attention_mask': ((length,), np.int32), 'segment_ids': ((length,), np.int32),
          'positions': ((length,), np.int32)}
  m = image_slots(cfg, fmt)
  if m:
    spec['image'] = ((m, image_size, image_size, 3), np.float32)
    spec['image_mask'] = ((m,), np.int32)
    if qformer_prompt:
      spec['qformer_ids'] = ((m, cfg.text_len), np.int32)
      spec['qformer_mask'] = ((m, cfg.text_len), np.int32)
  return spec

"""How much of a split tfds may hold in memory while it writes it.

tfds' generator writer collects a whole split in memory before it writes the shards
(to count them), and past `tensorflow_datasets.core.shuffle.MAX_MEM_BUFFER_SIZE`
(1000 MiB) it spills to bucket files through `tf.io.gfile` -- TensorFlow, which the
pinned set leaves out, so the run dies with "No module named 'tensorflow'" once a
split passes ~58 000 procedural faces (17 KB each; `unifer prep synthetic_faces --size
80000`, 2026-12-04). `disable_shuffling=True` does not avoid the buffer.

`splits_in_memory` lets a split grow to a quarter of the machine's RAM instead (6 GiB,
~350 000 such faces, on a 24 GiB machine), and turns a split larger than that into an
error that says what to do. Past it, Apache Beam (`unifer prep ... --runner
DirectRunner`): tfds' Beam writer groups records by shard and holds one shard at a time.
"""

import contextlib
import os

from tensorflow_datasets.core import shuffle as tfds_shuffle


def memory_budget() -> int:
  """Bytes one split may take in the writer's buffer: a quarter of physical memory."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 4


@contextlib.contextmanager
def splits_in_memory(what: str, instead: str):
  """Runs a non-Beam `download_and_prepare` with the larger buffer (restored after).

  `what` names the dataset in the error, `instead` says what the user can do.
  """
  before = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  budget = max(before, memory_budget())
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = budget
  try:
    yield
  except ModuleNotFoundError as e:
    if e.name != 'tensorflow':
      raise
    raise ValueError(f'{what}: a split outgrew the {budget >> 20} MiB that tfds may hold in '
                     'memory while writing it (a quarter of this machine\'s RAM), and tfds '
                     f'spills to disk only through TensorFlow, which is not installed; {instead}'
                     ) from e
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = before

"""Shared helpers of the builder tests: tiny images in real formats, bad files, read-back."""

import io
import os

import numpy as np
from PIL import Image

from data_prep import registry
from data_prep.builders import common


def image(path, size=(40, 40), value=128, fmt=None, mode='RGB'):
  """Writes a small image (a per-file grey level so records can be told apart)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  w, h = size
  arr = np.full((h, w, 3), value % 256, np.uint8)
  arr[: h // 2, :, 0] = (value * 7) % 256   # some structure, not a flat field
  Image.fromarray(arr).convert(mode).save(path, fmt)
  return path


def truncated(path, size=(64, 64)):
  """A JPEG cut in half: opens, but `load()` fails (what a broken download looks like)."""
  buf = io.BytesIO()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, 'JPEG')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
  return path


def write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
  return path


def records(out, name, split):
  """All records of a prepared split, by id."""
  src = registry.data_source(out, name, split)
  recs = [src[i] for i in range(len(src))]
  return {r['id'].decode(): r for r in recs}


def skipped_at(report, reason):
  """The 'file:line' places the report lists for `reason` (detail stripped)."""
  return sorted(w.split(' (')[0] for w in report.examples.get(reason, []))


def one_hot(index):
  v = np.zeros(8, np.float32)
  v[index] = 1
  return v


def astronaut_face_scene(size=(320, 240)):
  """A real face (skimage's astronaut) pasted into a larger grey scene."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  face = Image.fromarray(data.astronaut()).crop((150, 40, 300, 190)).resize((110, 110))
  scene = Image.new('RGB', size, (90, 90, 90))
  scene.paste(face, (100, 60))
  return scene


__all__ = ['common']


RAF_MANUAL = '30.5\t40.25\n69.0\t41.0\n50\t60\n36\t75\n64\t75\n{g}\n{r}\n{a}\n'


def rafdb_fixture(root, subset, codes):
  """RAF-DB's real layout under ``root/subset`` ('basic' | 'compound'): every 4th image a
  test one, _aligned.jpg faces, _manu_attri.txt annotations. Returns (the subset's
  folder, the label lines for EmoLabel/list_patition_label.txt, not yet written)."""
  base = os.path.join(root, subset)
  lines = []
  for i, code in enumerate(codes, 1):
    split = 'train' if i % 4 else 'test'
    stem = f'{split}_{i:05d}' if split == 'train' else f'{split}_{i:04d}'
    lines.append(f'{stem}.jpg {code}')
    image(f'{base}/Image/aligned/{stem}_aligned.jpg', (100, 100), value=i)
    write(f'{base}/Annotation/manual/{stem}_manu_attri.txt',
          RAF_MANUAL.format(g=i % 3, r=(i + 1) % 3, a=i % 5))
  return base, lines

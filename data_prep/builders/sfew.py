"""SFEW 2.0, as shipped (DATASETS.md):

  Train/Train_Aligned_Faces/<Angry|Disgust|Fear|Happy|Neutral|Sad|Surprise>/<Movie>_<frame>_<n>.png
  Val/Val_Aligned_Faces/<class>/...

-> train / validation (the test labels are private). The faces are already aligned
(143x181) and kept as they are. A class folder not in the list is a label out of
range; OS junk (Thumbs.db, dot files) is ignored.
"""

import os

import numpy as np

from data_prep.builders import common
from unifer_jax.data import labels, schema

CLASSES = {'Angry': 'anger', 'Disgust': 'disgust', 'Fear': 'fear', 'Happy': 'happiness',
           'Neutral': 'neutral', 'Sad': 'sadness', 'Surprise': 'surprise'}
SPLITS = {'train': ('Train', 'Train_Aligned_Faces'), 'validation': ('Val', 'Val_Aligned_Faces')}


class Sfew(common.Source):
  """SFEW 2.0 aligned faces (7 classes)."""

  name = 'sfew'
  description = __doc__

  def scan(self, tally):
    units = {}
    for split, parts in SPLITS.items():
      root = os.path.join(self.src, *parts)
      if not os.path.isdir(root):
        continue
      units[split] = []
      for cls in sorted(os.listdir(root)):
        folder = os.path.join(root, cls)
        if not os.path.isdir(folder):
          continue
        files = sorted(f for f in os.listdir(folder) if common.is_image_file(f))
        if cls not in CLASSES:
          for f in files:
            tally.add(common.Skipped(common.LABEL, self.rel(os.path.join(folder, f)),
                                     f'class folder {cls!r} not in {sorted(CLASSES)}'))
          continue
        index = labels.BASIC.index(CLASSES[cls])
        units[split] += [(os.path.join(folder, f), index, split) for f in files]
    if not units:
      raise FileNotFoundError(f'sfew: neither Train/Train_Aligned_Faces nor '
                              f'Val/Val_Aligned_Faces under --src {self.src}')
    return units

  def process(self, unit):
    path, index, split = unit
    img, data = common.open_image(path, self.rel(path))
    key = f'{split}/{os.path.basename(path).rsplit(".", 1)[0]}'
    dist = np.zeros(len(labels.BASIC), np.float32)
    dist[index] = 1
    yield common.Ok(key, schema.empty_record(
        image=common.keep_or_encode(img, data), id=key, source=self.name, expression=index,
        label_dist=dist))

"""AffectNet (manually annotated part), as shipped (DATASETS.md):

  training.csv / validation.csv  (in --src or --src/Manually_Annotated_file_lists/)
      header subDirectory_filePath,face_x,face_y,face_width,face_height,
             facial_landmarks,expression,valence,arousal
      landmarks: 68 points as ';'-separated x;y floats
  Manually_Annotated_Images/<subDirectory_filePath>   (or the path relative to --src)

Expression codes 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger,
7 Contempt; 8 None, 9 Uncertain and 10 No-Face are excluded (the protocol, not a
failure), as is contempt in the 7-class protocol (config '7class'; '8class' is the
default). Valence/arousal in [-1, 1]; -2 means invalid and is stored as NaN.
Faces are aligned on the eye landmarks (else cropped from the face box) to
face_size x face_size.

The Kaggle "AffectNet-sample" variant (train_class/ and val_class/ folders with
class001..class008 = codes 0..7, no CSV) is read too: images kept as they are.
"""

import csv
import os

import numpy as np

from data_prep.builders import common
from unifer_jax.data import labels, schema

CODES = ('neutral', 'happiness', 'sadness', 'surprise', 'fear', 'disgust', 'anger', 'contempt')
EXCLUDED = {8: 'None', 9: 'Uncertain', 10: 'No-Face'}
HEADER = ['subDirectory_filePath', 'face_x', 'face_y', 'face_width', 'face_height',
          'facial_landmarks', 'expression', 'valence', 'arousal']
FILES = {'train': 'training.csv', 'validation': 'validation.csv'}
FOLDERS = {'train': 'train_class', 'validation': 'val_class'}


def _va(text):
  """valence/arousal text -> float (NaN for AffectNet's -2), None if out of range."""
  v = float(text)
  if v == -2:
    return float('nan')
  return v if -1 <= v <= 1 else None


class AffectNet(common.Source):
  """AffectNet 7- or 8-class expressions with valence/arousal."""

  name = 'affectnet'
  description = __doc__
  configs = {'8class': {'classes': 8}, '7class': {'classes': 7}}

  def __init__(self, src, *, classes: int = 8, align: bool = True, **kwargs):
    super().__init__(src, **kwargs)
    if classes not in (7, 8):
      raise ValueError(f'AffectNet classes must be 7 or 8, got {classes}')
    self.classes, self.align = classes, align

  def _code(self, code, where, tally):
    """The BASIC index for an expression code, or None (tallied)."""
    if code in EXCLUDED:
      tally.add(common.Excluded(f'expression {code} ({EXCLUDED[code]})', where))
    elif code == 7 and self.classes == 7:
      tally.add(common.Excluded('contempt (7-class protocol)', where))
    elif code is None or not 0 <= code < len(CODES):
      tally.add(common.Skipped(common.LABEL, where, f'expression {code}'))
    else:
      return labels.BASIC.index(CODES[code])
    return None

  def scan(self, tally):
    lists = next((d for d in (self.src, os.path.join(self.src, 'Manually_Annotated_file_lists'))
                  if os.path.isfile(os.path.join(d, FILES['train']))
                  or os.path.isfile(os.path.join(d, FILES['validation']))), None)
    if lists is None:
      if any(os.path.isdir(os.path.join(self.src, f)) for f in FOLDERS.values()):
        return self._scan_folders(tally)
      raise FileNotFoundError(f'affectnet: no training.csv / validation.csv (or train_class/) '
                              f'under --src {self.src}')
    images = os.path.join(self.src, 'Manually_Annotated_Images')
    images = images if os.path.isdir(images) else self.src
    units = {}
    for split, filename in FILES.items():
      path = os.path.join(lists, filename)
      if not os.path.isfile(path):
        continue
      units[split] = []
      with open(path, newline='', encoding='utf-8', errors='replace') as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if header != HEADER:
          raise ValueError(f'{path}: header must be {",".join(HEADER)}, got {header}')
        for lineno, row in enumerate(rows, 2):
          where = f'{self.rel(path)}:{lineno}'
          try:
            if len(row) != len(HEADER):
              raise ValueError(f'{len(row)} fields')
            box = [float(v) for v in row[1:5]]
            marks = [float(v) for v in row[5].split(';')] if row[5].strip() else []
            if marks and len(marks) != 136:
              raise ValueError(f'{len(marks)} landmark values, expected 136')
            code = common.parse_int(row[6])
            va = (_va(row[7]), _va(row[8]))
          except ValueError as e:
            tally.add(common.Skipped(common.MALFORMED, where, str(e)))
            continue
          index = self._code(code, where, tally)
          if index is None:
            continue
          if None in va:
            tally.add(common.Skipped(common.LABEL, where, f'valence/arousal {row[7]}/{row[8]}'))
            continue
          x, y, w, h = box
          units[split].append((os.path.join(images, row[0]), index, va, (x, y, x + w, y + h),
                               marks or None, row[0], where))
    return units

  def _scan_folders(self, tally):
    units = {}
    for split, folder in FOLDERS.items():
      root = os.path.join(self.src, folder)
      if not os.path.isdir(root):
        continue
      units[split] = []
      for cls in sorted(os.listdir(root)):
        code = common.parse_int(cls[len('class'):]) if cls.startswith('class') else None
        for name in sorted(os.listdir(os.path.join(root, cls))):
          if not common.is_image_file(name):
            continue
          path = os.path.join(root, cls, name)
          index = self._code(None if code is None else code - 1, self.rel(path), tally)
          if index is not None:
            units[split].append((path, index, (float('nan'),) * 2, None, None,
                                 f'{folder}/{cls}/{name}', self.rel(path)))
    return units

  def process(self, unit):
    path, index, (valence, arousal), box, marks, key, where = unit
    img, data = common.open_image(path, where)
    if box is None:   # the Kaggle sample: already face crops
      image = common.keep_or_encode(img, data)
    else:
      image = self.face(img, where, box=box,
                        landmarks=np.reshape(marks, (68, 2)) if marks and self.align else None)
    dist = np.zeros(len(labels.BASIC), np.float32)
    dist[index] = 1
    yield common.Ok(key, schema.empty_record(
        image=image, id=key, source=self.name, expression=index, valence=valence,
        arousal=arousal, label_dist=dist))

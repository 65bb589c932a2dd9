"""CK+ (Extended Cohn-Kanade), as shipped (DATASETS.md):

  cohn-kanade-images/S005/001/S005_001_00000011.png     frame sequences, neutral -> peak
  Emotion/S005/001/S005_001_00000011_emotion.txt        one float, e.g. '3.0000000e+00'
  Landmarks/S005/001/S005_001_00000011_landmarks.txt    68 'x y' lines (optional)

Codes 0 neutral, 1 anger, 2 contempt, 3 disgust, 4 fear, 5 happy, 6 sadness,
7 surprise. Only the 327 labelled sequences are used: their last `peak_frames`
frames (3, the usual protocol) carry the label; `neutral_first=True` adds each
sequence's first frame as neutral. Frames are full 640x490 shots: faces are aligned
on the landmarks when the Landmarks folder has them, else found by the detector
(no face -> skipped). CK+ has no official split: everything is 'train'; ids start
with the subject (S005/...) for subject-wise folds.
"""

import os

import numpy as np

from data_prep.builders import common
from unifer_jax.data import labels, schema

CODES = ('neutral', 'anger', 'contempt', 'disgust', 'fear', 'happiness', 'sadness', 'surprise')


def read_landmarks(path):
  """[68, 2] points, or None if the file is absent or not 68 'x y' lines."""
  try:
    with open(path) as f:
      pts = np.array([[float(v) for v in line.split()] for line in f if line.strip()])
  except (OSError, ValueError):
    return None
  return pts if pts.shape == (68, 2) else None


class CkPlus(common.Source):
  """CK+ peak frames of the labelled sequences (8 classes incl. contempt)."""

  name = 'ckplus'
  description = __doc__

  def __init__(self, src, *, peak_frames: int = 3, neutral_first: bool = False, **kwargs):
    super().__init__(src, **kwargs)
    if peak_frames < 1:
      raise ValueError(f'peak_frames must be >= 1, got {peak_frames}')
    self.peak_frames, self.neutral_first = peak_frames, neutral_first

  def scan(self, tally):
    emotion_root = self.find('Emotion', kind='dir')
    image_root = self.find('cohn-kanade-images', kind='dir')
    units = []
    for dirpath, _, files in sorted(os.walk(emotion_root)):
      for name in sorted(f for f in files if f.endswith('_emotion.txt')):
        path = os.path.join(dirpath, name)
        where = f'{self.rel(path)}:1'
        with open(path, encoding='utf-8', errors='replace') as f:
          text = f.read().strip()
        code = common.parse_int(text) if len(text.split()) == 1 else None
        if code is None:
          tally.add(common.Skipped(common.MALFORMED, where, repr(text[:40])))
          continue
        if not 0 <= code < len(CODES):
          tally.add(common.Skipped(common.LABEL, where, f'code {code}'))
          continue
        seq = os.path.relpath(dirpath, emotion_root)          # S005/001
        seq_dir = os.path.join(image_root, seq)
        frames = sorted(f for f in os.listdir(seq_dir) if common.is_image_file(f)) \
            if os.path.isdir(seq_dir) else []
        if not frames:
          tally.add(common.Skipped(common.MISSING, where, f'no frames in {self.rel(seq_dir)}'))
          continue
        chosen = [(f, labels.BASIC.index(CODES[code])) for f in frames[-self.peak_frames:]]
        if self.neutral_first and len(frames) > self.peak_frames:
          chosen.insert(0, (frames[0], labels.BASIC.index('neutral')))
        for frame, index in chosen:
          units.append((seq, frame, index, where))
    return {'train': units}

  def process(self, unit):
    seq, frame, index, where = unit
    path = os.path.join(self.src, 'cohn-kanade-images', seq, frame)
    img, _ = common.open_image(path, where)
    stem = frame.rsplit('.', 1)[0]
    marks = read_landmarks(os.path.join(self.src, 'Landmarks', seq, f'{stem}_landmarks.txt'))
    image = self.face(img, self.rel(path), landmarks=marks)
    key = f'{seq}/{stem}'
    dist = np.zeros(len(labels.BASIC), np.float32)
    dist[index] = 1
    yield common.Ok(key, schema.empty_record(
        image=image, id=key, source=self.name, expression=index, label_dist=dist))

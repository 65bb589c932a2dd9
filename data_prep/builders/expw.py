"""ExpW (Expression in-the-Wild), as shipped (DATASETS.md):

  label/label.lst   one face per line, space-separated:
      image_name face_id face_box_top face_box_left face_box_right face_box_bottom
      face_box_cofidence expression_label          (sic: "cofidence")
  image/origin/<image_name>   full scenes

Labels 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral (FER2013's
order). Each face is cut from its box as a square crop with margin at face_size.
ExpW has no official split: images go to train / validation / test (80/10/10) by a
hash of the image name, so faces of one scene stay in one split.
"""

import collections
import os
import zlib

import numpy as np

from data_prep.builders import common
from unifer_jax.data import faces, labels, schema

CODES = ('anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise', 'neutral')


def split_of(image_name: str) -> str:
  """Deterministic 80/10/10 split by image (crc32, stable across runs and machines)."""
  bucket = zlib.crc32(image_name.encode()) % 10
  return 'train' if bucket < 8 else ('validation' if bucket == 8 else 'test')


class ExpW(common.Source):
  """ExpW faces cropped from their scenes (7 classes)."""

  name = 'expw'
  description = __doc__

  def scan(self, tally):
    path = self.find(os.path.join('label', 'label.lst'), 'label.lst')
    by_image = collections.defaultdict(list)
    for lineno, line in common.read_lines(path):
      where = f'{self.rel(path)}:{lineno}'
      parts = line.split()
      nums = [common.parse_int(p) for p in parts[1:6] + parts[7:]] if len(parts) == 8 else [None]
      if None in nums or common.parse_float(parts[6]) is None:
        tally.add(common.Skipped(common.MALFORMED, where, f'{len(parts)} fields, expected 8 numbers'))
        continue
      face_id, top, left, right, bottom, code = nums
      if not 0 <= code < len(CODES):
        tally.add(common.Skipped(common.LABEL, where, f'expression {code}'))
        continue
      if not (right > left and bottom > top and left >= 0 and top >= 0):
        tally.add(common.Skipped(common.MALFORMED, where, f'box t{top} l{left} r{right} b{bottom}'))
        continue
      by_image[parts[0]].append((face_id, (left, top, right, bottom),
                                 labels.BASIC.index(CODES[code]), where))
    units = {'train': [], 'validation': [], 'test': []}
    for name, faces_ in by_image.items():   # one unit per scene: decode it once
      units[split_of(name)].append((name, faces_))
    return units

  def process(self, unit):
    name, faces_ = unit
    path = os.path.join(self.src, 'image', 'origin', name)
    try:
      img, _ = common.open_image(path, faces_[0][3])
    except common.Skip as e:   # every face of this scene is lost, each reported
      for *_, where in faces_:
        yield e.outcome._replace(where=where)
      return
    image = common.rgb_array(img)
    h, w = image.shape[:2]
    for face_id, box, index, where in faces_:
      if box[2] > w or box[3] > h:
        yield common.Skipped(common.MALFORMED, where, f'box {box} outside the {w}x{h} image')
        continue
      crop = faces.crop(image, box, size=self.face_size, margin=self.face_margin)
      key = f'{name.rsplit(".", 1)[0]}#{face_id}'
      dist = np.zeros(len(labels.BASIC), np.float32)
      dist[index] = 1
      yield common.Ok(key, schema.empty_record(
          image=common.encode(crop), id=key, source=self.name, expression=index, label_dist=dist))

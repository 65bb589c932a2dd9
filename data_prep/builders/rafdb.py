"""RAF-DB basic and compound, as shipped (DATASETS.md):

  basic/EmoLabel/list_patition_label.txt     'train_00001.jpg 5' (sic: "patition")
  basic/Image/aligned/train_00001_aligned.jpg   100x100, already aligned
  basic/Image/original/train_00001.jpg          (images='original' only)
  basic/Annotation/manual/train_00001_manu_attri.txt
      5 landmark lines 'x<TAB>y' (eye centres, nose tip, mouth corners), then gender
      (0 male, 1 female, 2 unsure), race (0 Caucasian, 1 African-American, 2 Asian),
      age group (0: 0-3, 1: 4-19, 2: 20-39, 3: 40-69, 4: 70+)
  compound/...                                  the same layout, labels 1..11

--src is the folder holding basic/ and compound/ (or basic/ or compound/ itself). The
split is the name prefix (train_/test_). The manual attributes fill gender / race /
age_group (their codes are already in labels.GENDERS / RACES / AGE_GROUPS order); a
missing or malformed attribute file keeps the image and is reported as a warning.
With images='original' the faces are aligned on the manual eye landmarks instead.
"""

import os

import numpy as np

from data_prep.builders import common
from unifer_jax.data import labels, schema

# RAF-DB basic codes 1..7 -> labels.BASIC.
BASIC_CODES = {1: 'surprise', 2: 'fear', 3: 'disgust', 4: 'happiness', 5: 'sadness',
               6: 'anger', 7: 'neutral'}
SPLITS = {'train': 'train', 'test': 'test'}


def read_manual(path) -> dict:
  """Landmarks [5, 2] and the attribute codes of one `_manu_attri.txt`; ValueError if malformed."""
  with open(path, encoding='utf-8', errors='replace') as f:
    rows = [line.split() for line in f if line.strip()]
  if len(rows) < 8 or any(len(r) != 2 for r in rows[:5]) or any(len(r) != 1 for r in rows[5:8]):
    raise ValueError('expected 5 "x y" landmark lines then gender, race and age lines')
  points = np.array([[float(v) for v in r] for r in rows[:5]], np.float64)
  codes = {}
  for field, row, vocab in (('gender', rows[5], labels.GENDERS), ('race', rows[6], labels.RACES),
                            ('age_group', rows[7], labels.AGE_GROUPS)):
    v = common.parse_int(row[0])
    if v is None or not 0 <= v < len(vocab):
      raise ValueError(f'{field} code {row[0]!r} is not in 0..{len(vocab) - 1}')
    codes[field] = v
  return {'landmarks': points, **codes}


class RafdbBasic(common.Source):
  """RAF-DB basic emotions (7 classes) with the manual gender/race/age attributes."""

  name = 'rafdb'
  subset = 'basic'
  description = __doc__
  configs = {'default': {}}

  def __init__(self, src, *, images: str = 'aligned', **kwargs):
    super().__init__(src, **kwargs)
    if images not in ('aligned', 'original'):
      raise ValueError(f"images must be 'aligned' or 'original', got {images!r}")
    self.images = images
    root = os.path.join(self.src, self.subset)
    self.root = root if os.path.isdir(root) else self.src

  def label(self, code: int):
    """(field, index) for a code of this subset, None if out of range."""
    return ('expression', labels.BASIC.index(BASIC_CODES[code])) if code in BASIC_CODES else None

  def scan(self, tally):
    path = os.path.join(self.root, 'EmoLabel', 'list_patition_label.txt')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{self.name}: {path} not found; --src must hold '
                              f'{self.subset}/EmoLabel/list_patition_label.txt')
    units = {s: [] for s in SPLITS.values()}
    for lineno, line in common.read_lines(path):
      where = f'{self.rel(path)}:{lineno}'
      parts = line.split()
      code = common.parse_int(parts[1]) if len(parts) == 2 else None
      split = SPLITS.get(parts[0].split('_')[0]) if parts else None
      if code is None or split is None or not parts[0].lower().endswith('.jpg'):
        tally.add(common.Skipped(common.MALFORMED, where, repr(line)))
        continue
      label = self.label(code)
      if label is None:
        tally.add(common.Skipped(common.LABEL, where, f'code {code}'))
        continue
      units[split].append((parts[0], label, where))
    return units

  def _attributes(self, stem):
    path = os.path.join(self.root, 'Annotation', 'manual', f'{stem}_manu_attri.txt')
    try:
      return read_manual(path), None
    except FileNotFoundError:
      return None, ('manual attributes missing', self.rel(path))
    except ValueError as e:
      return None, ('manual attributes malformed', f'{self.rel(path)} ({e})')

  def process(self, unit):
    name, (field, index), where = unit
    stem = name[:-len('.jpg')]
    folder, file = ('aligned', f'{stem}_aligned.jpg') if self.images == 'aligned' else ('original', name)
    img, data = common.open_image(os.path.join(self.root, 'Image', folder, file), where)
    manual, problem = self._attributes(stem)
    if self.images == 'aligned':
      image = common.keep_or_encode(img, data)
    else:   # align on the manual eye landmarks (detector if the file is missing)
      image = self.face(img, where, landmarks=None if manual is None else manual['landmarks'])
    if problem:   # the image stays; the run reports the lost attributes
      yield common.Warned(*problem)
    attrs = {k: manual[k] for k in ('gender', 'race', 'age_group')} if manual else {}
    dist = np.zeros(len(labels.BASIC), np.float32)
    if field == 'expression':
      dist[index] = 1
    else:
      for c in labels.COMPOUND_COMPONENTS[labels.COMPOUND[index]]:
        dist[labels.BASIC.index(c)] = 0.5
    yield common.Ok(stem, schema.empty_record(
        image=image, id=stem, source=self.name, label_dist=dist, **{field: index}, **attrs))


class RafdbCompound(RafdbBasic):
  """RAF-DB compound emotions (11 classes; label_dist splits 0.5/0.5 over the two basics)."""

  name = 'rafdb_compound'
  subset = 'compound'
  description = __doc__

  def label(self, code: int):
    return ('compound', code - 1) if 1 <= code <= len(labels.COMPOUND) else None

"""FER2013 and FERPlus, as shipped (DATASETS.md).

FER2013: `fer2013.csv`, header `emotion,pixels,Usage`; emotion 0 Angry, 1 Disgust,
2 Fear, 3 Happy, 4 Sad, 5 Surprise, 6 Neutral (the CSV order, not the alphabetical
image-folder re-release); pixels = 2,304 space-separated 48x48 grey values; Usage
Training / PublicTest / PrivateTest -> train / validation / test. --src is the folder
holding fer2013.csv or the file itself.

FERPlus: 10 crowd votes per image over neutral, happiness, surprise, sadness, anger,
disgust, fear, contempt, unknown, NF. Either layout:
  * `FER2013Train|Valid|Test/label.csv` (header-less: `fer0032220.png,"(0, 0, 48, 48)",v1..v10`)
    next to the PNGs, as microsoft/FERPlus' generate_training_data.py writes them, or
  * `fer2013new.csv` (header `Usage,Image name,neutral,...,NF`, rows in fer2013.csv's
    order; a row with an empty name has no image) next to `fer2013.csv`.
Votes become labels by the reference rules of microsoft/FERPlus src/ferplus.py
(`ferplus_label`); rows whose result is unknown/NF are excluded, as there.
"""

import csv
import os
import sys

import numpy as np

from data_prep.builders import common
from unifer_jax.data import labels, schema

FER_CODES = ('anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise', 'neutral')
USAGE = {'Training': 'train', 'PublicTest': 'validation', 'PrivateTest': 'test'}
FERPLUS_FOLDERS = {'FER2013Train': 'train', 'FER2013Valid': 'validation', 'FER2013Test': 'test'}
# fer2013new.csv's vote columns; the last two (unknown, NF) are not emotions.
FERPLUS_COLUMNS = ('neutral', 'happiness', 'surprise', 'sadness', 'anger', 'disgust', 'fear',
                   'contempt', 'unknown', 'NF')
_TO_BASIC = np.array([labels.BASIC.index(c) for c in FERPLUS_COLUMNS[:8]])
MODES = ('majority', 'probability', 'crossentropy', 'multi_target')


def ferplus_label(votes, mode: str = 'majority'):
  """The reference FERPlus rules: 10 vote counts -> a distribution over the 8
  emotions (FERPLUS_COLUMNS order), or None when the sample is discarded.

  * every emotion with a single vote is dropped (outlier removal);
  * majority: the top emotion if it has more than half of the remaining votes;
  * probability / crossentropy: the top emotions (ties together) until 75% of the
    votes are covered, at most 3; an unknown/NF among the tops stops the walk (and is
    dropped if emotions came before it); discarded if <= 50% of the votes are covered;
  * multi_target: every emotion with at least 30% of the votes; discarded if <= 50%;
  * a result whose argmax is unknown or NF is discarded.
  """
  if mode not in MODES:
    raise ValueError(f'FERPlus mode must be one of {MODES}, got {mode!r}')
  raw = [0.0 if v < 1.0 + sys.float_info.epsilon else float(v) for v in votes]
  if len(raw) != 10:
    raise ValueError(f'FERPlus rows have 10 vote counts, got {len(raw)}')
  total = sum(raw)
  unknown = [0.0] * 10
  unknown[8] = 1.0
  out = [0.0] * 10
  if mode == 'majority':
    top = max(raw)
    if top > 0.5 * total:
      out[int(np.argmax(raw))] = top
    else:
      out = unknown
  elif mode in ('probability', 'crossentropy'):
    covered, count, valid = 0.0, 0, True
    while covered < 0.75 * total and count < 3 and valid:
      top = max(raw)
      for i in range(10):
        if raw[i] == top:
          out[i], raw[i] = top, 0.0
          covered += top
          count += 1
          if i >= 8:   # unknown / NF tie with the top: stop here
            valid = False
            if sum(out) > top:   # emotions came before it: drop the unknown/NF
              out[i] = 0.0
              count -= 1
            break
    if sum(out) <= 0.5 * total or count > 3:
      out = unknown
  else:   # multi_target
    out = [v if v >= 0.3 * total else 0.0 for v in raw]
    if sum(out) <= 0.5 * total:
      out = unknown
  out = np.asarray(out) / sum(out)
  if int(np.argmax(out)) >= 8:
    return None
  emotions = out[:8]
  return emotions / emotions.sum()


def to_basic(dist8) -> np.ndarray:
  """A distribution in FERPLUS_COLUMNS order -> labels.BASIC order."""
  out = np.zeros(len(labels.BASIC), np.float32)
  out[_TO_BASIC] = dist8
  return out


def grey_png(pixels: str, where: str) -> bytes:
  """FER2013's pixel string -> 48x48 image as 3-channel PNG; Skip if not 2,304 values."""
  try:
    values = np.array(pixels.split(), dtype=np.int64)
  except ValueError:
    raise common.Skip(common.UNREADABLE, where, 'pixels are not integers') from None
  if values.size != 48 * 48 or values.min(initial=0) < 0 or values.max(initial=0) > 255:
    raise common.Skip(common.UNREADABLE, where,
                      f'truncated: {values.size} of 2304 pixel values' if values.size != 2304
                      else 'pixel values outside 0..255')
  return common.encode(values.astype(np.uint8).reshape(48, 48), 'PNG')


def _csv_rows(path):
  """(line number, row) of a CSV file (rows are single lines in these files)."""
  with open(path, newline='', encoding='utf-8', errors='replace') as f:
    for lineno, row in enumerate(csv.reader(f), 1):
      if row:
        yield lineno, row


class Fer2013(common.Source):
  """FER2013 (7 classes, 48x48 grey) from fer2013.csv."""

  name = 'fer2013'
  description = __doc__

  def _csv(self, filename):
    if os.path.isfile(self.src):
      return self.src
    return self.find(filename)

  def scan(self, tally):
    path = self._csv('fer2013.csv')
    units = {s: [] for s in USAGE.values()}
    rows = _csv_rows(path)
    _, header = next(rows, (0, []))
    if [h.strip() for h in header] != ['emotion', 'pixels', 'Usage']:
      raise ValueError(f'{path}: header must be "emotion,pixels,Usage", got {header}')
    for lineno, row in rows:
      where = f'{self.rel(path)}:{lineno}'
      code = common.parse_int(row[0]) if len(row) == 3 else None
      split = USAGE.get(row[2].strip()) if len(row) == 3 else None
      if code is None or split is None:
        tally.add(common.Skipped(common.MALFORMED, where, f'{len(row)} fields'))
      elif not 0 <= code < len(FER_CODES):
        tally.add(common.Skipped(common.LABEL, where, f'emotion {code}'))
      else:
        units[split].append((lineno, labels.BASIC.index(FER_CODES[code]), row[1], where))
    return units

  def process(self, unit):
    lineno, expression, pixels, where = unit
    key = f'{lineno - 2:05d}'   # 0-based row index, as fer2013new.csv / FERPlus count
    dist = np.zeros(len(labels.BASIC), np.float32)
    dist[expression] = 1
    yield common.Ok(key, schema.empty_record(
        image=grey_png(pixels, where), id=key, source=self.name, expression=expression,
        label_dist=dist))


class FerPlus(common.Source):
  """FERPlus (8 classes) from its vote files, labels by the reference mode."""

  name = 'ferplus'
  description = __doc__
  configs = {m: {'mode': m} for m in MODES}

  def __init__(self, src, *, mode: str = 'majority', **kwargs):
    super().__init__(src, **kwargs)
    if mode not in MODES:
      raise ValueError(f'FERPlus mode must be one of {MODES}, got {mode!r}')
    self.mode = mode

  def _votes(self, fields, where):
    votes = [common.parse_int(v) for v in fields]
    if len(fields) != 10 or any(v is None for v in votes):
      return None, common.Skipped(common.MALFORMED, where, f'expected 10 integer votes, got {fields}')
    if any(v < 0 for v in votes) or sum(votes) == 0:
      return None, common.Skipped(common.LABEL, where, f'votes {votes}')
    return votes, None

  def scan(self, tally):
    units = {s: [] for s in FERPLUS_FOLDERS.values()}
    folders = [f for f in FERPLUS_FOLDERS if os.path.isdir(os.path.join(self.src, f))]
    if folders:
      for folder in folders:
        path = os.path.join(self.src, folder, 'label.csv')
        if not os.path.isfile(path):
          raise FileNotFoundError(f'ferplus: {path} is missing')
        for lineno, row in _csv_rows(path):
          where = f'{self.rel(path)}:{lineno}'
          if len(row) != 12 or not row[0].strip():
            tally.add(common.Skipped(common.MALFORMED, where, f'{len(row)} fields, expected 12'))
            continue
          votes, bad = self._votes(row[2:], where)
          if bad:
            tally.add(bad)
            continue
          image = ('file', os.path.join(self.src, folder, row[0].strip()))
          units[FERPLUS_FOLDERS[folder]].append((row[0].strip(), votes, image, where))
      return units
    return self._scan_csv(tally, units)

  def _scan_csv(self, tally, units):
    new = self.find('fer2013new.csv')
    fer = self.find('fer2013.csv')
    pixels = [row for _, row in _csv_rows(fer)][1:]
    rows = _csv_rows(new)
    _, header = next(rows, (0, []))
    if [h.strip() for h in header[2:]] != list(FERPLUS_COLUMNS):
      raise ValueError(f'{new}: header must be Usage,Image name,{",".join(FERPLUS_COLUMNS)}')
    for index, (lineno, row) in enumerate(rows):
      where = f'{self.rel(new)}:{lineno}'
      split = USAGE.get(row[0].strip()) if len(row) == 12 else None
      if split is None:
        tally.add(common.Skipped(common.MALFORMED, where, f'{len(row)} fields / usage'))
        continue
      if not row[1].strip():
        tally.add(common.Excluded('no image name (FERPlus dropped the FER2013 image)', where))
        continue
      votes, bad = self._votes(row[2:], where)
      if bad:
        tally.add(bad)
        continue
      if index >= len(pixels) or len(pixels[index]) != 3:
        tally.add(common.Skipped(common.MISSING, where, f'fer2013.csv has no row {index + 2}'))
        continue
      image = ('pixels', pixels[index][1], f'{self.rel(fer)}:{index + 2}')
      units[split].append((row[1].strip(), votes, image, where))
    return units

  def process(self, unit):
    name, votes, image, where = unit
    dist = ferplus_label(votes, self.mode)
    if dist is None:
      yield common.Excluded(f'{self.mode}: unknown / not a face by the FERPlus rules', where)
      return
    if image[0] == 'file':
      img, data = common.open_image(image[1], where)
      data = common.keep_or_encode(img, data)
    else:
      data = grey_png(image[1], image[2])
    key = name.rsplit('.', 1)[0]
    # argmax in FERPlus column order: ties break as the reference's do.
    top = labels.BASIC.index(FERPLUS_COLUMNS[int(np.argmax(dist))])
    yield common.Ok(key, schema.empty_record(
        image=data, id=key, source=self.name, expression=top, label_dist=to_basic(dist)))

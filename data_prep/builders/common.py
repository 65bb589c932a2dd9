"""What every source reader shares: outcomes, the skip tally/report, image I/O.

Free of TensorFlow Datasets and Beam imports on purpose: this and the source modules
are what worker processes (multiprocessing or Beam) unpickle and import.

A source reader (`Source` subclass) has two halves:
  * `scan(tally)` in the driver: reads the index files (label lists, CSVs, folders)
    and returns {split: [unit, ...]}; malformed index lines are tallied there.
  * `process(unit)` in a worker: yields outcomes for one unit (an image, or a batch of
    rows): `Ok(key, record)`, `Skipped(reason, where, detail)` or `Excluded(reason, where)`.
"""

import collections
import dataclasses
import io
import json
import os
from typing import Iterator, NamedTuple

import numpy as np
from etils import epath
from PIL import Image

from unifer_jax.data import faces

# Why an input was not written. Skips count toward --max_skip_fraction; exclusions
# are the dataset's own protocol (e.g. AffectNet code 9 "Uncertain") and do not.
UNREADABLE = 'unreadable or truncated image'
MISSING = 'missing file'
LABEL = 'label out of range'
MALFORMED = 'malformed line'
NO_FACE = 'no face found'
NOT_FETCHED = 'image not available locally (fetching URLs is out of scope)'
REASONS = (UNREADABLE, MISSING, LABEL, MALFORMED, NO_FACE, NOT_FETCHED)
EXAMPLES_PER_REASON = 5

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
JUNK_FILES = ('thumbs.db', 'desktop.ini')


class Ok(NamedTuple):
  key: str
  record: dict


class Skipped(NamedTuple):
  reason: str
  where: str      # 'file:line' (or the file itself when it has no lines)
  detail: str = ''


class Excluded(NamedTuple):
  reason: str
  where: str


class Warned(NamedTuple):
  """A problem that did not cost the record (e.g. a missing attribute file)."""
  message: str
  where: str


class Skip(Exception):
  """Raised inside `process` for a bad input; turned into a `Skipped` outcome."""

  def __init__(self, reason: str, where: str, detail: str = ''):
    super().__init__(f'{reason}: {where} {detail}'.strip())
    self.outcome = Skipped(reason, where, detail)


class Tally:
  """Counts of records written per split, skips and exclusions by reason (with the
  first few file:line places of each), mergeable across workers and JSON-able."""

  def __init__(self):
    self.written = collections.Counter()
    self.skipped = collections.Counter()
    self.excluded = collections.Counter()
    self.warnings = collections.Counter()
    self.examples = collections.defaultdict(list)   # reason -> ['where (detail)', ...]

  def add(self, outcome, split: str = '') -> None:
    if isinstance(outcome, Ok):
      self.written[split] += 1
    elif isinstance(outcome, Skipped):
      self.skipped[outcome.reason] += 1
      self._example(outcome.reason, outcome.where + (f' ({outcome.detail})' if outcome.detail else ''))
    elif isinstance(outcome, Excluded):
      self.excluded[outcome.reason] += 1
    elif isinstance(outcome, Warned):
      self.warnings[outcome.message] += 1
      self._example(outcome.message, outcome.where)
    else:
      raise TypeError(f'not an outcome: {outcome!r}')

  def _example(self, reason, where):
    if len(self.examples[reason]) < EXAMPLES_PER_REASON:
      self.examples[reason].append(where)

  def merge(self, other: 'Tally') -> 'Tally':
    for name in ('written', 'skipped', 'excluded', 'warnings'):
      getattr(self, name).update(getattr(other, name))
    for reason, wheres in other.examples.items():
      for w in wheres:
        self._example(reason, w)
    return self

  def to_json(self) -> dict:
    return {'written': dict(self.written), 'skipped': dict(self.skipped),
            'excluded': dict(self.excluded), 'warnings': dict(self.warnings),
            'examples': {k: list(v) for k, v in self.examples.items()}}

  @classmethod
  def from_json(cls, d: dict) -> 'Tally':
    t = cls()
    for name in ('written', 'skipped', 'excluded', 'warnings'):
      getattr(t, name).update(d.get(name, {}))
    for k, v in d.get('examples', {}).items():
      t.examples[k] = list(v)
    return t


@dataclasses.dataclass
class Report:
  """What a prep run did; `str(report)` is what `unifer prep` prints."""
  name: str
  path: str
  written: dict           # split -> records
  skipped: dict           # reason -> count
  excluded: dict          # reason -> count (the dataset's protocol, not failures)
  warnings: dict
  examples: dict          # reason -> first few 'file:line (detail)'
  max_skip_fraction: float

  @classmethod
  def from_tally(cls, name, path, tally: Tally, max_skip_fraction) -> 'Report':
    return cls(name=name, path=str(path), written=dict(sorted(tally.written.items())),
               skipped=dict(tally.skipped), excluded=dict(tally.excluded),
               warnings=dict(tally.warnings),
               examples={k: list(v) for k, v in tally.examples.items()},
               max_skip_fraction=max_skip_fraction)

  @property
  def total_written(self) -> int:
    return sum(self.written.values())

  @property
  def total_skipped(self) -> int:
    return sum(self.skipped.values())

  @property
  def skip_fraction(self) -> float:
    seen = self.total_written + self.total_skipped
    return self.total_skipped / seen if seen else 0.0

  @property
  def failed(self) -> bool:
    return self.total_written == 0 or self.skip_fraction > self.max_skip_fraction

  def __str__(self) -> str:
    lines = [f'prep {self.name} -> {self.path}']
    splits = ', '.join(f'{s} {n}' for s, n in self.written.items()) or 'none'
    lines.append(f'  written: {splits} (total {self.total_written})')
    lines.append(f'  skipped: {self.total_skipped} of {self.total_written + self.total_skipped} '
                 f'inputs ({100 * self.skip_fraction:.2f}%, limit '
                 f'{100 * self.max_skip_fraction:.2f}%)')
    for title, counts in (('', self.skipped), ('excluded by the dataset protocol: ', self.excluded),
                          ('kept, with a warning: ', self.warnings)):
      for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f'    {title}{reason}: {n}')
        lines += [f'      {w}' for w in self.examples.get(reason, [])]
    if self.failed:
      lines.append('  FAILED: ' + ('no record was written' if self.total_written == 0 else
                                   'too many inputs skipped (raise --max_skip_fraction to accept)'))
    return '\n'.join(lines)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


class SkipFractionExceeded(RuntimeError):
  """A prep run skipped more inputs than allowed; `.report` says which and where."""

  def __init__(self, report: Report):
    super().__init__(str(report))
    self.report = report


class Source:
  """A dataset's on-disk layout. Subclasses set `name`, `configs` and `description`
  and implement `scan` and `process`. Instances are pickled to workers: keep them
  small (paths and options only)."""

  name = ''
  description = ''
  # config name -> options passed to __init__ (the first is the default).
  configs = {'default': {}}
  # T for a clip dataset (records carry `frames`, see schema.py); None: image records.
  clip_frames = None

  def __init__(self, src, *, face_size: int = 224, face_margin: float = 0.25):
    self.src = os.fspath(src)
    self.face_size = int(face_size)
    self.face_margin = float(face_margin)

  def scan(self, tally: Tally) -> dict:
    raise NotImplementedError

  def process(self, unit) -> Iterator:
    raise NotImplementedError

  def run(self, unit) -> list:
    """`process` with its `Skip`s turned into outcomes (what the workers call)."""
    out = []
    try:
      for outcome in self.process(unit):
        out.append(outcome)
    except Skip as e:
      out.append(e.outcome)
    return out

  # ------------------------------------------------------------------ helpers
  def face(self, img: Image.Image, where: str, *, box=None, landmarks=None) -> bytes:
    """The face of `img` as a face_size JPEG: aligned on landmarks, else cut from
    box, else found by the detector. No face -> Skip(NO_FACE); a degenerate box or
    landmarks (zero size, coinciding eyes) -> Skip(MALFORMED)."""
    try:
      crop = faces.face_crop(rgb_array(img), box=box, landmarks=landmarks, size=self.face_size,
                             margin=self.face_margin)
    except ValueError as e:
      raise Skip(MALFORMED, where, str(e)) from None
    if crop is None:
      raise Skip(NO_FACE, where)
    return encode(crop)

  def rel(self, path) -> str:
    """`path` relative to the source root, for reports."""
    path = os.fspath(path)
    try:
      r = os.path.relpath(path, self.src)
      return path if r.startswith('..') else r
    except ValueError:
      return path

  def find(self, *candidates, kind: str = 'file'):
    """The first existing path among `candidates` (relative to src), else a clear error."""
    for c in candidates:
      p = os.path.join(self.src, c)
      if (os.path.isdir(p) if kind == 'dir' else os.path.isfile(p)):
        return p
    raise FileNotFoundError(
        f'{self.name}: none of {list(candidates)} found under --src {self.src}; '
        f'point --src at the dataset folder as it ships (see DATASETS.md)')


def read_lines(path) -> Iterator:
  """(line number from 1, stripped text) of a text file, skipping blank lines."""
  with open(path, encoding='utf-8', errors='replace') as f:
    for i, line in enumerate(f, 1):
      line = line.strip()
      if line:
        yield i, line


def open_image(path, where: str = '') -> tuple:
  """(fully decoded image, file bytes); missing -> Skip(MISSING), undecodable or
  truncated -> Skip(UNREADABLE). Local paths, or gs:// etc. through etils.epath."""
  where = where or os.fspath(path)
  try:
    data = epath.Path(path).read_bytes()
  except FileNotFoundError:
    raise Skip(MISSING, where, os.fspath(path)) from None
  except IsADirectoryError:
    raise Skip(MISSING, where, f'{os.fspath(path)} is a directory') from None
  return decode(data, where), data


def decode(data: bytes, where: str) -> Image.Image:
  """Decode fully (PIL is lazy; `load()` is what notices truncation)."""
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... on bad data
    raise Skip(UNREADABLE, where, f'{type(e).__name__}: {e}') from None


def rgb_array(img: Image.Image) -> np.ndarray:
  return np.asarray(img.convert('RGB'))


def encode(image, fmt: str = 'JPEG') -> bytes:
  """RGB uint8 array (or PIL image) -> JPEG (quality 95) or PNG bytes."""
  img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  img = img.convert('RGB')
  buf = io.BytesIO()
  if fmt == 'JPEG':
    img.save(buf, 'JPEG', quality=95)
  else:
    img.save(buf, 'PNG', compress_level=1)
  return buf.getvalue()


def keep_or_encode(img: Image.Image, data: bytes) -> bytes:
  """The original bytes when they are already an RGB JPEG/PNG (no re-encoding loss),
  else the image converted to 3-channel PNG (the schema stores HxWx3)."""
  if img.format in ('JPEG', 'PNG') and img.mode == 'RGB':
    return data
  return encode(img, 'PNG')


def is_image_file(name: str) -> bool:
  n = name.lower()
  return not n.startswith('.') and n not in JUNK_FILES and n.endswith(IMAGE_EXTENSIONS)


def parse_int(text: str):
  """int(text), accepting '3.0' but not '3.5'; None if it is not an integer."""
  try:
    v = float(text)
  except (TypeError, ValueError):
    return None
  return int(v) if np.isfinite(v) and v == int(v) else None


def parse_float(text):
  """float(text) if finite, else None."""
  try:
    v = float(text)
  except (TypeError, ValueError):
    return None
  return v if np.isfinite(v) else None


def dumps(obj) -> str:
  return json.dumps(obj, sort_keys=True, separators=(',', ':'))

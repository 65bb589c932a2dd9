"""Face-text corpora: FaceCaption-15M (parquet) and CelebA-Dialog (captions.json).

FaceCaption-15M ships as parquet rows with the image URL, the face box, laion_caption
and face_caption; images are fetched by URL. Fetching is out of scope here: each row's
image must be local, found (in this order) as
  * embedded bytes: an `image` column (bytes, or {'bytes', 'path'} as HF datasets write);
  * a path column (`image_path`, `file_name` or `path`), relative to the parquet's folder;
  * img2dataset's `--output_format files` layout: the shard parquet `00000.parquet`
    next to folder `00000/` holding `<key>.jpg` (run img2dataset with
    `--save_additional_columns '["face_bbox","face_caption","laion_caption"]'`);
    rows img2dataset could not download (status != success) are excluded.
A row with none of these is skipped as "image not available locally", so a parquet of
bare URLs fails the run with that reason. Faces are cut from the face box
(x0, y0, x1, y1; the detector when there is none) at face_size. Every parquet under
--src (up to two folders deep; local or gs:// via etils.epath) is read, one row group
per unit of work (Beam spreads them over workers). The exact column names of the
published parquet were not checked against a copy here: `face_bbox` / `face_box` /
`bbox` and `face_caption` (else `caption`, else `laion_caption`) are accepted.

CelebA-Dialog: `captions.json` keyed by image file name with `overall_caption`, the
images in `image/` (HQ) or `img_align_celeba/` (standard), and optionally the
fine-grained label file (`combined_annotation.txt`: `<name> <Bangs> <Eyeglasses>
<Beard> <Smiling> <Age>` degrees 0..5, header lines allowed). The degrees go to
`nuisance` (JSON) and the Smiling degree / 5 to `intensity` (a smile-intensity
proxy); the caption to `caption`. Images are already face crops and kept as they are.
"""

import json
import os

import numpy as np
from etils import epath

from data_prep.builders import common
from unifer_jax.data import schema

BOX_COLUMNS = ('face_bbox', 'face_box', 'bbox', 'box')
PATH_COLUMNS = ('image_path', 'file_name', 'path')
DEGREES = ('bangs', 'eyeglasses', 'beard', 'smiling', 'age')


def _find_box(row):
  for c in BOX_COLUMNS:
    v = row.get(c)
    if v is not None:
      if isinstance(v, str):
        v = json.loads(v)
      return [float(x) for x in np.asarray(v, np.float64).reshape(-1)[:4]]
  return None


class FaceCaption(common.Source):
  """FaceCaption-15M-style parquet: face crops with face captions."""

  name = 'facecaption'
  description = __doc__

  def scan(self, tally):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    root = epath.Path(self.src)   # local, or gs:// etc. for Beam runners on a cluster
    # Up to two folders deep (epath refuses '**': on GCS it means thousands of RPCs).
    files = sorted(os.fspath(p) for pattern in ('*.parquet', '*/*.parquet', '*/*/*.parquet')
                   for p in root.glob(pattern)) if root.is_dir() else [self.src]
    if not files:
      raise FileNotFoundError(f'facecaption: no .parquet file under --src {self.src}')
    units = []
    for path in files:
      try:
        with epath.Path(path).open('rb') as f:
          meta = pq.ParquetFile(f).metadata
      except Exception as e:  # pyarrow raises ArrowInvalid/OSError on non-parquet data
        tally.add(common.Skipped(common.MALFORMED, self.rel(path), f'not a parquet file: {e}'))
        continue
      units += [(path, g) for g in range(meta.num_row_groups)]
    return {'train': units}

  def process(self, unit):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    path, group = unit
    with epath.Path(path).open('rb') as f:
      pf = pq.ParquetFile(f)
      rows = pf.read_row_group(group).to_pylist()
      first = sum(pf.metadata.row_group(g).num_rows for g in range(group))
    shard = os.path.splitext(path)[0]
    for i, row in enumerate(rows):
      where = f'{self.rel(path)}:row {first + i}'
      try:
        yield self._record(row, f'{self.rel(shard)}/{first + i}', shard, where)
      except common.Skip as e:
        yield e.outcome
      except (ValueError, TypeError) as e:
        yield common.Skipped(common.MALFORMED, where, str(e))

  def _image(self, row, shard, where):
    v = row.get('image')
    if isinstance(v, dict):   # HF datasets' Image feature: {'bytes': ..., 'path': ...}
      if v.get('bytes'):
        return common.decode(bytes(v['bytes']), where)
      if v.get('path'):
        return self._read(v['path'], shard, where)
    elif isinstance(v, (bytes, bytearray)) and v:
      return common.decode(bytes(v), where)
    for c in PATH_COLUMNS:
      if row.get(c):
        return self._read(row[c], shard, where)
    if row.get('key') is not None:
      if row.get('status') not in (None, 'success'):
        return None
      return self._read(os.path.join(shard, f'{row["key"]}.jpg'), shard, where)
    raise common.Skip(common.NOT_FETCHED, where,
                      f'only a URL ({row.get("url", "?")}); download with img2dataset first')

  def _read(self, rel, shard, where):
    path = rel if os.path.isabs(rel) else os.path.join(os.path.dirname(shard), rel)
    return common.open_image(path, where)[0]

  def _record(self, row, key, shard, where):
    img = self._image(row, shard, where)
    if img is None:
      return common.Excluded(f'img2dataset status {row.get("status")!r}', where)
    key = str(row.get('key') or key)
    image = self.face(img, where, box=_find_box(row))
    caption = row.get('face_caption') or row.get('caption') or row.get('laion_caption') or ''
    if isinstance(caption, list):   # some releases keep several captions per face
      caption = caption[0] if caption else ''
    return common.Ok(key, schema.empty_record(
        image=image, id=key, source=self.name, caption=str(caption)))


class CelebaDialog(common.Source):
  """CelebA-Dialog captions (and fine-grained degrees) on CelebA(-HQ) faces."""

  name = 'celeba_dialog'
  description = __doc__

  def _images_dir(self):
    return next((os.path.join(self.src, d) for d in ('image', 'CelebA-HQ-img', 'img_align_celeba')
                 if os.path.isdir(os.path.join(self.src, d))), self.src)

  def _degrees(self, tally):
    path = next((p for p in (os.path.join(self.src, 'combined_annotation.txt'),
                             os.path.join(self.src, 'text', 'combined_annotation.txt'))
                 if os.path.isfile(p)), None)
    out = {}
    if path is None:
      return out
    for lineno, line in common.read_lines(path):
      parts = line.split()
      values = [common.parse_int(p) for p in parts[1:]]
      if len(parts) == 1 or all(v is None for v in values):   # count / header lines
        continue
      if len(values) != len(DEGREES) or None in values:
        tally.add(common.Skipped(common.MALFORMED, f'{self.rel(path)}:{lineno}', repr(line)))
      elif not all(0 <= v <= 5 for v in values):
        tally.add(common.Skipped(common.LABEL, f'{self.rel(path)}:{lineno}', f'degrees {values}'))
      else:
        out[parts[0]] = dict(zip(DEGREES, values))
    return out

  def scan(self, tally):
    path = self.find('captions.json', os.path.join('text', 'captions.json'),
                     'captions_hq.json', os.path.join('text', 'captions_hq.json'))
    try:
      with open(path, encoding='utf-8') as f:
        captions = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(captions, dict):
      raise ValueError(f'{path}: expected an object keyed by image file name')
    degrees = self._degrees(tally)
    images = self._images_dir()
    units = []
    for name, entry in captions.items():
      where = f'{self.rel(path)}:{name}'
      caption = entry.get('overall_caption') if isinstance(entry, dict) else None
      if not isinstance(caption, str) or not caption.strip():
        tally.add(common.Skipped(common.MALFORMED, where, 'no overall_caption'))
        continue
      units.append((os.path.join(images, name), name, caption.strip(), degrees.get(name), where))
    return {'train': units}

  def process(self, unit):
    path, name, caption, degrees, where = unit
    img, data = common.open_image(path, where)
    key = name.rsplit('.', 1)[0]
    extra = {}
    if degrees:
      extra = {'intensity': degrees['smiling'] / 5,
               'nuisance': common.dumps({'celeba_dialog_degrees': degrees})}
    yield common.Ok(key, schema.empty_record(
        image=common.keep_or_encode(img, data), id=key, source=self.name, caption=caption,
        **extra))

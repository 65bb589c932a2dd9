"""Generation paths agree: in-process, a process pool, and Apache Beam (DirectRunner,
in-memory and 2 worker processes) write the same records and the same report."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import builders_util as u
from data_prep import registry
from data_prep.builders import common


def _corpus(src, n=60):
  """FaceCaption-style parquet, 3 row groups, every 10th row a bare URL (skipped)."""
  rows = []
  for i in range(n):
    arr = np.full((48, 64, 3), 30, np.uint8)
    arr[8:40, 16:48] = [(5 * i) % 256, 100, 200]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, 'JPEG', quality=95)
    rows.append({'url': f'http://x/{i}', 'face_bbox': [16.0, 8.0, 48.0, 40.0],
                 'face_caption': f'caption {i}',
                 'image': None if i % 10 == 9 else {'bytes': buf.getvalue(), 'path': None}})
  src.mkdir(parents=True)
  pq.write_table(pa.Table.from_pylist(rows), src / 'part-0.parquet', row_group_size=n // 3)


def _read_all(out):
  return {k: (r['caption'], r['image'].tobytes()) for k, r in u.records(out, 'facecaption', 'train').items()}


def test_pool_and_beam_write_the_same_dataset(tmp_path):
  _corpus(tmp_path / 'src')
  kw = dict(max_skip_fraction=0.2, face_size=32)
  ref = registry.prepare('facecaption', tmp_path / 'src', tmp_path / 'ref', **kw)
  assert ref.written == {'train': 54} and ref.skipped == {common.NOT_FETCHED: 6}
  want = _read_all(tmp_path / 'ref')
  runs = {'pool2': dict(workers=2),
          'beam1': dict(runner='DirectRunner', workers=1),
          'beam2': dict(runner='DirectRunner', workers=2)}
  for name, opts in runs.items():
    report = registry.prepare('facecaption', tmp_path / 'src', tmp_path / name, **kw, **opts)
    assert report.written == ref.written and report.skipped == ref.skipped, name
    rows = [int(w.split('row ')[1].split(' ')[0]) for w in report.examples[common.NOT_FETCHED]]
    assert len(rows) == common.EXAMPLES_PER_REASON and all(r % 10 == 9 for r in rows), rows
    assert _read_all(tmp_path / name) == want, name
    assert registry.stored_report(tmp_path / name, 'facecaption')['written'] == {'train': 54}


def test_beam_run_fails_on_too_many_skips(tmp_path):
  _corpus(tmp_path / 'src', n=30)
  with pytest.raises(common.SkipFractionExceeded) as e:
    registry.prepare('facecaption', tmp_path / 'src', tmp_path / 'out', runner='DirectRunner',
                     max_skip_fraction=0.05, face_size=32)
  assert e.value.report.skipped == {common.NOT_FETCHED: 3}
  assert 'FAILED: too many inputs skipped' in str(e.value)
  assert not (tmp_path / 'out' / 'facecaption' / '1.0.0').exists()


def test_report_text_and_arguments(tmp_path):
  t = common.Tally()
  t.add(common.Ok('a', {}), 'train')
  t.add(common.Skipped(common.MISSING, 'x.txt:3', 'x.jpg'))
  t.add(common.Excluded('expression 9 (Uncertain)', 'x.txt:4'))
  t.add(common.Warned('manual attributes missing', 'm.txt'))
  merged = common.Tally.from_json(t.to_json()).merge(t)
  r = common.Report.from_tally('demo', '/out/demo', merged, 0.01)
  assert r.written == {'train': 2} and r.skipped == {common.MISSING: 2}
  assert r.skip_fraction == 0.5 and r.failed
  text = str(r)
  for piece in ('written: train 2', 'missing file: 2', 'x.txt:3 (x.jpg)',
                'excluded by the dataset protocol: expression 9 (Uncertain): 2',
                'kept, with a warning: manual attributes missing: 2', 'FAILED'):
    assert piece in text, piece
  with pytest.raises(ValueError, match='max_skip_fraction'):
    registry.builder('sfew', tmp_path, tmp_path, max_skip_fraction=2)
  with pytest.raises(FileNotFoundError, match='--src'):
    registry.prepare('sfew', tmp_path / 'nope', tmp_path)

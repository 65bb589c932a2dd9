"""RAF-DB basic / compound builders on a fixture in the real layout (misspelt
list_patition_label.txt, train_/test_ names, _aligned.jpg, _manu_attri.txt)."""

import os

import numpy as np
import pytest

import builders_util as u
from data_prep import registry
from data_prep.builders import common, rafdb
from unifer_jax.data import labels

# RAF-DB's own table: 1 Surprise 2 Fear 3 Disgust 4 Happiness 5 Sadness 6 Anger 7 Neutral.
RAF_TABLE = {1: 'surprise', 2: 'fear', 3: 'disgust', 4: 'happiness', 5: 'sadness', 6: 'anger',
             7: 'neutral'}


def test_rafdb_basic(tmp_path):
  src, out = tmp_path / 'RAF-DB', tmp_path / 'out'
  codes = [1 + i % 7 for i in range(14)]
  base, lines = u.rafdb_fixture(str(src), 'basic', codes)
  # One bad input of each kind (lines 15..18).
  lines += ['train_00015.jpg 8',            # label out of range
            'train_00016.jpg',              # malformed line
            'train_00017.jpg 2',            # missing image
            'train_00018.jpg 3']            # truncated image
  u.truncated(f'{base}/Image/aligned/train_00018_aligned.jpg')
  os.remove(f'{base}/Annotation/manual/train_00002_manu_attri.txt')   # kept, warned
  u.write(f'{base}/EmoLabel/list_patition_label.txt', '\n'.join(lines) + '\n')

  with pytest.raises(common.SkipFractionExceeded) as e:
    registry.prepare('rafdb', src, out)             # 4 of 18 skipped > 1%
  assert e.value.report.total_skipped == 4
  assert not os.path.exists(registry.dataset_dir(out, 'rafdb'))   # nothing half-written

  report = registry.prepare('rafdb', src, out, max_skip_fraction=0.25)
  assert report.written == {'train': 11, 'test': 3}
  lbl = 'basic/EmoLabel/list_patition_label.txt'
  assert report.skipped == {common.LABEL: 1, common.MALFORMED: 1, common.MISSING: 1,
                            common.UNREADABLE: 1}
  assert u.skipped_at(report, common.LABEL) == [f'{lbl}:15']
  assert u.skipped_at(report, common.MALFORMED) == [f'{lbl}:16']
  assert u.skipped_at(report, common.MISSING) == [f'{lbl}:17']
  assert u.skipped_at(report, common.UNREADABLE) == [f'{lbl}:18']
  assert report.warnings == {'manual attributes missing': 1}
  text = str(report)
  assert 'train 11' in text and f'{lbl}:16' in text and 'label out of range: 1' in text

  train = u.records(out, 'rafdb', 'train')
  assert len(train) == 11 and len(u.records(out, 'rafdb', 'test')) == 3
  for i, code in enumerate(codes, 1):
    stem = f'train_{i:05d}'
    if stem not in train:
      continue
    r = train[stem]
    assert labels.BASIC[r['expression']] == RAF_TABLE[code]
    np.testing.assert_array_equal(r['label_dist'], u.one_hot(r['expression']))
    assert r['compound'] == -1 and r['source'] == b'rafdb' and r['image'].shape == (100, 100, 3)
    if i == 2:
      assert (r['gender'], r['race'], r['age_group']) == (-1, -1, -1)
    else:
      assert (r['gender'], r['race'], r['age_group']) == (i % 3, (i + 1) % 3, i % 5)
  assert np.isnan(train['train_00001']['valence'])
  # Stored in the dataset's metadata too.
  assert registry.stored_report(out, 'rafdb')['written'] == {'test': 3, 'train': 11}


def test_rafdb_compound_and_original_alignment(tmp_path):
  src, out = tmp_path / 'RAF-DB', tmp_path / 'out'
  codes = list(range(1, 12)) + [12]            # 12 is out of range
  base, lines = u.rafdb_fixture(str(src), 'compound', codes)
  u.write(f'{base}/EmoLabel/list_patition_label.txt', '\n'.join(lines) + '\n')
  report = registry.prepare('rafdb_compound', src, out, max_skip_fraction=0.1)
  assert report.skipped == {common.LABEL: 1}
  recs = {**u.records(out, 'rafdb_compound', 'train'), **u.records(out, 'rafdb_compound', 'test')}
  assert len(recs) == 11
  for i, code in enumerate(codes[:11], 1):
    stem = f'train_{i:05d}' if i % 4 else f'test_{i:04d}'
    r = recs[stem]
    assert r['compound'] == code - 1 and r['expression'] == -1
    a, b = labels.COMPOUND_COMPONENTS[labels.COMPOUND[code - 1]]
    assert r['label_dist'][labels.BASIC.index(a)] == 0.5 == r['label_dist'][labels.BASIC.index(b)]

  # images='original': faces aligned on the manual eye landmarks to face_size.
  u.image(f'{base}/Image/original/train_00001.jpg', (120, 110), value=3)
  u.write(f'{base}/EmoLabel/list_patition_label.txt', 'train_00001.jpg 4\n')
  report = registry.prepare('rafdb_compound', src, out, images='original', face_size=64)
  rec = u.records(out, 'rafdb_compound', 'train')['train_00001']
  assert report.written == {'train': 1} and rec['image'].shape == (64, 64, 3)


def test_rafdb_src_layout_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='list_patition_label'):
    registry.prepare('rafdb', tmp_path, tmp_path / 'out')
  with pytest.raises(ValueError, match="'aligned' or 'original'"):
    rafdb.RafdbBasic(tmp_path, images='crop')
  with pytest.raises(ValueError, match='unknown dataset'):
    registry.prepare('raf', tmp_path, tmp_path / 'out')
  with pytest.raises(ValueError, match='no configs'):
    registry.prepare('rafdb/8class', tmp_path, tmp_path / 'out')


def test_a_split_past_the_writer_budget_names_beam(tmp_path, monkeypatch):
  # The source builders' non-Beam path holds each split in tfds' writer buffer (see
  # data_prep/tfds_writer.py); a split larger than the budget is an error that says Beam.
  from tensorflow_datasets.core import shuffle as tfds_shuffle
  from data_prep import tfds_writer
  src, out = tmp_path / 'RAF-DB', tmp_path / 'out'
  base, lines = u.rafdb_fixture(str(src), 'basic', [1 + i % 7 for i in range(12)])
  u.write(f'{base}/EmoLabel/list_patition_label.txt', '\n'.join(lines) + '\n')
  monkeypatch.setattr(tfds_shuffle, 'MAX_MEM_BUFFER_SIZE', 2_000)
  assert registry.prepare('rafdb', src, out).written == {'test': 3, 'train': 9}
  monkeypatch.setattr(tfds_writer, 'memory_budget', lambda: 2_000)
  with pytest.raises(ValueError, match=r'rafdb: a split outgrew .*--runner DirectRunner'):
    registry.prepare('rafdb', src, tmp_path / 'out2')

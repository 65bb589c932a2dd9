"""AffectNet builder: training.csv / validation.csv with 68 landmarks, codes 0..10,
valence/arousal with -2 = invalid, 7- and 8-class protocols, the Kaggle folder variant."""

import numpy as np
import pytest

import builders_util as u
from data_prep import registry
from data_prep.builders import common
from unifer_jax.data import labels

HEADER = ('subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,'
          'expression,valence,arousal')
AFFECTNET_TABLE = ('neutral', 'happiness', 'sadness', 'surprise', 'fear', 'disgust', 'anger',
                   'contempt')


def _landmarks():
  pts = np.tile([[50.0, 70.0]], (68, 1))
  pts[36:42] = [30, 40]
  pts[42:48] = [70, 42]
  return ';'.join(f'{v:.2f}' for v in pts.reshape(-1))


def _fixture(src):
  lists, images = src / 'Manually_Annotated_file_lists', src / 'Manually_Annotated_Images'
  rows = [HEADER]
  for code in range(11):
    path = f'{100 + code}/img{code:02d}.jpg'
    u.image(str(images / path), (100, 100), value=code)
    rows.append(f'{path},10,10,80,80,{_landmarks()},{code},{0.1 * (code - 5):.1f},-2')
  u.image(str(images / '200/noland.jpg'), (100, 100), value=50)
  rows.append('200/noland.jpg,10,10,80,80,,1,0.5,0.25')                    # line 13: box only
  u.image(str(images / '200/bad.jpg'), (100, 100))
  rows += ['200/bad.jpg,10,10,80,80,,11,0,0',                                # 14: code 11
           '200/bad.jpg,10,10,80,80,,1,1.5,0',                               # 15: valence > 1
           '200/bad.jpg,10,10,80,80,1;2;3,1,0,0',                             # 16: 3 landmark values
           '200/missing.jpg,10,10,80,80,,1,0,0',                              # 17: missing file
           '200/trunc.jpg,10,10,80,80,,1,0,0',                                # 18: truncated
           '200/bad.jpg,10,10,0,80,,1,0,0']                                   # 19: zero-width box
  u.truncated(str(images / '200/trunc.jpg'))
  u.write(str(lists / 'training.csv'), '\n'.join(rows) + '\n')
  u.image(str(images / '300/val.jpg'), (100, 100), value=9)
  u.write(str(lists / 'validation.csv'),
          f'{HEADER}\n300/val.jpg,10,10,80,80,{_landmarks()},7,-0.5,0.5\n')


@pytest.mark.parametrize('protocol', ['8class', '7class'])
def test_affectnet(tmp_path, protocol):
  src, out = tmp_path / 'AffectNet', tmp_path / 'out'
  _fixture(src)
  name = 'affectnet' if protocol == '8class' else 'affectnet/7class'
  report = registry.prepare(name, src, out, max_skip_fraction=0.5, face_size=64)
  classes = 8 if protocol == '8class' else 7
  assert report.written == ({'train': 9, 'validation': 1} if classes == 8 else {'train': 8})
  csv = 'Manually_Annotated_file_lists/training.csv'
  assert u.skipped_at(report, common.LABEL) == [f'{csv}:14', f'{csv}:15']
  assert u.skipped_at(report, common.MALFORMED) == [f'{csv}:16', f'{csv}:19']
  assert u.skipped_at(report, common.MISSING) == [f'{csv}:17']
  assert u.skipped_at(report, common.UNREADABLE) == [f'{csv}:18']
  excluded = {'expression 8 (None)': 1, 'expression 9 (Uncertain)': 1,
              'expression 10 (No-Face)': 1}
  if classes == 7:
    excluded['contempt (7-class protocol)'] = 2
  assert report.excluded == excluded
  train = u.records(out, name, 'train')
  for code in range(classes):
    r = train[f'{100 + code}/img{code:02d}.jpg']
    assert labels.BASIC[r['expression']] == AFFECTNET_TABLE[code]
    assert r['valence'] == pytest.approx(0.1 * (code - 5)) and np.isnan(r['arousal'])  # -2 -> NaN
    assert r['image'].shape == (64, 64, 3)
  assert train['200/noland.jpg']['arousal'] == pytest.approx(0.25)
  if classes == 8:
    val = u.records(out, name, 'validation')['300/val.jpg']
    assert labels.BASIC[val['expression']] == 'contempt' and val['valence'] == pytest.approx(-0.5)


def test_affectnet_kaggle_folders(tmp_path):
  for k in (1, 2, 8, 9, 12):
    u.image(str(tmp_path / 'src' / 'train_class' / f'class{k:03d}' / f'a{k}.jpg'), (96, 96), value=k)
  report = registry.prepare('affectnet', tmp_path / 'src', tmp_path / 'out', max_skip_fraction=0.5)
  assert report.written == {'train': 3}
  assert u.skipped_at(report, common.LABEL) == ['train_class/class012/a12.jpg']
  assert report.excluded == {'expression 8 (None)': 1}
  recs = u.records(tmp_path / 'out', 'affectnet', 'train')
  assert [labels.BASIC[recs[f'train_class/class00{k}/a{k}.jpg']['expression']] for k in (1, 2, 8)] \
      == ['neutral', 'happiness', 'contempt']
  with pytest.raises(FileNotFoundError, match='training.csv'):
    registry.prepare('affectnet', tmp_path / 'out', tmp_path / 'o2')

"""SFEW 2.0 builder: Train/Train_Aligned_Faces/<Class>/ and Val/Val_Aligned_Faces/<Class>/."""

import os

import builders_util as u
from data_prep import registry
from data_prep.builders import common
from unifer_jax.data import labels

SFEW_TABLE = {'Angry': 'anger', 'Disgust': 'disgust', 'Fear': 'fear', 'Happy': 'happiness',
              'Neutral': 'neutral', 'Sad': 'sadness', 'Surprise': 'surprise'}


def test_sfew(tmp_path):
  src, out = tmp_path / 'SFEW_2', tmp_path / 'out'
  for split, parts in (('train', ('Train', 'Train_Aligned_Faces')),
                       ('validation', ('Val', 'Val_Aligned_Faces'))):
    for i, cls in enumerate(SFEW_TABLE):
      u.image(str(src.joinpath(*parts, cls, f'Movie_{i}_00{i}_1.png')), (143, 181), value=i)
  train = src / 'Train' / 'Train_Aligned_Faces'
  u.image(str(train / 'Contempt' / 'Film_1_001_1.png'), (143, 181))      # not an SFEW class
  u.truncated(str(train / 'Happy' / 'Film_2_002_1.png'))                   # truncated
  os.symlink(train / 'Happy' / 'gone.png', train / 'Happy' / 'Film_3_003_1.png')   # dangling
  u.write(str(train / 'Happy' / 'Thumbs.db'), 'junk')                      # ignored
  report = registry.prepare('sfew', src, out, max_skip_fraction=0.25)
  assert report.written == {'train': 7, 'validation': 7}
  assert u.skipped_at(report, common.LABEL) == [
      'Train/Train_Aligned_Faces/Contempt/Film_1_001_1.png']
  assert u.skipped_at(report, common.UNREADABLE) == [
      'Train/Train_Aligned_Faces/Happy/Film_2_002_1.png']
  assert u.skipped_at(report, common.MISSING) == [
      'Train/Train_Aligned_Faces/Happy/Film_3_003_1.png']
  for split in ('train', 'validation'):
    recs = u.records(out, 'sfew', split)
    for i, cls in enumerate(SFEW_TABLE):
      r = recs[f'{split}/Movie_{i}_00{i}_1']
      assert labels.BASIC[r['expression']] == SFEW_TABLE[cls]
      assert r['image'].shape == (181, 143, 3)       # kept as shipped (143 x 181)

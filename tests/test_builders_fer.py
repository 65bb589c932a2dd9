"""FER2013 (fer2013.csv) and FERPlus (label.csv folders / fer2013new.csv) builders,
and the FERPlus reference vote rules on rows whose outcome those rules decide."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import builders_util as u
from data_prep import registry
from data_prep.builders import common, fer2013
from unifer_jax.data import labels

FER_TABLE = ('anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise', 'neutral')
COLS = fer2013.FERPLUS_COLUMNS   # neutral happiness surprise sadness anger disgust fear contempt unknown NF


def _pixels(value, n=2304):
  return ' '.join(str((value + i) % 256) for i in range(n))


def test_fer2013(tmp_path):
  rows = ['emotion,pixels,Usage']
  usages = ['Training', 'PublicTest', 'PrivateTest']
  for i in range(14):
    rows.append(f'{i % 7},{_pixels(i)},{usages[i % 3]}')
  rows += [f'7,{_pixels(1)},Training',          # line 16: label out of range
           f'3,{_pixels(2)}',                     # line 17: malformed (2 fields)
           f'3,{_pixels(3, 2300)},Training']      # line 18: truncated image
  u.write(str(tmp_path / 'fer' / 'fer2013.csv'), '\n'.join(rows) + '\n')
  report = registry.prepare('fer2013', tmp_path / 'fer', tmp_path / 'out', max_skip_fraction=0.2)
  assert report.written == {'train': 5, 'validation': 5, 'test': 4}
  assert u.skipped_at(report, common.LABEL) == ['fer2013.csv:16']
  assert u.skipped_at(report, common.MALFORMED) == ['fer2013.csv:17']
  assert u.skipped_at(report, common.UNREADABLE) == ['fer2013.csv:18']
  assert '2300 of 2304' in report.examples[common.UNREADABLE][0]
  recs = {**u.records(tmp_path / 'out', 'fer2013', 'train'),
          **u.records(tmp_path / 'out', 'fer2013', 'validation'),
          **u.records(tmp_path / 'out', 'fer2013', 'test')}
  for i in range(14):
    r = recs[f'{i:05d}']
    assert labels.BASIC[r['expression']] == FER_TABLE[i % 7]
    assert r['image'].shape == (48, 48, 3)
    assert r['image'][0, 0, 0] == i % 256 and r['image'][0, 1, 0] == (i + 1) % 256   # pixels kept exactly
  # --src may also be the csv itself.
  again = registry.prepare('fer2013', tmp_path / 'fer' / 'fer2013.csv', tmp_path / 'out2',
                           max_skip_fraction=0.2)
  assert again.written == report.written


# Vote rows (COLS order) and what the reference rules make of them, per mode:
# a dict {emotion: probability} or None (excluded).
VOTES = {
    'r1': ([0, 10, 0, 0, 0, 0, 0, 0, 0, 0], dict.fromkeys(fer2013.MODES, {'happiness': 1})),
    # the single surprise vote is an outlier; 6 of 9 is a majority
    'r2': ([6, 0, 1, 3, 0, 0, 0, 0, 0, 0], {'majority': {'neutral': 1},
                                            'probability': {'neutral': 2 / 3, 'sadness': 1 / 3},
                                            'crossentropy': {'neutral': 2 / 3, 'sadness': 1 / 3},
                                            'multi_target': {'neutral': 2 / 3, 'sadness': 1 / 3}}),
    # no majority; the tied tops reach 80% (probability) and both have >= 30%
    'r3': ([4, 0, 0, 4, 2, 0, 0, 0, 0, 0], {'majority': None,
                                            'probability': {'neutral': .5, 'sadness': .5},
                                            'crossentropy': {'neutral': .5, 'sadness': .5},
                                            'multi_target': {'neutral': .5, 'sadness': .5}}),
    # unknown on top: excluded everywhere
    'r4': ([3, 0, 0, 3, 0, 0, 0, 0, 4, 0], dict.fromkeys(fer2013.MODES)),
    # 2-vote emotions: kept by probability (75% walk), below multi_target's 30%
    'r5': ([5, 0, 0, 2, 2, 0, 0, 0, 1, 0], {'majority': {'neutral': 1},
                                            'probability': {'neutral': 5 / 9, 'sadness': 2 / 9,
                                                            'anger': 2 / 9},
                                            'crossentropy': {'neutral': 5 / 9, 'sadness': 2 / 9,
                                                             'anger': 2 / 9},
                                            'multi_target': {'neutral': 1}}),
    # a 3-way tie pushes probability past 3 emotions: discarded; no majority; < 50% over 30%
    'r6': ([3, 2, 2, 2, 0, 0, 0, 0, 0, 1], dict.fromkeys(fer2013.MODES)),
    # unknown ties the second place after an emotion: dropped, neutral stays
    'r7': ([6, 0, 0, 0, 0, 0, 0, 0, 2, 2], dict.fromkeys(fer2013.MODES, {'neutral': 1})),
    'r8': ([2, 0, 0, 0, 0, 0, 0, 8, 0, 0], dict.fromkeys(fer2013.MODES, {'contempt': 1})),
}


def _expected_basic(probs):
  v = np.zeros(8, np.float32)
  for name, p in probs.items():
    v[labels.BASIC.index(name)] = p
  return v


@pytest.mark.parametrize('mode', fer2013.MODES)
def test_ferplus_reference_rules(mode):
  for name, (votes, outcome) in VOTES.items():
    got = fer2013.ferplus_label(list(votes), mode)
    if outcome[mode] is None:
      assert got is None, (name, mode, got)
    else:
      np.testing.assert_allclose(fer2013.to_basic(got), _expected_basic(outcome[mode]),
                                 atol=1e-6, err_msg=f'{name} {mode}')
  with pytest.raises(ValueError, match='mode'):
    fer2013.ferplus_label([1] * 10, 'vote')


def _ferplus_folders(root):
  """FER2013Train/Valid/Test with header-less label.csv as generate_training_data.py writes."""
  lines = {'FER2013Train': [], 'FER2013Valid': [], 'FER2013Test': []}
  for i, (name, (votes, _)) in enumerate(VOTES.items()):
    folder = list(lines)[i % 3]
    png = f'fer{i:07d}.png'
    u.image(f'{root}/{folder}/{png}', (48, 48), value=i, mode='L')
    lines[folder].append(f'{png},"(0, 0, 48, 48)",' + ','.join(map(str, votes)))
  lines['FER2013Train'] += [
      'fer0000100.png,"(0, 0, 48, 48)",1,2,3,4,5,6,7,8,9',       # line 4: malformed (9 votes)
      'fer0000101.png,"(0, 0, 48, 48)",10,-1,0,0,0,0,0,0,0,0',   # line 5: label out of range
      'fer0000102.png,"(0, 0, 48, 48)",10,0,0,0,0,0,0,0,0,0',    # line 6: missing png
      'fer0000103.png,"(0, 0, 48, 48)",10,0,0,0,0,0,0,0,0,0']    # line 7: truncated png
  u.truncated(f'{root}/FER2013Train/fer0000103.png')
  for folder, rows in lines.items():
    u.write(f'{root}/{folder}/label.csv', '\n'.join(rows) + '\n')


@pytest.mark.parametrize('mode', ['majority', 'probability', 'multi_target'])
def test_ferplus_modes_end_to_end(tmp_path, mode):
  src, out = tmp_path / 'FERPlus', tmp_path / 'out'
  _ferplus_folders(str(src))
  name = 'ferplus' if mode == 'majority' else f'ferplus/{mode}'   # majority is the default
  report = registry.prepare(name, src, out, max_skip_fraction=0.5)
  lbl = 'FER2013Train/label.csv'
  assert report.skipped == {common.MALFORMED: 1, common.LABEL: 1, common.MISSING: 1,
                            common.UNREADABLE: 1}
  for reason, line in ((common.MALFORMED, 4), (common.LABEL, 5), (common.MISSING, 6),
                       (common.UNREADABLE, 7)):
    assert u.skipped_at(report, reason) == [f'{lbl}:{line}']
  kept = {k for k, (_, o) in VOTES.items() if o[mode] is not None}
  assert report.total_written == len(kept)
  assert sum(report.excluded.values()) == len(VOTES) - len(kept)
  recs = {}
  for split in report.written:
    recs.update(u.records(out, 'ferplus', split) if mode == 'majority'
                else u.records(out, f'ferplus/{mode}', split))
  for i, (name_, (votes, outcome)) in enumerate(VOTES.items()):
    key = f'fer{i:07d}'
    if outcome[mode] is None:
      assert key not in recs
      continue
    r = recs[key]
    np.testing.assert_allclose(r['label_dist'], _expected_basic(outcome[mode]), atol=1e-6)
    top = max(outcome[mode].items(), key=lambda kv: (kv[1], -COLS.index(kv[0])))[0]
    assert labels.BASIC[r['expression']] == top, name_
    assert r['image'].shape == (48, 48, 3)
  # Registered with tfds: its own reader finds the config by name.
  ds = tfds.data_source(f'ferplus/{mode}', data_dir=str(out), split='train')
  assert len(ds) == report.written['train']


def test_ferplus_from_fer2013new_csv(tmp_path):
  """The other layout: fer2013new.csv rows in fer2013.csv's order, empty names skipped."""
  src = tmp_path / 'src'
  header = 'Usage,Image name,' + ','.join(COLS)
  new = [header,
         'Training,fer0000000.png,0,10,0,0,0,0,0,0,0,0',
         'Training,,0,0,0,0,0,0,0,0,0,10',                       # no image: excluded
         'PublicTest,fer0000002.png,2,0,0,0,0,0,0,8,0,0',
         'PrivateTest,fer0000003.png,6,0,1,3,0,0,0,0,0,0',
         'Training,fer0000004.png,0,0,0,0,0,0,0,0,0']            # line 6: malformed
  fer = ['emotion,pixels,Usage'] + [f'0,{_pixels(i)},Training' for i in range(5)]
  u.write(str(src / 'fer2013new.csv'), '\n'.join(new) + '\n')
  u.write(str(src / 'fer2013.csv'), '\n'.join(fer) + '\n')
  report = registry.prepare('ferplus', src, tmp_path / 'out', max_skip_fraction=0.5)
  assert report.written == {'train': 1, 'validation': 1, 'test': 1}
  assert u.skipped_at(report, common.MALFORMED) == ['fer2013new.csv:6']
  assert report.excluded == {'no image name (FERPlus dropped the FER2013 image)': 1}
  val = u.records(tmp_path / 'out', 'ferplus', 'validation')['fer0000002']
  assert labels.BASIC[val['expression']] == 'contempt'
  assert val['image'][0, 0, 0] == 2   # pixels of fer2013.csv row 2 (same order)
  test = u.records(tmp_path / 'out', 'ferplus', 'test')['fer0000003']
  assert labels.BASIC[test['expression']] == 'neutral'
  with pytest.raises(ValueError, match='has configs'):
    registry.prepare('ferplus/vote', src, tmp_path / 'o2')
  os.remove(src / 'fer2013.csv')
  with pytest.raises(FileNotFoundError, match='fer2013.csv'):
    registry.prepare('ferplus', src, tmp_path / 'o3')

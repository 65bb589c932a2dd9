"""CK+ builder: cohn-kanade-images/ sequences, Emotion/*_emotion.txt floats, optional
Landmarks/; peak frames; faces aligned on landmarks or found by the detector."""

import numpy as np

import builders_util as u
from data_prep import registry
from data_prep.builders import common
from unifer_jax.data import labels

CK_TABLE = ('neutral', 'anger', 'contempt', 'disgust', 'fear', 'happiness', 'sadness', 'surprise')


def _sequence(src, seq, n, frame=None, label=None, landmarks=False):
  subject, number = seq.split('/')
  for k in range(1, n + 1):
    stem = f'{subject}_{number}_{k:08d}'
    path = src / 'cohn-kanade-images' / subject / number / f'{stem}.png'
    if frame is None:
      u.image(str(path), (160, 120), value=k, mode='L')
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      frame.convert('L').save(path)
    if landmarks:
      pts = np.tile([[80.0, 90.0]], (68, 1))
      pts[36:42], pts[42:48] = [60, 50], [100, 50]
      u.write(str(src / 'Landmarks' / subject / number / f'{stem}_landmarks.txt'),
              '\n'.join(f'   {x:.7e}   {y:.7e}' for x, y in pts) + '\n')
  if label is not None:
    u.write(str(src / 'Emotion' / subject / number / f'{subject}_{number}_{n:08d}_emotion.txt'),
            f'   {label}\n')


def test_ckplus(tmp_path):
  src, out = tmp_path / 'CK+', tmp_path / 'out'
  scene = u.astronaut_face_scene()
  _sequence(src, 'S005/001', 5, label='3.0000000e+00', landmarks=True)    # disgust, landmarks
  _sequence(src, 'S010/002', 4, frame=scene, label='5.0000000e+00')       # happy, detector
  _sequence(src, 'S011/001', 4, label='7.0000000e+00')                    # flat frames: no face
  _sequence(src, 'S012/001', 3, label='9.0000000e+00')                    # label out of range
  _sequence(src, 'S013/001', 3, label='happy')                            # malformed
  u.write(str(src / 'Emotion' / 'S014' / '001' / 'S014_001_00000003_emotion.txt'),
          '2.0000000e+00\n')                                              # no frames: missing
  _sequence(src, 'S015/001', 3, frame=scene, label='2.0000000e+00')       # contempt; last frame
  u.truncated(str(src / 'cohn-kanade-images' / 'S015' / '001' / 'S015_001_00000003.png'))
  _sequence(src, 'S020/001', 6)                                           # unlabelled: unused

  report = registry.prepare('ckplus', src, out, max_skip_fraction=0.6, face_size=48)
  assert report.written == {'train': 3 + 3 + 2}
  assert u.skipped_at(report, common.LABEL) == ['Emotion/S012/001/S012_001_00000003_emotion.txt:1']
  assert u.skipped_at(report, common.MALFORMED) == ['Emotion/S013/001/S013_001_00000003_emotion.txt:1']
  assert u.skipped_at(report, common.MISSING) == ['Emotion/S014/001/S014_001_00000003_emotion.txt:1']
  assert u.skipped_at(report, common.UNREADABLE) == ['Emotion/S015/001/S015_001_00000003_emotion.txt:1']
  assert report.skipped[common.NO_FACE] == 3
  recs = u.records(out, 'ckplus', 'train')
  assert sorted(recs) == ['S005/001/S005_001_00000003', 'S005/001/S005_001_00000004',
                          'S005/001/S005_001_00000005', 'S010/002/S010_002_00000002',
                          'S010/002/S010_002_00000003', 'S010/002/S010_002_00000004',
                          'S015/001/S015_001_00000001', 'S015/001/S015_001_00000002']
  assert labels.BASIC[recs['S005/001/S005_001_00000005']['expression']] == CK_TABLE[3]
  assert labels.BASIC[recs['S010/002/S010_002_00000004']['expression']] == CK_TABLE[5]
  assert labels.BASIC[recs['S015/001/S015_001_00000001']['expression']] == CK_TABLE[2]
  assert all(r['image'].shape == (48, 48, 3) for r in recs.values())

  # neutral_first adds each used sequence's first frame as neutral; peak_frames=1.
  report = registry.prepare('ckplus', src, out, max_skip_fraction=0.6, face_size=48,
                            peak_frames=1, neutral_first=True)
  recs = u.records(out, 'ckplus', 'train')
  assert labels.BASIC[recs['S005/001/S005_001_00000001']['expression']] == 'neutral'
  assert 'S005/001/S005_001_00000004' not in recs and 'S005/001/S005_001_00000005' in recs

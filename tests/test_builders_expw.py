"""ExpW builder: label/label.lst (with its "cofidence" column) and face crops from
full scenes in image/origin/."""

import numpy as np
from PIL import Image

import builders_util as u
from data_prep import registry
from data_prep.builders import common, expw
from unifer_jax.data import labels

EXPW_TABLE = ('anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise', 'neutral')


def test_expw(tmp_path):
  src, out = tmp_path / 'ExpW', tmp_path / 'out'
  lines = []
  for i in range(7):   # scene i has two faces: a red one on the left, a blue one on the right
    scene = np.full((120, 200, 3), 40, np.uint8)
    scene[30:70, 20:60] = [200, 0, 0]
    scene[40:90, 120:170] = [0, 0, 200]
    (src / 'image' / 'origin').mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene).save(src / 'image' / 'origin' / f'scene_{i}.jpg', quality=98)
    # image_name face_id top left right bottom cofidence label
    lines.append(f'scene_{i}.jpg 0 30 20 60 70 88.5 {i}')
    lines.append(f'scene_{i}.jpg 1 40 120 170 90 60.1 {(i + 3) % 7}')
  u.truncated(str(src / 'image' / 'origin' / 'broken.jpg'))
  lines += ['scene_0.jpg 2 30 20 60 70 50.0 7',          # line 15: label out of range
            'scene_0.jpg 3 30 20 60 70',                   # line 16: malformed
            'nothere.jpg 0 30 20 60 70 50.0 1',            # line 17: missing image
            'broken.jpg 0 10 10 40 40 50.0 1',             # line 18: truncated image
            'scene_1.jpg 5 30 150 260 70 50.0 1']          # line 19: box past the image edge
  u.write(str(src / 'label' / 'label.lst'), '\n'.join(lines) + '\n')
  report = registry.prepare('expw', src, out, max_skip_fraction=0.3, face_size=32,
                            face_margin=0.0)
  lst = 'label/label.lst'
  assert report.total_written == 14
  assert u.skipped_at(report, common.LABEL) == [f'{lst}:15']
  assert u.skipped_at(report, common.MALFORMED) == [f'{lst}:16', f'{lst}:19']
  assert u.skipped_at(report, common.MISSING) == [f'{lst}:17']
  assert u.skipped_at(report, common.UNREADABLE) == [f'{lst}:18']
  recs = {}
  for split in report.written:
    recs.update(u.records(out, 'expw', split))
  for i in range(7):
    assert report.written.get(expw.split_of(f'scene_{i}.jpg'), 0) > 0
    left, right = recs[f'scene_{i}#0'], recs[f'scene_{i}#1']
    assert labels.BASIC[left['expression']] == EXPW_TABLE[i]
    assert labels.BASIC[right['expression']] == EXPW_TABLE[(i + 3) % 7]
    assert left['image'].shape == (32, 32, 3)
    # The crop holds its own face: red on the left box, blue on the right one.
    assert left['image'][16, 16, 0] > 150 and left['image'][16, 16, 2] < 60
    assert right['image'][16, 16, 2] > 150 and right['image'][16, 16, 0] < 60

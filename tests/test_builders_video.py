"""DFEW / FERV39k / MAFW builders: clip records (T = 16 frames) from frame folders and
PyAV-written videos, indexed by the common `<frame_dir> <num_frames> <label>` txt or
DFEW's split CSVs; bad inputs reported as skips by file:line."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import builders_util as u
from data_prep import registry
from data_prep.builders import clips, common
from unifer_jax.data import clips as clip_rows, labels, schema, sources

T = schema.CLIP_FRAMES
SIZE = 32


def _frames(folder, n, start=0):
  """n frames whose grey level is 10 * (start + index): which frames were sampled shows."""
  for i in range(n):
    arr = np.full((40, 40, 3), 10 * (start + i) % 256, np.uint8)
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(arr).save(os.path.join(folder, f'{i + 1:05d}.jpg'), quality=98)


def _video(path, n=12, faststart=False):
  """An mp4 (MPEG-4 part 2) of a real face drifting across a grey scene, via PyAV;
  `faststart` puts the index first (so a file cut short still opens)."""
  import av  # pylint: disable=g-import-not-at-top
  scene = u.astronaut_face_scene()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, 'w', options={'movflags': 'faststart'} if faststart else {}) as out:
    stream = out.add_stream('mpeg4', rate=10)
    stream.width, stream.height, stream.pix_fmt = scene.width, scene.height, 'yuv420p'
    for i in range(n):
      frame = np.roll(np.asarray(scene), i, axis=1)
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return path


def _cut(path, keep=0.5):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[: int(len(data) * keep)])


def _grey(frames):
  return [int(round(np.asarray(f).mean() / 10)) for f in frames]


def test_clip_indices_spread_over_the_clip():
  assert schema.clip_indices(32, 16) == list(range(1, 32, 2))
  assert schema.clip_indices(4, 8) == [0, 0, 1, 1, 2, 2, 3, 3]
  assert schema.clip_indices(1, 3) == [0, 0, 0]
  with pytest.raises(ValueError, match='num_frames'):
    schema.clip_indices(0)


def test_dfew_from_annotation_txt(tmp_path):
  src, out = tmp_path / 'DFEW', tmp_path / 'out'
  clip_dir = src / 'Clip' / 'clip_224x224'
  _frames(clip_dir / '00001', 20)                         # happiness, 20 frames
  _frames(clip_dir / '00002', 8, start=3)                 # neutral, fewer frames than T
  _frames(clip_dir / '00003', 4)                          # line says 10: missing frames
  _frames(clip_dir / '00004', 6)                          # label 9: unknown
  _video(str(src / 'Clip' / 'original' / 'part_1' / '00005.mp4'))      # fear, video only
  _cut(_video(str(src / 'Clip' / 'original' / 'part_1' / '00006.mp4')))  # truncated
  _cut(_video(str(src / 'Clip' / 'original' / 'part_2' / '00009.mp4'), faststart=True),
       keep=0.6)                                          # cut short, but its index opens
  _frames(clip_dir / '00007', 5)
  u.truncated(str(clip_dir / '00007' / '00003.jpg'))      # one unreadable frame file
  prefix = '/home/author/data/DFEW/Clip/clip_224x224'     # the txt's foreign absolute paths
  u.write(str(src / 'annotation' / 'DFEW_set_1_train.txt'),
          f'{prefix}/00001 20 1\n{prefix}/00002 8 3\n{prefix}/00003 10 2\n\n'
          f'{prefix}/00004 6 9\n{prefix}/00008 x 1\n{prefix}/00001 20 1\n')
  u.write(str(src / 'annotation' / 'DFEW_set_1_test.txt'),
          f'{prefix}/00005 12 7\n{prefix}/00006 12 4\n{prefix}/00007 5 5\n{prefix}/00009 12 1\n')

  with pytest.raises(common.SkipFractionExceeded, match='too many inputs skipped'):
    registry.prepare('dfew', src, out, face_size=SIZE)          # default limit 1 %
  assert not os.path.exists(registry.dataset_dir(out, 'dfew/fold1'))
  report = registry.prepare('dfew', src, out, max_skip_fraction=0.9, face_size=SIZE)
  train_txt, test_txt = 'annotation/DFEW_set_1_train.txt', 'annotation/DFEW_set_1_test.txt'
  assert report.written == {'train': 2, 'test': 1}
  assert u.skipped_at(report, common.MISSING) == [f'{train_txt}:3']
  assert u.skipped_at(report, common.LABEL) == [f'{train_txt}:5']
  assert u.skipped_at(report, common.MALFORMED) == [f'{train_txt}:6', f'{train_txt}:7']
  assert u.skipped_at(report, common.UNREADABLE) == [f'{test_txt}:2', f'{test_txt}:3',
                                                     f'{test_txt}:4']
  details = ' '.join(w for ws in report.examples.values() for w in ws)
  assert '4 of 10 frames' in details and 'already listed at ' + f'{train_txt}:1' in details
  assert '00003.jpg: OSError' in details and 'frames its container declares' in details

  train = u.records(out, 'dfew/fold1', 'train')
  assert sorted(train) == ['Clip/clip_224x224/00001', 'Clip/clip_224x224/00002']
  a, b = train['Clip/clip_224x224/00001'], train['Clip/clip_224x224/00002']
  assert labels.BASIC[a['expression']] == 'happiness' and labels.BASIC[b['expression']] == 'neutral'
  assert len(a['frames']) == T and np.stack(a['frames']).shape == (T, SIZE, SIZE, 3)
  assert _grey(a['frames']) == schema.clip_indices(20, T)            # uniform over the clip
  assert _grey(b['frames']) == [3 + i for i in schema.clip_indices(8, T)]
  np.testing.assert_array_equal(a['image'], a['frames'][T // 2])     # image = middle frame
  assert json.loads(a['nuisance']) == {'dfew_class': 'happiness'}

  test = u.records(out, 'dfew/fold1', 'test')
  clip = test['Clip/original/part_1/00005']                          # decoded with PyAV
  assert labels.BASIC[clip['expression']] == 'fear'
  assert np.stack(clip['frames']).shape == (T, SIZE, SIZE, 3)
  assert np.stack(clip['frames']).std() > 10                         # a face, not padding


def test_dfew_from_split_csvs(tmp_path):
  src, out = tmp_path / 'DFEW', tmp_path / 'out'
  _frames(src / 'Clip' / 'clip_224x224' / '00011', 17)
  _frames(src / 'Clip' / 'clip_224x224' / '00012', 16)
  split_dir = src / 'EmoLabel_DataSplit'
  u.write(str(split_dir / 'train(single-labeled)' / 'set_2.csv'),
          'video_name,label\n11,4\n12,6\n13,2\n')          # 13: no folder, no video
  u.write(str(split_dir / 'test(single-labeled)' / 'set_2.csv'), 'video_name,label\n12,5\nzz\n')
  report = registry.prepare('dfew', src, out, config='fold2', max_skip_fraction=0.9,
                            face_size=SIZE)
  assert report.written == {'train': 2, 'test': 1}
  assert u.skipped_at(report, common.MISSING) == ['EmoLabel_DataSplit/train(single-labeled)/set_2.csv:4']
  assert u.skipped_at(report, common.MALFORMED) == ['EmoLabel_DataSplit/test(single-labeled)/set_2.csv:3']
  train = u.records(out, 'dfew/fold2', 'train')
  assert [labels.BASIC[train[k]['expression']] for k in sorted(train)] == ['anger', 'disgust']


def test_mafw_other_classes_and_ferv39k(tmp_path):
  src, out = tmp_path / 'MAFW', tmp_path / 'out'
  for name in ('00001', '00002', '00003'):
    _frames(src / 'data' / 'frames' / name, 6)
  _video(str(src / 'data' / 'clips' / '00004.mkv'))   # Matroska declares no frame count
  u.write(str(src / 'annotation' / 'MAFW_set_1_train.txt'),
          '/x/data/frames/00001 6 8\n/x/data/frames/00002 6 9\n/x/data/frames/00003 6 12\n'
          '/x/data/frames/00004 12 4\n')
  u.write(str(src / 'annotation' / 'MAFW_set_1_test.txt'), '/x/data/frames/00001 6 1\n')
  report = registry.prepare('mafw', src, out, max_skip_fraction=0.5, face_size=SIZE)
  assert report.written == {'train': 2, 'test': 1}
  assert report.excluded == {"mafw class 'anxiety' is not in labels.BASIC": 1}
  assert u.skipped_at(report, common.LABEL) == ['annotation/MAFW_set_1_train.txt:3']
  train = u.records(out, 'mafw/fold1', 'train')
  assert labels.BASIC[train['data/frames/00001']['expression']] == 'contempt'
  assert labels.BASIC[train['data/clips/00004']['expression']] == 'anger'
  assert np.stack(train['data/clips/00004']['frames']).shape == (T, SIZE, SIZE, 3)

  report = registry.prepare('mafw', src, out, max_skip_fraction=0.5, face_size=SIZE,
                            other_classes='keep')
  train = u.records(out, 'mafw/fold1', 'train')
  kept = train['data/frames/00002']
  assert kept['expression'] == -1 and json.loads(kept['nuisance']) == {'mafw_class': 'anxiety'}
  assert np.isnan(kept['label_dist']).all()

  src = tmp_path / 'FERV39k'
  _frames(src / '2_ClipsforFaceCrop' / 'Action' / 'Angry' / '0001', 9)
  _frames(src / '2_ClipsforFaceCrop' / 'Talk' / 'Angry' / '0001', 9)
  u.write(str(src / 'FERV39k_train.txt'), '2_ClipsforFaceCrop/Action/Angry/0001 9 4\n'
          '2_ClipsforFaceCrop/Talk/Angry/0001 9 4\n')
  u.write(str(src / 'FERV39k_test.txt'), '2_ClipsforFaceCrop/Talk/Angry/0001 9 2\n')
  report = registry.prepare('ferv39k', src, out, face_size=SIZE)
  assert report.written == {'train': 2, 'test': 1} and not report.skipped
  test = u.records(out, 'ferv39k', 'test')
  assert labels.BASIC[test['2_ClipsforFaceCrop/Talk/Angry/0001']['expression']] == 'sadness'
  # The training pipeline's reader takes clip datasets as they are: image bytes + frames.
  rec = sources.open_split('ferv39k', 'train', str(out))[0]
  assert isinstance(rec['image'], bytes) and all(isinstance(f, bytes) for f in rec['frames'])
  assert np.stack([clip_rows.decoded_frame(f) for f in rec['frames']]).shape == (T, SIZE, SIZE, 3)


def test_missing_annotation_is_a_clear_error(tmp_path):
  (tmp_path / 'FERV39k').mkdir()
  with pytest.raises(FileNotFoundError, match='FERV39k_train.txt'):
    registry.prepare('ferv39k', tmp_path / 'FERV39k', tmp_path / 'out')
  assert clips.is_video_file('a/b.MP4') and not clips.is_video_file('a/.b.mp4')

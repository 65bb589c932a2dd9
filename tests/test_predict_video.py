"""`unifer predict` on a video file: an mp4 of a rendered corpus face drifting on an
ellipse (serve/clip.py's frames, encoded with PyAV) through a tiny random exported
student. The face is followed frame by frame, every frame's probabilities are the
student's on that frame's crop, the clip label is their mean's argmax, the timeline PNG
is written and linked; a broken file and a faceless video each get a one-line reason."""

import json

import numpy as np
import pytest
from PIL import Image

from unifer_jax import cli, predict, predict_video
from unifer_jax.data import faces, labels
from unifer_jax.serve import clip

import student_util


def write_mp4(path, frames, rate=10):
  import av  # pylint: disable=g-import-not-at-top
  with av.open(str(path), 'w') as out:
    stream = out.add_stream('mpeg4', rate=rate)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = 'yuv420p'
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return path


@pytest.fixture(scope='module')
def student_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('demo')
  student_util.export_student(root, out='export')
  return root


def test_a_video_gets_a_followed_face_a_clip_label_and_a_timeline(student_dir, tmp_path, capsys):
  frames = list(clip.frames(n_frames=40, n_faces=1))
  video = write_mp4(tmp_path / 'drift.mp4', frames)
  report = tmp_path / 'report'
  assert cli.main(['predict', '--model', str(student_dir), str(video), '--report',
                   str(report)]) == 0
  (rec,) = json.loads(capsys.readouterr().out)
  assert rec['video'] == str(video) and rec['model'] == 'exported student'
  assert rec['frames'] == predict_video.DEFAULT_FRAMES and rec['duration_s'] == pytest.approx(4.0)
  per_frame = rec['per_frame']
  assert len(per_frame) == predict_video.DEFAULT_FRAMES
  times = [f['t_s'] for f in per_frame]
  assert times == sorted(times) and 0 <= times[0] < 0.2 and 3.7 < times[-1] < 4.0
  # The face drifts +-20 px around the frame's centre (clip.frames): every box follows it.
  centres = np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in (f['box'] for f in per_frame)])
  assert np.all(np.abs(centres - [clip.WIDTH / 2, clip.HEIGHT / 2]) < [40, 30])
  assert sum(f['face_found'] for f in per_frame) >= 0.8 * len(per_frame)
  # Each frame's probabilities are the student's on that frame's crop (frames re-read
  # the way the video was sampled); the clip's are their mean.
  model = predict.load_model(str(student_dir))
  decoded, _, _ = predict_video.read_frames(str(video))
  crops = np.stack([faces.crop(f, p['box'], size=model.image_size)
                    for f, p in zip(decoded, per_frame)])
  expected = model.label_probabilities(crops)
  got = np.array([[f['probabilities'][n] for n in labels.BASIC] for f in per_frame])
  np.testing.assert_allclose(got, expected, atol=1e-5)
  clip_probs = np.array([rec['probabilities'][n] for n in labels.BASIC])
  np.testing.assert_allclose(clip_probs, expected.mean(0), atol=1e-5)
  assert rec['label'] == labels.BASIC[int(expected.mean(0).argmax())]
  assert [f['label'] for f in per_frame] == [labels.BASIC[i] for i in expected.argmax(1)]
  png = report / rec['timeline']
  assert rec['timeline'] == 'drift_timeline.png' and Image.open(png).size[0] > 400
  assert rec['timeline'] in (report / 'predict.html').read_text()


def test_a_broken_video_and_a_faceless_one_say_why(student_dir, tmp_path, capsys):
  broken = tmp_path / 'broken.mp4'
  broken.write_bytes(b'\x00\x00\x00\x18ftypmp42' + b'garbage' * 50)
  wall = write_mp4(tmp_path / 'wall.mp4', [np.full((120, 160, 3), 128, np.uint8)] * 6)
  code = cli.main(['predict', '--model', str(student_dir), str(broken), str(wall),
                   '--out', str(tmp_path / 'out.json'), '--report', str(tmp_path / 'r')])
  assert code == 1
  err = capsys.readouterr().err
  assert f'unifer predict: {broken}: not a readable video (' in err
  assert f'unifer predict: {wall}: no face found in any of 6 sampled frames' in err
  assert 'Traceback' not in err
  assert json.loads((tmp_path / 'out.json').read_text()) == []

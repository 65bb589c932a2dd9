"""Face detection (scikit-image LBP cascade) on a real face, crops, eye alignment."""

import time

import numpy as np
import pytest
from skimage import data

from unifer_jax.data import faces


def test_detects_and_crops_the_astronaut():
  img = data.astronaut()                      # 512x512, one smiling face near (220, 115)
  t = time.perf_counter()
  boxes = faces.detect(img)
  took = time.perf_counter() - t
  assert boxes, 'no face found in skimage.data.astronaut()'
  x0, y0, x1, y1 = boxes[0]                   # largest first
  cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
  assert 190 < cx < 250 and 90 < cy < 150 and 60 < side < 160, boxes[0]
  assert took < 5, took
  crop = faces.face_crop(img, size=112)
  assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
  # The crop's centre is the box centre of the original (a pure scale + shift).
  np.testing.assert_allclose(crop[56, 56].astype(int), img[int(cy), int(cx)].astype(int), atol=40)
  face = faces.locate(img)
  assert face.how == 'detector' and face.eyes is None


@pytest.mark.parametrize('kind', ['noise', 'flat', 'tiny'])
def test_no_face_is_reported_not_raised(kind):
  rng = np.random.default_rng(0)
  img = {'noise': rng.integers(0, 255, (200, 240, 3), dtype=np.uint8),
         'flat': np.full((200, 200), 128, np.uint8),
         'tiny': np.zeros((10, 12, 3), np.uint8)}[kind]
  assert faces.detect(img) == []
  assert faces.face_crop(img) is None and faces.locate(img) is None


def test_crop_square_margin_and_padding():
  img = np.zeros((100, 200, 3), np.uint8)
  img[20:60, 40:80] = 255                                  # a 40x40 white 'face'
  out = faces.crop(img, (40, 20, 80, 60), size=40, margin=0.0)
  assert out.shape == (40, 40, 3) and out[2:-2, 2:-2].min() == 255
  out = faces.crop(img, (40, 20, 80, 60), size=80, margin=0.5)   # 80 px square around it
  assert out[40, 40].min() == 255 and out[5, 5].max() == 0 and out[20:60, 20:60].min() >= 250
  # A wide box becomes square (side = the longer edge); outside the image is zero.
  assert faces.square_box((0, 0, 40, 20), margin=0) == (0, -10, 40, 30)
  edge = faces.crop(img, (0, 0, 20, 20), size=20, margin=0.5)
  assert edge[:5].max() == 0
  with pytest.raises(ValueError, match='x1 > x0'):
    faces.crop(img, (50, 10, 40, 30))


def test_align_puts_the_eyes_in_place():
  # Eyes at a tilt: red dot left, blue dot right.
  img = np.full((200, 200, 3), 60, np.uint8)
  left, right = (70.0, 90.0), (130.0, 110.0)
  for (x, y), c in ((left, [255, 0, 0]), (right, [0, 0, 255])):
    img[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4] = c
  size = 100
  out = faces.align(img, right, left, size=size)     # order of the eyes does not matter
  lx, ly = (round(v * size) for v in faces.LEFT_EYE)
  rx, ry = (round(v * size) for v in faces.RIGHT_EYE)
  assert out[ly, lx, 0] > 200 and out[ly, lx, 2] < 60
  assert out[ry, rx, 2] > 200 and out[ry, rx, 0] < 60
  # Another template: the eyes land where it says.
  out2 = faces.align(img, left, right, size=size, eyes_at=((0.25, 0.5), (0.75, 0.5)))
  assert out2[50, 25, 0] > 200 and out2[50, 75, 2] > 200
  with pytest.raises(ValueError, match='horizontal eye line'):
    faces.align(img, left, right, size=size, eyes_at=((0.7, 0.5), (0.3, 0.5)))
  # face_crop prefers landmarks (68-point: eye centres = mean of 36-41 / 42-47).
  pts = np.tile([[100.0, 150.0]], (68, 1))
  pts[36:42], pts[42:48] = left, right
  np.testing.assert_array_equal(faces.face_crop(img, landmarks=pts, size=size), out)
  five = np.array([left, right, (100, 130), (80, 160), (120, 160)])
  assert faces.eyes_from_landmarks(five) == (left, right)
  assert faces.locate(img, landmarks=five).how == 'landmarks'
  with pytest.raises(ValueError, match='5 or 68'):
    faces.eyes_from_landmarks(np.zeros((10, 2)))
  with pytest.raises(ValueError, match='coincide'):
    faces.align(img, left, left)
  with pytest.raises(ValueError, match='uint8'):
    faces.detect(img.astype(np.float32))

"""Face detection, eye-line alignment and square crops at a fixed size.

One module for every dataset builder that starts from full images (ExpW, CK+, the
face-text corpora, RAF-DB/AffectNet originals) and for `unifer predict`, so training
and inference see faces framed the same way.

* `detect(image)`: scikit-image's LBP frontal-face cascade (no OpenCV needed), run on a
  copy downscaled to `max_side` pixels for speed; boxes largest first. `distinct(boxes)`
  drops its repeats of one face.
* `crop(image, box)`: the box made square around its centre, grown by `margin` on each
  side, cut (zero padding outside the image) and resized to `size` x `size`.
* `align(image, left_eye, right_eye)`: a similarity transform putting the eye line
  horizontal with the eyes at fixed places in a `size` x `size` output.
* `face_crop(image, box=..., landmarks=...)`: the one entry: landmarks -> align,
  else box -> crop, else detect -> crop; returns None when no face is found (callers
  report it; nothing raises for a face-less image).

Images are HxWx3 (or HxW) uint8 numpy arrays; boxes are (x0, y0, x1, y1) in pixels.
"""

import dataclasses
import functools

import numpy as np
from PIL import Image

# Where the eyes land in an aligned face, as fractions of the output size (x, y).
# 0.36 of the width between the eyes and the eye line at 40% height frame the face
# like a detector box grown by ~25% (forehead to chin visible).
LEFT_EYE = (0.32, 0.40)
RIGHT_EYE = (0.68, 0.40)


@dataclasses.dataclass(frozen=True)
class Face:
  """Where a face is: a box, and the eye centres when landmarks gave them."""
  box: tuple            # (x0, y0, x1, y1) pixels
  eyes: tuple | None    # ((lx, ly), (rx, ry)): the eye at smaller x first
  how: str              # 'landmarks' | 'box' | 'detector'


def _rgb(image) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'face images must be uint8, got {image.dtype}')
  if image.ndim == 2:
    return np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f'face images must be HxW or HxWx3, got shape {image.shape}')
  return image[..., :3]


@functools.lru_cache(maxsize=1)
def _cascade():
  # Lazy: scikit-image takes ~1 s to import and only detection needs it.
  from skimage import data, feature  # pylint: disable=g-import-not-at-top
  return feature.Cascade(data.lbp_frontal_face_cascade_filename())


def detect(image, *, max_side: int = 320, min_size: int = 24, min_neighbors: int = 4,
           scale_factor: float = 1.2) -> list:
  """Frontal faces in `image`, as (x0, y0, x1, y1) boxes, largest first ([] if none).

  The cascade runs on a grey copy whose longer side is at most `max_side` (a 512 px
  photo takes ~0.25 s instead of ~2 s); boxes are mapped back to `image` pixels.
  `min_size` is in pixels of that copy.
  """
  rgb = _rgb(image)
  h, w = rgb.shape[:2]
  scale = min(1.0, max_side / max(h, w))
  grey = Image.fromarray(rgb).convert('L')
  if scale < 1.0:
    grey = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
  g = np.asarray(grey, np.float32) / 255.0
  if min(g.shape) < min_size:
    return []
  found = _cascade().detect_multi_scale(
      g, scale_factor=scale_factor, step_ratio=1, min_size=(min_size, min_size),
      max_size=g.shape, min_neighbor_number=min_neighbors)
  boxes = [(d['c'] / scale, d['r'] / scale, (d['c'] + d['width']) / scale,
            (d['r'] + d['height']) / scale) for d in found]
  return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))


def distinct(boxes, overlap: float = 0.5) -> list:
  """Largest-first boxes without the detector's repeats of one face: a box is dropped
  when most of it (> overlap of its area) lies inside an already kept one."""
  kept = []
  for b in boxes:
    area = (b[2] - b[0]) * (b[3] - b[1])
    inside = [max(0.0, min(b[2], k[2]) - max(b[0], k[0])) * max(0.0, min(b[3], k[3]) - max(b[1], k[1]))
              for k in kept]
    if not any(i > overlap * area for i in inside):
      kept.append(b)
  return kept


def eyes_from_landmarks(points) -> tuple:
  """Eye centres from 5-point (eyes first: RAF-DB, RetinaFace/LAION-Face) or
  68-point (iBUG: AffectNet, CK+) landmarks, ordered by x."""
  p = np.asarray(points, np.float64).reshape(-1, 2)
  if len(p) == 68:
    a, b = p[36:42].mean(0), p[42:48].mean(0)
  elif len(p) == 5:
    a, b = p[0], p[1]
  else:
    raise ValueError(f'landmarks must have 5 or 68 (x, y) points, got {len(p)}')
  a, b = sorted([tuple(a), tuple(b)])
  return a, b


def square_box(box, margin: float = 0.25) -> tuple:
  """The square around `box`'s centre with side max(w, h) * (1 + 2 * margin)."""
  x0, y0, x1, y1 = map(float, box)
  if not (x1 > x0 and y1 > y0):
    raise ValueError(f'face box must have x1 > x0 and y1 > y0, got {box}')
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  half = max(x1 - x0, y1 - y0) * (1 + 2 * margin) / 2
  return (cx - half, cy - half, cx + half, cy + half)


def crop(image, box, *, size: int = 224, margin: float = 0.25) -> np.ndarray:
  """Square crop around `box` grown by `margin`, resized to size x size (zero-padded
  where it leaves the image)."""
  x0, y0, x1, y1 = square_box(box, margin)
  side = x1 - x0
  # Affine map output pixel -> input pixel: a pure scale + shift.
  k = side / size
  out = Image.fromarray(_rgb(image)).transform(
      (size, size), Image.AFFINE, (k, 0, x0, 0, k, y0), resample=Image.BILINEAR)
  return np.asarray(out)


def align(image, left_eye, right_eye, *, size: int = 224,
          eyes_at: tuple = (LEFT_EYE, RIGHT_EYE)) -> np.ndarray:
  """Rotate/scale/shift so the eyes sit at `eyes_at` (fractions of the output, left
  then right; default LEFT_EYE/RIGHT_EYE) of a size x size output."""
  (lx, ly), (rx, ry) = sorted([tuple(map(float, left_eye)), tuple(map(float, right_eye))])
  src = np.array([rx - lx, ry - ly])
  dist = np.hypot(*src)
  if dist < 1e-6:
    raise ValueError(f'eye centres coincide: {left_eye}, {right_eye}')
  (tlx, tly), (trx, try_) = eyes_at
  if abs(try_ - tly) > 1e-9 or trx <= tlx:
    raise ValueError(f'align: eyes_at must be a horizontal eye line, left first; got {eyes_at}')
  want = (trx - tlx) * size
  # Output -> input similarity: input = s * R(theta) @ (out - out_left) + in_left.
  s = dist / want
  c, n = src / dist
  ox, oy = tlx * size, tly * size
  a, b = s * c, -s * n
  d, e = s * n, s * c
  coeffs = (a, b, lx - a * ox - b * oy, d, e, ly - d * ox - e * oy)
  out = Image.fromarray(_rgb(image)).transform(
      (size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
  return np.asarray(out)


def locate(image, *, box=None, landmarks=None, detect_missing: bool = True) -> Face | None:
  """The face to use: landmarks beat a given box beat the detector; None if none."""
  if landmarks is not None:
    eyes = eyes_from_landmarks(landmarks)
    p = np.asarray(landmarks, np.float64).reshape(-1, 2)
    return Face(box=(*p.min(0), *p.max(0)), eyes=eyes, how='landmarks')
  if box is not None:
    return Face(box=tuple(map(float, box)), eyes=None, how='box')
  if detect_missing:
    boxes = detect(image)
    if boxes:
      return Face(box=boxes[0], eyes=None, how='detector')
  return None


def face_crop(image, *, box=None, landmarks=None, size: int = 224, margin: float = 0.25,
              detect_missing: bool = True) -> np.ndarray | None:
  """A size x size face: aligned on the eyes if landmarks are given, else a square
  crop of `box` (or of the largest detected face). None if no face was found."""
  face = locate(image, box=box, landmarks=landmarks, detect_missing=detect_missing)
  if face is None:
    return None
  if face.eyes is not None:
    return align(image, *face.eyes, size=size)
  return crop(image, face.box, size=size, margin=margin)

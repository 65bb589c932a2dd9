"""Procedural face renderer driven by FACS action-unit amplitudes.

`render(aus, look)` draws a frontal cartoon-realistic face with PIL at `supersample`
times the output size, then box-downsamples, lights and adds noise. It is a pure
function of its arguments (the noise comes from `look.noise_seed`), so records are
reproducible from (aus, look) alone.

Each AU moves what /work/shared/FACS.md ("What each AU does to a drawn face") says it
moves; the per-AU displacements are in the `_draw_*` functions and marked `AUn`.
Deviations from that table, all additions for a flat drawing:
* AU1/AU2 also draw horizontal forehead wrinkles (central for 1, lateral for 2);
* AU9 lowers the inner brows slightly and deepens the nasolabial folds (it does on real
  faces); AU12 and AU6 deepen the nasolabial folds too;
* AU26 narrows the mouth a little (the jaw pulls the corners in); AU25 and AU26 both
  open the mouth, 26 mostly by moving the lower lip and chin down;
* a unilateral AU (contempt's 12 + 14) is given as `unilateral={au: side}`.

Face coordinates: x to the image right, y down, the face half-width ~1, origin at
the nose; a feature's depth z (towards the camera) comes from an ellipsoidal head, so
yaw shifts and foreshortens features (near features move more than the outline).
"""

import dataclasses
import functools
import json
import math

import numpy as np
from PIL import Image, ImageDraw

from unifer_jax.data import labels

SKIN_TONES = ((250, 222, 198), (241, 196, 166), (224, 172, 138), (198, 140, 100),
              (160, 105, 70), (120, 78, 52), (88, 58, 40))
HAIR_COLORS = ((28, 24, 22), (62, 42, 30), (104, 72, 46), (196, 164, 112),
               (150, 148, 145), (140, 70, 40))
IRIS_COLORS = ((88, 58, 38), (50, 36, 28), (70, 105, 150), (80, 110, 70))
OCCLUDER_HIDES = {  # AUs an occluder hides (the label stays the truth)
    'none': (), 'mask': (10, 12, 14, 15, 17, 20, 23, 24, 25, 26),
    'hand': (10, 12, 14, 15, 17, 20, 23, 24, 25, 26)}


@dataclasses.dataclass(frozen=True)
class Look:
  """Everything but the expression: identity, pose, lighting, occlusion, noise."""
  yaw: float = 0.0            # degrees, + turns the face to the image right
  roll: float = 0.0           # degrees, in-plane
  scale: float = 1.0          # face size relative to the frame
  shift: tuple = (0.0, 0.0)   # face centre offset, fraction of the frame
  light_angle: float = 0.0    # degrees, direction the light comes from
  light: float = 0.0          # shading gradient strength (0 = flat)
  skin: tuple = SKIN_TONES[1]
  hair: str = 'short'         # none | short | long
  hair_color: tuple = HAIR_COLORS[1]
  iris: tuple = IRIS_COLORS[0]
  background: tuple = ((200, 205, 210), (150, 160, 170))
  glasses: bool = False
  occluder: str = 'none'      # none | mask | hand
  occluder_color: tuple = (170, 200, 225)
  noise: float = 0.0          # Gaussian pixel noise sigma (0..255 scale)
  noise_seed: int = 0
  # identity geometry (multiplicative or additive tweaks of the average face)
  face_width: float = 0.9
  jaw: float = 0.25
  eye_size: float = 1.0
  eye_y: float = -0.12
  brow_y: float = -0.40
  mouth_width: float = 0.33
  lip: float = 1.0
  gaze: float = 0.0

  def to_json(self) -> str:
    return json.dumps(self.__dict__, sort_keys=True, separators=(',', ':'))


def sample_look(rng: np.random.Generator) -> Look:
  """A random identity and nuisance setting (pose, lighting, skin, hair, occlusion)."""
  u = rng.uniform
  jitter = lambda c, d: tuple(min(255, max(0, v + int(e))) for v, e in zip(c, rng.integers(-d, d + 1, 3)))
  bg0 = tuple(int(v) for v in rng.integers(40, 235, 3))
  occluder = rng.choice(['none', 'mask', 'hand'], p=[0.88, 0.06, 0.06])
  skin = jitter(SKIN_TONES[rng.integers(len(SKIN_TONES))], 8)
  return Look(
      yaw=round(min(25.0, max(-25.0, rng.normal(0, 11))), 2),
      roll=round(min(18.0, max(-18.0, rng.normal(0, 7))), 2),
      scale=round(u(0.85, 1.05), 3),
      shift=(round(u(-0.05, 0.05), 3), round(u(-0.04, 0.04), 3)),
      light_angle=round(u(0, 360), 1), light=round(u(0, 0.45), 3),
      skin=skin, hair=str(rng.choice(['none', 'short', 'long'], p=[0.15, 0.5, 0.35])),
      hair_color=jitter(HAIR_COLORS[rng.integers(len(HAIR_COLORS))], 10),
      iris=jitter(IRIS_COLORS[rng.integers(len(IRIS_COLORS))], 10),
      background=(bg0, jitter(bg0, 50)),
      glasses=bool(rng.random() < 0.15), occluder=str(occluder),
      occluder_color=(jitter(skin, 6) if occluder == 'hand' else
                      tuple(int(v) for v in rng.integers(30, 250, 3))),
      noise=round(float(u(1, 8)) if rng.random() < 0.4 else 0.0, 2),
      noise_seed=int(rng.integers(2**31)),
      face_width=round(u(0.84, 0.96), 3), jaw=round(u(0.15, 0.35), 3),
      eye_size=round(u(0.88, 1.12), 3), eye_y=round(u(-0.16, -0.08), 3),
      brow_y=round(u(-0.44, -0.36), 3), mouth_width=round(u(0.3, 0.36), 3),
      lip=round(u(0.75, 1.25), 3), gaze=round(u(-0.03, 0.03), 3))


def mix(a, b, t):
  t = min(max(float(t), 0.0), 1.0)
  return tuple(int(x + (y - x) * t + 0.5) for x, y in zip(a, b))


def _ink(lk: Look, t: float):
  """Skin darkened t of the way to near-black (lines, folds, wrinkles); boosted on
  dark skin so the lines that carry the AUs stay visible."""
  r, g, b = lk.skin
  boost = 1 + 0.6 * max(0.0, (170 - (0.3 * r + 0.59 * g + 0.11 * b)) / 110)
  return mix(lk.skin, (20, 10, 10), t * boost)


@functools.lru_cache(maxsize=None)
def _bezier_basis(n):
  t = np.linspace(0, 1, n)[:, None]
  return np.concatenate([(1 - t) ** 2, 2 * t * (1 - t), t ** 2], 1)


def _bezier(p0, p1, p2, n=9):
  """Quadratic Bezier from p0 to p2 passing through p1 at its middle."""
  ctrl = np.array([p0, p1, p2], np.float64)
  ctrl[1] = 2 * ctrl[1] - (ctrl[0] + ctrl[2]) / 2
  return _bezier_basis(n) @ ctrl


@functools.lru_cache(maxsize=None)
def _circle(n, a0, a1):
  t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * math.pi)
  return np.stack([np.cos(t), np.sin(t)], -1)


def _ellipse(cx, cy, rx, ry, n=20, a0=0.0, a1=2 * math.pi):
  return _circle(n, a0, a1) * (rx, ry) + (cx, cy)


class _Canvas:
  """Collects face-coordinate shapes, then projects them all at once (yaw, roll,
  scale) and draws them in order -- one numpy pass instead of one per shape."""

  def __init__(self, look: Look, size: int):
    self.look, self.size = look, size
    col = np.linspace(np.asarray(look.background[0], np.float32),
                      np.asarray(look.background[1], np.float32), size).astype(np.uint8)
    self.img = Image.fromarray(col[:, None]).resize((size, size), Image.NEAREST)
    self.unit = size / 2.6 * look.scale
    self.ops = []

  def poly(self, pts, fill, dz=0.0, flat=False):
    self.ops.append((np.asarray(pts, np.float64).reshape(-1, 2), fill, 0, dz, flat))

  def line(self, pts, fill, width, dz=0.0, flat=False):
    self.ops.append((np.asarray(pts, np.float64).reshape(-1, 2), fill,
                     max(1, round(width * self.unit)), dz, flat))

  def flush(self) -> Image.Image:
    counts = [len(op[0]) for op in self.ops]
    xy = project(np.concatenate([op[0] for op in self.ops]), self.look, self.size,
                 dz=np.repeat([op[3] for op in self.ops], counts),
                 flat=np.repeat([op[4] for op in self.ops], counts)).ravel().tolist()
    draw, i = ImageDraw.Draw(self.img), 0
    for (_, fill, width, _, _), n in zip(self.ops, counts):
      seg = xy[i:i + 2 * n]
      i += 2 * n
      if width:
        draw.line(seg, fill=fill, width=width)
      else:
        draw.polygon(seg, fill=fill)
    return self.img


def project(points, look: Look = Look(), size: int = 112, dz=0.0, flat=False) -> np.ndarray:
  """Face coordinates [N, 2] -> pixel (x, y) [N, 2] in a `size` image of `look`.

  A point's depth comes from an ellipsoidal head (+ dz), so yaw moves near features
  more than the outline (`flat` points -- outline, neck, hand -- ignore yaw).
  """
  p = np.asarray(points, np.float64).reshape(-1, 2)
  yaw, roll = math.radians(look.yaw), math.radians(look.roll)
  xn = p[:, 0] / look.face_width
  depth = 0.85 * np.sqrt(np.clip(1 - xn * xn, 0.02, 1)) * (1 - 0.08 * p[:, 1] ** 2) + dz
  x = np.where(flat, p[:, 0], p[:, 0] * math.cos(yaw) + depth * math.sin(yaw))
  y = p[:, 1] - 0.05  # a tight crop like aligned FER faces: eyes ~43 %, mouth ~70 % down
  cr, sr, u = math.cos(roll), math.sin(roll), size / 2.6 * look.scale
  px = size * (0.5 + look.shift[0]) + (x * cr - y * sr) * u
  py = size * (0.5 + look.shift[1]) + (x * sr + y * cr) * u
  return np.stack([px, py], -1)


def eye_centres(look: Look, size: int = 112) -> np.ndarray:
  """Pixel (x, y) [2, 2] of the eye centres (image-left eye first): the landmarks an
  aligner gets from a face detector, here exact."""
  return project([(-0.35, look.eye_y), (0.35, look.eye_y)], look, size)


# Where eye-line alignment puts the eyes (fractions of the output): where they are on
# an unrolled, unshifted, scale-1 frontal face with the average eye height, so aligned
# faces keep the renderer's framing (faces.LEFT_EYE/RIGHT_EYE would zoom in ~1.3x and
# cut the chin, which AU26 moves).
ALIGNED_EYES = tuple(tuple(round(float(v), 4) for v in xy) for xy in eye_centres(Look(), 1))


class _AUs:
  """Amplitude lookup: a(au) or a(au, side) for unilateral AUs."""

  def __init__(self, aus, unilateral):
    self.aus = {int(k): float(v) for k, v in dict(aus).items()}
    self.unilateral = dict(unilateral or {})
    for au, v in self.aus.items():
      if au not in labels.AUS or not 0 <= v <= 1:
        raise ValueError(f'render: AU{au}={v}; expected an AU in {list(labels.AUS)} '
                         'with amplitude in [0, 1]')
    for au, side in self.unilateral.items():
      if side not in (-1, 1):
        raise ValueError(f'render: unilateral AU{au} side={side!r}; expected -1 or +1')

  def __call__(self, au, side=None):
    v = self.aus.get(au, 0.0)
    if au in self.unilateral and side is not None and side != self.unilateral[au]:
      return 0.0
    return v


_T11, _T17 = np.linspace(-1, 1, 11), np.linspace(-1, 1, 17)
_BROW_HALF = np.linspace(0.042, 0.022, 11)[:, None] * [0, 1]
_OUTLINE_T = np.linspace(0, 2 * math.pi, 48, endpoint=False)


def _outline(look: Look, jaw_drop: float):
  t = _OUTLINE_T
  x, c = look.face_width * np.sin(t), np.cos(t)
  y = np.where(c > 0, -1.3 * c, -1.1 * c)
  lower = np.maximum(y, 0) / 1.1
  x = x * (1 - look.jaw * lower ** 2.2)
  y = y + jaw_drop * np.minimum(np.maximum((y - 0.35) / 0.5, 0), 1)
  return np.stack([x, y], -1)


def _draw_head(cv: _Canvas, jaw_drop: float):
  lk = cv.look
  shadow = mix(lk.skin, (0, 0, 0), 0.25)
  cv.poly([(-0.42, 0.5), (0.42, 0.5), (0.5, 2.2), (-0.5, 2.2)], shadow, flat=True)
  if lk.hair == 'long':
    back = _outline(lk, 0) * [1.12, 1.05] + [0, -0.04]
    back = np.concatenate([back[back[:, 1] < 0.3], [(-1.15, 1.0), (1.15, 1.0)]])
    back = back[np.argsort(np.arctan2(back[:, 0], -back[:, 1] + 0.3))]
    cv.poly(back, lk.hair_color, flat=True)
  for s in (-1, 1):
    ear = _ellipse(s * 0.97 * lk.face_width, -0.05, 0.12, 0.22)
    cv.poly(ear, mix(lk.skin, (0, 0, 0), 0.12), dz=-1.0)
  cv.poly(_outline(lk, jaw_drop), lk.skin, flat=True)


def _draw_eyes(cv: _Canvas, a: _AUs, blink: float = 0.0):
  lk = cv.look
  line = _ink(lk, 0.75)
  for s in (-1, 1):
    ex, ey, w = s * 0.35, lk.eye_y, 0.18 * lk.eye_size
    up = 0.078 * lk.eye_size + 0.08 * a(5) - 0.03 * a(7) - 0.012 * a(6)   # AU5 / AU7 / AU6
    lo = 0.055 * lk.eye_size - 0.032 * a(7) - 0.035 * a(6)                   # AU7 / AU6
    up, lo = max(up, 0.018), max(lo, 0.006)
    t = _T11
    xs = ex + s * t * w
    shape = np.sin(math.pi * (t + 1) / 2) ** 0.8
    upper = np.stack([xs, ey - up * shape * (1 - 0.12 * s * t)], -1)
    lower = np.stack([xs, ey + lo * shape], -1)
    crease = upper[2:-2] - [0, 0.045 + 0.02 * lk.eye_size]   # stays put while the lid falls
    if blink > 0:  # AU45: the upper lid comes down onto the lower one (closed at 1)
      upper = upper + blink * (lower - upper)
    cv.poly(np.concatenate([upper, lower[::-1]]), (238, 236, 232))
    ir = 0.082 * lk.eye_size
    cv.poly(_ellipse(ex + lk.gaze, ey + 0.008, ir, ir), lk.iris)
    cv.poly(_ellipse(ex + lk.gaze, ey + 0.008, ir * 0.45, ir * 0.45), (15, 12, 12))
    # Skin over the iris above the upper lid and below the lower lid (the lids clip it).
    cv.poly(np.concatenate([upper, upper[::-1] - [0, 0.16]]), lk.skin)
    cv.poly(np.concatenate([lower, lower[::-1] + [0, 0.12]]), lk.skin)
    cv.line(upper, line, 0.028)
    cv.line(lower, _ink(lk, 0.75 * (0.35 + 0.5 * max(a(7), a(6)))), 0.014)
    if a(5) < 0.4:  # the lid crease vanishes when the upper lid retracts
      cv.line(crease, _ink(lk, 0.26), 0.012)
    # AU6: cheeks up (infraorbital furrow rises) and crow's feet at the outer corners.
    fy = ey + 0.17 - 0.06 * a(6) - 0.02 * a(12)
    cv.line(_bezier((ex - s * 0.1, fy - 0.02), (ex + s * 0.05, fy + 0.02),
                    (ex + s * 0.2, fy - 0.05)), _ink(lk, 0.75 * (0.1 + 0.45 * a(6))), 0.02)
    if a(6) > 0:
      ox = ex + s * (w + 0.035)
      for ang in (-0.45, 0.0, 0.45):
        d = np.array([s * math.cos(ang), math.sin(ang)])
        cv.line([(ox, ey), (ox + 0.1 * d[0], ey + 0.1 * d[1])], _ink(lk, 0.45 * a(6)), 0.016)


def _draw_brows(cv: _Canvas, a: _AUs):
  lk = cv.look
  color = mix(lk.hair_color, (25, 18, 15), 0.45)
  by = lk.brow_y
  inner_y = by + 0.04 - 0.24 * a(1) + 0.11 * a(4) + 0.05 * a(9)          # AU1 up, AU4/AU9 down
  mid_y = by - 0.04 - 0.09 * a(1) - 0.13 * a(2) + 0.07 * a(4) + 0.02 * a(9)
  outer_y = by - 0.01 * a(1) - 0.15 * a(2) + 0.03 * a(4)                # AU2 up
  inner_x = 0.13 - 0.065 * a(4) - 0.02 * a(9)                           # AU4 draws together
  for s in (-1, 1):
    centre = _bezier((s * inner_x, inner_y), (s * 0.37, mid_y), (s * 0.62, outer_y), 11)
    half = _BROW_HALF
    cv.poly(np.concatenate([centre - half, (centre + half)[::-1]]), color)
  # AU4: vertical wrinkles between the brows.
  if a(4) > 0:
    for x in (-0.045, 0.045):
      cv.line([(x, inner_y - 0.05), (x * 1.2, inner_y + 0.09)], _ink(lk, 0.45 * a(4)), 0.018)
  # AU1 (centre) / AU2 (sides): horizontal forehead wrinkles above the raised brows.
  for k, dy in enumerate((0.11, 0.18, 0.25)):
    y = mid_y - dy
    for xs, amp in (((-0.22, 0.22), a(1) + 0.5 * a(2)), ((0.2, 0.5), a(2) + 0.4 * a(1)),
                    ((-0.5, -0.2), a(2) + 0.4 * a(1))):
      if amp > 0.05:
        seg = _bezier((xs[0], y + 0.012 * abs(xs[0])), ((xs[0] + xs[1]) / 2, y - 0.012),
                      (xs[1], y + 0.012 * abs(xs[1])), 5)
        cv.line(seg, _ink(lk, 0.6 * min(1.0, amp) * (0.6 - 0.12 * k)), 0.016)


def _draw_nose(cv: _Canvas, a: _AUs):
  lk = cv.look
  lift = 0.045 * a(9) + 0.02 * a(10)                                     # AU9 / AU10: nostrils up
  for s in (-1, 1):
    cv.line(_bezier((s * 0.075, lk.eye_y + 0.02), (s * 0.085, 0.06), (s * 0.1, 0.16 - lift)),
            _ink(lk, 0.14), 0.018, dz=0.12)
    cv.line(_ellipse(s * 0.125, 0.215 - lift, 0.055, 0.05, 7, -0.5 * math.pi if s > 0 else 0.5 * math.pi,
                     0.6 * math.pi if s > 0 else 1.4 * math.pi), _ink(lk, 0.45), 0.022, dz=0.18)
    cv.poly(_ellipse(s * 0.06, 0.255 - lift, 0.033, 0.016, 10), _ink(lk, 0.7), dz=0.22)
  cv.line(_bezier((-0.05, 0.27 - lift), (0, 0.285 - lift), (0.05, 0.27 - lift), 5), _ink(lk, 0.22), 0.014, dz=0.25)
  # AU9: wrinkles across the nose bridge.
  for k in range(3 if a(9) > 0 else 0):
    y = lk.eye_y + 0.03 + 0.05 * k
    cv.line(_bezier((-0.09, y + 0.02), (0, y - 0.005), (0.09, y + 0.02), 5),
            _ink(lk, 0.4 * a(9)), 0.016, dz=0.15)


def _mouth_geometry(lk: Look, a: _AUs):
  """Lip contours (upper outer, upper inner, lower inner, lower outer), each [n, 2],
  and the two mouth corners."""
  my = 0.55
  corners = []
  for s in (-1, 1):
    dx = (0.085 * a(12, s) - 0.05 * a(14, s) + 0.13 * a(20) - 0.05 * a(23) - 0.03 * a(24)
          - 0.05 * a(26) + 0.01 * a(15))                                # AU12/14/20/23/24/26
    dy = -0.16 * a(12, s) + 0.12 * a(15) + 0.03 * a(20) - 0.02 * a(14, s) # AU12 up, AU15 down
    corners.append((s * (lk.mouth_width + dx), my + dy))
  t = _T17
  side = (t > 0).astype(int)
  cx = np.array([c[0] for c in corners])[side] * np.abs(t)
  cy = my + (np.array([c[1] for c in corners])[side] - my) * t ** 2
  bulk = (1 - t * t)
  thin = max(0.12, 1 - 0.55 * a(23) - 0.7 * a(24) - 0.25 * a(20)
                   - 0.075 * (a(12, -1) + a(12, 1)))  # AU23/24 thin the red
  up_h = 0.06 * lk.lip * thin * bulk ** 0.6 * (1 - 0.3 * np.exp(-(t / 0.15) ** 2))
  lo_h = 0.075 * lk.lip * thin * bulk ** 0.5
  up_in = cy - (0.055 * a(10) + 0.045 * a(25)) * bulk ** 0.8              # AU10 lifts, AU25 parts
  lo_in = cy + (0.06 * a(25) + 0.2 * a(26)) * bulk ** 0.8 - 0.04 * a(17) * bulk  # AU17 pushes up
  up_in = np.minimum(up_in, lo_in)
  lo_out = lo_in + lo_h * (1 + 0.3 * a(17))
  return (np.stack([cx, up_in - up_h], -1), np.stack([cx, up_in], -1),
          np.stack([cx, lo_in], -1), np.stack([cx, lo_out], -1), corners)


def _draw_mouth(cv: _Canvas, a: _AUs):
  lk = cv.look
  up_out, up_in, lo_in, lo_out, corners = _mouth_geometry(lk, a)
  lip = mix(mix(lk.skin, (0, 0, 0), 0.15), (175, 60, 70), 0.35)
  # Nasolabial folds: AU10 / AU12 / AU6 / AU9 deepen them.
  for k, s in enumerate((-1, 1)):
    cx, cy = corners[k]
    depth = min(1.0, 0.12 + 0.5 * a(10) + 0.4 * a(12, s) + 0.3 * a(6) + 0.3 * a(9))
    cv.line(_bezier((s * 0.2, 0.2 - 0.03 * a(9)), (s * 0.3, 0.38), (cx + s * 0.07, cy + 0.06)),
            _ink(lk, 0.36 * depth), 0.024)
    if a(14, s) > 0:  # AU14 dimple beside the corner
      cv.line(_bezier((cx + s * 0.05, cy - 0.04), (cx + s * 0.065, cy), (cx + s * 0.05, cy + 0.04), 5),
              _ink(lk, 0.5 * a(14, s)), 0.02)
  if float(np.max(lo_in[:, 1] - up_in[:, 1])) > 0.008:
    cv.poly(np.concatenate([up_in, lo_in[::-1]]), (55, 22, 28))
    teeth_lo = np.minimum(up_in[:, 1] + 0.05, lo_in[:, 1])
    cv.poly(np.concatenate([up_in, np.stack([up_in[:, 0], teeth_lo], -1)[::-1]]), (236, 232, 222))
  cv.poly(np.concatenate([up_out, up_in[::-1]]), lip)
  cv.poly(np.concatenate([lo_in, lo_out[::-1]]), mix(lip, (255, 255, 255), 0.06))
  cv.line(up_in, mix(lip, (20, 5, 5), 0.6), 0.016)
  if a(24) > 0:  # AU24: pressed lips bulge the skin above and below
    cv.line(up_out[4:-4] - [0, 0.03], _ink(lk, 0.3 * a(24)), 0.014)
  # AU17: chin boss up, the mentolabial furrow rises and the chin puckers.
  chin_y = float(lo_out[8, 1]) + 0.1 - 0.03 * a(17)
  cv.line(_bezier((-0.14, chin_y + 0.01), (0, chin_y - 0.02), (0.14, chin_y + 0.01), 7),
          _ink(lk, 0.6 * (0.25 + 0.55 * a(17))), 0.022)
  if a(17) > 0:
    for x, y in ((-0.07, 0.1), (0.05, 0.12), (0.0, 0.17), (-0.04, 0.2), (0.08, 0.19)):
      cv.poly(_ellipse(x, chin_y + y, 0.017, 0.012, 6), _ink(lk, 0.33 * a(17)))


def _draw_hair_and_occluders(cv: _Canvas, jaw_drop: float):
  lk = cv.look
  if lk.hair != 'none':
    top = _outline(lk, 0) * [1.04, 1.04]
    top = top[top[:, 1] < -0.45]
    hairline = _bezier((lk.face_width * 0.92, -0.48), (0.1, -0.9), (-lk.face_width * 0.92, -0.48), 9)
    cv.poly(np.concatenate([hairline, top[np.argsort(-top[:, 0])][::-1]]), lk.hair_color)
  if lk.glasses:
    frame = (35, 30, 30)
    for s in (-1, 1):
      ring = _ellipse(s * 0.36, lk.eye_y, 0.21, 0.14, 20)
      cv.line(np.concatenate([ring, ring[:1]]), frame, 0.03, dz=0.08)
      cv.line([(s * 0.57, lk.eye_y - 0.04), (s * 0.97 * lk.face_width, lk.eye_y - 0.06)], frame, 0.03, dz=0.08)
    cv.line([(-0.15, lk.eye_y - 0.02), (0.15, lk.eye_y - 0.02)], frame, 0.03, dz=0.2)
  if lk.occluder == 'mask':
    low = _outline(lk, jaw_drop)
    low = low[low[:, 1] > 0.15] * [1.02, 1.02]
    low = low[np.argsort(low[:, 0])]
    top = _bezier((-0.9 * lk.face_width, 0.18), (0, 0.08), (0.9 * lk.face_width, 0.18), 9)
    cv.poly(np.concatenate([top, low[::-1]]), lk.occluder_color, dz=0.15)
    for dy in (0.3, 0.45, 0.6):
      cv.line([(-0.55, dy), (0.55, dy)], mix(lk.occluder_color, (0, 0, 0), 0.25), 0.018, dz=0.15)
  elif lk.occluder == 'hand':  # a hand over the mouth, fingers slanting up across it
    c, edge = lk.occluder_color, mix(lk.occluder_color, (0, 0, 0), 0.35)
    side = 1 if lk.yaw >= 0 else -1
    base = np.array([side * 0.5, 0.95 + jaw_drop])
    cv.poly(_ellipse(base[0], base[1], 0.36, 0.3, 16), edge, flat=True)
    cv.poly(_ellipse(base[0], base[1], 0.34, 0.28, 16), c, flat=True)
    for k in range(4):
      root = base + [-side * 0.1, -0.18 + 0.1 * k]
      tip = root + [-side * (0.75 - 0.07 * abs(k - 1.5)), -0.3 + 0.04 * k]
      for color, w in ((edge, 0.12), (c, 0.095)):
        cv.line([root, tip], color, w, flat=True)
        cv.poly(_ellipse(tip[0], tip[1], w / 2, w / 2, 10), color, flat=True)
    thumb = base + [-side * 0.05, -0.3]
    for color, w in ((edge, 0.13), (c, 0.105)):
      cv.line([base, thumb + [-side * 0.15, -0.2]], color, w, flat=True)


@functools.lru_cache(maxsize=1)
def _noise_bank():
  return np.random.default_rng(0).standard_normal(1 << 20, np.float32)


def render(aus, look: Look = Look(), *, unilateral=None, size: int = 112,
           supersample: int = 2, blink: float = 0.0) -> np.ndarray:
  """Renders a face. `aus`: {au_number: amplitude in [0, 1]}; returns uint8 [size, size, 3].

  `unilateral`: {au_number: side} for AUs active on one side only (+1 = image right,
  the subject's left; -1 = image left). `blink`: eyelid closure in [0, 1] (FACS AU45,
  1 = closed), a keyword of its own because AU45 is not one of the annotated AUs
  (labels.AUS): a blink is a moment of a clip (synthetic_clips.py), not an expression.
  """
  a = _AUs(aus, unilateral)
  if not 0 <= blink <= 1:
    raise ValueError(f'render: blink={blink}; expected an eyelid closure in [0, 1]')
  if look.hair not in ('none', 'short', 'long') or look.occluder not in OCCLUDER_HIDES:
    raise ValueError(f'render: Look(hair={look.hair!r}, occluder={look.occluder!r}); expected '
                     f"hair in none|short|long and occluder in {'|'.join(OCCLUDER_HIDES)}")
  cv = _Canvas(look, size * supersample)
  jaw_drop = 0.2 * a(26) + 0.03 * a(25)  # AU26 (and a little AU25) lower the chin
  _draw_head(cv, jaw_drop)
  _draw_eyes(cv, a, blink)
  _draw_nose(cv, a)
  _draw_mouth(cv, a)
  _draw_brows(cv, a)
  _draw_hair_and_occluders(cv, jaw_drop)
  img = cv.flush()
  img = img.reduce(supersample) if supersample > 1 else img
  x = np.asarray(img, np.float32)
  if look.light > 0:  # directional shading: brighter towards the light
    g = np.linspace(-1, 1, size, dtype=np.float32)
    ang = math.radians(look.light_angle)
    ramp = math.cos(ang) * g[None, :] + math.sin(ang) * g[:, None]
    x *= (1 + look.light * 0.5 * ramp)[..., None]
  if look.noise > 0:  # a window of a fixed Gaussian bank: 30x cheaper than fresh draws
    bank = _noise_bank()
    start = look.noise_seed % (bank.size - x.size)
    x += look.noise * bank[start:start + x.size].reshape(x.shape)
  return np.clip(x + 0.5, 0, 255).astype(np.uint8)

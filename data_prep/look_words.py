"""Words for what a rendered face looks like beyond its expression: the part of a
synthetic caption that tells one face from another (issue 32: retrieval at instance level).

`phrases(look, rng, aligned)` -> {attribute: phrase} for what the stored image shows:
head pose (yaw), lighting, skin tone, hair, background colour, glasses, occluder and
grain; eye colour only with `with_eyes=True` (an iris is ~3 px across at 112 px, and the
corpus's captions are long enough: 46 tokens on average, 71 at most). Each attribute has a few phrasings, drawn from the record's own rng
(so the corpus stays a pure function of its seed). Left and right are the IMAGE's (the
viewer's): a face with yaw > 0 turns to the image right (render.Look) and is "turned to
the right" here -- the subject's own left.

Left out on purpose, because the stored image does not show them:
* roll, shift and scale: eye-line alignment undoes them (synthetic_faces.make_record);
* gaze: at most 0.03 face half-widths, about one pixel at 112 px;
* pitch: the renderer has none;
* face-shape tweaks (width, jaw, eye size): a few pixels, and long phrases for little.
Bins are chosen so a phrase is right for every face it names: a face in the "slight
turn" bin is turned by 5-13 degrees, never the other way (tests/test_captions.py).
"""

from __future__ import annotations

import colorsys

import numpy as np

from data_prep import render

# Bins: |yaw| below FRONTAL_YAW reads as frontal, from TURNED_YAW on as clearly turned.
FRONTAL_YAW, TURNED_YAW = 5.0, 13.0
# Shading gradient strength (render.Look.light, 0..0.45): below FLAT_LIGHT the face reads
# as evenly lit; from STRONG_LIGHT on one side is clearly brighter.
FLAT_LIGHT, STRONG_LIGHT = 0.12, 0.28
GRAINY_NOISE = 4.0   # pixel noise sigma from which the grain is plain to see

SKIN_NAMES = ('pale', 'fair', 'light', 'tan', 'brown', 'dark brown', 'deep brown')
HAIR_NAMES = ('black', 'dark brown', 'brown', 'blond', 'grey', 'auburn')
IRIS_NAMES = ('brown', 'dark brown', 'blue', 'green')
assert len(SKIN_NAMES) == len(render.SKIN_TONES) and len(HAIR_NAMES) == len(render.HAIR_COLORS)
assert len(IRIS_NAMES) == len(render.IRIS_COLORS)

_POSE_FRONTAL = ('facing the camera', 'a frontal view', 'facing front')
_POSE_SLIGHT = ('turned slightly {side}', 'facing slightly {side}', 'a slight turn {side}')
_POSE_TURNED = ('turned {side}', 'facing {side}', 'head turned {side}')
_LIGHT_FLAT = ('even lighting', 'evenly lit', 'flat light')
_LIGHT = {'soft': ('soft light from {dir}', 'lit softly from {dir}'),
          'strong': ('strong light from {dir}', 'lit strongly from {dir}',
                     'harsh light from {dir}')}
_LIGHT_DIRS = ('the right', 'below', 'the left', 'above')   # sectors around 0, 90, 180, 270 deg
_SKIN = ('{c} skin', '{c}-skinned')
_HAIR = {'short': ('short {c} hair', '{c} hair, short'),
         'long': ('long {c} hair', '{c} hair, long'),
         'none': ('bald', 'no hair')}
_IRIS = ('{c} eyes', '{c} irises')
_BACKGROUND = ('on {c}', '{c} background', 'a {c} backdrop')
_GLASSES = ('glasses', 'wearing glasses', 'with glasses')
_OCCLUDER = {'mask': ('a {c} face mask', 'wearing a {c} mask'),
             'hand': ('a hand over the mouth', 'hand covering the mouth')}
_GRAIN = ('grainy', 'a grainy photo', 'noisy')


def _pick(rng, options):
  return options[rng.integers(len(options))]


def nearest(colour, palette) -> int:
  """Index of the palette colour nearest to `colour` (the renderer jitters its picks)."""
  d = np.asarray(palette, np.float64) - np.asarray(colour, np.float64)
  return int(np.argmin((d * d).sum(-1)))


def colour_name(rgb) -> str:
  """A plain colour word for an RGB triple (0..255): hue bins, plus dark / light."""
  h, s, v = colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))
  if s < 0.18 or v < 0.2:
    return 'dark grey' if v < 0.35 else ('light grey' if v > 0.75 else 'grey')
  deg = h * 360
  hues = ((15, 'red'), (40, 'orange'), (70, 'yellow'), (160, 'green'), (195, 'teal'),
          (255, 'blue'), (290, 'purple'), (345, 'pink'), (361, 'red'))
  hue = next(name for top, name in hues if deg < top)
  if v < 0.45:
    return 'dark ' + hue
  return ('pale ' + hue) if (v > 0.8 and s < 0.4) else hue


def side(yaw: float) -> str:
  return 'right' if yaw > 0 else 'left'


def light_direction(look: render.Look, aligned: bool) -> str:
  """Where the light comes from in the stored image. render() brightens towards
  (cos a, sin a) in image coordinates (y down): a = 0 is the right, 90 below; eye-line
  alignment then rotates the frame by -roll, and the light with it."""
  angle = look.light_angle - (look.roll if aligned else 0.0)
  return _LIGHT_DIRS[int(((angle + 45) % 360) // 90)]


def phrases(look: render.Look, rng: np.random.Generator, aligned: bool = True,
            with_eyes: bool = False) -> dict:
  """{attribute: phrase} describing `look` as the stored image shows it (see module doc)."""
  out = {}
  yaw = abs(look.yaw)
  if yaw < FRONTAL_YAW:
    out['pose'] = _pick(rng, _POSE_FRONTAL)
  else:
    table = _POSE_SLIGHT if yaw < TURNED_YAW else _POSE_TURNED
    out['pose'] = _pick(rng, table).format(side=side(look.yaw))
  if look.light < FLAT_LIGHT:
    out['light'] = _pick(rng, _LIGHT_FLAT)
  else:
    table = _LIGHT['strong' if look.light >= STRONG_LIGHT else 'soft']
    out['light'] = _pick(rng, table).format(dir=light_direction(look, aligned))
  out['skin'] = _pick(rng, _SKIN).format(c=SKIN_NAMES[nearest(look.skin, render.SKIN_TONES)])
  out['hair'] = _pick(rng, _HAIR[look.hair]).format(
      c=HAIR_NAMES[nearest(look.hair_color, render.HAIR_COLORS)])
  if with_eyes:
    out['eyes'] = _pick(rng, _IRIS).format(c=IRIS_NAMES[nearest(look.iris, render.IRIS_COLORS)])
  mean_bg = np.mean(np.asarray(look.background, np.float64), axis=0)
  out['background'] = _pick(rng, _BACKGROUND).format(c=colour_name(mean_bg))
  if look.glasses:
    out['glasses'] = _pick(rng, _GLASSES)
  if look.occluder in _OCCLUDER:
    out['occluder'] = _pick(rng, _OCCLUDER[look.occluder]).format(
        c=colour_name(look.occluder_color))
  if look.noise >= GRAINY_NOISE:
    out['grain'] = _pick(rng, _GRAIN)
  return out

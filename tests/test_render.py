"""The face renderer: each AU changes the pixels FACS says it changes, in the right
direction; nuisances (yaw, occlusion, noise) do what they claim; rendering is pure."""

import dataclasses

import numpy as np
import pytest

from data_prep import render
from unifer_jax.data import labels

SIZE = 112
LOOK = render.Look(hair='none')  # canonical: frontal, flat light, no noise/hair/occluder


def draw(aus=None, look=LOOK, **kw):
  return render.render(aus or {}, look, size=SIZE, **kw).astype(np.int16)


def changed(a, b, thresh=12):
  return np.abs(a - b).max(-1) > thresh


def rows_of(y_face):
  """Pixel row of face-coordinate height y in the canonical look."""
  return float(render.project([(0.0, y_face)], LOOK, SIZE)[0, 1])


def box(x0, x1, y0, y1):
  """Boolean pixel mask of a face-coordinate box (canonical look)."""
  (px0, py0), (px1, py1) = render.project([(x0, y0), (x1, y1)], LOOK, SIZE)
  m = np.zeros((SIZE, SIZE), bool)
  m[int(py0):int(np.ceil(py1)) + 1, int(px0):int(np.ceil(px1)) + 1] = True
  return m


def centroid_row(mask):
  return float(np.nonzero(mask)[0].mean())


# The band of face heights (face coordinates, y down; eyes ~-0.12, nose 0.25, mouth
# 0.55, chin 1.1) inside which each AU may change pixels -- FACS.md's "visible change".
AU_REGION = {
    1: (-1.1, -0.15), 2: (-1.1, -0.15), 4: (-1.1, 0.0), 5: (-0.35, 0.05),
    6: (-0.35, 0.75), 7: (-0.3, 0.05), 9: (-0.6, 0.75), 10: (0.1, 0.75),
    12: (-0.1, 1.0), 14: (0.35, 0.75), 15: (0.35, 1.0), 17: (0.4, 1.3),
    20: (0.15, 0.9), 23: (0.35, 0.9), 24: (0.35, 0.9), 25: (0.35, 1.3), 26: (0.35, 1.6),
}


def test_every_au_has_a_region_and_changes_only_there():
  assert set(AU_REGION) == set(labels.AUS)
  base = draw()
  for au, (y0, y1) in AU_REGION.items():
    diff = changed(base, draw({au: 1.0}))
    assert diff.sum() > 15, f'AU{au} changes almost nothing ({diff.sum()} px)'
    rows = np.nonzero(diff)[0]
    lo, hi = rows_of(y0), rows_of(y1)
    assert rows.min() >= lo - 1 and rows.max() <= hi + 1, (
        f'AU{au} changed rows {rows.min()}..{rows.max()}, expected within {lo:.0f}..{hi:.0f}')


def test_amplitude_is_graded():
  base = draw()
  n = [changed(base, draw({12: a})).sum() for a in (0.3, 0.6, 1.0)]
  assert 0 < n[0] < n[1] < n[2], n


def _lip_mask(img):
  # Lips are redder than skin: R - G well above the skin's.
  skin = np.array(LOOK.skin, np.int16)
  return (img[..., 0] - img[..., 1]) > (skin[0] - skin[1]) + 12


def test_au12_pulls_corners_up_and_au15_down():
  corners = box(-0.5, -0.2, 0.3, 0.8) | box(0.2, 0.5, 0.3, 0.8)
  y0 = centroid_row(_lip_mask(draw()) & corners)
  up = centroid_row(_lip_mask(draw({12: 1.0})) & corners)
  down = centroid_row(_lip_mask(draw({15: 1.0})) & corners)
  assert up < y0 - 1.5, (up, y0)
  assert down > y0 + 1.5, (down, y0)


def test_au12_widens_and_au23_narrows_the_mouth():
  def width(img):
    cols = np.nonzero((_lip_mask(img) & box(-0.8, 0.8, 0.3, 0.9)).any(0))[0]
    return cols.max() - cols.min()
  w0 = width(draw())
  assert width(draw({12: 1.0})) > w0 + 3
  assert width(draw({20: 1.0})) > w0 + 3
  assert width(draw({23: 1.0})) < w0 - 1


def _dark(img, level=90):
  return img.mean(-1) < level


def test_au4_lowers_brows_and_draws_them_together():
  brows = box(-0.7, 0.7, -0.75, -0.2)
  base, au4 = draw(), draw({4: 1.0})
  assert centroid_row(_dark(au4) & brows) > centroid_row(_dark(base) & brows) + 1.5
  # Between the brows: the inner ends and the vertical wrinkles appear there.
  glabella = box(-0.12, 0.12, -0.55, -0.1)
  assert changed(base, au4)[glabella].sum() > 10
  assert changed(base, draw({2: 1.0}))[glabella].sum() < changed(base, au4)[glabella].sum() / 3


def test_au1_raises_inner_and_au2_outer_brow_ends():
  inner = box(-0.3, 0.3, -0.8, -0.2)
  outer = box(-0.75, -0.45, -0.8, -0.2) | box(0.45, 0.75, -0.8, -0.2)
  base, au1, au2 = draw(), draw({1: 1.0}), draw({2: 1.0})
  rise = lambda img, region: centroid_row(_dark(base) & region) - centroid_row(_dark(img) & region)
  assert rise(au1, inner) > 2 and rise(au1, inner) > rise(au1, outer)
  assert rise(au2, outer) > 2 and rise(au2, outer) > rise(au2, inner)


def _white(img):
  return img.min(-1) > 215


def test_au5_widens_and_au7_narrows_the_eyes():
  eyes = box(-0.65, 0.65, -0.35, 0.1)
  n0 = (_white(draw()) & eyes).sum()
  assert (_white(draw({5: 1.0})) & eyes).sum() > 1.3 * n0
  assert (_white(draw({7: 1.0})) & eyes).sum() < 0.8 * n0
  assert (_white(draw({6: 1.0})) & eyes).sum() < 0.9 * n0


def test_au25_and_au26_open_the_mouth_and_26_drops_the_jaw():
  mouth = box(-0.5, 0.5, 0.3, 1.0)
  n0 = (_dark(draw(), 70) & mouth).sum()
  n25 = (_dark(draw({25: 1.0}), 70) & mouth).sum()
  n26 = (_dark(draw({25: 1.0, 26: 1.0}), 70) & mouth).sum()
  assert n0 < n25 < n26 and n26 > 3 * max(n0, 10)
  # The chin (lowest skin row on the face's axis) moves down with the jaw.
  def chin(img):
    col = img[:, SIZE // 2 - 2:SIZE // 2 + 3].mean(1)
    skin = np.abs(col - np.array(LOOK.skin)).max(-1) < 6
    return np.nonzero(skin)[0].max()
  assert chin(draw({26: 1.0})) > chin(draw()) + 4


def test_au9_wrinkles_the_nose_and_au17_changes_the_chin():
  base = draw()
  nose = box(-0.15, 0.15, -0.15, 0.35)
  assert changed(base, draw({9: 1.0}))[nose].sum() > 20
  chin = box(-0.3, 0.3, 0.7, 1.1)
  assert changed(base, draw({17: 1.0}))[chin].sum() > 20


def test_unilateral_contempt_is_asymmetric():
  both = draw({12: 1.0, 14: 1.0})
  one = draw({12: 1.0, 14: 1.0}, unilateral={12: 1, 14: 1})
  base = draw()
  left, right = box(-0.6, -0.05, 0.2, 0.9), box(0.05, 0.6, 0.2, 0.9)
  d = changed(base, one)
  assert d[right].sum() > 20 and d[left].sum() < d[right].sum() / 4
  assert changed(base, both)[left].sum() > 20


def test_yaw_shifts_features_more_than_the_outline():
  look = dataclasses.replace(LOOK, yaw=20.0)
  mouth = lambda img: np.nonzero(_lip_mask(img))[1].mean()
  assert mouth(draw(look=look)) > mouth(draw()) + 3
  # Turned to the image right, the right eye is the far one: foreshortened, less sclera.
  img = draw({5: 1.0}, look=look)
  cols = np.nonzero(_white(img) & box(-0.9, 0.9, -0.35, 0.1))[1]
  nose_x = render.project([(0.0, 0.25)], look, SIZE, dz=0.25)[0, 0]
  assert (cols < nose_x).sum() > 1.3 * (cols > nose_x).sum()


def test_mask_hides_the_mouth_but_not_the_eyes():
  look = dataclasses.replace(LOOK, occluder='mask', occluder_color=(90, 140, 200))
  base = draw(look=look)
  mouth = box(-0.4, 0.4, 0.35, 0.8)
  assert not changed(base, draw({12: 1.0, 25: 1.0}, look=look))[mouth].any()
  assert changed(base, draw({5: 1.0}, look=look)).any()
  assert set(render.OCCLUDER_HIDES['mask']) >= {10, 12, 15, 20, 25, 26}


def test_hand_and_glasses_draw_something():
  for look in (dataclasses.replace(LOOK, occluder='hand'), dataclasses.replace(LOOK, glasses=True)):
    assert changed(draw(), draw(look=look)).sum() > 200


def test_pure_function_and_noise_seed():
  rng = np.random.default_rng(0)
  look = dataclasses.replace(render.sample_look(rng), noise=5.0)
  a = render.render({12: 0.7, 6: 0.5}, look)
  assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, render.render({12: 0.7, 6: 0.5}, look))
  b = render.render({12: 0.7, 6: 0.5}, dataclasses.replace(look, noise_seed=look.noise_seed + 1))
  assert 0 < np.abs(a.astype(int) - b).mean() < 10


@pytest.mark.parametrize('size', [64, 112, 160])
def test_sizes(size):
  assert render.render({26: 1.0}, LOOK, size=size).shape == (size, size, 3)


def test_sampled_looks_stay_in_range():
  rng = np.random.default_rng(1)
  looks = [render.sample_look(rng) for _ in range(300)]
  assert all(abs(lk.yaw) <= 25 and abs(lk.roll) <= 18 for lk in looks)
  kinds = {lk.occluder for lk in looks}
  assert kinds == {'none', 'mask', 'hand'}
  assert any(lk.glasses for lk in looks) and any(lk.noise > 0 for lk in looks)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match='AU3'):
    render.render({3: 0.5})
  with pytest.raises(ValueError, match=r'AU12=1\.5'):
    render.render({12: 1.5})
  with pytest.raises(ValueError, match='occluder'):
    render.render({}, dataclasses.replace(LOOK, occluder='scarf'))
  with pytest.raises(ValueError, match='side'):
    render.render({12: 0.5}, unilateral={12: 'left'})

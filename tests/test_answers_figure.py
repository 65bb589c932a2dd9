"""The demo report's "faces with answers" figure (evaluators/plots.py): every face with
its questions and wrapped answers beside it, and no text of one face over another
face's text or picture, nor off the figure, for answers as long as the demo's."""

import itertools

import numpy as np

from unifer_jax.data import instructions
from unifer_jax.evaluators import plots

RATIONALE = ('<think>AU6 cheek raiser and AU12 lip corner puller are active: the cheeks are '
             'raised and the lip corners pulled up, with the eyes narrowed; AU25 lips part. '
             'Nothing of AU4 or AU15.</think><answer>AU6 cheek raiser, AU12 lip corner puller, '
             'AU25 lips part</answer>')


def extents(fig):
  """{face index: [window extents of its texts]}, {face index: its picture's extent}."""
  renderer = fig.canvas.get_renderer()
  texts, pictures = {}, {}
  for ax in fig.axes:
    if ax.get_gid():
      pictures[int(ax.get_gid()[4:])] = ax.get_window_extent(renderer)
    for t in ax.texts:
      if t.get_gid() and t.get_text():
        texts.setdefault(int(t.get_gid()[4:]), []).append(t.get_window_extent(renderer))
  return texts, pictures


def test_long_answers_never_overlap_a_neighbour():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (7, 64, 64, 3)).astype(np.float32)
  qa = [[(instructions.prompt_for('basic').split('?')[0] + '?', 'happiness ' * (k + 1)),
         ('How intense is the facial expression, from 0 (none) to 1 (maximum)?', '0.7'),
         ('Which facial action units are active in this face?', RATIONALE * (1 + k % 2))]
        for k in range(7)]
  fig = plots.answers_figure(images, qa, titles=[f'{k + 1}. truth: happiness' for k in range(7)])
  fig.canvas.draw()
  texts, pictures = extents(fig)
  assert sorted(texts) == list(range(7)) and sorted(pictures) == list(range(7))
  # Every answer line is there: wrapped, nothing dropped but the cut past max_chars.
  assert sum(len(v) for v in texts.values()) > 7 * 10
  box = fig.bbox
  for k, boxes in texts.items():
    for b in boxes:   # on the figure, not cut off
      assert box.x0 - 1 <= b.x0 and b.x1 <= box.x1 + 1, (k, b)
      assert box.y0 - 1 <= b.y0 and b.y1 <= box.y1 + 1, (k, b)
  for a, b in itertools.permutations(range(7), 2):
    for ta in texts[a]:
      assert not ta.overlaps(pictures[b]), (a, b)
      for tb in texts[b]:
        assert not ta.overlaps(tb), (a, b, ta, tb)

"""ITM in the align stage: hard negatives are true negatives (equal captions and equal
expression labels are never drawn), drawn by the ITC similarities; the held-out pairs
are 1 positive : 2 true negatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unifer_jax.evaluators import alignment
from unifer_jax.train import align_losses as al


def test_same_label_pairs_are_never_negatives_and_similar_ones_are_preferred():
  # Six pairs; every caption differs (so same_text alone would block nothing off the
  # diagonal). Labels: 0, 3 same expression; 1, 4 same compound; 2 and 5 unlabelled.
  expression = jnp.array([2, -1, -1, 2, -1, 4])
  compound = jnp.array([-1, 7, -1, -1, 7, -1])
  ids = jnp.arange(6 * 3).reshape(6, 3)
  mask = jnp.ones((6, 3), jnp.int32)
  excluded = np.asarray(al.not_negatives(ids, mask, expression, compound))
  want = np.eye(6, dtype=bool)
  want[0, 3] = want[3, 0] = want[1, 4] = want[4, 1] = True
  np.testing.assert_array_equal(excluded, want)
  # Image 0 is most similar to text 3 (same label: blocked), then text 5 (sim 6), and
  # text 0's most similar other image is 3 (blocked) then 2 (sim 5).
  sim = np.zeros((6, 6), np.float32)
  np.fill_diagonal(sim, 9.0)
  sim[0, 3], sim[0, 5], sim[3, 0], sim[2, 0] = 12.0, 6.0, 12.0, 5.0
  picks_i, picks_t = zip(*(al.sample_hard_negatives(jnp.asarray(sim), jnp.asarray(excluded),
                                                    jax.random.key(s)) for s in range(300)))
  picks_i, picks_t = np.stack(picks_i), np.stack(picks_t)
  for row in range(6):
    assert not excluded[row, picks_t[:, row]].any(), row       # text for image `row`
    assert not excluded[picks_i[:, row], row].any(), row       # image for text `row`
  # softmax over the allowed: text 5 has e^6 against e^0 for the 3 others.
  share = np.exp(6) / (np.exp(6) + 3)
  assert abs((picks_t[:, 0] == 5).mean() - share) < 0.03
  assert abs((picks_i[:, 0] == 2).mean() - np.exp(5) / (np.exp(5) + 3)) < 0.03
  # Without labels only equal texts are blocked: the similar same-label pair is drawn.
  plain = al.not_negatives(ids, mask)
  drawn = al.sample_hard_negatives(jnp.asarray(sim), plain, jax.random.key(0))[1]
  assert int(drawn[0]) == 3
  # hardness scales the similarities: at 0.5 text 5 weighs e^3; at 0 the draw is uniform
  # over the true negatives (the allowed texts 1, 2, 4, 5 a quarter each); a uniform
  # fraction f mixes: f * 1/4 + (1 - f) * the hard share.
  for hardness, uniform, want5 in ((0.5, 0.0, np.exp(3) / (np.exp(3) + 3)), (0.0, 0.0, 0.25),
                                   (1.0, 1.0, 0.25), (1.0, 0.5, 0.5 * share + 0.125)):
    t = np.stack([al.sample_hard_negatives(jnp.asarray(sim), jnp.asarray(excluded),
                                           jax.random.key(s), hardness, uniform)[1]
                  for s in range(400)])
    assert not excluded[0, t[:, 0]].any()
    assert abs((t[:, 0] == 5).mean() - want5) < 0.06, (hardness, uniform)


def test_held_out_pairs_are_one_positive_to_two_true_negatives():
  sim = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
  excluded = np.eye(8, dtype=bool)
  excluded[0, 1] = excluded[1, 0] = True
  img, txt, label = alignment.matching_pairs(sim, excluded, temp=0.1, seed=3)
  assert len(label) == 24 and label.sum() == 8
  np.testing.assert_array_equal(img[:8], txt[:8])
  assert not excluded[img[label == 0], txt[label == 0]].any()
  # A head that always says "no match" scores the prior.
  logits = np.tile([[1.0, 0.0]], (24, 1))
  m = alignment.matching_metrics(logits, label)
  assert (m['itm_acc'], m['itm_acc_pos'], m['itm_acc_neg']) == (pytest.approx(2 / 3), 0.0, 1.0)

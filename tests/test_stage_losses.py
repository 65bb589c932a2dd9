"""Stage losses on tiny hand-computed cases: ITC, ITM hard-negative sampling, ITG masks,
answer-only LM loss; the align weights from the config (a zero ITM is not computed)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unifer_jax.models import presets
from unifer_jax.models.unifer import UniFER
from unifer_jax.train import align_losses as al
from unifer_jax.train import losses

import model_util


def _log_softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def test_similarity_takes_the_best_query():
  image = jnp.array([[[1., 0.], [0., 1.]], [[0.6, 0.8], [-1., 0.]]])  # [B=2, Q=2, E=2]
  text = jnp.array([[1., 0.], [0., 1.]])
  sim = al.similarity(image, text, temp=0.5)
  np.testing.assert_allclose(sim, [[2.0, 2.0], [1.2, 1.6]], atol=1e-6)


def test_itc_matches_hand_computation_without_smoothing():
  sim = jnp.array([[2.0, 0.5], [1.0, 3.0]])
  pos = jnp.eye(2, dtype=bool)
  got = al.itc_loss(sim, pos, label_smoothing=0.0)
  i2t = -(_log_softmax(sim, 1)[0, 0] + _log_softmax(sim, 1)[1, 1]) / 2
  t2i = -(_log_softmax(sim, 0)[0, 0] + _log_softmax(sim, 0)[1, 1]) / 2
  np.testing.assert_allclose(got, (i2t + t2i) / 2, rtol=1e-6)


def test_itc_spreads_targets_over_equal_texts():
  sim = jnp.array([[1.0, 1.0, -2.0], [1.0, 1.0, -2.0], [0.0, 0.0, 4.0]])
  ids = jnp.array([[5, 7, 0], [5, 7, 9], [5, 8, 0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 0], [1, 1, 0]])  # row 1's 9 is padding
  pos = al.same_text(ids, mask)
  np.testing.assert_array_equal(pos, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  got = al.itc_loss(sim, pos, label_smoothing=0.0)
  ls_r, ls_c = _log_softmax(sim, 1), _log_softmax(sim, 0)
  t = np.array([[.5, .5, 0], [.5, .5, 0], [0, 0, 1]])
  expect = (-(t * ls_r).sum(1).mean() - (t * ls_c).sum(0).mean()) / 2
  np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_hard_negatives_never_pick_a_positive_and_prefer_similar():
  b = 4
  sim = jnp.array([[5., 9., 0., 0.], [0., 5., 0., 0.], [0., 0., 5., 0.], [8., 0., 0., 5.]])
  pos = jnp.eye(b, dtype=bool).at[1, 2].set(True).at[2, 1].set(True)
  picks_t, picks_i = [], []
  for seed in range(200):
    ni, nt = al.sample_hard_negatives(sim, pos, jax.random.key(seed))
    picks_t.append(np.asarray(nt))
    picks_i.append(np.asarray(ni))
  picks_t, picks_i = np.stack(picks_t), np.stack(picks_i)
  for row in range(b):
    assert not np.any(np.asarray(pos)[row, picks_t[:, row]]), row
    assert not np.any(np.asarray(pos).T[row, picks_i[:, row]]), row
  # Image 0's text negatives: text 1 has sim 9 vs 0 -> chosen almost always.
  assert (picks_t[:, 0] == 1).mean() > 0.95
  # Text 0's image negatives: image 3 has sim 8 (column 0) -> chosen almost always.
  assert (picks_i[:, 0] == 3).mean() > 0.95


def test_itg_loss_skips_the_dec_token_and_padding():
  v = 4
  logits = jnp.log(jnp.array([[[.1, .2, .3, .4], [.25, .25, .25, .25], [.7, .1, .1, .1],
                               [.1, .1, .1, .7]]]))  # [1, T=4, V]
  itg_ids = jnp.array([[3, 2, 1, 0]])
  mask = jnp.array([[1, 1, 1, 0]])  # the last token is padding
  got = al.itg_loss(logits, itg_ids, mask, label_smoothing=0.0)
  # Targets: position 0 predicts id 2 (p=.3), position 1 predicts id 1 (p=.25).
  np.testing.assert_allclose(got, -(np.log(.3) + np.log(.25)) / 2, rtol=1e-5)
  del v


def test_answer_only_lm_loss_counts_masked_tokens_only():
  logits = jnp.log(jnp.array([[[.5, .5], [.9, .1], [.2, .8]]]))
  targets = jnp.array([[0, 1, 1]])
  mask = jnp.array([[0., 1., 1.]])  # the prompt token is not a target
  loss, aux = losses.token_nll(logits, targets, mask)
  np.testing.assert_allclose(loss, -(np.log(.1) + np.log(.8)) / 2, rtol=1e-5)
  assert float(aux['tokens']) == 2 and float(aux['token_acc']) == 0.5


class _FixedLabels:
  """Stands in for UniFER.label_logits: returns the given logits whatever the images."""

  def __init__(self, basic, compound):
    self.out = (jnp.asarray(basic), jnp.asarray(compound))

  def label_logits(self, images):
    del images
    return self.out


def test_vision_loss_is_ce_on_each_row_s_own_label_kind():
  basic = [[2.0, 0.0] + [0.0] * 6, [0.0] * 8, [0.0, 1.0] + [0.0] * 6]
  compound = [[0.0] * 11, [3.0] + [0.0] * 10, [0.0] * 11]
  batch = {'image': jnp.zeros((3, 1, 1, 3)), 'expression': jnp.array([0, -1, 0]),
           'compound': jnp.array([-1, 0, -1])}
  loss, aux = losses.vision_loss(_FixedLabels(basic, compound), batch, None)
  ce0 = -_log_softmax(basic[0])[0]
  ce2 = -_log_softmax(basic[2])[0]
  ce1 = -_log_softmax(compound[1])[0]
  # Every labelled row counts once: mean over the 3 rows of their own label's CE.
  np.testing.assert_allclose(loss, (ce0 + ce1 + ce2) / 3, rtol=1e-6)
  np.testing.assert_allclose(aux['ce_basic'], (ce0 + ce2) / 2, rtol=1e-6)
  np.testing.assert_allclose(aux['ce_compound'], ce1, rtol=1e-6)
  assert float(aux['acc_basic']) == 0.5 and float(aux['acc_compound']) == 1.0


def test_target_nll_equals_the_full_projection_for_every_target_count():
  """The generate/instruct loss projects only target positions (gathered into a static
  bucket picked by a switch on the mask) with a fused backward: loss, metrics and
  gradients (hidden states and a trainable head alike) must equal the plain path."""
  from flax import nnx
  from unifer_jax.models import llm as llm_lib
  from unifer_jax.train import target_loss
  assert target_loss.target_buckets(16) == [2, 4, 8, 16]
  rng = np.random.default_rng(0)
  t, v, d = 16, 64, 32
  for tie in (True, False):
    cfg = llm_lib.default_config(vocab_size=v, hidden=d, depth=1, heads=4, kv_heads=2,
                                 tie_embeddings=tie)
    graphdef, params = nnx.split(llm_lib.LLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    hidden = jnp.asarray(rng.standard_normal((3, t, d)), jnp.float32)
    for most in (1, 3, 4, 9, 16):  # every bucket, including a full row
      mask = np.zeros((3, t), np.float32)
      for row, n in enumerate((most, rng.integers(0, most + 1), 0)):
        start = rng.integers(0, t - n + 1)
        mask[row, start:start + n] = 1
      targets = rng.integers(0, v, (3, t)).astype(np.int32)
      # Make some targets the argmax, so token_acc is not trivially 0.
      logits = np.asarray(nnx.merge(graphdef, params).logits_from_hidden(hidden))
      targets[:, ::2] = logits.argmax(-1)[:, ::2]

      def plain(p, h):
        return losses.token_nll(nnx.merge(graphdef, p).logits_from_hidden(h), targets, mask)

      def gathered(p, h):
        return target_loss.target_nll(nnx.merge(graphdef, p), h, jnp.asarray(targets),
                                      jnp.asarray(mask))

      grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
      (want, want_aux), want_g = grad(plain)(params, hidden)
      (got, got_aux), got_g = grad(gathered)(params, hidden)
      np.testing.assert_allclose(got, want, rtol=1e-5)
      np.testing.assert_allclose(jax.jit(gathered)(params, hidden)[0], want, rtol=1e-5)
      for key in ('tokens', 'token_acc'):
        np.testing.assert_allclose(got_aux[key], want_aux[key], rtol=1e-6)
      assert float(want_aux['token_acc']) > 0 or not mask.sum()
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                   got_g, want_g)


def test_align_weights_from_the_config_and_a_zero_itm_is_not_computed():
  cfg = presets.get('tiny')
  model = model_util.random_module(lambda: UniFER(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  b, t = 4, 8
  ids = rng.integers(3, cfg.qformer.vocab_size, (b, t)).astype(np.int32)
  batch = {'image': jnp.asarray(rng.standard_normal((b, 32, 32, 3)), jnp.float32),
           'text_ids': jnp.asarray(ids), 'text_mask': jnp.ones((b, t), jnp.int32),
           'itg_ids': jnp.asarray(ids)}
  config = ml_collections.ConfigDict({'align': {'weights': {'itc': 1.0, 'itm': 1.0,
                                                            'itg': 0.5}}})
  key = jax.random.key(0)
  loss, aux = losses.get('align', config)(model, batch, key)
  np.testing.assert_allclose(loss, aux['itc'] + aux['itm'] + 0.5 * aux['itg'], rtol=1e-6)
  config.align.weights.itm = 0.0
  off_loss, off = losses.get('align', config)(model, batch, key)
  assert 'itm' not in off and 'itm_acc' not in off
  np.testing.assert_allclose(off_loss, aux['itc'] + 0.5 * aux['itg'], rtol=1e-6)
  # Without a config the registry's function keeps BLIP-2's three equal weights.
  full, _ = losses.get('align')(model, batch, key)
  np.testing.assert_allclose(full, aux['itc'] + aux['itm'] + aux['itg'], rtol=1e-6)

"""The label-likelihood scorer: a hand-computed case (log-softmax sums in numpy from the
model's own full-sequence logits), equality with scoring each candidate on its own, and
candidate tokens that are exactly what the instruct pipeline writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unifer_jax.data import instructions, labels
from unifer_jax.data import tokenizer as tok_lib
from unifer_jax.evaluators import likelihood
from unifer_jax.models import presets
from unifer_jax.models.unifer import UniFER

import model_util

PROMPT = np.array([5, 9, 2, 7, 11], np.int32)
# Three candidates of lengths 3, 1 and 2 (right-padded with 0).
CANDS = np.array([[3, 4, 6], [8, 0, 0], [12, 13, 0]], np.int32)
MASK = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.int32)


@pytest.fixture(scope='module')
def model_and_images():
  cfg = presets.get('tiny')
  graphdef, state = nnx.split(model_util.random_module(lambda: UniFER(cfg, rngs=nnx.Rngs(3))))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  return graphdef, state, images


@pytest.fixture(scope='module')
def scored(model_and_images):
  graphdef, state, images = model_and_images

  @jax.jit
  def run(state, images, prompt, cands, mask):
    m = nnx.merge(graphdef, state)
    return likelihood.candidate_log_likelihoods(m, m.prefix(images), prompt, cands, mask)

  return lambda p, c, m: np.asarray(run(state, images, p, c, m))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_hand_computed_from_full_sequence_logits(model_and_images, scored):
  graphdef, state, images = model_and_images
  q = presets.get('tiny').qformer.num_queries
  got = scored(PROMPT, CANDS, MASK)
  # Every (image, candidate) as one plain sequence [prompt; candidate], right-padded (the
  # padding comes after the positions read, so causal attention never sees it).
  ids = np.stack([np.concatenate([PROMPT, CANDS[c]]) for c in range(3)] * 2)
  imgs = np.repeat(np.asarray(images), 3, axis=0)
  logits = jax.jit(lambda s, x, i: nnx.merge(graphdef, s)(x, i))(state, imgs, ids)
  logp = _log_softmax(np.asarray(logits, np.float64)).reshape(2, 3, *logits.shape[1:])
  want = np.zeros((2, 3))
  for c in range(3):
    for j, token in enumerate(CANDS[c][MASK[c] > 0]):  # q + P - 1 + j predicts token j
      want[:, c] += logp[:, c, q + len(PROMPT) - 1 + j, token]
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.all(got < 0)


def test_equals_scoring_each_candidate_alone(scored):
  together = scored(PROMPT, CANDS, MASK)
  for c in range(3):  # one candidate per call (same padded width: one compiled shape)
    alone = scored(PROMPT, CANDS[c:c + 1], MASK[c:c + 1])
    np.testing.assert_allclose(together[:, c], alone[:, 0], atol=2e-5)
  dist = np.exp(together - together.max(1, keepdims=True))
  dist /= dist.sum(1, keepdims=True)
  np.testing.assert_allclose(dist.sum(1), 1.0, atol=1e-6)


def test_candidates_are_what_training_writes(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'bpe'
  texts = instructions.template_texts() + [f'<answer>{n}</answer>' for n in
                                           labels.BASIC + labels.COMPOUND]
  tok_lib.train(texts * 2, path, vocab_size=600)
  tok = tok_lib.load(path)
  for task, names in (('basic', labels.BASIC), ('compound', labels.COMPOUND)):
    lp = likelihood.label_prompt(tok, task)
    assert lp.names == names and lp.candidate_ids.shape[0] == len(names)
    # The instruct pipeline's tokens: prompt_ids(prompt) then encode(answer) + eos.
    prompt = tok.prompt_ids(instructions.prompt_for(task, think=False))
    for i, name in enumerate(names):
      want = prompt + tok.encode(f'<answer>{name}</answer>') + [tok.eos_id]
      got = list(lp.prompt_ids) + list(lp.candidate_ids[i][lp.candidate_mask[i] > 0])
      assert got == want, (task, name)
    # The shared '<answer>' start sits in the prompt, so the candidates all differ at once.
    assert len(set(lp.candidate_ids[:, 0].tolist())) > 1
  with pytest.raises(ValueError, match='label task'):
    likelihood.label_prompt(tok, 'intensity')

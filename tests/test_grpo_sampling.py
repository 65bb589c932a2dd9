"""GRPO's sampling: G completions per prompt from one prefill (generation.py's
num_samples), stop at EOS, the completion mask, and the loss's completion logits lined up
with what the KV-cache decoder produced (left-padded prompt after the image prefix)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unifer_jax.models import llm, presets, unifer as unifer_lib
from unifer_jax.train import grpo, grpo_loss

import model_util
import test_llm
from test_llm import call, left_padded, make, tokens

G, NEW = 4, 6


def _sample_groups(m, ids, mask, rng):
  return llm.generate(m, ids, attention_mask=mask, max_new_tokens=NEW, temperature=1.0,
                      rng=rng, num_samples=G)


def _sample_repeated(m, ids, mask, rng):
  return llm.generate(m, jnp.repeat(ids, G, 0), attention_mask=jnp.repeat(mask, G, 0),
                      max_new_tokens=NEW, temperature=1.0, rng=rng)


def test_groups_sample_from_one_prefill_as_from_repeated_prompts():
  model = make(True, kv_heads=1)
  ids, mask = left_padded(tokens(3, test_llm.PROMPT, seed=7))
  rng = jax.random.key(3)
  groups = call(_sample_groups, model, ids, mask, rng)
  assert groups.shape == (3 * G, NEW)
  # Rows b*G .. b*G+G-1 answer prompt b: the same draws as the prompt repeated G times.
  np.testing.assert_array_equal(groups, call(_sample_repeated, model, ids, mask, rng))
  # Sampled, not copied: a group's completions differ (97-token vocabulary, 6 tokens).
  for b in range(3):
    assert len({tuple(r) for r in groups[b * G:(b + 1) * G]}) > 1
  # Another rollout key, other completions.
  assert not np.array_equal(groups, call(_sample_groups, model, ids, mask, jax.random.key(4)))


def test_completion_mask_ends_at_the_first_eos():
  eos = 2
  t = jnp.asarray([[5, 7, 2, 0, 0], [5, 7, 8, 9, 4], [2, 2, 2, 2, 2]])
  np.testing.assert_array_equal(grpo.completion_mask(t, eos),
                                [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


@functools.partial(jax.jit, static_argnums=0)
def _greedy_then_score(graphdef, params, images, prompt, mask):
  model = nnx.merge(graphdef, params)
  out = unifer_lib.generate(model, images, prompt, mask, max_new_tokens=NEW, eos_id=-1,
                            num_samples=2)
  batch = {'image': images, 'prompt_ids': prompt, 'prompt_mask': mask, 'completion': out,
           'completion_mask': jnp.ones(out.shape, jnp.float32)}
  return out, grpo_loss.completion_logits(model, batch, group_size=2, temperature=1.0)


def test_completion_logits_predict_what_the_decoder_sampled():
  """The loss's logits at each completion token (one full forward over [image prefix;
  left-padded prompt; completion], prompt and prefix shared by the group) are the
  decoder's: greedy decoding picked their argmax at every step."""
  cfg = presets.get('tiny')
  model = model_util.random_module(lambda: unifer_lib.UniFER(cfg, rngs=nnx.Rngs(0)), seed=2,
                                   scale=0.3)
  graphdef, params = nnx.split(model)
  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  prompt, mask = left_padded(tokens(3, test_llm.PROMPT, seed=1) % cfg.llm.vocab_size)
  out, logits = jax.device_get(_greedy_then_score(graphdef, params, images, prompt,
                                                  mask.astype(np.int32)))
  assert out.shape == (6, NEW) and logits.shape == (6, NEW, cfg.llm.vocab_size)
  np.testing.assert_array_equal(logits.argmax(-1), out)
  np.testing.assert_array_equal(out[0::2], out[1::2])   # greedy: a group's rows agree

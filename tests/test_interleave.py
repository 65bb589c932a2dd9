"""Several images in one sequence (models/interleave.py): each used image's prefix in its
placeholder slots. Checked against an embedding sequence built by hand in numpy (logits
and greedy generation), against HF BLIP-2 with its image tokens in the middle of the text,
absent images contributing nothing, per-image Q-Former instructions, and the train step
compiling once whatever the number of used images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

import model_util
import vlm_util
from unifer_jax import config_lib, convert
from unifer_jax.data import random_batches
from unifer_jax.models import interleave, llm, presets
from unifer_jax.models import unifer as unifer_lib
from unifer_jax.train import losses

P = 128          # the placeholder id: one past the tiny LLM's vocabulary (128 ids)
Q = 4            # tiny preset's queries
NEW = 8


def _model(seed=0, instruction_aware=False):
  cfg = presets.get('tiny')   # no image_token_index: the placeholder is llm.vocab_size
  cfg.qformer.instruction_aware = instruction_aware
  return model_util.random_module(lambda: unifer_lib.UniFER(cfg, rngs=nnx.Rngs(0)), seed=seed,
                                  scale=0.3)


def _images(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=(*shape, 32, 32, 3)).astype(np.float32)


def _row(*parts, length):
  """A left-padded row from text lists and ``'img'`` markers (Q placeholder ids each)."""
  ids = [t for p in parts for t in ([P] * Q if p == 'img' else p)]
  pad = length - len(ids)
  return [0] * pad + ids, [0] * pad + [1] * len(ids)


def _batch(rows, length):
  ids, mask = zip(*(_row(*r, length=length) for r in rows))
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def _jitted(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits(state, *args, **kw):
    return nnx.merge(graphdef, state)(*args, **kw)

  @jax.jit
  def prefix(state, image, q_ids=None, q_mask=None):
    return nnx.merge(graphdef, state).prefix(image, q_ids, q_mask)

  @jax.jit
  def embeds(state, *args, **kw):
    return nnx.merge(graphdef, state).prefixed_inputs(*args, **kw)

  return state, logits, prefix, embeds


def _numpy_embeds(model, prefix_of, ids, images, image_mask):
  """The reference: walk each row, a vocabulary row per text id and the next query of the
  next used image per placeholder, built one token at a time in numpy."""
  table = np.asarray(model.llm.token_embed.embedding[...])
  out = np.zeros((*ids.shape, table.shape[1]), np.float32)
  for b in range(ids.shape[0]):
    used = [images[b, m] for m in range(images.shape[1]) if image_mask[b, m]]
    queries = [q for img in used for q in prefix_of(img)]   # Q vectors per used image
    k = 0
    for t, tok in enumerate(ids[b]):
      if tok == P:
        out[b, t], k = queries[k], k + 1
      else:
        out[b, t] = table[tok]
    assert k == len(queries)
  return out


def test_two_images_generate_as_the_numpy_built_sequence():
  model = _model()
  state, logits_fn, prefix_fn, embeds_fn = _jitted(model)
  ids, mask = _batch([([5, 6], 'img', [7, 8, 9], 'img', [10, 11]),
                      ([12], 'img', [13, 14, 15])], length=20)
  images = _images(2, 2)
  image_mask = np.array([[1, 1], [0, 1]], np.int32)   # row 1 reads only its second slot
  got, got_mask = embeds_fn(state, images, ids, mask, image_mask=image_mask)
  want = _numpy_embeds(model, lambda img: np.asarray(prefix_fn(state, img[None]))[0], ids,
                       images, image_mask)
  np.testing.assert_array_equal(got_mask, mask)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)

  graphdef = nnx.graphdef(model)
  gen = jax.jit(lambda s, *a, **k: unifer_lib.generate(
      nnx.merge(graphdef, s), *a, max_new_tokens=NEW, eos_id=-1, **k))
  ours = np.asarray(gen(state, images, ids, mask, image_mask=image_mask))
  ref = jax.jit(lambda s, e, m: llm.generate(nnx.merge(graphdef, s).llm, inputs_embeds=e,
                                             attention_mask=m, max_new_tokens=NEW, eos_id=-1))
  np.testing.assert_array_equal(ours, np.asarray(ref(state, jnp.asarray(want), mask)))
  assert ours.shape == (2, NEW)
  # The images are read where their slots are: swapping row 0's two images moves logits.
  a = np.asarray(logits_fn(state, images, ids, mask, image_mask=image_mask))
  b = np.asarray(logits_fn(state, images[:, ::-1], ids, mask, image_mask=image_mask))
  assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-3


def test_one_image_in_front_equals_the_prefix_path():
  model = _model(seed=1)
  state, logits_fn, _, _ = _jitted(model)
  text = np.random.default_rng(1).integers(1, 128, (2, 9)).astype(np.int32)
  mask = np.ones((2, 9), np.int32)
  mask[1, 6:] = 0   # right padding
  images = _images(2, seed=1)
  one = np.asarray(logits_fn(state, images, text, mask))                   # [B, Q + T, V]
  ids = np.concatenate([np.full((2, Q), P, np.int32), text], 1)
  full_mask = np.concatenate([np.ones((2, Q), np.int32), mask], 1)
  several = np.asarray(logits_fn(state, images[:, None], ids, full_mask,
                                 image_mask=np.ones((2, 1), np.int32)))  # [B, Q + T, V]
  valid = full_mask.astype(bool)
  np.testing.assert_array_equal(several[valid], one[valid])
  # The generate/instruct loss too: the same targets, predicted from the same positions.
  graphdef = nnx.graphdef(model)
  loss = jax.jit(lambda s, b: losses.generate_loss(nnx.merge(graphdef, s), b, None))
  answer = (np.arange(9) >= 4).astype(np.int32) * mask
  want, want_aux = loss(state, dict(image=images, tokens=text, attention_mask=mask,
                                    loss_mask=answer))
  got, got_aux = loss(state, dict(image=images[:, None], image_mask=np.ones((2, 1), np.int32),
                                  tokens=ids, attention_mask=full_mask,
                                  loss_mask=np.concatenate([np.ones((2, Q), np.int32),
                                                            answer], 1)))
  # (the placeholders' loss_mask of 1 above is ignored: a slot is never a target)
  assert float(got_aux['tokens']) == float(want_aux['tokens']) == answer.sum()
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_absent_images_contribute_nothing():
  model = _model(seed=2)
  state, logits_fn, _, _ = _jitted(model)
  ids, mask = _batch([([3, 4, 5], 'img', [6, 7, 8])], length=14)
  face = _images(1, 1, seed=3)
  three = _images(1, 3, seed=4)          # noise in the two absent slots
  three[:, 1] = face[:, 0]
  one = np.asarray(logits_fn(state, face, ids, mask, image_mask=np.ones((1, 1), np.int32)))
  got = np.asarray(logits_fn(state, three, ids, mask,
                             image_mask=np.array([[0, 1, 0]], np.int32)))
  np.testing.assert_allclose(got, one, atol=1e-5)
  # ... and the noise would have mattered in the slot the row reads.
  other = np.asarray(logits_fn(state, three, ids, mask,
                               image_mask=np.array([[1, 0, 0]], np.int32)))
  assert np.abs(other - one).max() > 1e-3


def test_instruction_per_image_or_shared():
  model = _model(seed=5, instruction_aware=True)
  state, _, prefix_fn, embeds_fn = _jitted(model)
  ids, mask = _batch([('img', [9], 'img', [10, 11])], length=12)
  images = _images(1, 2, seed=6)
  image_mask = np.ones((1, 2), np.int32)
  q_ids = np.array([[[5, 6, 7, 0], [8, 9, 0, 0]]], np.int32)        # [B, M, L]
  q_mask = (q_ids > 0).astype(np.int32)
  got, _ = embeds_fn(state, images, ids, mask, q_ids, q_mask, image_mask=image_mask)
  slots = ids[0] == P
  for m in range(2):   # image m's Q slots hold its prefix under its own instruction
    want = np.asarray(prefix_fn(state, images[:, m], q_ids[:, m], q_mask[:, m]))[0]
    np.testing.assert_allclose(np.asarray(got)[0, slots][m * Q:(m + 1) * Q], want, atol=1e-6)
  # One instruction [B, L] is shared by every image of the row.
  shared, _ = embeds_fn(state, images, ids, mask, q_ids[:, 0], q_mask[:, 0],
                        image_mask=image_mask)
  repeated, _ = embeds_fn(state, images, ids, mask, q_ids[:, [0, 0]], q_mask[:, [0, 0]],
                          image_mask=image_mask)
  np.testing.assert_array_equal(np.asarray(shared), np.asarray(repeated))
  with pytest.raises(ValueError, match=r'qformer_input_ids: expected \[B, L\]'):
    embeds_fn(state, images, ids, mask, q_ids[:, :, None], image_mask=image_mask)


def test_step_with_five_image_slots_compiles_once():
  """Forward + backward of the generate loss; 1 to 5 used images, one compiled program;
  no gradient reaches an absent image."""
  model = _model(seed=7)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, batch):
    def loss_fn(state, images):
      loss, _ = losses.generate_loss(nnx.merge(graphdef, state), dict(batch, image=images),
                                     None)
      return loss
    return jax.value_and_grad(loss_fn, argnums=(0, 1))(state, batch['image'])

  images = _images(2, 5, seed=8)
  seen = []
  for used in range(1, 6):
    image_mask = np.zeros((2, 5), np.int32)
    image_mask[0, :used] = 1
    image_mask[1, 5 - used:] = 1          # used slots at the back in row 1
    row = [x for i in range(used) for x in ([20 + i], 'img')] + [[30, 31]]
    ids, mask = _batch([row, row], length=32)
    loss_mask = ((ids >= 30) & (ids < P)).astype(np.int32)   # the answer after the images
    batch = dict(tokens=ids, attention_mask=mask, loss_mask=loss_mask, image=images,
                 image_mask=image_mask)
    loss, (grads, image_grads) = step(state, batch)
    image_grads = np.abs(np.asarray(image_grads)).sum(axis=(2, 3, 4))   # [B, M]
    assert np.all(image_grads[image_mask == 0] == 0), (used, image_grads)
    assert np.all(image_grads[image_mask == 1] > 0), (used, image_grads)
    assert np.isfinite(float(loss))
    seen.append(float(loss))
  assert step._cache_size() == 1
  assert len(set(seen)) == 5   # each number of images is a different sequence


def test_bad_placeholders_are_refused_by_row():
  ids, _ = _batch([('img', [3]), ([3], 'img', 'img')], length=10)
  interleave.check_slots(ids, np.array([[1, 0], [1, 1]]), P, Q)
  with pytest.raises(ValueError, match=r'row 1 has 8 image placeholder ids \(128\) but 1 used'):
    interleave.check_slots(ids, np.array([[1, 0], [1, 0]]), P, Q)
  short = ids.copy()
  short[0, 8], short[0, 9] = 3, P   # row 0's run split into 3 + 1
  with pytest.raises(ValueError, match='row 0 has a run of 3 placeholder ids'):
    interleave.check_slots(short, np.array([[1, 0], [1, 1]]), P, Q)
  model = _model()
  with pytest.raises(ValueError, match='row 1 has 8 image placeholder ids'):
    model.prefixed_inputs(_images(2, 2), ids, image_mask=np.array([[1, 0], [1, 0]]))
  assert interleave.placeholder_id(vlm_cfg := presets.get('tiny')) == P
  vlm_cfg.image_token_index = 7   # a BLIP-2 from HF keeps its own
  assert interleave.placeholder_id(vlm_cfg) == 7


# -- against Hugging Face BLIP-2, image tokens in the middle of the text ---------------------

def test_logits_equal_hf_blip2_with_the_image_mid_text(tmp_path):
  vocab, token = 96, 95
  config = T.Blip2Config(
      vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8),
      qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, cross_attention_frequency=2,
                          encoder_hidden_size=48, vocab_size=60, max_position_embeddings=32),
      text_config=dict(model_type='llama', vocab_size=vocab, hidden_size=40,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64),
      num_query_tokens=Q, image_token_index=token)
  torch.manual_seed(0)
  hf = vlm_util.randomise(T.Blip2ForConditionalGeneration(config), 0)
  hf.save_pretrained(tmp_path)
  model = convert.load_hf(tmp_path)
  assert model.cfg.image_token_index == token
  r = np.random.default_rng(9)
  ids = r.integers(3, token, (2, 14))
  ids[0, 2:2 + Q] = token        # [text; image; text]
  ids[1, 7:7 + Q] = token
  mask = np.ones((2, 14), np.int64)
  mask[1, 12:] = 0
  pixels = r.normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2).copy()),
              input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(nnx.jit(lambda m, *a, **k: m(*a, **k))(
      model, pixels[:, None], ids.astype(np.int32), mask.astype(np.int32),
      image_mask=np.ones((2, 1), np.int32)))
  valid = mask.astype(bool)
  assert np.abs(ours - want)[valid].max() <= 1e-4


# -- random interleaved batches (what the smoke config and compile-check feed) ---------------

def test_random_batches_place_whole_images_and_mask_them_from_the_loss():
  config = config_lib.load('configs/smoke.py:tiny',
                           ['--config.input.images_per_row=3', '--config.input.seq_len=20'])
  model_cfg = presets.get('tiny')
  batch = random_batches.global_batch(config, model_cfg, step=5)
  assert batch['image'].shape == (8, 3, 32, 32, 3) and batch['image_mask'].shape == (8, 3)
  interleave.check_slots(batch['tokens'], batch['image_mask'], P, Q)
  assert np.all(batch['loss_mask'][batch['tokens'] == P] == 0)
  assert len(set(batch['image_mask'].sum(1))) > 1      # rows use different numbers of slots
  # A process's rows are the same rows of the global batch.
  part = random_batches.global_batch(config, model_cfg, step=5, rows=slice(4, 8))
  for k in batch:
    np.testing.assert_array_equal(part[k], batch[k][4:])
  config.input.seq_len = 12
  with pytest.raises(ValueError, match='seq_len=12 cannot hold images_per_row=3'):
    random_batches.batch_spec(config, model_cfg)

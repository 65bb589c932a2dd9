"""BLIP-2 stage 1: image-text contrastive (ITC), matching (ITM) and grounded
generation (ITG) losses on the Q-Former.

The batch is the *global* batch (jit over the mesh): the [B, B] similarity matrix
spans every device's samples and XLA inserts the all-gathers LAVIS writes by hand.

Batch keys (see unifer_jax/data/pipeline.py): ``image`` [B,H,W,3], ``text_ids`` [B,T]
(CLS-like first token), ``text_mask`` [B,T], ``itg_ids`` [B,T] (DEC-like first token),
optionally ``expression`` / ``compound`` [B] (-1 absent).
Pairs whose texts are identical are all positives of each other in ITC (the synthetic
corpus repeats captions; counting them as negatives would teach the model to separate
equal texts). ITM's hard negatives also skip pairs with the same expression label: on the
corpus the most similar other caption is nearly always the same expression in other
words, a pair the ITM head cannot call "no match" (ALBEF/BLIP mask duplicates the same
way). With those drawn as negatives ITM sat at its 1:2 prior's entropy (0.637) for the
whole demo stage (configs/align.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

TEMP_RANGE = (0.001, 0.5)


def same_text(text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
  """[B, B] bool: texts i and j are token-for-token equal (padding ignored)."""
  ids = jnp.where(text_mask > 0, text_ids, -1)
  return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)


def same_label(expression: jax.Array, compound: jax.Array) -> jax.Array:
  """[B, B] bool: i and j carry the same expression label (basic and compound equal,
  at least one of them present; unlabelled records match nothing)."""
  labelled = (expression >= 0) | (compound >= 0)
  equal = (expression[:, None] == expression[None, :]) & (compound[:, None] == compound[None, :])
  return equal & labelled[:, None] & labelled[None, :]


def not_negatives(text_ids: jax.Array, text_mask: jax.Array, expression=None,
                  compound=None) -> jax.Array:
  """[B, B] bool: pairs ITM must not draw as negatives -- equal texts, and with labels
  given, equal expressions (their captions describe the same face state)."""
  out = same_text(text_ids, text_mask)
  if expression is not None and compound is not None:
    out = out | same_label(expression, compound)
  return out


def similarity(image_feats: jax.Array, text_feat: jax.Array, temp: jax.Array) -> jax.Array:
  """sim[i, t] = max over queries of image_feats[i, q] . text_feat[t] / temp  ([B, B])."""
  per_query = jnp.einsum('iqe,te->itq', image_feats, text_feat)
  return per_query.max(axis=-1) / temp


def itc_loss(sim_i2t: jax.Array, positives: jax.Array, label_smoothing: float = 0.1):
  """Symmetric InfoNCE with soft targets spread over all positives, label smoothing."""
  b = sim_i2t.shape[0]
  targets = positives.astype(jnp.float32)
  targets = targets / targets.sum(axis=1, keepdims=True)
  targets = targets * (1.0 - label_smoothing) + label_smoothing / b
  i2t = optax.softmax_cross_entropy(sim_i2t, targets).mean()
  t2i = optax.softmax_cross_entropy(sim_i2t.T, targets.T).mean()
  return (i2t + t2i) / 2


def sample_hard_negatives(sim_i2t: jax.Array, positives: jax.Array, rng: jax.Array,
                          hardness: float = 1.0, uniform_fraction: float = 0.0):
  """Per text an image, per image a text, drawn with probability softmax(hardness * sim)
  among the pairs outside ``positives`` (BLIP-2's hard-negative mining at hardness 1;
  uniform over the true negatives at 0; pass not_negatives). A ``uniform_fraction`` of
  the rows, chosen at random, draws uniformly instead: easy negatives that let ITM start
  learning while the hard ones are still beyond it (configs/align.py).
  ``sim_i2t`` is the global batch's (jit over the mesh gathers it), so negatives come
  from every device's samples. Returns (neg_image_for_text, neg_text_for_image), each
  [B] int32 indices."""
  sim = hardness * jax.lax.stop_gradient(sim_i2t.astype(jnp.float32))
  k1, k2, k3 = jax.random.split(rng, 3)
  flat = jax.random.uniform(k3, (2, sim.shape[0], 1)) < uniform_fraction

  def draw(key, scores, blocked, flat_rows):
    # A row with no negative at all (every text in the batch equal) samples uniformly.
    blocked = jnp.where(jnp.all(blocked, axis=1, keepdims=True), 0.0,
                        jnp.where(blocked, -jnp.inf, 0.0))
    return jax.random.categorical(key, jnp.where(flat_rows, 0.0, scores) + blocked, axis=1)

  neg_text = draw(k1, sim, positives, flat[0])
  neg_image = draw(k2, sim.T, positives.T, flat[1])
  return neg_image.astype(jnp.int32), neg_text.astype(jnp.int32)


def itm_logits_and_labels(model, image_tokens, text_ids, text_mask, neg_image, neg_text):
  """3B pairs: (i, t_i) positive, (neg_image[t], t) and (i, neg_text[i]) negatives."""
  images = jnp.concatenate([image_tokens, image_tokens[neg_image], image_tokens], axis=0)
  ids = jnp.concatenate([text_ids, text_ids, text_ids[neg_text]], axis=0)
  mask = jnp.concatenate([text_mask, text_mask, text_mask[neg_text]], axis=0)
  logits = model.itm_logits(model.qformer.match(images, ids, mask))
  b = text_ids.shape[0]
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  return logits, labels


def itg_loss(logits: jax.Array, itg_ids: jax.Array, text_mask: jax.Array,
             label_smoothing: float = 0.1) -> jax.Array:
  """Next-token loss on the caption under the causal multimodal mask; the DEC-like
  first token is context only."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = itg_ids[:, 1:]
  mask = text_mask[:, 1:].astype(jnp.float32)
  vocab = logits.shape[-1]
  soft = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
  nll = optax.softmax_cross_entropy(logits, soft)
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def align_loss(model, batch: dict, rng: jax.Array, weights=(1.0, 1.0, 1.0), hardness=1.0,
               uniform_fraction=0.0):
  image_tokens = model.image_tokens(batch['image'])
  text_ids, text_mask = batch['text_ids'], batch['text_mask']
  # ITC: uni-modal passes (queries see the image, text sees only text).
  image_feats = model.image_embeddings(model.qformer.encode_queries(image_tokens))
  text_feat = model.text_embedding(model.qformer.encode_text(text_ids, text_mask), text_mask)
  temp = jnp.clip(model.temp[...], *TEMP_RANGE)
  sim = similarity(image_feats, text_feat, temp)
  positives = same_text(text_ids, text_mask)
  itc = itc_loss(sim, positives)
  # ITG: captioning through the Q-Former with the multimodal causal mask.
  itg = itg_loss(model.qformer.caption_logits(image_tokens, batch['itg_ids'], text_mask),
                 batch['itg_ids'], text_mask)
  b = sim.shape[0]
  i2t_acc = (sim.argmax(axis=1) == jnp.arange(b)) | positives[jnp.arange(b), sim.argmax(axis=1)]
  aux = {'itc': itc, 'itg': itg, 'temp': temp, 'itc_acc': i2t_acc.mean()}
  if not weights[1]:   # not computed: 3B Q-Former passes, ~40 % of the demo's step
    return weights[0] * itc + weights[2] * itg, aux
  # ITM with hard negatives mined from the similarity matrix, true negatives only.
  excluded = not_negatives(text_ids, text_mask, batch.get('expression'), batch.get('compound'))
  neg_image, neg_text = sample_hard_negatives(sim, excluded, rng, hardness, uniform_fraction)
  itm_logits, itm_labels = itm_logits_and_labels(model, image_tokens, text_ids, text_mask,
                                                 neg_image, neg_text)
  itm = optax.softmax_cross_entropy_with_integer_labels(itm_logits, itm_labels).mean()
  aux.update(itm=itm, itm_acc=(itm_logits.argmax(-1) == itm_labels).mean())
  return weights[0] * itc + weights[1] * itm + weights[2] * itg, aux

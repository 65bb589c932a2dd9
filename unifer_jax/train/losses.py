"""Stage losses, one registry: ``LOSSES[config.stage](model, batch, rng) -> (loss, aux)``.
(``distill``'s ``model`` is a ``distill_stage.Distillation``: the student and the frozen teacher.)

Batches are dicts of arrays. Token batches use ``tokens`` [B, T] and ``loss_mask``
[B, T] (1 where the token is a prediction target); the token at position i is predicted
from everything before it. Logits are computed only at the positions that predict a
text token (the image-prefix positions are never projected onto the vocabulary; in
``generate``/``instruct`` only the target positions are, ``target_loss``).

Packed rows (``config.input.pack``, data/packing.py) add ``segment_ids`` and
``positions`` [B, T]: attention stays inside each example and no position predicts the
first token of the next example, so every example's NLL is what it is alone in a row;
the loss stays the mean over the batch's target tokens.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from unifer_jax import sharding
from unifer_jax.models import interleave
from unifer_jax.models.llm import LOGIT_AXES
from unifer_jax.train import align_losses, distill_losses, target_loss


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
  """Mean next-token NLL over masked positions (f32), plus token count and accuracy."""
  # Pinned like the logits: a slice (hidden[:, q-1:-1]) must not lose the batch split.
  logits = sharding.constrain(logits.astype(jnp.float32), LOGIT_AXES)
  targets = sharding.constrain(targets, LOGIT_AXES[:2])
  mask = sharding.constrain(mask, LOGIT_AXES[:2])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  mask = mask.astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  acc = ((logits.argmax(-1) == targets) * mask).sum() / count
  return (nll * mask).sum() / count, {'tokens': mask.sum(), 'token_acc': acc}


def generate_loss(model, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
  """BLIP-2 stage 2 (and instruction tuning): LM loss on text after the image prefix --
  or after a clip's prefix when the batch holds ``frames`` [B, T, H, W, C] (video)."""
  del rng
  tokens, mask = batch['tokens'], batch['loss_mask']
  attn = batch.get('attention_mask', jnp.ones_like(tokens))
  # An instruction-aware Q-Former (InstructBLIP) reads the prompt beside its queries.
  # Several images per row (image [B, M, H, W, C] + image_mask): they sit in their
  # placeholder slots inside the tokens (models/interleave.py), no prefix in front.
  if 'frames' in batch:   # a clip's queries are the prefix (the video stage)
    embeds, full_mask = model.clip_inputs(batch['frames'], tokens, attn,
                                          batch.get('qformer_ids'), batch.get('qformer_mask'))
  else:
    embeds, full_mask = model.prefixed_inputs(batch['image'], tokens, attn,
                                              batch.get('qformer_ids'),
                                              batch.get('qformer_mask'), batch.get('image_mask'))
  q = embeds.shape[1] - tokens.shape[1]
  hidden = model.llm.hidden_states(inputs_embeds=embeds, attention_mask=full_mask,
                                   **_packing(batch))
  if q == 0:  # position i-1 predicts token i; a placeholder slot is never a target (and
    # its id may lie past the vocabulary: a valid id stands in for it, masked out)
    slots = tokens == interleave.placeholder_id(model.cfg)
    mask = _same_segment(batch, mask * (~slots).astype(mask.dtype))
    targets = jnp.where(slots, 0, tokens)
    return target_loss.target_nll(model.llm, hidden[:, :-1], targets[:, 1:], mask[:, 1:])
  # Position q-1+i predicts token i; of these T positions only the targets are projected
  # onto the vocabulary.
  return target_loss.target_nll(model.llm, hidden[:, q - 1:-1], tokens, mask)


def lm_loss(model, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
  """Stage 0: text-only next-token loss of the LLM."""
  del rng
  tokens, mask = batch['tokens'], batch['loss_mask']
  attn = batch.get('attention_mask', jnp.ones_like(tokens))
  hidden = model.llm.hidden_states(tokens, attention_mask=attn, **_packing(batch))
  logits = model.llm.logits_from_hidden(hidden[:, :-1])
  return token_nll(logits, tokens[:, 1:], _same_segment(batch, mask)[:, 1:])


def _packing(batch: dict) -> dict:
  """The LLM's packed-row inputs of a batch (none for unpacked rows)."""
  return {k: batch[k] for k in ('segment_ids', 'positions') if k in batch}


def _same_segment(batch: dict, mask: jax.Array) -> jax.Array:
  """``mask`` without the first token of each packed segment: the position before it
  belongs to the previous example (its own row-start token is masked already)."""
  seg = batch.get('segment_ids')
  if seg is None:
    return mask
  first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
  return mask * (~first).astype(mask.dtype)


def vision_loss(model, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
  """Supervised pretraining of the image path (ViT -> Q-Former queries -> label head):
  cross-entropy on the basic label of basic faces and the compound label of compound
  faces (a record without one has -1 there)."""
  del rng
  logits = dict(zip(('basic', 'compound'), model.label_logits(batch['image'])))
  loss, aux = jnp.zeros((), jnp.float32), {}
  for task, key in (('basic', 'expression'), ('compound', 'compound')):
    labels = batch[key]
    has = (labels >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[task], jnp.maximum(labels, 0))
    n = jnp.maximum(has.sum(), 1.0)
    aux[f'ce_{task}'] = (ce * has).sum() / n
    aux[f'acc_{task}'] = ((logits[task].argmax(-1) == labels) * has).sum() / n
    # Weighted by each kind's share of the batch: the mean CE over all labelled rows.
    loss = loss + (ce * has).sum() / jnp.maximum(labels.shape[0], 1)
  return loss, aux


LOSSES: dict[str, Callable] = {
    'lm': lm_loss,
    'vision': vision_loss,
    'align': align_losses.align_loss,
    'generate': generate_loss,
    # Instruction tuning is the generate loss with loss_mask on the answer tokens only.
    'instruct': generate_loss,
    # Clips: instruct rows whose prefix is the clip's (batch['frames']; models/video.py).
    'video': generate_loss,
    'distill': distill_losses.distill_loss,
}


def get(stage: str, config=None) -> Callable:
  """The stage's loss; with ``config``, bound to its settings (``config.align.weights``)."""
  if stage not in LOSSES:
    raise KeyError(f'config.stage={stage!r}; stages with a loss: {sorted(LOSSES)}')
  fn = LOSSES[stage]
  if stage == 'align' and config is not None and 'align' in config:
    w = config.align.weights
    fn = functools.partial(fn, weights=(float(w.itc), float(w.itm), float(w.itg)),
                           hardness=float(config.align.get('itm_hardness', 1.0)),
                           uniform_fraction=float(config.align.get('itm_uniform_fraction', 0.0)))
  return fn

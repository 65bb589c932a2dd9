"""Several images in one sequence: each image's prefix written into the text where its
placeholder slots are (few-shot prompts, video frames, packed image+text rows).

Inputs (``UniFER.prefixed_inputs`` / ``__call__`` / ``unifer.generate`` with 5-D images)::

  images        [B, M, H, W, C]  M = a fixed maximum of images per row (one compiled step)
  image_mask    [B, M]           1 = slot holds an image; absent slots may hold anything finite
  input_ids     [B, T]           each used image occupies Q consecutive ids equal to
                                 ``model.image_token_index`` (Q = qformer.num_queries)
  -> inputs_embeds [B, T, D], attention_mask [B, T]  (logits [B, T, V]: no prefix in front)

The k-th run of Q placeholder ids in a row receives the k-th *used* image of that row
(slots in order, absent ones skipped), query by query: placeholder ``r`` of the row (its
rank among the row's placeholders) reads query ``r % Q`` of used image ``r // Q``.

Design: a reserved placeholder id, already expanded to Q slots in the token sequence.
* The alternatives, as the anchors do it. LLaVA's original code keeps ONE sentinel id per
  image (-200) and splices features in a Python loop, so the length depends on the data.
  IDEFICS (1) reads images through gated cross-attention layers, another architecture
  than BLIP-2's prefix. IDEFICS2/3, LLaVA-interleave (HF), InternVL and HF's own BLIP-2 in
  transformers 5 write N placeholder tokens per image in the *processor* (``<image>`` x
  image_seq_len, ``<IMG_CONTEXT>`` x num_image_token, ``image_token_index`` x
  num_query_tokens) and the model overwrites those positions with the image features in
  order (``masked_scatter`` / ``embeds[selected] = vit_embeds``); InternVL drops padded
  images with a per-image flag, as ``image_mask`` does here.
* We take the expanded-placeholder way: the row keeps its length T whatever the number
  of images (one compiled program), labels, loss masks, segment ids and positions line up
  one-to-one with ``input_ids`` (a packer concatenates whole examples, slots included,
  and never has to know about images), and a BLIP-2 converted from HF keeps its
  ``image_token_index`` with the meaning HF gives it (its logits equal HF's for
  placeholders anywhere in the row: tests/test_interleave.py). Explicit per-image
  insertion offsets would instead move every text token by a data-dependent amount and
  leave absent images as padding holes inside the row.
* Positions follow the attention mask as everywhere in ``llm`` (placeholders are valid
  tokens), as HF BLIP-2 does with its image tokens.
* Cost: the ViT and the Q-Former run on all B * M slots, used or not (fixed shapes); an
  absent slot is never read, so it contributes nothing to the output or the gradients.
  Feed zeros there (a NaN in an absent slot would still reach the backward pass: 0 * NaN).
* The instruction-aware Q-Former (InstructBLIP) reads either one instruction shared by
  every image of the row (``qformer_input_ids`` [B, L]) or one per image ([B, M, L]).

The placeholder id (:func:`placeholder_id`) is ``model.image_token_index`` where the
config has one (a BLIP-2 from HF: its config's), else ``llm.vocab_size``: one past the
vocabulary, an id no tokenizer that fits the model emits. It needs no row of the
embedding table: slots are replaced before the lookup and are never loss targets. ``check_slots`` validates a concrete batch
(the data pipeline calls it; ``UniFER.prefixed_inputs`` calls it outside ``jit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def placeholder_id(model_cfg) -> int:
  """The id that marks image slots in ``input_ids`` for a UniFER config (docstring)."""
  token = model_cfg.get('image_token_index', None)
  return int(model_cfg.llm.vocab_size if token is None else token)


def check_if_concrete(input_ids, image_mask, image_token: int, num_queries: int) -> None:
  """``check_slots`` outside ``jit``; traced values (inside a compiled step or generate)
  pass unchecked: their batches came from a pipeline that checks (or builds) them."""
  try:
    ids, used = np.asarray(input_ids), np.asarray(image_mask)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  check_slots(ids, used, image_token, num_queries)


def check_slots(input_ids, image_mask, image_token: int, num_queries: int,
                where: str = 'input_ids') -> None:
  """Each row holds exactly ``num_queries`` placeholder ids per used image, in runs of
  ``num_queries``; raises ValueError naming the first bad row otherwise."""
  ids, used = np.asarray(input_ids), np.asarray(image_mask).astype(bool)
  if ids.ndim != 2 or used.ndim != 2 or ids.shape[0] != used.shape[0]:
    raise ValueError(f'{where}: expected input_ids [B, T] and image_mask [B, M] with the same '
                     f'B; got {ids.shape} and {used.shape}')
  slots = ids == image_token
  for row in range(ids.shape[0]):
    want = int(used[row].sum()) * num_queries
    got = int(slots[row].sum())
    if got != want:
      raise ValueError(
          f'{where}: row {row} has {got} image placeholder ids ({image_token}) but '
          f'{int(used[row].sum())} used images x {num_queries} queries = {want}')
    # Run lengths of consecutive placeholders must be multiples of Q (whole images).
    edges = np.flatnonzero(np.diff(np.concatenate([[0], slots[row].astype(np.int8), [0]])))
    runs = edges[1::2] - edges[::2]
    if np.any(runs % num_queries):
      raise ValueError(f'{where}: row {row} has a run of {int(runs[runs % num_queries != 0][0])} '
                       f'placeholder ids; each image takes a run of {num_queries}')


def merge_image_slots(text_embeds: jax.Array, slots: jax.Array, prefixes: jax.Array,
                      image_mask: jax.Array) -> jax.Array:
  """``text_embeds`` [B, T, D] with each placeholder position (``slots`` [B, T] bool)
  replaced by its image query: ``prefixes`` [B, M, Q, D] of the M slots, ``image_mask``
  [B, M] which are used. A gather (backward: a scatter-add into the used prefixes)."""
  b, m, q, d = prefixes.shape
  # Used images first, in slot order (a stable sort on "absent"): the k-th used image.
  order = jnp.argsort(~image_mask.astype(bool), axis=1, stable=True)           # [B, M]
  rank = jnp.clip(jnp.cumsum(slots.astype(jnp.int32), axis=1) - 1, 0, m * q - 1)  # [B, T]
  image = jnp.take_along_axis(order, rank // q, axis=1)                          # [B, T]
  source = (image * q + rank % q)[..., None]                                     # [B, T, 1]
  picked = jnp.take_along_axis(prefixes.reshape(b, m * q, d), source, axis=1)    # [B, T, D]
  return jnp.where(slots[..., None], picked.astype(text_embeds.dtype), text_embeds)


def per_image_instruction(ids, mask, num_images: int):
  """Q-Former instruction ids/mask for B * M images: [B, L] shared by a row's images
  (repeated) or [B, M, L] one per image (flattened); mask defaults to all ones."""
  if ids is None:
    return None, None
  if mask is None:
    mask = jnp.ones(ids.shape, jnp.int32)
  if ids.ndim == 2:
    ids, mask = (jnp.repeat(x[:, None], num_images, axis=1) for x in (ids, mask))
  elif ids.ndim != 3 or ids.shape[1] != num_images:
    raise ValueError(f'qformer_input_ids: expected [B, L] (shared by the row\'s images) or '
                     f'[B, M={num_images}, L] (one per image); got {ids.shape}')
  return (ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]))

"""Evaluations of the aligned Q-Former: zero-shot classification from text prompts
(any label list, so open vocabulary), image-text retrieval R@k (at instance level: only
the face's own caption is relevant; at label level: any caption of a face with the same
expression label) and image-text matching (ITM) accuracy on held-out pairs.

Scores follow BLIP-2's ITC: an image's similarity to a text is the best of its query
embeddings' cosine similarities with the text's [CLS] embedding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def image_features(model, images: jax.Array) -> jax.Array:
  """[B, Q, E] normalised query embeddings."""
  return model.image_embeddings(model.qformer.encode_queries(model.image_tokens(images)))


def text_features(model, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
  """[B, E] normalised text embeddings."""
  return model.text_embedding(model.qformer.encode_text(text_ids, text_mask), text_mask)


def itm_logits(model, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
  """[B, 2] ITM logits (no match, match) of image i with text i."""
  return model.itm_logits(model.qformer.match(model.image_tokens(images), text_ids, text_mask))


def class_embeddings(text_feats: jax.Array, prompt_class: np.ndarray, num_classes: int) -> jax.Array:
  """Prompt ensemble: mean of each class's prompt embeddings, renormalised -> [C, E]."""
  one_hot = jax.nn.one_hot(jnp.asarray(prompt_class), num_classes, dtype=text_feats.dtype)
  summed = one_hot.T @ text_feats
  return summed / jnp.linalg.norm(summed, axis=-1, keepdims=True)


def scores(image_feats: jax.Array, text_feats: jax.Array) -> jax.Array:
  """[N, C]: max over queries of the cosine similarity."""
  return jnp.einsum('nqe,ce->ncq', image_feats, text_feats).max(axis=-1)


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict:
  """sim [N_query, N_item]; relevant [N_query, N_item] bool. R@k = share of queries
  with a relevant item among their top k."""
  order = np.argsort(-sim, axis=1)
  hits = np.take_along_axis(relevant, order, axis=1)
  return {f'r{k}': float(hits[:, :k].any(axis=1).mean()) for k in ks}


def retrieval_recalls(sim: np.ndarray, ks: Sequence[int] = (1, 5, 10), expression=None,
                      compound=None) -> dict:
  """Image->text and text->image R@k of a square sim [N images, N texts] (text i is image
  i's caption). Instance level, ``i2t_r{k}`` / ``t2i_r{k}``: only the pair's own item is
  relevant. With labels given, label level too, ``label_i2t_r{k}`` / ``label_t2i_r{k}``:
  any item with the same expression label (align_losses.same_label; an unlabelled record
  counts its own item only)."""
  from unifer_jax.train import align_losses  # pylint: disable=g-import-not-at-top
  sim = np.asarray(sim)
  if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
    raise ValueError(f'retrieval: similarities must be square [N images, N captions], '
                     f'got {sim.shape}')
  own = np.eye(len(sim), dtype=bool)
  levels = {'': own}
  if expression is not None and compound is not None:
    levels['label_'] = own | np.asarray(align_losses.same_label(
        jnp.asarray(expression), jnp.asarray(compound)))
  out = {}
  for prefix, relevant in levels.items():
    out.update({f'{prefix}i2t_{k}': v for k, v in recall_at_k(sim, relevant, ks).items()})
    out.update({f'{prefix}t2i_{k}': v for k, v in recall_at_k(sim.T, relevant.T, ks).items()})
  return out


def matching_pairs(sim: np.ndarray, excluded: np.ndarray, temp: float, seed: int = 0):
  """Held-out ITM pairs built as training builds them: per item its positive (i, i), a
  text negative for image i and an image negative for text i, drawn from softmax(sim /
  temp) outside ``excluded`` (align_losses.not_negatives). -> (image_idx, text_idx,
  label) [3N] each, 1 positive : 2 negatives."""
  from unifer_jax.train import align_losses  # pylint: disable=g-import-not-at-top
  neg_image, neg_text = align_losses.sample_hard_negatives(
      jnp.asarray(sim / temp), jnp.asarray(excluded), jax.random.key(seed))
  n = len(sim)
  idx = np.arange(n)
  images = np.concatenate([idx, np.asarray(neg_image), idx])
  texts = np.concatenate([idx, idx, np.asarray(neg_text)])
  return images, texts, np.concatenate([np.ones(n, np.int32), np.zeros(2 * n, np.int32)])


def matching_accuracy(itm_fn: Callable, images: np.ndarray, text_ids: np.ndarray,
                      text_mask: np.ndarray, pairs, batch_size: int = 64) -> dict:
  """ITM accuracy of ``itm_fn(images, ids, mask) -> [B, 2]`` on ``pairs``
  (matching_pairs): overall (the prior "never a match" scores 0.667), on the positives
  and on the negatives."""
  img_idx, txt_idx, label = pairs
  # Gathered batch by batch: 3N images at once would hold three copies of the split.
  logits = encode_in_batches(lambda i, t: itm_fn(images[i], text_ids[t], text_mask[t]),
                             [img_idx, txt_idx], batch_size)
  return matching_metrics(logits, label)


def matching_metrics(logits: np.ndarray, label: np.ndarray) -> dict:
  right = np.asarray(logits).argmax(-1) == label
  return {'itm_acc': float(right.mean()), 'itm_acc_pos': float(right[label == 1].mean()),
          'itm_acc_neg': float(right[label == 0].mean()), 'itm_n': int(len(label))}


def encode_in_batches(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """Runs a jitted fn over leading-axis batches (padding the last) and concatenates."""
  n = len(arrays[0])
  out = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    pad = batch_size - len(chunk[0])
    if pad:
      chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
    out.append(np.asarray(fn(*chunk))[:batch_size - pad])
  return np.concatenate(out)


class Retrieval:
  """``config.evals.NAME = dict(type='retrieval', dataset=<tfds spec>, ks=[1, 5, 10])``:
  image->text and text->image R@k over a split's captions (retrieval_recalls): instance
  level (``i2t_r1``: is the face's own caption the top one?) and label level
  (``label_i2t_r1``: is the top caption one of a face with the same expression?)."""

  def __init__(self, name: str, cfg: dict):
    self.name, self.cfg = name, cfg

  def run(self, model, out_dir) -> dict:
    from unifer_jax.evaluators import eval_sets  # pylint: disable=g-import-not-at-top
    data = eval_sets.load(self.cfg['dataset'], model).split
    if data is None:
      raise ValueError(f'evals.{self.name}: retrieval needs a tfds dataset with captions')
    img = model.image_features(data['image'])
    txt = model.text_features(list(data['caption']))
    sim = np.asarray(scores(jnp.asarray(img), jnp.asarray(txt)))
    ks = tuple(self.cfg.get('ks') or (1, 5, 10))
    return {**retrieval_recalls(sim, ks, data.get('expression'), data.get('compound')),
            'n': int(len(sim))}


class Matching:
  """``config.evals.NAME = dict(type='itm', dataset=<tfds spec>, seed=0)``: ITM accuracy
  on a split's held-out pairs, 1 positive : 2 hard negatives drawn from the ITC
  similarities outside equal captions and equal labels (matching_pairs) -- the prior
  "never a match" scores 0.667. Also the accuracy on positives and on negatives."""

  def __init__(self, name: str, cfg: dict):
    self.name, self.cfg = name, cfg

  def run(self, model, out_dir) -> dict:
    del out_dir
    from unifer_jax.evaluators import eval_sets  # pylint: disable=g-import-not-at-top
    from unifer_jax.train import align_losses  # pylint: disable=g-import-not-at-top
    data = eval_sets.load(self.cfg['dataset'], model).split
    if data is None:
      raise ValueError(f'evals.{self.name}: itm needs a tfds dataset with captions')
    ids, mask = model.text_ids(list(data['caption']))
    sim = np.asarray(scores(jnp.asarray(model.image_features(data['image'])),
                            jnp.asarray(model.text_features(list(data['caption'])))))
    excluded = np.asarray(align_losses.not_negatives(ids, mask, data['expression'],
                                                     data['compound']))
    img, txt, label = matching_pairs(sim, excluded, model.temperature(),
                                     int(self.cfg.get('seed', 0)))
    return matching_metrics(model.itm_logits(data['image'][img], ids[txt], mask[txt]), label)

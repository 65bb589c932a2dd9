"""Evaluations of the aligned Q-Former: zero-shot classification from text prompts
(any label list, so open vocabulary) and image-text retrieval R@k.

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
  image->text and text->image R@k over a split's captions (identical captions all
  count as relevant: the procedural corpus repeats them)."""

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
    caps = np.asarray(data['caption'])
    relevant = caps[:, None] == caps[None, :]
    ks = tuple(self.cfg.get('ks') or (1, 5, 10))
    i2t = recall_at_k(sim, relevant, ks)
    t2i = recall_at_k(sim.T, relevant.T, ks)
    return {**{f'i2t_{k}': v for k, v in i2t.items()}, **{f't2i_{k}': v for k, v in t2i.items()},
            'n': int(len(caps))}

"""k-shot expression recognition (issue 34 item 2): each held-out face asked after k
labelled example faces, with the usual label words and with the classes renamed.

  config.evals.fewshot = dict(type='fewshot', shots=[0, 1, 4], max_items=200,
                              dataset=dict(split='test'))

For each query face (a record with a basic label, in split order) and each k, the k
examples are drawn from the same split (never the query; data/fewshot.pick_examples,
seeded by the query's position and k), and the same row is asked twice: with the
``labels.BASIC`` names, and with every class renamed to a word of
``data.fewshot.RELABEL_WORDS`` (a mapping drawn per query), where the relabelled row
always shows the query's class among its examples -- so only the examples tell the
answer, and a 0-shot relabelled row is at chance by construction. The rows are the
training rows' (``data/fewshot.py``: the same message, the faces in placeholder slots);
answers are decoded greedily and read with ``answers.answer_span``.

Reports ``fewshot_acc_{k}shot`` (the answer parses to the query's basic label) and
``fewshot_relabelled_acc_{k}shot`` (the answer is the query's renamed word), plus
``fewshot_n`` queries. Every row of one evaluation has the same shape (max(shots) + 1
slots, prompts left-padded to the longest): one generation compile.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from unifer_jax.data import answers, fewshot, instructions, labels
from unifer_jax.evaluators import item_shards
from unifer_jax.models import interleave
from unifer_jax.models import unifer as unifer_lib

MAX_NEW_TOKENS = 12   # '<answer>word</answer>' and eos: 5-9 demo-BPE tokens


@functools.partial(jax.jit, static_argnames=('graphdef', 'eos_id'))
def _generate(params, images, image_mask, ids, mask, qformer, *, graphdef, eos_id: int):
  q_ids, q_mask = qformer if qformer is not None else (None, None)
  return unifer_lib.generate(nnx.merge(graphdef, params), images, ids, mask,
                             image_mask=image_mask, qformer_input_ids=q_ids,
                             qformer_attention_mask=q_mask, max_new_tokens=MAX_NEW_TOKENS,
                             eos_id=eos_id, pad_id=0)


def build_rows(images: np.ndarray, expression: np.ndarray, shots, tok, queries: int,
               token: int, max_items: int, seed: int = 0) -> dict:
  """Every (query, k, relabelled) row: images [R, M, H, W, 3], image_mask [R, M], ids and
  mask [R, L] (left-padded), and per row the query, k, kind and expected answer word."""
  slots = max(shots) + 1
  queries_idx = np.flatnonzero(expression >= 0)[:max_items]
  label_of = lambda j: int(expression[j])
  rows = []
  for qi in queries_idx:
    words_rng = np.random.default_rng([seed, int(qi)])
    renamed = [fewshot.RELABEL_WORDS[i]
               for i in words_rng.choice(len(fewshot.RELABEL_WORDS), len(labels.BASIC), False)]
    for k in shots:
      rng = np.random.default_rng([seed, int(qi), int(k)])
      # One set of examples for both kinds, holding the query's class (the relabelled
      # row needs it; the usual one is then the same question with known words).
      picks = fewshot.pick_examples(len(expression), label_of, int(qi), label_of(qi), k, True,
                                    rng)
      if picks is None:
        picks = fewshot.pick_examples(len(expression), label_of, int(qi), label_of(qi), k,
                                      False, rng)
      for relabelled, names in ((False, labels.BASIC), (True, renamed)):
        if relabelled and k and label_of(qi) not in [label_of(j) for j in picks]:
          continue   # this split holds no other face of the class: no answerable row
        words = [names[label_of(j)] for j in picks]
        ids = fewshot.interleaved_ids(tok, fewshot.message(words), queries, token)
        rows.append(dict(query=int(qi), k=int(k), relabelled=relabelled, faces=picks + [int(qi)],
                         ids=ids, answer=names[label_of(qi)]))
  length = max(len(r['ids']) for r in rows)
  n = len(rows)
  out = dict(images=np.zeros((n, slots, *images.shape[1:]), images.dtype),
             image_mask=np.zeros((n, slots), np.int32), ids=np.zeros((n, length), np.int32),
             mask=np.zeros((n, length), np.int32),
             query=np.array([r['query'] for r in rows]), k=np.array([r['k'] for r in rows]),
             relabelled=np.array([r['relabelled'] for r in rows]),
             answer=[r['answer'] for r in rows])
  for i, r in enumerate(rows):
    f = len(r['faces'])
    out['images'][i, :f] = images[r['faces']]
    out['image_mask'][i, :f] = 1
    out['ids'][i, length - len(r['ids']):] = r['ids']
    out['mask'][i, length - len(r['ids']):] = 1
  return out


def correct(text: str, answer: str, relabelled: bool) -> bool:
  """Whether a generated answer names the expected word (relabelled: exactly, ignoring
  case and a trailing full stop) or parses to the expected basic label."""
  if relabelled:
    return answers.answer_span(text).strip().rstrip('.').lower() == answer
  return instructions.parse_answer('basic', text) == labels.BASIC.index(answer)


def evaluate(model, images: np.ndarray, expression: np.ndarray, shots=(0, 1, 4),
             max_items: int = 200, batch_size: int = 32, seed: int = 0) -> tuple[dict, list]:
  """(metrics, raw answers) of ``model`` (model_io.Model) on the split's faces."""
  from unifer_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  cfg = state_lib.model_config(model.config)
  tok = model.tokenizer
  rows = build_rows(images, expression, tuple(shots), tok, int(cfg.qformer.num_queries),
                    interleave.placeholder_id(cfg), max_items, seed)
  arrays = [rows['images'], rows['image_mask'], rows['ids'], rows['mask']]
  q = model.qformer_text([fewshot.INTRO] * len(rows['ids']))
  if q is not None:
    arrays += list(q)
  texts = []
  for batch in item_shards.batches(arrays, batch_size, model.mesh):
    imgs, image_mask, ids, mask, *qf = batch.arrays
    tokens = _generate(model.params, imgs, image_mask, ids, mask, tuple(qf) or None,
                       graphdef=model.graphdef, eos_id=tok.eos_id)
    texts += [tok.decode(t) for t in batch.results(tokens)]
  hits = np.array([correct(t, a, r) for t, a, r in zip(texts, rows['answer'],
                                                        rows['relabelled'])])
  metrics = {'fewshot_n': int(len(np.unique(rows['query'])))}
  for k in shots:
    for relabelled, name in ((False, 'fewshot_acc'), (True, 'fewshot_relabelled_acc')):
      sel = (rows['k'] == k) & (rows['relabelled'] == relabelled)
      metrics[f'{name}_{k}shot'] = float(hits[sel].mean()) if sel.any() else float('nan')
  raw = [dict(query=int(qi), k=int(k), relabelled=bool(r), answer=a, said=t)
         for qi, k, r, a, t in zip(rows['query'], rows['k'], rows['relabelled'],
                                   rows['answer'], texts)]
  return metrics, raw


class FewShot:
  """``config.evals.NAME = dict(type='fewshot', shots=[0, 1, 4], max_items=200)`` on a
  tfds split (module docstring)."""

  def __init__(self, name: str, cfg: dict):
    self.name, self.cfg = name, cfg

  def run(self, model, out_dir) -> dict:
    """The metrics; every row's answer to ``out_dir/NAME_answers.json`` (process 0)."""
    import json  # pylint: disable=g-import-not-at-top
    from unifer_jax.evaluators import eval_sets  # pylint: disable=g-import-not-at-top
    spec = dict(self.cfg['dataset'])
    if spec.get('type', 'tfds') != 'tfds':
      raise ValueError(f'evals.{self.name}: k-shot rows need a tfds split (faces with basic '
                       f'labels to show as examples), got type {spec.get("type")!r}')
    split = eval_sets.load(spec, model).split
    shots = tuple(int(k) for k in self.cfg.get('shots', (0, 1, 4)))
    if any(k < 0 for k in shots) or not shots:
      raise ValueError(f'evals.{self.name}.shots={list(shots)}: expected k >= 0, e.g. [0, 1, 4]')
    metrics, raw = evaluate(model, split['image'], np.asarray(split['expression']), shots,
                            int(self.cfg.get('max_items', 200)),
                            int(self.cfg.get('batch_size', 32)))
    if out_dir is not None:
      with open(f'{out_dir}/{self.name}_answers.json', 'w') as f:
        json.dump(raw, f, indent=1)
    return metrics

"""Generative evaluation of an instruction-tuned model: ask each FER task the way
training asks it (instructions.prompt_for + the tokenizer's chat template), decode
greedily with the KV cache, parse the answers, score them against the labels.

Metrics: basic / compound accuracy (unparseable = wrong), intensity MAE, valence and
arousal CCC (Lin's concordance) and RMSE, rationale action-unit F1 (micro, over the
AU sets named by the answer vs the record's rationale).
"""

from __future__ import annotations

import collections
import functools

import jax
import numpy as np
from flax import nnx

from unifer_jax.data import instructions
from unifer_jax.evaluators import item_shards
from unifer_jax.models import unifer as unifer_lib

# Task -> the label key that decides which records can be asked, and new-token budget.
# One budget for all: a chain-of-thought answer naming six action units is ~51 demo-BPE
# tokens before its label (a compound one) and a valence/arousal one ~43; the old 48 / 24
# cut those off before <answer> (the demo scored 40 % of compound and 0 % of V/A answers
# unparseable). One length is also one generation compile for every task.
MAX_NEW_TOKENS = 72
TASKS = {'basic': ('expression', MAX_NEW_TOKENS), 'compound': ('compound', MAX_NEW_TOKENS),
         'intensity': ('intensity', MAX_NEW_TOKENS), 'valence_arousal': ('valence', MAX_NEW_TOKENS),
         'rationale': ('aus', MAX_NEW_TOKENS)}


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new', 'eos_id', 'temperature',
                                             'samples', 'clips'))
def _generate(params, images, prompt_ids, qformer, rng=None, *, graphdef, max_new: int,
              eos_id: int, temperature: float = 0.0, samples: int = 1, clips: bool = False):
  q_ids, q_mask = qformer if qformer is not None else (None, None)
  out = unifer_lib.generate(nnx.merge(graphdef, params), images, prompt_ids, clips=clips,
                            qformer_input_ids=q_ids, qformer_attention_mask=q_mask,
                            max_new_tokens=max_new, eos_id=eos_id, pad_id=0,
                            temperature=temperature, rng=rng, num_samples=samples)
  return out.reshape(len(images), samples, max_new) if samples > 1 else out


def answers(graphdef, params, images: np.ndarray, task: str, tok, batch_size: int = 64,
            qformer_text=None, *, temperature: float = 0.0, samples: int = 1,
            seed: int = 0, clips: bool = False) -> list[str]:
  """Greedy answers of the model to `task`'s prompt for each image (``clips``: each
  clip's frames [N, T, H, W, C], a clip model's prefix, models/video.py); ``qformer_text``
  (``model_io.Model.qformer_text``) gives an instruction-aware Q-Former the prompt. The
  images are split over the processes of the mesh ``params`` live on (item_shards).
  With ``temperature`` > 0, ``samples`` sampled answers per image (image i's are
  ``[i * samples, (i + 1) * samples)``), batch b drawn with key ``fold_in(seed, b)``."""
  message = instructions.prompt_for(task)
  prompt = np.asarray(tok.prompt_ids(message), np.int32)
  n = len(images)
  arrays = [images, np.broadcast_to(prompt, (n, len(prompt)))]
  if qformer_text is not None:
    arrays += list(qformer_text([message] * n))
  mesh = item_shards.mesh_of(params)
  out = []
  sampling = dict(temperature=float(temperature), samples=int(samples)) if temperature else {}
  for b, batch in enumerate(item_shards.batches(arrays, batch_size, mesh)):
    chunk, ids, *q = batch.arrays
    rng = jax.random.fold_in(jax.random.key(seed), b) if temperature else None
    tokens = _generate(params, chunk, ids, tuple(q) or None, rng, graphdef=graphdef,
                       max_new=TASKS[task][1], eos_id=tok.eos_id, clips=clips, **sampling)
    out += [tok.decode(t) for r in batch.results(tokens)   # [rows, G, L] when G > 1
            for t in (r if temperature and samples > 1 else [r])]
  return out


def ccc(pred: np.ndarray, true: np.ndarray) -> float:
  """Lin's concordance correlation coefficient."""
  pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  mp, mt = pred.mean(), true.mean()
  cov = ((pred - mp) * (true - mt)).mean()
  return float(2 * cov / (pred.var() + true.var() + (mp - mt) ** 2 + 1e-12))


def au_f1(pred_sets, true_sets) -> float:
  """Micro F1 of predicted vs true action-unit sets."""
  tp = fp = fn = 0
  for p, t in zip(pred_sets, true_sets):
    p, t = set(p or ()), set(t)
    tp += len(p & t)
    fp += len(p - t)
    fn += len(t - p)
  return float(2 * tp / max(2 * tp + fp + fn, 1))


def evaluate(graphdef, params, data: dict, tok, tasks=tuple(TASKS), batch_size: int = 64,
             max_per_task: int = 400, qformer_text=None) -> tuple[dict, dict]:
  """``data``: numpy arrays of the eval split (image, expression, compound, intensity,
  valence, arousal) plus 'rationale' (list of str). Returns (metrics, raw answers)."""
  metrics, raw = {}, {}
  for task in tasks:
    key = TASKS[task][0]
    if key == 'aus':
      idx = np.flatnonzero([bool(r) for r in data['rationale']])
    elif np.issubdtype(data[key].dtype, np.floating):
      idx = np.flatnonzero(np.isfinite(data[key]))
    else:
      idx = np.flatnonzero(data[key] >= 0)
    idx = idx[:max_per_task]
    if not len(idx):
      continue
    texts = answers(graphdef, params, data['image'][idx], task, tok, batch_size, qformer_text)
    parsed = [instructions.parse_answer(task, t) for t in texts]
    raw[task] = {'index': idx.tolist(), 'answers': texts}
    n = len(idx)
    if task in ('basic', 'compound'):
      truth = data[key][idx]
      hits = [p is not None and p == t for p, t in zip(parsed, truth)]
      metrics[f'instruct_{task}_acc'] = float(np.mean(hits))
      metrics[f'instruct_{task}_parsed'] = float(np.mean([p is not None for p in parsed]))
      raw[task]['pred'] = [-1 if p is None else int(p) for p in parsed]
    elif task == 'intensity':
      pred = np.array([np.nan if p is None else p for p in parsed])
      ok = np.isfinite(pred)
      metrics['intensity_mae'] = float(np.abs(pred[ok] - data[key][idx][ok]).mean()) if ok.any() else float('nan')
      metrics['intensity_parsed'] = float(ok.mean())
    elif task == 'valence_arousal':
      pairs = np.array([(np.nan, np.nan) if p is None else p for p in parsed], np.float64)
      ok = np.isfinite(pairs).all(axis=1)
      true = np.stack([data['valence'][idx], data['arousal'][idx]], axis=1)
      if ok.sum() > 1:
        v, a = ccc(pairs[ok, 0], true[ok, 0]), ccc(pairs[ok, 1], true[ok, 1])
        metrics.update(va_ccc=(v + a) / 2, valence_ccc=v, arousal_ccc=a,
                       va_rmse=float(np.sqrt(((pairs[ok] - true[ok]) ** 2).mean())))
      metrics['va_parsed'] = float(ok.mean())
    elif task == 'rationale':
      truth = [instructions.parse_answer('rationale', f'<answer>{data["rationale"][i]}</answer>')
               for i in idx]
      metrics['rationale_au_f1'] = au_f1(parsed, [t or () for t in truth])
    metrics[f'{task}_n'] = n
  return metrics, raw


def _label_task(task: str) -> tuple[str, tuple]:
  """A label task's record key and label vocabulary."""
  from unifer_jax.data import labels  # pylint: disable=g-import-not-at-top
  return {'basic': ('expression', labels.BASIC), 'compound': ('compound', labels.COMPOUND)}[task]


def ferbench_scores(graphdef, params, data: dict, tok, tasks=('basic', 'compound'),
                    batch_size: int = 64, max_per_task: int = 400, qformer_text=None) -> dict:
  """Greedy answers to each label task's training prompt (CoT hint), scored as the
  FERBench protocol scores them and as GRPO rewards them: ``{task}_acc`` (the label
  ``ferbench.extract_label`` reads over the task's vocabulary, RAF-DB protocol; unknown =
  wrong), ``{task}_format`` (``answers.is_well_formed``: exactly <think>..</think>
  <answer>..</answer>), ``{task}_n``; plus ``format_rate`` over all of them."""
  from unifer_jax.data import answers as answers_lib  # pylint: disable=g-import-not-at-top
  from unifer_jax.evaluators import ferbench  # pylint: disable=g-import-not-at-top
  out, formats = {}, []
  for task in tasks:
    key, vocab = _label_task(task)
    idx = np.flatnonzero(data[key] >= 0)[:max_per_task]
    texts = answers(graphdef, params, data['image'][idx], task, tok, batch_size, qformer_text)
    said = [ferbench.extract_label(t, vocab) for t in texts]
    truth = [vocab[i] for i in data[key][idx]]
    ok = [answers_lib.is_well_formed(t, think=True) for t in texts]
    out[f'{task}_acc'] = float(np.mean([s == t for s, t in zip(said, truth)]))
    out[f'{task}_format'] = float(np.mean(ok))
    out[f'{task}_n'] = len(idx)
    formats += ok
  out['format_rate'] = float(np.mean(formats))
  return out


def sampling_headroom(graphdef, params, data: dict, tok, tasks=('basic', 'compound'), *,
                      samples: int = 8, temperature: float = 1.0, seed: int = 0,
                      batch_size: int = 32, max_per_task: int = 400, qformer_text=None) -> dict:
  """What a verifiable-reward RL stage (train/grpo.py) has to work with, per label task:
  ``{task}_greedy`` (ferbench_scores' accuracy), ``{task}_sampled`` (mean accuracy of
  ``samples`` answers sampled at ``temperature``, what GRPO's rollouts score),
  ``{task}_pass@G`` (some sample right: the ceiling sharpening can reach on these faces),
  ``{task}_maj@G`` (the samples' most common label right), and ``{task}_all_right`` /
  ``{task}_none_right`` (groups of G that carry no reward signal)."""
  from unifer_jax.evaluators import ferbench  # pylint: disable=g-import-not-at-top
  out = {}
  for task in tasks:
    key, vocab = _label_task(task)
    idx = np.flatnonzero(data[key] >= 0)[:max_per_task]
    truth = np.asarray([vocab[i] for i in data[key][idx]])
    said = lambda texts: np.asarray([ferbench.extract_label(t, vocab) for t in texts])
    greedy = said(answers(graphdef, params, data['image'][idx], task, tok, batch_size,
                          qformer_text))
    right = said(answers(graphdef, params, data['image'][idx], task, tok, batch_size,
                         qformer_text, temperature=temperature, samples=samples, seed=seed)
                 ).reshape(len(idx), samples)
    hits = right == truth[:, None]
    majority = [collections.Counter(r).most_common(1)[0][0] for r in right]
    g = samples
    out.update({f'{task}_greedy': float(np.mean(greedy == truth)),
                f'{task}_sampled': float(hits.mean()), f'{task}_pass@{g}': float(hits.any(1).mean()),
                f'{task}_maj@{g}': float(np.mean(np.asarray(majority) == truth)),
                f'{task}_all_right': float(hits.all(1).mean()),
                f'{task}_none_right': float((~hits).all(1).mean()), f'{task}_n': len(idx)})
  return out


class InstructTasks:
  """``config.evals.NAME = dict(type='instruct', dataset=<tfds spec>, tasks=[...],
  max_per_task=400)``: the FER tasks asked as training asks them (basic and compound
  accuracy, weighted and mean-class; intensity MAE; valence/arousal CCC and RMSE;
  rationale AU F1). Needs a tfds split (its records carry every label)."""

  def __init__(self, name: str, cfg: dict):
    self.name, self.cfg = name, cfg

  def run(self, model, out_dir) -> dict:
    from unifer_jax.data import labels  # pylint: disable=g-import-not-at-top
    from unifer_jax.evaluators import classify, eval_sets  # pylint: disable=g-import-not-at-top
    spec = dict(self.cfg['dataset'])
    if spec.get('type', 'tfds') != 'tfds':
      raise ValueError(f'evals.{self.name}: the instruct tasks need a tfds dataset (records '
                       f'with every label), got type {spec.get("type")!r}')
    data = eval_sets.load(spec, model).split
    tasks = tuple(self.cfg.get('tasks') or TASKS)
    bad = sorted(set(tasks) - set(TASKS))
    if bad:
      raise ValueError(f'evals.{self.name}.tasks: unknown {bad}; expected some of {list(TASKS)}')
    scores, raw = evaluate(model.graphdef, model.params, data, model.tokenizer, tasks,
                           batch_size=int(self.cfg.get('batch_size', 32)),
                           max_per_task=int(self.cfg.get('max_per_task', 400)),
                           qformer_text=model.qformer_text if model.instruction_aware else None)
    r = dict(scores)
    for task, key, names in (('basic', 'expression', labels.BASIC),
                              ('compound', 'compound', labels.COMPOUND)):
      if task in raw:
        idx = np.asarray(raw[task]['index'])
        r[task] = classify.label_metrics(data[key][idx], np.asarray(raw[task]['pred']),
                                         list(names), out_dir, f'{self.name}_{task}',
                                         f'{self.name}: {task} expression')
    return r

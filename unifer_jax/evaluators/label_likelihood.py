"""Likelihood scoring over candidate labels: p(label | image, prompt) from the LLM's
log-likelihood of each candidate answer, normalised over the candidates -- the
distillation teacher's distribution (evaluators/likelihood.py, one batched scorer for
the project), scored like a classifier: label metrics, ECE / reliability diagram and a
temperature fitted on the validation split.

Config keys (``config.evals.NAME``):
  task: 'basic' (default; the dataset's candidate words are mapped to the basic labels
    and the distribution renormalised over them) | 'compound' (tfds splits: records with
    a compound label, over the 11 compounds)
  dataset, val, bins, batch_size (16)
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from unifer_jax.data import labels
from unifer_jax.evaluators import classify, eval_sets, item_shards, likelihood


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _distributions(params, images, prompts, *, graphdef):
  model = nnx.merge(graphdef, params)
  probs = likelihood.label_distributions(model, images, prompts)
  return [probs[t] for t in sorted(prompts)]


def log_probs(model, images: np.ndarray, tasks=('basic',), batch_size: int = 16) -> dict:
  """{task: [N, C] log p over its vocabulary (labels.BASIC / labels.COMPOUND)}; the
  tasks share one pass over the image prefix and one compiled program."""
  tasks = sorted(tasks)
  prompts = item_shards.replicated({t: model.label_prompt(t).arrays() for t in tasks},
                                   model.mesh)
  probs = item_shards.map_items(
      lambda x: _distributions(model.params, x, prompts, graphdef=model.graphdef), [images],
      batch_size, model.mesh)
  return {t: np.log(np.maximum(p, 1e-30)) for t, p in zip(tasks, probs)}


class Likelihood:

  def __init__(self, name: str, cfg: dict):
    self.name, self.cfg = name, cfg
    if cfg.get('task', 'basic') not in ('basic', 'compound'):
      raise ValueError(f"evals.{name}.task={cfg.get('task')!r}; expected 'basic' or 'compound'")

  def _scored(self, model, data: eval_sets.EvalSet):
    """(logits over the evaluated classes, true indices, class names)."""
    batch = int(self.cfg.get('batch_size', 16))
    if self.cfg.get('task', 'basic') == 'compound':
      if data.split is None:
        raise ValueError(f'evals.{self.name}: compound scoring needs a tfds split')
      keep = np.asarray(data.split['compound']) >= 0
      images = data.split['image'][keep]
      return (log_probs(model, images, ('compound',), batch)['compound'],
              np.asarray(data.split['compound'])[keep], list(labels.COMPOUND))
    cols = [labels.BASIC.index(eval_sets.canonical(c)) for c in data.classes]
    lp = log_probs(model, data.images, ('basic',), batch)['basic'][:, cols]
    return lp - np.logaddexp.reduce(lp, axis=1, keepdims=True), data.true, list(data.classes)

  def run(self, model, out_dir: Path | None) -> dict:
    data = eval_sets.load(self.cfg['dataset'], model)
    logits, true, classes = self._scored(model, data)
    r = classify.label_metrics(true, logits.argmax(-1), classes, out_dir, self.name,
                               f'{self.name} (label likelihood)')
    vspec = classify.val_spec(self.cfg, "validation")
    val = self._scored(model, eval_sets.load(vspec, model)) if vspec else None
    r['calibration'] = classify.calibration_report(
        logits, true, val[0] if val else None, val[1] if val else None, out_dir, self.name,
        f'{self.name}: reliability', int(self.cfg.get('bins', 10)))
    r['notes'] = data.notes
    classify.write_missing(data, out_dir, self.name)
    return r

"""Generative answers under the FERBench protocol: one fixed prompt listing the
candidate labels, a decoded answer per image, the label extracted by the reference
rules (ferbench.extract_label: <answer> exact/substring -> whole word/substring over
the response -> the subset's synonyms -> unknown), scored with unknown = wrong.

Config keys (``config.evals.NAME``):
  dataset: a dataset spec (eval_sets)
  prompt: 'ferbench' (the published prompt, default; every published item carries
    exactly it) | 'train' (the open-vocabulary phrasing training used) | any string
    with '{labels}'
  decoding: dict(max_new_tokens=64, temperature=0.0 (greedy, FERBench's), top_k, top_p,
    seed)
  batch_size: 32
Answers are written next to the report (``NAME_answers.jsonl``) for inspection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unifer_jax import workdirs
from unifer_jax.data import instructions
from unifer_jax.evaluators import classify, eval_sets, ferbench

DECODING = dict(max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, seed=0)


def prompt_text(kind: str, classes) -> str:
  if kind == 'ferbench':
    return ferbench.PROMPT.format(labels=', '.join(classes))
  if kind == 'train':
    return instructions.prompt_for('open_vocab', list(classes))
  if '{labels}' in kind:
    return kind.format(labels=', '.join(classes))
  raise ValueError(f"prompt {kind!r}: expected 'ferbench', 'train' or a string "
                   f"with {{labels}}")


class Generative:

  def __init__(self, name: str, cfg: dict):
    self.name, self.cfg = name, cfg

  def run(self, model, out_dir: Path | None) -> dict:
    data = eval_sets.load(self.cfg['dataset'], model)
    kind = self.cfg.get('prompt', 'ferbench')
    prompt = prompt_text(kind, data.classes)
    decoding = dict(DECODING)
    unknown_keys = set(self.cfg.get('decoding') or {}) - set(DECODING)
    if unknown_keys:
      raise ValueError(f'evals.{self.name}.decoding: unknown keys {sorted(unknown_keys)}; '
                       f'expected {sorted(DECODING)}')
    decoding.update(self.cfg.get('decoding') or {})
    answers = model.generate(data.images, [prompt] * len(data.images),
                             batch_size=int(self.cfg.get('batch_size', 32)), **decoding)
    words = [ferbench.extract_label(a, data.classes, data.protocol) for a in answers]
    pred = np.array([data.classes.index(w) if w in data.classes else -1 for w in words])
    r = classify.label_metrics(data.true, pred, data.classes, out_dir, self.name,
                               f'{self.name} (generative, {data.protocol.name} protocol)')
    r['prompt'] = prompt
    r['decoding'] = decoding
    r['notes'] = data.notes
    classify.write_missing(data, out_dir, self.name)
    r['examples'] = [{'answer': a, 'extracted': w, 'true': data.classes[t]}
                     for a, w, t in list(zip(answers, words, data.true))[:5]]
    if out_dir is not None:
      with (workdirs.path(out_dir) / f'{self.name}_answers.jsonl').open('w') as f:
        for a, w, t in zip(answers, words, data.true):
          f.write(json.dumps({'answer': a, 'extracted': w, 'true': data.classes[t]}) + '\n')
    return r

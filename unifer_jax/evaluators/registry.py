"""The evaluator registry, configured like big_vision's ``config.evals``::

  config.evals = dict(
      zs=dict(type='zero_shot', every_steps=100, dataset=dict(split='test', limit=500)),
      ferbench_raf=dict(type='generative', dataset=dict(type='ferbench',
                        items='.../rafdb_qa.json', image_root='/data')),
  )

Each entry: ``type`` (a key of EVALUATORS), ``every_steps`` (inside training; 0 = only
standalone ``unifer eval``), ``dataset`` (eval_sets spec; default the training
input's 'test' split), and the type's own keys (see each evaluator's module).

In a multi-process run every process runs every evaluator: each scores its share of the
items (item_shards; it logs ``eval NAME: process i scored n of N items``), all get every
result, and only process 0 writes files (figures, answers, the report).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import jax

from unifer_jax import workdirs
from unifer_jax.evaluators import alignment, classify, fewshot, generative, instruct
from unifer_jax.evaluators import item_shards
from unifer_jax.evaluators import label_likelihood, video

EVALUATORS = {
    'zero_shot': classify.ZeroShot,
    'likelihood': label_likelihood.Likelihood,
    'linear_probe': classify.LinearProbe,
    'generative': generative.Generative,
    'instruct': instruct.InstructTasks,
    'fewshot': fewshot.FewShot,
    'retrieval': alignment.Retrieval,
    'itm': alignment.Matching,
    'video': video.VideoClips,
}
DEFAULT_DATASET = {'type': 'tfds', 'split': 'test'}


def _plain(x):
  return x.to_dict() if hasattr(x, 'to_dict') else x


def build(evals_cfg) -> dict:
  """{name: evaluator} from ``config.evals`` (errors name the entry and the key)."""
  out = {}
  for name, cfg in (_plain(evals_cfg) or {}).items():
    cfg = dict(_plain(cfg))
    kind = cfg.get('type')
    if kind not in EVALUATORS:
      raise ValueError(f'config.evals.{name}.type={kind!r}; expected one of {sorted(EVALUATORS)}')
    cfg['dataset'] = dict(DEFAULT_DATASET, **(cfg.get('dataset') or {}))
    out[name] = EVALUATORS[kind](name, cfg)
  return out


def run(evaluators: dict, model, out_dir: Path | None, log=print) -> dict:
  """{name: result}; an evaluator that fails records {'error': ...} and the rest run.
  Files go to ``out_dir`` from process 0 only."""
  results = {}
  process = jax.process_index()
  for name, ev in evaluators.items():
    t = time.monotonic()
    with item_shards.counting() as tally:
      try:
        r = ev.run(model, out_dir if process == 0 else None)
      except Exception as e:  # pylint: disable=broad-except  (reported, the others still run)
        r = {'error': f'{type(e).__name__}: {e}', 'traceback': traceback.format_exc(limit=4)}
        log(f'eval {name}: FAILED: {r["error"]}')
    r['type'] = ev.cfg['type']
    r['seconds'] = time.monotonic() - t
    results[name] = r
    if tally.total:
      log(f'eval {name}: process {process} scored {tally.scored} of {tally.total} items')
    if 'error' not in r and process == 0:
      log(f'eval {name} ({ev.cfg["type"]}, {r["seconds"]:.1f} s): ' + ', '.join(
          f'{k} {v:.4g}' for k, v in scalars({name: r}).items() if not k.endswith('seconds'))[:400])
  return results


def scalars(results: dict) -> dict:
  """Flat {'name/metric': float}: each result's top-level numbers and its calibration's."""
  out = {}
  for name, r in results.items():
    for k, v in r.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        out[f'{name}/{k}'] = float(v)
      elif isinstance(v, dict) and k in ('calibration', 'basic', 'compound'):
        for k2, v2 in v.items():
          if isinstance(v2, (int, float)) and not isinstance(v2, bool) and k2 != 'bins':
            out[f'{name}/{k}_{k2}'] = float(v2)
  return out


class InTraining:
  """The loop's evals section: which evaluators are due at a step, and running them on
  the live parameters (results in metrics.jsonl, figures and answers under
  WORKDIR/evals/step_N/)."""

  def __init__(self, config, setup, workdir: Path):
    self.evaluators = build(config.get('evals'))
    self.every = {n: int(ev.cfg.get('every_steps', 0)) for n, ev in self.evaluators.items()}
    self.setup, self.workdir = setup, workdirs.path(workdir)

  def due(self, step: int, last: bool = False) -> dict:
    return {n: ev for n, ev in self.evaluators.items()
            if self.every[n] and (step % self.every[n] == 0 or last)}

  def run(self, step: int, params, last: bool = False) -> dict:
    from unifer_jax.evaluators import model_io  # pylint: disable=g-import-not-at-top
    due = self.due(step, last)
    if not due:
      return {}
    out = self.workdir / 'evals' / f'step_{step}'
    if jax.process_index() == 0:
      out.mkdir(parents=True, exist_ok=True)
    model = model_io.Model.from_setup(self.setup, params, step)
    return {f'eval/{k}': v for k, v in scalars(run(due, model, out)).items()}

"""report.md / report.json of an evaluation (the workdir contract of DESIGN.md):
one section per evaluator with its numbers (accuracy always both ways, labelled),
per-class precision/recall/F1, calibration, notes (e.g. missing images), errors, and
the figures next to them."""

from __future__ import annotations

import json
import math
from pathlib import Path

from unifer_jax import workdirs

# Shown first, with words, when present.
LABELS = {
    'acc_weighted': 'accuracy, weighted (correct / all)',
    'acc_mean_class': 'accuracy, mean over classes',
    'macro_f1': 'macro F1', 'macro_precision': 'macro precision', 'macro_recall': 'macro recall',
    'unknown_rate': 'share of answers naming no candidate', 'n': 'items',
}


def _fmt(v) -> str:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return str(v)
  if isinstance(v, int):
    return str(v)
  return 'nan' if math.isnan(v) else f'{v:.4f}'


def _section(name: str, r: dict) -> list[str]:
  lines = [f'## {name} ({r.get("type", "?")})', '']
  if 'error' in r:
    return lines + [f'**failed**: `{r["error"]}`', '']
  nums = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
  order = [k for k in LABELS if k in nums] + sorted(k for k in nums if k not in LABELS)
  lines += ['| metric | value |', '|---|---|']
  lines += [f'| {LABELS.get(k, k)} | {_fmt(nums[k])} |' for k in order]
  for key in ('basic', 'compound'):
    if isinstance(r.get(key), dict):
      sub = r[key]
      lines.append(f'| {key}: accuracy weighted / mean-class | {_fmt(sub["acc_weighted"])} / '
                   f'{_fmt(sub["acc_mean_class"])} |')
  if 'prompt' in r:
    lines += ['', f'Prompt: "{r["prompt"]}"; decoding {r.get("decoding")}']
  per_class = r.get('per_class')
  if per_class:
    lines += ['', '| class | precision | recall | F1 | support |', '|---|---|---|---|---|']
    lines += [f'| {c} | {_fmt(m["precision"])} | {_fmt(m["recall"])} | {_fmt(m["f1"])} | '
              f'{m["support"]} |' for c, m in per_class.items()]
  cal = r.get('calibration')
  if cal:
    text = f'Calibration: ECE {_fmt(cal["ece"])}, NLL {_fmt(cal["nll"])}'
    if 'temperature' in cal:
      text += (f'; temperature {_fmt(cal["temperature"])} fitted on the validation split -> '
               f'ECE {_fmt(cal["ece_scaled"])}, NLL {_fmt(cal["nll_scaled"])}')
    else:
      text += ' (no validation split: no temperature fitted)'
    lines += ['', text]
  for note in r.get('notes') or []:
    lines += ['', f'Note: {note}']
  figures = list(r.get('figures') or []) + list((cal or {}).get('figures') or [])
  for key in ('basic', 'compound'):
    if isinstance(r.get(key), dict):
      figures += r[key].get('figures', [])
  lines += [''] + [f'![{f}]({f})' for f in figures] + ['']
  return lines


def markdown(results: dict, title: str) -> str:
  lines = [f'# {title}', '']
  for name, r in results.items():
    lines += _section(name, r)
  return '\n'.join(lines)


def write(results: dict, out_dir: Path, title: str, extra: dict | None = None) -> Path:
  out_dir = workdirs.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  clean = {n: {k: v for k, v in r.items() if k != 'traceback'} for n, r in results.items()}
  (out_dir / 'report.json').write_text(json.dumps({**(extra or {}), 'evals': clean}, indent=1,
                                                  default=str))
  path = out_dir / 'report.md'
  path.write_text(markdown(results, title))
  return path

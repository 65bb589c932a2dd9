"""`unifer sweep --config configs/sweeps/X.py --out DIR`: one evaluator over
checkpoints x datasets x variants (prompt sets or decoding settings), one cell each.

The sweep config (see configs/sweeps/demo.py)::

  checkpoints: ['WORKDIR', 'WORKDIR@STEP', ...]   (newest checkpoint without @STEP)
  datasets:    {name: dataset spec (eval_sets)}
  evaluator:   an evals entry without its dataset: dict(type='generative', ...)
  variants:    {name: keys merged into the evaluator}, e.g. {'ferbench': {'prompt':
               'ferbench'}, 'sampled': {'decoding': {'temperature': 0.7}}}
  metrics:     the columns of the table and the plots (default: both accuracies, macro F1)

Resumable: each finished cell is written atomically to DIR/cells/<cell>.json and skipped
on a rerun (a killed sweep continues where it stopped); a failing cell is recorded with
its error and the sweep goes on (failed cells are retried on a rerun). At the end, and
after every cell, DIR holds results.csv, results.md and one PNG per metric.

Under ``launch/local.py -n N`` (or on a pod) every process runs every cell, scoring its
share of the items (item_shards); process 0 decides which cells are left and writes
every file.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

DEFAULT_METRICS = ('acc_weighted', 'acc_mean_class', 'macro_f1')


def _plain(x):
  return x.to_dict() if hasattr(x, 'to_dict') else x


def parse_checkpoint(spec: str) -> tuple[str, int | None]:
  path, sep, step = str(spec).rpartition('@')
  if not sep or not step.isdigit():
    return str(spec), None
  return path, int(step)


def _label(spec: str) -> str:
  path, step = parse_checkpoint(spec)
  name = Path(path).name or path
  return f'{name}@{step}' if step is not None else name


def cells(cfg) -> list[dict]:
  """Every (checkpoint, dataset, variant) of the config, checkpoint-major (each model
  is loaded once)."""
  for key in ('checkpoints', 'datasets', 'evaluator'):
    if not cfg.get(key):
      raise ValueError(f'sweep config: {key!r} is missing or empty')
  variants = _plain(cfg.get('variants')) or {'default': {}}
  labels = [_label(c) for c in cfg.checkpoints]
  if len(set(labels)) != len(labels):
    labels = [f'{i}_{l}' for i, l in enumerate(labels)]
  out = []
  for ckpt, label in zip(cfg.checkpoints, labels):
    for ds in _plain(cfg.datasets):
      for var in variants:
        cid = re.sub(r'[^\w.@-]+', '_', f'{label}__{ds}__{var}')
        out.append(dict(id=cid, checkpoint=str(ckpt), checkpoint_label=label, dataset=ds,
                        variant=var))
  return out


def _write_atomic(path: Path, text: str):
  tmp = path.with_suffix(path.suffix + f'.tmp{os.getpid()}')
  tmp.write_text(text)
  os.replace(tmp, path)


def _fmt_time(s: float) -> str:
  if s != s:
    return '--'
  s = int(s)
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def run(cfg, out_dir, log=print) -> list[dict]:
  """Runs the cells not finished yet; returns every cell's record."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from unifer_jax.evaluators import item_shards, model_io, registry  # pylint: disable=g-import-not-at-top
  out_dir = Path(out_dir)
  main_process = jax.process_index() == 0
  todo = cells(cfg)
  variants = _plain(cfg.get('variants')) or {'default': {}}
  base = dict(_plain(cfg.evaluator))
  metric_names = list(cfg.get('metrics') or DEFAULT_METRICS)
  # Process 0's view of the finished cells, so that every process runs the same cells
  # (the scoring is collective) even if they see the folder at different moments.
  finished = np.array([_read(out_dir, c['id']).get('status') == 'ok' for c in todo])
  if jax.process_count() > 1:
    finished = np.asarray(multihost_utils.broadcast_one_to_all(finished))
  done = {c['id'] for c, f in zip(todo, finished) if f}
  statuses = {cid: 'ok' for cid in done}
  if not main_process:   # only process 0 writes: the others run the cells silently
    log = lambda _: None
  log(f'sweep: {len(todo)} cells, {len(done)} finished before (skipped), '
      f'{len(todo) - len(done)} to run -> {out_dir}')
  if main_process:
    (out_dir / 'cells').mkdir(parents=True, exist_ok=True)
    (out_dir / 'sweep_config.json').write_text(json.dumps(_plain(cfg), indent=1, default=str))
  model, model_key = None, None
  t0, ran = time.monotonic(), 0
  remaining = len(todo) - len(done)
  for i, cell in enumerate(todo, 1):
    if cell['id'] in done:
      continue
    t = time.monotonic()
    record = dict(cell)
    try:
      if model_key != cell['checkpoint']:
        model = None   # free the previous checkpoint first
        path, step = parse_checkpoint(cell['checkpoint'])
        model = model_io.load(path, step, name=cell['checkpoint_label'])
        model_key = cell['checkpoint']
      spec = dict(base, **variants[cell['variant']], dataset=_plain(cfg.datasets)[cell['dataset']])
      evaluator = registry.build({cell['variant']: spec})[cell['variant']]
      with item_shards.counting() as tally:
        result = evaluator.run(model, None)
      print(f'sweep cell {i}/{len(todo)}: process {jax.process_index()} scored '
            f'{tally.scored} of {tally.total} items', flush=True)
      record.update(status='ok', step=model.step,
                    metrics={k: v for k, v in registry.scalars({'r': result}).items()},
                    notes=result.get('notes', []))
      record['metrics'] = {k.split('/', 1)[1]: v for k, v in record['metrics'].items()}
    except Exception as e:  # pylint: disable=broad-except  (recorded; the sweep goes on)
      record.update(status='failed', error=f'{type(e).__name__}: {e}',
                    traceback=traceback.format_exc(limit=5))
      if model_key != cell['checkpoint']:
        model, model_key = None, None
    record['seconds'] = time.monotonic() - t
    ran += 1
    statuses[cell['id']] = record['status']
    if not main_process:
      continue
    _write_atomic(out_dir / 'cells' / f'{cell["id"]}.json', json.dumps(record, indent=1, default=str))
    elapsed = time.monotonic() - t0
    eta = elapsed / ran * (remaining - ran)
    shown = (', '.join(f'{m} {record["metrics"][m]:.3f}' for m in metric_names
                       if m in record.get('metrics', {})) if record['status'] == 'ok'
             else f'FAILED {record["error"][:120]}')
    log(f'sweep cell {i}/{len(todo)} done [{cell["checkpoint_label"]} | {cell["dataset"]} | '
        f'{cell["variant"]}]: {shown} | elapsed {_fmt_time(elapsed)} | ETA {_fmt_time(eta)}')
    summarize(todo, out_dir, metric_names)
  if not main_process:   # the statuses as this process saw them (process 0 writes the table)
    return [dict(c, status=statuses[c['id']]) for c in todo]
  records = summarize(todo, out_dir, metric_names, plots=True)
  failed = [r['id'] for r in records if r.get('status') != 'ok']
  log(f'sweep: {len(records) - len(failed)}/{len(records)} cells ok'
      + (f'; failed: {failed}' if failed else '') + f' -> {out_dir / "results.md"}')
  return records


def _read(out_dir: Path, cid: str) -> dict:
  path = out_dir / 'cells' / f'{cid}.json'
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return {}


def summarize(todo: list[dict], out_dir: Path, metric_names, plots: bool = False) -> list[dict]:
  """results.csv + results.md (+ one PNG per metric) from the cell files."""
  records = [dict(c, **_read(out_dir, c['id'])) for c in todo]
  cols = ['checkpoint', 'step', 'dataset', 'variant', 'status'] + list(metric_names) + ['error']
  rows = []
  for r in records:
    row = {k: r.get(k, '') for k in ('checkpoint', 'step', 'dataset', 'variant')}
    row['status'] = r.get('status', 'pending')
    row.update({m: r.get('metrics', {}).get(m, '') for m in metric_names})
    row['error'] = r.get('error', '')
    rows.append(row)
  with open(out_dir / 'results.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
  fmt = lambda v: f'{v:.4f}' if isinstance(v, float) else str(v)
  lines = ['# sweep results', '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  lines += ['| ' + ' | '.join(fmt(row[c]).replace('|', '/')[:120] for c in cols) + ' |'
            for row in rows]
  if plots:
    from unifer_jax.evaluators import plots as plots_lib  # pylint: disable=g-import-not-at-top
    ok = [dict(r, group=f'{r["dataset"]} / {r["variant"]}',
               ckpt=r['checkpoint_label']) for r in records if r.get('status') == 'ok']
    flat = [dict(group=r['group'], ckpt=r['ckpt'], **r['metrics']) for r in ok]
    lines.append('')
    for m in metric_names:
      if any(m in r for r in flat):
        png = plots_lib.plot_grouped_bars(flat, m, 'group', 'ckpt', out_dir / f'sweep_{m}.png')
        lines.append(f'![{m}]({png.name})')
  _write_atomic(out_dir / 'results.md', '\n'.join(lines) + '\n')
  return records


def main(args) -> int:
  from unifer_jax import config_lib, distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  try:
    cfg = config_lib.load(args.config, args.overrides)
    records = run(cfg, args.out, log=lambda s: print(s, flush=True))
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'unifer sweep: {e}', file=sys.stderr)
    return 2
  return 0 if all(r.get('status') == 'ok' for r in records) else 1

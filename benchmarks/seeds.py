"""The demo's stage set over seeds: every report.json figure as mean, sd and min.

  python benchmarks/seeds.py --seeds 3 --out DIR [--size 20000] [--preset demo]
      [--stages lm vision align generate instruct] [--set STAGE:key=value ...]

For seed s (0 .. N-1) it runs ``demo.run`` into DIR/seed_s with ``--config.seed=s`` (init,
dropout, ITM's negatives) and ``--config.input.seed=s`` (data order, augmentation) in every
training stage, distill included; the corpus and tokenizer are the same for all seeds (made
once in DIR/seed_0, linked into the others). A seed whose report.json exists is reused,
a partial one resumes (the demo resumes its stages). ``--set all:key=value`` overrides a
key in every stage but distill, ``--set align:key=value`` in one stage.

Writes DIR/seeds.json ({figure: {mean, sd, min, max, n, values}}, every numeric figure of
report.json, nested ones as 'a.b'), DIR/seeds.md (the same as a table) and DIR/seeds.png
(the figures on a 0..1 scale: each seed a dot, mean +- sd a bar).
On the 2-core CPU one demo seed takes ~20 min; 3 seeds about an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from unifer_jax import demo  # noqa: E402

# Figures first in the table and the PNG (the must-show), then the rest by name.
HEADLINE = ('zero_shot_acc', 'retrieval_r1', 'retrieval_i2t_r1', 'retrieval_t2i_r1', 'itm_acc',
            'vision_basic_acc', 'vision_compound_acc', 'instruct_basic_acc',
            'instruct_compound_acc', 'student_teacher_agreement')


def flatten(report: dict, prefix: str = '') -> dict:
  """{'a.b': float} for every number in the report (lists -- confusion matrices -- and
  booleans left out)."""
  out = {}
  for k, v in report.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '.'))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[key] = float(v)
  return out


def summarise(reports: list[dict]) -> dict:
  """{figure: {mean, sd, min, max, n, values}}; sd is the sample sd (0 for one seed). A
  figure missing from some seed's report is summarised over the seeds that have it."""
  flat = [flatten(r) for r in reports]
  keys = sorted({k for f in flat for k in f},
                key=lambda k: (HEADLINE.index(k) if k in HEADLINE else len(HEADLINE), k))
  out = {}
  for k in keys:
    v = np.asarray([f[k] for f in flat if k in f])
    out[k] = {'mean': float(v.mean()), 'sd': float(v.std(ddof=1)) if len(v) > 1 else 0.0,
              'min': float(v.min()), 'max': float(v.max()), 'n': int(len(v)),
              'values': v.tolist()}
  return out


def markdown(summary: dict, seeds: list[int]) -> str:
  lines = [f'# demo figures over seeds {seeds}', '',
           '| figure | mean | sd | min | max | n |', '|---|---|---|---|---|---|']
  for k, s in summary.items():
    lines.append(f'| {k} | {s["mean"]:.4g} | {s["sd"]:.3g} | {s["min"]:.4g} | {s["max"]:.4g} '
                 f'| {s["n"]} |')
  return '\n'.join(lines) + '\n'


def plot(summary: dict, out: Path) -> Path:
  """Every figure on a 0..1 scale (accuracies, agreement, recall, F1, CCC): dots per seed,
  mean +- sd as a bar."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = [k for k, s in summary.items()
          if '.' not in k and 0.0 <= s['min'] and s['max'] <= 1.0 and not k.endswith('_n')]
  fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(keys) + 1), 4))
  x = np.arange(len(keys))
  ax.bar(x, [summary[k]['mean'] for k in keys], yerr=[summary[k]['sd'] for k in keys],
         color='#9ecae1', capsize=3)
  for i, k in enumerate(keys):
    vals = summary[k]['values']
    ax.plot(np.full(len(vals), i), vals, 'k.', ms=4)
  ax.set_xticks(x, keys, rotation=60, ha='right', fontsize=7)
  ax.set_ylim(0, 1)
  ax.set_title(f'demo figures: mean +- sd over {max(s["n"] for s in summary.values())} seeds')
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def stage_overrides(seed: int, stages, sets) -> dict:
  """{stage: ['--config.key=value', ...]}: the seed in every stage, then ``--set``s."""
  out = {s: [f'--config.seed={seed}', f'--config.input.seed={seed}'] for s in (*stages, 'distill')}
  for item in sets:
    stage, sep, kv = item.partition(':')
    if not sep or '=' not in kv or (stage not in out and stage != 'all'):
      raise ValueError(f'--set {item!r}: expected STAGE:key=value, STAGE one of '
                       f'{["all", *out]}')
    for s in (stages if stage == 'all' else (stage,)):
      out[s].append('--config.' + kv.removeprefix('--').removeprefix('config.'))
  return out


def run(out: Path, seeds: int, size: int, preset: str, stages, sets, eval_limit: int,
        max_per_task: int) -> dict:
  out = Path(out).absolute()
  reports = []
  for seed in range(seeds):
    w = out / f'seed_{seed}'
    if (w / 'report.json').is_file():
      reports.append(json.loads((w / 'report.json').read_text()))
      print(f'seed {seed}: reusing {w / "report.json"}', flush=True)
      continue
    w.mkdir(parents=True, exist_ok=True)
    if seed:   # the same corpus and tokenizer for every seed
      for part in ('data', 'tokenizer'):
        if not (w / part).exists():
          (w / part).symlink_to(out / 'seed_0' / part, target_is_directory=True)
    reports.append(demo.run(w, size, stage_overrides(seed, stages, sets), eval_limit,
                            max_per_task, preset=preset, stages=tuple(stages)))
  summary = summarise(reports)
  (out / 'seeds.json').write_text(json.dumps(summary, indent=1))
  (out / 'seeds.md').write_text(markdown(summary, list(range(seeds))))
  plot(summary, out / 'seeds.png')
  return summary


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--out', required=True, help='scratch directory for the runs (not the repo)')
  p.add_argument('--size', type=int, default=20000, help='corpus size (the demo: 20000)')
  p.add_argument('--preset', default='demo', help="the stage configs' argument")
  p.add_argument('--stages', nargs='+', default=list(demo.STAGES), choices=list(demo.STAGES))
  p.add_argument('--set', action='append', default=[], dest='sets',
                 help='STAGE:key=value (STAGE: all, a stage, or distill); repeatable')
  p.add_argument('--eval_limit', type=int, default=1000)
  p.add_argument('--max_per_task', type=int, default=400)
  args = p.parse_args(argv)
  if args.seeds < 1:
    p.error('--seeds must be >= 1')
  summary = run(Path(args.out), args.seeds, args.size, args.preset, args.stages, args.sets,
                args.eval_limit, args.max_per_task)
  print(markdown(summary, list(range(args.seeds))), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())

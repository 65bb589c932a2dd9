"""`unifer eval --config ... --workdir DIR [--step N]`: the evaluators of a config's
``evals`` on one checkpoint of a training workdir; report.md / report.json / PNGs in
the workdir (DESIGN.md's contract).

The model (architecture, tokenizer, preprocessing) always comes from the workdir's own
config.json -- it is what the checkpoint was trained as; ``--config`` supplies only
``evals`` (a training config, or an eval-only one). Without ``--config`` the evals of
the workdir's config are run. Exit 1 if any evaluator failed (the others still run).
"""

from __future__ import annotations

import sys
import time


def main(args, overrides) -> int:
  from unifer_jax import config_lib, distributed, workdirs  # pylint: disable=g-import-not-at-top
  from unifer_jax.evaluators import model_io, registry, report  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  main_process = distributed.is_main()
  workdir = workdirs.path(args.workdir)   # a folder or a URL (gs://BUCKET/run)
  try:
    train_cfg = model_io.read_config(workdir)
  except FileNotFoundError as e:
    print(f'unifer eval: {e}', file=sys.stderr)
    return 2
  evals_cfg = (config_lib.load(args.config, overrides) if args.config else train_cfg).get('evals')
  if not evals_cfg:
    where = args.config or workdir / 'config.json'
    print(f'unifer eval: {where} has no evals (config.evals = dict(name=dict(type=..., ...)); '
          f'types: {sorted(registry.EVALUATORS)})', file=sys.stderr)
    return 2
  try:
    evaluators = registry.build(evals_cfg)
  except ValueError as e:
    print(f'unifer eval: {args.config or workdir / "config.json"}: {e}', file=sys.stderr)
    return 2
  t = time.monotonic()
  try:
    model = model_io.load(workdir, args.step, train_cfg)
  except FileNotFoundError as e:
    print(f'unifer eval: {e}', file=sys.stderr)
    return 2
  if main_process:
    print(f'unifer eval: {model.name} (step {model.step}), {len(evaluators)} evaluator(s)',
          flush=True)
  results = registry.run(evaluators, model, workdir, log=lambda s: print(s, flush=True))
  failed = [n for n, r in results.items() if 'error' in r]
  if main_process:
    path = report.write(results, workdir, f'unifer eval: {workdir} at step {model.step}',
                        extra={'workdir': str(workdir), 'step': model.step,
                               'config': args.config or str(workdir / 'config.json'),
                               'wall_s': time.monotonic() - t})
    print(f'unifer eval: report {path}' + (f'; FAILED: {failed}' if failed else ''), flush=True)
  return 1 if failed else 0

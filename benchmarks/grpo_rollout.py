"""GRPO's step on the demo model: rollout tokens/s and the split of a step between
sampling and the update, in one run.

  python benchmarks/grpo_rollout.py --workdir W [--steps 6] [--config.key=value ...]

W is a demo workdir holding data/, tokenizer/ and instruct/ (``unifer demo``, or its
stages up to instruct). Runs ``configs/grpo.py:demo`` from W/instruct for ``--steps``
steps in a temporary workdir with the trainer itself (train/loop.py), then reads the
per-step record of every step after the first (compiles): the rollout's seconds (G
completions per prompt sampled with the KV cache, the reference's log-probabilities,
rewards on the host), the update's (the compiled train step), the tokens sampled per
second of rollout, and the update's throughput over the same completion tokens.

Prints numbers and ratios; asserts nothing. Figures of the day are in the report of
issue 29 (2-core CPU shared with other jobs: absolute times move with the load, the
shares less).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from unifer_jax import config_lib  # noqa: E402
from unifer_jax.train import loop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='demo workdir: data/, tokenizer/, instruct/')
  p.add_argument('--steps', type=int, default=6)
  args, overrides = p.parse_known_args(argv)
  w = Path(args.workdir).absolute()
  config = config_lib.load(str(REPO / 'configs' / 'grpo.py') + ':demo', [
      f'--config.init.checkpoint={w / "instruct"}', f'--config.input.data_dir={w / "data"}',
      f'--config.input.tokenizer={w / "tokenizer"}', f'--config.total_steps={args.steps}',
      '--config.checkpoint.every_steps=1000'] + overrides)
  g = config.grpo
  with tempfile.TemporaryDirectory() as tmp:
    loop.train(config, tmp)
    recs = [json.loads(l) for l in (Path(tmp) / 'metrics.jsonl').read_text().splitlines()]
  recs = recs[1:]   # the first step compiles the rollout and the update
  mean = lambda k: float(np.mean([r[k] for r in recs]))
  rollout, update, step = mean('rollout_s'), mean('update_s'), mean('step_time_s')
  completions = config.input.batch_size * g.group_size
  tokens = mean('response_len') * completions
  print(f'\n{config.input.batch_size} prompts x G={g.group_size} completions, up to '
        f'{g.max_new_tokens} new tokens (mean {mean("response_len"):.1f}), mu='
        f'{g.updates_per_batch}; steps 2..{args.steps}:')
  print(f'  step        {step:7.2f} s')
  print(f'  rollout     {rollout:7.2f} s  ({rollout / step:.0%} of the step): '
        f'{mean("rollout_tokens_per_s"):.0f} sampled tokens/s')
  print(f'  update      {update:7.2f} s  ({update / step:.0%}): {tokens / update:.0f} '
        f'completion tokens/s through forward + backward x mu')
  print(f'  rollout / update = {rollout / update:.2f}')


if __name__ == '__main__':
  main()

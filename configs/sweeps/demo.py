r"""Sweep over the `unifer demo` workdir: FERBench-protocol generative answers of the
generate-stage and the instruct-stage checkpoints, on the corpus' held-out split scored
with RAF-DB's 7 candidate words and with AffectNet's 8, asked with the published
FERBench prompt and with the open-vocabulary phrasing training used (2 x 2 x 2 cells).

  unifer demo --workdir workdir/demo
  unifer sweep --config configs/sweeps/demo.py:workdir/demo --out workdir/demo/sweep

Writes workdir/demo/sweep/{results.csv,results.md,sweep_*.png,cells/}; a rerun skips
finished cells, a killed run continues. Expected (not yet measured on a finished demo
run on this machine): the generate-stage model, never instruction-tuned, names no
candidate (unknown_rate near 1, accuracy near 0); the instruct model is well above
chance (1/7, 1/8) with the training phrasing, where instruct.py's docstring expects
>= 0.85 basic accuracy, and lower with the unseen FERBench prompt. About 1-3 min per
cell on 2 CPU cores (300 faces, 64 new tokens).
Arg: the demo workdir (default workdir/demo).
"""

import ml_collections


def get_config(arg: str = 'workdir/demo'):
  root = arg or 'workdir/demo'
  c = ml_collections.ConfigDict()
  c.checkpoints = [f'{root}/generate', f'{root}/instruct']
  c.datasets = dict(
      corpus_rafdb=dict(type='tfds', split='test', limit=300, protocol='rafdb'),
      corpus_affectnet=dict(type='tfds', split='test', limit=300, protocol='affectnet'),
  )
  c.evaluator = dict(type='generative', decoding=dict(max_new_tokens=64), batch_size=32)
  c.variants = dict(ferbench_prompt=dict(prompt='ferbench'), train_prompt=dict(prompt='train'))
  c.metrics = ['acc_weighted', 'acc_mean_class', 'macro_f1', 'unknown_rate']
  return c

"""benchmarks/train_step.py runs end to end at tiny dims -- the trainer's step, its
matmul-only bound and HF PyTorch's Blip2 + Llama step, one step each -- so the
benchmark cannot rot while the model and the trainer move under it."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

# benchmarks/ is no package.
_spec = importlib.util.spec_from_file_location(
    'train_step_bench', Path(__file__).resolve().parents[1] / 'benchmarks' / 'train_step.py')
train_step = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # (dataclasses)
_spec.loader.exec_module(train_step)


def test_tiny_dims_print_one_full_table(capsys):
  rows = train_step.main(['--dims', 'tiny', '--iters', '1', '--hf_iters', '1'])
  out = capsys.readouterr().out
  (row,) = rows
  for key in ('ours_s', 'bound_s', 'hf_s', 'gflop', 'peak_gflops'):
    assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
  assert row['xla_threads'] >= 1
  # Random init on both sides: the loss on random answer tokens is about ln(vocab).
  vocab = train_step.state_lib.model_config(train_step.tiny_config()).llm.vocab_size
  for key in ('loss', 'hf_loss'):
    assert abs(row[key] - math.log(vocab)) < 1.0, (key, row[key])
  # Real and padded tokens of the batch the step ran on.
  batch = train_step.random_batch(train_step.tiny_config())
  b, t = batch['tokens'].shape
  lengths = batch['attention_mask'].sum(1)
  assert row['padded_tokens'] == b * t and row['real_tokens'] == lengths.sum()
  assert np.all((lengths >= t // 3) & (lengths <= 2 * t // 3))
  assert np.all(batch['loss_mask'].sum(1) == t // 4)
  assert np.all(batch['tokens'][batch['attention_mask'] == 0] == 0)
  # ONE table: the header with every column, one row per dims with a cell for each.
  lines = out.splitlines()
  header = '| ' + ' | '.join(train_step.COLUMNS) + ' |'
  assert lines.count(header) == 1, out
  cells = [c.strip() for c in lines[lines.index(header) + 2].strip('|').split('|')]
  assert len(cells) == len(train_step.COLUMNS) and cells[0] == 'tiny', cells
  assert '-' not in cells[4:6], cells   # the HF columns are filled
  assert cells[6] == f'{row["real_tokens"]} / {b * t} ({row["real_tokens"] / (b * t):.0%})'
  assert 'XLA CPU threads' in out and 'best of 7' in out


def test_demo_and_reference_dims_build():
  """The full dims are too slow to step here; their models must still build (the conv
  stem of the demo preset once broke --dims reference at construction)."""
  from unifer_jax import sharding
  for name in ('demo', 'reference'):
    config = train_step.DIMS[name].config()
    setup = train_step.state_lib.build(config, sharding.make_mesh(dict(config.mesh)))
    m = setup.model_cfg
    assert config.model.lora.rank == train_step.LORA_RANK and config.input.batch_size == 32
    batch = train_step.random_batch(config)
    assert batch['image'].shape[1] == m.vit.image_size
  # The reference dims.
  described = train_step.describe(train_step.reference_config())
  for part in ('ViT 6x256', 'at 112 px /16;', 'Q-Former 4x256', '32 queries', 'LLM 6x384',
               'vocab 4096', 'batch 32'):
    assert part in described, described

"""benchmarks/seeds.py: the demo's stages over seeds into one table (mean, sd, min) and a
PNG -- here 2 seeds of the align stage at tiny dims, a few steps each."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _seeds_module():
  spec = importlib.util.spec_from_file_location('seeds_bench', REPO / 'benchmarks' / 'seeds.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TINY = ['all:model.llm.vocab_size=2048', 'all:model.qformer.vocab_size=2048',
        'all:total_steps=3', 'all:log_every_steps=1', 'all:checkpoint.every_steps=3',
        'all:checkpoint.async_save=False', 'all:input.batch_size=8', 'align:input.text_len=64']


def test_two_tiny_seeds_give_a_table_of_every_report_figure(tmp_path):
  seeds = _seeds_module()
  summary = seeds.run(tmp_path, 2, 120, 'tiny', ['align'], TINY, eval_limit=48,
                      max_per_task=8)
  reports = [json.loads((tmp_path / f'seed_{s}' / 'report.json').read_text()) for s in (0, 1)]
  # Two different runs (init and data order), the same corpus.
  assert (tmp_path / 'seed_1' / 'data').resolve() == (tmp_path / 'seed_0' / 'data').resolve()
  assert reports[0]['align_final']['loss'] != reports[1]['align_final']['loss']
  for key in ('zero_shot_acc', 'itm_acc', 'retrieval_r1', 'retrieval_i2t_r1', 'retrieval_t2i_r1',
              'align_final.loss', 'timings.align_s'):
    s = summary[key]
    flat = [seeds.flatten(r)[key] for r in reports]
    assert s['n'] == 2 and s['values'] == flat
    assert s['mean'] == pytest.approx(sum(flat) / 2)
    assert s['min'] == min(flat)
    assert s['sd'] == pytest.approx(abs(flat[0] - flat[1]) / 2 ** 0.5)
  assert 'zero_shot_confusion' not in summary   # lists are not figures
  table = (tmp_path / 'seeds.md').read_text()
  assert '| itm_acc |' in table and '| align_final.loss |' in table
  assert json.loads((tmp_path / 'seeds.json').read_text()).keys() == summary.keys()
  assert (tmp_path / 'seeds.png').read_bytes()[:4] == b'\x89PNG'
  # A finished seed is read back, not rerun.
  again = seeds.run(tmp_path, 2, 120, 'tiny', ['align'], TINY, eval_limit=48,
                    max_per_task=8)
  assert again == summary


def test_set_names_a_stage_and_a_key():
  seeds = _seeds_module()
  got = seeds.stage_overrides(4, ['vision', 'align'], ['all:total_steps=3', 'align:seed=9'])
  assert got['vision'] == ['--config.seed=4', '--config.input.seed=4', '--config.total_steps=3']
  assert got['align'][-1] == '--config.seed=9' and got['distill'] == got['distill'][:2]
  with pytest.raises(ValueError, match='STAGE:key=value'):
    seeds.stage_overrides(0, ['align'], ['instruct:total_steps=3'])

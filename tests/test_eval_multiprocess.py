"""Evaluation on every process (issue 31, item 1), through the real commands under
`launch/local.py -n 2` (2 processes x 4 CPU devices, gloo collectives):

* `unifer eval` writes the report.json one process writes (same items, same answers,
  metrics equal to 1e-6), each process having scored half of the items;
* a 2-process `unifer train` with config.evals logs the eval metrics in metrics.jsonl;
* a 2-process `unifer sweep` killed with -9 finishes on a rerun.

The workdir is tests/workdir_util's (tiny instruct model, random weights, 120 faces).
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from unifer_jax import cli, config_lib

import test_train
import workdir_util

REPO = Path(__file__).resolve().parents[1]
UNIFER = [sys.executable, '-m', 'unifer_jax.cli']
LOCAL = [sys.executable, str(REPO / 'launch' / 'local.py'), '-n', '2', '--']


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  w = workdir_util.instruct_workdir(tmp_path_factory.mktemp('evals'))
  return dict(w, ferbench=workdir_util.ferbench_items(w))


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Two processes x 4 devices, with a compilation cache of their own (see
  test_train._env: a 1 x 8 executable must not be loaded by a 2 x 4 job)."""
  cache = tmp_path_factory.mktemp('two_process_jax_cache')
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
              XLA_FLAGS=test_train.xla_flags(8), JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def _run(cmd, env, timeout=600) -> str:
  done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
  return done.stdout


def _scored(out: str, name: str) -> dict[int, tuple[int, int]]:
  """{process: (scored, total)} from the `eval NAME: process i scored n of N items` lines."""
  found = {}
  for line in out.splitlines():
    words = line.split()
    if f'eval {name}: process' in line and 'scored' in words:
      i = words.index('scored')
      found[int(words[i - 1])] = (int(words[i + 1]), int(words[i + 3]))
  return found


def _numbers(tree, path=''):
  """Every number of a report, by its path (run times left out)."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k not in ('seconds', 'wall_s'):
        yield from _numbers(v, f'{path}/{k}')
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _numbers(v, f'{path}[{i}]')
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, float(tree)


@pytest.mark.multiprocess
def test_two_process_eval_writes_the_one_process_report(workdir, env, tmp_path, capsys):
  fb = workdir['ferbench']
  cfg = tmp_path / 'evals.py'
  cfg.write_text(f'''import ml_collections
def get_config(arg=''):
  return ml_collections.ConfigDict(dict(evals=dict(
      zs=dict(type='zero_shot'),
      raf=dict(type='generative', dataset=dict(type='ferbench', items={fb['items']!r},
               image_root={fb['image_root']!r}), decoding=dict(max_new_tokens=6), batch_size=8),
      lik=dict(type='likelihood', val={{}}),
  )))
''')
  w = workdir['workdir']
  args = ['eval', '--config', str(cfg), '--workdir', str(w), '--step', '2']
  assert cli.main(args) == 0                       # one process, 8 devices (this one)
  one = json.loads((w / 'report.json').read_text())
  one_answers = (w / 'raf_answers.jsonl').read_text()
  assert _scored(capsys.readouterr().out, 'raf') == {0: (fb['n'], fb['n'])}
  for f in ('report.json', 'report.md', 'raf_answers.jsonl'):
    (w / f).unlink()

  out = _run(LOCAL + UNIFER + args, env)           # two processes x 4 devices
  two = json.loads((w / 'report.json').read_text())
  assert (w / 'raf_answers.jsonl').read_text() == one_answers     # same items, same answers
  assert len(one_answers.splitlines()) == fb['n'] == two['evals']['raf']['n']
  a, b = dict(_numbers(one['evals'])), dict(_numbers(two['evals']))
  assert a.keys() == b.keys() and len(a) > 100
  off = {k: (a[k], b[k]) for k in a
         if not (a[k] == b[k] or math.isclose(a[k], b[k], abs_tol=1e-6)
                 or (math.isnan(a[k]) and math.isnan(b[k])))}
  assert not off, off
  for name, n in (('raf', fb['n']), ('lik', two['evals']['lik']['n'])):
    scored = _scored(out, name)
    assert sorted(scored) == [0, 1] and sum(s for s, _ in scored.values()) == n, (name, scored)
    assert all(abs(s - n / 2) <= 1 and total == n for s, total in scored.values()), (name, scored)
  assert out.count('unifer eval: report') == 1     # written once, by process 0


@pytest.mark.multiprocess
def test_two_process_train_logs_eval_metrics(workdir, env, tmp_path):
  config = workdir['config'].copy_and_resolve_references()
  config.total_steps, config.log_every_steps, config.checkpoint.every_steps = 2, 1, 2
  config.freeze = '^(?!llm_proj/)'   # the step compiles in 2/3 of the time; evals see it all
  config.evals = dict(zs=dict(type='zero_shot', every_steps=2, val={}))
  (tmp_path / 'config.json').write_text(config_lib.to_json(config))
  (tmp_path / 'config.py').write_text(
      'import json, ml_collections\n\n\ndef get_config(arg=""):\n  return ml_collections.'
      f'ConfigDict(json.loads(open({str(tmp_path / "config.json")!r}).read()))\n')
  train = tmp_path / 'train'
  out = _run(LOCAL + UNIFER + ['train', '--config', str(tmp_path / 'config.py'),
                               '--workdir', str(train)], env)
  assert 'over 8 devices, 2 process(es)' in out
  records = [json.loads(l) for l in (train / 'metrics.jsonl').read_text().splitlines()]
  evals = [r for r in records if 'eval/zs/acc_weighted' in r]
  assert [r['step'] for r in evals] == [2], records
  assert 0 <= evals[0]['eval/zs/acc_weighted'] <= 1
  n = int(evals[0]['eval/zs/n'])
  scored = _scored(out, 'zs')
  assert sorted(scored) == [0, 1] and sum(s for s, _ in scored.values()) == n, scored
  assert (train / 'evals' / 'step_2' / 'zs_confusion.png').stat().st_size > 0


@pytest.mark.multiprocess
def test_two_process_sweep_resumes_after_kill9(workdir, env, tmp_path):
  w, fb = workdir['workdir'], workdir['ferbench']
  cfg = tmp_path / 'sweep.py'
  cfg.write_text(f'''import ml_collections
def get_config(arg=''):
  return ml_collections.ConfigDict(dict(
      checkpoints=['{w}@1', '{w}@2'],
      datasets=dict(ferbench=dict(type='ferbench', items={fb['items']!r},
                                  image_root={fb['image_root']!r})),
      evaluator=dict(type='zero_shot', val={{}}),
      variants=dict(short=dict(templates=['a {{}} face.']),
                    pair=dict(templates=['a {{}} face.', 'the expression is {{}}.'])),
  ))
''')
  out = tmp_path / 'out'
  cmd = LOCAL + UNIFER + ['sweep', '--config', str(cfg), '--out', str(out)]
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if 'sweep cell 2/4 done' in line:       # half-way: kill -9 every process, no clean-up
      os.killpg(proc.pid, signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, ''.join(seen)[-4000:]
  finished = len(list((out / 'cells').glob('*.json')))
  assert 2 <= finished < 4
  log = _run(cmd, env)
  assert f'sweep: 4 cells, {finished} finished before (skipped), {4 - finished} to run' in log
  rows = (out / 'results.csv').read_text().splitlines()
  assert len(rows) == 5 and all(',ok,' in r for r in rows[1:]), rows
  scored = [l for l in log.splitlines() if 'process 1 scored' in l]
  assert len(scored) == 4 - finished and all(f'of {fb["n"]} items' in l for l in scored), log

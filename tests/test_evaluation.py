"""The evaluators on real (tiny, untrained) checkpoints over the built-in corpus:
`unifer eval` writing the workdir report, the in-training hook, `unifer sweep` over
2 checkpoints x 2 datasets x 2 prompt sets (rerun skips, a failing cell is recorded, a
killed sweep completes on rerun), and `unifer predict` on a real photo.

One module-scoped workdir: a 120-face corpus, its BPE, and two checkpoints of the tiny
preset (two random initialisations, saved the way the trainer saves them)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unifer_jax import cli
from unifer_jax.evaluators import model_io, registry

import workdir_util

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return workdir_util.instruct_workdir(tmp_path_factory.mktemp('evals'))


@pytest.fixture(scope='module')
def ferbench_items(workdir):
  """The corpus' test faces as a FERBench-format item file + PNGs, plus one item whose
  image is missing."""
  written = workdir_util.ferbench_items(workdir)
  items = json.loads(Path(written['items']).read_text())
  items.append(dict(items[0], image_path='/images/not_there.png'))
  Path(written['items']).write_text(json.dumps(items))
  return written


def write_config(path: Path, body: str) -> str:
  path.write_text('import ml_collections\n\n\ndef get_config(arg=""):\n'
                  '  return ml_collections.ConfigDict(' + body + ')\n')
  return str(path)


def test_unifer_eval_writes_the_workdir_report(workdir, ferbench_items, tmp_path, capsys):
  cfg = write_config(tmp_path / 'evals.py', f"""dict(evals=dict(
      zs=dict(type='zero_shot'),
      raf=dict(type='generative', dataset=dict(type='ferbench', items={ferbench_items['items']!r},
               image_root={ferbench_items['image_root']!r}), decoding=dict(max_new_tokens=6),
               batch_size=8),
      probe=dict(type='linear_probe', C=0.5),
      lik=dict(type='likelihood'),
      ret=dict(type='retrieval', ks=[1, 5]),
      broken=dict(type='zero_shot', templates=['no placeholder']),
  ))""")
  w = workdir['workdir']
  assert cli.main(['eval', '--config', cfg, '--workdir', str(w), '--step', '1']) == 1
  out = capsys.readouterr()
  assert "FAILED: ['broken']" in out.out
  assert f"1 of {ferbench_items['n'] + 1} images missing" in out.out
  assert (w / 'raf_missing_images.txt').read_text().strip().endswith('images/not_there.png')
  report = json.loads((w / 'report.json').read_text())
  assert report['step'] == 1
  ev = report['evals']
  for name in ('zs', 'raf', 'probe', 'lik'):
    r = ev[name]
    assert 0 <= r['acc_weighted'] <= 1 and 0 <= r['acc_mean_class'] <= 1
    assert np.asarray(r['confusion']).sum() == r['n']
    assert (w / f'{name}_confusion.png').stat().st_size > 0
  assert ev['raf']['n'] == ferbench_items['n']          # the missing image was skipped
  assert ev['zs']['calibration']['temperature'] > 0     # fitted on the validation split
  assert ev['lik']['calibration']['temperature'] > 0
  assert (w / 'zs_reliability.png').exists() and (w / 'raf_answers.jsonl').exists()
  assert 0 <= ev['ret']['i2t_r1'] <= ev['ret']['i2t_r5'] <= 1
  assert 'lack the {} for the label word' in ev['broken']['error']
  md = (w / 'report.md').read_text()
  assert 'accuracy, weighted (correct / all)' in md and 'accuracy, mean over classes' in md
  assert 'images missing' in md and '![zs_reliability.png](zs_reliability.png)' in md


def test_in_training_hook_runs_what_is_due(workdir):
  config = workdir['config'].copy_and_resolve_references()
  config.evals = dict(zs=dict(type='zero_shot', every_steps=2, val={}),
                      never=dict(type='zero_shot', every_steps=0))
  hook = registry.InTraining(config, workdir['setup'], workdir['root'] / 'train')
  assert hook.run(1, None) == {}                        # not due: nothing computed
  params = model_io.load(workdir['workdir'], 2).params
  metrics = hook.run(2, params)
  assert set(metrics) >= {'eval/zs/acc_weighted', 'eval/zs/acc_mean_class', 'eval/zs/calibration_ece'}
  assert not any(k.startswith('eval/never') for k in metrics)
  assert (workdir['root'] / 'train' / 'evals' / 'step_2' / 'zs_confusion.png').exists()


def test_sampled_answers_and_the_rl_headroom(workdir):
  """The sampled answers GRPO's rollouts score: at a vanishing temperature every sample is
  the greedy answer; at 1.0 a group's answers differ and the seed reproduces them; the
  headroom figures are those of the answers (the label FERBench extraction reads)."""
  from unifer_jax.evaluators import data as eval_data, instruct  # pylint: disable=g-import-not-at-top
  model = model_io.load(workdir['workdir'], 2)
  data = eval_data.load_split(model.input_cfg, 'test', model.image_size, limit=12)
  keep = np.flatnonzero(data['expression'] >= 0)[:6]    # faces with a basic label
  data = {k: data[k][keep] for k in ('image', 'expression', 'compound')}
  ask = lambda **kw: instruct.answers(model.graphdef, model.params, data['image'], 'basic',
                                      model.tokenizer, batch_size=4, **kw)
  greedy = ask()
  assert ask(temperature=1e-6, samples=3) == [t for t in greedy for _ in range(3)]
  sampled = ask(temperature=1.0, samples=3, seed=5)
  assert len(sampled) == 18 and sampled == ask(temperature=1.0, samples=3, seed=5)
  assert any(len(set(sampled[i:i + 3])) > 1 for i in range(0, 18, 3))
  r = instruct.sampling_headroom(model.graphdef, model.params, data, model.tokenizer,
                                 tasks=('basic',), samples=3, seed=5, batch_size=4)
  truth = np.asarray([instruct_label(data, i) for i in range(6)])
  hits = np.asarray([ferbench_label(t) for t in sampled]).reshape(6, 3) == truth[:, None]
  assert r['basic_n'] == 6 and r['basic_sampled'] == hits.mean()
  assert r['basic_pass@3'] == hits.any(1).mean() and r['basic_all_right'] == hits.all(1).mean()
  assert r['basic_greedy'] == np.mean([ferbench_label(t) for t in greedy] == truth)
  assert r['basic_greedy'] == instruct.ferbench_scores(
      model.graphdef, model.params, data, model.tokenizer, ('basic',), batch_size=4)['basic_acc']


def instruct_label(data, i):
  from unifer_jax.data import labels  # pylint: disable=g-import-not-at-top
  return labels.BASIC[data['expression'][i]]


def ferbench_label(text):
  from unifer_jax.data import labels  # pylint: disable=g-import-not-at-top
  from unifer_jax.evaluators import ferbench  # pylint: disable=g-import-not-at-top
  return ferbench.extract_label(text, labels.BASIC)


def sweep_config(tmp_path: Path, workdir, ferbench_items, extra_dataset: str = '') -> str:
  w = workdir['workdir']
  return write_config(tmp_path / 'sweep.py', f"""dict(
      checkpoints=['{w}@1', '{w}@2'],
      datasets=dict(corpus=dict(type='tfds', split='test',     # open vocabulary: any words
                                labels=['joyful', 'sorrowful', 'furious', 'calm', 'astonished']),
                    ferbench=dict(type='ferbench', items={ferbench_items['items']!r},
                                  image_root={ferbench_items['image_root']!r}){extra_dataset}),
      evaluator=dict(type='zero_shot', val={{}}),
      variants=dict(short=dict(templates=['a {{}} face.']),
                    ensemble=dict(templates=['a {{}} face.', 'a photo of a {{}} person.',
                                             'the expression is {{}}.'])),
  )""")


def test_sweep_resumes_records_failures_and_writes_results(workdir, ferbench_items, tmp_path, capsys):
  cfg = sweep_config(tmp_path, workdir, ferbench_items)
  out = tmp_path / 'out'
  assert cli.main(['sweep', '--config', cfg, '--out', str(out)]) == 0
  log = capsys.readouterr().out
  assert 'sweep: 8 cells, 0 finished before (skipped), 8 to run' in log
  assert 'sweep cell 8/8 done' in log and 'ETA' in log
  rows = (out / 'results.csv').read_text().splitlines()
  assert len(rows) == 9 and all(',ok,' in r for r in rows[1:])
  cells = [json.loads(p.read_text()) for p in sorted((out / 'cells').glob('*.json'))]
  by = {(c['checkpoint_label'], c['dataset'], c['variant']): c['metrics'] for c in cells}
  # The two checkpoints are different models, the two prompt sets different prompts.
  assert by[('instruct@1', 'corpus', 'short')] != by[('instruct@2', 'corpus', 'short')]
  assert by[('instruct@1', 'corpus', 'short')] != by[('instruct@1', 'corpus', 'ensemble')]
  assert (out / 'sweep_acc_weighted.png').exists()
  assert f"| {workdir['workdir']}@2 | 2 | ferbench | ensemble | ok |" in (out / 'results.md').read_text()
  # Rerun: all 8 skipped, nothing recomputed.
  stamp = {p.name: p.stat().st_mtime_ns for p in (out / 'cells').glob('*.json')}
  assert cli.main(['sweep', '--config', cfg, '--out', str(out)]) == 0
  assert 'sweep: 8 cells, 8 finished before (skipped), 0 to run' in capsys.readouterr().out
  assert stamp == {p.name: p.stat().st_mtime_ns for p in (out / 'cells').glob('*.json')}
  # A dataset that cannot load fails its cells, recorded; the others still run.
  cfg = sweep_config(tmp_path, workdir, ferbench_items,
                     ", gone=dict(type='ferbench', items='/nonexistent/rafdb_qa.json')")
  assert cli.main(['sweep', '--config', cfg, '--out', str(out)]) == 1
  log = capsys.readouterr().out
  assert 'sweep: 12 cells, 8 finished before (skipped), 4 to run' in log
  assert log.count('FAILED FileNotFoundError') == 4
  failed = [r for r in (out / 'results.csv').read_text().splitlines() if ',failed,' in r]
  assert len(failed) == 4 and all('/nonexistent/rafdb_qa.json' in r for r in failed)


def test_killed_sweep_completes_on_rerun(workdir, ferbench_items, tmp_path, capsys):
  cfg = sweep_config(tmp_path, workdir, ferbench_items)
  out = tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=str(REPO))
  with open(tmp_path / 'stderr.txt', 'w') as err:
    proc = subprocess.Popen([sys.executable, '-m', 'unifer_jax.cli', 'sweep', '--config', cfg,
                             '--out', str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=err, text=True)
    for line in proc.stdout:
      if 'sweep cell 4/8 done' in line:     # half-way: kill -9, no chance to clean up
        os.kill(proc.pid, signal.SIGKILL)
        break
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, (tmp_path / 'stderr.txt').read_text()[-2000:]
  finished = len(list((out / 'cells').glob('*.json')))
  assert 4 <= finished < 8
  assert cli.main(['sweep', '--config', cfg, '--out', str(out)]) == 0
  log = capsys.readouterr().out
  assert f'sweep: 8 cells, {finished} finished before (skipped), {8 - finished} to run' in log
  rows = (out / 'results.csv').read_text().splitlines()
  assert len(rows) == 9 and all(',ok,' in r for r in rows[1:])


def test_predict_on_a_photo_reports_every_field(workdir, tmp_path, capsys):
  from PIL import Image
  from skimage import data
  photo = tmp_path / 'astronaut.png'
  Image.fromarray(data.astronaut()).save(photo)
  report = tmp_path / 'report'
  assert cli.main(['predict', '--model', str(workdir['workdir']), str(photo),
                   '--report', str(report)]) == 0
  records = json.loads(capsys.readouterr().out)
  assert len(records) == 1 and records[0]['model'] == 'full model'
  (face,) = records[0]['faces']
  x0, y0, x1, y1 = face['box']
  assert 150 < (x0 + x1) / 2 < 260 and 50 < (y0 + y1) / 2 < 170   # Eileen Collins' face
  probs = face['label_probabilities']
  assert list(probs) == ['neutral', 'happiness', 'sadness', 'surprise', 'fear', 'disgust',
                         'anger', 'contempt']
  assert sum(probs.values()) == pytest.approx(1.0) and face['label'] == max(probs, key=probs.get)
  assert sum(face['zero_shot_probabilities'].values()) == pytest.approx(1.0)
  compound = face['compound']
  assert sum(compound['probabilities'].values()) == pytest.approx(1.0)
  assert compound['value'] == max(compound['probabilities'], key=compound['probabilities'].get)
  assert isinstance(compound['answer'], str) and 'answered' in compound
  for key in ('answer_label', 'intensity', 'valence', 'arousal'):
    assert set(face[key]) == {'value', 'answer'} and isinstance(face[key]['answer'], str)
  assert set(face['rationale']) == {'action_units', 'text'}
  unc = face['uncertainty']
  assert 0 <= unc['entropy'] <= 1 and 0 <= unc['margin'] <= 1 and 'stated' in unc
  assert (report / face['crop']).stat().st_size > 0
  assert face['crop'] in (report / 'predict.html').read_text()


def test_predict_says_why_for_a_non_image_and_a_faceless_image(workdir, tmp_path, capsys):
  from PIL import Image
  not_image = tmp_path / 'notes.png'
  not_image.write_text('these are notes, not pixels')
  wall = tmp_path / 'wall.png'
  Image.fromarray(np.full((240, 320, 3), 128, np.uint8)).save(wall)
  code = cli.main(['predict', '--model', str(workdir['workdir']), str(not_image), str(wall),
                   '--out', str(tmp_path / 'out.json'), '--report', str(tmp_path / 'r')])
  assert code == 1
  err = capsys.readouterr().err
  assert f'unifer predict: {not_image}: not an image (UnidentifiedImageError' in err
  assert f'unifer predict: {wall}: no face found' in err
  assert 'Traceback' not in err
  assert json.loads((tmp_path / 'out.json').read_text()) == []

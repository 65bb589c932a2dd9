"""`unifer serve --backend full` and `unifer predict` on the workdir `unifer demo` writes:
``instruct/`` (the full model) beside ``export/`` (the student). The full back end
answers through the same app with the generated rationale the student lacks; `--backend
auto` takes the student; both commands resolve the directory the same way.

A tiny random instruct workdir (tests/workdir_util.py) and a tiny random student; the
app runs in-process under uvicorn on a free loopback port (JAX is already loaded here)."""

import json
import threading
import time

import pytest
import uvicorn

from unifer_jax import cli, model_dirs
from unifer_jax.data import labels
from unifer_jax.serve import analysis, app as app_lib

import serve_util
import student_util
import workdir_util


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('demo')
  workdir_util.instruct_workdir(root)
  student_util.export_student(root, out='export')
  return root


@pytest.fixture(scope='module')
def full_server(demo_dir):
  backend = analysis.Backend.load(demo_dir, 'full')
  port = serve_util.free_port()
  server = uvicorn.Server(uvicorn.Config(app_lib.create_app(backend), host='127.0.0.1',
                                         port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    assert thread.is_alive()
    time.sleep(0.05)
  yield serve_util.Server(None, port, None)
  server.should_exit = True
  thread.join(timeout=20)


def test_the_demo_workdir_holds_both_back_ends(demo_dir):
  found = model_dirs.find(demo_dir)
  assert found.student == demo_dir / 'export' and found.full == demo_dir / 'instruct'
  assert model_dirs.choose(found, 'auto')[0] == 'student'
  assert model_dirs.choose(found, 'full') == ('full', demo_dir / 'instruct')


def test_the_full_back_end_adds_the_rationale(full_server, demo_dir):
  status, health, _ = full_server.request('GET', '/api/health')
  assert status == 200 and health['model']['backend'] == 'full'
  assert health['model']['path'] == str(demo_dir / 'instruct')
  assert 'rationale' in health['model']['gives']
  status, answer, _ = full_server.analyze(serve_util.png_bytes(serve_util.astronaut()),
                                          'astronaut.png', timeout=600)
  assert status == 200, answer
  (face,) = answer['faces']
  assert list(face['basic']) == list(labels.BASIC)
  assert face['label'] == max(face['basic'], key=face['basic'].get)
  assert face['compound']['label'] in labels.COMPOUND
  # Generated: the rationale's text is always there (its action units only when the
  # untrained model happens to name some), the raw answers beside the parsed values.
  assert isinstance(face['rationale']['text'], str) and 'action_units' in face['rationale']
  assert 'rationale' not in face.get('absent', {})
  assert set(face['answers']) >= {'intensity', 'valence', 'uncertainty'}
  assert sum(face['zero_shot'].values()) == pytest.approx(1.0, abs=1e-4)
  status, error, _ = full_server.analyze(b'not an image', 'notes.txt', 'text/plain')
  assert status == 415 and 'not an image' in error['error']


def test_predict_takes_the_demo_workdir(demo_dir, capsys):
  photo = demo_dir / 'astronaut.png'
  photo.write_bytes(serve_util.png_bytes(serve_util.astronaut()))
  for backend, kind in (('auto', 'exported student'), ('full', 'full model')):
    assert cli.main(['predict', '--model', str(demo_dir), '--backend', backend, str(photo),
                     '--report', str(demo_dir / f'report-{backend}')]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record['model'] == kind and len(record['faces']) == 1
  assert cli.main(['predict', '--model', str(demo_dir / 'distill'), str(photo)]) == 2
  assert 'unifer export --workdir' in capsys.readouterr().err

"""`unifer serve` with the exported-student back end, over real HTTP: the answer for a
real photo equals `unifer predict`'s on the same directory (the demo's layout, which
predict used to refuse); eleven malformed uploads each get a 4xx and a message while
the server keeps serving; nothing lands on disk; no request reaches a file; it listens
on loopback only and refuses foreign Host names; webcam frames keep their face numbers;
the student server never imports JAX and stays far under 1 GB.

One module-scoped server on a tiny random student laid out as `unifer demo` lays it out
(``root/distill``, ``root/export``), started as a user starts it, with its working and
temporary directories empty."""

import json
import struct
import zlib

import numpy as np
import pytest

from unifer_jax import cli, model_dirs
from unifer_jax.data import labels
from unifer_jax.serve import clip, command

import serve_util
import student_util


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('demo')
  student_util.export_student(root, out='export')
  return root


@pytest.fixture(scope='module')
def server(demo_dir, tmp_path_factory):
  cwd, tmp = tmp_path_factory.mktemp('cwd'), tmp_path_factory.mktemp('tmp')
  log = tmp_path_factory.mktemp('log') / 'serve.log'
  with serve_util.serve(demo_dir, '--max-mb', '4', cwd=cwd, log_path=log,
                        env={'TMPDIR': str(tmp)}) as s:
    # onnxruntime writes a 51-byte session id (`.ses`) into TMPDIR when it is imported.
    s.dirs, s.tmp_at_start = (cwd, tmp), sorted(p.name for p in tmp.iterdir())
    yield s


def png_claiming(width: int, height: int) -> bytes:
  """A PNG whose header says width x height, followed by a few bytes of nothing."""
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  chunk = lambda kind, data: (struct.pack('>I', len(data)) + kind + data
                              + struct.pack('>I', zlib.crc32(kind + data)))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
          + chunk(b'IEND', b''))


def chunked(body: bytes, piece: int = 2**16) -> bytes:
  return b''.join(b'%x\r\n%s\r\n' % (len(body[i:i + piece]), body[i:i + piece])
                  for i in range(0, len(body), piece)) + b'0\r\n\r\n'


def test_the_photo_answer_is_predicts_answer(server, demo_dir, capsys):
  photo = serve_util.png_bytes(serve_util.astronaut())
  status, answer, _ = server.analyze(photo, 'astronaut.png')
  assert status == 200, answer
  assert (answer['width'], answer['height']) == (512, 512) and answer['name'] == 'astronaut.png'
  (face,) = answer['faces']
  x0, y0, x1, y1 = face['box']
  assert 150 < (x0 + x1) / 2 < 260 and 50 < (y0 + y1) / 2 < 170   # Eileen Collins' face
  assert list(face['basic']) == list(labels.BASIC)
  assert sum(face['basic'].values()) == pytest.approx(1.0, abs=1e-4)
  assert face['label'] == max(face['basic'], key=face['basic'].get)
  assert face['compound']['label'] in labels.COMPOUND
  assert 0 <= face['intensity'] <= 1 and -1 <= face['valence'] <= 1 and -1 <= face['arousal'] <= 1
  assert face['rationale'] is None and 'text decoder' in face['absent']['rationale']
  assert 0 <= face['uncertainty']['entropy'] <= 1
  # `unifer predict` on the same directory (the demo's layout) and the same photo.
  path = demo_dir / 'astronaut.png'
  path.write_bytes(photo)
  assert cli.main(['predict', '--model', str(demo_dir), str(path), '--report',
                   str(demo_dir / 'report')]) == 0
  (record,) = json.loads(capsys.readouterr().out)
  assert record['model'] == 'exported student'
  (want,) = record['faces']
  assert face['box'] == want['box']
  for name, p in want['label_probabilities'].items():
    assert face['basic'][name] == pytest.approx(p, abs=1e-5)
  assert face['compound']['label'] == want['compound']['value']
  assert face['intensity'] == pytest.approx(want['intensity']['value'], abs=1e-5)


def test_health_and_page_come_from_the_server_only(server, demo_dir):
  status, health, _ = server.request('GET', '/api/health')
  assert status == 200 and health['status'] == 'ok'
  assert health['model']['backend'] == 'student'
  assert health['model']['path'] == str((demo_dir / 'export').absolute())
  assert health['limits']['max_bytes'] == 4 * 2**20
  status, page, headers = server.request('GET', '/')
  assert status == 200 and '<input id="file-input" type="file"' in page
  assert "default-src 'self'" in headers['content-security-policy']
  scripts = ''
  for ref in ('/static/app.js', '/static/reports.js', '/static/webcam.js', '/static/style.css'):
    assert f'"{ref}"' in page
    status, text, _ = server.request('GET', ref)
    assert status == 200
    scripts += text
  assert 'http' not in page.replace('http-equiv', '')   # nothing from elsewhere
  assert scripts.count('fetch(') == 2   # health and analyze: the page calls nothing else


def test_malformed_uploads_get_a_4xx_and_a_reason(server):
  jpeg = serve_util.jpeg_bytes(serve_util.astronaut())
  corrupt_png = bytearray(serve_util.png_bytes(serve_util.astronaut()))
  corrupt_png[200:4000] = bytes(3800)        # inside the image data: CRC / zlib fail
  big, big_ctype = serve_util.multipart({'file': ('big.png', 'image/png', bytes(5 * 2**20))})
  missing_field, missing_ctype = serve_util.multipart({'image': ('a.png', 'image/png', jpeg)})
  cases = {
      'zero bytes': (lambda: server.analyze(b'', 'empty.png'), 400, 'empty'),
      'truncated JPEG': (lambda: server.analyze(jpeg[:len(jpeg) // 2], 'half.jpg', 'image/jpeg'),
                         400, 'truncated'),
      'PNG claiming 20000 x 20000': (lambda: server.analyze(png_claiming(20000, 20000)), 413,
                                     'megapixels'),
      'PNG claiming 9000 x 9000 (over --max-megapixels)': (
          lambda: server.analyze(png_claiming(9000, 9000)), 413, '9000 x 9000'),
      'corrupt PNG data': (lambda: server.analyze(bytes(corrupt_png)), 400, 'corrupt'),
      'text as image/png': (lambda: server.analyze(b'these are notes, not pixels', 'notes.png'),
                            415, 'not an image'),
      'PostScript (a format never opened)': (
          lambda: server.analyze(b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n', 'x.eps',
                                 'application/postscript'), 415, 'not an image'),
      'wrong content type (raw image body)': (
          lambda: server.request('POST', '/api/analyze', jpeg, {'Content-Type': 'image/jpeg'}),
          415, 'multipart/form-data'),
      'no "file" field': (lambda: server.request('POST', '/api/analyze', missing_field,
                                                 {'Content-Type': missing_ctype}), 400, '"file"'),
      'over --max-mb (Content-Length)': (lambda: server.early_answer(
          f'POST /api/analyze HTTP/1.1\nHost: 127.0.0.1\nContent-Length: {len(big)}\n'
          f'Content-Type: {big_ctype}\n', big), 413, 'the limit is 4 MB'),
      'over --max-mb (chunked, no length)': (lambda: server.early_answer(
          f'POST /api/analyze HTTP/1.1\nHost: 127.0.0.1\nTransfer-Encoding: chunked\n'
          f'Content-Type: {big_ctype}\n', chunked(big)), 413, 'past the limit of 4 MB'),
      'faceless image': (lambda: server.analyze(serve_util.png_bytes(
          np.full((240, 320, 3), 128, np.uint8)), 'wall.png'), 422, 'no face found'),
  }
  for name, (send, want_status, want_text) in cases.items():
    status, body, _ = send()
    assert status == want_status, (name, status, body)
    assert want_text in body['error'], (name, body)
    assert server.request('GET', '/api/health')[0] == 200, name   # still serving
  assert server.request('GET', '/api/analyze')[0] == 405
  assert server.analyze(jpeg, 'astronaut.jpg', 'image/jpeg')[0] == 200
  assert server.proc.poll() is None and 'Traceback' not in server.log()


def test_no_request_reaches_a_file(server):
  for path in ('/static/../../../../etc/passwd', '/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd',
               '/static/..%2f..%2f..%2fetc%2fpasswd', '/../../etc/passwd', '//etc/passwd',
               '/static/index.html', '/static/', '/export/meta.json', '/api/../export/meta.json'):
    status, body, _ = server.request('GET', path)
    assert status == 404, (path, status)
    assert 'root:' not in str(body) and 'onnx' not in str(body), path


def test_requests_write_nothing_to_disk(server):
  # Runs after the other requests of this module. A 3 MB upload: Starlette's own form
  # parser would spool it to a temporary file.
  noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
  status, body, _ = server.analyze(serve_util.png_bytes(noise), 'noise.png')
  assert status == 422, body
  cwd, tmp = server.dirs
  assert [p.name for p in cwd.iterdir()] == []
  assert sorted(p.name for p in tmp.iterdir()) == server.tmp_at_start


def test_loopback_only_and_foreign_hosts_refused(server):
  # The listening socket, as the kernel lists it: 127.0.0.1 (0100007F) on our port.
  rows = [l.split() for l in open('/proc/net/tcp').read().splitlines()[1:]]
  listening = [r[1] for r in rows if r[3] == '0A' and int(r[1].split(':')[1], 16) == server.port]
  assert listening == [f'0100007F:{server.port:04X}'], listening
  status, body, _ = server.request('GET', '/api/health', headers={'Host': 'attacker.example'})
  assert status == 400 and 'loopback' in body['error']
  assert server.request('GET', '/', headers={'Host': f'localhost:{server.port}'})[0] == 200
  assert command.is_loopback('127.0.0.1') and command.is_loopback('::1')
  assert not command.is_loopback('0.0.0.0')


def test_webcam_frames_keep_their_face_numbers(server):
  frames = list(clip.frames(12, n_faces=2))
  tracks = []
  for frame in frames:
    status, answer, _ = server.analyze(serve_util.jpeg_bytes(frame, 80), 'frame.jpg',
                                       'image/jpeg', query='?stream=test-1')
    assert status == 200, answer
    right = lambda f: int(f['box'][0] + f['box'][2] > 640)   # the face's centre x > 320
    tracks.append(sorted((f['track'], right(f)) for f in answer['faces']))
  # Two faces, numbered once and kept: the same number stays on the same side.
  assert sum(len(t) == 2 for t in tracks) >= 10, tracks
  sides = {}
  for t in tracks:
    for track, side in t:
      assert sides.setdefault(track, side) == side, tracks
  assert len(sides) <= 3, tracks
  # A frame without faces is an answer in a stream, not an error.
  status, answer, _ = server.analyze(serve_util.jpeg_bytes(np.zeros((480, 640, 3), np.uint8)),
                                     'black.jpg', 'image/jpeg', query='?stream=test-2')
  assert status == 200 and answer['faces'] == []
  assert server.analyze(b'x', query='?stream=../../etc')[0] == 400


def test_the_student_server_imports_no_jax_and_stays_small(server):
  maps = open(f'/proc/{server.proc.pid}/maps').read()
  assert 'onnxruntime' in maps and 'jaxlib' not in maps and 'libjax' not in maps
  assert server.rss_mb() < 400, server.rss_mb()


def test_model_dirs_say_what_they_hold(demo_dir, tmp_path):
  found = model_dirs.find(demo_dir)
  assert found.student == demo_dir / 'export' and found.full is None
  assert model_dirs.choose(found) == ('student', demo_dir / 'export')
  with pytest.raises(model_dirs.ModelDirError, match='no full model here'):
    model_dirs.choose(found, 'full')
  with pytest.raises(model_dirs.ModelDirError, match='distill workdir.*unifer export'):
    model_dirs.find(demo_dir / 'distill')
  with pytest.raises(model_dirs.ModelDirError, match='no model here'):
    model_dirs.find(tmp_path)
  assert cli.main(['serve', '--model', str(tmp_path)]) == 2

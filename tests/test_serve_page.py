"""The `unifer serve` page in a real browser: Playwright driving Debian's Chromium
(`make test` installs both; the page's own CSP stays on). Dropping skimage's astronaut
photo shows one numbered, boxed face with its bars, and the saved JSON equals the API's
answer (the CSV has its row, the HTML report is self-contained); a text file shows the
error on the page; a fake camera playing corpus faces (a y4m from serve/clip.py) gets
at least 20 frames analysed with labels drawn, and the analysed frames per second are
printed at the end of the run (conftest.py collects it).

One tiny random student laid out as `unifer demo` lays it out, one server, one browser."""

import base64
import csv
import io
import json
import time

import pytest
from playwright.sync_api import sync_playwright

from unifer_jax.data import labels
from unifer_jax.serve import clip

import serve_util
import student_util

CHROMIUM = '/usr/bin/chromium'


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp('demo')
  student_util.export_student(root, out='export')
  with serve_util.serve(root, log_path=root / 'serve.log') as s:
    yield s


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
  y4m = clip.write_y4m(tmp_path_factory.mktemp('camera') / 'faces.y4m', n_frames=30)
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, args=[
        '--no-sandbox', '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
        f'--use-file-for-fake-video-capture={y4m}'])
    yield b
    b.close()


@pytest.fixture
def page(browser, server):
  context = browser.new_context(viewport={'width': 1200, 'height': 900}, accept_downloads=True)
  page = context.new_page()
  page.problems = []
  page.on('pageerror', lambda e: page.problems.append(str(e)))
  page.on('console', lambda m: page.problems.append(m.text) if m.type == 'error' else None)
  page.goto(f'http://127.0.0.1:{server.port}/')
  yield page
  context.close()


def wait_for(page, js: str, timeout: float = 30):
  """Polls ``js`` (a function) until it returns truthy; evaluate() runs outside the page's
  CSP, which forbids the string evaluation wait_for_function uses."""
  deadline = time.monotonic() + timeout
  while True:
    value = page.evaluate(js)
    if value:
      return value
    assert time.monotonic() < deadline, f'timed out waiting for {js}; page: {page.problems}'
    time.sleep(0.1)


def drop(page, selector: str, name: str, data: bytes, mime: str):
  """A file dropped on ``selector`` as a user drags it from the desktop."""
  transfer = page.evaluate_handle(
      """([name, b64, mime]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: mime }));
        return dt;
      }""", [name, base64.b64encode(data).decode(), mime])
  page.dispatch_event(selector, 'drop', {'dataTransfer': transfer})


def saved(page, button: str) -> bytes:
  with page.expect_download() as download:
    page.click(button)
  return open(download.value.path(), 'rb').read()


def test_a_dropped_photo_shows_its_numbered_face_and_saves_the_api_answer(page):
  photo = serve_util.png_bytes(serve_util.astronaut())
  with page.expect_response('**/api/analyze') as response:
    drop(page, '#drop', 'astronaut.png', photo, 'image/png')
  answer = response.value.json()
  page.wait_for_selector('.face')
  assert page.locator('.face').count() == 1
  (face,) = answer['faces']
  panel = page.locator('.face')
  assert panel.locator('.num').inner_text() == '1'
  assert face['label'] in panel.locator('h3').inner_text()
  rows = panel.locator('.bars > span').all_inner_texts()
  assert rows[0::2] == list(labels.BASIC)
  assert rows[1::2] == [f'{100 * face["basic"][n]:.1f}%' for n in labels.BASIC]
  widths = panel.locator('.bar i').evaluate_all('(bars) => bars.map((b) => b.style.width)')
  assert widths == [f'{100 * face["basic"][n]:.1f}%' for n in labels.BASIC]
  assert panel.locator('.compound').inner_text() == face['compound']['label']
  assert 'not available' in panel.locator('dd.absent').inner_text()
  assert page.locator('svg .va-dot').count() == 1
  # The box and its number are drawn on the image: the box colour at its left edge.
  x0, y0, x1, y1 = face['box']
  rgb = page.evaluate(
      """([x, y]) => Array.from(document.querySelector('.result canvas').getContext('2d')
                                  .getImageData(x, y, 1, 1).data.slice(0, 3))""",
      [round(x0), round((y0 + y1) / 2)])
  assert abs(rgb[0] - 0xe6) < 40 and rgb[1] < 90 and rgb[2] < 110, rgb   # #e63946
  # The saved reports.
  assert json.loads(saved(page, '#save-json')) == [answer]
  table = list(csv.DictReader(io.StringIO(saved(page, '#save-csv').decode())))
  assert len(table) == 1 and table[0]['image'] == 'astronaut.png' and table[0]['face'] == '1'
  assert table[0]['label'] == face['label']
  assert float(table[0]['p_happiness']) == pytest.approx(face['basic']['happiness'])
  html = saved(page, '#save-html').decode()
  assert html.count('src="data:image/jpeg;base64,') == 1
  assert 'src="/' not in html and 'src="http' not in html and 'href=' not in html
  assert page.problems == []


def test_a_text_file_shows_the_error_on_the_page(page, tmp_path):
  notes = tmp_path / 'notes.txt'
  notes.write_text('these are notes, not pixels')
  big = tmp_path / 'big.jpg'   # over the server's 20 MB: refused before it is sent
  with open(big, 'wb') as f:
    f.truncate(21 * 2**20)
  page.wait_for_selector('#model:has-text("exported student")')   # limits known
  page.set_input_files('#file-input', [str(notes), str(big)])
  wait_for(page, "() => document.querySelectorAll('.error').length == 2")
  errors = page.locator('.error').all_inner_texts()
  assert errors[0].startswith('notes.txt: not an image'), errors
  assert errors[1] == 'big.jpg: the file is 21.0 MB; the limit is 20 MB', errors
  assert page.locator('.face').count() == 0 and page.locator('#toolbar').is_hidden()


def test_the_camera_gets_frames_analysed_with_labels_drawn(page, record_property):
  page.click('#tab-webcam')
  page.click('#cam-start')
  wait_for(page, '() => window.unifer.stream && window.unifer.stream.frames >= 3')
  t0, f0 = time.monotonic(), page.evaluate('() => window.unifer.stream.frames')
  stream = wait_for(page, '() => window.unifer.stream.frames >= 23 && window.unifer.stream',
                    timeout=60)
  fps = (stream['frames'] - f0) / (time.monotonic() - t0)
  record_property('figure', f'webcam: {stream["frames"]} frames analysed, {fps:.1f} per '
                  f'second (Chromium, 640 x 480 fake camera, 2 corpus faces, tiny student)')
  assert stream['labelled'] >= 20
  assert len(stream['faces']) >= 1
  live = page.locator('#live li').all_inner_texts()
  assert live and all(any(n in t for n in labels.BASIC) for t in live), live
  # Labels are drawn over the video: opaque pixels on the overlay.
  opaque = page.evaluate("""() => { const c = document.getElementById('overlay');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
  assert opaque > 500, opaque
  page.click('#cam-stop')
  assert page.problems == []

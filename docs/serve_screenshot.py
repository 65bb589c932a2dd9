"""The README's picture of the `unifer serve` page after an analysis.

  python docs/serve_screenshot.py [--model DIR] [--out docs/serve.png]

Starts `unifer serve --model DIR` (default: the demo's student architecture with random
weights, benchmarks/serve_model.py), opens the page in Debian's Chromium (Playwright),
picks skimage's astronaut photo and a frame of two corpus faces, and saves the page as a
PNG (quantised to 256 colours when that keeps it under 300 KB).
"""

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'tests'), str(REPO / 'benchmarks')]

from PIL import Image  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

import serve_model  # noqa: E402
import serve_util  # noqa: E402
from unifer_jax.serve import clip  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', help='a --model DIR for unifer serve')
  p.add_argument('--out', default=str(REPO / 'docs' / 'serve.png'))
  args = p.parse_args()
  model_dir = serve_model.student_dir(args.model)
  tmp = Path(tempfile.mkdtemp())
  (tmp / 'two_faces.jpg').write_bytes(serve_util.jpeg_bytes(next(clip.frames(1, n_faces=2))))
  (tmp / 'astronaut.jpg').write_bytes(serve_util.jpeg_bytes(serve_util.astronaut()))
  with serve_util.serve(model_dir, log_path=os.devnull) as server, sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path='/usr/bin/chromium', args=['--no-sandbox'])
    page = browser.new_page(viewport={'width': 1180, 'height': 1060})
    page.goto(f'http://127.0.0.1:{server.port}/')
    page.set_input_files('#file-input', [str(tmp / 'two_faces.jpg'), str(tmp / 'astronaut.jpg')])
    deadline = time.monotonic() + 60
    while page.locator('.result').count() < 2:
      assert time.monotonic() < deadline, 'the page showed no results'
      time.sleep(0.2)
    time.sleep(0.3)
    png = page.screenshot()
    browser.close()
  image = Image.open(io.BytesIO(png))
  image.save(args.out, optimize=True)
  if os.path.getsize(args.out) > 300_000:
    image.convert('RGB').quantize(256).save(args.out, optimize=True)
  print(f'{args.out}: {os.path.getsize(args.out) / 1e3:.0f} KB')


if __name__ == '__main__':
  main()

"""Webcam analysis speed: what face detection costs and what detect-every-k + tracking buys.

  python benchmarks/serve_stream.py [--model DIR] [--frames 120] [--every 1 4 8 16]

A 640 x 480 clip of two corpus faces drifting (unifer_jax/serve/clip.py), each frame a
JPEG at quality 0.8 as the page sends it. Measured in one run, on the student back end
(serve_model.py: --model or the demo's student architecture with random weights):

1. the parts alone, ms per call: JPEG decode, the whole-frame LBP cascade
   (data/faces.detect at max_side 320), one face's window re-detection
   (serve/tracking.redetect), the student on the frame's faces;
2. the server's whole work per frame (decode + faces + student, analysis.analyze with a
   stream tracker) with a full detection on every k-th frame, as frames/s, and the ratio
   to k = 1 (the baseline: detection on every frame, the measured per-frame cost today);
   plus how many frames had both faces (tracking must not lose them);
3. the same over HTTP against a running `unifer serve --detect-every k` with one frame
   in flight, as the page does (frames/s the page can show, minus the browser's own
   capture and JPEG encoding, which tests/test_serve_page.py measures in Chromium).

Goal: >= 10 analysed frames/s at 640 x 480 on 2 cores. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tests'))

import numpy as np  # noqa: E402

import serve_model  # noqa: E402
import serve_util  # noqa: E402  (tests/: starts `unifer serve` on a free loopback port)
from unifer_jax.data import faces  # noqa: E402
from unifer_jax.serve import analysis, clip, tracking, uploads  # noqa: E402



def ms_per_call(fn, items, repeats: int = 1) -> float:
  fn(items[0])   # warm
  t = time.perf_counter()
  for _ in range(repeats):
    for x in items:
      fn(x)
  return (time.perf_counter() - t) * 1e3 / (repeats * len(items))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', help='a --model DIR for unifer serve (default: see serve_model.py)')
  p.add_argument('--frames', type=int, default=120)
  p.add_argument('--every', type=int, nargs='+', default=[1, 4, 8, 16])
  p.add_argument('--http_every', type=int, nargs='+', default=[1, 8])
  args = p.parse_args()
  model_dir = serve_model.student_dir(args.model)
  backend = analysis.Backend.load(model_dir, 'student')
  limits = uploads.Limits()
  t = time.perf_counter()
  frames = list(clip.frames(args.frames, n_faces=2))
  data = [serve_util.jpeg(f, 80) for f in frames]
  kb = np.mean([len(d) for d in data]) / 1e3
  print(f'clip: {len(frames)} frames 640 x 480, 2 faces, JPEG q80 ~{kb:.0f} KB '
        f'({time.perf_counter() - t:.1f} s to render)')
  print(f'model: {backend.model.kind} from {backend.path}, {backend.model.image_size} px')

  # ---- 1. the parts alone ------------------------------------------------------------ #
  decoded = [uploads.decode(d, limits)[0] for d in data]
  boxes = [faces.distinct(faces.detect(f)) for f in decoded]
  one = [(f, b[0]) for f, b in zip(decoded, boxes) if b]
  crops = [np.stack([faces.crop(f, x, size=backend.model.image_size) for x in b])
           for f, b in zip(decoded, boxes) if b]
  sub = slice(0, 30)
  parts = {
      'JPEG decode': ms_per_call(lambda d: uploads.decode(d, limits), data[sub]),
      'whole-frame detection (cascade at 320 px)': ms_per_call(faces.detect, decoded[sub]),
      'one face re-detected in its window': ms_per_call(lambda fb: tracking.redetect(*fb),
                                                        one[sub]),
      'student on the frame\'s faces': ms_per_call(backend.run, crops[sub]),
  }
  print('\n1. parts, ms per call')
  for name, ms in parts.items():
    print(f'   {name:45s} {ms:7.1f}')

  # ---- 2. the server's work per frame ------------------------------------------------ #
  print('\n2. server work per frame (decode + faces + student), one stream')
  base = None
  for k in args.every:
    tracker = tracking.Tracker(detect_every=k)
    both = 0
    t = time.perf_counter()
    for d in data:
      image, size = uploads.decode(d, limits)
      both += len(analysis.analyze(image, size, backend, tracker=tracker)['faces']) == 2
    ms = (time.perf_counter() - t) * 1e3 / len(data)
    base = base or ms
    print(f'   detect every {k:2d}: {ms:6.1f} ms/frame = {1e3 / ms:5.1f} frames/s '
          f'({base / ms:4.2f}x k=1); both faces in {both}/{len(data)} frames')

  # ---- 3. over HTTP, one frame in flight ---------------------------------------------- #
  print('\n3. over HTTP to unifer serve, one frame in flight (as the page)')
  for k in args.http_every:
    with serve_util.serve(model_dir, '--detect-every', str(k),
                          log_path=os.devnull) as server:
      server.analyze(data[0], 'frame.jpg', 'image/jpeg', query='?stream=warm')
      t = time.perf_counter()
      for d in data:
        status, _, _ = server.analyze(d, 'frame.jpg', 'image/jpeg', query=f'?stream=k{k}')
        assert status == 200
      fps = len(data) / (time.perf_counter() - t)
    print(f'   detect every {k:2d}: {fps:5.1f} frames/s')


if __name__ == '__main__':
  main()

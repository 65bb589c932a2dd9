"""A synthetic webcam clip: faces of the built-in corpus drifting over a 640 x 480 frame.

For the webcam tests and benchmarks (no camera here), and for trying the page's webcam
mode without one: Chromium plays a y4m file as its camera with
``--use-fake-device-for-media-stream --use-file-for-fake-video-capture=clip.y4m``.

  python -m unifer_jax.serve.clip clip.y4m [--frames 60]

Faces are rendered by data_prep/synthetic_faces.py (unaligned, 160 px) and only those
the frontal-face detector finds on a plain frame are used, so every frame holds
`n_faces` detectable faces.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from unifer_jax.data import faces

WIDTH, HEIGHT = 640, 480
FACE_PX = 160


def corpus_faces(n: int, *, seed: int = 0, size: int = FACE_PX) -> list[np.ndarray]:
  """The first `n` test-split corpus faces the detector finds on a plain background."""
  from data_prep import synthetic_faces  # pylint: disable=g-import-not-at-top
  found = []
  for i in range(200):
    rec = synthetic_faces.make_record(i, seed=seed, split='test', image_size=size, align=False)
    face = np.asarray(Image.open(io.BytesIO(rec['image'])).convert('RGB'))
    frame = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    frame[100:100 + size, 200:200 + size] = face
    if faces.detect(frame):
      found.append(face)
      if len(found) == n:
        return found
  raise RuntimeError(f'only {len(found)} of the first 200 corpus faces are detectable')


def frames(n_frames: int = 60, n_faces: int = 2, seed: int = 0):
  """Yields `n_frames` uint8 [480, 640, 3] frames; face k drifts on a small ellipse."""
  pics = corpus_faces(n_faces, seed=seed)
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
  background = np.stack([70 + 40 * xx / WIDTH, 80 + 30 * yy / HEIGHT,
                         np.full_like(xx, 95.0)], -1).astype(np.uint8)
  slots = [(WIDTH * (k + 1) // (n_faces + 1) - FACE_PX // 2, HEIGHT // 2 - FACE_PX // 2)
           for k in range(n_faces)]
  for t in range(n_frames):
    frame = background.copy()
    for k, (pic, (x, y)) in enumerate(zip(pics, slots)):
      a = 2 * math.pi * t / n_frames + k
      dx, dy = int(round(20 * math.cos(a))), int(round(12 * math.sin(a)))
      frame[y + dy:y + dy + FACE_PX, x + dx:x + dx + FACE_PX] = pic
    yield frame


def write_y4m(path, n_frames: int = 60, n_faces: int = 2, fps: int = 30, seed: int = 0) -> Path:
  """A YUV4MPEG2 (4:2:0) file of `frames(...)`; Chromium's fake camera loops it."""
  path = Path(path)
  with path.open('wb') as f:
    f.write(f'YUV4MPEG2 W{WIDTH} H{HEIGHT} F{fps}:1 Ip A1:1 C420jpeg\n'.encode())
    for frame in frames(n_frames, n_faces, seed):
      y, cb, cr = Image.fromarray(frame).convert('YCbCr').split()
      half = (WIDTH // 2, HEIGHT // 2)
      f.write(b'FRAME\n' + y.tobytes() + cb.resize(half, Image.BILINEAR).tobytes()
              + cr.resize(half, Image.BILINEAR).tobytes())
  return path


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('out', help='the .y4m file to write')
  p.add_argument('--frames', type=int, default=60)
  p.add_argument('--faces', type=int, default=2)
  args = p.parse_args(argv)
  print(write_y4m(args.out, args.frames, args.faces))


if __name__ == '__main__':
  main()

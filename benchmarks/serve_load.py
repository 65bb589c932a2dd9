"""Load test of `unifer serve` on loopback with the student back end.

  python benchmarks/serve_load.py [--model DIR] [--requests 200] [--clients 8]

Starts `unifer serve` as a user does (serve_model.py: --model or the demo's student
architecture with random weights), then `--clients` threads send `--requests` uploads
between them, alternating skimage's astronaut photo (512 x 512 JPEG, one face) and a
640 x 480 frame of two corpus faces. Prints the errors (non-200 answers or failed
connections: the goal is none), latency p50 / p95 / max, requests per second, and the
server's resident memory before the load, after it, and its peak (VmHWM; the goal for
the 4 GB machine is < 1 GB). Exits 1 if any request failed. Everything stays on
127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tests'))

import numpy as np  # noqa: E402
from skimage import data as skdata  # noqa: E402

import serve_model  # noqa: E402
import serve_util  # noqa: E402  (tests/: starts `unifer serve` on a free loopback port)
from unifer_jax.serve import clip  # noqa: E402



def memory(pid: int) -> dict:
  rows = dict(l.split(':', 1) for l in Path(f'/proc/{pid}/status').read_text().splitlines()
              if ':' in l)
  return {k: int(rows[k].split()[0]) / 1024 for k in ('VmRSS', 'VmHWM')}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', help='a --model DIR for unifer serve (default: see serve_model.py)')
  p.add_argument('--requests', type=int, default=200)
  p.add_argument('--clients', type=int, default=8)
  args = p.parse_args()
  model_dir = serve_model.student_dir(args.model)
  uploads = [('astronaut.jpg', serve_util.jpeg(skdata.astronaut())),
             ('two_faces.jpg', serve_util.jpeg(next(clip.frames(1, n_faces=2))))]
  with serve_util.serve(model_dir, log_path=os.devnull) as server:
    before = memory(server.proc.pid)
    next_index, lock = [0], threading.Lock()
    latencies, errors = [], []

    def client():
      while True:
        with lock:
          i = next_index[0]
          if i >= args.requests:
            return
          next_index[0] += 1
        name, data = uploads[i % len(uploads)]
        t = time.perf_counter()
        try:
          status, body, _ = server.analyze(data, name, 'image/jpeg')
          ok = status == 200 and len(body['faces']) >= 1
        except Exception as e:  # pylint: disable=broad-except
          status, body, ok = None, repr(e), False
        dt = time.perf_counter() - t
        with lock:
          latencies.append(dt)
          if not ok:
            errors.append((i, status, str(body)[:200]))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for th in threads:
      th.start()
    for th in threads:
      th.join()
    wall = time.perf_counter() - t0
    after = memory(server.proc.pid)
    alive = server.proc.poll() is None
  ms = np.asarray(latencies) * 1e3
  print(f'{args.requests} requests from {args.clients} concurrent clients in {wall:.1f} s '
        f'({args.requests / wall:.1f} requests/s), model from {model_dir}')
  print(f'errors: {len(errors)}' + ''.join(f'\n  #{i}: {s} {b}' for i, s, b in errors[:10]))
  print(f'latency ms: p50 {np.percentile(ms, 50):.0f}, p95 {np.percentile(ms, 95):.0f}, '
        f'max {ms.max():.0f}')
  print(f'server RSS MB: before {before["VmRSS"]:.0f}, after {after["VmRSS"]:.0f}, '
        f'peak {after["VmHWM"]:.0f}; still serving: {alive}')
  return 1 if errors or not alive else 0


if __name__ == '__main__':
  sys.exit(main())

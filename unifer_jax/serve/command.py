"""``unifer serve --model DIR [--host 127.0.0.1] [--port 8000] [--backend auto|student|full]``.

Loads the model once (model_dirs.py: an exported student, a training workdir or the
workdir `unifer demo` wrote), prints the address and serves the page with uvicorn until
Ctrl-C. Loopback only unless ``--host`` says otherwise. The student back end imports no
JAX (~150 MB resident); ``--backend full`` loads the full model and adds the generated
rationale, at seconds per face on a CPU.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected a whole number >= 1, got {text}')
  return value


def add_parser(sub) -> None:
  s = sub.add_parser('serve', help='the web page: drop images or start the webcam, read every '
                     "face's expression, save the report")
  s.add_argument('--model', required=True, help='an exported student, a training workdir or '
                 'the workdir `unifer demo` wrote')
  s.add_argument('--backend', default='auto', choices=('auto', 'student', 'full'),
                 help='auto: the exported student when DIR has one (real time, no JAX), '
                 'else the full model (adds the rationale)')
  s.add_argument('--host', default='127.0.0.1',
                 help='address to listen on (default loopback only; 0.0.0.0 = every interface)')
  s.add_argument('--port', type=int, default=8000)
  s.add_argument('--step', type=int, help='full model: checkpoint step (default: the newest)')
  s.add_argument('--max-mb', type=float, default=20, help='largest upload in MB (default 20)')
  s.add_argument('--max-megapixels', type=float, default=50,
                 help='largest image in megapixels (default 50)')
  s.add_argument('--detect-every', type=_positive, default=8,
                 help='webcam: full face detection on every k-th frame, tracking between')


def is_loopback(host: str) -> bool:
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host.strip('[]')).is_loopback
  except ValueError:
    return False


def run(args) -> int:
  # pylint: disable=g-import-not-at-top
  from unifer_jax import model_dirs
  try:
    import uvicorn
    from unifer_jax.serve import analysis, app as app_lib, uploads
    backend = analysis.Backend.load(args.model, args.backend, args.step)
  except (model_dirs.ModelDirError, FileNotFoundError, ValueError) as e:
    print(f'unifer serve: {e}', file=sys.stderr)
    return 2
  except ImportError as e:
    print(f'unifer serve: {e} (pip install -e ".[serve,export]")', file=sys.stderr)
    return 2
  if backend.kind == 'student':
    import onnxruntime
    onnxruntime.disable_telemetry_events()   # nothing about the user's use leaves the machine
  limits = uploads.Limits(max_bytes=int(args.max_mb * 2**20),
                          max_pixels=int(args.max_megapixels * 1e6))
  loopback = is_loopback(args.host)
  app = app_lib.create_app(backend, limits=limits, loopback_only=loopback,
                           detect_every=args.detect_every)
  shown = f'[{args.host}]' if ':' in args.host else args.host
  print(f'unifer serve: {backend.model.kind} ({backend.kind}) from {backend.path}', flush=True)
  print(f'unifer serve: open http://{shown}:{args.port}/  (Ctrl-C stops)', flush=True)
  if not loopback:
    print(f'unifer serve: listening on {args.host}: other machines can reach this page',
          file=sys.stderr, flush=True)
  # At most 64 connections at once (more get 503): each may hold an upload in memory.
  uvicorn.run(app, host=args.host, port=args.port, log_level='warning', access_log=False,
              limit_concurrency=64)
  return 0

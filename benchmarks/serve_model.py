"""The model the `unifer serve` benchmarks run: ``--model DIR`` when given (e.g.
workdir/demo), else the demo's student architecture (configs/distill.py:demo, 64 px, 4 x
128) with random weights, exported to ONNX in a temporary directory (removed at exit). Speed does not
depend on the weights; the export runs in a subprocess so the benchmark itself never
imports JAX (as the student server does not)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def student_dir(model: str | None) -> str:
  if model:
    return model
  root = Path(tempfile.mkdtemp(prefix='serve-bench-'))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  code = ('import pathlib, student_util; '
          f'student_util.export_student(pathlib.Path({str(root)!r}), preset="demo", out="export")')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'tests')]))
  print('building the demo-architecture student (random weights, ONNX) ...', flush=True)
  subprocess.run([sys.executable, '-c', code], check=True, env=env, capture_output=True)
  return str(root)

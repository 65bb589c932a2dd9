"""``unifer export --workdir DIR --out DIR --format onnx|stablehlo|safetensors``.

Each format writes its file(s) and ``meta.json`` into ``--out`` and checks parity with
the JAX student in the exported runtime (max abs diff <= ``--atol``, default 1e-4)
before it reports success; a mismatch exits 1 with the difference, and the files are
left for inspection. ``--int8`` (onnx) adds an int8 model (per-channel static QDQ,
onnx_export.py) with its size, speed and agreement with f32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

META_FILE = 'meta.json'


def _onnx(student, out, args):
  from unifer_jax.export import onnx_export  # pylint: disable=g-import-not-at-top
  return onnx_export.export(student, out, atol=args.atol, int8=args.int8)


def _stablehlo(student, out, args):
  from unifer_jax.export import stablehlo_export  # pylint: disable=g-import-not-at-top
  return stablehlo_export.export(student, out, atol=args.atol)


def _safetensors(student, out, args):
  from unifer_jax.export import safetensors_export  # pylint: disable=g-import-not-at-top
  return safetensors_export.export(student, out, atol=args.atol)


FORMATS = {'onnx': _onnx, 'stablehlo': _stablehlo, 'safetensors': _safetensors}


def add_parser(sub) -> None:
  s = sub.add_parser('export', help='export the distilled student (parity-checked)')
  s.add_argument('--workdir', required=True, help='the distill stage workdir')
  s.add_argument('--out', required=True, help='output directory (created)')
  s.add_argument('--format', required=True, choices=sorted(FORMATS), action='append',
                 help='repeat for several formats')
  s.add_argument('--atol', type=float, default=1e-4, help='max abs diff allowed (1e-4)')
  s.add_argument('--int8', action='store_true', help='onnx: also an int8 model')


def export(workdir, out, formats, *, atol: float = 1e-4, int8: bool = False) -> dict:
  """Python entry: exports ``formats`` and returns their reports (raises ParityError)."""
  from unifer_jax.export import student_fn  # pylint: disable=g-import-not-at-top  (jax)
  args = type('Args', (), dict(atol=atol, int8=int8))
  student = student_fn.load(workdir)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  meta = student_fn.meta(student)
  reports = {}
  for fmt in formats:
    if fmt not in FORMATS:
      raise KeyError(f'export format {fmt!r}; expected one of {sorted(FORMATS)}')
    reports[fmt] = FORMATS[fmt](student, out, args)
    meta.setdefault('files', {}).update(
        {k: v for k, v in reports[fmt].items() if k.endswith('_file')})
    if 'architecture' in reports[fmt]:
      meta['architecture'] = reports[fmt].pop('architecture')
  previous = out / META_FILE
  if previous.exists():  # several `unifer export` calls into one directory add up
    old = json.loads(previous.read_text())
    meta['files'] = {**old.get('files', {}), **meta.get('files', {})}
    meta.setdefault('architecture', old.get('architecture'))
  (out / META_FILE).write_text(json.dumps(meta, indent=2))
  return reports


def run(args) -> int:
  from unifer_jax.export import student_fn  # pylint: disable=g-import-not-at-top
  try:
    reports = export(args.workdir, args.out, args.format, atol=args.atol, int8=args.int8)
  except student_fn.ParityError as e:
    print(f'unifer export: PARITY FAILED: {e}', file=sys.stderr)
    return 1
  for fmt, rep in reports.items():
    print(f'{fmt}: ' + ', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}'
                                 for k, v in rep.items()), flush=True)
  print(f'wrote {Path(args.out) / META_FILE}', flush=True)
  return 0

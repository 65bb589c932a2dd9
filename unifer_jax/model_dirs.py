"""What a `--model DIR` holds, found without importing JAX.

`unifer predict` and `unifer serve` take the directory a user has at hand:

* an exported student: ``meta.json`` + ONNX (`unifer export --format onnx`);
* a training workdir: ``config.json`` + ``checkpoints/`` (the full model; a distill
  workdir holds a student that has to be exported first);
* the workdir `unifer demo` wrote (``workdir/demo``): stage workdirs ``lm/`` ...
  ``instruct/``, ``distill/`` and the export in ``export/``; its full model is
  ``instruct/`` and its student ``export/``.

``find(DIR)`` says which of the two back ends the directory offers; ``choose(found,
backend)`` picks one ('auto' = the student when there is one: it runs in ~100 MB
without JAX, in real time). Errors are ``ModelDirError`` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

BACKENDS = ('auto', 'student', 'full')
# The demo's stage workdirs, last first: the full model is the latest instruction-tuned one.
DEMO_FULL = ('instruct', 'generate', 'align')
DEMO_EXPORT = 'export'


class ModelDirError(Exception):
  """A --model directory that holds no model we can run (a one-line reason)."""


@dataclasses.dataclass(frozen=True)
class Found:
  root: Path
  student: Path | None   # an export directory (meta.json with an ONNX file)
  full: Path | None      # a training workdir of the full model


def _is_export(p: Path) -> bool:
  if not (p / 'meta.json').is_file():
    return False
  try:
    files = json.loads((p / 'meta.json').read_text()).get('files', {})
  except (json.JSONDecodeError, AttributeError) as e:
    raise ModelDirError(f'{p / "meta.json"}: not a `unifer export` meta.json ({e})') from None
  return 'onnx_file' in files


def _workdir_kind(p: Path) -> str | None:
  """'student' / 'unifer' for a training workdir, None when `p` is not one."""
  if not ((p / 'config.json').is_file() and (p / 'checkpoints').is_dir()):
    return None
  try:
    model = json.loads((p / 'config.json').read_text()).get('model', {})
  except json.JSONDecodeError as e:
    raise ModelDirError(f'{p / "config.json"}: not JSON ({e})') from None
  return model.get('kind', 'unifer') if isinstance(model, dict) else 'unifer'


def find(path) -> Found:
  root = Path(path)
  if not root.is_dir():
    raise ModelDirError(f'{root}: no such directory')
  if _is_export(root):
    return Found(root, root, None)
  kind = _workdir_kind(root)
  if kind == 'student':
    raise ModelDirError(f'{root}: a distill workdir (the student before export): run '
                        f'`unifer export --workdir {root} --out {root.parent / DEMO_EXPORT} '
                        f'--format onnx` and pass that directory')
  if kind is not None:
    return Found(root, None, root)
  student = root / DEMO_EXPORT if _is_export(root / DEMO_EXPORT) else None
  full = next((root / s for s in DEMO_FULL if _workdir_kind(root / s) == 'unifer'), None)
  if student is None and full is None:
    raise ModelDirError(
        f'{root}: no model here -- expected an exported student (meta.json + ONNX, '
        f'`unifer export --format onnx`), a training workdir (config.json + checkpoints/) '
        f'or the workdir `unifer demo` wrote (instruct/ and export/)')
  return Found(root, student, full)


def choose(found: Found, backend: str = 'auto') -> tuple[str, Path]:
  """('student' | 'full', its directory) for ``backend`` in BACKENDS."""
  if backend not in BACKENDS:
    raise ModelDirError(f'backend {backend!r}; expected one of {BACKENDS}')
  if backend == 'auto':
    backend = 'student' if found.student is not None else 'full'
  where = found.student if backend == 'student' else found.full
  if where is None:
    has = 'an exported student' if found.student is not None else 'a full model'
    raise ModelDirError(f'{found.root}: no {backend} model here (it holds {has}; '
                        f'--backend auto picks it)')
  return backend, where

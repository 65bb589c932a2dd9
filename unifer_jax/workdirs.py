"""Workdir paths: one path type for local folders and object storage, and a config.json
that travels with its workdir.

Path type. ``path(p)`` is an ``etils.epath.Path`` (the type orbax itself uses): a local
path made absolute, or a URL (``gs://BUCKET/run``, ``s3://...``) kept as a URL. Every
file a run writes into its workdir goes through it, so ``--workdir gs://BUCKET/run``
writes to the bucket (gcsfs; ``pip install -e ".[gcs]"``) and never to a local folder
named ``gs:``. Code that needs a real local file (a tokenizer for transformers, a
figure for matplotlib) goes through ``local_copy`` / ``write_via``.

config.json. ``save_config(config, workdir)`` (the trainer calls it on process 0)

* copies what the model needs to run -- its tokenizers (``input.tokenizer``,
  ``input.text_tokenizer``) -- into ``WORKDIR/tokenizer`` / ``WORKDIR/text_tokenizer``;
* writes every path that lies in the workdir or beside it (under the workdir's parent:
  ``unifer demo``'s ``data/`` next to its stage workdirs, a pod's ``gs://B/data`` next
  to ``gs://B/run``) relative to the workdir, as ``./x`` or ``../x``; other paths stay
  absolute;
* records where it was written (``"workdir"``).

``read_config(workdir)`` resolves ``./`` and ``../`` against the workdir where it is
now; a path that does not exist there but does where the config was written (the
workdir alone was copied away, its data stayed) resolves against the old place. So a
demo folder moved elsewhere, or a checkpoint copied from a pod's bucket to a laptop,
still predicts, evaluates and resumes (tests/test_workdirs.py).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import Any, Callable

import ml_collections
from etils import epath

from unifer_jax import config_lib

CONFIG = 'config.json'
ORIGIN_KEY = 'workdir'   # where config.json was written (stripped on reading)
# Config keys that hold paths even when given relative to the current directory.
PATH_KEYS = ('input.data_dir', 'input.tokenizer', 'input.text_tokenizer', 'init.vlm',
             'init.vision', 'init.qformer', 'init.llm', 'init.checkpoint',
             'distill.teacher_workdir', 'distill.tokenizer')
# What a model needs to run, copied into the workdir: config key -> folder in it.
TOKENIZER_KEYS = {'tokenizer': 'tokenizer', 'text_tokenizer': 'text_tokenizer'}
# A tokenizer directory is often a whole HF model directory: copy its small files only.
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.h5', '.msgpack',
                    '.gguf', '.onnx', '.npz', '.index.json')
_MAX_TOKENIZER_FILE = 64 << 20
_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')
_MANGLED_URL = re.compile(r'^(gs|s3|gcs|az|hdfs):/[^/]')


# ---- the path type ---------------------------------------------------------------------

def is_url(p) -> bool:
  return bool(_URL.match(str(p)))


def path(p) -> epath.Path:
  """``p`` as the workdir path type: URLs as they are, local paths absolute."""
  s = str(p)
  if _MANGLED_URL.match(s):   # pathlib.Path('gs://b/x') is 'gs:/b/x': a local folder 'gs:'
    raise ValueError(f'{s}: a URL that went through pathlib.Path (one slash after the '
                     f'scheme); keep workdir paths as workdirs.path(...)')
  return epath.Path(s if is_url(s) else os.path.abspath(s))


def join(base, rel: str) -> str:
  """``base/rel`` normalised (``..`` applied), for local paths and URLs alike."""
  base = str(base)
  m = _URL.match(base)
  if m is None:
    return os.path.normpath(os.path.join(base, rel))
  scheme, rest = m.group(0), base[m.end():]
  bucket, _, key = rest.partition('/')
  joined = posixpath.normpath(posixpath.join('/' + key, rel)).lstrip('/')
  return f'{scheme}{bucket}/{joined}' if joined and joined != '.' else f'{scheme}{bucket}'


def _inside(child: str, parent: str) -> bool:
  return child == parent or child.startswith(parent.rstrip('/') + '/')


_LOCAL_COPIES: dict[str, str] = {}   # URL -> its local copy (one per process)


def local_copy(p) -> str:
  """A local directory with the files of directory ``p`` (``p`` itself when local):
  for readers that need a real folder (transformers' tokenizer loader)."""
  if not is_url(p):
    return str(p)
  if str(p) in _LOCAL_COPIES:
    return _LOCAL_COPIES[str(p)]
  src = epath.Path(str(p))
  dst = _LOCAL_COPIES[str(p)] = tempfile.mkdtemp(prefix='unifer-' + src.name + '-')
  if not src.is_dir():
    return dst   # empty: the caller's own check names `p`
  for f in src.iterdir():
    if f.is_file():
      with open(os.path.join(dst, f.name), 'wb') as out:
        out.write(f.read_bytes())
  return dst


def write_via(target, write: Callable[[str], Any], suffix: str = '') -> None:
  """``write(local_filename)`` -- a writer that only knows local files (matplotlib,
  numpy) -- then the file moved to ``target`` (local or a URL)."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_url(target):
    write(str(target))
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, 'file' + suffix)
    write(local)
    with open(local, 'rb') as f:
      target.write_bytes(f.read())


# ---- config.json -----------------------------------------------------------------------

def _map_strings(tree, fn):
  if isinstance(tree, dict):
    return {k: _map_strings(v, fn) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_map_strings(v, fn) for v in tree]
  return fn(tree) if isinstance(tree, str) else tree


def _get(tree: dict, dotted: str):
  node = tree
  for part in dotted.split('.'):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _set(tree: dict, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  node = tree
  for part in parents:
    node = node[part]
  node[leaf] = value


def _is_relative_marker(s: str) -> bool:
  return s.startswith('./') or s.startswith('../') or s in ('.', '..')


def relative_to(value: str, workdir: str) -> str:
  """``value`` as ``./x`` / ``../x`` when it lies in ``workdir`` or beside it (under
  its parent, unless that is a filesystem or bucket root), else as is."""
  if is_url(value) != is_url(workdir):
    return value
  parent = join(workdir, '..')
  rooted = parent in ('/', '') or (is_url(parent) and parent.count('/') < 3)
  if not (_inside(value, workdir) or (not rooted and _inside(value, parent))):
    return value
  strip = (lambda s: '/' + s.split('://', 1)[1]) if is_url(value) else (lambda s: s)
  rel = posixpath.relpath(strip(value), strip(workdir))
  if rel == '.' or rel.startswith('../'):
    return rel
  return './' + rel


def copy_tokenizer(src: str, dst) -> None:
  """The tokenizer files of directory ``src`` (no model weights) into ``dst``."""
  src_dir, dst = path(src), path(dst)
  if not src_dir.is_dir():
    raise FileNotFoundError(f'tokenizer {src}: no such directory (config.input.tokenizer / '
                            f'text_tokenizer); cannot copy it into the workdir {dst.parent}')
  dst.mkdir(parents=True, exist_ok=True)
  for f in src_dir.iterdir():
    if (f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES)
        and f.stat().length <= _MAX_TOKENIZER_FILE):
      (dst / f.name).write_bytes(f.read_bytes())


def portable(config: ml_collections.ConfigDict | dict, workdir) -> dict:
  """The config as config.json holds it: paths in/beside ``workdir`` relative to it."""
  base = str(path(workdir))
  tree = json.loads(config_lib.to_json(config) if isinstance(config, ml_collections.ConfigDict)
                    else json.dumps(config, default=str))
  for key in PATH_KEYS:   # given relative to the current directory: make absolute first
    value = _get(tree, key)
    if isinstance(value, str) and value and not is_url(value):
      _set(tree, key, os.path.abspath(value))
  tree = _map_strings(tree, lambda s: os.path.abspath(s) if _is_relative_marker(s) else s)
  tree = _map_strings(tree, lambda s: relative_to(s, base) if (
      s.startswith('/') or is_url(s)) else s)
  tree[ORIGIN_KEY] = base
  return tree


def save_config(config: ml_collections.ConfigDict, workdir) -> dict:
  """Copies the tokenizers in and writes WORKDIR/config.json (see the module doc);
  returns what it wrote."""
  workdir = path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tree = json.loads(config_lib.to_json(config))
  inp = tree.get('input') if isinstance(tree.get('input'), dict) else {}
  copied: dict[str, str] = {}   # source -> its copy (one copy when both keys name it)
  for key, folder in TOKENIZER_KEYS.items():
    src = inp.get(key)
    if not src or _inside(str(path(src)), str(workdir)):
      continue
    source = str(path(src))
    if source not in copied:
      copied[source] = str(workdir / folder)
      copy_tokenizer(src, copied[source])
    inp[key] = copied[source]
  tree = portable(tree, workdir)
  (workdir / CONFIG).write_text(json.dumps(tree, indent=2, sort_keys=True))
  return tree


def resolve(tree: dict, workdir) -> dict:
  """config.json's tree with ``./`` / ``../`` paths made absolute against ``workdir``
  (or against where it was written, when only there the path exists)."""
  base = str(path(workdir))
  origin = tree.pop(ORIGIN_KEY, None)

  def fn(s: str) -> str:
    if not _is_relative_marker(s):
      return s
    here = join(base, s)
    if origin and origin != base and not path(here).exists():
      there = join(origin, s)
      if path(there).exists():
        return there
    return here
  return _map_strings(tree, fn)


def read_config(workdir, what: str = 'a training workdir') -> ml_collections.ConfigDict:
  """WORKDIR/config.json with its paths resolved (an error naming the file if absent)."""
  file = path(workdir) / CONFIG
  if not file.is_file():
    raise FileNotFoundError(f'{workdir}: no {CONFIG} -- not {what} '
                            f'(`unifer train ... --workdir {workdir}` writes one)')
  try:
    tree = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{file}: not JSON ({e})') from None
  return ml_collections.ConfigDict(resolve(tree, workdir))


def load_config(spec: str | None, overrides, workdir) -> ml_collections.ConfigDict:
  """``--config`` of `unifer train`: a ``configs/x.py[:arg]`` file, a ``config.json``
  (paths resolved against its folder), or none: the workdir's own config.json."""
  if spec and not spec.endswith('.json'):
    return config_lib.load(spec, overrides)
  folder = join(str(path(spec)), '..') if spec else workdir
  return config_lib.apply_overrides(read_config(folder), overrides, source=spec or
                                    str(path(workdir) / CONFIG))


def copy_tree(src, dst) -> None:
  """A local directory tree into ``dst`` (local or a URL)."""
  src, dst = str(src), path(dst)
  if not is_url(dst):
    shutil.copytree(src, str(dst), dirs_exist_ok=True)
    return
  for root, _, files in os.walk(src):
    rel = os.path.relpath(root, src)
    target = dst if rel == '.' else dst / rel
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        (target / name).write_bytes(f.read())

"""Reading and writing Hugging Face checkpoint directories with numpy only.

Conversion never imports torch and never unpickles: tensors come from safetensors'
numpy API, one at a time, so a checkpoint sharded over n files converts holding about
one tensor (plus the growing result) in host memory. A pickle checkpoint is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt')


class ConversionError(ValueError):
  """A checkpoint that does not fit the architecture, or cannot be read safely."""


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
  path = Path(hf_dir) / 'config.json'
  if not path.is_file():
    raise ConversionError(f'{path}: not found; a Hugging Face model directory holds '
                          'config.json next to its safetensors weights')
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from e
  if 'model_type' not in config:
    raise ConversionError(f'{path}: has no "model_type" key; cannot tell the architecture')
  return config


class TensorReader:
  """Lazy access to the tensors of ``model.safetensors`` or a sharded checkpoint."""

  def __init__(self, hf_dir: str | os.PathLike):
    self.dir = Path(hf_dir)
    index = self.dir / INDEX_FILE
    if index.is_file():
      weight_map = json.loads(index.read_text()).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ConversionError(f'{index}: has no "weight_map" object')
      self._file_of = {name: self.dir / f for name, f in weight_map.items()}
    elif (self.dir / SINGLE_FILE).is_file():
      with safe_open(self.dir / SINGLE_FILE, framework='np') as f:
        self._file_of = {name: self.dir / SINGLE_FILE for name in f.keys()}
    else:
      pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES) \
          if self.dir.is_dir() else []
      if pickles:
        raise ConversionError(
            f'{self.dir}: only pickle weights ({", ".join(pickles)}); unifer never unpickles '
            'checkpoints. Convert them to safetensors first, e.g. in Python: '
            '`AutoModel.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)`, '
            'or use the Hub\'s safetensors conversion.')
      raise ConversionError(f'{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} found')
    self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(set(self._file_of.values())):
      if not path.is_file():
        raise ConversionError(f'{path}: listed in {INDEX_FILE} but missing')
      with safe_open(path, framework='np') as f:
        for name in f.keys():
          sl = f.get_slice(name)
          self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
    missing = sorted(set(self._file_of) - set(self._meta))
    if missing:
      raise ConversionError(f'{self.dir}: the index names tensors absent from their files: {missing[:10]}')

  def keys(self) -> list[str]:
    return list(self._meta)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: v[0] for k, v in self._meta.items()}

  def shape(self, name: str) -> tuple[int, ...]:
    return self._meta[name][0]

  def dtype(self, name: str) -> str:
    return self._meta[name][1]

  def __contains__(self, name: str) -> bool:
    return name in self._meta

  def get(self, name: str) -> np.ndarray:
    if name not in self._meta:
      raise ConversionError(f'{self.dir}: no tensor named {name!r}')
    with safe_open(self._file_of[name], framework='np') as f:
      return f.get_tensor(name)


def check_keys(expected: Mapping[str, tuple], found: Mapping[str, tuple], what: str) -> None:
  """Raises one ConversionError naming every missing, unexpected and mis-shaped tensor."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  mismatched = sorted(k for k in set(expected) & set(found)
                      if tuple(expected[k]) != tuple(found[k]))
  if not (missing or unexpected or mismatched):
    return
  lines = [f'{what}: the checkpoint does not match the architecture']
  if missing:
    lines.append(f'  missing ({len(missing)}): ' + ', '.join(missing))
  if unexpected:
    lines.append(f'  unexpected ({len(unexpected)}): ' + ', '.join(unexpected))
  for k in mismatched:
    lines.append(f'  shape mismatch {k}: expected {tuple(expected[k])}, found {tuple(found[k])}')
  raise ConversionError('\n'.join(lines))


def write_hf_dir(out_dir: str | os.PathLike, hf_config: Mapping, tensors: Iterable[tuple[str, np.ndarray]],
                 max_shard_bytes: int = 2 << 30) -> list[Path]:
  """Writes ``config.json`` and the tensors as one file or as shards with an index.

  Tensors are consumed from the iterator and flushed shard by shard, so peak memory is
  about one shard however large the model.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'config.json').write_text(json.dumps(dict(hf_config), indent=2, sort_keys=True))
  written: list[tuple[Path, list[str]]] = []
  current: dict[str, np.ndarray] = {}
  size = 0
  total = 0

  def flush():
    nonlocal current, size
    if current:
      path = out / f'shard-{len(written):05d}.tmp'
      save_file({k: np.ascontiguousarray(v) for k, v in current.items()}, str(path),
                metadata={'format': 'pt'})
      written.append((path, list(current)))
    current, size = {}, 0

  for name, array in tensors:
    if name in current or any(name in names for _, names in written):
      raise ConversionError(f'tensor {name!r} written twice')
    nbytes = int(np.asarray(array).nbytes)
    if current and size + nbytes > max_shard_bytes:
      flush()
    current[name] = np.asarray(array)
    size += nbytes
    total += nbytes
  flush()

  if len(written) == 1:
    final = out / SINGLE_FILE
    written[0][0].replace(final)
    return [final]
  n = len(written)
  weight_map, paths = {}, []
  for i, (tmp, names) in enumerate(written):
    final = out / f'model-{i + 1:05d}-of-{n:05d}.safetensors'
    tmp.replace(final)
    paths.append(final)
    weight_map.update({k: final.name for k in names})
  (out / INDEX_FILE).write_text(json.dumps(
      {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2, sort_keys=True))
  return paths


class PrefixView:
  """The tensors of ``reader`` whose names start with ``prefix``, named without it: a tower
  inside a whole checkpoint (``language_model.`` of a BLIP-2) read exactly as the
  standalone model's checkpoint would be."""

  def __init__(self, reader: TensorReader, prefix: str):
    self.reader, self.prefix = reader, prefix
    self.dir = reader.dir
    self._names = [k[len(prefix):] for k in reader.keys() if k.startswith(prefix)]

  def keys(self) -> list[str]:
    return list(self._names)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: self.reader.shape(self.prefix + k) for k in self._names}

  def shape(self, name: str) -> tuple[int, ...]:
    return self.reader.shape(self.prefix + name)

  def dtype(self, name: str) -> str:
    return self.reader.dtype(self.prefix + name)

  def __contains__(self, name: str) -> bool:
    return (self.prefix + name) in self.reader

  def get(self, name: str) -> np.ndarray:
    return self.reader.get(self.prefix + name)

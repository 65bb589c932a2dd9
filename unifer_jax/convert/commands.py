"""``unifer convert from-hf`` / ``to-hf`` and the converted tower directory they share.

A converted tower directory holds one tower (LLM, vision encoder or Q-Former/BERT)::

  DIR/config.json   {"format": "unifer-tower", "tower": "llm", "model_type": "llama",
                     "source": ..., "config": {our tower config}}
  DIR/params/       orbax checkpoint (PyTreeSave) of the pure param dict, exactly
                    ``nnx.to_pure_dict(nnx.state(tower.build(config), nnx.Param))``

:func:`read_tower` opens either such a directory or a Hugging Face model directory,
reading only configs; ``Tower.params()`` then reads the weights. Weights pass through
host memory once: from-hf holds the converted params (read one safetensors tensor at a
time) while orbax writes them; to-hf holds the restored params while the HF tensors
are produced and flushed shard by shard. Dtypes are kept unless ``--dtype`` asks.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from unifer_jax import convert
from unifer_jax.convert import hf_io
from unifer_jax.convert.hf_io import ConversionError

FORMAT = 'unifer-tower'
PARAMS_DIR = 'params'
# Where each tower keeps its layer stack: [L, ...] leaves when scanned, {i: ...} when not.
STACK_KEY = {'llm': 'layers', 'vision': 'blocks', 'qformer': 'blocks'}


def path_str(path) -> str:
  return '/'.join(map(str, path))


@dataclasses.dataclass
class Tower:
  """One tower checkpoint: a Hugging Face directory or a converted tower directory."""
  path: Path
  converter: ModuleType  # convert.llm | convert.vision | convert.qformer
  model_type: str  # the Hugging Face model_type it came from
  cfg: ml_collections.ConfigDict  # our tower config (architecture as the checkpoint has it)
  is_hf: bool

  @property
  def kind(self) -> str:
    return self.converter.__name__.rsplit('.', 1)[-1]

  def describe(self) -> str:
    return f'{self.path} ({"HF " if self.is_hf else "converted "}{self.model_type})'

  def params(self, cfg=None) -> dict:
    """Pure numpy param dict in the layout of ``cfg`` (default: the checkpoint's own);
    ``cfg`` may change ``scan_layers`` and run-level keys, not the architecture."""
    cfg = self.cfg if cfg is None else cfg
    if self.is_hf:
      return self.converter.params_from_hf(hf_io.TensorReader(self.path), cfg)
    params = restore_params(self.path / PARAMS_DIR, self.converter, self.cfg)
    scan, stored = bool(cfg.get('scan_layers', True)), bool(self.cfg.get('scan_layers', True))
    return restack(params, STACK_KEY[self.kind], scan) if scan != stored else params


def read_tower(path) -> Tower:
  """The tower in ``path`` (configs only; no weights are read)."""
  path = Path(path)
  config_file = path / 'config.json'
  if not config_file.is_file():
    raise ConversionError(f'{config_file}: not found; expected a Hugging Face model directory '
                          'or a directory written by `unifer convert from-hf`')
  try:
    meta = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f'{config_file}:{e.lineno}: not valid JSON ({e.msg})') from e
  if meta.get('format') == FORMAT:
    missing = [k for k in ('tower', 'model_type', 'config') if k not in meta]
    if missing:
      raise ConversionError(f'{config_file}: a {FORMAT} config without {missing}')
    converter = convert.tower_for(meta['model_type'])
    if converter.__name__.rsplit('.', 1)[-1] != meta['tower']:
      raise ConversionError(f'{config_file}: tower={meta["tower"]!r} does not hold '
                            f'model_type={meta["model_type"]!r}')
    return Tower(path, converter, meta['model_type'],
                 ml_collections.ConfigDict(meta['config']), is_hf=False)
  hf_config = hf_io.read_hf_config(path)
  converter = convert.tower_for(hf_config['model_type'])
  return Tower(path, converter, hf_config['model_type'],
               convert.tower_config(converter, hf_config, path), is_hf=True)


# -- the converted directory -----------------------------------------------------------

def abstract_params(converter: ModuleType, cfg) -> dict:
  module = nnx.eval_shape(lambda: converter.build(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def restore_params(params_dir: Path, converter: ModuleType, cfg) -> dict:
  """The orbax-saved pure dict as numpy arrays (their saved dtypes), shapes checked."""
  import orbax.checkpoint as ocp
  if not params_dir.is_dir():
    raise ConversionError(f'{params_dir}: not found (a converted tower directory holds its '
                          'weights there)')
  target = abstract_params(converter, cfg)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    params = ocp.PyTreeCheckpointer().restore(
        params_dir.absolute(), args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
  except ValueError as e:  # orbax: the saved tree has other parameter names
    raise ConversionError(f'{params_dir}: does not hold the parameters of its config.json:\n'
                          f'{e}') from None
  flat = lambda t: {path_str(p): tuple(v.shape) for p, v in
                    traverse_util.flatten_dict(t).items()}
  hf_io.check_keys(flat(target), flat(params), f'{params_dir} (orbax params)')
  return params


def write_tower_dir(out: Path, converter: ModuleType, model_type: str, cfg, params: dict,
                    source: str = '') -> None:
  import orbax.checkpoint as ocp
  out.mkdir(parents=True, exist_ok=True)
  # Holding the model once while it is written (measured on a 1.16 GB bf16 LLM: +2.0x
  # with orbax's defaults, +0.06x so): a synchronous save of numpy leaves nothing modifies
  # meanwhile needs no deep copy of each host array, and zstd keeps every compressed
  # chunk in memory until the commit, for ~25% smaller files on random-like weights.
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      type_handler_registry=registry, use_compression=False))
  checkpointer.save((out / PARAMS_DIR).absolute(), args=ocp.args.PyTreeSave(params))
  meta = dict(format=FORMAT, tower=converter.__name__.rsplit('.', 1)[-1], model_type=model_type,
              source=source, config=cfg.to_dict())
  (out / 'config.json').write_text(json.dumps(meta, indent=2, sort_keys=True))


def restack(params: dict, key: str, scan: bool) -> dict:
  """Scanned ``{key: {..: [L, ...]}}`` <-> unrolled ``{key: {i: {..}}}``."""
  stack = params[key]
  if scan:
    layers = [stack[i] for i in sorted(stack)]
    params[key] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  else:
    n = len(jax.tree.leaves(stack)[0])
    params[key] = {i: jax.tree.map(lambda x: x[i], stack) for i in range(n)}
  return params


def floating_dtype(params: dict) -> str | None:
  """The one floating dtype of the params, or None if they mix several."""
  names = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)
           if np.issubdtype(x.dtype, np.floating) or np.dtype(x.dtype).name == 'bfloat16'}
  return names.pop() if len(names) == 1 else None


def cast_params(params: dict, dtype: str) -> dict:
  """Casts every leaf in place, one at a time (each old array is freed as it goes)."""
  target = np.dtype(jax.numpy.dtype(dtype))
  for key, value in params.items():
    if isinstance(value, dict):
      cast_params(value, dtype)
    else:
      params[key] = np.asarray(value).astype(target, copy=False)
  return params


# -- commands --------------------------------------------------------------------------

def _empty_out(out: Path) -> None:
  if out.exists() and any(out.iterdir()):
    raise ConversionError(f'--out {out}: exists and is not empty; choose a new directory')


def from_hf(src, out, dtype: str | None = None) -> tuple[Tower, int]:
  """Converts the HF directory ``src`` into a converted tower directory ``out``;
  returns (the HF tower, number of parameters)."""
  src, out = Path(src), Path(out)
  tower = read_tower(src)
  if not tower.is_hf:
    raise ConversionError(f'--src {src}: already a converted tower directory '
                          '(to-hf writes it back as a Hugging Face directory)')
  _empty_out(out)
  params = tower.params()
  if dtype:
    cast_params(params, dtype)
  tower.cfg.param_dtype = floating_dtype(params) or tower.cfg.param_dtype
  write_tower_dir(out, tower.converter, tower.model_type, tower.cfg, params,
                  source=str(src.absolute()))
  return tower, sum(x.size for x in jax.tree.leaves(params))


def to_hf(src, out, dtype: str | None = None, max_shard_bytes: int = 2 << 30
          ) -> tuple[Tower, dict, list[Path]]:
  """Writes the tower in ``src`` as an HF directory (config.json + safetensors);
  returns (the tower, the HF config written, the safetensors files)."""
  src, out = Path(src), Path(out)
  tower = read_tower(src)
  _empty_out(out)
  tower.converter.hf_config_from(tower.cfg)  # refuse before reading any weight
  params = tower.params()
  if dtype:
    cast_params(params, dtype)
  cfg = ml_collections.ConfigDict(tower.cfg.to_dict())
  cfg.param_dtype = floating_dtype(params) or cfg.param_dtype
  hf_config = tower.converter.hf_config_from(cfg)
  files = hf_io.write_hf_dir(out, hf_config, tower.converter.params_to_hf(params, cfg),
                             max_shard_bytes=max_shard_bytes)
  return tower, hf_config, files


def run(args) -> int:
  """Entry of ``unifer convert``; bad input is a message and exit code 2, never a traceback."""
  try:
    if args.convert_command == 'from-hf':
      tower, n = from_hf(args.src, args.out, args.dtype)
      print(f'from-hf: {tower.describe()} -> {args.out}: {tower.kind} tower, {n:,} parameters, '
            f'{tower.cfg.param_dtype}')
      return 0
    if args.convert_command == 'to-hf':
      tower, hf_config, files = to_hf(args.src, args.out, args.dtype,
                                      parse_size(args.max_shard_size))
      print(f'to-hf: {tower.describe()} -> {args.out}: {hf_config["architectures"][0]}, '
            f'{len(files)} safetensors file(s), {hf_config.get("dtype", "")}')
      return 0
    from unifer_jax.convert import check
    return check.run(args)
  except (ValueError, OSError) as e:  # ConversionError is a ValueError
    print(f'unifer convert {args.convert_command}: error: {e}', file=sys.stderr)
    return 2


def parse_size(text: str) -> int:
  """'2GB', '500MB', '300KB' or bytes -> bytes (HF's max_shard_size spelling)."""
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*', text, re.IGNORECASE)
  if not m:
    raise ConversionError(f'--max-shard-size {text!r}: expected e.g. 2GB, 500MB or bytes')
  unit = (m.group(2) or 'B').upper().replace('I', '')
  scale = {'B': 1, 'KB': 1 << 10, 'MB': 1 << 20, 'GB': 1 << 30}[unit]
  return int(float(m.group(1)) * scale)


def export_to_temp_hf(tower: Tower) -> Path:
  """A temporary HF directory of a converted tower (for code that reads HF layouts);
  the caller removes it."""
  tmp = Path(tempfile.mkdtemp(prefix='unifer_tower_'))
  try:
    to_hf(tower.path, tmp / 'hf')
  except Exception:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return tmp / 'hf'

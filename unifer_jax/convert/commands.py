"""``unifer convert from-hf`` / ``to-hf`` and the converted tower directory they share.

A converted tower directory holds one tower (LLM, vision encoder or Q-Former/BERT) or a
whole VLM (``tower: "vlm"``, a BLIP-2 / InstructBLIP as one UniFER)::

  DIR/config.json   {"format": "unifer-tower", "tower": "llm", "model_type": "llama",
                     "source": ..., "config": {our tower config}}
  DIR/params/       orbax checkpoint (PyTreeSave) of the pure param dict, exactly
                    ``nnx.to_pure_dict(nnx.state(tower.build(config), nnx.Param))``;
                    for a VLM one such checkpoint per part, ``params/<part>/``
                    (``convert.vlm.PARTS``), so each converts alone

:func:`read_tower` opens either such a directory or a Hugging Face model directory,
reading only configs; ``Tower.params()`` then reads the weights. Weights pass through
host memory once: from-hf holds the converted params (read one safetensors tensor at a
time) while orbax writes them; to-hf holds the restored params while the HF tensors
are produced and flushed shard by shard. Dtypes are kept unless ``--dtype`` asks.
"""

from __future__ import annotations

import dataclasses
import importlib
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
# A VLM's parts that hold a layer stack: part -> (model config key, tower kind).
VLM_STACKS = {'vit': ('vit', 'vision'), 'qformer': ('qformer', 'qformer'), 'llm': ('llm', 'llm')}


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

  @property
  def parts(self) -> tuple[str, ...]:
    """What converts alone: a VLM's parts, or '' (the whole tower)."""
    return getattr(self.converter, 'PARTS', ('',))

  def params(self, cfg=None) -> dict:
    """Pure numpy param dict in the layout of ``cfg`` (default: the checkpoint's own);
    ``cfg`` may change ``scan_layers`` and run-level keys, not the architecture."""
    if self.parts == ('',):
      return self.part_params('', cfg)
    return {part: self.part_params(part, cfg) for part in self.parts}

  def part_params(self, part: str, cfg=None) -> dict:
    """One part's params (``part`` from :attr:`parts`; '' is the whole tower)."""
    cfg = self.cfg if cfg is None else cfg
    if self.is_hf:
      reader = hf_io.TensorReader(self.path)
      if not part:
        return self.converter.params_from_hf(reader, cfg)
      return self.converter.part_from_hf(reader, cfg, part)
    params = restore_params(self.path / PARAMS_DIR / part, self.converter, self.cfg, part)
    if not part:
      stacks = {'': (None, self.kind)}
    else:
      stacks = {part: VLM_STACKS[part]} if part in VLM_STACKS else {}
    for key, (sub, kind) in stacks.items():
      want, have = (cfg[sub], self.cfg[sub]) if sub else (cfg, self.cfg)
      scan, stored = bool(want.get('scan_layers', True)), bool(have.get('scan_layers', True))
      if scan != stored:
        params = restack(params, STACK_KEY[kind], scan)
    return params


@dataclasses.dataclass
class PartTower(Tower):
  """The vision / Q-Former / LLM tower inside a whole-VLM checkpoint, read as a tower
  (``config.init.vision=BLIP2_DIR`` and the like)."""
  whole: Tower | None = None
  part: str = ''

  def params(self, cfg=None) -> dict:
    whole_cfg = ml_collections.ConfigDict(self.whole.cfg.to_dict())
    if cfg is not None:
      whole_cfg[self.part] = cfg
    return self.whole.part_params(self.part, whole_cfg)


def part_tower(tower: Tower, kind: str) -> Tower:
  """``tower`` itself, or the ``kind`` tower ('vision' | 'qformer' | 'llm') of a VLM."""
  if tower.kind != 'vlm' or kind == 'vlm':
    return tower
  part = {'vision': 'vit', 'qformer': 'qformer', 'llm': 'llm'}[kind]
  converter = importlib.import_module(f'unifer_jax.convert.{kind}')
  return PartTower(tower.path, converter, tower.model_type, tower.cfg[part], tower.is_hf,
                   whole=tower, part=part)


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
  from unifer_jax.convert import workdir  # pylint: disable=g-import-not-at-top  (cycle)
  if workdir.is_workdir(path, meta):  # a trained UniFER, back out as BLIP-2 / InstructBLIP
    return workdir.read_tower(path)
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
  converter, hf_config, cfg = convert.hf_tower_config(path)
  return Tower(path, converter, hf_config['model_type'], cfg, is_hf=True)


# -- the converted directory -----------------------------------------------------------

def abstract_params(converter: ModuleType, cfg) -> dict:
  module = nnx.eval_shape(lambda: converter.build(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def restore_params(params_dir: Path, converter: ModuleType, cfg, part: str = '') -> dict:
  """The orbax-saved pure dict (of one VLM ``part``) as numpy arrays (their saved
  dtypes), names and shapes checked against the config before anything is read."""
  import orbax.checkpoint as ocp
  if not params_dir.is_dir():
    raise ConversionError(f'{params_dir}: not found (a converted tower directory holds its '
                          'weights there)')
  target = abstract_params(converter, cfg)
  target = target[part] if part else target
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(params_dir.absolute()).item_metadata.tree
  flat = lambda t: {path_str(p): tuple(v.shape) for p, v in
                    traverse_util.flatten_dict(t).items()}
  hf_io.check_keys(flat(target), flat(saved), f'{params_dir} (orbax params)')
  # Leaves are read in groups of <= 1 GB: tensorstore reads each leaf through a buffer of
  # its own size, so restoring a 7B LLM part in one call held it twice (OOM at 16.8 GB).
  restored = {}
  flat_target = traverse_util.flatten_dict(target)
  for group in leaf_groups(flat_target, max_bytes=1 << 30):
    item = traverse_util.unflatten_dict({k: flat_target[k] for k in group})
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    got = checkpointer.restore(params_dir.absolute(), args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    restored.update(traverse_util.flatten_dict(got))
  return traverse_util.unflatten_dict(restored)


def leaf_groups(flat: dict, max_bytes: int) -> list[list]:
  """The keys of ``flat`` (abstract or real arrays) in order, cut into groups of at most
  ``max_bytes`` (a larger leaf is a group of its own)."""
  groups, size = [[]], 0
  for key, leaf in flat.items():
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(key)
    size += nbytes
  return groups


def save_params(params_dir: Path, params: dict) -> None:
  import orbax.checkpoint as ocp
  # Holding the model once while it is written (measured on a 1.16 GB bf16 LLM: +2.0x
  # with orbax's defaults, +0.06x so): a synchronous save of numpy leaves nothing modifies
  # meanwhile needs no deep copy of each host array, and zstd keeps every compressed
  # chunk in memory until the commit, for ~25% smaller files on random-like weights.
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      type_handler_registry=registry, use_compression=False))
  # One data file per leaf: orbax's default (2 GB files) splits a larger leaf across
  # files through a copy of it (a 7B part's two 2.9 GB stacked MLP weights: +5.5 GB
  # peak, +21 MB with this setting).
  checkpointer.save(params_dir.absolute(),
                    args=ocp.args.PyTreeSave(params, ocdbt_target_data_file_size=0))


def write_tower_config(out: Path, converter: ModuleType, model_type: str, cfg,
                       source: str = '') -> None:
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


def _set_param_dtype(cfg, dtypes: set) -> None:
  """Records the checkpoint's floating dtype in the tower config(s) it describes."""
  if len(dtypes) != 1:
    return
  dtype = dtypes.pop()
  for sub in ([cfg[k] for k in ('vit', 'qformer', 'llm') if k in cfg] or [cfg]):
    sub.param_dtype = dtype


def from_hf(src, out, dtype: str | None = None) -> tuple[Tower, int]:
  """Converts the HF directory ``src`` into a converted tower directory ``out`` one part
  at a time; returns (the HF tower, number of parameters)."""
  src, out = Path(src), Path(out)
  tower = read_tower(src)
  if not tower.is_hf:
    raise ConversionError(f'--src {src}: already a converted tower directory '
                          '(to-hf writes it back as a Hugging Face directory)')
  _empty_out(out)
  if hasattr(tower.converter, 'check_prefixes'):
    tower.converter.check_prefixes(hf_io.TensorReader(src))
  count, dtypes = 0, set()
  for part in tower.parts:
    params = tower.part_params(part)
    if dtype:
      cast_params(params, dtype)
    if part != 'llm_proj':  # the projection follows the Q-Former's dtype
      dtypes.add(floating_dtype(params))
    save_params(out / PARAMS_DIR / part, params)
    count += sum(x.size for x in jax.tree.leaves(params))
    del params
  _set_param_dtype(tower.cfg, dtypes - {None})
  write_tower_config(out, tower.converter, tower.model_type, tower.cfg,
                     source=str(src.absolute()))
  return tower, count


def _hf_config(tower: Tower, cfg) -> dict:
  # A vision tower goes back as the model_type it came from: an InstructBLIP vision model
  # as InstructBlipVisionModel, not as the Blip2VisionModel of the same layout.
  if tower.kind == 'vision':
    return tower.converter.hf_config_from(cfg, tower.model_type)
  return tower.converter.hf_config_from(cfg)


def to_hf(src, out, dtype: str | None = None, max_shard_bytes: int = 2 << 30
          ) -> tuple[Tower, dict, list[Path]]:
  """Writes the tower in ``src`` as an HF directory (config.json + safetensors);
  returns (the tower, the HF config written, the safetensors files)."""
  src, out = Path(src), Path(out)
  tower = read_tower(src)
  _empty_out(out)
  _hf_config(tower, tower.cfg)  # refuse before reading any weight
  cfg = ml_collections.ConfigDict(tower.cfg.to_dict())
  if tower.parts == ('',):
    params = tower.params()
    if dtype:
      cast_params(params, dtype)
    cfg.param_dtype = floating_dtype(params) or cfg.param_dtype
  else:  # a VLM: each part is restored when its tensors are written, then freed
    params = _LazyParts(tower, dtype)
    if dtype:
      _set_param_dtype(cfg, {dtype})
  hf_config = _hf_config(tower, cfg)
  files = hf_io.write_hf_dir(out, hf_config, tower.converter.params_to_hf(params, cfg),
                             max_shard_bytes=max_shard_bytes)
  return tower, hf_config, files


class _LazyParts:
  """``{part: params}`` of a VLM that restores a part each time it is looked up."""

  def __init__(self, tower: Tower, dtype: str | None):
    self.tower, self.dtype = tower, dtype

  def __getitem__(self, part: str) -> dict:
    params = self.tower.part_params(part)
    return cast_params(params, self.dtype) if self.dtype else params


def run(args) -> int:
  """Entry of ``unifer convert``; bad input is a message and exit code 2, never a traceback."""
  try:
    if args.convert_command == 'from-hf':
      tower, n = from_hf(args.src, args.out, args.dtype)
      cfg = tower.cfg
      dtype = cfg.llm.param_dtype if tower.kind == 'vlm' else cfg.param_dtype
      print(f'from-hf: {tower.describe()} -> {args.out}: {tower.kind} tower, {n:,} parameters, '
            f'{dtype}')
      return 0
    if args.convert_command == 'to-hf':
      tower, hf_config, files = to_hf(args.src, args.out, args.dtype,
                                      parse_size(args.max_shard_size))
      notes = '; '.join(getattr(tower, 'notes', ()))
      print(f'to-hf: {tower.describe()} -> {args.out}: {hf_config["architectures"][0]}, '
            f'{len(files)} safetensors file(s), {hf_config.get("dtype", "")}'
            + (f' ({notes})' if notes else ''))
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

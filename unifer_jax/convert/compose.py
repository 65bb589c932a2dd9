"""A UniFER built from pretrained towers: ``config.init = dict(vision=, qformer=, llm=)``,
or from a whole pretrained VLM: ``config.init = dict(vlm=)``.

Each entry names a Hugging Face model directory or a converted tower directory
(``unifer convert from-hf``); '' leaves that tower random. ``vlm`` takes a whole BLIP-2 /
InstructBLIP (every tower, the aligned queries and the projection; ``convert.vlm``); a
tower key may also name a whole VLM, whose tower of that kind it then reads. Two steps,
both called by ``train/state.py``:

* :func:`model_config_with_init` -- the towers' architectures come from the checkpoints'
  configs (the vision tower's width decides ``qformer.encoder_width``; the LLM's hidden
  size decides ``llm_proj``); run-level keys (``dtype``, ``param_dtype``, ``scan_layers``,
  ``unroll_layers``, ``remat``) stay the model config's.
* :func:`apply_init` -- after the random init, each named tower's weights replace the
  random ones (cast to the parameter dtype, placed in the existing shardings); returns an
  :class:`InitReport` saying which parameters were loaded and which stay fresh.

The Q-Former follows BLIP-2: from a BERT (``init_qformer_from_bert``) the self-attention,
text FFN, embeddings (and MLM head if the checkpoint has one) load, the query FFN starts
as a copy of BERT's FFN, and the cross-attention and query tokens are fresh; from a
Q-Former checkpoint (Blip2QFormerModel, BLIP-2's Q-Former, a converted one) its weights
load and the text side (absent from BLIP-2 Q-Formers) is fresh; an InstructBLIP Q-Former
brings its text side (vocabulary, positions, ``instruction_aware``) and only an ITG head
stays fresh. Fresh parameters keep the values of the random init.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from unifer_jax import convert
from unifer_jax.convert import commands, qformer as convert_qformer
from unifer_jax.convert.hf_io import ConversionError, check_keys

INIT_KEYS = ('vlm', 'vision', 'qformer', 'llm')
# config.init key -> the UniFER submodule (and model config key) it initialises.
SUBMODULE = {'vision': 'vit', 'qformer': 'qformer', 'llm': 'llm'}
# Model config keys a whole VLM decides besides its towers' configs.
_VLM_MODEL_KEYS = ('vision_layernorm', 'vision_token_gain', 'image_token_index')
# Keys of a tower config that belong to the run, not to the checkpoint's architecture.
RUN_KEYS = ('dtype', 'param_dtype', 'scan_layers', 'unroll_layers', 'remat', 'attention')
# What a BERT and a Q-Former checkpoint decide about our Q-Former config.
_BERT_KEYS = ('hidden', 'depth', 'heads', 'mlp_dim', 'max_position', 'layer_norm_eps', 'act')
_QFORMER_KEYS = ('hidden', 'depth', 'heads', 'mlp_dim', 'layer_norm_eps', 'act',
                 'cross_attention_freq', 'encoder_width')


def init_sources(init) -> dict[str, str]:
  """The non-empty entries of ``config.init``."""
  if not init:
    return {}
  # 'checkpoint' (an earlier stage's workdir) is the trainer's warm start, not a tower.
  init = {k: v for k, v in dict(init).items() if k != 'checkpoint'}
  unknown = sorted(set(init) - set(INIT_KEYS))
  if unknown:
    raise ConversionError(f'config.init: unknown keys {unknown}; expected '
                          f'{list(INIT_KEYS) + ["checkpoint"]}')
  return {k: str(v) for k, v in init.items() if v}


def has_init(config) -> bool:
  return bool(init_sources(config.get('init')))


def read_init(init) -> dict[str, commands.Tower]:
  """config.init key -> its tower (configs only), each checked to be the right kind."""
  towers = {}
  sources = init_sources(init)
  if 'vlm' in sources and len(sources) > 1:
    raise ConversionError(f'config.init: vlm={sources["vlm"]} loads every tower; drop '
                          f'{sorted(set(sources) - {"vlm"})} or the vlm entry')
  for key, path in sources.items():
    try:
      tower = commands.part_tower(commands.read_tower(path), key)
    except ConversionError as e:
      raise ConversionError(f'config.init.{key}={path}: {e}') from None
    if tower.kind != key:
      wanted = sorted(t for t, kind in convert.supported_model_types().items() if kind == key)
      raise ConversionError(f'config.init.{key}={path}: holds a {tower.kind} checkpoint '
                            f'(model_type {tower.model_type!r}); init.{key} needs one of: '
                            f'{", ".join(wanted)}')
    towers[key] = tower
  return towers


# -- configs ---------------------------------------------------------------------------

def _with_run_keys(arch, model_tower) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(arch.to_dict())
  for key in RUN_KEYS:
    if key in model_tower:
      out[key] = model_tower[key]
  return out


def _qformer_config(tower: commands.Tower, q) -> ml_collections.ConfigDict:
  c, q = tower.cfg, ml_collections.ConfigDict(q.to_dict())
  if c.cross_attention_freq == 0:  # a BERT: BLIP-2's start
    q.update({k: c[k] for k in _BERT_KEYS})
    # The Q-Former's text side reads BERT's tokenizer: at least BERT's vocabulary (more
    # rows, e.g. a [DEC] token, stay fresh); token types none (folded) or BERT's.
    q.vocab_size = max(q.vocab_size, c.vocab_size)
    if q.type_vocab_size:
      q.type_vocab_size = c.type_vocab_size
  else:  # a Q-Former: its queries if it has them
    q.update({k: c[k] for k in _QFORMER_KEYS})
    q.num_queries = c.num_queries or q.num_queries
    if c.vocab_size:  # InstructBLIP's: its text side (no token types) and its use
      q.update(vocab_size=c.vocab_size, max_position=c.max_position, type_vocab_size=0,
               instruction_aware=c.get('instruction_aware', False))
    # otherwise the text side stays the model's
  return q


def model_config_with_init(model_cfg, init) -> ml_collections.ConfigDict:
  """``model_cfg`` with the tower configs of the checkpoints named in ``init``."""
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  towers = read_init(init)
  if 'vlm' in towers:
    whole = towers['vlm'].cfg
    for sub in SUBMODULE.values():
      cfg[sub] = _with_run_keys(whole[sub], cfg[sub])
    for key in _VLM_MODEL_KEYS:
      cfg[key] = whole[key]
    return cfg
  if 'vision' in towers:
    cfg.vit = _with_run_keys(towers['vision'].cfg, cfg.vit)
  if 'llm' in towers:
    cfg.llm = _with_run_keys(towers['llm'].cfg, cfg.llm)
  if 'qformer' in towers:
    cfg.qformer = _qformer_config(towers['qformer'], cfg.qformer)
    if towers['qformer'].cfg.cross_attention_freq and cfg.qformer.encoder_width != cfg.vit.width:
      vision = f'init.vision={towers["vision"].path}' if 'vision' in towers else 'model.vit'
      raise ConversionError(
          f'config.init.qformer={towers["qformer"].path}: its cross-attention reads image '
          f'tokens of width {cfg.qformer.encoder_width}, but the vision tower ({vision}) has '
          f'width {cfg.vit.width}')
  cfg.qformer.encoder_width = cfg.vit.width
  return cfg


# -- weights ---------------------------------------------------------------------------

@dataclasses.dataclass
class InitReport:
  sources: dict[str, str] = dataclasses.field(default_factory=dict)  # submodule -> checkpoint
  loaded: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # submodule -> paths
  fresh: list[str] = dataclasses.field(default_factory=list)  # '[a:]': only rows a: fresh
  note: dict[str, str] = dataclasses.field(default_factory=dict)

  def summary(self) -> str:
    lines = []
    for sub, source in self.sources.items():
      extra = f' ({self.note[sub]})' if sub in self.note else ''
      lines.append(f'init: {sub} <- {source}: {len(self.loaded[sub])} parameters loaded{extra}')
    by_module: dict[str, list[str]] = {}
    for path in self.fresh:
      by_module.setdefault(path.split('/')[0], []).append(path)
    parts = []
    for module, paths in by_module.items():
      whole = module not in self.loaded and all('[' not in p for p in paths)
      parts.append(f'{module}/* (all {len(paths)})' if whole and len(paths) > 2
                   else ', '.join(paths))
    lines.append(f'init: fresh (random init): {"; ".join(parts) or "none"}')
    return '\n'.join(lines)


def _name(path) -> str:
  return '/'.join(map(str, path))


def _bert_qformer_params(tower: commands.Tower, q, seed: int) -> tuple[dict, list[str], str]:
  """BLIP-2 init from BERT: (loaded flat params, partially fresh names, note)."""
  bert_dir, tmp = tower.path, None
  if not tower.is_hf:  # init_qformer_from_bert reads HF layouts: export once to a temp dir
    bert_dir = commands.export_to_temp_hf(tower)
    tmp = bert_dir.parent
  try:
    params, fresh = convert_qformer.init_qformer_from_bert(bert_dir, q, nnx.Rngs(seed))
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  whole = set(fresh)
  flat = {p: v for p, v in traverse_util.flatten_dict(params).items() if _name(p) not in whole}
  return flat, [f for f in fresh if '[' in f], 'BLIP-2 init from BERT'


def _tower_params(key: str, tower: commands.Tower, target_cfg, seed: int):
  if key != 'qformer':
    return traverse_util.flatten_dict(tower.params(target_cfg)), [], ''
  if tower.cfg.cross_attention_freq == 0:
    return _bert_qformer_params(tower, target_cfg, seed)
  # A Q-Former checkpoint holds no ITG head, no token types and no pooler, and a BLIP-2
  # one no text side at all: read it with its own layout (the rest stays fresh).
  src = ml_collections.ConfigDict(target_cfg.to_dict())
  src.update(vocab_size=tower.cfg.vocab_size, type_vocab_size=0, lm_head=False, pooler=False,
             num_queries=tower.cfg.num_queries, instruction_aware=False)  # same params
  return traverse_util.flatten_dict(tower.params(src)), [], ''


def _place(target, value: np.ndarray):
  """``value`` with ``target``'s dtype, and its sharding if it is a jax.Array."""
  value = np.asarray(value).astype(target.dtype, copy=False)
  if isinstance(target, jax.Array):
    return jax.make_array_from_callback(target.shape, target.sharding, lambda i: value[i])
  return value


def _load(params: dict, sub: str, host: dict, where: str, report: InitReport) -> None:
  """Moves the flat ``host`` arrays into ``params[sub]`` (shapes checked), in place."""
  target = params[sub]
  targets = traverse_util.flatten_dict(target)
  check_keys({_name(p): targets[p].shape for p in host if p in targets},
             {_name(p): v.shape for p, v in host.items()}, where)
  report.loaded[sub] = sorted(f'{sub}/{_name(p)}' for p in host)
  for path in list(host):
    node = target
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = _place(targets.pop(path), host.pop(path))  # one array at a time


def apply_init(params: dict, init, model_cfg, *, seed: int = 0) -> tuple[dict, InitReport]:
  """Replaces the random weights of the towers named in ``init`` (in place) with the
  checkpoints' ones; ``model_cfg`` must come from :func:`model_config_with_init`."""
  report = InitReport()
  all_names = [_name(p) for p in traverse_util.flatten_dict(params)]
  for key, tower in read_init(init).items():
    if key == 'vlm':  # one part in host memory at a time
      for part in tower.parts:
        host = traverse_util.flatten_dict(tower.part_params(part, model_cfg))
        _load(params, part, host, f'config.init.vlm={tower.path} -> model.{part}', report)
        report.sources[part] = tower.describe()
      continue
    sub = SUBMODULE[key]
    host, partly_fresh, note = _tower_params(key, tower, model_cfg[sub], seed)
    _load(params, sub, host, f'config.init.{key}={tower.path} -> model.{sub}', report)
    report.sources[sub] = tower.describe()
    report.fresh += [f'{sub}/{f}' for f in partly_fresh]
    if note:
      report.note[sub] = note
  loaded = {n for names in report.loaded.values() for n in names}
  report.fresh = sorted(report.fresh + [n for n in all_names if n not in loaded])
  return params, report

"""Loading ml_collections configs the big_vision way, and the keys every config has.

``--config configs/x.py:arg`` imports the file and calls ``get_config(arg)``;
``--config.a.b=value`` overrides a key, parsed as a Python literal and checked against
the type already there. ``base()`` holds the contract of DESIGN.md so that
``--config.total_steps=50`` means the same thing in every stage.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path
from typing import Sequence

import ml_collections

from unifer_jax import sharding


def base(model: str = 'tiny') -> ml_collections.ConfigDict:
  """The keys every training config has (a contract: tools and tests rely on them)."""
  c = ml_collections.ConfigDict()
  c.stage = 'lm'
  c.seed = 0
  c.total_steps = 100
  c.log_every_steps = 10
  # replica_parallel: with several processes, the replicas of a replicated array each
  # write a slice of it (orbax), if a slice is >= 4 MiB; off (and always in one
  # process), replica 0 writes it whole (train/checkpoint.py).
  c.checkpoint = dict(every_steps=50, every_minutes=0.0, keep=2, keep_every=0, async_save=True,
                      replica_parallel=True)
  # images_per_row > 1: interleaved rows, several images each (data/random_batches.py).
  c.input = dict(type='synthetic_random', batch_size=8, seq_len=32, data_dir='', workers=0,
                 pool=0, images_per_row=1)
  c.model = model
  # Pretrained towers (HF dirs or converted checkpoints), a whole pretrained VLM (BLIP-2 /
  # InstructBLIP) and/or an earlier stage's workdir.
  c.init = dict(vlm='', vision='', qformer='', llm='', checkpoint='')
  # Axis sizes inside one slice; dcn: how many slices each spans (sharding.py).
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn=dict(sharding.DEFAULT_DCN))
  c.sharding = dict(rules=[list(r) for r in sharding.DEFAULT_RULES])
  c.compute_dtype = ''  # '' = the model config's own; 'bfloat16' switches every tower
  c.remat = ''  # '' = the model config's own; 'full' | 'dots' | ... for every tower
  # '' = the model config's own; 'xla' | 'flash' (a fused kernel on TPU, models/flash.py)
  # for every tower that has the key.
  c.attention = ''
  c.optimizer = dict(name='adamw', b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
                     clip_grad_norm=1.0, grad_accum_steps=1,
                     decay_exclude=r'(bias|scale|embedding|query_tokens|temp)$',
                     lr_multipliers={})
  c.schedule = dict(name='cosine', peak_lr=1e-3, warmup_steps=10, end_lr_ratio=0.1)
  c.freeze = ''  # regex over parameter paths; matching parameters get no updates
  c.nan_policy = 'skip'  # 'skip' the step or 'stop' with the offending leaf named
  # Multi-process: a dead or hung peer stops the others within this many seconds (exit
  # code 75, the lost process named; peer_watch.py).
  c.peer_timeout_s = 180.0
  c.evals = {}
  # A jax.profiler trace of steps start_step .. start_step + num_steps - 1 into
  # WORKDIR/tensorboard/plugins/profile (train/profiling.py); num_steps=0: off.
  c.profile = dict(start_step=0, num_steps=0)
  return c


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """``path.py[:arg]`` -> config, then ``key=value`` overrides (``--config.`` optional)."""
  path, _, arg = spec.partition(':')
  file = Path(path)
  if not file.is_file():
    raise FileNotFoundError(f'--config {spec}: no file {file}')
  name = f'_unifer_config_{abs(hash(str(file.resolve())))}'
  module_spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise AttributeError(f'{file}: defines no get_config(arg)')
  config = module.get_config(arg) if arg else module.get_config()
  return apply_overrides(config, overrides, source=spec)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    source: str = 'config') -> ml_collections.ConfigDict:
  for item in overrides:
    key, sep, raw = item.removeprefix('--').removeprefix('config.').partition('=')
    if not sep:
      raise ValueError(f'override {item!r}: expected --config.key=value')
    parts = key.split('.')
    node = config
    for p in parts[:-1]:
      if p not in node:
        raise KeyError(f'override {item!r}: {source} has no key {key!r} ({p!r} missing)')
      node = node[p]
    leaf = parts[-1]
    if leaf not in node:
      raise KeyError(f'override {item!r}: {source} has no key {key!r}; '
                     f'keys there: {sorted(node.keys())}')
    node[leaf] = _parse(raw, node[leaf], key)
  return config


def _parse(raw: str, current, key: str):
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if current is None:
      return raw
    raise ValueError(f'--config.{key}={raw!r}: not a Python literal (expected '
                     f'{type(current).__name__})') from None
  if isinstance(current, bool) != isinstance(value, bool) and current is not None:
    raise ValueError(f'--config.{key}={raw!r}: expected {type(current).__name__}')
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if current is not None and not isinstance(value, type(current)) and not (
      isinstance(current, (list, tuple)) and isinstance(value, (list, tuple))):
    if not isinstance(current, (ml_collections.ConfigDict, dict)):
      raise ValueError(f'--config.{key}={raw!r}: expected {type(current).__name__}, '
                       f'got {type(value).__name__}')
  return value


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# Parameter-path regexes for what each stage freezes (everything else trains).
NOT_LLM = r'^(?!llm/)'
LLM_PROJ_AND_LABEL_HEAD = r'^(llm|llm_proj|label_head)(/|$)'
# The Q-Former's text side: only stage 1 (ITC/ITM/ITG) uses it; frozen elsewhere so that
# weight decay does not shrink parameters that get no gradient.
QFORMER_TEXT_SIDE = r'^qformer/(word_embed|pos_embed|type_embed|lm_head|pooler)(/|$)|/text_mlp/'
# Everything outside the image path (ViT -> token gain -> Q-Former queries -> label head).
NOT_IMAGE_PATH = r'^(llm|llm_proj|vision_proj|text_proj|itm_head|temp)(/|$)|' + QFORMER_TEXT_SIDE
VISION_AND_STAGE1_HEADS = (r'^(vit|token_gain|vision_norm|vision_proj|text_proj|itm_head|'
                           r'label_head|temp)(/|$)')
VISION_STAGE1_HEADS_AND_LLM = (r'^(vit|token_gain|vision_norm|vision_proj|text_proj|itm_head|'
                               r'label_head|temp|llm)(/|$)')
LLM_BUT_LORA = r'^llm/(?!.*lora_)'


def stage_config(stage: str, model: str, *, steps: int, batch_size: int,
                 peak_lr: float, freeze: str) -> ml_collections.ConfigDict:
  """A stage on the tfds input pipeline (the stage configs in configs/ call this)."""
  from unifer_jax.data import pipeline  # the tfds/grain stack loads only when used
  from unifer_jax.models import presets
  c = base(model=presets.get(model))
  c.stage = stage
  c.input = pipeline.default_input_config()
  c.input.batch_size = batch_size
  c.total_steps = steps
  c.log_every_steps = max(1, steps // 50)
  c.checkpoint.every_steps = max(1, steps // 4)
  c.schedule = dict(name='cosine', peak_lr=peak_lr, warmup_steps=max(1, steps // 20),
                    end_lr_ratio=0.05)
  c.freeze = freeze
  keep_faces_in_place(c)
  return c


def keep_faces_in_place(c: ml_collections.ConfigDict) -> None:
  """No random resized crop (flip, colour and occlusion stay); every stage on images
  (stage_config) starts so. A from-scratch image path reads the expression from WHERE
  features are (the vision token gain); random crops move the brows and mouth by up to a
  patch. Vision stage: 26 % basic accuracy on training batches (steps 261-360) without
  crops vs 19 % with them (2026-12-01). Once the image path is trained in place, a stage
  that freezes it must not crop either: instruct with crops answered 0.41 / 0.16
  (basic / compound) on the held-out split, 0.81 / 0.53 without, from the same generate
  checkpoint (2026-12-02) -- the frozen tower's features of a crop carry far less of the
  label. Real aligned faces (and the corpus, stored eye-line aligned) sit in place
  already; re-enable crops with ``--config.input.augment.crop_scale='(0.75, 1.0)'``."""
  c.input.augment.crop_scale = (1.0, 1.0)
  c.input.augment.crop_ratio = (1.0, 1.0)


def flip_only(c: ml_collections.ConfigDict) -> None:
  """Horizontal flips as the only augmentation: no colour jitter, no occlusion patches
  (crops are a separate switch, keep_faces_in_place). A flip keeps every label, so cached
  distill targets accept it (train/teacher_targets.py). The demo stages train without it:
  it did not win across data orders (configs/vision.py)."""
  c.input.augment.enabled = True
  c.input.augment.update(dict(brightness=0.0, contrast=0.0, saturation=0.0, occlusion=0.0))


def pod_variant(c: ml_collections.ConfigDict, *, batch_size: int, remat: dict,
                trained: Sequence[str]) -> None:
  """The 7b preset on a TPU pod (the ``pod`` arg of the stage configs): FSDP over every
  chip (data parallel across slices, sharding.py), bf16 compute; the towers in ``trained``
  keep f32 parameters (and AdamW moments), the frozen ones stay in bf16 as their
  checkpoints ship; ``remat`` per tower ('none' for a frozen tower nothing is
  differentiated through: it keeps no activations anyway). Chosen with ``unifer
  compile-check``: the figures are in each config's docstring."""
  from unifer_jax.models import presets
  presets.set_compute_dtype(c.model, 'bfloat16')
  for tower in ('vit', 'qformer', 'llm'):
    c.model[tower].param_dtype = 'float32' if tower in trained else 'bfloat16'
    c.model[tower].remat = remat.get(tower, 'none')
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.input.batch_size = batch_size

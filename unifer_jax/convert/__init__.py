"""Hugging Face <-> unifer checkpoint conversion.

``load_hf(hf_dir)`` returns our module filled with the checkpoint's weights, its
architecture read from ``config.json``; it is called like the HF model's main output
(LLM: ``model(input_ids)`` -> logits; vision: ``model(pixel_values_nhwc)`` -> last hidden
state; BERT: ``model(input_ids, attention_mask)``; Q-Former:
``model(query_embeds, encoder_hidden_states)``; InstructBLIP's Q-Former:
``model(input_ids, attention_mask, query_embeds, encoder_hidden_states)``). Each tower's
mapping lives in its own module (``llm``, ``vision``, ``qformer``) with the same five
functions; read an HF directory's config through ``tower_config``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import numpy as np
from flax import nnx

from unifer_jax.convert.hf_io import ConversionError, TensorReader, read_hf_config

TOWER_MODULES = ('llm', 'vision', 'qformer')


def _towers() -> list[ModuleType]:
  return [importlib.import_module(f'unifer_jax.convert.{name}') for name in TOWER_MODULES]


def supported_model_types() -> dict[str, str]:
  return {t: m.__name__.rsplit('.', 1)[-1] for m in _towers() for t in m.MODEL_TYPES}


def tower_for(model_type: str) -> ModuleType:
  for module in _towers():
    if model_type in module.MODEL_TYPES:
      return module
  raise ConversionError(f'unsupported model_type {model_type!r}; supported: '
                        f'{", ".join(sorted(supported_model_types()))}')


def fill(module: nnx.Module, params: dict) -> nnx.Module:
  """Replaces an (abstract) module's parameters with a pure dict of arrays."""
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)
  return module


def tower_config(tower: ModuleType, hf_config: dict, hf_dir: str | os.PathLike):
  """``tower.config_from_hf(hf_config)``; a tower whose architecture also depends on which
  tensors the checkpoint holds (``CONFIG_READS_TENSORS``: a BERT's pooler) gets a
  reader of ``hf_dir`` too."""
  if getattr(tower, 'CONFIG_READS_TENSORS', False):
    return tower.config_from_hf(hf_config, TensorReader(hf_dir))
  return tower.config_from_hf(hf_config)


def load_hf(hf_dir: str | os.PathLike, **config_overrides):
  """Our module with the weights of an HF model directory (safetensors only)."""
  hf_config = read_hf_config(hf_dir)
  tower = tower_for(hf_config['model_type'])
  cfg = tower_config(tower, hf_config, hf_dir)
  cfg.update(config_overrides)
  params = tower.params_from_hf(TensorReader(hf_dir), cfg)
  module = nnx.eval_shape(lambda: tower.build(cfg, rngs=nnx.Rngs(0)))
  return fill(module, params)


def params_of(module: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def as_numpy(params: dict) -> dict:
  import jax
  return jax.tree.map(np.asarray, params)


__all__ = ['ConversionError', 'TensorReader', 'load_hf', 'read_hf_config', 'supported_model_types',
           'tower_for', 'tower_config', 'fill', 'params_of']

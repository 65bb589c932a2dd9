"""Hugging Face <-> unifer checkpoint conversion.

``load_hf(hf_dir)`` returns our module filled with the checkpoint's weights, its
architecture read from ``config.json``; it is called like the HF model's main output
(LLM: ``model(input_ids)`` -> logits; vision: ``model(pixel_values_nhwc)`` -> last hidden
state; BERT: ``model(input_ids, attention_mask)``; Q-Former:
``model(query_embeds, encoder_hidden_states)``; InstructBLIP's Q-Former:
``model(input_ids, attention_mask, query_embeds, encoder_hidden_states)``; a whole BLIP-2 /
InstructBLIP: the UniFER, ``model(images_nhwc, input_ids, attention_mask)``). Each
tower's mapping lives in its own module (``llm``, ``vision``, ``qformer``, ``vlm`` for the
whole VLMs) with the same five functions; read an HF directory's config through
``hf_tower_config``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import numpy as np
from flax import nnx

from unifer_jax.convert.hf_io import ConversionError, TensorReader, read_hf_config

TOWER_MODULES = ('llm', 'vision', 'qformer', 'vlm')


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


def hf_tower_config(hf_dir: str | os.PathLike):
  """(converter module, config.json dict, our tower config) of an HF model directory.

  The config comes from config.json; a converter that needs the checkpoint's tensor names
  to settle it (``config_for_tensors``: does a ViTModel have its pooler?) gets them from
  the safetensors headers, no weights read. Every reader of an HF directory (``load_hf``,
  ``unifer convert from-hf | check``, ``config.init``) comes through here.
  """
  hf_config = read_hf_config(hf_dir)
  tower = tower_for(hf_config['model_type'])
  cfg = tower.config_from_hf(hf_config)
  settle = getattr(tower, 'config_for_tensors', None)
  if settle is not None:
    cfg = settle(cfg, TensorReader(hf_dir).keys())
  return tower, hf_config, cfg


def load_hf(hf_dir: str | os.PathLike, **config_overrides):
  """Our module with the weights of an HF model directory (safetensors only)."""
  tower, _, cfg = hf_tower_config(hf_dir)
  cfg.update(config_overrides)
  params = tower.params_from_hf(TensorReader(hf_dir), cfg)
  module = nnx.eval_shape(lambda: tower.build(cfg, rngs=nnx.Rngs(0)))
  return fill(module, params)


def params_of(module: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def as_numpy(params: dict) -> dict:
  import jax
  return jax.tree.map(np.asarray, params)


__all__ = ['ConversionError', 'TensorReader', 'load_hf', 'hf_tower_config', 'read_hf_config',
           'supported_model_types', 'tower_for', 'fill', 'params_of']

"""Whole BLIP-2 / InstructBLIP checkpoints <-> the UniFER model (``models.unifer``).

| model_type     | HF class                             | language model           |
|----------------|--------------------------------------|--------------------------|
| ``blip-2``     | Blip2ForConditionalGeneration        | OPT, Llama or Qwen2      |
| ``instructblip``| InstructBlipForConditionalGeneration | Llama (OPT, Qwen2 alike) |

Each tower's tensors are read and written by that tower's converter, as if they were the
standalone model's checkpoint (``hf_io.PrefixView``):

| tensors                     | UniFER    | converter                                         |
|-----------------------------|-----------|---------------------------------------------------|
| ``vision_model.*``          | vit       | convert.vision (Blip2VisionModel layout)          |
| ``query_tokens``, ``qformer.*`` | qformer | convert.qformer (InstructBLIP's reads the prompt) |
| ``language_projection.*``   | llm_proj  | convert.qformer.projection_from_hf                |
| ``language_model.*``        | llm       | convert.llm (OPTForCausalLM, LlamaForCausalLM...) |

The model has no stage-1 heads (``stage1_heads=False``: HF has none) and no ln_vision of
its own (BLIP-2's vision ``post_layernorm`` is it). ``convert.load_hf(dir)`` returns it,
called like HF: ``model(images_nhwc, input_ids, attention_mask)`` (InstructBLIP adds
``qformer_input_ids=``, ``qformer_attention_mask=``) gives the logits over
[image prefix; text] that HF gives for ``num_query_tokens`` image tokens followed by
``input_ids``.

Memory: parts are read, converted and written one at a time (``PARTS``), so converting a
7B model holds about one tower plus one output shard (``benchmarks/convert_memory.py``).
"""

from __future__ import annotations

import logging
from typing import Iterator, Mapping

import ml_collections
import numpy as np
from flax import nnx

from unifer_jax.convert import llm, qformer, vision
from unifer_jax.convert.hf_io import ConversionError, PrefixView
from unifer_jax.models.unifer import UniFER

log = logging.getLogger(__name__)

MODEL_TYPES = ('blip-2', 'instructblip')
HF_CLASS = {'blip-2': 'Blip2ForConditionalGeneration',
             'instructblip': 'InstructBlipForConditionalGeneration'}
_VISION_TYPE = {'blip-2': 'blip_2_vision_model', 'instructblip': 'instructblip_vision_model'}
VISION_PREFIX, LLM_PREFIX = 'vision_model.', 'language_model.'
# The model's parts in conversion order (the LLM, the largest, last): each is read or
# written whole while the others are not in memory.
PARTS = ('vit', 'qformer', 'llm_proj', 'llm')


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------

def model_type_of(cfg) -> str:
  return 'instructblip' if cfg.qformer.get('instruction_aware', False) else 'blip-2'


def config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """The UniFER model config of a BLIP-2 / InstructBLIP config.json dict."""
  model_type = hf_config.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ConversionError(f'config.json: model_type={model_type!r} is not a whole VLM; '
                          f'expected one of {MODEL_TYPES}')
  where = f'config.json ({model_type})'
  if not hf_config.get('use_decoder_only_language_model', True):
    raise ConversionError(f'{where}: use_decoder_only_language_model=false (a Flan-T5 '
                          'encoder-decoder language model) is not supported; UniFER decodes '
                          'with a decoder-only LLM (OPT, Llama, Qwen2)')
  # Blip2Config's default language model is OPT (transformers 5.23).
  text = {'model_type': 'opt', **(hf_config.get('text_config') or {})}
  if text['model_type'] not in llm.MODEL_TYPES:
    raise ConversionError(f'{where}: text_config.model_type={text["model_type"]!r}; '
                          f'supported language models: {", ".join(llm.MODEL_TYPES)}')
  vit = vision.config_from_hf({**(hf_config.get('vision_config') or {}),
                               'model_type': _VISION_TYPE[model_type]})
  q = qformer.config_from_hf(hf_config)
  if q.encoder_width != vit.width:
    raise ConversionError(f'{where}: the Q-Former reads image tokens of width '
                          f'{q.encoder_width}, the vision tower has {vit.width}')
  lm = llm.config_from_hf(text)
  return ml_collections.ConfigDict(dict(
      vit=vit, qformer=q, llm=lm, embed_dim=256, stage1_heads=False,
      vision_layernorm=False, vision_token_gain=False, text_pool='cls',
      lora=dict(rank=0, alpha=16.0, targets=r'attn/(q|k|v|o)$|mlp/(gate|up|down)$'),
      image_token_index=int(hf_config.get('image_token_index', lm.vocab_size - 1))))


def check_exportable(cfg) -> None:
  """Refuses, by name, what no HF BLIP-2 / InstructBLIP can hold."""
  problems = []
  if cfg.get('vision_token_gain', False):
    problems.append('vision_token_gain (a per-position gain after the ViT)')
  if cfg.get('vision_layernorm', True):
    problems.append("vision_layernorm (an ln_vision of UniFER's own: BLIP-2's is the vision "
                    "tower's post_layernorm)")
  if cfg.vit.variant != 'blip2':
    problems.append(f'vit.variant={cfg.vit.variant!r} (BLIP-2 models hold a blip2-layout ViT)')
  if cfg.vit.get('stem', 'patch') != 'patch':
    problems.append(f'vit.stem={cfg.vit.stem!r} (the conv stem)')
  if problems:
    raise ConversionError('to-hf: this UniFER has no BLIP-2 / InstructBLIP equivalent: '
                          + '; '.join(problems))


def hf_config_from(cfg) -> dict:
  """The config.json of the whole HF model for a UniFER model config."""
  check_exportable(cfg)
  model_type = model_type_of(cfg)
  vision_cfg = vision.hf_config_from(cfg.vit, _VISION_TYPE[model_type])
  vision_cfg.pop('architectures', None)
  text_cfg = llm.hf_config_from(cfg.llm)
  text_cfg.pop('architectures', None)
  out = dict(model_type=model_type, architectures=[HF_CLASS[model_type]],
             vision_config=vision_cfg, text_config=text_cfg,
             image_token_index=int(cfg.get('image_token_index', cfg.llm.vocab_size - 1)),
             use_decoder_only_language_model=True, dtype=text_cfg.get('dtype', 'float32'),
             initializer_factor=1.0, initializer_range=0.02)
  entries = (qformer.instructblip_config_entries if model_type == 'instructblip'
             else qformer.blip2_config_entries)
  out.update(entries(cfg.qformer))
  return out


def build(cfg, *, rngs: nnx.Rngs) -> UniFER:
  return UniFER(cfg, rngs=rngs)


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------

def _part_reader(reader, part: str):
  return {'vit': lambda: PrefixView(reader, VISION_PREFIX),
          'llm': lambda: PrefixView(reader, LLM_PREFIX)}.get(part, lambda: reader)()


def part_from_hf(reader, cfg, part: str) -> dict:
  """One part's pure param dict (``PARTS``) from a whole checkpoint."""
  if part == 'vit':
    return vision.params_from_hf(_part_reader(reader, part), cfg.vit)
  if part == 'qformer':
    return qformer.params_from_hf(reader, cfg.qformer)
  if part == 'llm_proj':
    return qformer.projection_from_hf(reader, cfg.qformer)
  if part == 'llm':
    return llm.params_from_hf(_part_reader(reader, part), cfg.llm)
  raise KeyError(part)


def check_prefixes(reader) -> None:
  """Every tensor belongs to one of the parts; anything else is named, not dropped."""
  known = (VISION_PREFIX, LLM_PREFIX, 'qformer.', 'language_projection.', 'query_tokens')
  stray = sorted(k for k in reader.keys() if not k.startswith(known))
  if stray:
    raise ConversionError(f'{reader.dir}: tensors outside the vision model, Q-Former, '
                          f'projection and language model: {stray[:10]}'
                          + (f' (+{len(stray) - 10} more)' if len(stray) > 10 else ''))


def params_from_hf(reader, cfg) -> dict:
  """The pure param dict of ``build(cfg)`` from a whole checkpoint (dtypes kept)."""
  check_prefixes(reader)
  return {part: part_from_hf(reader, cfg, part) for part in PARTS}


def part_to_hf(params: dict, cfg, part: str) -> Iterator[tuple[str, np.ndarray]]:
  """The HF tensors of one part, with their whole-model names."""
  if part == 'vit':
    for name, array in vision.params_to_hf(params, cfg.vit):
      yield VISION_PREFIX + name, array
  elif part == 'qformer':
    write = (qformer.instructblip_params_to_hf if model_type_of(cfg) == 'instructblip'
             else qformer.blip2_params_to_hf)
    yield from write(params, cfg.qformer)
  elif part == 'llm_proj':
    yield from qformer.projection_to_hf(params)
  elif part == 'llm':
    for name, array in llm.params_to_hf(params, cfg.llm):
      yield LLM_PREFIX + name, array
  else:
    raise KeyError(part)


def params_to_hf(params: Mapping, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """Every HF tensor of the whole model. ``params`` maps each of ``PARTS`` to its dict;
  a lazy mapping (``commands``) restores each part only when its turn comes."""
  check_exportable(cfg)
  for part in PARTS:
    yield from part_to_hf(params[part], cfg, part)

"""The trainer's tfds input: a stage's ``config.input`` resolved and checked against the
model, the global batch spec, and :class:`TfdsInput` over data/pipeline.py's Pipeline.

``config.input.type = 'tfds'`` (registered in inputs.INPUTS) makes a :class:`TfdsInput`:
this process's rows of each global batch, in the stage's format (examples.py has the
exact keys; ``batch_spec`` gives them with the GLOBAL batch), with a JSON-able iterator
state that the trainer stores in every checkpoint. :func:`global_batch_spec` gives the
same keys from the config alone (compile-check lowers a step without the data).

Stage -> format: pipeline.STAGE_FORMATS; ``config.input.format`` overrides.
"""

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

from unifer_jax.data import clips, examples, packing, pipeline
from unifer_jax.models import interleave, presets

log = logging.getLogger(__name__)


def stage_input(config, model_cfg) -> tuple[ml_collections.ConfigDict, str, int]:
  """(resolved config.input, format, image size) of a training run, checked against the
  model; what the input and :func:`global_batch_spec` share."""
  cfg = pipeline.resolve_config(config.input)
  if 'qformer' in model_cfg:  # an InstructBLIP reads the prompt beside its queries
    cfg.qformer_prompt = bool(model_cfg.qformer.get('instruction_aware', False))
    # k-shot rows mark each face's slots with the model's placeholder id.
    cfg.image_queries = int(model_cfg.qformer.num_queries)
    cfg.image_token = interleave.placeholder_id(model_cfg)
  stage = config.get('stage', '')
  clips.resolve_frames(cfg, stage, model_cfg)
  fmt = cfg.format or pipeline.STAGE_FORMATS.get(stage)
  if fmt is None:
    raise ValueError(f'config.stage={stage!r} has no input format; set config.input.format '
                     f'to one of {examples.FORMATS}')
  if int(cfg.fewshot.max_shots) > 0 and (fmt != 'instruct' or stage == 'grpo'):
    raise ValueError(f'config.input.fewshot.max_shots={cfg.fewshot.max_shots}: k-shot rows '
                     f'are rows of the instruct stage; stage {stage!r} reads format {fmt!r}'
                     + (' (GRPO\'s rollouts take one image per prompt)' * (stage == 'grpo')))
  if cfg.get('pack', False) and stage == 'grpo':
    raise ValueError('config.input.pack=True: GRPO reads one prompt per row (its rollouts); '
                     'packing is for the lm, generate and instruct stages')
  vision = presets.vision_config(model_cfg)  # a UniFER's vit or a student's encoder
  image_size = cfg.image_size or vision.image_size
  if image_size != vision.image_size:
    tower = 'vit' if 'vit' in model_cfg else 'encoder'
    raise ValueError(f'config.input.image_size={image_size} but model.{tower}.image_size='
                     f'{vision.image_size}')
  return cfg, fmt, image_size


def global_batch_spec(config, model_cfg) -> dict[str, jax.ShapeDtypeStruct]:
  """The device keys of a global training batch from the config alone -- no dataset or
  tokenizer is opened (compile-check lowers a step for data that is elsewhere)."""
  cfg, fmt, image_size = stage_input(config, model_cfg)
  spec = pipeline.example_spec(cfg, fmt, image_size, packing.enabled(cfg, fmt, train=True))
  return {k: jax.ShapeDtypeStruct((cfg.batch_size, *shape), dtype)
          for k, (shape, dtype) in spec.items()}


class TfdsInput:
  """The trainer's input (``config.input.type='tfds'``): inputs.Input protocol.

  Yields only the device keys of ``batch_spec``; the '_' metadata is counted here
  (``stats()``: rows, rows cut at seq_len/text_len, CoT rows shortened to fit).
  """

  def __init__(self, config, model_cfg):
    cfg, fmt, image_size = stage_input(config, model_cfg)
    n = jax.process_count()
    if cfg.batch_size % n:
      raise ValueError(f'config.input.batch_size={cfg.batch_size} is not divisible by the '
                       f'{n} processes')
    self.global_batch = cfg.batch_size
    toks = pipeline.load_tokenizers(cfg, fmt)
    check_model_fit(cfg, fmt, model_cfg, *toks)
    self.pipeline = pipeline.Pipeline(cfg, fmt, batch_size=cfg.batch_size // n, image_size=image_size,
                             train=True, tokenizers=toks)
    self.spec = self.pipeline.batch_spec(self.global_batch)
    self.rows = self.truncated = self.no_think = 0

  def next_local_batch(self, with_index: bool = False) -> dict[str, np.ndarray]:
    """The device keys; ``with_index`` adds the host-side ``_index`` (each row's record
    in the split, for inputs that join per-record data, e.g. cached distill targets)."""
    batch = next(self.pipeline)
    # Packed rows count their examples.
    self.rows += int(batch['_examples'].sum() if '_examples' in batch
                     else len(batch['_truncated']))
    cut = int(batch['_truncated'].sum())
    if cut and not self.truncated:
      log.warning('config.input.seq_len/text_len truncates texts (%d of %d rows in this '
                  'batch); see TfdsInput.stats()', cut, len(batch['_truncated']))
    self.truncated += cut
    self.no_think += int(batch['_no_think'].sum())
    out = {k: batch[k] for k in self.spec}
    if with_index:
      out['_index'] = batch['_index']
    return out

  def stats(self) -> dict:
    """This process's counts: rows, rows cut at seq_len/text_len, CoT rows that dropped
    their think part to fit."""
    return {'rows': self.rows, 'truncated_rows': self.truncated,
            'no_think_rows': self.no_think}

  def get_state(self) -> dict:
    return {**self.pipeline.get_state(), **self.stats()}

  def set_state(self, state: dict) -> None:
    self.pipeline.set_state(state)
    self.rows = int(state.get('rows', 0))
    self.truncated = int(state.get('truncated_rows', 0))
    self.no_think = int(state.get('no_think_rows', 0))

  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    return dict(self.spec)


def check_model_fit(cfg, fmt: str, model_cfg, tok, text_tok) -> None:
  """Token ids and lengths must fit the model's vocabularies and positions."""
  if tok is not None:
    llm = model_cfg.llm
    if tok.vocab_size > llm.vocab_size:
      raise ValueError(f'tokenizer {tok.path} has {tok.vocab_size} ids but '
                       f'model.llm.vocab_size={llm.vocab_size}')
    if packing.enabled(cfg, fmt, train=True):
      q = model_cfg.qformer.num_queries if fmt != 'lm' else 0
      if packing.row_length(cfg, fmt, q) > llm.max_seq_len:
        raise ValueError(f'packed rows of {packing.row_length(cfg, fmt, q)} positions '
                         f'(config.input.pack_len={cfg.pack_len}) exceed '
                         f'model.llm.max_seq_len={llm.max_seq_len}')
    # k-shot rows hold their faces' slots inside seq_len; one image goes in front of it.
    prefix = model_cfg.qformer.num_queries if fmt != 'lm' and not cfg.fewshot.max_shots else 0
    if cfg.seq_len + prefix > llm.max_seq_len:
      raise ValueError(f'config.input.seq_len={cfg.seq_len} + {prefix} image queries exceeds '
                       f'model.llm.max_seq_len={llm.max_seq_len}')
  if text_tok is not None:
    q = model_cfg.qformer
    if text_tok.vocab_size > q.vocab_size:
      raise ValueError(f'text tokenizer {text_tok.path} has {text_tok.vocab_size} ids but '
                       f'model.qformer.vocab_size={q.vocab_size}')
    if cfg.text_len > q.max_position:
      raise ValueError(f'config.input.text_len={cfg.text_len} exceeds '
                       f'model.qformer.max_position={q.max_position}')

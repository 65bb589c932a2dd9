"""A trained model as evaluators see it: graphdef + parameters of one checkpoint, the
tokenizers and the image preprocessing of its training config, and the jitted
functions every evaluator shares (image/text features, generation).

``load(workdir, step)`` reads ``WORKDIR/config.json`` (the workdir contract) and the
orbax checkpoint of ``step`` (default: the newest); inside training the loop hands its
live parameters over with :meth:`Model.from_setup` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from unifer_jax import sharding, workdirs
from unifer_jax.data import examples, pipeline
from unifer_jax.data import tokenizer as tokenizer_lib
from unifer_jax.evaluators import alignment, item_shards, likelihood
from unifer_jax.models import unifer as unifer_lib


def read_config(workdir) -> ml_collections.ConfigDict:
  """WORKDIR/config.json, its paths resolved where the workdir is now (workdirs.py)."""
  return workdirs.read_config(workdir)


@dataclasses.dataclass
class Model:
  config: ml_collections.ConfigDict      # the training config
  graphdef: Any
  params: Any
  step: int
  name: str = ''

  @classmethod
  def from_setup(cls, setup, params, step: int, name: str = '') -> 'Model':
    return cls(setup.config, setup.graphdef, params, step, name)

  # -- what the training config says about inputs ----------------------------------

  @functools.cached_property
  def input_cfg(self) -> ml_collections.ConfigDict:
    return pipeline.resolve_config(self.config.input)

  @functools.cached_property
  def image_size(self) -> int:
    from unifer_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    return self.input_cfg.image_size or state_lib.model_config(self.config).vit.image_size

  @functools.cached_property
  def tokenizer(self):
    if not self.input_cfg.tokenizer:
      raise ValueError('the training config has no input.tokenizer; generative and text '
                       'evaluators need the tokenizer directory it trained with')
    return tokenizer_lib.load(self.input_cfg.tokenizer)

  @functools.cached_property
  def text_tokenizer(self):
    path = self.input_cfg.text_tokenizer
    return tokenizer_lib.load(path) if path else self.tokenizer

  @functools.cached_property
  def instruction_aware(self) -> bool:
    """Whether the Q-Former reads the prompt beside its queries (InstructBLIP)."""
    from unifer_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    q = state_lib.model_config(self.config).get('qformer')
    return bool(q is not None and q.get('instruction_aware', False))

  def qformer_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """[N, text_len] ids and mask of each prompt for an instruction-aware Q-Former, as
    training fed it; None for a Q-Former that reads no prompt."""
    if not self.instruction_aware:
      return None
    rows = [examples.qformer_text(self.text_tokenizer, p, self.input_cfg.text_len)[:2]
            for p in prompts]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def label_prompt(self, task: str, **kw) -> 'likelihood.LabelPrompt':
    """``likelihood.label_prompt`` in this model's tokenizers."""
    text_tok = self.text_tokenizer if self.instruction_aware else None
    return likelihood.label_prompt(self.tokenizer, task, text_tok=text_tok,
                                   text_len=self.input_cfg.text_len, **kw)

  def normalise(self, images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] at image_size -> the float input training used."""
    mean = np.asarray(self.input_cfg.image_mean, np.float32)
    std = np.asarray(self.input_cfg.image_std, np.float32)
    return ((images_uint8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

  # -- shared jitted computations ------------------------------------------------------
  # Each runs over the items in global batches split across the mesh, every process
  # scoring its own rows (item_shards); all processes get every item's result.

  @functools.cached_property
  def mesh(self):
    return item_shards.mesh_of(self.params)

  def image_features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """[N, Q, E] normalised ITC query embeddings."""
    return item_shards.map_items(
        lambda x: _image_feats(self.params, x, graphdef=self.graphdef), [images], batch_size,
        self.mesh)

  def text_ids(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """[N, text_len] ids and mask of each text for the Q-Former's text side (cls .. eos)."""
    tok = self.text_tokenizer
    length = self.input_cfg.text_len
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, t in enumerate(texts):
      seq = ([tok.cls_id] + tok.encode(t) + [tok.eos_id])[:length]
      ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    return ids, mask

  def text_features(self, texts, batch_size: int = 64) -> np.ndarray:
    ids, mask = self.text_ids(texts)
    return item_shards.map_items(
        lambda i, m: _text_feats(self.params, i, m, graphdef=self.graphdef), [ids, mask],
        batch_size, self.mesh, count=False)   # label prompts, not eval items

  def itm_logits(self, images: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                 batch_size: int = 64) -> np.ndarray:
    """[N, 2] ITM logits (no match, match) of image i with text i."""
    return item_shards.map_items(
        lambda x, i, m: _itm_logits(self.params, x, i, m, graphdef=self.graphdef),
        [images, ids, mask], batch_size, self.mesh)

  def temperature(self) -> float:
    """The ITC temperature the model learned (BLIP-2 clips it to [0.001, 0.5])."""
    return float(np.clip(np.asarray(jax.device_get(self.params['temp'])), 0.001, 0.5))

  def generate(self, images: np.ndarray, prompts: list[str], *, max_new_tokens: int = 48,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int = 0, batch_size: int = 32) -> list[str]:
    """One answer per (image, prompt), decoded from the chat-templated prompt.

    Prompts are right-padded to a common length (generate handles padding); the last
    batch is padded by repetition so every batch has one compiled shape.
    """
    tok = self.tokenizer
    encoded = [tok.prompt_ids(p) for p in prompts]
    length = max(len(e) for e in encoded)
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, e in enumerate(encoded):
      ids[row, :len(e)], mask[row, :len(e)] = e, 1
    qformer = self.qformer_text(prompts)
    arrays = [images, ids, mask] + list(qformer or ())
    out = []
    t0 = last = time.monotonic()
    g = item_shards.global_batch(batch_size, self.mesh)
    for k, batch in enumerate(item_shards.batches(arrays, batch_size, self.mesh)):
      if time.monotonic() - last > 10 and jax.process_index() == 0:   # long decodes say how far
        last = time.monotonic()
        total = -(-len(images) // g)
        print(f'generate: batch {k}/{total} | elapsed {last - t0:.0f} s | ETA '
              f'{(last - t0) / k * (total - k):.0f} s', flush=True)
      image, ids_b, mask_b, *q = batch.arrays
      tokens = _generate(self.params, image, ids_b, mask_b, tuple(q) or None,
                         jax.random.key(seed + batch.start), graphdef=self.graphdef,
                         max_new=max_new_tokens, temperature=float(temperature), top_k=top_k,
                         top_p=top_p, eos_id=tok.eos_id)
      out += [tok.decode(t) for t in batch.results(tokens)]
    return out


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _image_feats(params, images, *, graphdef):
  return alignment.image_features(nnx.merge(graphdef, params), images)


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _text_feats(params, ids, mask, *, graphdef):
  return alignment.text_features(nnx.merge(graphdef, params), ids, mask)


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _itm_logits(params, images, ids, mask, *, graphdef):
  return alignment.itm_logits(nnx.merge(graphdef, params), images, ids, mask)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new', 'temperature', 'top_k',
                                             'top_p', 'eos_id'))
def _generate(params, images, ids, mask, qformer, rng, *, graphdef, max_new, temperature, top_k,
              top_p, eos_id):
  q_ids, q_mask = qformer if qformer is not None else (None, None)
  return unifer_lib.generate(nnx.merge(graphdef, params), images, ids, mask,
                             qformer_input_ids=q_ids, qformer_attention_mask=q_mask,
                             max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                             top_p=top_p, rng=rng, eos_id=eos_id, pad_id=0)


def load(workdir, step: int | None = None, config=None, name: str = '') -> Model:
  """The model of a training workdir at ``step`` (default: its newest checkpoint)."""
  from unifer_jax.train import checkpoint as ckpt_lib, state as state_lib  # pylint: disable=g-import-not-at-top
  workdir = workdirs.path(workdir)
  config = config if config is not None else read_config(workdir)
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.build(config, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir / 'checkpoints', config.checkpoint)
  try:
    steps = ckpt.steps()
    if not steps:
      raise FileNotFoundError(f'{workdir}: no checkpoint in {workdir / "checkpoints"}')
    if step is not None and step not in steps:
      raise FileNotFoundError(f'{workdir}: no checkpoint at step {step}; it has steps {steps}')
    restored = ckpt.restore(setup.abstract_state, step)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'{workdir}: no readable checkpoint')
  return Model(config, setup.graphdef, restored[1]['params'], restored[0],
               name or f'{workdir.name}@{restored[0]}')

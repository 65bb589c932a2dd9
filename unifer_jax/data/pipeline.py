"""grain input pipelines over prepared TFDS ArrayRecord datasets, for every stage.

:class:`Pipeline` yields this process's rows of each batch in one format (examples.py has
the exact keys; ``batch_spec`` gives them with the GLOBAL batch), with a JSON-able
iterator state that the trainer stores in every checkpoint. The trainer's input
(``config.input.type = 'tfds'``: :class:`tfds_input.TfdsInput`) wraps one, after checking
the stage's config against the model (data/tfds_input.py).

Graph (training)::

  per dataset j: range(len(split))[p::P] -> shuffle(seed_j,p) -> repeat()   (reshuffled per epoch)
  -> mix(weights)                       (grain's deterministic proportional interleave)
  -> random_map(read + decode + augment + template + tokenise + pad)   (rng = f(seed, p, position))
  -> batch(global_batch / P, drop_remainder) -> to_iter_dataset(threads) [-> mp_prefetch(workers)]

With ``cache=True`` (fixed examples only: memory_table.py) the records are decoded once
and the graph is mix -> batch(record indices) -> gather from the decoded table.

p / P are this process's index / the process count (jax's, or explicit ``shard``), so
processes read disjoint interleaved shards. Everything random is a pure function of
(seed, p, position), so batch k of a process is fixed: resuming from the saved state
(grain's ``next_index`` = batches consumed, the same number on every process) gives
exactly the batches an uninterrupted run would have seen, with any worker count.

Eval (``train=False``): one pass over the split in order, no augmentation; process p
reads records p, p + P, ...; the last batch is padded (``valid`` = 0 rows, a repeat of a
real record) so every process yields the same number of batches; adds ``id`` (bytes).

Packed rows (``config.input.pack``; lm, generate, instruct in training): the per-record
map yields each example at its real length and grain's packer fills rows of
``pack_len`` positions with whole examples before the batch (data/packing.py).

Stage -> format: lm -> lm, align -> align, generate -> generate, instruct -> instruct,
grpo -> instruct (its prompts), distill -> eval (with augmentation in training), video ->
instruct rows of clips (``config.input.frames`` > 0: ``frames`` [T, S, S, 3] in place of
``image``; data/clips.py).
``config.input.format`` overrides.
"""

from __future__ import annotations

import functools
import logging
import math

import grain
import jax
import ml_collections
import numpy as np

from unifer_jax.data import augment, clips, examples, fewshot, instructions, memory_table
from unifer_jax.data import packing
from unifer_jax.data import sources
from unifer_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

STAGE_FORMATS = {'lm': 'lm', 'vision': 'eval', 'align': 'align', 'generate': 'generate',
                 'instruct': 'instruct', 'grpo': 'instruct', 'distill': 'eval',
                 'video': 'instruct'}


def default_input_config() -> ml_collections.ConfigDict:
  """``config.input`` for the tfds pipelines (keys documented inline)."""
  return ml_collections.ConfigDict(dict(
      type='tfds',
      name='synthetic_faces',      # a tfds name under data_dir, or a dataset version dir
      data_dir='',
      mixture=[],                  # [[name, weight], ...]; empty: `name` alone
      split='train',
      format='',                   # '' = from config.stage (STAGE_FORMATS)
      batch_size=32,               # GLOBAL batch; each process gets batch_size / processes
      seq_len=128,                 # LLM tokens (lm / generate / instruct)
      text_len=64,                 # Q-Former text tokens (align)
      image_size=0,                # 0 = the model's vit.image_size
      image_mean=(0.5, 0.5, 0.5),  # pixels -> (x / 255 - mean) / std
      image_std=(0.5, 0.5, 0.5),
      frames=0,                    # > 0: clip rows of T frames (data/clips.py); the video
                                   # stage sets it from model.video.frames
      tokenizer='',                # HF tokenizer directory (LLM side)
      text_tokenizer='',           # Q-Former side; '' = tokenizer
      qformer_prompt=False,        # the prompt for an instruction-aware Q-Former (the
                                   # trainer sets it from model.qformer.instruction_aware)
      tokenizer_train_vocab=0,     # > 0: train the BPE into `tokenizer` if it is missing
      tasks=list(instructions.TASKS),
      task_weights=[],             # per task; empty = uniform (over the tasks a record has)
      lm_caption_fraction=0.5,     # lm format: captions vs instruction texts
      augment=dict(enabled=True, **{k: v for k, v in augment.DEFAULT_AUGMENT.items()}),
      cache=False,                 # decode once, keep in memory (memory_table.py; eval format)
      # k-shot instruct rows (several faces per row; data/fewshot.py); max_shots=0: off.
      fewshot=fewshot.default_config(),
      # Packed rows (data/packing.py): several whole examples per row, segment ids and
      # per-example positions; lm / generate / instruct training only. Off until the
      # demo's figures are measured with it (benchmarks/data_pipeline.py).
      pack=False,
      pack_len=0,                  # LLM positions per packed row; 0 = 2 x an unpacked row
      images_per_row=4,            # image slots per packed generate / instruct row
      image_queries=0,             # set by the trainer from the model (k-shot rows):
      image_token=-1,              # Q and the placeholder id of its image slots
      workers=0,                   # grain worker processes (0 = in-process threads only)
      threads=2,                   # grain read threads per process / worker
      prefetch=4,                  # batches buffered per reader
      seed=0,
  ))


def resolve_config(input_cfg) -> ml_collections.ConfigDict:
  """Defaults overlaid with the given keys (a base() config's input may hold fewer)."""
  cfg = default_input_config()
  given = input_cfg.to_dict() if hasattr(input_cfg, 'to_dict') else dict(input_cfg)
  for k, v in given.items():
    cfg[k] = v
  return cfg


def _seed(*parts) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _tag(source: int, index) -> tuple[int, int]:
  return source, int(index)


class _Transform:
  """(source, index), rng -> example: reads the record, then ExampleMaker (picklable)."""

  def __init__(self, srcs, maker):
    self.srcs, self.maker = srcs, maker

  def __call__(self, item, rng):
    source, index = item
    if getattr(self.maker, 'reads_others', False):   # k-shot rows draw their examples
      return self.maker(source, index, self.srcs[source][index], rng, others=self.srcs[source])
    return self.maker(source, index, self.srcs[source][index], rng)


class _EvalTransform:
  """Local position k -> record p + k * P, or a padding row (valid = 0); no randomness."""

  def __init__(self, src, maker, shard):
    self.src, self.maker, self.shard = src, maker, shard

  def __call__(self, k):
    i = self.shard[0] + int(k) * self.shard[1]
    valid = i < len(self.src)
    rec = self.src[i if valid else 0]
    ex = self.maker(0, i if valid else 0, rec, None)
    ex['valid'] = np.float32(valid)
    ex['id'] = np.bytes_(rec['id'])
    return ex


def load_tokenizers(cfg, fmt: str):
  """(LLM tokenizer, Q-Former text tokenizer) the format needs (None where unused)."""
  needs_llm = fmt in ('lm', 'generate', 'instruct')
  needs_text = fmt == 'align' or (cfg.qformer_prompt and fmt in examples.QFORMER_PROMPTED)
  if not (needs_llm or needs_text):
    return None, None
  path = cfg.tokenizer
  if not path:
    raise ValueError(f'config.input.tokenizer is empty; format {fmt!r} needs a tokenizer '
                     f'directory')
  if not tokenizer_lib.is_tokenizer_dir(path) and cfg.tokenizer_train_vocab > 0:
    names = [m[0] for m in cfg.mixture] or [cfg.name]
    log.info('training a %d-token BPE on %s into %s', cfg.tokenizer_train_vocab, names, path)
    # Every process may get here; training is deterministic, the first to finish wins.
    tokenizer_lib.train_for_datasets(names, path, data_dir=cfg.data_dir, split=cfg.split,
                                     vocab_size=cfg.tokenizer_train_vocab, seed=cfg.seed,
                                     overwrite=False)
  tok = tokenizer_lib.load(path)
  text_tok = tokenizer_lib.load(cfg.text_tokenizer) if cfg.text_tokenizer else tok
  return (tok if needs_llm else None), (text_tok if needs_text else None)


class Pipeline:
  """Batches of one process's shard in one format; iterate, or next(); resumable.

  `batch_size` is per process. `shard` = (index, count), default jax's process index
  and count. Tokenizers are loaded from the config unless given.
  """

  def __init__(self, cfg, fmt: str, *, batch_size: int, image_size: int, train: bool = True,
               shard: tuple[int, int] | None = None, tokenizers=None):
    cfg = resolve_config(cfg)
    if fmt not in examples.FORMATS:
      raise ValueError(f'input format {fmt!r}; expected one of {examples.FORMATS}')
    if batch_size <= 0:
      raise ValueError(f'per-process batch size must be > 0, got {batch_size}')
    self.cfg, self.fmt, self.train, self.batch_size = cfg, fmt, train, batch_size
    self.shard = shard or (jax.process_index(), jax.process_count())
    if not 0 <= self.shard[0] < self.shard[1]:
      raise ValueError(f'shard {self.shard} must be (index, count) with 0 <= index < count')
    memory_table.check_cacheable(cfg, fmt, train)
    self.packed = packing.enabled(cfg, fmt, train)
    if self.packed:   # bad lengths fail here, not at the first batch
      packing.example_spec(cfg, fmt, image_size, int(cfg.image_queries), False)
    tok, text_tok = tokenizers if tokenizers is not None else load_tokenizers(cfg, fmt)
    aug = dict(cfg.augment)
    enabled = aug.pop('enabled', True)
    aug = augment.settings(aug)
    # k-shot rows are instruct rows; the eval format (evaluators) reads one face per row.
    shots = dict(cfg.fewshot) if int(cfg.fewshot.max_shots) > 0 and fmt == 'instruct' else None
    maker_cls = examples.ExampleMaker
    if shots:
      maker_cls = functools.partial(
          fewshot.FewShotMaker, max_shots=int(shots['max_shots']),
          shots=tuple(shots['shots']), fraction=float(shots['fraction']),
          relabel_fraction=float(shots['relabel_fraction']),
          image_queries=int(cfg.image_queries), image_token=int(cfg.image_token))
    if int(cfg.frames) > 0:   # clip rows: `frames` in place of `image`
      maker_cls = functools.partial(clips.ClipMaker, frames=int(cfg.frames), datasets=tuple(
          str(m[0]) for m in cfg.mixture) or (cfg.name,))
    self.maker = maker_cls(
        fmt=fmt, image_size=image_size, seq_len=cfg.seq_len, text_len=cfg.text_len,
        tokenizer=tok, text_tokenizer=text_tok, tasks=tuple(cfg.tasks),
        task_weights=tuple(cfg.task_weights), lm_caption_fraction=cfg.lm_caption_fraction,
        augment=aug if (train and enabled) else None, mean=tuple(cfg.image_mean),
        std=tuple(cfg.image_std), qformer_prompt=bool(cfg.qformer_prompt))
    mixture = [(str(m[0]), float(m[1])) for m in cfg.mixture] or [(cfg.name, 1.0)]
    if any(w <= 0 for _, w in mixture):
      raise ValueError(f'config.input.mixture weights must be > 0, got {mixture}')
    self.mixture = mixture
    srcs = [sources.open_split(name, cfg.split, cfg.data_dir) for name, _ in mixture]
    self.dataset = self._train_graph(srcs) if train else self._eval_graph(srcs)
    self._iter = None
    self._start = 0      # the batch grain's current iterator started at
    self.position = 0    # batches consumed

  # -- graphs ------------------------------------------------------------------------

  def _train_graph(self, srcs):
    p, n = self.shard
    parts = []
    for j, src in enumerate(srcs):
      ds = grain.MapDataset.range(len(src))[p::n]
      if len(ds) == 0:
        raise ValueError(f'dataset {self.mixture[j][0]!r} split {self.cfg.split!r} has '
                         f'{len(src)} records: none left for shard {p} of {n}')
      ds = ds.shuffle(seed=_seed(self.cfg.seed, 1, j, p)).repeat()
      parts.append(ds.map(functools.partial(_tag, j)))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(
        parts, [w for _, w in self.mixture])
    if self.cfg.cache:   # the same rows per batch, gathered from decoded examples
      tables = [memory_table.Table(src, self.maker, self.shard, j, self.mixture[j][0],
                                   threads=int(self.cfg.threads)) for j, src in enumerate(srcs)]
      return ds.batch(self.batch_size, drop_remainder=True).map(memory_table.Gather(tables))
    ds = ds.random_map(_Transform(srcs, self.maker),
                       seed=_seed(self.cfg.seed, 2, p))
    if self.packed:   # examples at their real length; packed and batched in _iterator
      return ds.map(packing.ExampleForm(self.fmt, int(self.cfg.image_queries),
                                        int(self.cfg.image_token)))
    return ds.batch(self.batch_size, drop_remainder=True)

  def _eval_graph(self, srcs):
    if len(srcs) != 1:
      raise ValueError('an eval pipeline reads one dataset; config.input.mixture has '
                       f'{len(srcs)}')
    p, n = self.shard
    per_shard = math.ceil(len(srcs[0]) / n)   # the largest shard; every process pads to it
    self.num_batches = math.ceil(per_shard / self.batch_size)
    ds = grain.MapDataset.range(self.num_batches * self.batch_size)
    ds = ds.map(_EvalTransform(srcs[0], self.maker, (p, n)))
    return ds.batch(self.batch_size, drop_remainder=True)

  # -- iteration ---------------------------------------------------------------------

  def _iterator(self, start: int | None = None):
    """grain's iterator over the batches from `start` (default: where it stands)."""
    if start is not None:
      self.close()
      self._start = start
    if self._iter is None:
      cfg = self.cfg
      ds = self.dataset[self._start:] if self._start else self.dataset
      # Packed: the reader's elements are examples, a batch's worth per buffered batch.
      per = self.batch_size if self.packed else 1
      ds = ds.to_iter_dataset(grain.ReadOptions(
          num_threads=int(cfg.threads), prefetch_buffer_size=int(cfg.prefetch) * per))
      if self.packed:
        ds = packing.pack(ds, cfg, self.fmt, batch_size=self.batch_size,
                          queries=int(cfg.image_queries), pad_id=self.maker.tokenizer.pad_id,
                          seed=_seed(cfg.seed, 3, self.shard[0]),
                          qformer_prompt=bool(cfg.qformer_prompt))
      if cfg.workers > 0:
        from absl import flags  # pylint: disable=g-import-not-at-top
        if not flags.FLAGS.is_parsed():   # grain's workers read absl flags
          flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(cfg.workers), per_worker_buffer_size=int(cfg.prefetch)))
      self._iter = iter(ds)
    return self._iter

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator())
    self.position += 1
    return batch

  def get_state(self) -> dict:
    """JSON-able: batches consumed, and grain's state of the iterator that started at
    batch `start` (grain's own checkpoint of the worker/buffer positions)."""
    return {'position': self.position, 'start': self._start,
            'grain': _jsonable(self._iterator().get_state())}

  def set_state(self, state: dict) -> None:
    """Continue at the saved batch: with grain's state when it fits this iterator's
    structure, else (the worker count changed) from the position alone -- batch k is a
    pure function of k."""
    position, start = int(state['position']), int(state.get('start', 0))
    it = self._iterator(start)
    saved = _int_keys(state.get('grain'))
    if saved is not None and _same_structure(_jsonable(saved), _jsonable(it.get_state())):
      it.set_state(saved)
    elif self.packed:
      raise ValueError('config.input.pack=True: packed rows resume from grain\'s saved '
                       'iterator state only, and this state does not fit the pipeline (was '
                       'config.input.workers changed?); saved: '
                       f'{str(_jsonable(saved))[:200]}')
    else:
      self._iterator(position)
    self.position = position

  def close(self) -> None:
    if self._iter is not None and hasattr(self._iter, 'close'):
      self._iter.close()
    self._iter = None

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Device keys of the GLOBAL batch (no '_' metadata, no ``id``)."""
    spec = example_spec(self.cfg, self.fmt, self.maker.image_size, self.packed)
    if not self.train:
      spec['valid'] = ((), np.float32)
    return {k: jax.ShapeDtypeStruct((global_batch, *shape), dtype)
            for k, (shape, dtype) in spec.items()}


def example_spec(cfg, fmt: str, image_size: int, packed: bool = False) -> dict:
  if packed:
    return packing.example_spec(cfg, fmt, image_size, int(cfg.image_queries),
                                bool(cfg.qformer_prompt))
  if int(cfg.frames) > 0:
    return clips.example_spec(fmt, image_size, int(cfg.frames), cfg.seq_len, cfg.text_len,
                              cfg.qformer_prompt)
  max_shots = int(cfg.fewshot.max_shots)
  if max_shots > 0 and fmt == 'instruct':
    return fewshot.example_spec(image_size, cfg.seq_len, cfg.text_len, cfg.qformer_prompt,
                                max_shots)
  return examples.example_spec(fmt, image_size, cfg.seq_len, cfg.text_len, cfg.qformer_prompt)


def _same_structure(a, b) -> bool:
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same_structure(a[k], b[k]) for k in a)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same_structure(x, y) for x, y in zip(a, b))
  return type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float)))


def _int_keys(x):
  """JSON turned grain's int dict keys (interleave's future_states) into strings."""
  if isinstance(x, dict):
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
            for k, v in x.items()}
  if isinstance(x, list):
    return [_int_keys(v) for v in x]
  return x


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  return x

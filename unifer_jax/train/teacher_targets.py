"""Teacher targets computed once, for distilling on the stored (or mirrored) faces
(``config.distill.targets = 'cached'``).

Online distillation (the default) runs the teacher's label pass inside every train step,
on the same augmented view the student sees. When the student sees the records as stored
(``config.input.augment.enabled = False``, or flips alone: a mirror image keeps its
label, so the stored face's answer is taught for both) the teacher's answer for a record
never changes, so asking again every epoch is waste: on the demo the teacher's pass is
~90 % of a distill step, and the student needs thousands of steps. Here the teacher
scores every train record once -- the basic-label candidates for records with a basic
label, the compound ones for records with a compound label, the same
``likelihood.candidate_log_likelihoods`` the online loss uses -- and the train input
carries each row's scores as ``teacher_basic`` / ``teacher_compound`` (log-likelihoods;
the loss applies the temperature) and, with a feature loss on, the teacher's feature of
every record as ``teacher_feature`` (``distill_losses.teacher_feature``, stored float16:
the demo's 16 x 192 prefix is ~6 KB per record).

The table is written to ``<workdir>/teacher_targets.npz`` with the teacher checkpoint
step and data it came from, so a resumed run reads it back instead of recomputing; a
table from another teacher step, data directory or record count is recomputed. Every process
computes the table on its first local device (no cross-host traffic; each host then
looks up the rows it reads). That suits teachers that fit one device; larger ones use
online distillation.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import jax
import numpy as np

from unifer_jax import sharding, workdirs
from unifer_jax.data import augment
from unifer_jax.evaluators import likelihood
from unifer_jax.train import distill_losses, param_restore, teacher as teacher_lib

FILE = 'teacher_targets.npz'
TASKS = {'basic': 'expression', 'compound': 'compound'}   # task -> the record's label key


def check_config(config) -> None:
  if not augment.is_flips_only(config.input.augment):
    raise ValueError("config.distill.targets='cached' needs config.input.augment.enabled="
                     "False or flips as its only augmentation (config_lib.flip_only): cached "
                     "targets are the teacher's answers for the stored records, and a mirror "
                     "image keeps its label, but crops, colour and occlusion change what the "
                     "teacher would see (use targets='online')")
  if config.input.get('mixture'):
    raise ValueError("config.distill.targets='cached' reads one source; config.input.mixture "
                     "must be empty")


def _num_records(config) -> int:
  from unifer_jax.data import pipeline, sources  # grain / tfds: only for cached targets
  cfg = pipeline.resolve_config(config.input)
  return len(sources.open_split(cfg.name, cfg.split, cfg.data_dir))


def _identity(config, teacher_step: int) -> dict:
  """What a stored table must have come from to be reused."""
  return {'teacher_workdir': str(Path(config.distill.teacher_workdir).absolute()),
          'teacher_step': teacher_step, 'feature': distill_losses.feature_kind(config.distill),
          'data_dir': str(config.input.data_dir), 'name': str(config.input.name),
          'split': str(config.input.split), 'records': _num_records(config)}


def compute(config, batch_size: int = 64) -> tuple[dict[str, np.ndarray], int]:
  """({'basic': [N, 8], 'compound': [N, 11]} log-likelihoods, NaN rows where a record has
  no such label, and 'feature' [N, ...] float16 when the loss needs it; teacher step) over
  every record of the train split."""
  from unifer_jax.data import pipeline  # grain / tfds: only when scoring
  mesh = sharding.make_mesh(config.mesh, jax.local_devices()[:1])
  teacher = teacher_lib.build(config, mesh)
  step = param_restore.newest_step(teacher.workdir)
  inputs = teacher.load()

  kind = distill_losses.feature_kind(config.distill)

  @jax.jit
  def encode(inp, x):
    """The image path once per record: {task: the LLM prefix it scores from} (one shared
    prefix unless the Q-Former is instruction-aware), and the feature the loss regresses
    (None without a feature loss)."""
    model = teacher.bind(inp)
    queries = likelihood.task_queries(model, x, {t: inp['prompts'][t] for t in TASKS})
    first = queries[next(iter(TASKS))]
    feature = distill_losses.teacher_feature(model, first, kind) if kind else None
    return {t: model.llm_proj(q) for t, q in queries.items()}, feature

  scorers = {task: jax.jit(lambda inp, prefix, task=task: likelihood.candidate_log_likelihoods(
      teacher.bind(inp), prefix, **likelihood.scored(inp['prompts'][task]))) for task in TASKS}

  cfg = pipeline.resolve_config(config.input)
  pipe = pipeline.Pipeline(cfg, pipeline.STAGE_FORMATS['distill'], batch_size=batch_size,
                           image_size=teacher.model_cfg.vit.image_size, train=False,
                           shard=(0, 1), tokenizers=(None, None))
  n = _num_records(config)
  table = {t: np.full((n, len(p.candidate_ids)), np.nan, np.float32)
           for t, p in teacher.prompts.items()}
  pending = {t: ([], []) for t in TASKS}          # task -> (indices, prefixes)

  def flush(task, final=False):
    idx, prefixes = pending[task]
    while len(idx) >= batch_size or (final and idx):
      take = min(batch_size, len(idx))
      x = np.stack(prefixes[:take])
      if take < batch_size:                        # one compiled shape: pad by repetition
        x = np.concatenate([x, np.repeat(x[-1:], batch_size - take, axis=0)])
      table[task][idx[:take]] = np.asarray(scorers[task](inputs, x))[:take]
      del idx[:take], prefixes[:take]

  start, shown = time.monotonic(), 0.0
  for b in range(pipe.num_batches):
    batch = next(pipe)
    rows = np.flatnonzero(batch['valid'] > 0)
    prefix, feature = jax.device_get(encode(inputs, batch['image']))
    if kind:
      feature = feature[rows].astype(np.float16)
      if 'feature' not in table:
        table['feature'] = np.zeros((n, *feature.shape[1:]), np.float16)
      table['feature'][batch['_index'][rows]] = feature
    for row in rows:
      for task, key in TASKS.items():
        if batch[key][row] >= 0:
          pending[task][0].append(int(batch['_index'][row]))
          pending[task][1].append(prefix[task][row])
    for task in TASKS:
      flush(task)
    elapsed = time.monotonic() - start
    if jax.process_index() == 0 and (elapsed - shown > 10 or b + 1 == pipe.num_batches):
      shown = elapsed
      eta = elapsed / (b + 1) * (pipe.num_batches - b - 1)
      print(f'teacher targets: batch {b + 1}/{pipe.num_batches} | elapsed {elapsed:.0f} s | '
            f'ETA {eta:.0f} s', flush=True)
  for task in TASKS:
    flush(task, final=True)
  pipe.close()
  return table, step


def load_or_compute(config, workdir: str | Path) -> dict[str, np.ndarray]:
  """The table for this run: read from ``workdir/FILE`` when it matches the teacher's
  newest checkpoint and the data, else computed (and written by process 0)."""
  check_config(config)
  path = workdirs.path(workdir) / FILE
  teacher_step = param_restore.newest_step(config.distill.teacher_workdir)
  want = _identity(config, teacher_step)
  main = jax.process_index() == 0
  if path.is_file():
    with path.open('rb') as f, np.load(io.BytesIO(f.read())) as stored:
      have = {k[len('id_'):]: stored[k].item() for k in stored.files if k.startswith('id_')}
      if have == want:
        if main:
          print(f'teacher targets: {path} ({len(stored["basic"])} records)', flush=True)
        return {t: stored[t] for t in stored.files if not t.startswith('id_')}
    if main:
      print(f'teacher targets: {path} is from {have}, not {want}; recomputing', flush=True)
  table, step = compute(config)
  if step != teacher_step:
    raise RuntimeError(f'teacher checkpoint changed while scoring ({teacher_step} -> {step})')
  if main:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **table, **{f'id_{k}': np.asarray(v) for k, v in want.items()})
    tmp = path.parent / (path.name + '.tmp')
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)   # never a half-written table under the real name
  return table


class CachedTargetsInput:
  """A train input whose batches also carry each row's cached teacher scores."""

  def __init__(self, base, table: dict[str, np.ndarray]):
    self.base, self.table = base, table

  def next_local_batch(self) -> dict[str, np.ndarray]:
    batch = self.base.next_local_batch(with_index=True)
    index = batch.pop('_index')
    for task in TASKS:
      scores = self.table[task][index]
      # Rows without this label kind carry zeros; the loss masks them by their label.
      batch[f'teacher_{task}'] = np.nan_to_num(scores, nan=0.0)
    if 'feature' in self.table:
      batch['teacher_feature'] = self.table['feature'][index]
    return batch

  def get_state(self) -> dict:
    return self.base.get_state()

  def set_state(self, state: dict) -> None:
    self.base.set_state(state)

  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    spec = dict(self.base.batch_spec())
    rows = next(iter(spec.values())).shape[0]
    for task in TASKS:
      spec[f'teacher_{task}'] = jax.ShapeDtypeStruct((rows, self.table[task].shape[1]),
                                                     np.float32)
    if 'feature' in self.table:
      feature = self.table['feature']
      spec['teacher_feature'] = jax.ShapeDtypeStruct((rows, *feature.shape[1:]), feature.dtype)
    return spec

"""Stage 4 loss: the student learns the teacher's label distributions on the SAME
augmented view the teacher sees in this step (consistent teaching), plus hard labels,
intensity / valence-arousal regression and an optional feature loss.

  loss = w.kl_basic * KL(p_T^basic || q_S^basic) + w.kl_compound * KL(compound)
       + w.ce_basic * CE(basic label) + w.ce_compound * CE(compound label)
       + w.intensity * MSE(intensity) + w.va * MSE(valence, arousal)
       + w.feature * feature loss (below)

p_T = the teacher's normalised label-string likelihoods (evaluators/likelihood.py),
computed in the step or, with ``config.distill.targets='cached'``, read from the batch
(``teacher_basic`` / ``teacher_compound``, train/teacher_targets.py), at temperature T
(applied to the teacher's log-likelihoods and the student's logits alike; KL scaled by
T^2 as Hinton et al.). Labels are masked where a record lacks them
(-1 / NaN); a KL term counts only rows whose record has that label kind (basic faces vs
compound faces), so the teacher is asked only what the record is about.

The feature loss (``config.distill.feature_target``; the student's ``feature_dim`` must be
``feature_size`` of it) regresses the student's feature head onto one of the teacher's
image representations:
  'prefix'     the Q-Former queries as the LLM receives them (llm_proj output, [Q, D]),
               each token standardised over D; loss = mean squared error. This is what
               the teacher's answer is computed from: a linear probe on it predicts the
               teacher's label at 0.97 on the demo, and regressing it lifts the student's
               agreement (configs/distill.py);
  'embedding'  the mean of its ITC query embeddings (the stage-1 image-text space);
               loss = 1 - cos.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from unifer_jax.evaluators import likelihood


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


FEATURE_TARGETS = ('prefix', 'embedding')


def feature_kind(distill_cfg) -> str:
  """The teacher feature the loss regresses ('' = no feature loss)."""
  if not distill_cfg.weights.get('feature', 0.0):
    return ''
  return distill_cfg.get('feature_target', 'embedding')


def feature_size(teacher_cfg, kind: str) -> int:
  """The student ``feature_dim`` that feature target ``kind`` of this teacher needs."""
  if kind == 'prefix':
    return teacher_cfg.qformer.num_queries * teacher_cfg.llm.hidden
  if kind == 'embedding':
    return teacher_cfg.embed_dim
  raise ValueError(f'config.distill.feature_target={kind!r}; expected one of {FEATURE_TARGETS}')


def teacher_feature(teacher, queries: jax.Array, kind: str) -> jax.Array:
  """[B, Q, D] standardised prefix tokens ('prefix') or [B, E] ('embedding')."""
  if kind == 'embedding':
    return teacher.image_embeddings(queries).mean(1).astype(jnp.float32)
  prefix = teacher.llm_proj(queries).astype(jnp.float32)
  # Per token, not per dataset: the same standardisation online and cached, no statistics
  # to carry, and no token dominates the loss by its scale.
  mean, var = prefix.mean(-1, keepdims=True), prefix.var(-1, keepdims=True)
  return (prefix - mean) * jax.lax.rsqrt(var + 1e-6)


def teacher_targets(teacher, images: jax.Array, prompts: dict, temperature: float,
                    feature: str | None = None) -> dict:
  """{'basic': [B, 8], 'compound': [B, 11]} distributions, and with ``feature`` the
  teacher's feature of that kind."""
  queries = likelihood.task_queries(teacher, images, prompts)
  out = {task: jax.nn.softmax(likelihood.candidate_log_likelihoods(
      teacher, teacher.llm_proj(queries[task]), **likelihood.scored(arrs)) / temperature, -1)
      for task, arrs in prompts.items()}
  if feature:  # an instruction-aware teacher's queries of the first task
    out['feature'] = teacher_feature(teacher, next(iter(queries.values())), feature)
  return jax.tree.map(jax.lax.stop_gradient, out)


def feature_loss(student_feature: jax.Array, target: jax.Array, kind: str) -> jax.Array:
  if kind == 'prefix':
    return ((student_feature.reshape(target.shape) - target) ** 2).mean()
  s = student_feature / jnp.linalg.norm(student_feature, axis=-1, keepdims=True).clip(1e-6)
  e = target / jnp.linalg.norm(target, axis=-1, keepdims=True).clip(1e-6)
  return (1.0 - (s * e).sum(-1)).mean()


def distill_loss(pair, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
  del rng
  cfg = pair.config
  w, t = cfg.weights, float(cfg.get('temperature', 1.0))
  kind = feature_kind(cfg)
  images = batch['image']
  if 'teacher_basic' in batch:   # cached (train/teacher_targets.py): scored once per record
    target = {task: jax.nn.softmax(batch[f'teacher_{task}'] / t, -1)
              for task in ('basic', 'compound')}
    if kind:
      target['feature'] = batch['teacher_feature'].astype(jnp.float32)
  elif pair.teacher is None:
    raise ValueError("config.distill.targets='cached' but the batch carries no teacher_basic "
                     "/ teacher_compound (the train loop joins them in: train/teacher_targets.py)")
  else:
    target = teacher_targets(pair.teacher, images, pair.prompts, t, kind)
  out = pair.student(images, train=True)
  aux, total = {}, jnp.zeros((), jnp.float32)

  for task, key in (('basic', 'expression'), ('compound', 'compound')):
    logits, labels = out[task], batch[key]
    has = labels >= 0
    p = target[task]
    log_q = jax.nn.log_softmax(logits / t, -1)
    kl = (p * (jnp.log(jnp.maximum(p, 1e-12)) - log_q)).sum(-1) * t * t
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    aux[f'kl_{task}'] = _masked_mean(kl, has)
    aux[f'ce_{task}'] = _masked_mean(ce, has)
    aux[f'agree_{task}'] = _masked_mean(logits.argmax(-1) == p.argmax(-1), has)
    aux[f'teacher_acc_{task}'] = _masked_mean(p.argmax(-1) == labels, has)
    total += w[f'kl_{task}'] * aux[f'kl_{task}'] + w[f'ce_{task}'] * aux[f'ce_{task}']

  intensity = batch['intensity']
  aux['intensity_mse'] = _masked_mean((out['intensity'] - jnp.nan_to_num(intensity)) ** 2,
                                      jnp.isfinite(intensity))
  va = jnp.stack([batch['valence'], batch['arousal']], -1)
  aux['va_mse'] = _masked_mean(((out['va'] - jnp.nan_to_num(va)) ** 2).mean(-1),
                               jnp.isfinite(va).all(-1))
  total += w.intensity * aux['intensity_mse'] + w.va * aux['va_mse']

  if kind:
    aux['feature'] = feature_loss(out['feature'], target['feature'], kind)
    total += w.feature * aux['feature']
  return total, aux

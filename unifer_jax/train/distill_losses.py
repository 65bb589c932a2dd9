"""Stage 4 loss: the student learns the teacher's label distributions on the SAME
augmented view the teacher sees in this step (consistent teaching), plus hard labels,
intensity / valence-arousal regression and an optional feature loss.

  loss = w.kl_basic * KL(p_T^basic || q_S^basic) + w.kl_compound * KL(compound)
       + w.ce_basic * CE(basic label) + w.ce_compound * CE(compound label)
       + w.intensity * MSE(intensity) + w.va * MSE(valence, arousal)
       + w.feature * (1 - cos(student feature, teacher image embedding))

p_T = the teacher's normalised label-string likelihoods (evaluators/likelihood.py),
computed in the step or, with ``config.distill.targets='cached'``, read from the batch
(``teacher_basic`` / ``teacher_compound``, train/teacher_targets.py), at temperature T
(applied to the teacher's log-likelihoods and the student's logits alike; KL scaled by
T^2 as Hinton et al.). Labels are masked where a record lacks them
(-1 / NaN); a KL term counts only rows whose record has that label kind (basic faces vs
compound faces), so the teacher is asked only what the record is about. The teacher
image embedding is the mean of its ITC query embeddings (the stage-1 image-text space).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from unifer_jax.evaluators import likelihood


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def teacher_targets(teacher, images: jax.Array, prompts: dict, temperature: float) -> dict:
  """{'basic': [B, 8], 'compound': [B, 11]} distributions and the image embedding."""
  queries = teacher.image_queries(images)
  prefix = teacher.llm_proj(queries)
  out = {task: jax.nn.softmax(likelihood.candidate_log_likelihoods(
      teacher, prefix, **arrs) / temperature, -1) for task, arrs in prompts.items()}
  out['embedding'] = teacher.image_embeddings(queries).mean(1)
  return jax.tree.map(jax.lax.stop_gradient, out)


def distill_loss(pair, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
  del rng
  cfg = pair.config
  w, t = cfg.weights, float(cfg.get('temperature', 1.0))
  images = batch['image']
  if 'teacher_basic' in batch:   # cached (train/teacher_targets.py): scored once per record
    target = {task: jax.nn.softmax(batch[f'teacher_{task}'] / t, -1)
              for task in ('basic', 'compound')}
  elif pair.teacher is None:
    raise ValueError("config.distill.targets='cached' but the batch carries no teacher_basic "
                     "/ teacher_compound (the train loop joins them in: train/teacher_targets.py)")
  else:
    target = teacher_targets(pair.teacher, images, pair.prompts, t)
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

  if 'feature' in out:
    s = out['feature'] / jnp.linalg.norm(out['feature'], axis=-1, keepdims=True).clip(1e-6)
    e = target['embedding']
    e = e / jnp.linalg.norm(e, axis=-1, keepdims=True).clip(1e-6)
    aux['feature'] = (1.0 - (s * e).sum(-1)).mean()
    total += w.feature * aux['feature']
  return total, aux

"""Optimizer and learning-rate schedules from ``config.optimizer`` / ``config.schedule``.

Parameters are addressed by '/'-joined paths ('llm/layers/attn/q/kernel'); freezing,
weight-decay masks and per-module learning rates are regexes over those paths, so a
stage's config says what trains without touching code (big_vision's ``config.schedule``
idea).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def path_str(path: tuple) -> str:
  return '/'.join(str(p) for p in path)


def keypath_str(keypath) -> str:
  """A jax tree key path (DictKey/SequenceKey entries) -> 'a/b/0/c'."""
  return path_str(tuple(getattr(k, 'key', getattr(k, 'idx', k)) for k in keypath))


def flat(params: Mapping) -> dict[str, Any]:
  """Nested params -> {'a/b/c': leaf}."""
  return {path_str(k): v for k, v in traverse_util.flatten_dict(params).items()}


def split_trainable(params: Mapping, freeze: str) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts; ``freeze`` is a regex searched in each path."""
  if not freeze:
    return dict(params), {}
  pattern = re.compile(freeze)
  items = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in items.items() if not pattern.search(path_str(k))}
  frozen = {k: v for k, v in items.items() if pattern.search(path_str(k))}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
  items = traverse_util.flatten_dict(trainable)
  items.update(traverse_util.flatten_dict(frozen))
  return traverse_util.unflatten_dict(items)


def schedule(cfg, total_steps: int) -> optax.Schedule:
  """Warmup (linear from 0) then cosine | linear | rsqrt | constant."""
  peak, warmup = float(cfg.peak_lr), int(cfg.get('warmup_steps', 0))
  end = peak * float(cfg.get('end_lr_ratio', 0.0))
  decay_steps = max(1, total_steps - warmup)
  name = cfg.get('name', 'cosine')
  if name == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif name == 'linear':
    after = optax.linear_schedule(peak, end, decay_steps)
  elif name == 'rsqrt':
    after = lambda s: peak * jax.lax.rsqrt(1.0 + s.astype(jnp.float32) / max(warmup, 1))
  elif name == 'constant':
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f'config.schedule.name={name!r}; expected cosine | linear | rsqrt | constant')
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _multipliers(params: Mapping, rules: Mapping[str, float]) -> Any:
  """Per-leaf learning-rate multiplier: the first matching regex wins, else 1."""
  compiled = [(re.compile(k), float(v)) for k, v in rules.items()]

  def one(path, _):
    s = keypath_str(path)
    return next((m for pat, m in compiled if pat.search(s)), 1.0)

  return jax.tree_util.tree_map_with_path(one, params)


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg, sched: optax.Schedule, trainable: Mapping) -> optax.GradientTransformation:
  """The optax chain for the trainable parameters (frozen ones never reach it)."""
  exclude = re.compile(cfg.get('decay_exclude', '') or r'(?!)')
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda p, _: not exclude.search(keypath_str(p)), trainable)
  name = cfg.get('name', 'adamw')
  if name == 'adamw':
    opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  elif name == 'adafactor':
    # Factored second moments: optimizer memory ~O(rows + cols) per matrix, for large runs.
    opt = optax.adafactor(sched, weight_decay_rate=cfg.weight_decay or None,
                          weight_decay_mask=decay_mask)
  elif name == 'sgd':
    opt = optax.sgd(sched, momentum=cfg.get('momentum', 0.9))
  else:
    raise ValueError(f'config.optimizer.name={name!r}; expected adamw | adafactor | sgd')
  chain = []
  if cfg.get('clip_grad_norm'):
    chain.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
  chain.append(opt)
  if cfg.get('lr_multipliers'):
    chain.append(scale_by_tree(_multipliers(trainable, cfg.lr_multipliers)))
  return optax.chain(*chain)

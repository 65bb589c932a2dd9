"""What a training stage adds to the one loop, behind one small interface, so that
``train/loop.py`` and ``train/step.py`` name no stage.

A stage is a loss plus, where it needs them:

  input adapter      ``adapt_input(data, workdir)``: wraps the input (distill with cached
                     targets joins each row's stored teacher scores to its batch)
  step batch spec    ``step_batch_spec(input_spec)``: what the compiled step receives, when
                     the hook turns the input's batch into another (grpo: prompts in,
                     rollouts out)
  extra step inputs  ``extra_abstract()`` / ``load_extra()``: frozen arrays the compiled step
                     takes after (state, batch, rng) -- a teacher or reference model; never
                     optimised, never written into the stage's checkpoints
  model view         ``model_view(model, extra)``: what the loss receives instead of the bare
                     model (distill: the student beside the teacher)
  per-step hook      ``before_step(state, local, step, extra, next_local)``: host work
                     before each step on this process's input rows (grpo: sampling and
                     rewards; ``next_local()`` reads more rows); returns the step's global
                     batch and host metrics for that step's record
  updates per step   ``updates_per_step(config)``: optimizer updates one compiled step makes
                     on its batch (grpo: mu passes over one rollout batch)

``build(config, setup)`` makes the stage of ``config.stage`` (the registry ``STAGES``; a
stage that only has a loss is a plain :class:`Stage`). ``state.build`` calls it, so the
loop and ``unifer compile-check`` lower the same step with the same extra inputs.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax

from unifer_jax.train import losses


class Stage:
  """A stage that is its loss alone (lm, vision, align, generate, instruct)."""

  has_hook = False

  def __init__(self, config, setup):
    self.config, self.setup = config, setup

  @classmethod
  def updates_per_step(cls, config) -> int:
    del config
    return 1

  def loss(self) -> Callable:
    return losses.get(self.config.stage, self.config)

  def adapt_input(self, data, workdir):
    del workdir
    return data

  def step_batch_spec(self, input_spec: dict) -> dict:
    return input_spec

  def extra_abstract(self) -> Any:
    """ShapeDtypeStructs (with shardings) of the step's extra input, or None."""
    return None

  def load_extra(self) -> Any:
    return None

  def model_view(self, model, extra):
    del extra
    return model

  def before_step(self, state, local: dict, step: int, extra, next_local) -> tuple[dict, dict]:
    """Only called when ``has_hook``: (the step's global batch, host metrics)."""
    raise NotImplementedError

  def log_record(self, record: dict) -> dict:
    """Derived figures added to each logged record (host side)."""
    return record

  def finish(self, workdir) -> None:
    """After the last step (process 0 writes figures into the workdir)."""
    del workdir

  # -- helpers the step uses ------------------------------------------------------------
  def extra_shardings(self) -> Any:
    abstract = self.extra_abstract()
    return None if abstract is None else jax.tree.map(lambda a: a.sharding, abstract)


# Stage name -> 'module:Class' (imported when used: grpo pulls in the sampler and rewards).
STAGES = {
    'distill': 'unifer_jax.train.distill_stage:DistillStage',
    'grpo': 'unifer_jax.train.grpo:GRPOStage',
}


def stage_class(name: str) -> type[Stage]:
  if name not in STAGES:
    if name not in losses.LOSSES:
      raise KeyError(f'config.stage={name!r}; stages: {sorted(set(losses.LOSSES) | set(STAGES))}')
    return Stage
  module, cls = STAGES[name].split(':')
  return getattr(importlib.import_module(module), cls)


def build(config, setup) -> Stage:
  return stage_class(config.stage)(config, setup)

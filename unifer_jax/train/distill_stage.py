"""Stage 4 on the stage interface (train/stages.py): the frozen teacher is the step's
extra input (online targets) or its scores ride in the batch (cached targets, joined by
the input adapter); the loss receives a :class:`Distillation` pair.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unifer_jax.train import stages


@dataclasses.dataclass(frozen=True)
class Distillation:
  """What a distill loss receives: the student being trained and the frozen teacher."""
  student: Any
  teacher: Any            # None with cached targets (the batch carries its scores)
  prompts: dict | None    # task -> the likelihood.LabelPrompt arrays
  config: Any             # config.distill (loss weights, temperature)


class DistillStage(stages.Stage):

  def __init__(self, config, setup):
    super().__init__(config, setup)
    from unifer_jax.train import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
    self.targets = config.distill.get('targets', 'online')
    if self.targets not in ('online', 'cached'):
      raise ValueError(f"config.distill.targets={self.targets!r}; expected 'online' or "
                       f"'cached'")
    teacher_lib.check_feature(config)
    # 'cached': the batches carry the teacher's scores, no teacher in the step.
    self.teacher = teacher_lib.build(config, setup.mesh) if self.targets == 'online' else None

  def adapt_input(self, data, workdir):
    if self.targets != 'cached':
      return data
    from unifer_jax.train import teacher_targets  # pylint: disable=g-import-not-at-top
    return teacher_targets.CachedTargetsInput(data, teacher_targets.load_or_compute(
        self.config, workdir))

  def extra_abstract(self):
    return None if self.teacher is None else self.teacher.abstract_inputs()

  def load_extra(self):
    return None if self.teacher is None else self.teacher.load()

  def model_view(self, model, extra):
    online = self.teacher is not None
    return Distillation(student=model, teacher=self.teacher.bind(extra) if online else None,
                        prompts=extra['prompts'] if online else None, config=self.config.distill)

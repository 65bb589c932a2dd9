"""The distillation teacher: a finished instruct-stage workdir, as a frozen step input.

``config.distill.teacher_workdir`` names it. Its ``config.json`` gives the architecture
(LoRA included) and its tokenizer; its newest checkpoint gives the parameters -- only
the ``params`` subtree is read (no optimizer state), directly into the shardings the
distill config's rules give the teacher's logical axes. The parameters and the
tokenised label prompts are an extra argument of the train step, not part of the train
state: they get no optimizer state and are never written into the student's
checkpoints (a resumed run reloads them from the teacher's workdir).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from unifer_jax import sharding, workdirs
from unifer_jax.data import tokenizer as tokenizer_lib
from unifer_jax.evaluators import likelihood
from unifer_jax.models import presets
from unifer_jax.models.unifer import UniFER
from unifer_jax.train import distill_losses, param_restore, state as state_lib

LABEL_TASKS = ('basic', 'compound')


@dataclasses.dataclass
class Teacher:
  workdir: Path
  model_cfg: ml_collections.ConfigDict
  graphdef: Any
  abstract_params: Any          # ShapeDtypeStructs with their shardings
  param_shardings: Any
  prompts: dict                 # task -> likelihood.LabelPrompt
  replicated: NamedSharding

  def abstract_inputs(self) -> dict:
    prompts = {t: {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.replicated)
                   for k, v in p.arrays().items()} for t, p in self.prompts.items()}
    return {'params': self.abstract_params, 'prompts': prompts}

  def input_shardings(self) -> dict:
    return jax.tree.map(lambda a: a.sharding, self.abstract_inputs())

  def load(self) -> dict:
    """The concrete step input: parameters from the newest checkpoint + prompt arrays."""
    try:
      step, params = param_restore.load_params(self.workdir, self.abstract_params)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'config.distill.teacher_workdir: {e}') from None
    prompts = jax.device_put({t: p.arrays() for t, p in self.prompts.items()}, self.replicated)
    if jax.process_index() == 0:
      print(f'teacher: {self.workdir} step {step}', flush=True)
    return {'params': params, 'prompts': prompts}

  def bind(self, inputs: dict) -> UniFER:
    params = jax.lax.stop_gradient(inputs['params'])
    return nnx.merge(self.graphdef, params)


def read_config(workdir: Path) -> ml_collections.ConfigDict:
  try:
    return workdirs.read_config(workdir)
  except FileNotFoundError:
    raise FileNotFoundError(f'config.distill.teacher_workdir={workdir}: no config.json (is '
                            f'it a finished instruct-stage workdir?)') from None


def check_feature(config) -> None:
  """With a feature loss on, the student's feature head must be the teacher feature's size."""
  dcfg = config.distill
  kind = distill_losses.feature_kind(dcfg)
  if not kind or not dcfg.get('teacher_workdir'):
    return
  want = distill_losses.feature_size(
      state_lib.model_config(read_config(Path(dcfg.teacher_workdir).absolute())), kind)
  if config.model.get('feature_dim', 0) != want:
    raise ValueError(f"config.distill.weights.feature > 0 with feature_target={kind!r}: "
                     f"config.model.feature_dim must be {want} for the teacher in "
                     f"{dcfg.teacher_workdir}, not {config.model.get('feature_dim', 0)}")


def _check_same_view(config, tcfg, workdir: Path) -> None:
  """The student's images are the teacher's: normalised as the teacher was trained."""
  from unifer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ours, theirs = pipeline.resolve_config(config.input), pipeline.resolve_config(tcfg.input)
  for key in ('image_mean', 'image_std'):
    if not np.allclose(ours[key], theirs[key]):
      raise ValueError(f'config.input.{key}={tuple(ours[key])} but the teacher {workdir} '
                       f'trained with {tuple(theirs[key])}: teacher and student read one '
                       f'view; pass --config.input.{key}="{tuple(theirs[key])}"')


def build(config, mesh) -> Teacher:
  """Abstract teacher (nothing read but its config.json and tokenizer)."""
  dcfg = config.distill
  if not dcfg.get('teacher_workdir'):
    raise ValueError('config.distill.teacher_workdir is empty; give the instruct-stage '
                     'workdir of the teacher')
  workdir = Path(dcfg.teacher_workdir).absolute()
  tcfg = read_config(workdir)
  model_cfg = state_lib.model_config(tcfg)
  if state_lib.model_class(model_cfg) is not UniFER:
    raise ValueError(f'{workdir}/config.json: the teacher must be a UniFER model')
  input_size = config.input.get('image_size') or presets.vision_config(
      state_lib.model_config(config)).image_size
  if model_cfg.vit.image_size != input_size:
    raise ValueError(f'teacher {workdir} sees {model_cfg.vit.image_size}px images but the '
                     f'distill input is {input_size}px: teacher and student share one view')
  _check_same_view(config, tcfg, workdir)
  abstract = nnx.eval_shape(lambda: UniFER(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, param_state = nnx.split(abstract, nnx.Param)
  rules = [tuple(r) for r in config.sharding.rules]
  shardings_state = sharding.state_shardings(param_state, mesh, rules)
  param_shardings = state_lib._named(shardings_state, lambda v: v.get_value())
  abstract_params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nnx.to_pure_dict(param_state), param_shardings)
  tok_dir = dcfg.get('tokenizer') or tcfg.input.get('tokenizer', '')
  if not tok_dir:
    raise ValueError(f'config.distill.tokenizer is empty and {workdir}/config.json names no '
                     f'input.tokenizer')
  tok = tokenizer_lib.load(tok_dir)
  text_tok, text_len = None, 0
  if model_cfg.qformer.get('instruction_aware', False):  # InstructBLIP reads the prompt too
    from unifer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    teacher_input = pipeline.resolve_config(tcfg.input)
    text_tok = tokenizer_lib.load(teacher_input.text_tokenizer or tok_dir)
    text_len = teacher_input.text_len
  prompts = {t: likelihood.label_prompt(tok, t, text_tok=text_tok, text_len=text_len)
             for t in LABEL_TASKS}
  if max(int(np.max(p.candidate_ids)) for p in prompts.values()) >= model_cfg.llm.vocab_size:
    raise ValueError(f'tokenizer {tok_dir} has ids beyond the teacher vocabulary '
                     f'{model_cfg.llm.vocab_size}')
  return Teacher(workdir=workdir, model_cfg=model_cfg, graphdef=graphdef,
                 abstract_params=abstract_params, param_shardings=param_shardings,
                 prompts=prompts, replicated=NamedSharding(mesh, P()))

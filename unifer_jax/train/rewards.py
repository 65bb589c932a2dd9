"""Verifiable rewards for GRPO, one registry: ``REWARDS[name](completion, prompt) -> float
or None`` (None: the reward does not apply to this prompt's task; it then counts 0 in the
weighted sum and is left out of that reward's logged mean).

``config.grpo.rewards = {name: weight}`` picks them; the total is ``sum(weight * value)``.

| name | applies to | value |
|---|---|---|
| answer | basic, compound, open_vocab | 1 if the label FERBench's extraction reads from the completion (evaluators/ferbench.extract_label, RAF-DB protocol, the candidates the prompt offered -- the code the generative evaluator runs) is the true one, else 0 |
| format | every task | 1 if the completion is exactly ``<think>...</think><answer>...</answer>`` when the prompt asked for reasoning, ``<answer>...</answer>`` when it asked for the answer alone (one of each tag, nothing outside, non-empty), else 0 |
| au_f1 | rationale; CoT label prompts | F1 of the action units the completion names (its answer for the rationale task, its ``<think>`` part for a CoT prompt) against the record's visible action units (those its rationale names; occluded ones no answer can see); both empty = 1 |
| intensity | intensity | 1 - abs(answer - truth), 0 when no number or word is found |
| va | valence_arousal | 1 - (abs(dv) + abs(da)) / 4 (each in [-1, 1]), 0 when unparseable |

A :class:`Prompt` is what a reward knows of the question: the task, whether it asked for
reasoning, the record's labels and the candidates it offered. ``prompt_from_texts`` makes
one from the decoded prompt and training target, so it sees exactly what the instruct
pipeline asked (train/grpo_data.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

from unifer_jax.data import answers, instructions, labels
from unifer_jax.evaluators import ferbench, instruct as instruct_eval

LABEL_TASKS = ('basic', 'compound', 'open_vocab')


@dataclasses.dataclass(frozen=True)
class Prompt:
  task: str
  think: bool                     # the prompt asked for <think>...</think> first
  candidates: tuple = ()          # label strings offered, as the prompt wrote them
  answer: str = ''                # the true label as the prompt wrote it (label tasks)
  aus: tuple | None = None        # the record's visible action units (None: no rationale)
  intensity: float = math.nan
  valence: float = math.nan
  arousal: float = math.nan


# ---- the rewards --------------------------------------------------------------------

def answer_reward(completion: str, p: Prompt) -> float | None:
  if p.task not in LABEL_TASKS:
    return None
  return float(ferbench.extract_label(completion, p.candidates, 'rafdb') == p.answer)


def format_reward(completion: str, p: Prompt) -> float:
  return float(answers.is_well_formed(completion, p.think))


def _named_aus(text: str) -> set:
  return set(instructions.parse_answer('rationale', f'<answer>{text}</answer>') or ())


def au_f1_reward(completion: str, p: Prompt) -> float | None:
  if p.aus is None:
    return None
  if p.task == 'rationale':
    said = _named_aus(answers.answer_span(completion))
  elif p.think and p.task in instructions.COT_TASKS:
    m = re.search(r'<think>(.*?)(?:</think>|$)', completion, re.DOTALL)
    said = _named_aus(m.group(1)) if m else set()
  else:
    return None
  truth = set(p.aus)
  if not said and not truth:
    return 1.0
  return instruct_eval.au_f1([said], [truth])


def intensity_reward(completion: str, p: Prompt) -> float | None:
  if p.task != 'intensity':
    return None
  v = instructions.parse_answer('intensity', completion)
  return 0.0 if v is None else max(0.0, 1.0 - abs(v - p.intensity))


def va_reward(completion: str, p: Prompt) -> float | None:
  if p.task != 'valence_arousal':
    return None
  va = instructions.parse_answer('valence_arousal', completion)
  if va is None:
    return 0.0
  err = abs(va[0] - p.valence) + abs(va[1] - p.arousal)
  return max(0.0, 1.0 - err / 4) if math.isfinite(err) else 0.0


REWARDS: dict[str, Callable[[str, Prompt], float | None]] = {
    'answer': answer_reward,
    'format': format_reward,
    'au_f1': au_f1_reward,
    'intensity': intensity_reward,
    'va': va_reward,
}


def check_weights(weights: dict) -> dict[str, float]:
  bad = sorted(set(weights) - set(REWARDS))
  if bad or not weights:
    raise ValueError(f'config.grpo.rewards={dict(weights)}: unknown {bad}; expected '
                     f'{{name: weight}} over {sorted(REWARDS)}')
  return {k: float(v) for k, v in weights.items()}


def score(completions, prompts, weights: dict) -> tuple[list[float], dict[str, list]]:
  """(weighted totals, {name: per-completion value or None}) for paired lists."""
  names = list(weights)
  values = {n: [REWARDS[n](c, p) for c, p in zip(completions, prompts)] for n in names}
  totals = [sum(weights[n] * (values[n][i] or 0.0) for n in names)
            for i in range(len(completions))]
  return totals, values


# ---- what a prompt asked ----------------------------------------------------------------

def prompt_from_texts(task: str, prompt_text: str, target_text: str, record: dict) -> Prompt:
  """The :class:`Prompt` of an instruct example: ``prompt_text`` the user's message as
  asked, ``target_text`` the training target (``<think>..</think><answer>..</answer>``),
  ``record`` its label fields (expression, compound, intensity, valence, arousal)."""
  think = target_text.lstrip().startswith('<think>')
  m = re.search(r'<think>(.*?)</think>', target_text, re.DOTALL)
  rationale = m.group(1) if m else (answers.answer_span(target_text) if task == 'rationale'
                                    else None)
  aus = None if rationale is None else tuple(sorted(_named_aus(rationale)))
  fields = dict(task=task, think=think, aus=aus,
                intensity=float(record.get('intensity', math.nan)),
                valence=float(record.get('valence', math.nan)),
                arousal=float(record.get('arousal', math.nan)))
  if task == 'basic':
    return Prompt(candidates=labels.BASIC, answer=labels.BASIC[int(record['expression'])],
                  **fields)
  if task == 'compound':
    return Prompt(candidates=labels.COMPOUND,
                  answer=labels.COMPOUND[int(record['compound'])], **fields)
  if task == 'open_vocab':
    cands = instructions.offered_candidates(task, prompt_text)
    answer = answers.answer_span(target_text)
    if cands is None or answer not in cands:
      raise ValueError(f'open_vocab prompt {prompt_text!r}: cannot read the offered candidates '
                       f'(or the answer {answer!r} is not among them)')
    return Prompt(candidates=tuple(cands), answer=answer, **fields)
  return Prompt(**fields)

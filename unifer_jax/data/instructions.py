"""FER instructions made from record fields at pipeline time (parsing: answers.py).

Every dataset gets instructions this way (nothing is stored): a task is offered for a
record only if the record holds the field it needs (schema sentinels -1 / NaN / ''
mean absent). ``TASKS`` is append-only: batches carry ``task`` as an index into it.

| task | needs | answer (inside ``<answer></answer>``) | parse_answer returns |
|---|---|---|---|
| describe | caption | the caption | the answer text |
| basic | expression | a BASIC name, e.g. 'happiness' | index into labels.BASIC |
| compound | compound | a COMPOUND name, e.g. 'happily surprised' | index into labels.COMPOUND |
| intensity | intensity | '0.62 (marked)': 2 decimals + FACS-style word | float in [0, 1] |
| valence_arousal | valence, arousal | 'valence 0.41, arousal -0.12' | (valence, arousal) |
| rationale | rationale | the record's rationale, e.g. 'AU6 cheek raiser (C), ...' | sorted tuple of AU numbers |
| uncertainty | label_dist or compound | 'happiness 0.50, surprise 0.50' | ((BASIC index, p), ...) |
| open_vocab | expression or compound | the chosen candidate as written in the prompt | canonical label name |
| age_group | age_group | '20-39' | index into labels.AGE_GROUPS |
| gender | gender | 'female' | index into labels.GENDERS |

Targets are UniFER-CoT style: ``<think>{rationale}</think><answer>{label}</answer>`` for
the COT_TASKS when the record has a rationale, else ``<answer>{answer}</answer>``; the
prompt then asks for that format.

``uncertainty`` (defined honestly): the two largest entries of the record's soft label
over BASIC -- ``label_dist`` when present (FERPlus-style votes; one-hot for the
synthetic corpus's basic faces, whose answer is then e.g. 'anger 1.00'), else 0.5 / 0.5
over a compound's two components. Entries with zero mass are left out, so a one-hot
label gives one entry. It is annotator (or construction) uncertainty, not model
confidence; the synthetic corpus has no annotator disagreement.

``open_vocab`` is FERBench-style: a random subset (3..all) of the labels of the record's
kind (basic or compound), always holding the true one, in shuffled order, written in one
vocabulary per prompt (canonical nouns, adjectives as FERPlus uses, or synonyms such as
'joyful'); the answer is the true label as the prompt wrote it.
"""

from __future__ import annotations

import math
import re

import numpy as np

from unifer_jax.data import labels
# Label words and parsing live in answers.py; re-exported here (one import for callers).
from unifer_jax.data.answers import (  # pylint: disable=unused-import
    INTENSITY_WORDS, SYNONYMS, TASKS, answer_span, intensity_word, parse_answer,
    surface_forms, written_form)

TASK_INDEX = {t: i for i, t in enumerate(TASKS)}
COT_TASKS = ('basic', 'compound', 'intensity', 'uncertainty', 'open_vocab')
# The share of CoT-task examples that ask for the answer alone even where a rationale
# exists (UniFER-CoT mixes both forms). The label-likelihood scorer -- the distillation
# teacher and `unifer predict`'s probabilities -- reads that form; trained only on CoT
# targets, the demo model's answer-only label was the same for every face.
ANSWER_ONLY_FRACTION = 0.25

_COT_HINTS = (
    'Reason about the facial action units between <think></think> tags, then give the '
    'final answer between <answer></answer> tags.',
    'Think in <think></think> and answer in <answer></answer>.',
    'Explain which facial movements you see in <think></think>, then answer in '
    '<answer></answer>.',
)
_ANSWER_HINTS = (
    'Give the answer between <answer></answer> tags.',
    'Answer in <answer></answer>.',
)

_PROMPTS = {
    'describe': (
        'Describe this face.',
        'Describe the facial expression in this image.',
        'What does this person\'s face look like?',
    ),
    'basic': (
        'Which basic facial expression does this face show? Choose from: {labels}.',
        'Classify the facial expression in this image as one of: {labels}.',
        'What emotion is this person expressing? The options are {labels}.',
    ),
    'compound': (
        'Which compound expression does this face show? Choose from: {labels}.',
        'This face blends two emotions. Which compound expression is it: {labels}?',
        'Name the mix of emotions on this face, one of: {labels}.',
    ),
    'intensity': (
        'How intense is the facial expression, from 0 (none) to 1 (maximum)?',
        'Rate the strength of this expression on a scale from 0 to 1.',
        'How strongly is the expression shown? Give a number between 0 and 1 and a word.',
    ),
    'valence_arousal': (
        'Estimate the valence and arousal of this face, each between -1 and 1.',
        'Where does this expression lie on the circumplex? Give valence and arousal in '
        '[-1, 1].',
        'How pleasant (valence) and how activated (arousal) does this person look, from '
        '-1 to 1?',
    ),
    'rationale': (
        'Which facial action units are active in this face?',
        'List the FACS action units you can see, with their intensities.',
        'Describe the facial muscle movements using FACS action units.',
    ),
    'uncertainty': (
        'Which two expressions best describe this face, and how much of each? Choose from: '
        '{labels}.',
        'Give the two most likely expressions among {labels}, with a probability for each.',
    ),
    'open_vocab': (
        'You are an expert in facial expression recognition. Which expression is most '
        'prominent in this face? Select one of the candidate labels: {labels}.',
        'Pick the label that best fits this facial expression: {labels}.',
        'Look at the face and choose one of: [{labels}].',
        'Which of these words describes the expression best? {labels}.',
    ),
    'age_group': (
        'Which age group does this person belong to: {labels}?',
        'Estimate the person\'s age group. Options: {labels}.',
    ),
    'gender': (
        'What is the perceived gender of this person: {labels}?',
        'Is this person male or female? Answer {labels}.',
    ),
}


# ---- record fields -----------------------------------------------------------------

def text_field(record, key) -> str:
  """A text field as str (tfds gives bytes); '' if absent."""
  v = record.get(key, '')
  return v.decode('utf-8') if isinstance(v, (bytes, np.bytes_)) else str(v)


def _int(record, key) -> int:
  return int(record.get(key, -1))


def _float(record, key) -> float:
  return float(record.get(key, math.nan))


def _soft_label(record) -> np.ndarray | None:
  dist = record.get('label_dist')
  if dist is not None:
    dist = np.asarray(dist, np.float64)
    if np.all(np.isfinite(dist)) and dist.sum() > 0:
      return dist / dist.sum()
  c = _int(record, 'compound')
  if c >= 0:
    out = np.zeros(len(labels.BASIC))
    for name in labels.COMPOUND_COMPONENTS[labels.COMPOUND[c]]:
      out[labels.BASIC.index(name)] += 0.5
    return out
  return None


def available_tasks(record) -> list[str]:
  """The tasks whose needed fields this record holds, in TASKS order."""
  has = {
      'describe': bool(text_field(record, 'caption')),
      'basic': _int(record, 'expression') >= 0,
      'compound': _int(record, 'compound') >= 0,
      'intensity': math.isfinite(_float(record, 'intensity')),
      'valence_arousal': (math.isfinite(_float(record, 'valence'))
                          and math.isfinite(_float(record, 'arousal'))),
      'rationale': bool(text_field(record, 'rationale')),
      'uncertainty': _soft_label(record) is not None,
      'open_vocab': _int(record, 'expression') >= 0 or _int(record, 'compound') >= 0,
      'age_group': _int(record, 'age_group') >= 0,
      'gender': _int(record, 'gender') >= 0,
  }
  return [t for t in TASKS if has[t]]


def sample_task(record, tasks, weights, rng: np.random.Generator) -> str:
  """One of `tasks` this record supports, drawn with `weights` renormalised over them."""
  ok = set(available_tasks(record))
  pool = [(t, w) for t, w in zip(tasks, weights) if t in ok and w > 0]
  if not pool:
    raise ValueError(
        f'record {text_field(record, "id")!r} ({text_field(record, "source")}) supports none of '
        f'config.input.tasks={list(tasks)}; it supports {sorted(ok)}')
  p = np.array([w for _, w in pool], np.float64)
  return pool[rng.choice(len(pool), p=p / p.sum())][0]


# ---- examples ----------------------------------------------------------------------

def _answer_body(record, task, rng) -> tuple[str, list | None]:
  """(answer text, open-vocab candidates or None)."""
  if task == 'describe':
    return text_field(record, 'caption'), None
  if task == 'basic':
    return labels.BASIC[_int(record, 'expression')], None
  if task == 'compound':
    return labels.COMPOUND[_int(record, 'compound')], None
  if task == 'intensity':
    v = round(min(1.0, max(0.0, _float(record, 'intensity'))), 2)   # word of the shown value
    return f'{v:.2f} ({intensity_word(v)})', None
  if task == 'valence_arousal':
    return f'valence {_float(record, "valence"):.2f}, arousal {_float(record, "arousal"):.2f}', None
  if task == 'rationale':
    return text_field(record, 'rationale'), None
  if task == 'uncertainty':
    dist = _soft_label(record)
    order = sorted(range(len(dist)), key=lambda i: (-dist[i], i))[:2]
    return ', '.join(f'{labels.BASIC[i]} {dist[i]:.2f}' for i in order if dist[i] > 0), None
  if task == 'open_vocab':
    return _open_vocab(record, rng)
  if task == 'age_group':
    return labels.AGE_GROUPS[_int(record, 'age_group')], None
  if task == 'gender':
    return labels.GENDERS[_int(record, 'gender')], None
  raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')


def _open_vocab(record, rng) -> tuple[str, list]:
  if _int(record, 'expression') >= 0:
    vocab, true = labels.BASIC, labels.BASIC[_int(record, 'expression')]
  else:
    vocab, true = labels.COMPOUND, labels.COMPOUND[_int(record, 'compound')]
  others = [n for n in vocab if n != true]
  k = int(rng.integers(2, len(others) + 1))       # 3 .. all candidates
  names = [true] + [others[i] for i in rng.choice(len(others), k, replace=False)]
  names = [names[i] for i in rng.permutation(len(names))]
  style = int(rng.integers(3))
  written = {n: written_form(n, style, rng) for n in names}
  return written[true], [written[n] for n in names]


def make_example(record, task: str, rng: np.random.Generator) -> tuple[str, str]:
  """(user prompt, target response) for `record` and `task`.

  The prompt is the user's message only; pipelines wrap it in the tokenizer's chat
  template. Raises ValueError if the record lacks the task's field.
  """
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
  if task not in available_tasks(record):
    raise ValueError(f'record {text_field(record, "id")!r} has no field for task {task!r}')
  body, cands = _answer_body(record, task, rng)
  think = (task in COT_TASKS and bool(text_field(record, 'rationale'))
           and rng.random() >= ANSWER_ONLY_FRACTION)
  prompt = prompt_for(task, cands, phrasing=int(rng.integers(len(_PROMPTS[task]))),
                      think=think, hint=int(rng.integers(len(_COT_HINTS if think else _ANSWER_HINTS))))
  if think:
    return prompt, f"<think>{text_field(record, 'rationale')}</think><answer>{body}</answer>"
  return prompt, f'<answer>{body}</answer>'


def prompt_for(task: str, candidates=None, *, phrasing: int = 0, think: bool | None = None,
               hint: int = 0) -> str:
  """A prompt of `task` exactly as training writes it (evaluators ask the same way).

  `candidates`: the label strings to offer (open_vocab needs them; the other label
  tasks default to their whole vocabulary in canonical order). `think` picks the
  UniFER-CoT hint, else the answer-only one; by default the CoT hint for the COT_TASKS
  and the answer-only one for the rest, as training asks them (a CoT hint on a
  valence/arousal prompt, never seen in training, got a CoT intensity answer).
  """
  if think is None:
    think = task in COT_TASKS
  vocab = {'basic': labels.BASIC, 'compound': labels.COMPOUND, 'uncertainty': labels.BASIC,
           'age_group': labels.AGE_GROUPS, 'gender': labels.GENDERS}.get(task)
  shown = list(candidates) if candidates is not None else vocab
  if task == 'open_vocab' and not shown:
    raise ValueError('open_vocab prompts need candidate labels')
  prompt = _PROMPTS[task][phrasing]
  if shown is not None:
    listed = ', '.join(shown[:-1]) + ' or ' + shown[-1] if task == 'age_group' else ', '.join(shown)
    prompt = prompt.format(labels=listed)
  hints = _COT_HINTS if think else _ANSWER_HINTS
  return f'{prompt} {hints[hint]}'


def offered_candidates(task: str, text: str) -> list[str] | None:
  """The label strings a ``task`` prompt offered, read back from its text (as written by
  ``prompt_for``, possibly inside a chat template and decoded from tokens), or None when
  no phrasing of the task matches. GRPO's answer reward scores open-vocabulary
  completions against exactly these."""
  for phrasing in _PROMPTS[task]:
    if '{labels}' not in phrasing:
      continue
    before, after = (re.escape(part).replace('\\ ', r'\s*') for part in phrasing.split('{labels}'))
    hints = '|'.join(re.escape(h.split(' ')[0]) for h in _COT_HINTS + _ANSWER_HINTS)
    m = re.search(before + r'\s*(.+?)\s*' + after + r'\s*(?:' + hints + ')', text, re.DOTALL)
    if m:
      listed = m.group(1)
      if task == 'age_group' and ' or ' in listed:
        head, _, last = listed.rpartition(' or ')
        return [c.strip() for c in head.split(',')] + [last.strip()]
      return [c.strip() for c in listed.split(',')]
  return None


def prompt_variants(task: str, think: bool = False) -> list[tuple[int, int]]:
  """Every (phrasing, hint) pair training writes a ``task`` prompt with, in the ``think``
  form; the first, (0, 0), is the one evaluators and the teacher's scorer ask by default."""
  hints = _COT_HINTS if think else _ANSWER_HINTS
  return [(p, h) for p in range(len(_PROMPTS[task])) for h in range(len(hints))]


def template_texts() -> list[str]:
  """Every prompt phrasing and hint with every label word filled in (tokenizer corpus)."""
  out = list(_COT_HINTS) + list(_ANSWER_HINTS) + list(INTENSITY_WORDS) + ['none']
  lists = [', '.join(v) for v in (labels.BASIC, labels.COMPOUND, labels.AGE_GROUPS, labels.GENDERS)]
  for forms in [surface_forms(n) for n in labels.BASIC + labels.COMPOUND]:
    lists.append(', '.join(forms))
  for task, prompts in _PROMPTS.items():
    for p in prompts:
      out += [p.format(labels=l) for l in lists] if '{labels}' in p else [p]
  out += [f'AU{au} {name}' for au, name in labels.AUS.items()]
  return out

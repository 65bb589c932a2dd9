"""Label words and answer parsing for the FER instructions (instructions.py re-exports
``parse_answer``, ``answer_span`` and the label-word helpers).

``parse_answer(task, text)`` reads a response the way training writes targets: the last
``<answer>...</answer>`` span (an unclosed one runs to the end; no tag: the text without
its ``<think>`` part), then per task -- labels by exact match, else the earliest
whole-word match of any surface form (canonical, adjective, synonyms; the longer form at
a tie), numbers by regex. None when nothing usable is found. What each task returns is
in instructions.py's table.
"""

from __future__ import annotations

import re

import numpy as np

from unifer_jax.data import labels

# The instruction tasks. Append-only: batches carry `task` as an index into this tuple.
TASKS = ('describe', 'basic', 'compound', 'intensity', 'valence_arousal', 'rationale',
         'uncertainty', 'open_vocab', 'age_group', 'gender')

# Surface forms per BASIC label: [0] noun (canonical), [1] adjective (FERPlus / SFEW
# style), then synonyms. Used for open-vocabulary prompts and answer parsing.
SYNONYMS = {
    'neutral': ('neutral', 'neutral', 'calm', 'expressionless', 'blank'),
    'happiness': ('happiness', 'happy', 'joyful', 'joy', 'pleased'),
    'sadness': ('sadness', 'sad', 'sorrowful', 'unhappy', 'sorrow'),
    'surprise': ('surprise', 'surprised', 'astonished', 'amazed', 'astonishment'),
    'fear': ('fear', 'fearful', 'afraid', 'scared', 'frightened'),
    'disgust': ('disgust', 'disgusted', 'revulsion', 'repulsed'),
    'anger': ('anger', 'angry', 'furious', 'mad'),
    'contempt': ('contempt', 'contemptuous', 'scornful', 'disdainful', 'disdain'),
}

# Intensity words by fifths of [0, 1] (FACS A..E: trace, slight, marked, severe,
# maximum); exactly 0 (a neutral face) is 'none'.
INTENSITY_WORDS = ('trace', 'slight', 'marked', 'severe', 'maximum')


def intensity_word(value: float) -> str:
  if value <= 0:
    return 'none'
  return INTENSITY_WORDS[min(4, int(value * 5))]


def _compound_forms(name: str) -> tuple[str, ...]:
  a, b = (SYNONYMS[c][1] for c in labels.COMPOUND_COMPONENTS[name])
  return (name, f'{a} and {b}', f'both {a} and {b}', f'{b} and {a}', name.replace(' ', '-'))


def surface_forms(name: str) -> tuple[str, ...]:
  """Every way a BASIC or COMPOUND label may be written (canonical first)."""
  if name in SYNONYMS:
    return tuple(dict.fromkeys(SYNONYMS[name]))
  if name in labels.COMPOUND_COMPONENTS:
    return _compound_forms(name)
  raise ValueError(f'unknown label {name!r}; expected a BASIC or COMPOUND name')


def written_form(name: str, style: int, rng: np.random.Generator) -> str:
  """`name` written in a vocabulary style: 0 canonical, 1 adjective ('happy';
  'happy and surprised'), 2 a synonym ('joyful'; 'both happy and surprised')."""
  if name in SYNONYMS:
    forms = SYNONYMS[name]
    return forms[style] if style < 2 else str(rng.choice(forms[2:]))
  return _compound_forms(name)[min(style, 2)]


# ---- parsing -----------------------------------------------------------------------

_ANSWER = re.compile(r'<answer>(.*?)(?:</answer>|$)', re.IGNORECASE | re.DOTALL)
_THINK = re.compile(r'<think>.*?(?:</think>|$)', re.IGNORECASE | re.DOTALL)
_NUMBER = re.compile(r'[-+]?(?:\d+\.\d*|\.\d+|\d+)')
# 'valence: -0.4', 'valence is 0.4' -- but not across a comma into the next value.
_LABELLED = r'{}[^\d+\-.,;]{{0,20}}?([-+]?(?:\d+\.\d*|\.\d+|\d+))'


def answer_span(text: str) -> str:
  """The last <answer>...</answer> span (an unclosed one runs to the end), else the text
  with any <think> part removed; stripped."""
  spans = _ANSWER.findall(text)
  if spans:
    return spans[-1].strip()
  return _THINK.sub(' ', text).strip()


_TAGS = ('<think>', '</think>', '<answer>', '</answer>')
_THINK_FORMAT = re.compile(r'\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*', re.DOTALL)
_ANSWER_FORMAT = re.compile(r'\s*<answer>(.*?)</answer>\s*', re.DOTALL)


def is_well_formed(text: str, think: bool) -> bool:
  """Exactly ``<think>...</think><answer>...</answer>`` (``think``) or
  ``<answer>...</answer>``: one of each tag, nothing outside them but whitespace, no
  empty part -- the format a UniFER-CoT prompt asks for."""
  counts = [text.count(t) for t in _TAGS]
  if think:
    m = _THINK_FORMAT.fullmatch(text)
    return m is not None and counts == [1, 1, 1, 1] and all(g.strip() for g in m.groups())
  m = _ANSWER_FORMAT.fullmatch(text)
  return m is not None and counts == [0, 0, 1, 1] and bool(m.group(1).strip())


def _norm(s: str) -> str:
  return re.sub(r'[\s_\-]+', ' ', re.sub(r'[^\w\s\-+.]', ' ', s.lower())).strip()


def _match_label(span: str, forms: dict) -> str | None:
  """forms: surface form -> label. Exact match, else the earliest whole-word match
  (the longer form at a tie, so 'sadly surprised' beats 'sad')."""
  s = _norm(span)
  if s in forms:
    return forms[s]
  best = None
  for form, name in forms.items():
    m = re.search(r'(?<!\w)' + re.escape(form) + r'(?!\w)', s)
    if m and (best is None or (m.start(), -len(form)) < best[0]):
      best = ((m.start(), -len(form)), name)
  return best[1] if best else None


def _forms(names) -> dict:
  out = {}
  for n in names:
    for f in surface_forms(n):
      out.setdefault(_norm(f), n)
  return out


def _parse_float(span: str) -> float | None:
  m = _NUMBER.search(span)
  return float(m.group()) if m else None


def parse_answer(task: str, text: str, candidates=None):
  """The value a response gives for `task` (see the module table), or None.

  `candidates` (open_vocab): the label strings the prompt offered; the answer is matched
  against them and their synonyms only.
  """
  span = answer_span(text)
  if task == 'describe':
    return span or None
  if task in ('basic', 'compound'):
    vocab = labels.BASIC if task == 'basic' else labels.COMPOUND
    name = _match_label(span, _forms(vocab))
    return None if name is None else vocab.index(name)
  if task == 'open_vocab':
    known = _forms(labels.BASIC + labels.COMPOUND)
    if candidates is None:
      return _match_label(span, known)
    # Each offered string, then the synonyms of the label it names; an unknown
    # candidate (e.g. 'other') stands for itself.
    allowed = {_norm(c): _match_label(c, known) or _norm(c) for c in candidates}
    for name in set(allowed.values()):
      if name in SYNONYMS or name in labels.COMPOUND_COMPONENTS:
        for form in _forms([name]):
          allowed.setdefault(form, name)
    return _match_label(span, allowed)
  if task == 'intensity':
    v = _parse_float(span)
    if v is not None and re.search(r'\d\s*%', span):
      v /= 100
    if v is None:
      words = {w: (i + 0.5) / 5 for i, w in enumerate(INTENSITY_WORDS)} | {'none': 0.0}
      hit = _match_label(span, {w: w for w in words})
      return None if hit is None else words[hit]
    return min(1.0, max(0.0, v))
  if task == 'valence_arousal':
    low = span.lower()
    v = re.search(_LABELLED.format('valence'), low)
    a = re.search(_LABELLED.format('arousal'), low)
    if v and a:
      return float(v.group(1)), float(a.group(1))
    nums = _NUMBER.findall(low)
    return (float(nums[0]), float(nums[1])) if len(nums) >= 2 else None
  if task == 'rationale':
    aus = {int(n) for n in re.findall(r'\bAU\s*(\d+)', span, re.IGNORECASE)}
    by_name = {name: au for au, name in labels.AUS.items()}
    low = _norm(span)
    aus |= {au for name, au in by_name.items() if re.search(r'\b' + name + r'\b', low)}
    aus &= set(labels.AUS)
    if aus:
      return tuple(sorted(aus))
    return () if re.search(r'\bno (action units|muscle)', low) else None
  if task == 'uncertainty':
    forms = _forms(labels.BASIC)
    out = []
    for piece in re.split(r'[,;]|\band\b', span):
      name = _match_label(piece, forms)
      p = _parse_float(piece)
      if name is not None and p is not None:
        out.append((labels.BASIC.index(name), p))
    return tuple(out[:2]) or None
  if task == 'age_group':
    for i, g in enumerate(labels.AGE_GROUPS):
      if re.search(r'(?<![\d-])' + re.escape(g) + r'(?![\d-])', span):
        return i
    v = _parse_float(span)
    if v is None or v < 0:
      return None
    bounds = (4, 20, 40, 70)   # lower edges of groups 1..4
    return int(sum(v >= b for b in bounds))
  if task == 'gender':
    forms = {'male': 'male', 'man': 'male', 'female': 'female', 'woman': 'female',
             'unsure': 'unsure', 'unclear': 'unsure', 'unknown': 'unsure'}
    name = _match_label(span, forms)
    return None if name is None else labels.GENDERS.index(name)
  raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')

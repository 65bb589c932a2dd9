"""FACS recipes for the synthetic corpus: which AUs each expression activates, how
strongly, and the labels, valence/arousal, captions and rationales that follow.

Source: the project's FACS.md tables (Ekman & Friesen's FACS combinations for the basic
expressions; Du, Tao & Martinez 2014, PNAS 111(15) E1454, Table 1 for the compounds).
Choices and deviations:
* Basic: the required AUs are always active, each optional "(+ n)" AU with p = 0.5;
  anger takes AU23 or AU24 with equal odds; contempt's 12 + 14 are unilateral, on a
  random side. Neutral activates nothing.
* Compound: the prototypical AUs AND the "add to tell it apart" AUs are all required,
  so categories sharing prototypical AUs differ by construction (every pair of
  compound recipes differs in >= 2 AUs; see the tests).
* Amplitudes: one level g ~ U(0.35, 1) per face, each active AU at g * U(0.75, 1.15)
  (optional AUs at g * U(0.5, 1)), clipped to [0.15, 1]. FACS scores A (trace) .. E
  (maximum); `intensity_letter` maps amplitude fifths to A..E. Intensity = mean
  amplitude of the active AUs (FACS.md), 0 for neutral.
* Labels: a basic face has expression = its BASIC index, compound = -1 and a one-hot
  label_dist. A compound face has compound = its COMPOUND index and expression = -1
  (no principled single basic label), and label_dist = 0.5 / 0.5 over its two named
  components (e.g. happily surprised -> happiness, surprise), the soft label a
  FERPlus-style vote would approach.
* Valence/arousal: see CIRCUMPLEX -- a modelling choice, not measurements.
* Captions: the visible AUs with a degree word from the amplitude, half the time naming
  the expression; synthetic_faces adds the face's look (look_words.py) as a second part.
"""

import dataclasses
import re

import numpy as np

from unifer_jax.data import labels


@dataclasses.dataclass(frozen=True)
class Recipe:
  required: tuple = ()
  optional: tuple = ()
  one_of: tuple = ()          # exactly one of these AUs (anger: 23 or 24)
  unilateral: tuple = ()      # AUs drawn on one side only (contempt)


# FACS.md, "Basic expressions".
BASIC_RECIPES = {
    'neutral': Recipe(),
    'happiness': Recipe(required=(6, 12), optional=(25,)),
    'sadness': Recipe(required=(1, 4, 15), optional=(17,)),
    'surprise': Recipe(required=(1, 2, 5, 26), optional=(25,)),
    'fear': Recipe(required=(1, 2, 4, 5, 20, 25), optional=(26,)),
    'disgust': Recipe(required=(9, 10, 17), optional=(4,)),
    'anger': Recipe(required=(4, 5, 7), one_of=(23, 24)),
    'contempt': Recipe(required=(12, 14), unilateral=(12, 14)),
}

# FACS.md, "Compound expressions": (prototypical AUs, AUs added to tell it apart).
COMPOUND_AUS = {
    'happily surprised': ((1, 2, 12, 25), (5, 26)),
    'happily disgusted': ((10, 12, 25), (6, 9)),
    'sadly fearful': ((1, 4, 20, 25), (15, 6)),
    'sadly angry': ((4, 15), (7, 17)),
    'sadly surprised': ((1, 4, 25, 26), (2,)),
    'sadly disgusted': ((4, 10), (15, 9)),
    'fearfully angry': ((4, 20, 25), (7, 10)),
    'fearfully surprised': ((1, 2, 5, 20, 25), (26,)),
    'angrily surprised': ((4, 25, 26), (5, 7)),
    'angrily disgusted': ((4, 10, 17), (7, 9)),
    'disgustedly surprised': ((1, 2, 5, 10), (9, 25)),
}
COMPOUND_RECIPES = {name: Recipe(required=tuple(sorted(p + d)))
                    for name, (p, d) in COMPOUND_AUS.items()}

# Russell's circumplex placement (valence, arousal) from FACS.md. A MODELLING CHOICE,
# not measurements: a face's V/A = its category's point (the mean of the two components
# for a compound) times its intensity, plus N(0, VA_NOISE), clipped to [-1, 1].
CIRCUMPLEX = {
    'neutral': (0.0, 0.0), 'happiness': (0.8, 0.5), 'sadness': (-0.7, -0.4),
    'surprise': (0.2, 0.8), 'fear': (-0.6, 0.8), 'disgust': (-0.7, 0.3),
    'anger': (-0.6, 0.7), 'contempt': (-0.5, 0.2),
}
VA_NOISE = 0.05

ADJECTIVE = {'neutral': 'neutral', 'happiness': 'happy', 'sadness': 'sad',
             'surprise': 'surprised', 'fear': 'fearful', 'disgust': 'disgusted',
             'anger': 'angry', 'contempt': 'contemptuous'}


@dataclasses.dataclass(frozen=True)
class Expression:
  """One sampled facial expression: its labels and AU amplitudes."""
  basic: int                  # index into labels.BASIC, -1 for a compound
  compound: int               # index into labels.COMPOUND, -1 for a basic
  aus: dict                   # {au: amplitude in (0, 1]} of the active AUs
  unilateral: dict            # {au: side} (+1 image right = subject's left, -1 other)

  @property
  def name(self) -> str:
    return labels.BASIC[self.basic] if self.basic >= 0 else labels.COMPOUND[self.compound]

  @property
  def components(self) -> tuple:
    return (self.name,) if self.basic >= 0 else labels.COMPOUND_COMPONENTS[self.name]

  @property
  def intensity(self) -> float:
    return float(np.mean(list(self.aus.values()))) if self.aus else 0.0

  def au_vector(self) -> np.ndarray:
    v = np.zeros(len(labels.AUS), np.float32)
    for au, amp in self.aus.items():
      v[labels.AU_INDEX[au]] = amp
    return v

  def label_dist(self) -> np.ndarray:
    d = np.zeros(len(labels.BASIC), np.float32)
    for c in self.components:
      d[labels.BASIC.index(c)] += 1 / len(self.components)
    return d


def sample_expression(rng: np.random.Generator, compound_fraction: float = 0.3,
                      category: str | None = None) -> Expression:
  """Basic (uniform over the 8, incl. neutral) or, with compound_fraction, compound.

  `category` (a BASIC or COMPOUND name) fixes the category instead of drawing it.
  """
  if category is None:
    if rng.random() < compound_fraction:
      category = labels.COMPOUND[rng.integers(len(labels.COMPOUND))]
    else:
      category = labels.BASIC[rng.integers(len(labels.BASIC))]
  if category in COMPOUND_RECIPES:
    basic, compound = -1, labels.COMPOUND.index(category)
    recipe = COMPOUND_RECIPES[category]
  else:
    basic, compound = labels.index(labels.BASIC, category), -1
    recipe = BASIC_RECIPES[category]
  g = rng.uniform(0.35, 1.0)
  amp = lambda lo, hi: round(min(1.0, max(0.15, g * rng.uniform(lo, hi))), 3)
  aus = {au: amp(0.75, 1.15) for au in recipe.required}
  for au in recipe.optional:
    if rng.random() < 0.5:
      aus[au] = amp(0.5, 1.0)
  if recipe.one_of:
    aus[int(rng.choice(recipe.one_of))] = amp(0.75, 1.15)
  side = int(rng.choice([-1, 1]))
  return Expression(basic, compound, dict(sorted(aus.items())),
                    {au: side for au in recipe.unilateral})


def valence_arousal(expr: Expression, rng: np.random.Generator) -> tuple:
  base = np.mean([CIRCUMPLEX[c] for c in expr.components], axis=0)
  va = base * expr.intensity + rng.normal(0, VA_NOISE, 2)
  return tuple(float(x) for x in np.clip(va, -1, 1))


def intensity_letter(amplitude: float) -> str:
  return 'ABCDE'[min(4, int(amplitude * 5))]


# ---- captions and rationales ---------------------------------------------------------

# Synonymous phrases per AU; {deg} takes a degree adverb chosen from the amplitude.
_PHRASES = {
    1: ('{deg}raised inner brows', 'inner brow ends {deg}lifted', 'brows {deg}slanted up in the middle'),
    2: ('{deg}raised outer brows', 'outer brow ends {deg}lifted', '{deg}arched brows'),
    4: ('{deg}lowered, knitted brows', 'brows {deg}drawn together and down', 'a {deg}furrowed brow'),
    5: ('{deg}wide-open eyes', 'upper lids {deg}raised, showing white above the irises', 'eyes {deg}opened wide'),
    6: ('{deg}raised cheeks', 'cheeks {deg}pushed up with crow\'s feet', '{deg}crinkled eye corners'),
    7: ('{deg}tightened lids', '{deg}narrowed eyes', 'lower lids {deg}tensed'),
    9: ('a {deg}wrinkled nose', 'the nose {deg}wrinkled at the bridge', 'a {deg}scrunched nose'),
    10: ('a {deg}raised upper lip', 'the upper lip {deg}lifted', 'the upper lip {deg}curled up'),
    12: ('lip corners {deg}pulled up', 'mouth corners {deg}drawn up and back', 'a {deg}smiling mouth'),
    14: ('{deg}dimpled mouth corners', 'lip corners {deg}tightened into dimples'),
    15: ('lip corners {deg}pulled down', '{deg}down-turned mouth corners', 'a {deg}downturned mouth'),
    17: ('a {deg}raised chin', 'the chin boss {deg}pushed up', 'the lower lip {deg}pushed up'),
    20: ('lips {deg}stretched sideways', 'a {deg}horizontally stretched mouth', 'lips {deg}pulled wide'),
    23: ('{deg}tightened lips', '{deg}narrowed, thin lips'),
    24: ('lips {deg}pressed together', '{deg}pressed lips'),
    25: ('{deg}parted lips', 'lips {deg}apart'),
    26: ('a {deg}dropped jaw', 'the jaw {deg}hanging open', 'the mouth {deg}dropped open'),
}
_UNILATERAL = {12: ('one lip corner {deg}pulled up', 'a {deg}lopsided half-smile'),
               14: ('a {deg}dimpled cheek on one side', 'one mouth corner {deg}tightened')}
# AU pairs that read better as one phrase (checked before the single-AU phrases).
_COMBOS = {
    (1, 2): ('{deg}raised brows', 'brows {deg}lifted high', '{deg}raised, arched brows'),
    (5, 7): ('{deg}glaring eyes', 'eyes {deg}wide yet tense'),
    (25, 26): ('the mouth {deg}dropped open', 'a {deg}gaping mouth', 'the jaw {deg}dropped, lips apart'),
}
_DEGREE = (('slightly ', 'faintly ', 'mildly '), ('', 'clearly '), ('strongly ', 'markedly '))
_NEUTRAL = ('relaxed brows, eyes and mouth', 'no visible muscle action',
            'a calm, expressionless look', 'a resting face')
_OCCLUSION = {'mask': ('wearing a face mask', 'with a mask over the nose and mouth'),
              'hand': ('with a hand over the mouth', 'covering the mouth with a hand')}
_TEMPLATES_PLAIN = ('a face with {aus}', 'a close-up of a face: {aus}', 'this person shows {aus}',
                    'a portrait with {aus}', '{aus}')
_TEMPLATES_NAMED = ('a {adj} face with {aus}', 'a {adj} expression: {aus}',
                    'this person looks {adj}, with {aus}', '{aus}; the expression reads as {adj}')


def _degree(rng, amp):
  tier = 0 if amp < 0.4 else (1 if amp < 0.8 else 2)
  return _pick(rng, _DEGREE[tier])


def _pick(rng, options):
  return options[rng.integers(len(options))]  # rng.choice converts to an array: 10x slower


def _join(parts):
  return parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]


def caption(expr: Expression, rng: np.random.Generator, hidden=(), occluder='none',
            glasses=False, look: dict | None = None) -> str:
  """A varied description of the visible AUs, sometimes naming the expression.

  `look`: phrases for the rest of the face ({attribute: phrase}, look_words.phrases),
  appended as a second sentence in a random order -- what tells this face from others
  with the same expression. Without it, the occluder and glasses are named alone.
  """
  visible = [au for au in expr.aus if au not in hidden]
  parts = []
  for pair, phrases in _COMBOS.items():
    if all(au in visible for au in pair):
      visible = [au for au in visible if au not in pair]
      amp = np.mean([expr.aus[au] for au in pair])
      parts.append(_pick(rng, phrases).format(deg=_degree(rng, amp)))
  for au in visible:
    table = _UNILATERAL if au in expr.unilateral else _PHRASES
    parts.append(_pick(rng, table[au]).format(deg=_degree(rng, expr.aus[au])))
  if not parts:
    parts = [_pick(rng, _NEUTRAL) if not expr.aus else 'relaxed visible features']
  adj = ADJECTIVE.get(expr.name, expr.name)
  named = rng.random() < 0.5
  template = _pick(rng, _TEMPLATES_NAMED if named else _TEMPLATES_PLAIN)
  text = template.format(aus=_join(parts), adj=adj)
  if look is None:
    extras = [_pick(rng, _OCCLUSION[occluder])] if occluder in _OCCLUSION else []
    if glasses:
      extras.append(_pick(rng, ('wearing glasses', 'with glasses')))
    if extras:
      text += ', ' + ', '.join(extras)
  else:
    words = list(look.values())
    words = [words[i] for i in rng.permutation(len(words))]
    text += _pick(rng, ('. ', '; ', '. ')) + ', '.join(words)
  text = re.sub(r'\ba ([aeiou])', r'an \1', text)
  text = re.sub(r'\. ([a-z])', lambda m: '. ' + m.group(1).upper(), text)
  return text[0].upper() + text[1:] + '.'


def rationale(expr: Expression, hidden=(), occluder='none') -> str:
  """The visible AUs with FACS names and intensity letters, e.g. 'AU6 cheek raiser (C), ...'."""
  items = []
  for au, amp in expr.aus.items():
    if au in hidden:
      continue
    side = 'unilateral, ' if au in expr.unilateral else ''
    items.append(f'AU{au} {labels.AUS[au]} ({side}{intensity_letter(amp)})')
  text = ', '.join(items) if items else ('no action units active' if not expr.aus
                                         else 'no action units visible')
  if occluder != 'none' and any(au in hidden for au in expr.aus):
    text += f'; the lower face is hidden by a {occluder}'
  return text

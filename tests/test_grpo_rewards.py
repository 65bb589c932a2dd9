"""GRPO's verifiable rewards (train/rewards.py) on realistic completions: two labels
named, none, synonyms, broken tags; and the instruct pipeline's own targets score full
marks on every reward that applies to them (so the truth a reward reads is the truth the
model was trained on)."""

import numpy as np
import pytest

from data_prep import synthetic_faces
from unifer_jax.data import instructions, labels
from unifer_jax.train import rewards

COT = '<think>AU6 cheek raiser (C), AU12 lip corner puller (D)</think>'


def basic(truth: str, think=True) -> rewards.Prompt:
  return rewards.Prompt(task='basic', think=think, candidates=labels.BASIC, answer=truth,
                        aus=(6, 12) if think else None)


def compound(truth: str) -> rewards.Prompt:
  return rewards.Prompt(task='compound', think=True, candidates=labels.COMPOUND, answer=truth,
                        aus=(1, 4, 15))


@pytest.mark.parametrize('completion,truth,want', [
    (COT + '<answer>happiness</answer>', 'happiness', 1.0),
    # Two labels named: FERBench takes the first CANDIDATE (file order) inside <answer>,
    # not the first word -- 'happiness' precedes 'surprise' in BASIC.
    (COT + '<answer>happiness or surprise</answer>', 'happiness', 1.0),
    (COT + '<answer>surprise, maybe happiness</answer>', 'surprise', 0.0),
    # None named: 'unknown', wrong.
    (COT + '<answer>hard to say</answer>', 'happiness', 0.0),
    # Synonyms: the RAF-DB table maps 'joy' / 'happy' to happiness, 'angry' to anger ...
    (COT + '<answer>joy</answer>', 'happiness', 1.0),
    ('<answer>he looks angry</answer>', 'anger', 1.0),
    # ... checked in table order over the whole response: the think part's words count.
    ('<think>no sign of joy</think><answer>angry</answer>', 'anger', 1.0),
    # Broken tags: no <answer> span, so the whole response is searched.
    (COT + '<answer>sadness', 'sadness', 1.0),
    ('<think>sadness</answer> neutral', 'neutral', 1.0),    # 'neutral' is the first candidate
    ('', 'neutral', 0.0),
])
def test_answer_reward_is_ferbench_extraction(completion, truth, want):
  assert rewards.answer_reward(completion, basic(truth)) == want


def test_compound_answers_need_the_compound_name():
  truth = 'happily surprised'
  assert rewards.answer_reward('<answer>happily surprised</answer>', compound(truth)) == 1.0
  # The protocol knows basic synonyms only: 'happy and surprised' extracts 'happiness',
  # which is no compound candidate -- wrong, as the FERBench scripts would score it.
  assert rewards.answer_reward('<answer>happy and surprised</answer>', compound(truth)) == 0.0
  assert rewards.answer_reward('<answer>sadly surprised</answer>', compound(truth)) == 0.0


def test_open_vocabulary_scores_against_the_offered_candidates():
  p = rewards.Prompt(task='open_vocab', think=False, candidates=('sad', 'happy', 'furious'),
                     answer='happy')
  assert rewards.answer_reward('<answer>happy</answer>', p) == 1.0
  assert rewards.answer_reward('<answer>joyful</answer>', p) == 0.0   # not offered
  assert rewards.answer_reward('<answer>sad</answer>', p) == 0.0


@pytest.mark.parametrize('completion,think,want', [
    (COT + '<answer>happiness</answer>', True, 1.0),
    ('  <think>AU6</think>\n<answer>happiness</answer>\n', True, 1.0),
    ('<answer>happiness</answer>', True, 0.0),                     # asked to reason first
    (COT + '<answer>happiness</answer><answer>fear</answer>', True, 0.0),
    (COT + '<answer>happiness</answer> because of the smile', True, 0.0),
    (COT + '<answer> </answer>', True, 0.0),
    (COT + '<answer>happiness', True, 0.0),                        # unclosed
    ('<think></think><answer>happiness</answer>', True, 0.0),      # empty reasoning
    ('<answer>happiness</answer>', False, 1.0),
    (COT + '<answer>happiness</answer>', False, 0.0),              # asked for the answer only
    ('happiness', False, 0.0),
])
def test_format_reward(completion, think, want):
  assert rewards.format_reward(completion, basic('happiness', think)) == want


def test_au_f1_reads_the_answer_of_a_rationale_and_the_think_part_of_a_label():
  rationale = rewards.Prompt(task='rationale', think=False, aus=(6, 12))
  full = '<answer>AU6 cheek raiser (C), AU12 lip corner puller (D)</answer>'
  assert rewards.au_f1_reward(full, rationale) == 1.0
  assert rewards.au_f1_reward('<answer>AU6 cheek raiser (C)</answer>', rationale) == \
      pytest.approx(2 / 3)
  # FACS names count as their AU; a wrong extra one costs precision.
  assert rewards.au_f1_reward('<answer>cheek raiser, lip corner puller, jaw drop</answer>',
                              rationale) == pytest.approx(0.8)
  assert rewards.au_f1_reward('<answer>nothing</answer>', rationale) == 0.0
  neutral = rewards.Prompt(task='rationale', think=False, aus=())
  assert rewards.au_f1_reward('<answer>no action units active</answer>', neutral) == 1.0
  # A CoT label prompt: its <think> part is the rationale.
  assert rewards.au_f1_reward(COT + '<answer>fear</answer>', basic('happiness')) == 1.0
  assert rewards.au_f1_reward('<think>AU1</think><answer>fear</answer>',
                              basic('happiness')) == 0.0
  assert rewards.au_f1_reward('<answer>fear</answer>', basic('fear', think=False)) is None


def test_closeness_rewards():
  p = rewards.Prompt(task='intensity', think=True, intensity=0.5)
  assert rewards.intensity_reward('<answer>0.62 (marked)</answer>', p) == pytest.approx(0.88)
  assert rewards.intensity_reward('<answer>marked</answer>', p) == pytest.approx(1.0)
  assert rewards.intensity_reward('<answer>very</answer>', p) == 0.0
  va = rewards.Prompt(task='valence_arousal', think=False, valence=0.5, arousal=0.0)
  assert rewards.va_reward('<answer>valence 0.41, arousal -0.12</answer>', va) == \
      pytest.approx(1 - 0.21 / 4)
  assert rewards.va_reward('<answer>pleasant</answer>', va) == 0.0
  assert rewards.intensity_reward('<answer>0.5</answer>', va) is None   # not its task


def test_weights_and_errors():
  totals, values = rewards.score([COT + '<answer>happiness</answer>', '<answer>fear</answer>'],
                                 [basic('happiness')] * 2, {'answer': 1.0, 'format': 0.5})
  assert totals == [1.5, 0.0] and values['answer'] == [1.0, 0.0]
  with pytest.raises(ValueError, match='unknown'):
    rewards.check_weights({'answr': 1.0})


def test_the_training_targets_earn_every_reward():
  """Prompts and targets exactly as the instruct pipeline writes them (every label task,
  CoT and answer-only, open vocabulary in every vocabulary style): the target scores 1
  on answer, format and AU F1, and ~1 on intensity / valence-arousal (2 decimals)."""
  rng = np.random.default_rng(0)
  seen = set()
  for i in range(60):
    record = synthetic_faces.make_record(i, seed=0, split='train', image_size=32)
    for task in instructions.available_tasks(record):
      if task not in ('basic', 'compound', 'open_vocab', 'intensity', 'valence_arousal',
                      'rationale'):
        continue
      prompt, target = instructions.make_example(record, task, rng)
      p = rewards.prompt_from_texts(task, f'<s>{prompt}\n', target, record)
      seen.add((task, p.think))
      for name, fn in rewards.REWARDS.items():
        value = fn(target, p)
        if name in ('intensity', 'va'):
          assert value is None or value > 0.99, (task, name, target)
        else:
          assert value in (None, 1.0), (task, name, prompt, target, p)
  assert {('basic', True), ('basic', False), ('compound', True), ('open_vocab', True),
          ('open_vocab', False), ('rationale', False), ('intensity', True)} <= seen

"""Instruction templates: which tasks a record supports, the prompts and UniFER-CoT
targets they make, and parse_answer on model-like responses (round trips on the
synthetic corpus and hand-written realistic strings)."""

import math
import re

import numpy as np
import pytest

from data_prep import synthetic_faces as sf
from unifer_jax.data import instructions as ins
from unifer_jax.data import labels, schema


@pytest.fixture(scope='module')
def records():
  # Rendering is the slow part; 32 px faces are enough for text fields.
  return [sf.make_record(i, seed=3, split='train', image_size=32) for i in range(160)]


def _value(record, task):
  """What parse_answer should return for the record's true answer."""
  if task == 'basic':
    return int(record['expression'])
  if task == 'compound':
    return int(record['compound'])
  if task == 'intensity':
    return round(float(record['intensity']), 2)
  if task == 'valence_arousal':
    return (round(float(record['valence']), 2), round(float(record['arousal']), 2))
  if task == 'rationale':
    shown = [au for au in labels.AUS if f'AU{au} ' in record['rationale']]
    return tuple(sorted(shown))
  if task == 'uncertainty':
    d = record['label_dist']
    top = sorted(range(len(d)), key=lambda i: (-d[i], i))[:2]
    return tuple((i, round(float(d[i]), 2)) for i in top if d[i] > 0)
  if task == 'describe':
    return record['caption']
  raise AssertionError(task)


def test_round_trip_every_task(records):
  seen = set()
  for i, rec in enumerate(records):
    rng = np.random.default_rng(i)
    for task in ins.available_tasks(rec):
      prompt, answer = ins.make_example(rec, task, rng)
      seen.add(task)
      assert prompt and answer.endswith('</answer>')
      if task == 'open_vocab':
        name = labels.BASIC[rec['expression']] if rec['expression'] >= 0 \
            else labels.COMPOUND[rec['compound']]
        assert ins.parse_answer(task, answer) == name
      else:
        got = ins.parse_answer(task, answer)
        want = _value(rec, task)
        if task in ('intensity',):
          assert got == pytest.approx(want, abs=1e-9)
        elif task == 'valence_arousal':
          assert got == pytest.approx(want, abs=1e-9)
        else:
          assert got == want, (task, answer)
  # The synthetic corpus has no age/gender; every other task must have been exercised.
  assert seen == set(ins.TASKS) - {'age_group', 'gender'}


def test_cot_targets_follow_the_rationale(records):
  rec = next(r for r in records if r['expression'] >= 0 and r['rationale'])
  _, answer = ins.make_example(rec, 'basic', np.random.default_rng(0))
  assert answer == f"<think>{rec['rationale']}</think><answer>{labels.BASIC[rec['expression']]}</answer>"
  # Without a rationale: an answer-only target, and a prompt asking for that format.
  bare = dict(rec, rationale='')
  prompt, answer = ins.make_example(bare, 'basic', np.random.default_rng(0))
  assert answer == f"<answer>{labels.BASIC[rec['expression']]}</answer>"
  assert '<think>' not in prompt and '<answer></answer>' in prompt
  # The rationale task itself never wraps the rationale in think.
  _, answer = ins.make_example(rec, 'rationale', np.random.default_rng(0))
  assert answer == f"<answer>{rec['rationale']}</answer>"


def test_tasks_follow_the_fields_a_record_has():
  base = dict(image=b'', id='x/1', source='fixture')
  rec = schema.empty_record(**base)
  assert ins.available_tasks(rec) == []
  with pytest.raises(ValueError, match="supports none of"):
    ins.sample_task(rec, ins.TASKS, [1.0] * len(ins.TASKS), np.random.default_rng(0))
  with pytest.raises(ValueError, match="no field for task 'basic'"):
    ins.make_example(rec, 'basic', np.random.default_rng(0))
  # A RAF-DB-like record: hard label + attributes, no soft label / V-A / caption.
  raf = schema.empty_record(**base, expression=6, age_group=2, gender=1, race=0)
  assert ins.available_tasks(raf) == ['basic', 'open_vocab', 'age_group', 'gender']
  assert ins.make_example(raf, 'age_group', np.random.default_rng(0))[1] == '<answer>20-39</answer>'
  assert ins.make_example(raf, 'gender', np.random.default_rng(0))[1] == '<answer>female</answer>'
  # A compound without label_dist still gets its two components as the soft label.
  comp = schema.empty_record(**base, compound=labels.COMPOUND.index('sadly angry'))
  assert ins.available_tasks(comp) == ['compound', 'uncertainty', 'open_vocab']
  _, ans = ins.make_example(comp, 'uncertainty', np.random.default_rng(0))
  assert ans == '<answer>sadness 0.50, anger 0.50</answer>'
  # FERPlus-like votes: the two largest entries, in order.
  fp = schema.empty_record(**base, label_dist=[0.1, 0.6, 0, 0.3, 0, 0, 0, 0])
  assert ins.make_example(fp, 'uncertainty', np.random.default_rng(0))[1] == \
      '<answer>happiness 0.60, surprise 0.30</answer>'
  # Task sampling only draws what the record supports, with the given weights.
  rng = np.random.default_rng(0)
  draws = [ins.sample_task(raf, ('basic', 'gender', 'intensity'), (3.0, 1.0, 100.0), rng)
           for _ in range(2000)]
  assert set(draws) == {'basic', 'gender'}
  assert abs(draws.count('basic') / 2000 - 0.75) < 3 * math.sqrt(0.75 * 0.25 / 2000)
  with pytest.raises(ValueError, match='unknown task'):
    ins.make_example(raf, 'pose', rng)


def _offered(prompt):
  """BASIC labels whose surface forms appear as whole words in the prompt, in order."""
  hits = []
  for name in labels.BASIC:
    for form in ins.surface_forms(name):
      m = re.search(r'(?<![\w-])' + re.escape(form) + r'(?![\w-])', prompt)
      if m:
        hits.append((m.start(), name))
  return [n for _, n in sorted(hits)]


def test_open_vocab_prompts_are_ferbench_style():
  rec = schema.empty_record(image=b'', id='x', source='t', expression=1)
  sizes, orders, words = set(), set(), set()
  for s in range(300):
    prompt, answer = ins.make_example(rec, 'open_vocab', np.random.default_rng(s))
    offered = _offered(prompt)
    assert len(offered) == len(set(offered))           # one surface form per label
    assert 'happiness' in offered
    true_word = ins.answer_span(answer)
    assert true_word in ins.SYNONYMS['happiness'] and true_word in prompt
    assert '<answer></answer>' in prompt
    sizes.add(len(offered))
    orders.add(tuple(offered))
    words.add(true_word)
    assert ins.parse_answer('open_vocab', answer) == 'happiness'
  assert min(sizes) == 3 and max(sizes) == 8
  assert len(orders) > 100              # random subsets in shuffled order
  assert {'happiness', 'happy'} <= words and words & {'joyful', 'joy', 'pleased'}
  # Compound records get compound candidates.
  comp = schema.empty_record(image=b'', id='y', source='t', compound=0)
  prompt, answer = ins.make_example(comp, 'open_vocab', np.random.default_rng(1))
  assert ins.parse_answer('open_vocab', answer) == 'happily surprised'


@pytest.mark.parametrize('task,text,want', [
    # basic: tags, case, synonyms, no tags, unclosed tag, last answer span wins.
    ('basic', '<think>Cheeks raised and lip corners pulled up (AU6+AU12).</think>'
              '<answer>Happiness</answer>', 1),
    ('basic', '<think>brows lowered</think>\n<answer> angry </answer>', 6),
    ('basic', 'The person looks sad: the inner brows are raised.', 2),
    ('basic', '<think>could be fear or surprise</think><answer>surprise', 3),
    ('basic', '<answer>fear</answer> wait, <answer>disgust</answer>', 5),
    ('basic', '<answer>unhappy</answer>', 2),       # 'unhappy' is not 'happy'
    ('basic', '<answer>I cannot tell</answer>', None),
    ('compound', '<answer>Happily surprised</answer>', 0),
    ('compound', '<answer>surprised and happy</answer>', 0),
    ('compound', 'It shows a sadly-angry face.', 3),
    ('compound', '<answer>angrily disgusted</answer>', 9),
    ('intensity', '<think>AU12 (D)</think><answer>0.71 (severe)</answer>', 0.71),
    ('intensity', '<answer>about 70%</answer>', 0.7),
    ('intensity', '<answer>slight</answer>', 0.3),
    ('intensity', '<answer>1.4</answer>', 1.0),
    ('intensity', '<answer>no idea</answer>', None),
    ('valence_arousal', '<answer>valence 0.41, arousal -0.12</answer>', (0.41, -0.12)),
    ('valence_arousal', 'Valence: -0.5; arousal is 0.3.', (-0.5, 0.3)),
    ('valence_arousal', '<answer>arousal 0.2, valence -0.6</answer>', (-0.6, 0.2)),
    ('valence_arousal', '<answer>(-0.25, 0.8)</answer>', (-0.25, 0.8)),
    ('valence_arousal', '<answer>positive</answer>', None),
    ('rationale', '<answer>AU6 cheek raiser (C), AU12 lip corner puller (D)</answer>', (6, 12)),
    ('rationale', 'I see AU 1, AU4 and the lips part.', (1, 4, 25)),
    ('rationale', '<answer>no action units active</answer>', ()),
    ('rationale', '<answer>AU99 and AU12</answer>', (12,)),
    ('rationale', '<answer>hard to say</answer>', None),
    ('uncertainty', '<answer>happiness 0.60, surprise 0.40</answer>', ((1, 0.6), (3, 0.4))),
    ('uncertainty', '<answer>sad 0.7 and angry 0.3</answer>', ((2, 0.7), (6, 0.3))),
    ('uncertainty', '<answer>neutral 1.00</answer>', ((0, 1.0),)),
    ('uncertainty', '<answer>happiness</answer>', None),
    ('age_group', '<answer>20-39</answer>', 2),
    ('age_group', '<answer>70+</answer>', 4),
    ('age_group', 'The person is around 45 years old.', 3),
    ('gender', '<answer>female</answer>', 1),
    ('gender', '<answer>Male</answer>', 0),
    ('gender', 'This looks like a woman.', 1),
    ('describe', '<answer>A happy face.</answer>', 'A happy face.'),
])
def test_parse_answer_realistic(task, text, want):
  got = ins.parse_answer(task, text)
  if isinstance(want, float):
    assert got == pytest.approx(want)
  elif task == 'valence_arousal' and want is not None:
    assert got == pytest.approx(want)
  else:
    assert got == want


def test_parse_open_vocab_with_candidates():
  cands = ['joyful', 'furious', 'sorrowful', 'astonished']
  assert ins.parse_answer('open_vocab', '<answer>joyful</answer>', cands) == 'happiness'
  # A synonym of an offered label still counts; a label that was not offered does not.
  assert ins.parse_answer('open_vocab', '<answer>happy</answer>', cands) == 'happiness'
  assert ins.parse_answer('open_vocab', '<answer>disgust</answer>', cands) is None
  # FERBench-like short labels and a whole response without tags.
  ferplus = ['angry', 'contempt', 'disgust', 'fear', 'happy', 'neutral', 'sad', 'surprise']
  text = '<think>The lip corner is raised on one side only.</think> It is contempt.'
  assert ins.parse_answer('open_vocab', text, ferplus) == 'contempt'
  # A candidate outside our vocabulary stands for itself.
  assert ins.parse_answer('open_vocab', '<answer>Other</answer>', ['other', 'happy']) == 'other'
  assert ins.parse_answer('open_vocab', 'no label here', ferplus) is None
  with pytest.raises(ValueError, match='unknown task'):
    ins.parse_answer('pose', 'x')


def test_template_texts_cover_every_phrasing():
  texts = ins.template_texts()
  joined = '\n'.join(texts)
  for task, phrasings in ins._PROMPTS.items():  # pylint: disable=protected-access
    for p in phrasings:
      assert p.split('{')[0] in joined, (task, p)
  for name in labels.BASIC + labels.COMPOUND:
    for form in ins.surface_forms(name):
      assert form in joined


def test_prompt_for_matches_training_prompts():
  rec = schema.empty_record(image=b'', id='x', source='t', expression=3, rationale='AU1 x (B)')
  examples = [ins.make_example(rec, 'basic', np.random.default_rng(s)) for s in range(400)]
  expected = {ins.prompt_for('basic', phrasing=p, think=t, hint=h)
              for t in (True, False) for p, h in ins.prompt_variants('basic', think=t)}
  assert len(expected) == len(ins.prompt_variants('basic', True)) + len(
      ins.prompt_variants('basic', False)) and ins.prompt_variants('basic')[0] == (0, 0)
  assert {prompt for prompt, _ in examples} == expected
  # Both target forms, the answer-only one at ANSWER_ONLY_FRACTION (within 3 sigma).
  answer_only = np.mean([not target.startswith('<think>') for _, target in examples])
  sigma = np.sqrt(ins.ANSWER_ONLY_FRACTION * (1 - ins.ANSWER_ONLY_FRACTION) / len(examples))
  assert abs(answer_only - ins.ANSWER_ONLY_FRACTION) < 3 * sigma, answer_only
  ferplus = ['angry', 'contempt', 'disgust', 'fear', 'happy', 'neutral', 'sad', 'surprise']
  p = ins.prompt_for('open_vocab', ferplus)
  assert 'angry, contempt, disgust, fear, happy, neutral, sad, surprise.' in p
  assert p.endswith('<answer></answer> tags.') and '<think></think>' in p
  with pytest.raises(ValueError, match='candidate labels'):
    ins.prompt_for('open_vocab')


def test_default_prompt_is_one_training_asks():
  """Evaluators call prompt_for(task) with defaults: that prompt must be among the ones
  make_example writes for the task (a CoT hint on a non-CoT task never was)."""
  rec = schema.empty_record(image=b'', id='x', source='t', expression=3, intensity=0.5,
                            valence=0.1, arousal=0.2, rationale='AU1 x (B)')
  for task in ('basic', 'intensity', 'valence_arousal', 'rationale'):
    trained = {ins.make_example(rec, task, np.random.default_rng(s))[0] for s in range(200)}
    assert ins.prompt_for(task) in trained, task
  assert '<think>' not in ins.prompt_for('valence_arousal')
  assert '<think>' in ins.prompt_for('basic')

"""Evaluator numbers against hand-computed cases: confusion matrix and both accuracies,
macro P/R/F1 (checked against scikit-learn, which the FERBench scripts use), ECE,
temperature scaling, CCC / RMSE; FERBench label extraction over a table of realistic
responses; the readers on the published item files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from unifer_jax.evaluators import ferbench, metrics

FERBENCH = Path('/work/shared/ferbench')
RAF = ['surprise', 'fear', 'disgust', 'happiness', 'sadness', 'anger', 'neutral']
FERPLUS = ['angry', 'contempt', 'disgust', 'fear', 'happy', 'neutral', 'sad', 'surprise']
SFEW = ['angry', 'disgust', 'fear', 'happy', 'neutral', 'sad', 'surprise']


def test_confusion_and_accuracies_by_hand():
  true = [0, 0, 0, 0, 1, 2]
  pred = [0, 0, 0, 0, 0, -1]          # -1: the answer named no candidate
  r = metrics.classification(true, pred, ['a', 'b', 'c'])
  assert r['confusion'] == [[4, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
  assert r['acc_weighted'] == pytest.approx(4 / 6)
  assert r['acc_mean_class'] == pytest.approx((1 + 0 + 0) / 3)
  assert r['unknown_rate'] == pytest.approx(1 / 6)
  assert r['per_class']['a'] == pytest.approx(
      {'precision': 0.8, 'recall': 1.0, 'f1': 2 * 0.8 / 1.8, 'support': 4})
  # Macro over a, b, c and 'unknown' (it was predicted): (0.8 + 0 + 0 + 0) / 4.
  assert r['macro_precision'] == pytest.approx(0.2)
  assert r['macro_recall'] == pytest.approx(0.25)
  assert r['macro_f1'] == pytest.approx(2 * 0.8 / 1.8 / 4)


@pytest.mark.filterwarnings('ignore:y_pred contains classes not in y_true')
def test_macro_scores_match_sklearn_on_random_labels():
  rng = np.random.default_rng(0)
  names = ['x', 'y', 'z', 'w']
  true = rng.integers(0, 3, 200)                 # 'w' never true
  pred = np.where(rng.random(200) < 0.1, -1, rng.integers(0, 4, 200))
  r = metrics.classification(true, pred, names)
  t = [names[i] for i in true]
  p = [names[i] if i >= 0 else 'unknown' for i in pred]
  prec, rec, f1, _ = skm.precision_recall_fscore_support(t, p, average='macro', zero_division=0)
  assert (r['macro_precision'], r['macro_recall'], r['macro_f1']) == pytest.approx((prec, rec, f1))
  assert r['acc_weighted'] == pytest.approx(skm.accuracy_score(t, p))
  assert r['acc_mean_class'] == pytest.approx(skm.balanced_accuracy_score(t, p))
  np.testing.assert_array_equal(np.asarray(r['confusion'])[:, :4],
                                skm.confusion_matrix(t, p, labels=names))


def test_ece_by_hand():
  probs = [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]]
  true = [0, 1, 0, 0]
  r = metrics.reliability(probs, true, bins=10)
  # bins (0.8, 0.9]: conf .9 acc 1; (0.7, 0.8]: conf .8 acc 0; (0.5, 0.6]: conf .575 acc 1.
  assert r['count'][8] == 1 and r['count'][7] == 1 and r['count'][5] == 2
  assert r['ece'] == pytest.approx(0.25 * 0.1 + 0.25 * 0.8 + 0.5 * 0.425)


def test_temperature_scaling_recovers_the_temperature_and_lowers_ece():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4000, 5)) * 3
  true = np.array([rng.choice(5, p=p) for p in metrics.softmax(logits, 2.0)])
  assert metrics.fit_temperature(logits[:2000], true[:2000]) == pytest.approx(2.0, rel=0.1)
  r = metrics.calibration(logits[2000:], true[2000:], logits[:2000], true[:2000])
  assert r['ece_scaled'] < r['ece'] / 2 and r['nll_scaled'] < r['nll']


def test_ccc_rmse_mae_by_hand():
  pred, true = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]
  # cov 4/3; variances 2/3 and 8/3; mean gap 2 -> 2 * 4/3 / (2/3 + 8/3 + 4) = 8/22.
  assert metrics.ccc(pred, true) == pytest.approx(8 / 22)
  assert metrics.ccc(true, true) == pytest.approx(1.0)
  assert metrics.rmse(pred, true) == pytest.approx(np.sqrt(14 / 3))
  assert metrics.mae(pred, true) == pytest.approx(2.0)


# (response, candidates, protocol, expected label)
EXTRACTION = [
    ('<think>Cheeks raised, lip corners pulled up.</think><answer>happiness</answer>', RAF, 'rafdb', 'happiness'),
    ('<think>...</think><ANSWER> Happiness </ANSWER>', RAF, 'rafdb', 'happiness'),
    # Two labels in the answer: the candidate order decides (surprise precedes fear).
    ('<answer>fear and surprise</answer>', RAF, 'rafdb', 'surprise'),
    # No tags, two labels named: again the candidate order, not the position in the text.
    ('I think this is anger, not disgust.', RAF, 'rafdb', 'disgust'),
    # Synonyms: the answer names no candidate, the table maps it.
    ('<answer>The person looks happy</answer>', RAF, 'rafdb', 'happiness'),
    ('<answer>sad</answer>', RAF, 'rafdb', 'sadness'),
    ('<answer>Angry</answer>', RAF, 'rafdb', 'anger'),
    ('The face is calm and relaxed.', RAF, 'rafdb', 'neutral'),
    ('He looks shocked.', RAF, 'rafdb', 'surprise'),
    # A synonym in the answer loses to a candidate named in the thinking (reference behaviour).
    ('<think>brows not raised, so not surprise</think><answer>sad</answer>', RAF, 'rafdb', 'surprise'),
    # An unclosed answer is no answer; the whole response is searched.
    ('<answer>happiness', RAF, 'rafdb', 'happiness'),
    # Substring fallback: 'fear' inside 'fearless'.
    ('She seems fearless.', RAF, 'rafdb', 'fear'),
    # None named.
    ('I cannot tell from this image.', RAF, 'rafdb', 'unknown'),
    ('<answer>pensive</answer>', RAF, 'rafdb', 'unknown'),
    # Short FERPlus labels: 'happy' is contained in 'happiness'.
    ('<answer>happiness</answer>', FERPLUS, 'ferplus', 'happy'),
    ('A scornful half-smile.', FERPLUS, 'ferplus', 'contempt'),
    ('He looks mad.', FERPLUS, 'ferplus', 'unknown'),      # FERPlus's table has no 'mad'
    ('He looks mad.', SFEW, 'sfew', 'angry'),
    # SFEW's answer regex is case-sensitive: the upper-case tags are not an answer there.
    ('<ANSWER>happy</ANSWER> rather than angry', FERPLUS, 'ferplus', 'happy'),
    ('<ANSWER>happy</ANSWER> rather than angry', SFEW, 'sfew', 'angry'),
]


@pytest.mark.parametrize('response,cands,protocol,want', EXTRACTION)
def test_ferbench_extraction(response, cands, protocol, want):
  assert ferbench.extract_label(response, cands, protocol) == want


@pytest.mark.skipif(not FERBENCH.is_dir(), reason='the published FERBench item files are not on this machine')
def test_readers_on_the_published_item_files(tmp_path):
  counts = {'rafdb_qa.json': 3068, 'ferplus_qa.json': 3573, 'affectnet_qa.json': 4000,
            'sfew_2.0_qa.json': 431}
  for name, n in counts.items():
    items = ferbench.read_items(FERBENCH / name, image_root=str(tmp_path))
    assert len(items) == n
    assert all(it.prompt == ferbench.PROMPT.format(labels=', '.join(it.candidates)) for it in items)
  assert ferbench.protocol_for('sfew_2.0_qa.json').name == 'sfew'
  # Images absent -> every item missing, and the message says where and what.
  items = ferbench.read_items(FERBENCH / 'rafdb_qa.json', image_root=str(tmp_path))
  present, missing = ferbench.split_present(items)
  assert not present and len(missing) == 3068
  msg = ferbench.missing_message('rafdb_qa.json', missing, len(items), str(tmp_path))
  assert '3068 of 3068 images missing' in msg and items[0].image in msg
  # Three images put where the root maps them -> exactly those three are evaluated.
  for it in items[:3]:
    os.makedirs(os.path.dirname(it.image), exist_ok=True)
    Path(it.image).write_bytes(b'')
  present, missing = ferbench.split_present(items)
  assert [p.image_path for p in present] == [it.image_path for it in items[:3]]
  # path_map rewrites a prefix instead of prepending a root.
  it = ferbench.read_items(FERBENCH / 'rafdb_qa.json',
                           path_map={'/RAF-DB/aligned': '/data/raf/Image/aligned'})[0]
  assert it.image == '/data/raf/Image/aligned/' + os.path.basename(it.image_path)


def test_reader_errors_name_the_file_and_item(tmp_path):
  bad = tmp_path / 'bad.json'
  bad.write_text(json.dumps([{'image_path': '/x.png', 'true_label': 'joy', 'prompt': 'p',
                              'candidate_labels': ['happiness']}]))
  with pytest.raises(ValueError, match=r'bad.json: item 0: true_label .joy. is not among'):
    ferbench.read_items(bad)
  bad.write_text(json.dumps([{'image_path': '/x.png'}]))
  with pytest.raises(ValueError, match=r"item 0 lacks \['true_label', 'prompt', 'candidate_labels'\]"):
    ferbench.read_items(bad)


def test_cot_rows_reader(tmp_path):
  rows = tmp_path / 'cot.jsonl'
  q = ferbench.PROMPT.format(labels=', '.join(RAF))
  rows.write_text('\n'.join(json.dumps(r) for r in [
      {'image_path': '/RAF-DB/a.jpg', 'question': q,
       'response': '<think>AU6 and AU12.</think><answer>happiness</answer>'},
      {'image_path': '/RAF-DB/b.jpg', 'question': q,
       'response': '<think>AU1, AU2, AU26.</think><answer>surprise</answer>'}]) + '\n')
  items = ferbench.read_cot_rows(rows, image_root='/data')
  assert [(i.true_label, i.image) for i in items] == [('happiness', '/data/RAF-DB/a.jpg'),
                                                       ('surprise', '/data/RAF-DB/b.jpg')]
  assert items[0].candidates == RAF
  rows.write_text('{"image_path": "/a.jpg", "question": "q"\n')
  with pytest.raises(ValueError, match=r'cot.jsonl:1: not JSON'):
    ferbench.read_cot_rows(rows)


@pytest.mark.skipif(not FERBENCH.is_dir(), reason='the published FERBench item files are not on this machine')
def test_ferbench_eval_config_points_at_the_four_subsets():
  from unifer_jax import config_lib
  c = config_lib.load('configs/evals/ferbench.py:/data/fer')
  assert sorted(c.evals) == ['ferbench_affectnet', 'ferbench_ferplus', 'ferbench_rafdb', 'ferbench_sfew']
  for name, ev in c.evals.items():
    assert ev.type == 'generative' and ev.prompt == 'ferbench' and ev.decoding.temperature == 0
    assert ev.dataset.image_root == '/data/fer' and os.path.isfile(ev.dataset['items'])
    assert ferbench.protocol_for(ev.dataset['items']).name == name.split('_')[1]


def test_unifer_eval_names_a_bad_evaluator_type(tmp_path, capsys):
  from unifer_jax import cli
  (tmp_path / 'config.json').write_text('{}')
  cfg = tmp_path / 'bad.py'
  cfg.write_text('import ml_collections\n\ndef get_config(arg=""):\n  return ml_collections.'
                 'ConfigDict(dict(evals=dict(mine=dict(type="zero_shoot"))))\n')
  assert cli.main(['eval', '--config', str(cfg), '--workdir', str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "config.evals.mine.type='zero_shoot'; expected one of [" in err and 'zero_shot' in err

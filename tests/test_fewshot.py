"""k-shot instruct rows (data/fewshot.py) over a small synthetic_faces corpus: the faces
in their slots and the placeholder runs in the text agree, the loss covers the answer
only, relabelled rows show the query's class among their examples under the same word,
plain rows are the one-image example with its face in slot 0, the global batch spec
matches, and the tiny model's instruct loss reads a real batch."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from data_prep import synthetic_faces as sf
from unifer_jax.data import augment, examples, fewshot, labels, pipeline, tfds_input
from unifer_jax.data import tokenizer as tok_lib
from unifer_jax.evaluators import fewshot as fs_eval, model_io, registry
from unifer_jax.models import interleave, presets
from unifer_jax.models import unifer as unifer_lib
from unifer_jax.train import losses

import model_util

SIZE, Q, SHOTS = 32, 4, 4
TOKEN = 1024          # the placeholder: one past the LLM vocabulary of the model below


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  sf.prepare(root / 'a', size=120, seed=3, image_size=64, workers=1, samples=False)
  tok = tok_lib.train_for_datasets(['synthetic_faces'], root / 'tok', data_dir=str(root / 'a'),
                                   vocab_size=1024)
  return dict(dir=str(root / 'a'), tok=tok_lib.load(tok))


def _cfg(corpus, **fewshot_kw):
  cfg = pipeline.default_input_config()
  cfg.data_dir, cfg.seq_len = corpus['dir'], 160
  cfg.augment.enabled = False           # the query's face can then be compared
  cfg.fewshot.update(max_shots=SHOTS, **fewshot_kw)
  cfg.image_queries, cfg.image_token = Q, TOKEN
  return cfg


def _pipe(corpus, batch=8, **fewshot_kw):
  tok = corpus['tok']
  return pipeline.Pipeline(_cfg(corpus, **fewshot_kw), 'instruct', batch_size=batch,
                           image_size=SIZE, tokenizers=(tok, tok))


def _lines(tok, toks, attn):
  """The decoded text between (and after) the placeholder runs of a row."""
  toks = toks[attn > 0]
  cuts = np.flatnonzero(np.diff(np.concatenate([[0], (toks == TOKEN).astype(int)])) == -1)
  return [tok.decode(part, skip_special_tokens=True)
          for part in np.split(toks, cuts) if len(part)]


def test_kshot_rows_hold_their_faces_and_ask_for_the_query(corpus):
  tok = corpus['tok']
  pl = _pipe(corpus, fraction=1.0, relabel_fraction=0.5)
  src = pl.dataset  # noqa: F841  (the graph exists)
  records = pipeline.sources.open_split('synthetic_faces', 'train', corpus['dir'])
  kinds = {'usual': 0, 'relabelled': 0, 'plain': 0, 'zero_shot': 0}
  for _ in range(4):
    b = next(pl)
    assert b['image'].shape == (8, SHOTS + 1, SIZE, SIZE, 3)
    interleave.check_slots(b['tokens'], b['image_mask'], TOKEN, Q)
    for r in range(8):
      used = int(b['image_mask'][r].sum())
      assert np.all(b['image'][r, used:] == 0)
      target = b['loss_mask'][r] > 0
      assert not np.any(b['tokens'][r][target] == TOKEN)
      answer = tok.decode(b['tokens'][r][target])
      face = augment.model_image(records[int(b['_index'][r])]['image'], SIZE)
      if fewshot.INTRO not in tok.decode(b['tokens'][r]):   # the plain instruct row
        kinds['plain'] += 1
        np.testing.assert_array_equal(b['image'][r, 0], face)
        continue
      np.testing.assert_array_equal(b['image'][r, used - 1], face)   # the query comes last
      lines = _lines(tok, b['tokens'][r], b['attention_mask'][r])
      assert fewshot.INTRO in lines[0]
      words = [line.split('Label:')[1].strip() for line in lines[1:-1]]
      assert len(words) == used - 1 and used - 1 in (0, 1, 2, 4)
      said = answer.replace('<answer>', '').replace('</answer>', '').strip()
      if said in labels.BASIC:
        kinds['usual'] += 1
        kinds['zero_shot'] += used == 1
        assert said == labels.BASIC[b['expression'][r]]
        assert set(words) <= set(labels.BASIC)
      else:
        kinds['relabelled'] += 1
        assert said in fewshot.RELABEL_WORDS and said in words
        assert set(words) <= set(fewshot.RELABEL_WORDS)
  assert min(kinds.values()) > 0, kinds


def test_plain_rows_are_the_one_image_example_behind_its_slots(corpus):
  tok = corpus['tok']
  cfg = _cfg(corpus)
  one = examples.ExampleMaker(fmt='instruct', image_size=SIZE, seq_len=cfg.seq_len - Q,
                              tokenizer=tok)
  few = fewshot.FewShotMaker(fmt='instruct', image_size=SIZE, seq_len=cfg.seq_len, tokenizer=tok,
                             max_shots=SHOTS, image_queries=Q, image_token=TOKEN)
  records = pipeline.sources.open_split('synthetic_faces', 'train', corpus['dir'])
  for i in range(6):
    a = one(0, i, records[i], np.random.default_rng(i))
    b = few._plain(0, i, records[i], np.random.default_rng(i))
    np.testing.assert_array_equal(b['tokens'][:Q], TOKEN)
    np.testing.assert_array_equal(b['tokens'][Q:], a['tokens'])
    np.testing.assert_array_equal(b['loss_mask'][Q:], a['loss_mask'])
    np.testing.assert_array_equal(b['image'][0], a['image'])
    np.testing.assert_array_equal(b['image_mask'], [1, 0, 0, 0, 0])


def test_spec_and_the_model_reads_a_batch(corpus):
  model_cfg = presets.get('tiny')
  model_cfg.llm.update(vocab_size=TOKEN, max_seq_len=256)
  config = pipeline.ml_collections.ConfigDict(dict(stage='instruct', input=_cfg(corpus)))
  config.input.batch_size = 4
  spec = tfds_input.global_batch_spec(config, model_cfg)
  b = next(_pipe(corpus, batch=4, fraction=1.0))
  assert {k for k in b if not k.startswith('_')} == set(spec)
  for k, s in spec.items():
    assert b[k].shape == s.shape and b[k].dtype == s.dtype, k
  model = model_util.random_module(lambda: unifer_lib.UniFER(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  batch = {k: b[k] for k in spec}
  loss, aux = jax.jit(lambda s, x: losses.generate_loss(nnx.merge(graphdef, s), x, None))(
      state, batch)
  assert np.isfinite(float(loss)) and float(aux['tokens']) == b['loss_mask'].sum()


def test_bad_settings_are_refused(corpus):
  tok = corpus['tok']
  with pytest.raises(ValueError, match=r'shots=\[1, 8\]: each k must be in 0..max_shots=4'):
    fewshot.FewShotMaker(fmt='instruct', image_size=SIZE, seq_len=64, tokenizer=tok,
                         max_shots=4, shots=(1, 8), image_queries=Q, image_token=TOKEN)
  with pytest.raises(ValueError, match="input format 'generate' has none"):
    fewshot.FewShotMaker(fmt='generate', image_size=SIZE, seq_len=64, tokenizer=tok,
                         max_shots=4, image_queries=Q, image_token=TOKEN)
  few = fewshot.FewShotMaker(fmt='instruct', image_size=SIZE, seq_len=40, tokenizer=tok,
                             max_shots=4, image_queries=Q, image_token=TOKEN)
  records = pipeline.sources.open_split('synthetic_faces', 'train', corpus['dir'])
  basic = next(i for i in range(len(records)) if records[i]['expression'] >= 0)
  with pytest.raises(ValueError, match='seq_len=40 cuts a 4-shot row inside its images'):
    few.row(0, basic, records[basic], np.random.default_rng(0), records, 4, False)


# -- the k-shot evaluator ------------------------------------------------------------------

def test_eval_rows_ask_the_same_examples_both_ways(corpus):
  tok = corpus['tok']
  rng = np.random.default_rng(0)
  expression = rng.integers(-1, 8, 40)
  images = np.arange(40, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 3))
  rows = fs_eval.build_rows(images, expression, (0, 1, 4), tok, Q, TOKEN, max_items=10)
  queries = np.flatnonzero(expression >= 0)[:10]
  assert sorted(set(rows['query'])) == sorted(queries)
  interleave.check_slots(rows['ids'], rows['image_mask'], TOKEN, Q)
  for i in range(len(rows['k'])):
    k, qi, used = rows['k'][i], rows['query'][i], int(rows['image_mask'][i].sum())
    faces = rows['images'][i, :used, 0, 0, 0].astype(int)    # each face's record index
    assert used == k + 1 and faces[-1] == qi and qi not in faces[:-1]
    assert np.all(expression[faces] >= 0)
    words = [line.split('Label:')[1].strip()
             for line in _lines(tok, rows['ids'][i], rows['mask'][i])[1:-1]]
    assert len(words) == k
    if rows['relabelled'][i]:
      assert rows['answer'][i] in fewshot.RELABEL_WORDS
      assert (k == 0) or rows['answer'][i] in words      # answerable from the examples
    else:
      assert rows['answer'][i] == labels.BASIC[expression[qi]]
      assert words == [labels.BASIC[expression[f]] for f in faces[:-1]]
  # The two kinds of a (query, k) show the same faces.
  for qi in queries:
    for k in (1, 4):
      same = (rows['query'] == qi) & (rows['k'] == k)
      if same.sum() == 2:
        a, b = rows['images'][same]
        np.testing.assert_array_equal(a, b)
  assert fs_eval.correct('<answer>Maple.</answer>', 'maple', True)
  assert not fs_eval.correct('<answer>happiness</answer>', 'maple', True)
  assert fs_eval.correct('<answer>happy</answer>', 'happiness', False)


def test_evaluator_runs_on_a_model(corpus, tmp_path):
  model_cfg = presets.get('tiny')
  model_cfg.llm.update(vocab_size=TOKEN, max_seq_len=256)
  module = model_util.random_module(lambda: unifer_lib.UniFER(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(module)
  config = pipeline.ml_collections.ConfigDict(dict(
      model=model_cfg.to_dict(), input=dict(type='tfds', data_dir=corpus['dir'],
                                            tokenizer=corpus['tok'].path, image_size=SIZE)))
  model = model_io.Model(config, graphdef, params, step=0)
  ev = registry.build({'fs': dict(type='fewshot', shots=[0, 1], max_items=6)})['fs']
  got = ev.run(model, tmp_path)
  assert got['fewshot_n'] == 6
  for key in ('fewshot_acc_0shot', 'fewshot_acc_1shot', 'fewshot_relabelled_acc_0shot',
              'fewshot_relabelled_acc_1shot'):
    assert 0.0 <= got[key] <= 1.0, key
  raw = json.loads((tmp_path / 'fs_answers.json').read_text())
  assert len(raw) <= 6 * 2 * 2 and sum(not r['relabelled'] for r in raw) == 6 * 2
  assert {r['k'] for r in raw} == {0, 1} and all(isinstance(r['said'], str) for r in raw)


def test_kshot_rows_are_for_the_instruct_stage_only(corpus):
  model_cfg = presets.get('tiny')
  for stage in ('generate', 'grpo'):
    config = pipeline.ml_collections.ConfigDict(dict(stage=stage, input=_cfg(corpus)))
    with pytest.raises(ValueError, match=f"k-shot rows are rows of the instruct stage; stage "
                                         f"'{stage}'"):
      tfds_input.global_batch_spec(config, model_cfg)

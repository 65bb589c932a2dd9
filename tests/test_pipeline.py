"""grain pipelines over a small synthetic_faces corpus: sharding, exact resume, mixture
weights, the stage batch formats (masks and first tokens), eval padding, the trainer
input (config.input.type='tfds') and its errors."""

import json
import math

import ml_collections
import numpy as np
import pytest

from data_prep import synthetic_faces as sf
from unifer_jax.data import examples, inputs, instructions, labels, pipeline, sources
from unifer_jax.data import tokenizer as tok_lib
from unifer_jax import sharding
from unifer_jax.models import presets

SIZE = 32   # model image size in these tests


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  sf.prepare(root / 'a', size=300, seed=1, image_size=64, workers=1, samples=False)
  sf.prepare(root / 'b', size=60, seed=2, image_size=64, workers=1, samples=False)
  tok = tok_lib.train_for_datasets(['synthetic_faces'], root / 'tok', data_dir=str(root / 'a'),
                                   vocab_size=1024)
  return dict(a=str(root / 'a'), b=sf.dataset_dir(root / 'b'), tok=tok)


@pytest.fixture(scope='module')
def tok(corpus):
  return tok_lib.load(corpus['tok'])


def make_cfg(corpus, **kw):
  cfg = pipeline.default_input_config()
  cfg.data_dir, cfg.tokenizer = corpus['a'], corpus['tok']
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def make(corpus, tok, fmt, *, batch=8, train=True, shard=(0, 1), **kw):
  return pipeline.Pipeline(make_cfg(corpus, **kw), fmt, batch_size=batch, image_size=SIZE,
                           train=train, shard=shard, tokenizers=(tok, tok))


def test_shards_are_disjoint_and_cover_the_data(corpus, tok):
  n_train = 240
  seen = []
  for p in range(2):
    pl = make(corpus, tok, 'generate', shard=(p, 2))
    per_epoch = n_train // 2 // 8                      # 15 batches = one epoch of the shard
    first = np.concatenate([next(pl)['_index'] for _ in range(per_epoch)])
    assert len(set(first)) == len(first) == n_train // 2   # an epoch: each record once
    assert np.all(first % 2 == p)                      # shard p holds records p, p+2, ...
    second = np.concatenate([next(pl)['_index'] for _ in range(per_epoch)])
    assert set(second) == set(first) and not np.array_equal(second, first)   # reshuffled
    seen.append(set(first))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n_train))
  # Eval: every record exactly once over the processes, padding rows marked invalid.
  ids, counts = [], []
  for p in range(3):
    pl = make(corpus, tok, 'eval', batch=16, train=False, shard=(p, 3), split='test')
    batches = list(pl)
    counts.append(len(batches))
    for b in batches:
      ids += list(b['id'][b['valid'] > 0])
  assert len(set(counts)) == 1                        # the same number of batches everywhere
  assert sorted(ids) == sorted(f'test/{i:07d}'.encode() for i in range(30))


def test_resume_continues_at_the_exact_next_batch(corpus, tok):
  a = make(corpus, tok, 'instruct')
  for _ in range(3):
    next(a)
  state = json.loads(json.dumps(a.get_state()))         # what the checkpoint stores
  want = [next(a) for _ in range(3)]
  b = make(corpus, tok, 'instruct')                     # a fresh pipeline, as after a restart
  b.set_state(state)
  got = [next(b) for _ in range(3)]
  for w, g in zip(want, got):
    assert w.keys() == g.keys()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)
  assert b.get_state()['position'] == 6
  # A pipeline that was never advanced differs (the comparison is not vacuous).
  c = make(corpus, tok, 'instruct')
  assert not np.array_equal(next(c)['image'], want[0]['image'])


def test_mixture_keeps_its_weights(corpus, tok):
  weights = [[sf.dataset_dir(corpus['a']), 3.0], [corpus['b'], 1.0]]
  pl = make(corpus, tok, 'generate', mixture=weights)
  src = np.concatenate([next(pl)['_source'] for _ in range(50)])   # 400 rows
  n, p = len(src), 0.75
  frac = float(np.mean(src == 0))
  # Bound: 3 binomial standard deviations (0.065 at n=400). grain's mix is a
  # deterministic proportional interleave, so it sits far inside.
  assert abs(frac - p) <= 3 * math.sqrt(p * (1 - p) / n), frac
  # The small dataset (48 train records, 100 drawn) cycles through whole epochs.
  pl2 = make(corpus, tok, 'generate', mixture=weights)
  rows = [next(pl2) for _ in range(50)]
  from_b = np.concatenate([b['_index'][b['_source'] == 1] for b in rows])
  assert set(from_b[:48]) == set(range(48)) and set(from_b[48:96]) == set(range(48))


def test_instruct_loss_mask_covers_exactly_the_answer(corpus, tok):
  pl = make(corpus, tok, 'instruct', batch=16, seq_len=160)
  assistant = tok.token_id('<|assistant|>')
  checked = {t: 0 for t in instructions.TASKS}
  for _ in range(4):
    b = next(pl)
    for r in range(16):
      toks, mask, attn = b['tokens'][r], b['loss_mask'][r], b['attention_mask'][r]
      assert not b['_truncated'][r]
      n = int(attn.sum())
      assert np.all(attn[:n] == 1) and np.all(attn[n:] == 0) and np.all(toks[n:] == tok.pad_id)
      on = np.flatnonzero(mask)
      # One contiguous block, right after '<|assistant|>', ending at the last real token (eos).
      assert np.array_equal(on, np.arange(on[0], n))
      assert toks[on[0] - 1] == assistant and toks[n - 1] == tok.eos_id
      assert toks[0] == tok.bos_id and np.sum(toks[:on[0]] == assistant) == 1
      answer = tok.decode(toks[on[:-1]])
      assert tok.encode(answer) == list(toks[on[:-1]])  # the target is exactly the answer text
      task = instructions.TASKS[b['task'][r]]
      checked[task] += 1
      got = instructions.parse_answer(task, answer)
      if task == 'basic':
        assert got == b['expression'][r]
      elif task == 'compound':
        assert got == b['compound'][r]
      elif task == 'intensity':
        assert got == pytest.approx(b['intensity'][r], abs=0.0051)
      elif task == 'valence_arousal':
        assert got == pytest.approx((b['valence'][r], b['arousal'][r]), abs=0.0051)
      elif task == 'rationale':
        active = {au for au, a in zip(labels.AUS, b['aus'][r]) if a > 0}
        assert set(got) <= active
  assert sum(v > 0 for v in checked.values()) >= 6


def test_align_and_generate_formats(corpus, tok):
  # Room for the whole caption (its look part included) under this small corpus's BPE.
  b = next(make(corpus, tok, 'align', text_len=96))
  assert np.all(b['text_ids'][:, 0] == tok.cls_id) and np.all(b['itg_ids'][:, 0] == tok.dec_id)
  np.testing.assert_array_equal(b['itg_ids'][:, 1:], b['text_ids'][:, 1:])
  for r in range(8):
    n = int(b['text_mask'][r].sum())
    assert b['text_ids'][r, n - 1] == tok.eos_id and np.all(b['text_ids'][r, n:] == tok.pad_id)
    assert tok.decode(b['text_ids'][r]).endswith('.')      # a caption
  assert b['expression'].dtype == np.int32 and np.all((b['expression'] >= 0) | (b['compound'] >= 0))

  g = next(make(corpus, tok, 'generate'))
  assert np.all(g['tokens'][:, 0] == tok.bos_id) and np.all(g['loss_mask'][:, 0] == 0)
  np.testing.assert_array_equal(g['loss_mask'][:, 1:], g['attention_mask'][:, 1:])
  last = g['attention_mask'].sum(1) - 1
  assert np.all(g['tokens'][np.arange(8), last] == tok.eos_id)

  lm = next(make(corpus, tok, 'lm'))
  assert 'image' not in lm and np.all(lm['loss_mask'][:, 0] == 0)
  np.testing.assert_array_equal(lm['loss_mask'][:, 1:], lm['attention_mask'][:, 1:])


def test_images_augmentation_and_eval_determinism(corpus, tok):
  e1 = next(make(corpus, tok, 'eval', train=False))
  e2 = next(make(corpus, tok, 'eval', train=False))
  np.testing.assert_array_equal(e1['image'], e2['image'])
  assert e1['image'].shape == (8, SIZE, SIZE, 3) and e1['image'].dtype == np.float32
  assert -1.0 <= e1['image'].min() < 0 < e1['image'].max() <= 1.0     # (x - .5) / .5
  # Training with augmentation switched off gives the eval image of the same record.
  plain = make(corpus, tok, 'eval', augment=dict(enabled=False))
  b = next(plain)
  src = sources.open_split('synthetic_faces', 'train', corpus['a'])
  maker = examples.ExampleMaker('eval', image_size=SIZE)
  ref = maker(0, int(b['_index'][0]), src[int(b['_index'][0])], None)['image']
  np.testing.assert_array_equal(b['image'][0], ref)
  # With augmentation, the same record looks different in training than at eval.
  aug = next(make(corpus, tok, 'eval'))
  assert not np.array_equal(aug['image'][0], maker(0, int(aug['_index'][0]),
                                                   src[int(aug['_index'][0])], None)['image'])


def test_long_cot_targets_drop_their_think_then_truncate(corpus, tok):
  pl = make(corpus, tok, 'instruct', batch=32, seq_len=90, tasks=['compound', 'basic'])
  b = next(pl)
  short = np.flatnonzero(b['_no_think'])
  assert 0 < len(short) < 32 and not b['_truncated'].any()
  for r in range(32):
    answer = tok.decode(b['tokens'][r][b['loss_mask'][r] > 0])
    # Dropped to fit: no think. Otherwise CoT, or answer-only by choice
    # (instructions.ANSWER_ONLY_FRACTION).
    if r in short:
      assert '<think>' not in answer
    # Either way the label is there in full.
    task = instructions.TASKS[b['task'][r]]
    want = b['expression'][r] if task == 'basic' else b['compound'][r]
    assert instructions.parse_answer(task, answer) == want
  # Too short even without the think: the end is cut and counted.
  b = next(make(corpus, tok, 'instruct', seq_len=40))
  assert b['_truncated'].sum() > 0
  long = np.flatnonzero(b['_truncated'])[0]
  assert b['attention_mask'][long].sum() == 40 and b['tokens'][long, -1] != tok.eos_id


def _trainer_config(corpus, stage, **input_kw):
  model = presets.get('tiny')
  model.llm.vocab_size = model.qformer.vocab_size = 1024
  config = ml_collections.ConfigDict(dict(stage=stage, seed=0))
  config.input = make_cfg(corpus, **{**dict(batch_size=8, seq_len=40, text_len=32), **input_kw})
  return config, model


@pytest.mark.parametrize('stage', ['lm', 'align', 'generate', 'instruct', 'distill'])
def test_trainer_input(corpus, stage):
  config, model = _trainer_config(corpus, stage)
  data = inputs.make_input(config, model)
  spec = data.batch_spec()
  assert inputs.batch_spec(config, model) == spec      # compile-check's, from the config alone
  local = data.next_local_batch()
  assert set(local) == set(spec)                       # no '_' metadata reaches the device
  for k, v in local.items():
    assert v.shape == spec[k].shape and v.dtype == spec[k].dtype, k
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  batch = inputs.to_global(local, mesh)
  assert batch[next(iter(spec))].shape[0] == 8
  state = json.loads(json.dumps(data.get_state()))
  nxt = data.next_local_batch()
  again = inputs.make_input(config, model)
  again.set_state(state)
  for k, v in again.next_local_batch().items():
    np.testing.assert_array_equal(v, nxt[k])
  assert data.stats()['rows'] == 16 and again.stats()['rows'] == 16


@pytest.mark.parametrize('stage', ['generate', 'instruct'])
def test_an_instruction_aware_qformer_reads_the_prompt(corpus, stage):
  """InstructBLIP: beside the LLM tokens each row carries the user's message (captions:
  examples.CAPTION_PROMPT) as [CLS] + text + eos in the Q-Former's tokenizer."""
  config, model = _trainer_config(corpus, stage)
  model.qformer.instruction_aware = True
  data = inputs.make_input(config, model)
  spec = data.batch_spec()
  assert spec['qformer_ids'].shape == spec['qformer_mask'].shape == (8, 32)
  assert inputs.batch_spec(config, model) == spec
  batch = data.next_local_batch()
  tok = tok_lib.load(corpus['tok'])
  for row in range(8):
    ids = batch['qformer_ids'][row][batch['qformer_mask'][row] > 0]
    cut = len(ids) == 32   # a long prompt is cut at text_len (no eos then)
    assert ids[0] == tok.cls_id and (cut or ids[-1] == tok.eos_id)
    message = tok.decode(ids[1:] if cut else ids[1:-1])
    if stage == 'generate':
      assert message == examples.CAPTION_PROMPT
    else:  # the message the LLM's chat prompt wraps (the loss-free part of the row)
      prompt = batch['tokens'][row][(batch['loss_mask'][row] == 0) & (batch['attention_mask'][row] > 0)]
      assert message in tok.decode(prompt) and len(message) > 10


def test_errors(corpus, tok):
  config, model = _trainer_config(corpus, 'instruct')
  config.input.image_size = 48
  with pytest.raises(ValueError, match='image_size=48 but model.vit.image_size=32'):
    inputs.make_input(config, model)
  config, model = _trainer_config(corpus, 'instruct')
  model.llm.vocab_size = 128
  with pytest.raises(ValueError, match='1024 ids but model.llm.vocab_size=128'):
    inputs.make_input(config, model)
  config, model = _trainer_config(corpus, 'instruct', seq_len=61)   # + 4 queries > 64
  with pytest.raises(ValueError, match='exceeds model.llm.max_seq_len=64'):
    inputs.make_input(config, model)
  config, model = _trainer_config(corpus, 'evaluate')
  with pytest.raises(ValueError, match="config.stage='evaluate' has no input format"):
    inputs.make_input(config, model)
  with pytest.raises(ValueError, match="has no split 'dev'"):
    make(corpus, tok, 'generate', split='dev')
  with pytest.raises(FileNotFoundError, match="dataset 'rafdb'"):
    make(corpus, tok, 'generate', name='rafdb')
  with pytest.raises(ValueError, match=r"unknown task\(s\) \['pose'\]"):
    make(corpus, tok, 'instruct', tasks=['basic', 'pose'])
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['blur'\]"):
    make(corpus, tok, 'generate', augment=dict(enabled=True, blur=1.0))
  with pytest.raises(ValueError, match='none of'):
    next(make(corpus, tok, 'instruct', tasks=['age_group']))



def test_worker_processes_give_the_same_batches_and_resume_across_counts(corpus, tok):
  ref = make(corpus, tok, 'instruct')
  want = [next(ref) for _ in range(4)]
  state = json.loads(json.dumps(ref.get_state()))
  want += [next(ref) for _ in range(2)]
  mp = make(corpus, tok, 'instruct', workers=1)        # a grain worker process
  try:
    got = [next(mp) for _ in range(4)]
    mp.set_state(state)                                 # saved without workers
    got += [next(mp) for _ in range(2)]
    saved = json.loads(json.dumps(mp.get_state()))      # grain's multi-worker state
  finally:
    mp.close()
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)
  back = make(corpus, tok, 'instruct')                  # and back to no workers
  back.set_state(saved)
  np.testing.assert_array_equal(next(back)['tokens'], next(ref)['tokens'])


def test_tokenizer_is_trained_on_demand(corpus, tmp_path):
  cfg = make_cfg(corpus, tokenizer=str(tmp_path / 'tok'), tokenizer_train_vocab=600)
  tok, _ = pipeline.load_tokenizers(cfg, 'generate')
  assert tok.vocab_size == 600 and tok_lib.is_tokenizer_dir(tmp_path / 'tok')
  cfg.tokenizer_train_vocab = 700                       # an existing one is kept
  assert pipeline.load_tokenizers(cfg, 'generate')[0].vocab_size == 600
  with pytest.raises(ValueError, match='config.input.tokenizer is empty'):
    pipeline.load_tokenizers(make_cfg(corpus, tokenizer=''), 'instruct')
  assert pipeline.load_tokenizers(make_cfg(corpus, tokenizer=''), 'eval') == (None, None)

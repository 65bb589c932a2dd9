"""Packed rows (config.input.pack, data/packing.py): every example gets the loss it has
alone in a row, attention never crosses examples, whole image+text examples only, and
resume stays exact."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from data_prep import synthetic_faces as sf
from unifer_jax import config_lib
from unifer_jax.data import pipeline, tfds_input
from unifer_jax.data import tokenizer as tok_lib
from unifer_jax.models import interleave, layers, presets
from unifer_jax.models.unifer import UniFER
from unifer_jax.train import loop, losses

SIZE = 32   # the tiny preset's image size


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  sf.prepare(root / 'a', size=120, seed=1, image_size=64, workers=1, samples=False)
  tok = tok_lib.train_for_datasets(['synthetic_faces'], root / 'tok', data_dir=str(root / 'a'),
                                   vocab_size=512)
  return dict(a=str(root / 'a'), tok=tok)


@pytest.fixture(scope='module')
def tok(corpus):
  return tok_lib.load(corpus['tok'])


def _tiny(tok, instruction_aware=False):
  cfg = presets.get('tiny')
  cfg.llm.vocab_size, cfg.llm.max_seq_len = tok.vocab_size, 512
  if instruction_aware:   # InstructBLIP: each image's queries read its prompt
    cfg.qformer.update(instruction_aware=True, vocab_size=tok.vocab_size, max_position=96)
  return UniFER(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def model(tok):
  return _tiny(tok)


@pytest.fixture(scope='module')
def aware_model(tok):
  return _tiny(tok, instruction_aware=True)


def make(corpus, tok, model, fmt, *, pack, batch=8, **kw):
  cfg = pipeline.default_input_config()
  cfg.update(data_dir=corpus['a'], tokenizer=corpus['tok'], seq_len=64, pack=pack,
             text_len=32, qformer_prompt=bool(model.instruction_aware),
             image_queries=model.cfg.qformer.num_queries,
             image_token=interleave.placeholder_id(model.cfg), **kw)
  return pipeline.Pipeline(cfg, fmt, batch_size=batch, image_size=SIZE, shard=(0, 1),
                           tokenizers=(tok, tok))


def _device(batch):
  return {k: jnp.asarray(v) for k, v in batch.items() if not k.startswith('_')}


@nnx.jit
def _llm(model, tokens, attention_mask, **kw):
  return model.llm(tokens, attention_mask=attention_mask, **kw)


@nnx.jit
def _unifer(model, image, tokens, attention_mask, **kw):
  return model(image, tokens, attention_mask, **kw)


def _prompt(b):
  """An instruction-aware Q-Former's prompt: [B, Tq] per example, [B, M, Tq] per slot."""
  if 'qformer_ids' not in b:
    return {}
  return dict(qformer_input_ids=jnp.asarray(b['qformer_ids']),
              qformer_attention_mask=jnp.asarray(b['qformer_mask']))


def _token_nll(logits, tokens, mask):
  """-log p(token i | row before i) at each position i >= 1 that the mask keeps (0 else);
  ``logits`` [T, V] where logits[i - 1] predicts token i."""
  logp = jax.nn.log_softmax(jnp.asarray(logits[:-1], jnp.float32), -1)
  ids = np.minimum(tokens[1:, None], logp.shape[-1] - 1)   # image slots: never targets
  picked = np.asarray(jnp.take_along_axis(logp, jnp.asarray(ids), -1)[:, 0])
  return np.concatenate([[0.0], -picked * mask[1:]]), np.concatenate([[0.0], mask[1:]])


def _unpacked_examples(model, fmt, batches):
  """{(text tokens, image bytes): (NLL sum, target count)} of each example alone."""
  out, q = {}, model.cfg.qformer.num_queries
  for b in batches:
    if fmt == 'lm':
      logits = np.asarray(_llm(model, jnp.asarray(b['tokens']),
                               jnp.asarray(b['attention_mask'])))
    else:  # [prefix; text]: position q - 1 + j predicts text token j
      logits = np.asarray(_unifer(model, jnp.asarray(b['image']), jnp.asarray(b['tokens']),
                                  jnp.asarray(b['attention_mask']), **_prompt(b)))[:, q - 1:]
    for r in range(len(b['tokens'])):
      n = int(b['attention_mask'][r].sum())
      toks, mask = b['tokens'][r][:n], b['loss_mask'][r][:n]
      if fmt == 'lm':
        nll, kept = _token_nll(logits[r][:n], toks, mask)
      else:   # from the prefix's last query on (it predicts text token 0)
        nll, kept = _token_nll(logits[r][:n + 1], np.concatenate([[0], toks]),
                               np.concatenate([[0.0], mask]))
      image = b''.join([] if fmt == 'lm' else [b['image'][r].tobytes()])
      out[(tuple(toks), image)] = (nll.sum(), kept.sum())
  return out


def _packed_segments(model, fmt, b):
  """[(key, NLL sum, target count)] of every segment of a packed batch, from one
  forward pass over the packed rows."""
  d, q = _device(b), model.cfg.qformer.num_queries
  pack = dict(segment_ids=d['segment_ids'], positions=d['positions'])
  if fmt == 'lm':
    logits = np.asarray(_llm(model, d['tokens'], d['attention_mask'], **pack))
  else:
    logits = np.asarray(_unifer(model, d['image'], d['tokens'], d['attention_mask'],
                                image_mask=d['image_mask'], **pack, **_prompt(d)))
  out = []
  for r in range(len(b['tokens'])):
    seg = b['segment_ids'][r]
    for s in range(1, seg.max() + 1):
      at = np.flatnonzero(seg == s)
      assert np.array_equal(at, np.arange(at[0], at[-1] + 1))   # contiguous
      assert np.array_equal(b['positions'][r][at], np.arange(len(at)))
      toks, mask = b['tokens'][r][at], b['loss_mask'][r][at]
      nll, kept = _token_nll(logits[r][at], toks, mask)
      if fmt == 'lm':
        key = (tuple(toks), b'')
      else:   # its image's Q slots first, then its text; its image in slot s - 1
        assert np.all(toks[:q] == interleave.placeholder_id(model.cfg))
        assert b['image_mask'][r][s - 1]
        key = (tuple(toks[q:]), b['image'][r][s - 1].tobytes())
      out.append((key, nll.sum(), kept.sum()))
    assert not b['image_mask'][r][seg.max():].any() if fmt != 'lm' else True
  return out


@pytest.mark.parametrize('fmt', ['lm', 'generate', 'instruct', 'instruct/instruction-aware'])
def test_packed_rows_give_each_example_its_unpacked_loss(corpus, tok, model, aware_model, fmt):
  fmt, _, aware = fmt.partition('/')
  model = aware_model if aware else model
  packed = next(make(corpus, tok, model, fmt, pack=True))
  plain = make(corpus, tok, model, fmt, pack=False)
  alone = _unpacked_examples(model, fmt, [next(plain) for _ in range(5)])
  segments = _packed_segments(model, fmt, packed)
  assert len(segments) == packed['_examples'].sum() > 1.5 * len(packed['tokens'])
  total = count = 0.0
  for key, nll, kept in segments:
    assert key in alone, 'a packed segment is not one of the unpacked examples'
    np.testing.assert_allclose(nll, alone[key][0], rtol=2e-5, atol=2e-5)
    assert kept == alone[key][1]
    total, count = total + nll, count + kept
  # The stage loss on the packed batch: the mean over the same target tokens.
  if aware:
    assert packed['qformer_ids'].shape == (8, 4, 32)
  loss_fn = losses.get(fmt)
  loss, aux = loss_fn(model, _device(packed), None)
  np.testing.assert_allclose(float(loss), total / count, rtol=2e-5)
  assert float(aux['tokens']) == count


def test_no_attention_across_segments(corpus, tok, model):
  b = next(make(corpus, tok, model, 'instruct', pack=True))
  r = int(np.argmax(b['segment_ids'].max(1)))   # a row with the most examples
  d = {k: v[r:r + 1] for k, v in _device(b).items()}
  seg = np.asarray(d['segment_ids'][0])
  run = lambda x: np.asarray(_unifer(model, x['image'], x['tokens'], x['attention_mask'],
                                     image_mask=x['image_mask'], segment_ids=x['segment_ids'],
                                     positions=x['positions']))[0]
  before = run(d)
  # Another face and other words for the first example only.
  changed = dict(d, image=d['image'].at[0, 0].set(jax.random.normal(jax.random.key(1),
                                                                     d['image'].shape[2:])))
  text = (seg == 1) & (np.asarray(d['tokens'][0]) != interleave.placeholder_id(model.cfg))
  changed['tokens'] = jnp.where(jnp.asarray(text)[None], (d['tokens'] + 7) % tok.vocab_size,
                                d['tokens'])
  after = run(changed)
  assert np.abs(after[seg == 1] - before[seg == 1]).max() > 1e-3   # the change is seen
  others = seg > 1
  assert others.any()
  np.testing.assert_array_equal(after[others], before[others])


@pytest.mark.parametrize('path', ['grouped', 'jax.nn'])
def test_every_attention_path_keeps_segments_apart(path):
  kq, kk, kv, kp = jax.random.split(jax.random.key(0), 4)
  b, t, n, kvh, h = 2, 12, 4, 2, 8
  q = jax.random.normal(kq, (b, t, n, h))
  k = jax.random.normal(kk, (b, t, kvh, h))
  v = jax.random.normal(kv, (b, t, kvh, h))
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
  mask = layers.causal_mask(t) & layers.padding_mask(seg > 0) & layers.segment_mask(seg)
  attend = (layers.grouped_attention if path == 'grouped'
            else lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m))
  out = attend(q, k, v, mask)
  # Row 0's second segment alone, as its own sequence.
  alone = attend(q[:1, 5:9], k[:1, 5:9], v[:1, 5:9], layers.causal_mask(4))
  np.testing.assert_allclose(out[0, 5:9], alone[0], atol=1e-6)
  k2 = k.at[0, :5].add(jax.random.normal(kp, (5, kvh, h)))    # perturb segment 1's keys
  np.testing.assert_array_equal(attend(q, k2, v, mask)[0, 5:9], out[0, 5:9])


def test_resume_is_exact_with_packing(corpus, tok, model):
  a = make(corpus, tok, model, 'instruct', pack=True, batch=4)
  for _ in range(3):
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  want = [next(a) for _ in range(3)]
  b = make(corpus, tok, model, 'instruct', pack=True, batch=4)
  b.set_state(state)
  got = [next(b) for _ in range(3)]
  for w, g in zip(want, got):
    assert w.keys() == g.keys()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)
  fresh = next(make(corpus, tok, model, 'instruct', pack=True, batch=4))
  assert not np.array_equal(fresh['tokens'], want[0]['tokens'])
  # A state of another structure cannot place a packed stream: refused, not guessed.
  with pytest.raises(ValueError, match='resume from grain'):
    make(corpus, tok, model, 'instruct', pack=True, batch=4).set_state(
        {'position': 3, 'grain': {'other': 1}})


def test_trainer_spec_and_errors(corpus, tok, model):
  config = ml_collections.ConfigDict(dict(stage='instruct', input=dict(
      pipeline.default_input_config().to_dict(), data_dir=corpus['a'], tokenizer=corpus['tok'],
      seq_len=64, pack=True, batch_size=4, images_per_row=3)))
  mcfg = model.cfg
  data = tfds_input.TfdsInput(config, ml_collections.ConfigDict(mcfg.to_dict()))
  batch = data.next_local_batch()
  spec = tfds_input.global_batch_spec(config, ml_collections.ConfigDict(mcfg.to_dict()))
  assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
      k: (v.shape, v.dtype) for k, v in batch.items()}
  assert batch['tokens'].shape == (4, 2 * (64 + mcfg.qformer.num_queries))
  assert batch['image'].shape == (4, 3, SIZE, SIZE, 3)
  assert data.stats()['rows'] > 4   # examples, not rows
  with pytest.raises(ValueError, match='pack_len=40 is shorter than one example'):
    make(corpus, tok, model, 'lm', pack=True, pack_len=40)
  with pytest.raises(ValueError, match='format .eval. has no token rows'):
    make(corpus, tok, model, 'eval', pack=True)
  with pytest.raises(ValueError, match='k-shot rows'):
    make(corpus, tok, model, 'instruct', pack=True, fewshot=dict(
        pipeline.default_input_config().fewshot.to_dict(), max_shots=2))
  with pytest.raises(ValueError, match='GRPO reads one prompt per row'):
    tfds_input.global_batch_spec(ml_collections.ConfigDict(dict(config.to_dict(), stage='grpo')),
                               ml_collections.ConfigDict(mcfg.to_dict()))
  config.input.pack_len = 1024
  with pytest.raises(ValueError, match='exceed model.llm.max_seq_len=512'):
    tfds_input.TfdsInput(config, ml_collections.ConfigDict(mcfg.to_dict()))


def test_a_worker_process_packs_the_same_rows_and_resumes(corpus, tok, model):
  ref = make(corpus, tok, model, 'instruct', pack=True, batch=4)
  want = [next(ref) for _ in range(5)]
  mp = make(corpus, tok, model, 'instruct', pack=True, batch=4, workers=1)
  try:
    got = [next(mp) for _ in range(3)]
    saved = json.loads(json.dumps(mp.get_state()))    # grain's state, through the worker
  finally:
    mp.close()
  again = make(corpus, tok, model, 'instruct', pack=True, batch=4, workers=1)
  try:
    again.set_state(saved)
    got += [next(again) for _ in range(2)]
  finally:
    again.close()
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def test_the_loop_logs_real_tokens_per_second_of_packed_rows(corpus, tmp_path):
  # tokens_per_s counts every position of the batch; real_tokens_per_s the ones holding
  # a token -- the figure packing raises.
  config = config_lib.load('configs/lm.py:tiny', [
      f'--config.input.data_dir={corpus["a"]}', f'--config.input.tokenizer={corpus["tok"]}',
      '--config.input.pack=True', '--config.total_steps=2', '--config.log_every_steps=1',
      '--config.input.batch_size=8', '--config.model.llm.vocab_size=512',
      '--config.input.seq_len=32', '--config.input.pack_len=64'])
  loop.train(config, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  for r in rows:
    frac = r['real_tokens_per_s'] / r['tokens_per_s']
    assert 0.5 < frac <= 1.0, r

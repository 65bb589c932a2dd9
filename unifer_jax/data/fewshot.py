"""k-shot rows for the instruct stage: k labelled example faces, then the query face, in
one interleaved row (issue 34 item 2; how the model reads a row: models/interleave.py).

On with ``config.input.fewshot.max_shots = K > 0``: every instruct row then carries
``image`` [K + 1, S, S, 3] and ``image_mask`` [K + 1] (slot 0 the query's face in an
ordinary instruct row, the faces in text order in a k-shot row), and the tokens hold a
run of Q placeholder ids (``image_token``) where each face goes. A ``fraction`` of the
rows whose record has a basic label become k-shot rows, k drawn from ``shots`` (k = 0:
the query alone, in this format, with the usual words)::

  <|user|>Each face is followed by its expression label.
  [face 1] Label: sadness
  [face 2] Label: happiness
  [query] Label:<|assistant|><answer>happiness</answer></s>      (loss on the answer only)

A ``relabel_fraction`` of them name the 8 basic classes with words drawn per row from
:data:`RELABEL_WORDS` (a random one-to-one mapping), so only the examples tell which word
means which expression; such a row always shows the query's class among its examples
(placed at a random position), else its answer could not be known. A plain row with
k = 0 asks the usual label (0-shot). The examples come from the query's own dataset
(rejection-sampled records with a basic label, the query itself excluded).

How to try it on a finished demo (W = its workdir), then score held-out faces with the
``fewshot`` evaluator (evaluators/fewshot.py)::

  from unifer_jax import config_lib
  from unifer_jax.train import loop
  c = config_lib.load('configs/instruct.py:demo', [
      '--config.init.checkpoint=W/instruct', '--config.input.data_dir=W/data',
      '--config.input.tokenizer=W/tokenizer', '--config.input.fewshot.max_shots=4',
      '--config.input.fewshot.fraction=0.7', '--config.input.fewshot.relabel_fraction=0.7',
      '--config.input.seq_len=160', '--config.total_steps=300'])
  c.evals = dict(fewshot=dict(type='fewshot', every_steps=300, shots=[0, 1, 4],
                              max_items=100, dataset=dict(split='test')))
  loop.train(c, 'W/fewshot')

Today's figures (2026-12-07, 100 held-out faces, 2-core CPU, ~3 s a step): from the
demo's instruct checkpoint, 150 steps at fraction / relabel 0.5 / 0.5 with shots 1, 2, 4:
usual words 0 / 1 / 4-shot 0.00 / 0.95 / 0.89 (its 0-shot prompt never trained),
renamed 0.02 / 0.11 / 0.04; then 300 more at 0.7 / 0.7 with shots 0, 1, 2, 4: usual
0.92 / 0.93 / 0.95, renamed 0.00 / 1.00 / 0.23 -- it copies the one example's word
(1-shot) but does not yet pick the example whose face matches (4-shot; 0.25-0.33 is
what picking any shown word at random gives); 400 more at 0.8 / 0.8 with shots 0, 1, 2,
4, 4, 4: usual 0.92 / 0.92 / 0.93, renamed 0.00 / 1.00 / 0.30. Every renamed answer is
one of the shown words, written whole, though they are 2-6 tokens of the demo's BPE,
which never saw them. 400 more at 0.9 / 0.9 with shots 0, 2, 2, 4 (1250 in all): usual
0.93 / 0.93 / 0.93, renamed 0.00 / 1.00 / 0.27. Issue 34 asks 4-shot renamed >= 0.70:
not reached -- the demo's 4-layer LLM, trained from scratch, learned to copy a shown
word in 150-450 steps but not, in 1250, to match the query's face to an example's.

The rows use the record's split as it is: held-out evaluation of k-shot accuracy reads
the test split with rows built the same way (``FewShotMaker.row``), so the examples shown
at test time are test faces too -- never the query.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unifer_jax.data import examples, instructions, labels

# Words with no expression meaning, one per basic class in a relabelled row.
RELABEL_WORDS = ('apple', 'river', 'stone', 'cloud', 'maple', 'copper', 'violet', 'harbor',
                 'lantern', 'meadow', 'pepper', 'falcon')
INTRO = 'Each face is followed by its expression label.'
_MARK = '\x00IMAGE\x00'
_MAX_DRAWS = 64   # records read while looking for an example of a given class


def default_config() -> dict:
  """``config.input.fewshot`` (off: max_shots = 0)."""
  return dict(max_shots=0, shots=(0, 1, 2, 4), fraction=0.5, relabel_fraction=0.5)


def message(support_words) -> str:
  """The user's message with one image mark per face (examples, then the query); the
  same for both kinds of row, only the label words differ."""
  lines = [INTRO] + [f'{_MARK} Label: {w}' for w in support_words] + [f'{_MARK} Label:']
  return '\n'.join(lines)


def interleaved_ids(tok, text: str, queries: int, token: int) -> list[int]:
  """The chat prompt of ``text`` tokenised, each image mark replaced by ``queries``
  placeholder ids (the text between marks is tokenised piece by piece)."""
  pieces = tok.prompt_text(text).split(_MARK)
  ids = tok.encode(pieces[0])
  for piece in pieces[1:]:
    ids += [token] * queries + tok.encode(piece)
  return ids


@dataclasses.dataclass
class FewShotMaker(examples.ExampleMaker):
  """``ExampleMaker`` for the instruct format with several image slots per row; called
  with ``others`` (the record's dataset, random access) to draw the examples."""
  max_shots: int = 0
  shots: tuple = (0, 1, 2, 4)
  fraction: float = 0.5
  relabel_fraction: float = 0.5
  image_queries: int = 0           # Q of the model
  image_token: int = -1            # models.interleave.placeholder_id of the model
  reads_others = True

  def __post_init__(self):
    super().__post_init__()
    if self.fmt != 'instruct':
      raise ValueError(f'config.input.fewshot.max_shots={self.max_shots} makes k-shot '
                       f'instruct rows; input format {self.fmt!r} has none')
    if self.max_shots <= 0 or self.image_queries <= 0 or self.image_token < 0:
      raise ValueError('FewShotMaker needs max_shots > 0, image_queries > 0 and image_token '
                       f'>= 0; got {self.max_shots}, {self.image_queries}, {self.image_token}')
    bad = [k for k in self.shots if not 0 <= int(k) <= self.max_shots]
    if bad:
      raise ValueError(f'config.input.fewshot.shots={list(self.shots)}: each k must be in '
                       f'0..max_shots={self.max_shots}; {bad} is not')

  @property
  def slots(self) -> int:
    return self.max_shots + 1

  def __call__(self, source: int, index: int, record, rng, others=None):
    basic = int(record.get('expression', -1)) >= 0
    if rng is not None and others is not None and basic and rng.random() < self.fraction:
      k = int(self.shots[rng.integers(len(self.shots))])
      # A 0-shot row is asked with the usual words only: renamed, it has no answer.
      relabel = k > 0 and rng.random() < self.relabel_fraction
      return self.row(source, index, record, rng, others, k, relabel)
    return self._plain(source, index, record, rng)

  # -- rows --------------------------------------------------------------------------

  def _plain(self, source, index, record, rng):
    """The ordinary instruct example with its face in slot 0, in front of the prompt."""
    ex = super().__call__(source, index, record, rng)
    n = self.image_queries
    tokens = np.concatenate([np.full((n,), self.image_token, np.int32), ex['tokens']])
    mask = np.concatenate([np.zeros((n,), np.float32), ex['loss_mask']])
    attn = np.concatenate([np.ones((n,), np.int32), ex['attention_mask']])
    cut = int(ex['attention_mask'].sum()) + n > self.seq_len
    ex.update(tokens=tokens[:self.seq_len], loss_mask=mask[:self.seq_len],
              attention_mask=attn[:self.seq_len],
              image=self._slots([ex['image']]), image_mask=self._used(1),
              _truncated=np.int32(bool(ex['_truncated']) or cut))
    return ex

  def row(self, source, index, record, rng, others, k: int, relabel: bool):
    """A k-shot row for ``record`` (examples drawn from ``others`` with ``rng``)."""
    query = int(record['expression'])
    label_of = lambda j: int(others[j].get('expression', -1))
    picks = pick_examples(len(others), label_of, index, query, k, relabel, rng)
    if picks is None:   # no example of the query's class turned up: ask the usual way
      relabel, picks = False, pick_examples(len(others), label_of, index, query, k, False, rng)
    support = [others[j] for j in picks]
    names = list(labels.BASIC)
    if relabel:
      names = [RELABEL_WORDS[i] for i in rng.choice(len(RELABEL_WORDS), len(names), False)]
    words = [names[int(r['expression'])] for r in support]
    prompt = message(words)
    p = interleaved_ids(self.tokenizer, prompt, self.image_queries, self.image_token)
    a = self.tokenizer.encode(f'<answer>{names[query]}</answer>') + [self.tokenizer.eos_id]
    tokens, mask, attn, cut = examples.assemble([(p, False), (a, True)], self.seq_len,
                                                self.tokenizer.pad_id)
    if cut and (tokens == self.image_token).sum() < (k + 1) * self.image_queries:
      raise ValueError(f'config.input.seq_len={self.seq_len} cuts a {k}-shot row inside its '
                       f'images ({len(p)} prompt tokens); raise seq_len or lower max_shots')
    faces = [self._image(r, rng) for r in support] + [self._image(record, rng)]
    ex = {'_source': np.int32(source), '_index': np.int32(index),
          'image': self._slots(faces), 'image_mask': self._used(k + 1),
          'tokens': tokens, 'loss_mask': mask, 'attention_mask': attn,
          # The basic-label task (a relabelled answer parses against its row's words).
          'task': np.int32(instructions.TASK_INDEX['basic']), **examples.label_arrays(record),
          '_truncated': np.int32(cut), '_no_think': np.int32(0)}
    if self.qformer_prompt:   # every face reads the same question beside its queries
      ids, qmask, qcut = examples.qformer_text(self.text_tokenizer, INTRO, self.text_len)
      ex.update(qformer_ids=ids, qformer_mask=qmask, _truncated=np.int32(cut or qcut))
    return ex

  def _slots(self, faces) -> np.ndarray:
    out = np.zeros((self.slots, *faces[0].shape), faces[0].dtype)
    out[:len(faces)] = faces
    return out

  def _used(self, n: int) -> np.ndarray:
    return (np.arange(self.slots) < n).astype(np.int32)


def pick_examples(n: int, label_of, index: int, query: int, k: int, need_query_class: bool,
                  rng) -> list[int] | None:
  """Indices of k example records among ``n`` with a basic label (``label_of(j) >= 0``),
  never ``index``; with ``need_query_class`` one of them of class ``query``, at a random
  position -- None if none turned up in the draws. Rejection sampling: a dataset is read
  record by record, nothing is indexed in advance."""
  want = k - int(need_query_class and k > 0)
  picked, same = [], None
  for _ in range(_MAX_DRAWS * (k + 1)):
    if len(picked) == want and (same is not None or not need_query_class or k == 0):
      break
    j = int(rng.integers(n))
    label = label_of(j) if j != index else -1
    if label < 0:
      continue
    if need_query_class and same is None and label == query:
      same = j
    elif len(picked) < want:
      picked.append(j)
  if len(picked) < want:
    raise ValueError(f'k-shot row for record {index}: found only {len(picked)} of {want} '
                     f'records with a basic label in {_MAX_DRAWS * (k + 1)} draws')
  if need_query_class and k > 0:
    if same is None:
      return None
    picked.insert(int(rng.integers(k)), same)
  return picked


def example_spec(image_size: int, seq_len: int, text_len: int, qformer_prompt: bool,
                 max_shots: int) -> dict:
  """{key: (shape, dtype)} of a k-shot-capable instruct example (no '_' metadata)."""
  spec = examples.example_spec('instruct', image_size, seq_len, text_len, qformer_prompt)
  spec['image'] = ((max_shots + 1, *spec['image'][0]), spec['image'][1])
  spec['image_mask'] = ((max_shots + 1,), np.int32)
  return spec

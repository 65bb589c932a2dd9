"""One record -> one example of fixed shapes, per stage format (the per-record map of
the grain pipelines; batching stacks these along a new leading axis).

Formats and their keys (per example; a batch adds the leading B):

| format | key | shape, dtype | meaning |
|---|---|---|---|
| all but lm | image | [S, S, 3] f32 | normalised, augmented in training |
| lm | tokens, loss_mask, attention_mask | [T] i32, f32, i32 | bos + text + eos; loss on every real token after the first |
| align | text_ids, text_mask | [Tq] i32, i32 | cls + caption + eos (Q-Former text tokenizer) |
| align | itg_ids | [Tq] i32 | the same with dec first (BLIP-2 ITG) |
| align | expression, compound | [] i32 | labels (-1 absent), to tell same-label pairs apart |
| generate | tokens, loss_mask, attention_mask | [T] | bos + caption + eos; loss on caption + eos |
| instruct | tokens, loss_mask, attention_mask | [T] | chat prompt + answer + eos; loss on answer + eos ONLY |
| instruct | task | [] i32 | index into instructions.TASKS |
| generate, instruct | qformer_ids, qformer_mask | [Tq] i32 | with ``qformer_prompt`` (InstructBLIP): cls + the user's message (generate: ``CAPTION_PROMPT``) + eos in the Q-Former text tokenizer, for the instruction-aware Q-Former |
| instruct, eval | LABELS (below) | | the record's labels (sentinels kept: -1 / NaN) |
| every | _source, _index, _truncated, _no_think | [] i32 | host-side metadata: mixture component, record index in its split, 1 if the text was cut, 1 if a CoT target dropped its think part to fit |

LABELS: expression, compound, age_group, gender, race [] i32; intensity, valence,
arousal [] f32; aus [17] f32; label_dist [8] f32.

The caption of align/generate is the record's ``caption``; a record without one gets
'A {adjective} face.' from its label (real datasets without captions can then join a
stage-1/2 mixture); a record with neither is an error naming it. Truncation cuts the end
(the prompt is kept whole before the answer), so a truncated target has no eos. Before
that, a UniFER-CoT target too long for seq_len is made again without its
``<think>rationale</think>`` (prompt and target then ask for / give the answer only), so
the label itself is not cut off.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unifer_jax.data import augment, instructions, labels

FORMATS = ('lm', 'align', 'generate', 'instruct', 'eval')
# What an instruction-aware Q-Former reads beside its queries while captions train.
CAPTION_PROMPT = 'A short description of the face:'
QFORMER_PROMPTED = ('generate', 'instruct')

INT_LABELS = ('expression', 'compound', 'age_group', 'gender', 'race')
FLOAT_LABELS = ('intensity', 'valence', 'arousal')
VECTOR_LABELS = {'aus': len(labels.AUS), 'label_dist': len(labels.BASIC)}
META = ('_source', '_index', '_truncated', '_no_think')


def label_arrays(record) -> dict[str, np.ndarray]:
  out = {k: np.int32(record.get(k, -1)) for k in INT_LABELS}
  out.update({k: np.float32(record.get(k, np.nan)) for k in FLOAT_LABELS})
  for k, n in VECTOR_LABELS.items():
    v = record.get(k)
    out[k] = np.full((n,), np.nan, np.float32) if v is None else np.asarray(v, np.float32)
  return out


def label_spec() -> dict[str, tuple[tuple[int, ...], type]]:
  spec = {k: ((), np.int32) for k in INT_LABELS}
  spec.update({k: ((), np.float32) for k in FLOAT_LABELS})
  spec.update({k: ((n,), np.float32) for k, n in VECTOR_LABELS.items()})
  return spec


def caption_text(record) -> str:
  text = instructions.text_field(record, 'caption')
  if text:
    return text
  e, c = int(record.get('expression', -1)), int(record.get('compound', -1))
  if e >= 0:
    return f'A {instructions.SYNONYMS[labels.BASIC[e]][1]} face.'
  if c >= 0:
    return f'A {instructions.written_form(labels.COMPOUND[c], 1, None)} face.'
  raise ValueError(f'record {instructions.text_field(record, "id")!r} '
                   f'({instructions.text_field(record, "source")}) has no caption and no '
                   f'expression/compound label to describe')


def assemble(pieces, length: int, pad_id: int):
  """pieces: [(ids, is_target)] -> tokens, loss_mask, attention_mask ([length]) and
  whether anything was cut."""
  ids = [i for p, _ in pieces for i in p]
  target = [float(t) for p, t in pieces for _ in p]
  truncated = len(ids) > length
  ids, target = ids[:length], target[:length]
  n = len(ids)
  tokens = np.full((length,), pad_id, np.int32)
  tokens[:n] = ids
  loss_mask = np.zeros((length,), np.float32)
  loss_mask[:n] = target
  attention = np.zeros((length,), np.int32)
  attention[:n] = 1
  return tokens, loss_mask, attention, truncated


def qformer_text(text_tok, prompt: str, length: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """(ids, mask, cut?) of ``prompt`` for an instruction-aware Q-Former: cls + text + eos
  in its own tokenizer, as InstructBLIP's processor gives it, padded to ``length``."""
  ids, _, mask, cut = assemble([([text_tok.cls_id] + text_tok.encode(prompt) +
                                 [text_tok.eos_id], False)], length, text_tok.pad_id)
  return ids, mask, cut


@dataclasses.dataclass
class ExampleMaker:
  """The per-record transform: ``maker(source_id, index, record, rng) -> example``.

  Picklable (grain worker processes receive a copy); ``rng`` is None for deterministic
  (eval) examples.
  """
  fmt: str
  image_size: int
  seq_len: int = 0
  text_len: int = 0
  tokenizer: object = None          # data.tokenizer.Tokenizer for the LLM side
  text_tokenizer: object = None     # the Q-Former text side (align)
  tasks: tuple = instructions.TASKS
  task_weights: tuple = ()
  lm_caption_fraction: float = 0.5
  augment: dict | None = None       # None: no augmentation
  mean: tuple = (0.5, 0.5, 0.5)
  std: tuple = (0.5, 0.5, 0.5)
  raw_pixels: bool = False          # 'image' as uint8 pixels, not normalised (memory_table.py)
  qformer_prompt: bool = False      # add the prompt for an instruction-aware Q-Former

  def __post_init__(self):
    if self.fmt not in FORMATS:
      raise ValueError(f'input format {self.fmt!r}; expected one of {FORMATS}')
    needs_tok = self.fmt in ('lm', 'generate', 'instruct')
    if needs_tok and (self.tokenizer is None or self.seq_len <= 0):
      raise ValueError(f'format {self.fmt!r} needs a tokenizer and seq_len > 0')
    needs_text = self.fmt == 'align' or (self.qformer_prompt and self.fmt in QFORMER_PROMPTED)
    if needs_text and (self.text_tokenizer is None or self.text_len <= 1):
      raise ValueError(f'format {self.fmt!r}{" with qformer_prompt" * self.qformer_prompt} '
                       'needs a text tokenizer and text_len > 1')
    bad = sorted(set(self.tasks) - set(instructions.TASKS))
    if bad:
      raise ValueError(f'config.input.tasks has unknown task(s) {bad}; expected a subset '
                       f'of {instructions.TASKS}')
    if self.task_weights and len(self.task_weights) != len(self.tasks):
      raise ValueError(f'config.input.task_weights has {len(self.task_weights)} entries '
                       f'for {len(self.tasks)} tasks')
    self.task_weights = tuple(self.task_weights) or (1.0,) * len(self.tasks)

  def _image(self, record, rng):
    if self.raw_pixels:
      return augment.stored_pixels(record['image'], self.image_size)
    return augment.model_image(record['image'], self.image_size, self.mean, self.std,
                               rng=rng, augment=self.augment if rng is not None else None)

  def _caption_pieces(self, record):
    """[bos] (context) + caption + eos (targets)."""
    tok = self.tokenizer
    pieces = [(tok.encode(caption_text(record)) + [tok.eos_id], True)]
    return pieces if tok.bos_id is None else [([tok.bos_id], False)] + pieces

  def _instruction(self, record, rng):
    """(task, prompt, prompt ids, answer ids + eos, think dropped?) fitting seq_len if
    it can."""
    tok = self.tokenizer
    task = instructions.sample_task(record, self.tasks, self.task_weights, rng)
    prompt, answer = instructions.make_example(record, task, rng)
    p, a = tok.prompt_ids(prompt), tok.encode(answer) + [tok.eos_id]
    if len(p) + len(a) <= self.seq_len or not answer.startswith('<think>'):
      return task, prompt, p, a, False
    prompt, answer = instructions.make_example({**record, 'rationale': ''}, task, rng)
    return task, prompt, tok.prompt_ids(prompt), tok.encode(answer) + [tok.eos_id], True


  def __call__(self, source: int, index: int, record, rng):
    ex = {'_source': np.int32(source), '_index': np.int32(index)}
    truncated = no_think = False
    fmt, tok = self.fmt, self.tokenizer
    if fmt != 'lm':
      ex['image'] = self._image(record, rng)
    if fmt == 'lm':
      r = rng if rng is not None else np.random.default_rng(index)
      if r.random() < self.lm_caption_fraction:
        pieces = self._caption_pieces(record)
      else:
        _, _, p, a, no_think = self._instruction(record, r)
        pieces = [(p + a, True)]
      tokens, mask, attn, truncated = assemble(pieces, self.seq_len, tok.pad_id)
      mask[0] = 0.0   # the first token is context only
      ex.update(tokens=tokens, loss_mask=mask, attention_mask=attn)
    elif fmt == 'align':
      tt = self.text_tokenizer
      body = tt.encode(caption_text(record)) + [tt.eos_id]
      ids, _, mask, truncated = assemble([([tt.cls_id] + body, True)], self.text_len, tt.pad_id)
      itg, _, _, _ = assemble([([tt.dec_id] + body, True)], self.text_len, tt.pad_id)
      ex.update(text_ids=ids, text_mask=mask, itg_ids=itg,
                expression=np.int32(record.get('expression', -1)),
                compound=np.int32(record.get('compound', -1)))
    elif fmt == 'generate':
      tokens, mask, attn, truncated = assemble(self._caption_pieces(record), self.seq_len,
                                               tok.pad_id)
      ex.update(tokens=tokens, loss_mask=mask, attention_mask=attn)
      prompt = CAPTION_PROMPT
    elif fmt == 'instruct':
      r = rng if rng is not None else np.random.default_rng(index)
      task, prompt, p, a, no_think = self._instruction(record, r)
      tokens, mask, attn, truncated = assemble([(p, False), (a, True)], self.seq_len, tok.pad_id)
      ex.update(tokens=tokens, loss_mask=mask, attention_mask=attn,
                task=np.int32(instructions.TASK_INDEX[task]), **label_arrays(record))
    else:  # eval
      ex.update(label_arrays(record))
    if self.qformer_prompt and fmt in QFORMER_PROMPTED:
      ids, mask, cut = qformer_text(self.text_tokenizer, prompt, self.text_len)
      ex.update(qformer_ids=ids, qformer_mask=mask)
      truncated = truncated or cut
    ex['_truncated'] = np.int32(truncated)
    ex['_no_think'] = np.int32(no_think)
    return ex


def example_spec(fmt: str, image_size: int, seq_len: int, text_len: int,
                 qformer_prompt: bool = False) -> dict:
  """{key: (shape, dtype)} of one example's device keys (no '_' metadata)."""
  if qformer_prompt and fmt in QFORMER_PROMPTED:
    return {**example_spec(fmt, image_size, seq_len, text_len),
            'qformer_ids': ((text_len,), np.int32), 'qformer_mask': ((text_len,), np.int32)}
  img = {'image': ((image_size, image_size, 3), np.float32)}
  toks = {'tokens': ((seq_len,), np.int32), 'loss_mask': ((seq_len,), np.float32),
          'attention_mask': ((seq_len,), np.int32)}
  if fmt == 'lm':
    return toks
  if fmt == 'align':
    return {**img, 'text_ids': ((text_len,), np.int32), 'text_mask': ((text_len,), np.int32),
            'itg_ids': ((text_len,), np.int32), 'expression': ((), np.int32),
            'compound': ((), np.int32)}
  if fmt == 'generate':
    return {**img, **toks}
  if fmt == 'instruct':
    return {**img, **toks, 'task': ((), np.int32), **label_spec()}
  if fmt == 'eval':
    return {**img, **label_spec()}
  raise ValueError(f'input format {fmt!r}; expected one of {FORMATS}')

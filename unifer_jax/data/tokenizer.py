"""Tokenizers: the demo's small byte-level BPE, and one loader for any HF tokenizer.

``train(texts, out_dir, vocab_size)`` writes a directory that
``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads offline (tokenizer.json +
tokenizer_config.json with the special tokens and a jinja chat template). Training is
deterministic: the same texts in the same order give the same files.

``load(dir)`` reads ANY Hugging Face tokenizer directory (ours, BERT WordPiece,
Llama/Qwen2 BPE, ...) into a small picklable :class:`Tokenizer` holding the Rust
``tokenizers.Tokenizer`` and the ids the pipelines need, so grain worker processes
never import transformers. Roles of the special tokens:

| role | ours | taken from a foreign tokenizer |
|---|---|---|
| pad | ``<pad>`` = 0 | pad_token, else eos |
| bos | ``<s>`` | bos_token, else none (Qwen2 has none) |
| eos | ``</s>`` (ends every target) | eos_token, else sep_token ([SEP]) |
| unk | ``<unk>`` (byte-level BPE never needs it) | unk_token or none |
| cls | ``[CLS]``: first token of Q-Former texts | cls_token, else ``[CLS]`` added |
| dec | ``[DEC]``: ITG's first token (BLIP-2) | ``[DEC]`` if present, else added |
| user / assistant | ``<|user|>``, ``<|assistant|>`` chat role markers | its chat template's |

A token that has to be added gets the next id (BERT: ``[DEC]`` = 30522, as BLIP-2's
Q-Former vocabulary of 30523); the model's vocabulary must cover it (the pipeline checks).
``<think> </think> <answer> </answer>`` are single, non-special tokens in ours (decoded as
text, so answers parse after ``skip_special_tokens``).

The chat template is rendered once with a placeholder into a (prefix, suffix) around the
user's message; a tokenizer without a template gets ``[bos] + message + "\\n"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Iterable

import numpy as np

SPECIAL_TOKENS = {'pad': '<pad>', 'bos': '<s>', 'eos': '</s>', 'unk': '<unk>',
                  'cls': '[CLS]', 'dec': '[DEC]', 'user': '<|user|>',
                  'assistant': '<|assistant|>'}
MARKUP = ('<think>', '</think>', '<answer>', '</answer>')
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_PLACEHOLDER = '\x00MESSAGE\x00'


@dataclasses.dataclass
class Tokenizer:
  """A tokenizers.Tokenizer plus the special-token ids the pipelines need (picklable)."""
  backend: object            # tokenizers.Tokenizer
  pad_id: int
  eos_id: int
  cls_id: int
  dec_id: int
  bos_id: int | None = None
  unk_id: int | None = None
  chat: tuple[str, str] | None = None   # (prefix, suffix) around the user message
  path: str = ''

  @property
  def vocab_size(self) -> int:
    """Number of ids in use (max id + 1), added tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no special tokens added (literal special-token text maps to its id)."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def prompt_text(self, message: str) -> str:
    """The user's message as the model sees it before the answer (chat template)."""
    if self.chat is None:
      bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else ''
      return f'{bos}{message}\n'
    return self.chat[0] + message + self.chat[1]

  def prompt_ids(self, message: str) -> list[int]:
    return self.encode(self.prompt_text(message))

  def token_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)


# ---- training ------------------------------------------------------------------------

def train(texts: Iterable[str], out_dir, vocab_size: int = 2048, min_frequency: int = 2,
          overwrite: bool = True) -> str:
  """Trains the byte-level BPE on `texts` and writes an HF tokenizer directory.

  `vocab_size` counts everything (specials, bytes, merges, markup); a templated corpus
  may stop short of it (min_frequency merges run out). Written atomically (a temporary
  directory renamed into place); with overwrite=False an existing tokenizer at
  `out_dir` (e.g. another process's) is kept.
  """
  from tokenizers import AddedToken, Tokenizer as RustTokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # pylint: disable=g-import-not-at-top
  floor = 256 + len(SPECIAL_TOKENS) + len(MARKUP)
  if vocab_size <= floor:
    raise ValueError(f'tokenizer vocab_size={vocab_size} must exceed {floor} '
                     f'(256 bytes + special and markup tokens)')
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError('tokenizer.train: no non-empty texts given')
  tok = RustTokenizer(models.BPE(unk_token=SPECIAL_TOKENS['unk']))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - len(MARKUP), min_frequency=min_frequency,
      special_tokens=list(SPECIAL_TOKENS.values()),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer, length=len(texts))
  tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in MARKUP])
  bos = SPECIAL_TOKENS['bos']
  # HF's tokenizer(text) then starts with <s> like Llama's; our own code adds specials
  # itself (add_special_tokens=False).
  tok.post_processor = processors.TemplateProcessing(
      single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tok.token_to_id(bos))])
  config = {
      'tokenizer_class': 'PreTrainedTokenizerFast',
      'bos_token': bos, 'eos_token': SPECIAL_TOKENS['eos'], 'unk_token': SPECIAL_TOKENS['unk'],
      'pad_token': SPECIAL_TOKENS['pad'], 'cls_token': SPECIAL_TOKENS['cls'],
      'extra_special_tokens': [SPECIAL_TOKENS[k] for k in ('dec', 'user', 'assistant')],
      'chat_template': CHAT_TEMPLATE,
      'model_max_length': 4096,
      'clean_up_tokenization_spaces': False,
      'padding_side': 'right',
  }
  out_dir = os.fspath(out_dir)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tokenizer-', dir=parent)
  try:
    tok.save(os.path.join(tmp, 'tokenizer.json'))
    with open(os.path.join(tmp, 'tokenizer_config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    if is_tokenizer_dir(out_dir) and not overwrite:
      return out_dir
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return out_dir


def corpus_texts(records: Iterable[dict], seed: int = 0) -> list[str]:
  """Training texts of a dataset: captions, rationales and one instruction prompt and
  answer per task each record supports, plus every template phrasing (so prompt
  words are in the vocabulary however rare). Deterministic in (records, seed)."""
  from unifer_jax.data import instructions  # pylint: disable=g-import-not-at-top
  texts = list(instructions.template_texts())
  for i, rec in enumerate(records):
    rng = np.random.default_rng([seed, i])
    for key in ('caption', 'rationale'):
      texts.append(instructions.text_field(rec, key))
    for task in instructions.available_tasks(rec):
      texts.extend(instructions.make_example(rec, task, rng))
  return texts


def train_for_datasets(names, out_dir, *, data_dir: str = '', split: str = 'train',
                       vocab_size: int = 2048, max_records: int = 20000, seed: int = 0,
                       overwrite: bool = True) -> str:
  """Trains the demo BPE on up to `max_records` records of each dataset's `split`."""
  from unifer_jax.data import sources  # pylint: disable=g-import-not-at-top
  records = []
  for name in names:
    src = sources.open_split(name, split, data_dir)
    records += [src[i] for i in range(min(len(src), max_records))]
  return train(corpus_texts(records, seed), out_dir, vocab_size, overwrite=overwrite)


# ---- loading -------------------------------------------------------------------------

def is_tokenizer_dir(path) -> bool:
  path = os.fspath(path)
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, f))
      for f in ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'tokenizer.model'))


def load(path) -> Tokenizer:
  """Any HF tokenizer directory -> Tokenizer (offline; adds [CLS]/[DEC] if missing)."""
  path = shown = str(path)
  if '://' in path:   # a workdir on object storage (gs://...): read from a local copy
    from unifer_jax import workdirs  # pylint: disable=g-import-not-at-top
    path = workdirs.local_copy(path)
  if not is_tokenizer_dir(path):
    raise FileNotFoundError(
        f'tokenizer {shown!r} is not a tokenizer directory (no tokenizer.json, '
        f'tokenizer_config.json, vocab.txt or tokenizer.model); train one with '
        f'unifer_jax.data.tokenizer.train_for_datasets or set config.input.tokenizer')
  from tokenizers import AddedToken, Tokenizer as RustTokenizer  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top  (slow import)
  hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
  if getattr(hf, 'backend_tokenizer', None) is None:
    raise ValueError(f'tokenizer {path!r} ({type(hf).__name__}) has no Rust backend '
                     f'(tokenizers library); convert it to a tokenizer.json first')
  backend = RustTokenizer.from_str(hf.backend_tokenizer.to_str())
  # Some tokenizer.json files switch padding/truncation on (MiniLM pads to 128); the
  # pipelines pad and truncate themselves.
  backend.no_padding()
  backend.no_truncation()

  def ensure(token: str) -> int:
    if backend.token_to_id(token) is None:
      backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return backend.token_to_id(token)

  eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
  if eos is None:
    raise ValueError(f'tokenizer {path!r} has neither an eos nor a sep token; the '
                     f'pipelines end every target with one')
  cls = hf.cls_token_id if hf.cls_token_id is not None else ensure(SPECIAL_TOKENS['cls'])
  dec = ensure(SPECIAL_TOKENS['dec'])
  chat = None
  if getattr(hf, 'chat_template', None):
    text = hf.apply_chat_template([{'role': 'user', 'content': _PLACEHOLDER}], tokenize=False,
                                  add_generation_prompt=True)
    if text.count(_PLACEHOLDER) != 1:
      raise ValueError(f'tokenizer {path!r}: its chat template does not insert the user '
                       f'message verbatim once; cannot split it into prefix and suffix')
    chat = tuple(text.split(_PLACEHOLDER))
  return Tokenizer(backend=backend, pad_id=hf.pad_token_id if hf.pad_token_id is not None else eos,
                   eos_id=eos, cls_id=cls, dec_id=dec, bos_id=hf.bos_token_id,
                   unk_id=hf.unk_token_id, chat=chat, path=path)

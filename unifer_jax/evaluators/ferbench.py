"""FERBench (UniFER, arXiv 2511.00389): the published item files, the UniFER-CoT rows,
and the reference label extraction, so the benchmark runs unchanged where the user
has the images.

Extraction (per subset, as the reference evaluation scripts do it):
  1. the first ``<answer>...</answer>`` span: the first candidate (in the file's order)
     that equals the answer text or is contained in it;
  2. else over the whole lower-cased response: the first candidate found as a whole
     word or as a substring;
  3. else the subset's synonym table, searched as substrings (table order);
  4. else 'unknown' (counted as wrong).
The subsets differ in small ways that change numbers, kept here on purpose: SFEW's
answer span is case-sensitive and may span lines; the others ignore case but stop at a
line break. The synonym tables differ per subset (README of /work/shared/ferbench).

Image paths in the item files are absolute under a dataset root
(``/RAF-DB/aligned/test_0001_aligned.jpg``); ``image_root`` is prepended and
``path_map`` rewrites prefixes (``{'/RAF-DB/aligned': '/data/raf/basic/Image/aligned'}``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

UNKNOWN = 'unknown'
ITEM_KEYS = ('image_path', 'true_label', 'prompt', 'candidate_labels')


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str
  synonyms: tuple          # ((label, (alternative, ...)), ...) in search order
  answer_flags: int = re.IGNORECASE   # flags of the <answer> regex


_RAF = (('anger', ('angry',)), ('disgust', ('revulsion', 'repulsion')),
        ('fear', ('terror', 'fright')), ('happiness', ('joy', 'happy')), ('sadness', ('sad',)),
        ('neutral', ('normal', 'calm', 'blank')), ('surprise', ('shock', 'astonishment')))
_AFFECTNET = ((('anger', ('angry', 'mad')), ('contempt', ('scorn', 'disdain')))
              + _RAF[1:4] + _RAF[4:])
_SHORT = (('disgust', ('revulsion', 'repulsion')), ('fear', ('terror', 'fright')),
          ('happy', ('joy', 'happiness')), ('sad', ('sorrow', 'unhappy')),
          ('neutral', ('normal', 'calm', 'blank')), ('surprise', ('shock', 'astonishment')))
_FERPLUS = (('angry', ('anger',)), ('contempt', ('scorn', 'disdain'))) + _SHORT
_SFEW = (('angry', ('anger', 'mad')),) + _SHORT

PROTOCOLS = {
    'rafdb': Protocol('rafdb', _RAF),
    'ferplus': Protocol('ferplus', _FERPLUS),
    'affectnet': Protocol('affectnet', _AFFECTNET),
    'sfew': Protocol('sfew', _SFEW, answer_flags=re.DOTALL),
}
# The published item files by name -> their protocol.
FILES = {'rafdb_qa.json': 'rafdb', 'ferplus_qa.json': 'ferplus',
         'affectnet_qa.json': 'affectnet', 'sfew_2.0_qa.json': 'sfew'}

# The fixed FERBench prompt (identical in all four files); {labels} = the candidates.
PROMPT = ('As an expert in facial expression recognition, which expression is most prominent '
          'in this image? Please select your answer from the following candidate labels: '
          '{labels}. Provide your detailed reasoning between the <think></think> tags, and '
          'then give your final answer between the <answer></answer> tags.')


def evals_config(image_root, items_dir, *, max_new_tokens: int = 128,
                 batch_size: int = 16) -> dict:
  """``config.evals`` entries ``ferbench_<subset>``: each published item file under the
  protocol (fixed prompt, greedy decoding). ``image_root`` / ``items_dir`` may be strings
  or ml_collections FieldReferences (then ``--config.`` overrides of them reach every
  entry)."""
  return {f'ferbench_{subset}': dict(
      type='generative', prompt='ferbench', batch_size=batch_size,
      decoding=dict(max_new_tokens=max_new_tokens, temperature=0.0),
      dataset=dict(type='ferbench', items=items_dir + f'/{file}', image_root=image_root))
      for file, subset in FILES.items()}


def protocol_for(path_or_name: str) -> Protocol:
  """The protocol of a published file name (``rafdb_qa.json``) or subset name; any other
  file gets RAF-DB's (the project's canonical nouns)."""
  key = os.path.basename(str(path_or_name))
  return PROTOCOLS.get(FILES.get(key, key), PROTOCOLS['rafdb'])


def extract_label(response: str, candidates, protocol: Protocol | str = 'rafdb') -> str:
  """The candidate a response names under the FERBench protocol, else 'unknown'."""
  if isinstance(protocol, str):
    protocol = PROTOCOLS[protocol]
  m = re.search(r'<answer>\s*(.*?)\s*</answer>', response, protocol.answer_flags)
  if m:
    answer = m.group(1).strip().lower()
    for label in candidates:
      if label.lower() == answer or label.lower() in answer:
        return label
  low = response.lower()
  for label in candidates:
    # A whole-word hit implies a substring hit; both are checked per candidate, so the
    # order of the candidates decides, not the position in the response.
    if re.search(r'\b' + re.escape(label.lower()) + r'\b', low) or label.lower() in low:
      return label
  for label, alternatives in protocol.synonyms:
    if any(alt in low for alt in alternatives):
      return label
  return UNKNOWN


# ---- readers -------------------------------------------------------------------------

@dataclasses.dataclass
class Item:
  image_path: str          # as written in the file
  image: str               # resolved on this machine
  true_label: str
  prompt: str
  candidates: list


def resolve(image_path: str, image_root: str = '', path_map: dict | None = None) -> str:
  for prefix, target in (path_map or {}).items():
    if image_path.startswith(prefix):
      return os.path.join(target, image_path[len(prefix):].lstrip('/'))
  return os.path.join(image_root, image_path.lstrip('/')) if image_root else image_path


def _load_rows(path: Path) -> list:
  text = path.read_text()
  if path.suffix == '.jsonl':
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{line_no}: not JSON ({e.msg})') from None
    return rows
  try:
    rows = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not JSON (line {e.lineno}: {e.msg})') from None
  if not isinstance(rows, list):
    raise ValueError(f'{path}: expected a JSON list of items, got {type(rows).__name__}')
  return rows


def read_items(path, image_root: str = '', path_map: dict | None = None) -> list[Item]:
  """FERBench items ``{image_path, true_label, prompt, candidate_labels}``."""
  path = Path(path)
  items = []
  for i, row in enumerate(_load_rows(path)):
    missing = [k for k in ITEM_KEYS if k not in row] if isinstance(row, dict) else list(ITEM_KEYS)
    if missing:
      raise ValueError(f'{path}: item {i} lacks {missing}; FERBench items have {list(ITEM_KEYS)}')
    cands = row['candidate_labels']
    if not isinstance(cands, list) or row['true_label'] not in cands:
      raise ValueError(f'{path}: item {i}: true_label {row["true_label"]!r} is not among '
                       f'candidate_labels {cands!r}')
    items.append(Item(row['image_path'], resolve(row['image_path'], image_root, path_map),
                      row['true_label'], row['prompt'], list(cands)))
  return items


_CANDIDATES = re.compile(r'candidate labels?\s*:\s*\[?([^\].\n]+)', re.IGNORECASE)


def read_cot_rows(path, image_root: str = '', path_map: dict | None = None,
                  candidates=None) -> list[Item]:
  """UniFER-CoT rows ``{image_path, question, response}`` (response ``<think>..</think>
  <answer>label</answer>``) as items; the candidates come from the question's
  'candidate labels: a, b, c' or from ``candidates``."""
  path = Path(path)
  items = []
  for i, row in enumerate(_load_rows(path)):
    missing = [k for k in ('image_path', 'question', 'response') if k not in row]
    if missing:
      raise ValueError(f'{path}: row {i} lacks {missing}; UniFER-CoT rows have '
                       f'image_path, question, response')
    m = _CANDIDATES.search(row['question'])
    cands = [c.strip() for c in m.group(1).split(',')] if m else list(candidates or [])
    if not cands:
      raise ValueError(f'{path}: row {i}: the question names no candidate labels; pass '
                       f'candidates=[...]')
    label = extract_label(row['response'], cands)
    if label == UNKNOWN:
      raise ValueError(f'{path}: row {i}: response {row["response"][-80:]!r} names none of '
                       f'{cands}')
    items.append(Item(row['image_path'], resolve(row['image_path'], image_root, path_map),
                      label, row['question'], cands))
  return items


def split_present(items: list[Item]) -> tuple[list[Item], list[Item]]:
  """(items whose image file exists, items whose image is missing)."""
  present, missing = [], []
  for it in items:
    (present if os.path.isfile(it.image) else missing).append(it)
  return present, missing


def missing_message(source, missing: list[Item], total: int, image_root: str = '') -> str:
  shown = ', '.join(m.image for m in missing[:3])
  where = f' under image_root {image_root!r}' if image_root else ' (no image_root set)'
  return (f'{source}: {len(missing)} of {total} images missing{where}, e.g. {shown}; '
          f'evaluating the {total - len(missing)} present (the full list goes to '
          f'NAME_missing_images.txt in the report folder). Set the dataset\'s image_root '
          f'(or path_map) to where you keep the images.')

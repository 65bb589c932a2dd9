"""Evaluation data from a dataset spec (a dict in ``config.evals``), one shape for all:
model-ready images, the candidate label words, and each item's true class.

| ``type`` | keys | what |
|---|---|---|
| ``tfds`` (default) | name, data_dir, split, limit, protocol, labels | a prepared dataset's split; its basic expression mapped onto the candidate words -- the protocol's, or any ``labels`` (open vocabulary: 'joyful', 'furious', ...) -- records whose label is not a candidate are left out |
| ``ferbench`` | items, image_root, path_map, limit, protocol | a published FERBench item file; items whose image is missing are listed and skipped |
| ``cot`` | rows, image_root, path_map, limit, candidates | UniFER-CoT rows, the label read from each response's ``<answer>`` |

``name`` / ``data_dir`` default to the model's training input. ``protocol`` names the
candidate words and their order (FERBench's four subsets); the default for an item
file is its subset's, for a tfds split RAF-DB's.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from unifer_jax.data import instructions, labels
from unifer_jax.evaluators import data as eval_data, ferbench

# FERBench candidate words per subset, in the files' order.
CANDIDATES = {
    'rafdb': ['surprise', 'fear', 'disgust', 'happiness', 'sadness', 'anger', 'neutral'],
    'ferplus': ['angry', 'contempt', 'disgust', 'fear', 'happy', 'neutral', 'sad', 'surprise'],
    'affectnet': ['neutral', 'happiness', 'sadness', 'surprise', 'fear', 'disgust', 'anger',
                  'contempt'],
    'sfew': ['angry', 'disgust', 'fear', 'happy', 'neutral', 'sad', 'surprise'],
}
# The subsets' short words -> the project's canonical BASIC names.
CANONICAL = {'angry': 'anger', 'happy': 'happiness', 'sad': 'sadness'}


def canonical(word: str) -> str:
  """The BASIC name a label word means: the subsets' short words, then every surface
  form the instructions use ('joyful' -> happiness); else the word itself."""
  w = word.strip().lower()
  if w in CANONICAL:
    return CANONICAL[w]
  for name, forms in instructions.SYNONYMS.items():
    if w in forms:
      return name
  return w


@dataclasses.dataclass
class EvalSet:
  name: str
  images: np.ndarray          # [N, H, W, 3] float, as the model was trained on
  classes: list               # candidate label words, in the protocol's order
  true: np.ndarray            # [N] index into classes
  protocol: ferbench.Protocol
  split: dict | None = None   # tfds only: every field of every record (instruct, retrieval)
  notes: list = dataclasses.field(default_factory=list)   # e.g. missing images
  missing: list = dataclasses.field(default_factory=list)  # resolved paths of absent images


_CACHE: dict = {}


def load(spec, model, name: str = '') -> EvalSet:
  """The EvalSet of ``spec`` preprocessed for ``model`` (cached per spec and image size)."""
  spec = dict(spec.to_dict() if hasattr(spec, 'to_dict') else spec)
  kind = spec.get('type', 'tfds')
  if kind not in _LOADERS:
    raise ValueError(f'dataset {name or spec}: type {kind!r}; expected one of {sorted(_LOADERS)}')
  key = (json.dumps(spec, sort_keys=True, default=str), model.image_size,
         json.dumps(model.input_cfg.to_dict(), sort_keys=True, default=str))
  if key not in _CACHE:
    if len(_CACHE) > 8:
      _CACHE.clear()
    _CACHE[key] = _LOADERS[kind](spec, model, name or spec.get('name') or kind)
  return _CACHE[key]


def _protocol_classes(spec, default: str):
  """(extraction protocol, candidate words): a subset's, or any words given as
  ``labels`` (open vocabulary: 'joyful', 'furious', ... each must name a basic label)."""
  proto = spec.get('protocol') or default
  if proto not in CANDIDATES:
    raise ValueError(f'dataset protocol {proto!r}; expected one of {sorted(CANDIDATES)}')
  words = list(spec.get('labels') or CANDIDATES[proto])
  unknown = [w for w in words if canonical(w) not in labels.BASIC]
  if unknown:
    raise ValueError(f'dataset labels {unknown} name no basic expression (known words: '
                     f'{sorted(f for forms in instructions.SYNONYMS.values() for f in forms)})')
  return ferbench.PROTOCOLS[proto], words


def _from_tfds(spec, model, name) -> EvalSet:
  cfg = model.input_cfg.copy_and_resolve_references()
  cfg.name = spec.get('name') or cfg.name
  cfg.data_dir = spec.get('data_dir', cfg.data_dir) or cfg.data_dir
  split = eval_data.load_split(cfg, spec.get('split', 'test'), model.image_size,
                               limit=int(spec.get('limit', 0)))
  protocol, classes = _protocol_classes(spec, 'rafdb')
  index = {canonical(c): i for i, c in enumerate(classes)}
  true = np.array([index.get(labels.BASIC[e], -1) if e >= 0 else -1
                   for e in split['expression']], np.int64)
  keep = true >= 0
  notes = []
  if (~keep).any():
    notes.append(f'{int((~keep).sum())} of {len(keep)} records have no basic label among '
                 f'the {protocol.name} candidates; left out of the label metrics')
  return EvalSet(name, split['image'][keep], classes, true[keep], protocol, split, notes)


def read_image(path: str, size: int) -> np.ndarray:
  """uint8 [size, size, 3] of an image file (FERBench images are aligned face crops)."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB').resize((size, size), Image.BILINEAR))
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f'{path}: not a readable image ({type(e).__name__})') from None


def _from_items(items, spec, model, name, source, protocol) -> EvalSet:
  present, missing = ferbench.split_present(items)
  root = spec.get('image_root', '')
  if not present:
    shown = ', '.join(m.image for m in missing[:3])
    raise FileNotFoundError(
        f'{source}: none of its {len(items)} images found ' +
        (f'under image_root {root!r}' if root else '(no image_root set)') +
        f', e.g. {shown}; set the dataset\'s image_root (or path_map) to where you keep them')
  notes = []
  if missing:
    notes.append(ferbench.missing_message(source, missing, len(items), root))
    print(notes[-1], flush=True)
  limit = int(spec.get('limit', 0))
  present = present[:limit] if limit else present
  classes = present[0].candidates
  odd = [i for i, it in enumerate(present) if it.candidates != classes]
  if odd:
    raise ValueError(f'{source}: items {odd[:5]} list other candidates than item 0 '
                     f'({classes}); one evaluation needs one label set')
  images = np.stack([read_image(it.image, model.image_size) for it in present])
  true = np.array([classes.index(it.true_label) for it in present], np.int64)
  return EvalSet(name, model.normalise(images), list(classes), true, protocol, None, notes,
                 [m.image for m in missing])


def _from_ferbench(spec, model, name) -> EvalSet:
  path = spec.get('items')
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'dataset {name}: FERBench item file {path!r} not found')
  items = ferbench.read_items(path, spec.get('image_root', ''), spec.get('path_map') or None)
  protocol = (ferbench.PROTOCOLS[spec['protocol']] if spec.get('protocol')
              else ferbench.protocol_for(path))
  return _from_items(items, spec, model, name, path, protocol)


def _from_cot(spec, model, name) -> EvalSet:
  path = spec.get('rows')
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'dataset {name}: UniFER-CoT rows file {path!r} not found')
  items = ferbench.read_cot_rows(path, spec.get('image_root', ''), spec.get('path_map') or None,
                                 spec.get('candidates'))
  protocol = ferbench.PROTOCOLS[spec.get('protocol') or 'rafdb']
  return _from_items(items, spec, model, name, path, protocol)


_LOADERS = {'tfds': _from_tfds, 'ferbench': _from_ferbench, 'cot': _from_cot}


def write_ferbench_items(split: dict, out_dir, protocol: str = 'rafdb', limit: int = 0,
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> str:
  """Writes an eval split as a FERBench-format item file + PNGs under out_dir (so the
  reader path runs on the built-in corpus); returns the item file's path."""
  os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
  classes = CANDIDATES[protocol]
  index = {canonical(c): c for c in classes}
  rows = []
  for i, (img, e) in enumerate(zip(split['image'], split['expression'])):
    word = index.get(labels.BASIC[e]) if e >= 0 else None
    if word is None:
      continue
    pixels = np.clip((img * np.asarray(std) + np.asarray(mean)) * 255 + 0.5, 0, 255)
    rel = f'/images/{i:05d}.png'
    Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(out_dir, rel.lstrip('/')))
    rows.append({'image_path': rel, 'true_label': word,
                 'prompt': ferbench.PROMPT.format(labels=', '.join(classes)),
                 'candidate_labels': list(classes)})
    if limit and len(rows) >= limit:
      break
  path = os.path.join(out_dir, f'{protocol}_qa.json')
  with open(path, 'w') as f:
    json.dump(rows, f, indent=1)
  return path

"""Held-out clips (issue 34 item 3): the clip model's answer per clip, against the
single-image model's majority vote over the same frames.

  config.evals.video = dict(type='video', dataset=dict(split='test'), max_items=300,
                            frame_model='', batch_size=32)

For each clip with a basic label (in split order, up to ``max_items``) the clip model
(a ``model.video`` UniFER, models/video.py) is asked the instruct ``basic`` task the
way training asks it (``instruct.answers``: the training prompt, greedy decoding), and
its answer is read under the FERBench extraction (``ferbench.extract_label`` over
``labels.BASIC``, unknown = wrong) -- as ``instruct.ferbench_scores`` scores stills.
The baseline: the image model in ``frame_model`` (a workdir; '' = the clip model's
``config.init.checkpoint``, the instruct checkpoint it started from; 'none' = skip)
answers the same question for each of the clip's T frames (the frames the clip model
reads), and the clip's label is the majority of the labels its frames name (frames
answering none left out; a tie goes to the label named first in time).

Reports ``video_clip_acc`` and ``video_frame_vote_acc`` over all scored clips, the same
on the clips whose record marks ``low_intensity`` in its nuisance JSON (apex intensity
< 0.35 in synthetic_clips: the clips where time matters) as ``..._low_intensity``, and
``video_n`` / ``video_low_intensity_n``. Answers go to ``out_dir/NAME_answers.json``.
The frame vote of one frame model on one split is computed once per process (cached by
its workdir: in-training evals at several steps pay for it once).
"""

from __future__ import annotations

import collections
import json

import numpy as np

from unifer_jax.data import clips, labels, sources
from unifer_jax.evaluators import ferbench, instruct

_VOTES: dict = {}   # (frame model, step, split spec, T, S) -> per-clip vote labels


def load_clips(spec: dict, model, frames: int, max_items: int) -> dict:
  """uint8 frames [N, T, S, S, 3], ``expression`` [N], ``low_intensity`` [N] (NaN where a
  record has no such nuisance), ``index`` [N] of the split's clips with a basic label."""
  cfg = model.input_cfg
  name = spec.get('name') or cfg.name
  src = sources.open_split(name, spec.get('split', 'test'), spec.get('data_dir') or cfg.data_dir)
  maker = clips.ClipMaker(fmt='eval', image_size=model.image_size, frames=frames,
                          raw_pixels=True, datasets=(name,))
  out = collections.defaultdict(list)
  for i in range(len(src)):
    rec = src[i]
    if int(rec['expression']) < 0:
      continue
    out['frames'].append(maker(0, i, rec, None)['frames'])
    out['expression'].append(int(rec['expression']))
    out['low_intensity'].append(_low_intensity(rec['nuisance']))
    out['index'].append(i)
    if len(out['index']) >= max_items:
      break
  if not out['index']:
    raise ValueError(f'dataset {name!r} split {spec.get("split", "test")!r}: no clip with a '
                     f'basic expression label to score')
  return {k: np.stack(v) if k == 'frames' else np.asarray(v) for k, v in out.items()}


def _low_intensity(nuisance) -> float:
  text = nuisance.decode() if isinstance(nuisance, bytes) else str(nuisance)
  try:
    value = json.loads(text).get('low_intensity') if text else None
  except (ValueError, AttributeError):
    value = None
  return float('nan') if value is None else float(bool(value))


def said_labels(texts) -> list[str]:
  """The BASIC label each answer names under the FERBench extraction ('unknown' else)."""
  return [ferbench.extract_label(t, labels.BASIC) for t in texts]


def majority(votes) -> str:
  """The most common named label ('unknown' left out; ties: the first named)."""
  named = [v for v in votes if v != 'unknown']
  if not named:
    return 'unknown'
  counts = collections.Counter(named)
  top = max(counts.values())
  return next(v for v in named if counts[v] == top)


def frame_votes(frame_model, data: dict, batch_size: int) -> list[str]:
  """The image model's label per frame, voted per clip."""
  n, t = data['frames'].shape[:2]
  stills = frame_model.normalise(data['frames'].reshape(n * t, *data['frames'].shape[2:]))
  texts = instruct.answers(frame_model.graphdef, frame_model.params, stills, 'basic',
                           frame_model.tokenizer, batch_size,
                           frame_model.qformer_text if frame_model.instruction_aware else None)
  said = np.asarray(said_labels(texts)).reshape(n, t)
  return [majority(row) for row in said]


def scores(pred: list[str], data: dict) -> tuple[float, float]:
  """(accuracy over all clips, over the low-intensity ones; NaN where there are none)."""
  right = np.asarray([p == labels.BASIC[e] for p, e in zip(pred, data['expression'])])
  low = data['low_intensity'] == 1
  return float(right.mean()), float(right[low].mean()) if low.any() else float('nan')


class VideoClips:
  """``config.evals.NAME = dict(type='video', ...)`` (module docstring)."""

  def __init__(self, name: str, cfg: dict):
    self.name, self.cfg = name, cfg

  def run(self, model, out_dir) -> dict:
    from unifer_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    video = state_lib.model_config(model.config).get('video')
    if not video:
      raise ValueError(f'evals.{self.name}: the model reads single images (no model.video); '
                       f'the video evaluator scores a clip model')
    spec = dict(self.cfg['dataset'])
    if spec.get('type', 'tfds') != 'tfds':
      raise ValueError(f'evals.{self.name}: clips come from a tfds clip dataset, got type '
                       f'{spec.get("type")!r}')
    t, batch = int(video.frames), int(self.cfg.get('batch_size', 32))
    data = load_clips(spec, model, t, int(self.cfg.get('max_items', 300)))
    texts = instruct.answers(model.graphdef, model.params, model.normalise(data['frames']),
                             'basic', model.tokenizer, batch,
                             model.qformer_text if model.instruction_aware else None, clips=True)
    pred = said_labels(texts)
    acc, low_acc = scores(pred, data)
    out = {'video_clip_acc': acc, 'video_clip_acc_low_intensity': low_acc,
           'video_clip_parsed': float(np.mean([p != 'unknown' for p in pred])),
           'video_n': len(pred), 'video_low_intensity_n': int((data['low_intensity'] == 1).sum())}
    votes = self._frame_votes(model, spec, data, t, batch)
    if votes is not None:
      out['video_frame_vote_acc'], out['video_frame_vote_acc_low_intensity'] = scores(votes, data)
    if out_dir is not None:
      rows = [dict(index=int(i), true=labels.BASIC[e], low_intensity=float(l), answer=a,
                   said=p, **({'frame_vote': votes[k]} if votes is not None else {}))
              for k, (i, e, l, a, p) in enumerate(zip(data['index'], data['expression'],
                                                      data['low_intensity'], texts, pred))]
      with open(f'{out_dir}/{self.name}_answers.json', 'w') as f:
        json.dump(rows, f, indent=1)
    return out

  def _frame_votes(self, model, spec, data, t, batch):
    from unifer_jax.evaluators import model_io  # pylint: disable=g-import-not-at-top
    path = self.cfg.get('frame_model', '') or model.config.init.get('checkpoint', '')
    if not path or path == 'none':
      return None
    key = (str(path), json.dumps(spec, sort_keys=True, default=str), t, model.image_size,
           tuple(int(i) for i in data['index']))
    if key not in _VOTES:
      frame_model = model_io.load(path)
      if frame_model.image_size != model.image_size:
        raise ValueError(f'evals.{self.name}.frame_model={path}: reads {frame_model.image_size} '
                         f'px images, the clip model {model.image_size} px')
      _VOTES[key] = frame_votes(frame_model, data, batch)
    return _VOTES[key]

"""`unifer predict --model DIR IMAGE...`: what each face in the user's images shows
(a video file -- .mp4, .avi, .mkv, .mov, .webm, .y4m -- gets a per-frame timeline and a
clip label instead: predict_video.py).

Faces are found with data/faces.py (the same detector and square crop the dataset
builders use), cropped, and each crop is asked every FER task. Per face (JSON):

| field | full model (a training workdir) | how |
|---|---|---|
| label_probabilities | {basic label: p} | the LLM's likelihood of each label answer to the 'basic' instruction, normalised over the 8 labels (the distillation teacher's distribution) |
| label | the most probable basic label | |
| zero_shot_probabilities | {basic label: p} | ITC scores of the Q-Former against a prompt ensemble, softmax at the learned temperature |
| answer_label | the label the LLM names when asked | 'basic' instruction, greedy |
| compound | the most likely of the 11 compounds, their probabilities, and the one the LLM names when asked | likelihood as above; 'compound' instruction |
| intensity | 0..1 or null | 'intensity' instruction |
| valence, arousal | -1..1 or null | 'valence_arousal' instruction |
| rationale | {'action_units': [...], 'text': answer} | 'rationale' instruction |
| uncertainty | entropy (0..1, normalised) and top-2 margin of label_probabilities, and the two labels the model states with their shares | 'uncertainty' instruction |

Generated fields carry the raw answer next to the parsed value; a value the answer
does not give is null (an untrained model gives few). With an exported student
(``unifer_jax.export``) the fields it has no head for are reported as absent, with the
reason. `--model` takes a training workdir, an export or the workdir `unifer demo`
wrote (model_dirs.py; `--backend auto` prefers its student, which needs no JAX). A file that is not an image, or an image with no face, gets a one-line message
on stderr and exit status 1 (the other images are still reported).
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from unifer_jax import model_dirs
from unifer_jax.data import faces, instructions, labels

TASKS = ('basic', 'compound', 'intensity', 'valence_arousal', 'rationale', 'uncertainty')
MAX_NEW = 64   # new tokens per answer (the rationale is the longest)
TEMPLATES = ('a {} face.', 'a face showing {}.', 'a photo of a person with a {} expression.',
             'the facial expression is {}.')
CROP_PX = 160   # crops shown in the report


class PredictError(Exception):
  """One input that cannot be predicted (a one-line reason, no traceback)."""


def read_image(path: str) -> np.ndarray:
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except FileNotFoundError:
    raise PredictError(f'{path}: no such file') from None
  except (UnidentifiedImageError, OSError) as e:
    raise PredictError(f'{path}: not an image ({type(e).__name__}: '
                       f'{str(e).splitlines()[0][:100]})') from None


def find_faces(path: str) -> tuple[np.ndarray, list]:
  image = read_image(path)
  boxes = faces.distinct(faces.detect(image))
  if not boxes:
    raise PredictError(f'{path}: no face found (the frontal-face detector needs a face '
                       f'of at least ~{24 * max(1, max(image.shape[:2]) // 320)} px)')
  return image, boxes


# ---- the full model -------------------------------------------------------------------

class FullModel:
  """A training workdir: zero-shot label probabilities + generated answers."""

  kind = 'full model'

  def __init__(self, workdir: str, step: int | None = None):
    from unifer_jax.evaluators import model_io  # pylint: disable=g-import-not-at-top
    self.model = model_io.load(workdir, step)
    texts = [t.format(n) for n in labels.BASIC for t in TEMPLATES]
    feats = self.model.text_features(texts).reshape(len(labels.BASIC), len(TEMPLATES), -1)
    cls = feats.mean(1)
    self.class_feats = cls / np.linalg.norm(cls, axis=-1, keepdims=True)

  @property
  def image_size(self) -> int:
    return self.model.image_size

  label_source = ('likelihood of each basic label answer under the LLM, normalised over '
                  'the 8 labels')

  def label_probabilities(self, crops_uint8: np.ndarray) -> np.ndarray:
    """[N, 8]: the LLM's own distribution over the label answers (the distillation
    teacher's)."""
    from unifer_jax.evaluators import label_likelihood  # pylint: disable=g-import-not-at-top
    x = self.model.normalise(crops_uint8)
    return np.exp(label_likelihood.log_probs(self.model, x, ('basic',))['basic'])

  def __call__(self, crops_uint8: np.ndarray) -> list[dict]:
    from unifer_jax.evaluators import label_likelihood  # pylint: disable=g-import-not-at-top
    m = self.model
    x = m.normalise(crops_uint8)
    logits = np.einsum('nqe,ce->ncq', m.image_features(x), self.class_feats).max(-1)
    z = logits / m.temperature()
    itc = np.exp(z - z.max(-1, keepdims=True))
    itc /= itc.sum(-1, keepdims=True)
    probs = self.label_probabilities(crops_uint8)
    compound = np.exp(label_likelihood.log_probs(m, x, ('compound',))['compound'])
    # Every task of every face in one padded batch: one compiled generation, not six.
    n = len(x)
    flat = m.generate(np.repeat(x, len(TASKS), axis=0),
                      [instructions.prompt_for(t, think=False) for _ in range(n) for t in TASKS],
                      max_new_tokens=MAX_NEW, batch_size=n * len(TASKS))
    answers = {t: flat[k::len(TASKS)] for k, t in enumerate(TASKS)}
    out = []
    for i, p in enumerate(probs):
      a = {t: answers[t][i] for t in TASKS}
      parsed = {t: instructions.parse_answer(t, a[t]) for t in TASKS}
      top = np.argsort(-p)
      entropy = float(-(p * np.log(np.maximum(p, 1e-12))).sum() / np.log(len(p)))
      va = parsed['valence_arousal']
      out.append({
          'label_probabilities': {n: float(v) for n, v in zip(labels.BASIC, p)},
          'label': labels.BASIC[int(top[0])],
          'label_source': self.label_source,
          'zero_shot_probabilities': {n: float(v) for n, v in zip(labels.BASIC, itc[i])},
          'answer_label': {'value': None if parsed['basic'] is None else labels.BASIC[parsed['basic']],
                           'answer': a['basic']},
          'compound': {'value': labels.COMPOUND[int(compound[i].argmax())],
                       'probabilities': {n: float(v) for n, v in zip(labels.COMPOUND, compound[i])},
                       'answered': None if parsed['compound'] is None
                       else labels.COMPOUND[parsed['compound']], 'answer': a['compound']},
          'intensity': {'value': parsed['intensity'], 'answer': a['intensity']},
          'valence': {'value': None if va is None else va[0], 'answer': a['valence_arousal']},
          'arousal': {'value': None if va is None else va[1], 'answer': a['valence_arousal']},
          'rationale': {'action_units': None if parsed['rationale'] is None
                        else [f'AU{u} {labels.AUS[u]}' for u in parsed['rationale']],
                        'text': instructions.answer_span(a['rationale'])},
          'uncertainty': {'entropy': entropy, 'margin': float(p[top[0]] - p[top[1]]),
                          'stated': None if parsed['uncertainty'] is None else
                          {labels.BASIC[k]: v for k, v in parsed['uncertainty']},
                          'answer': a['uncertainty']},
      })
    return out


class ExportedStudent:
  """A `unifer export --format onnx` directory (meta.json + ONNX): the distilled
  student run by onnxruntime (export/standalone.py). It has heads for the basic and
  compound labels, intensity and valence/arousal; what only the LLM gives is reported
  as absent, with the reason."""

  kind = 'exported student'
  NO_DECODER = 'the exported student has no text decoder'
  label_source = 'the exported student: softmax of its basic-expression head'

  def __init__(self, export_dir: str):
    from unifer_jax import export  # pylint: disable=g-import-not-at-top
    self.predictor = export.load(export_dir)
    self.image_size = int(self.predictor.image_size)

  def __call__(self, crops_uint8: np.ndarray) -> list[dict]:
    out = []
    for r in self.predictor(crops_uint8):
      p = np.asarray(list(r['basic'].values()))
      top = np.sort(p)[::-1]
      out.append({
          'label_probabilities': r['basic'], 'label': r['label'],
          'label_source': self.label_source,
          'zero_shot_probabilities': {'absent': 'the exported student has no text tower'},
          'answer_label': {'value': None, 'absent': self.NO_DECODER},
          'compound': {'value': r['compound'], 'probabilities': r['compound_probabilities']},
          'intensity': {'value': r['intensity']},
          'valence': {'value': r['valence']}, 'arousal': {'value': r['arousal']},
          'rationale': {'action_units': None, 'absent': self.NO_DECODER},
          'uncertainty': {'entropy': float(-(p * np.log(np.maximum(p, 1e-12))).sum() / np.log(len(p))),
                          'margin': float(top[0] - top[1]),
                          'stated': {'absent': self.NO_DECODER}},
      })
    return out

  def label_probabilities(self, crops_uint8: np.ndarray) -> np.ndarray:
    return np.asarray([[r['basic'][n] for n in labels.BASIC]
                       for r in self.predictor(crops_uint8)])


def load_model(path: str, step: int | None = None, backend: str = 'auto'):
  """The model in ``path`` (model_dirs.find: an export, a training workdir or the demo's
  workdir); ``backend`` 'auto' takes the student when there is one."""
  try:
    kind, where = model_dirs.choose(model_dirs.find(path), backend)
  except model_dirs.ModelDirError as e:
    raise PredictError(str(e)) from None
  return ExportedStudent(str(where)) if kind == 'student' else FullModel(str(where), step)


# ---- driver ---------------------------------------------------------------------------

def predict(model, image_paths, report_dir: Path | None = None) -> tuple[list, list]:
  """(one record per image with its faces, error lines)."""
  from unifer_jax import predict_video  # pylint: disable=g-import-not-at-top
  records, errors = [], []
  for path in image_paths:
    if predict_video.is_video(path):
      try:
        records.append(predict_video.predict_video(model, path, report_dir))
      except PredictError as e:
        errors.append(str(e))
      continue
    try:
      image, boxes = find_faces(path)
    except PredictError as e:
      errors.append(str(e))
      continue
    size = model.image_size
    crops = np.stack([faces.crop(image, b, size=size) for b in boxes])
    results = model(crops)
    rec = {'image': str(path), 'model': model.kind, 'faces': []}
    for k, (box, res) in enumerate(zip(boxes, results)):
      face = {'box': [round(float(v), 1) for v in box], **res}
      if report_dir is not None:
        name = f'{Path(path).stem}_face{k}.png'
        Image.fromarray(faces.crop(image, box, size=CROP_PX)).save(report_dir / name)
        face['crop'] = name
      rec['faces'].append(face)
    records.append(rec)
  return records, errors


def _value(v):
  if isinstance(v, dict):
    if 'absent' in v:
      return f'absent ({v["absent"]})'
    v = v.get('value', v.get('action_units'))
  if isinstance(v, float):
    return f'{v:.2f}'
  return 'not given' if v is None else html.escape(str(v))


def write_report(records: list, errors: list, out_dir: Path) -> Path:
  rows = ['<html><head><meta charset="utf-8"><title>unifer predict</title></head><body>',
          '<h1>unifer predict</h1>']
  for e in errors:
    rows.append(f'<p><b>skipped</b>: {html.escape(e)}</p>')
  for rec in records:
    if 'video' in rec:
      top = sorted(rec['probabilities'].items(), key=lambda kv: -kv[1])[:3]
      rows.append(f'<h2>{html.escape(rec["video"])} ({rec["model"]})</h2>'
                  f'<p>clip label: <b>{html.escape(rec["label"])}</b> '
                  f'({", ".join(f"{n} {p:.2f}" for n, p in top)}; {rec["frames"]} frames over '
                  f'{rec["duration_s"]:.1f} s)</p><img src="{rec.get("timeline", "")}">')
      continue
    rows.append(f'<h2>{html.escape(rec["image"])} ({rec["model"]})</h2>')
    for face in rec['faces']:
      probs = face.get('label_probabilities') or {}
      top = sorted(probs.items(), key=lambda kv: -kv[1])[:3]
      cells = [f'label: <b>{html.escape(str(face.get("label")))}</b> '
               f'({", ".join(f"{n} {p:.2f}" for n, p in top)})']
      for key in ('answer_label', 'compound', 'intensity', 'valence', 'arousal', 'rationale'):
        cells.append(f'{key}: {_value(face.get(key))}')
      unc = face.get('uncertainty') or {}
      if 'entropy' in unc:
        cells.append(f'uncertainty: entropy {unc["entropy"]:.2f}, margin {unc["margin"]:.2f}')
      rows.append(f'<table><tr><td><img src="{face.get("crop", "")}" width="{CROP_PX}"></td>'
                  f'<td>{"<br>".join(cells)}</td></tr></table>')
  rows.append('</body></html>')
  path = out_dir / 'predict.html'
  path.write_text('\n'.join(rows))
  return path


def main(args) -> int:
  try:
    model = load_model(args.model, args.step, getattr(args, 'backend', 'auto'))
  except (PredictError, FileNotFoundError, ValueError) as e:
    print(f'unifer predict: {e}', file=sys.stderr)
    return 2
  except ImportError as e:
    print(f'unifer predict: {args.model}: {e} (an exported student needs onnxruntime: '
          f'pip install -e ".[export]")', file=sys.stderr)
    return 2
  report_dir = Path(args.report) if args.report else None
  if report_dir is not None:
    report_dir.mkdir(parents=True, exist_ok=True)
  records, errors = predict(model, args.images, report_dir)
  for e in errors:
    print(f'unifer predict: {e}', file=sys.stderr)
  text = json.dumps(records, indent=1)
  if args.out:
    Path(args.out).write_text(text)
  else:
    print(text)
  if report_dir is not None:
    print(f'unifer predict: report {write_report(records, errors, report_dir)}', file=sys.stderr)
  return 1 if errors else 0

"""Faces in an image -> the API's answer, with either back end.

The back ends are `unifer predict`'s (predict.py): the exported student (onnxruntime,
no JAX: the 4 GB machine's path) and the full model (a training workdir, JAX; adds the
generated answers: rationale with its action units, the stated uncertainty). Both give
predict's per-face record, which ``api_face`` reshapes into the page's:

  {"box": [x0, y0, x1, y1],            # pixels of the upright image as uploaded
   "label": "happiness", "basic": {label: p, ... 8 labels},
   "compound": {"label": "happily surprised", "probabilities": {... 11}},
   "intensity": 0..1 | null, "valence": -1..1 | null, "arousal": -1..1 | null,
   "rationale": {"action_units": ["AU6 cheek raiser", ...], "text": "..."} | null,
   "uncertainty": {"entropy": 0..1, "margin": 0..1, "stated": {label: share} | null},
   "absent": {field: why} }            # what this back end cannot give, and why

``Backend.load(model_dir, backend)`` resolves the directory like `unifer predict`
(model_dirs.py); ``analyze(...)`` runs detection (or a stream's tracker) and the model.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np

from unifer_jax import model_dirs
from unifer_jax.data import faces


class NoFace(Exception):
  """An uploaded image in which the detector finds no face."""


def _value(field):
  v = field.get('value') if isinstance(field, dict) else field
  return round(float(v), 5) if isinstance(v, (int, float)) else v


def api_face(box, rec: dict) -> dict:
  """predict's per-face record -> the API's (module docstring)."""
  absent = {}
  for key in ('rationale', 'answer_label', 'zero_shot_probabilities'):
    if isinstance(rec.get(key), dict) and 'absent' in rec[key]:
      absent[key] = rec[key]['absent']
  compound = rec.get('compound') or {}
  rationale = rec.get('rationale') or {}
  unc = rec.get('uncertainty') or {}
  stated = unc.get('stated')
  if isinstance(stated, dict) and 'absent' in stated:
    absent['stated_uncertainty'] = stated['absent']
    stated = None
  out = {
      'box': [round(float(v), 1) for v in box],
      'label': rec['label'],
      'basic': {k: round(float(v), 5) for k, v in rec['label_probabilities'].items()},
      'compound': {'label': compound.get('value'),
                   'probabilities': {k: round(float(v), 5) for k, v in
                                     (compound.get('probabilities') or {}).items()}},
      'intensity': _value(rec.get('intensity')),
      'valence': _value(rec.get('valence')),
      'arousal': _value(rec.get('arousal')),
      'rationale': None if 'absent' in rationale else
                   {'action_units': rationale.get('action_units'), 'text': rationale.get('text')},
      'uncertainty': {'entropy': round(float(unc['entropy']), 5),
                      'margin': round(float(unc['margin']), 5), 'stated': stated},
  }
  if 'answer' in (rec.get('intensity') or {}):   # the full model's raw answers
    out['answers'] = {k: rec[k]['answer'] for k in ('answer_label', 'compound', 'intensity',
                                                    'valence', 'uncertainty')
                      if isinstance(rec.get(k), dict) and 'answer' in rec[k]}
  if 'zero_shot_probabilities' not in absent and 'zero_shot_probabilities' in rec:
    out['zero_shot'] = rec['zero_shot_probabilities']
  if absent:
    out['absent'] = absent
  return out


@dataclasses.dataclass
class Backend:
  kind: str           # 'student' | 'full'
  path: Path
  model: object       # predict.ExportedStudent | predict.FullModel
  # JAX generation is not re-entrant across threads for one model object; onnxruntime is.
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

  @classmethod
  def load(cls, model_dir, backend: str = 'auto', step: int | None = None) -> 'Backend':
    from unifer_jax import predict  # pylint: disable=g-import-not-at-top
    kind, where = model_dirs.choose(model_dirs.find(model_dir), backend)
    model = (predict.ExportedStudent(str(where)) if kind == 'student'
             else predict.FullModel(str(where), step))
    return cls(kind, Path(where).absolute(), model)

  def describe(self) -> dict:
    return {'backend': self.kind, 'kind': self.model.kind, 'path': str(self.path),
            'image_size': int(self.model.image_size),
            'gives': ['basic', 'compound', 'intensity', 'valence', 'arousal', 'uncertainty']
                     + (['rationale'] if self.kind == 'full' else [])}

  def run(self, crops: np.ndarray) -> list[dict]:
    if self.kind == 'student':
      return self.model(crops)
    with self.lock:
      return self.model(crops)


def analyze(image: np.ndarray, full_size: tuple, backend: Backend, *, max_faces: int = 16,
            tracker=None) -> dict:
  """The API answer for one image (``image`` may be a downscaled copy of one whose
  upright size is ``full_size``; boxes are given in full-size pixels). Without a
  tracker a faceless image raises NoFace; a stream's frame may have no faces."""
  h, w = image.shape[:2]
  if tracker is None:
    boxes, ids = faces.distinct(faces.detect(image))[:max_faces], None
    if not boxes:
      raise NoFace('no face found (the frontal-face detector needs an upright, frontal face '
                   f'of at least ~{24 * max(1, max(h, w) // 320)} px)')
  else:
    tracks = tracker.update(image)[:max_faces]
    boxes, ids = [t.box for t in tracks], [t.id for t in tracks]
  answer = {'width': int(full_size[0]), 'height': int(full_size[1]), 'faces': []}
  if not boxes:
    return answer
  size = int(backend.model.image_size)
  results = backend.run(np.stack([faces.crop(image, b, size=size) for b in boxes]))
  k = full_size[0] / w
  for i, (box, rec) in enumerate(zip(boxes, results)):
    face = api_face([v * k for v in box], rec)
    if ids is not None:
      face['track'] = ids[i]
    answer['faces'].append(face)
  return answer

"""The trained student as one pure function, the thing every export format carries.

``load(workdir)`` reads a distill workdir (``config.json`` + newest checkpoint, params
only -- the teacher is not needed). ``predict_fn(student)`` maps normalised NHWC f32
images to the deployable outputs (probabilities, not logits, so every runtime returns
what a user reads):

  basic     [B, 8]   softmax over labels.BASIC
  compound  [B, 11]  softmax over labels.COMPOUND
  intensity [B]      in [0, 1]
  va        [B, 2]   valence, arousal in [-1, 1]

``meta(student)`` is what a runtime needs around it: label names, image size,
preprocessing (centre square crop, bilinear resize, /255, (x - mean) / std, RGB NHWC),
output names -- written as ``meta.json`` next to every export.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from unifer_jax import workdirs
from unifer_jax.data import labels
from unifer_jax.models import presets
from unifer_jax.train import optim, param_restore, state as state_lib

OUTPUTS = ('basic', 'compound', 'intensity', 'va')


@dataclasses.dataclass
class TrainedStudent:
  workdir: Path
  step: int
  model_cfg: ml_collections.ConfigDict
  input_cfg: ml_collections.ConfigDict
  graphdef: Any
  params: Any

  @property
  def image_size(self) -> int:
    return int(presets.vision_config(self.model_cfg).image_size)


def load(workdir: str | Path) -> TrainedStudent:
  workdir = Path(workdir).absolute()
  path = workdir / 'config.json'
  config = workdirs.read_config(workdir, what='a distill-stage workdir')
  model_cfg = state_lib.model_config(config)
  if model_cfg.get('kind') != 'student':
    raise ValueError(f'{path}: model.kind={model_cfg.get("kind", "unifer")!r}; export takes '
                     f'a distill workdir (model.kind=\'student\')')
  abstract = nnx.eval_shape(
      lambda: state_lib.model_class(model_cfg)(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, param_state = nnx.split(abstract, nnx.Param)
  step, params = param_restore.load_params(workdir, nnx.to_pure_dict(param_state))
  return TrainedStudent(workdir, step, model_cfg, config.input, graphdef, params)


def unrolled(student: TrainedStudent) -> tuple[Any, Any]:
  """(graphdef, params) of the same student with its layer stack unrolled: exported
  graphs then hold plain per-layer ops (a scan becomes an ONNX Loop, which onnxruntime
  runs slowly and its quantiser cannot see into)."""
  cfg = ml_collections.ConfigDict(student.model_cfg.to_dict())
  for tower in state_lib.towers(cfg):
    cfg[tower].scan_layers = False
  abstract = nnx.eval_shape(lambda: state_lib.model_class(cfg)(cfg, rngs=nnx.Rngs(0)))
  graphdef, param_state = nnx.split(abstract, nnx.Param)
  stacked = optim.flat(student.params)
  flat = {}
  for path, a in optim.flat(nnx.to_pure_dict(param_state)).items():
    parts = path.split('/')
    if path in stacked:  # not in the layer stack (lists such as the conv stem's included)
      value = stacked[path]
    else:  # 'encoder/blocks/3/mlp/...' is row 3 of the scanned 'encoder/blocks/mlp/...'
      layer = next(i for i, p in enumerate(parts) if p.isdigit())
      value = stacked['/'.join(parts[:layer] + parts[layer + 1:])][int(parts[layer])]
    if tuple(value.shape) != tuple(a.shape):
      raise ValueError(f'unrolling {path}: {value.shape} vs {a.shape}')
    flat[tuple(int(p) if p.isdigit() else p for p in parts)] = value
  return graphdef, traverse_util.unflatten_dict(flat)


def predict_fn(student: TrainedStudent, unroll: bool = True) -> Callable[[jax.Array], dict]:
  """images [B, S, S, 3] f32 (normalised) -> {basic, compound, intensity, va}; the
  parameters are closed over (they become constants of the exported program).
  ``unroll=False``: the student exactly as trained (the parity reference)."""
  graphdef, params = unrolled(student) if unroll else (student.graphdef, student.params)

  def predict(images):
    out = nnx.merge(graphdef, params)(images)
    return {'basic': jax.nn.softmax(out['basic'], -1),
            'compound': jax.nn.softmax(out['compound'], -1),
            'intensity': out['intensity'], 'va': out['va']}

  return predict


def meta(student: TrainedStudent) -> dict:
  cfg = student.input_cfg
  return {
      'format_version': 1,
      'source_workdir': str(student.workdir), 'source_step': student.step,
      'image_size': student.image_size,
      'preprocessing': {
          'color': 'RGB', 'layout': 'NHWC', 'dtype': 'float32',
          'crop': 'centre_square', 'resize': 'bilinear',
          'scale': 1 / 255, 'mean': list(cfg.get('image_mean', (0.5, 0.5, 0.5))),
          'std': list(cfg.get('image_std', (0.5, 0.5, 0.5))),
          'formula': '(resize(centre_square(rgb)) / 255 - mean) / std'},
      'outputs': {'basic': {'shape': ['B', len(labels.BASIC)], 'kind': 'probabilities',
                            'labels': list(labels.BASIC)},
                  'compound': {'shape': ['B', len(labels.COMPOUND)], 'kind': 'probabilities',
                               'labels': list(labels.COMPOUND)},
                  'intensity': {'shape': ['B'], 'kind': 'value in [0, 1]'},
                  'va': {'shape': ['B', 2], 'kind': 'valence, arousal in [-1, 1]'}},
  }


def parity_images(student: TrainedStudent, n: int = 8, seed: int = 0,
                  split: str = 'test') -> np.ndarray:
  """Held-out faces (``split``) of the student's corpus when its data is there, else
  random images in the normalised range (parity does not depend on realism, but faces
  are checked where we can). Read once per student."""
  cache = student.__dict__.setdefault('_parity_images', {})
  if (n, seed, split) not in cache:
    cache[(n, seed, split)] = _parity_images(student, n, seed, split)
  return cache[(n, seed, split)]


def _parity_images(student: TrainedStudent, n: int, seed: int, split: str) -> np.ndarray:
  cfg = student.input_cfg
  try:
    from unifer_jax.evaluators import data as eval_data  # pylint: disable=g-import-not-at-top
    images = eval_data.load_split(cfg, split, student.image_size, limit=n)['image']
    if len(images) == n:
      return images.astype(np.float32)
  except Exception:  # the corpus may have moved; random faces-range inputs still test parity
    pass
  rng = np.random.default_rng(seed)
  s = student.image_size
  return rng.uniform(-1, 1, (n, s, s, 3)).astype(np.float32)


def reference_outputs(student: TrainedStudent, images: np.ndarray) -> dict:
  """The trained (scanned) student's outputs on ``images``: what every format must match
  (computed once per student and image batch)."""
  key = (images.shape, hash(images.tobytes()))
  cache = student.__dict__.setdefault('_reference', {})
  if key not in cache:
    cache[key] = jax.device_get(jax.jit(predict_fn(student, unroll=False))(images))
  return cache[key]


class ParityError(RuntimeError):
  pass


def check_parity(name: str, reference: dict, got: dict, atol: float) -> float:
  """Max abs diff over the outputs; raises ParityError above ``atol``."""
  worst = 0.0
  for k in OUTPUTS:
    a, b = np.asarray(reference[k], np.float64), np.asarray(got[k], np.float64)
    if a.shape != b.shape:
      raise ParityError(f'{name}: output {k!r} has shape {b.shape}, JAX gives {a.shape}')
    worst = max(worst, float(np.max(np.abs(a - b))))
  if not worst <= atol:
    raise ParityError(f'{name}: max abs diff {worst:.3g} vs the JAX student exceeds {atol:g}')
  return worst

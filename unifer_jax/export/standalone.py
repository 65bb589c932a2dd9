"""Run an exported student with nothing but onnxruntime, numpy and pillow.

This file imports no JAX and nothing of this package, so it can be copied next to an
export directory and used as is::

  from standalone import load          # or: from unifer_jax.export.standalone import load
  predictor = load('W/export')         # the directory `unifer export --format onnx` wrote
  predictor([pil_image, ...])          # or a uint8 array [N, H, W, 3] / [H, W, 3]
  -> [{'basic': {'neutral': 0.01, ...}, 'label': 'happiness', 'confidence': 0.93,
       'compound': 'happily surprised', 'compound_probabilities': {...},
       'intensity': 0.62, 'valence': 0.41, 'arousal': 0.12}, ...]

Preprocessing follows meta.json exactly as training's eval path does it (centre
square crop, bilinear resize in one PIL call, /255, (x - mean) / std, RGB NHWC f32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


class Predictor:
  """``predictor(images) -> list[dict]``; ``predictor.probabilities(images)`` gives the
  raw output arrays."""

  def __init__(self, export_dir, *, int8: bool = False, threads: int = 0):
    export_dir = Path(export_dir)
    meta_path = export_dir / 'meta.json'
    if not meta_path.is_file():
      raise FileNotFoundError(f'{export_dir}: no meta.json (expected a `unifer export` '
                              f'directory)')
    self.meta = json.loads(meta_path.read_text())
    files = self.meta.get('files', {})
    key = 'int8_file' if int8 else 'onnx_file'
    if key not in files:
      raise FileNotFoundError(f'{meta_path}: no {key} (export with --format onnx'
                              f'{" --int8" if int8 else ""})')
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
      opts.intra_op_num_threads = threads
    self.session = ort.InferenceSession(str(export_dir / files[key]), opts,
                                        providers=['CPUExecutionProvider'])
    self.image_size = int(self.meta['image_size'])
    pre = self.meta['preprocessing']
    self.mean = np.asarray(pre['mean'], np.float32)
    self.std = np.asarray(pre['std'], np.float32)
    self.basic_labels = self.meta['outputs']['basic']['labels']
    self.compound_labels = self.meta['outputs']['compound']['labels']

  # -- preprocessing ------------------------------------------------------------------

  def _one(self, image) -> np.ndarray:
    if not isinstance(image, Image.Image):
      arr = np.asarray(image)
      if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f'images must be PIL images or uint8 [H, W(, 3)] arrays, got '
                         f'{arr.dtype} {arr.shape}')
      image = Image.fromarray(arr)
    image = image if image.mode == 'RGB' else image.convert('RGB')
    w, h = image.size
    side = min(w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2
    image = image.resize((self.image_size, self.image_size), Image.BILINEAR,
                         box=(x0, y0, x0 + side, y0 + side))
    x = np.asarray(image, np.float32) / 255.0
    return (x - self.mean) / self.std

  def preprocess(self, images) -> np.ndarray:
    """PIL images or uint8 arrays ([N, H, W, 3], [H, W, 3] or a list) -> f32 NHWC."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    elif isinstance(images, (np.ndarray, Image.Image)):
      images = [images]
    return np.stack([self._one(im) for im in images]).astype(np.float32)

  # -- inference ----------------------------------------------------------------------

  def probabilities(self, images) -> dict[str, np.ndarray]:
    x = self.preprocess(images)
    names = [o.name for o in self.session.get_outputs()]
    return dict(zip(names, self.session.run(None, {'image': x})))

  def __call__(self, images) -> list[dict]:
    out = self.probabilities(images)
    results = []
    for i in range(len(out['basic'])):
      basic, compound = out['basic'][i], out['compound'][i]
      top = int(np.argmax(basic))
      results.append({
          'basic': {n: float(p) for n, p in zip(self.basic_labels, basic)},
          'label': self.basic_labels[top], 'confidence': float(basic[top]),
          'compound': self.compound_labels[int(np.argmax(compound))],
          'compound_probabilities': {n: float(p) for n, p in zip(self.compound_labels,
                                                                 compound)},
          'intensity': float(out['intensity'][i]),
          'valence': float(out['va'][i][0]), 'arousal': float(out['va'][i][1]),
      })
    return results


def load(export_dir, *, int8: bool = False, threads: int = 0) -> Predictor:
  return Predictor(export_dir, int8=int8, threads=threads)

"""Image decoding, resizing and training augmentation (numpy + PIL, one image at a time).

``model_image(data, size, ...)`` is the one path from a record's image (encoded bytes
or a uint8 array) to the float32 [size, size, 3] the ViT reads: decode, crop (the
centre square at eval; a random resized crop in training) and resize in ONE PIL call
(antialiased), then flip, colour jitter and a random occlusion patch in training, then
``(x / 255 - mean) / std``. A horizontal flip keeps every label -- contempt's
unilateral smile stays contempt on the other side.

Augmentation settings (``config.input.augment``; 0 / equal bounds switch a part off):

| key | default | meaning |
|---|---|---|
| crop_scale | (0.75, 1.0) | area fraction of the random crop |
| crop_ratio | (0.85, 1.18) | its aspect ratio w / h |
| flip | 0.5 | probability of a horizontal flip |
| brightness, contrast, saturation | 0.2 | factors drawn from U(1 - x, 1 + x) |
| occlusion | 0.2 | probability of a random occlusion patch (a flat random colour) |
| occlusion_size | (0.15, 0.4) | its sides as fractions of the image side |
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

DEFAULT_AUGMENT = dict(crop_scale=(0.75, 1.0), crop_ratio=(0.85, 1.18), flip=0.5,
                       brightness=0.2, contrast=0.2, saturation=0.2, occlusion=0.2,
                       occlusion_size=(0.15, 0.4))
_GREY = np.array([0.299, 0.587, 0.114], np.float32)
# OpenAI CLIP's pixel statistics: what BLIP-2 / InstructBLIP (and their towers) expect.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode(data) -> Image.Image:
  """Encoded image bytes (PNG, JPEG, ...) or a uint8 [H, W(, 3)] array -> RGB PIL image."""
  if isinstance(data, (bytes, np.bytes_)):
    img = Image.open(io.BytesIO(data))
  else:
    arr = np.asarray(data)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
      raise ValueError(f'image must be encoded bytes or uint8 HxW(x3), got {arr.dtype} '
                       f'{arr.shape}')
    img = Image.fromarray(arr)
  return img if img.mode == 'RGB' else img.convert('RGB')


def centre_box(w: int, h: int) -> tuple[float, float, float, float]:
  side = min(w, h)
  x0, y0 = (w - side) / 2, (h - side) / 2
  return (x0, y0, x0 + side, y0 + side)


def random_box(w: int, h: int, rng: np.random.Generator, scale, ratio) -> tuple:
  """torchvision's RandomResizedCrop sampler: 10 tries, then the centre square."""
  area = w * h
  log_r = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    a = area * rng.uniform(*scale)
    r = math.exp(rng.uniform(*log_r))
    cw, ch = math.sqrt(a * r), math.sqrt(a / r)
    if cw <= w and ch <= h:
      x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
      return (x0, y0, x0 + cw, y0 + ch)
  return centre_box(w, h)


def _jitter(x: np.ndarray, rng, brightness, contrast, saturation) -> np.ndarray:
  if brightness:
    x = x * rng.uniform(1 - brightness, 1 + brightness)
  if contrast:
    m = float((x @ _GREY).mean())
    x = (x - m) * rng.uniform(1 - contrast, 1 + contrast) + m
  if saturation:
    g = (x @ _GREY)[..., None]
    x = (x - g) * rng.uniform(1 - saturation, 1 + saturation) + g
  return np.clip(x, 0.0, 1.0)


def _occlude(x: np.ndarray, rng, size_range) -> np.ndarray:
  s = x.shape[0]
  ph, pw = (max(1, int(round(s * rng.uniform(*size_range)))) for _ in range(2))
  y0, x0 = int(rng.integers(0, s - ph + 1)), int(rng.integers(0, s - pw + 1))
  x = x.copy()
  x[y0:y0 + ph, x0:x0 + pw] = rng.uniform(0, 1, 3).astype(np.float32)
  return x


def settings(augment: dict) -> dict:
  """DEFAULT_AUGMENT updated with `augment` (checked: unknown keys are an error)."""
  unknown = sorted(set(augment) - set(DEFAULT_AUGMENT))
  if unknown:
    raise ValueError(f'config.input.augment has unknown key(s) {unknown}; expected '
                     f'{sorted(DEFAULT_AUGMENT)} (+ enabled)')
  return {**DEFAULT_AUGMENT, **dict(augment)}


def is_flips_only(augment: dict) -> bool:
  """Whether training with ``config.input.augment`` changes an image by at most a
  horizontal flip (or not at all): no crop, colour jitter or occlusion patch."""
  aug = dict(augment)
  if not aug.pop('enabled', True):
    return True
  aug = settings(aug)
  return (tuple(aug['crop_scale']) == (1.0, 1.0) and tuple(aug['crop_ratio']) == (1.0, 1.0)
          and aug['brightness'] == aug['contrast'] == aug['saturation'] == 0
          and aug['occlusion'] == 0)


def model_image(data, size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                rng: np.random.Generator | None = None, augment: dict | None = None) -> np.ndarray:
  """float32 [size, size, 3]; augmented iff both `rng` and `augment` are given."""
  if rng is None or augment is None:
    return normalise(stored_pixels(data, size), mean, std)
  aug = settings(augment)
  img = _decoded(data, size)
  box = random_box(*img.size, rng, aug['crop_scale'], aug['crop_ratio'])
  x = np.asarray(img.resize((size, size), Image.BILINEAR, box=box), np.float32) / 255.0
  if rng.random() < aug['flip']:
    x = x[:, ::-1]
  x = _jitter(x, rng, aug['brightness'], aug['contrast'], aug['saturation'])
  if rng.random() < aug['occlusion']:
    x = _occlude(x, rng, aug['occlusion_size'])
  return _standardise(x, mean, std)


def stored_pixels(data, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the centre square resized, what ``model_image`` normalises
  when it does not augment (memory_table.py keeps these, a quarter of the floats' bytes)."""
  img = _decoded(data, size)
  return np.asarray(img.resize((size, size), Image.BILINEAR, box=centre_box(*img.size)))


def normalise(pixels: np.ndarray, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
  """uint8 [..., 3] -> float32 ``(x / 255 - mean) / std``, one image or a batch (the same
  float32 operations either way, so a batch equals its images normalised one by one)."""
  return _standardise(np.asarray(pixels).astype(np.float32) / 255.0, mean, std)


def _decoded(data, size: int) -> Image.Image:
  img = decode(data)
  if hasattr(img, 'draft') and img.format == 'JPEG':
    # DCT-domain downscaling: a 1000 px JPEG decodes at 1/2..1/8 size, still >= needed.
    img.draft('RGB', (size * 2, size * 2))
  return img


def _standardise(x: np.ndarray, mean, std) -> np.ndarray:
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

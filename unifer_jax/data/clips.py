"""Clip rows: a clip record's ``frames`` as model input ``frames`` [T, S, S, 3] instead of
its one ``image`` (issue 34 item 3; the clip record: data/schema.py).

``config.input.frames = T`` (> 0; the video stage sets it from ``model.video.frames``)
makes the pipeline (data/pipeline.py) read clips: each example is the stage format's
usual one (instruct: prompt + answer tokens, the labels; eval: the labels) with
``frames`` in place of ``image``. The T frames are sampled uniformly from the T_stored
the record holds (``schema.clip_indices``: the middle of each of T equal segments; 8 of
16 = stored frames 1, 3, ..., 15), each normalised like ``image`` and, in training,
augmented with ONE draw per clip (the same crop, flip, colour jitter and occlusion
patch on every frame: a flip that toggled mid-clip would be motion the clip never had).

A record without ``frames`` (a still-image dataset in a clip stage) is an error naming
the dataset, the record and the key.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from unifer_jax.data import augment, examples, schema


@dataclasses.dataclass
class ClipMaker(examples.ExampleMaker):
  """``ExampleMaker`` whose image is the clip: ``frames`` [T, S, S, 3] f32 (uint8 with
  ``raw_pixels``). ``datasets`` names the mixture's sources (for errors)."""
  frames: int = 8
  datasets: tuple = ()

  def __post_init__(self):
    super().__post_init__()
    if self.frames < 1:
      raise ValueError(f'config.input.frames={self.frames}: a clip needs at least one frame')

  def _image(self, record, rng):
    stored = record['frames']
    picks = schema.clip_indices(len(stored), self.frames)
    if self.raw_pixels:
      return np.stack([augment.stored_pixels(decoded_frame(stored[i]), self.image_size)
                       for i in picks])
    augmenting = rng is not None and self.augment is not None
    seed = int(rng.integers(2 ** 63)) if augmenting else None

    def one(frame):
      # Every frame replays the clip's one draw (a fresh generator from the same seed).
      r = np.random.default_rng(seed) if augmenting else None
      return augment.model_image(frame, self.image_size, self.mean, self.std, rng=r,
                                 augment=self.augment if augmenting else None)
    return np.stack([one(decoded_frame(stored[i])) for i in picks])

  def __call__(self, source: int, index: int, record, rng):
    if 'frames' not in record:
      name = self.datasets[source] if source < len(self.datasets) else f'source {source}'
      rid = record.get('id', b'?')
      rid = rid.decode() if isinstance(rid, bytes) else rid
      raise ValueError(
          f'dataset {name!r} record {index} (id {rid!r}) has no key \'frames\': '
          f'config.input.frames={self.frames} reads clips (a clip dataset such as '
          f'synthetic_clips, dfew, ferv39k, mafw), and this record is a still image')
    ex = super().__call__(source, index, record, rng)
    ex['frames'] = ex.pop('image')
    return ex


def decoded_frame(data) -> np.ndarray:
  """uint8 [H, W, 3] of one stored frame (sources.open_split gives them encoded, so a
  reader decodes only the T it samples). Decoded in full as tfds' own decode does (PIL,
  no JPEG draft downscaling): the pixels are the ones a fully decoded record held."""
  if not isinstance(data, (bytes, np.bytes_)):
    return np.asarray(data)   # a record decoded by tfds itself, or built in memory
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img)


def example_spec(fmt: str, image_size: int, frames: int, seq_len: int, text_len: int,
                 qformer_prompt: bool = False) -> dict:
  """``examples.example_spec`` with ``frames`` [T, S, S, 3] in place of ``image``."""
  spec = examples.example_spec(fmt, image_size, seq_len, text_len, qformer_prompt)
  if 'image' not in spec:
    raise ValueError(f'input format {fmt!r} reads no images; clips need one that does')
  del spec['image']
  return {'frames': ((frames, image_size, image_size, 3), np.float32), **spec}


def resolve_frames(cfg, stage: str, model_cfg) -> None:
  """Sets and checks ``cfg.frames`` (config.input) for a training run: a clip model's
  stage reads ``model.video.frames`` per clip (0 = that); an image model reads none."""
  video = model_cfg.get('video') if hasattr(model_cfg, 'get') else None
  t = int(cfg.get('frames', 0))
  if not video:
    if t:
      raise ValueError(f'config.input.frames={t} but the model has no model.video (a clip '
                       f'model: configs/video.py); stage {stage!r} reads one image per row')
    return
  t = t or int(video.frames)
  if t != int(video.frames):
    raise ValueError(f'config.input.frames={t} but model.video.frames={video.frames}')
  cfg.frames = t
  for key, bad in (('fewshot.max_shots', int(cfg.fewshot.max_shots) > 0),
                   ('pack', bool(cfg.get('pack', False))), ('cache', bool(cfg.cache))):
    if bad:
      raise ValueError(f'config.input.{key} is set, but clip rows (config.input.frames={t}) '
                       f'hold one clip each, unpacked and read from disk')

"""`synthetic_clips`: the built-in procedural video FER corpus (tfds, ArrayRecord, no TF).

Each record is a clip of T frames (default schema.CLIP_FRAMES = 16, as if sampled
uniformly over a longer video) of one rendered face (`render.render`, recipes from
`facs.py`) whose action units go neutral -> onset -> apex -> offset:

* Envelope: frame k shows every AU at apex amplitude x envelope[k]. Frame 0 is neutral
  (envelope 0); the apex frame (one of frames T/4 .. 3T/4) is 1 and may be held for up
  to 2 more frames; the offset falls to a residue in [0, 0.1] by the last frame. The
  rise and fall are smoothsteps 2 .. ~T/2 frames long. The middle frame -- the clip's
  `image`, what a single-image model reads -- is often on a slope, not at the apex.
* Apex intensity, drawn per clip: with probability `low_fraction` (0.4) a LOW apex,
  U(0.15, LOW_INTENSITY = 0.35), where only 4 % of synthetic_faces' still faces are
  (their intensities start at 0.27), else U(0.35, 1). The expression's AU amplitudes
  are scaled to it. Low apexes are the clips where time matters (issue 34's
  must-show): no frame shows much, most frames show less than the apex, and the apex
  is the middle frame in only ~1 clip of 8.
* Head motion: the face's pose drifts over the clip (yaw up to ~+-8 deg end to end,
  roll ~+-5 deg, a little shift, and a small wobble), from one sampled Look.
* Blinks: AU45 is not one of the annotated AUs (labels.AUS), so a blink is
  `render.render(..., blink=c)`, the upper lid lowered onto the lower one (c = 1
  closed). 0, 1 or 2 blinks per clip (p = .35 / .5 / .15), each a frame at closure
  U(0.85, 1) and, half the time each, a neighbour caught mid-blink U(0.2, 0.5).

The label fields are a still face's, for the apex: expression / compound /
label_dist, `aus` = apex amplitudes, `intensity` = apex intensity (mean amplitude of
the active AUs), valence/arousal, caption and rationale of the apex expression (the
look words of the middle frame). `nuisance` (JSON) keeps the middle frame's Look and
per frame: `envelope`, `blink`, `yaw`, `roll`; plus `apex_frame`, `low_intensity`,
`hidden_aus`, `eyes`, `aligned`. `frames` holds the T PNG frames, `image` the middle
one (frames[T // 2]), as the DFEW / FERV39k / MAFW builders store clips.

Aligned (default) as a video builder crops a clip: ONE eye-line alignment, from the
middle frame's exact eye centres, cuts every frame, so the head motion stays visible.

Deterministic: record i of split s is a pure function of (seed, s, i) and the
builder's parameters. Small by default (1000 clips). Build cost per 16-frame clip,
`prepare(size=200)` end to end with workers=1 on a shared 2-core box at load ~6
(2026-12-07): 26 ms and 106 KB on disk at 64 px, 36 ms and 268 KB at 112 px (the
default 1000 clips: ~36 s, 268 MB). workers=2 was no faster there (spawn imports and a
busy machine); on idle cores the pool splits the rendering.

  counts = prepare('/data/synth', size=1000, seed=0)   # + clip_samples.png
  src = data_source('/data/synth', 'train')   # or sources.open_split('synthetic_clips', ...)
"""

import collections
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from data_prep import facs, render, synthetic_faces, tfds_writer
from unifer_jax.data import faces, labels, schema

NAME = 'synthetic_clips'
SPLITS = synthetic_faces.SPLITS
_STREAMS = {'train': 0, 'validation': 1, 'test': 2, 'samples': 3}  # RNG stream per split
LOW_INTENSITY = 0.35   # apex intensity below which a clip is a low-intensity clip
MIN_FRAMES = 8         # the envelope needs room for onset, apex and offset


# ---- one clip: what happens in it ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClipPlan:
  """Everything a clip's frames are rendered from: the apex expression, one Look per
  frame, the AU envelope and the eyelid closure per frame."""
  apex: facs.Expression       # labels and AU amplitudes at the apex
  looks: tuple                # render.Look per frame (pose drifts)
  envelope: np.ndarray        # [T] float64 in [0, 1], 1 at the apex frame
  blink: np.ndarray           # [T] eyelid closure in [0, 1]
  apex_frame: int

  def frame_aus(self, k: int) -> dict:
    return {au: amp * float(self.envelope[k]) for au, amp in self.apex.aus.items()}


def _smoothstep(x):
  x = np.clip(x, 0.0, 1.0)
  return x * x * (3 - 2 * x)


def sample_envelope(rng: np.random.Generator, t: int) -> tuple:
  """(envelope [t], apex frame): 0 at frame 0, 1 at the apex, a residue <= 0.1 at the end."""
  apex = int(rng.integers(t // 4, t - t // 4))
  hold = int(rng.integers(0, 3))
  hold = min(hold, t - 3 - apex)
  rise = rng.uniform(2, apex) if apex > 2 else float(apex)   # onset starts at frame >= 0
  fall = rng.uniform(2, t - 1 - apex - hold)                 # offset ends by the last frame
  residue = rng.uniform(0, 0.1)
  k = np.arange(t, dtype=np.float64)
  env = np.where(k <= apex, _smoothstep((k - (apex - rise)) / rise), 1.0)
  after = k > apex + hold
  env[after] = 1 - (1 - residue) * _smoothstep((k[after] - apex - hold) / fall)
  return env, apex


def sample_motion(rng: np.random.Generator, look: render.Look, t: int) -> tuple:
  """t Looks whose pose drifts linearly from the sampled one, plus a small wobble; the
  pixel noise is drawn afresh per frame, as a camera's is."""
  u = np.linspace(-0.5, 0.5, t)
  wobble = np.sin(2 * math.pi * rng.uniform(0.5, 1.5) * u + rng.uniform(0, 2 * math.pi))
  yaw = look.yaw + np.clip(rng.normal(0, 4), -8, 8) * u + rng.uniform(0, 1.5) * wobble
  roll = look.roll + np.clip(rng.normal(0, 2.5), -5, 5) * u
  dx, dy = rng.uniform(-0.02, 0.02, 2)
  return tuple(dataclasses.replace(
      look, yaw=round(float(np.clip(yaw[k], -25, 25)), 2), roll=round(float(roll[k]), 2),
      shift=(round(look.shift[0] + dx * u[k], 4), round(look.shift[1] + dy * u[k], 4)),
      noise_seed=(look.noise_seed + 7919 * k) % 2**31) for k in range(t))


def sample_blinks(rng: np.random.Generator, t: int) -> np.ndarray:
  """Eyelid closure per frame: 0-2 blinks, each one frame nearly closed and maybe a
  neighbour half closed (frames of a clip sampled ~0.1 s apart catch a blink once)."""
  closure = np.zeros(t)
  for _ in range(int(rng.choice(3, p=[0.35, 0.5, 0.15]))):
    k = int(rng.integers(t))
    closure[k] = max(closure[k], rng.uniform(0.85, 1.0))
    for j in (k - 1, k + 1):
      if 0 <= j < t and rng.random() < 0.5:
        closure[j] = max(closure[j], rng.uniform(0.2, 0.5))
  return np.round(closure, 3)


def sample_apex_intensity(rng: np.random.Generator, low_fraction: float) -> float:
  if rng.random() < low_fraction:
    return float(rng.uniform(0.15, LOW_INTENSITY))
  return float(rng.uniform(LOW_INTENSITY, 1.0))


def sample_plan(rng: np.random.Generator, t: int, *, compound_fraction: float = 0.3,
                low_fraction: float = 0.4, category: str | None = None,
                apex_intensity: float | None = None) -> ClipPlan:
  """A clip's plan; `category` / `apex_intensity` force those draws (samples, tests)."""
  expr = facs.sample_expression(rng, compound_fraction, category=category)
  target = sample_apex_intensity(rng, low_fraction)
  target = target if apex_intensity is None else apex_intensity
  if expr.aus:   # scale the recipe's amplitudes so their mean is the apex intensity
    scale = target / expr.intensity
    expr = dataclasses.replace(
        expr, aus={au: round(min(1.0, amp * scale), 3) for au, amp in expr.aus.items()})
  envelope, apex = sample_envelope(rng, t)
  looks = sample_motion(rng, render.sample_look(rng), t)
  return ClipPlan(expr, looks, envelope, sample_blinks(rng, t), apex)


def render_frames(plan: ClipPlan, image_size: int, align: bool = True) -> tuple:
  """(frames: T uint8 [size, size, 3], eyes [2, 2] of the middle frame)."""
  t = len(plan.looks)
  eyes = render.eye_centres(plan.looks[t // 2], image_size)
  frames = []
  for k, look in enumerate(plan.looks):
    x = render.render(plan.frame_aus(k), look, unilateral=plan.apex.unilateral,
                      size=image_size, blink=float(plan.blink[k]))
    if align:   # one transform for the clip (the middle frame's eyes), as a video crop
      x = faces.align(x, *eyes, size=image_size, eyes_at=render.ALIGNED_EYES)
    frames.append(x)
  return frames, eyes


def make_record(index: int, *, seed: int, split: str, image_size: int = 112,
                frames: int = schema.CLIP_FRAMES, compound_fraction: float = 0.3,
                low_fraction: float = 0.4, align: bool = True, expression: str | None = None,
                apex_intensity: float | None = None) -> dict:
  """Clip `index` of `split`: all randomness from the stream (seed, split, index)."""
  if split not in _STREAMS:
    raise ValueError(f'synthetic_clips split {split!r}; expected one of {list(_STREAMS)}')
  if frames < MIN_FRAMES:
    raise ValueError(f'synthetic_clips frames must be >= {MIN_FRAMES} (onset, apex, offset), '
                     f'got {frames}')
  rng = np.random.default_rng([seed, _STREAMS[split], index])
  plan = sample_plan(rng, frames, compound_fraction=compound_fraction,
                     low_fraction=low_fraction, category=expression,
                     apex_intensity=apex_intensity)
  images, eyes = render_frames(plan, image_size, align)
  expr = plan.apex
  encoded = [synthetic_faces.png_bytes(x) for x in images]
  return schema.empty_record(
      image=encoded[frames // 2], frames=encoded, id=f'{split}/{index:07d}', source=NAME,
      **synthetic_faces.label_fields(
          expr, plan.looks[frames // 2], rng, align, eyes=np.round(eyes, 2).tolist(),
          apex_frame=plan.apex_frame,
          low_intensity=bool(expr.aus) and expr.intensity < LOW_INTENSITY,
          envelope=np.round(plan.envelope, 3).tolist(), blink=plan.blink.tolist(),
          yaw=[lk.yaw for lk in plan.looks], roll=[lk.roll for lk in plan.looks]))


# ---- the tfds builder ------------------------------------------------------------------

class SyntheticClips(tfds.core.GeneratorBasedBuilder):
  """Procedural FACS clips; parameters are constructor arguments, kept in metadata."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Procedural FACS clips: onset/apex/offset, head motion, blinks.'}
  code_path = epath.Path(__file__)   # builders outside a tfds package dir (see synthetic_faces)

  def __init__(self, *, size: int = 1000, seed: int = 0, image_size: int = 112,
               frames: int | None = None, compound_fraction: float = 0.3,
               low_fraction: float = 0.4, align: bool = True, workers: int = 2, **kwargs):
    if frames is None:   # a reader (tfds.data_source by name): the stored copy's T
      frames = _stored_frames(kwargs.get('data_dir')) or schema.CLIP_FRAMES
    for what, v in (('compound_fraction', compound_fraction), ('low_fraction', low_fraction)):
      if not 0 <= v <= 1:
        raise ValueError(f'synthetic_clips {what} must be in [0, 1], got {v}')
    if seed < 0:
      raise ValueError(f'synthetic_clips seed must be >= 0, got {seed}')
    if image_size < 32:
      raise ValueError(f'synthetic_clips image_size must be >= 32 pixels, got {image_size}')
    if frames < MIN_FRAMES:
      raise ValueError(f'synthetic_clips frames must be >= {MIN_FRAMES}, got {frames}')
    self.params = dict(size=int(size), seed=int(seed), image_size=int(image_size),
                       frames=int(frames), compound_fraction=float(compound_fraction),
                       low_fraction=float(low_fraction), align=bool(align))
    self.sizes = synthetic_faces.split_sizes(size)
    self.workers = workers
    self.tally = collections.Counter()
    self._pool = None
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=schema.features(frames=self.params['frames']),
        disable_shuffling=True,   # records are i.i.d.; keep index order
        metadata=tfds.core.MetadataDict(params=self.params))

  def _download_and_prepare(self, dl_manager, download_config):
    with tfds_writer.splits_in_memory(
        NAME, f'--size {self.params["size"]} is too many clips for one corpus here; '
        'prepare several with different --seed, or a smaller --image_size'):
      if self.workers > 1:   # one spawn pool for all splits (safe under threads)
        with multiprocessing.get_context('spawn').Pool(self.workers) as self._pool:
          try:
            super()._download_and_prepare(dl_manager, download_config)
          finally:
            self._pool = None
      else:
        super()._download_and_prepare(dl_manager, download_config)
    order = (*SPLITS, 'basic', 'compound', 'low_intensity', 'with_blink')
    self.info.metadata['counts'] = {k: self.tally[k] for k in order}

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, self.sizes[split]) for split in SPLITS}

  def _generate_examples(self, split, n):
    p = {k: v for k, v in self.params.items() if k != 'size'}
    fn = functools.partial(make_record, split=split, **p)
    records = self._pool.imap(fn, range(n), chunksize=8) if self._pool else map(fn, range(n))
    for i, rec in enumerate(records):
      nz = json.loads(rec['nuisance'])
      self.tally[split] += 1
      self.tally['compound' if rec['compound'] >= 0 else 'basic'] += 1
      self.tally['low_intensity'] += nz['low_intensity']
      self.tally['with_blink'] += max(nz['blink']) > 0
      yield i, rec


# ---- on disk ---------------------------------------------------------------------------

def _stored_frames(data_dir) -> int | None:
  """T of the copy prepared under data_dir, if any: the `frames` feature's length is
  part of the features tfds decodes with, so a reader must build with the stored T."""
  if not data_dir:
    return None
  try:
    with open(os.path.join(dataset_dir(data_dir), 'metadata.json')) as f:
      return int(json.load(f)['params']['frames'])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def dataset_dir(out_dir) -> str:
  return os.path.join(os.fspath(out_dir), NAME, str(SyntheticClips.VERSION))


def data_source(out_dir, split: str):
  """Random-access reader of one split (frames and image decoded to uint8 arrays)."""
  return tfds.builder_from_directory(dataset_dir(out_dir)).as_data_source(split=split)


def prepare(out_dir, size: int = 1000, seed: int = 0, image_size: int = 112,
            frames: int = schema.CLIP_FRAMES, workers: int = 2, compound_fraction: float = 0.3,
            low_fraction: float = 0.4, align: bool = True, samples: bool = True) -> dict:
  """Writes the clip corpus under out_dir (+ clip_samples.png); returns counts written.

  Reuses an existing copy made with the same parameters; regenerates otherwise.
  """
  builder = SyntheticClips(data_dir=os.fspath(out_dir), size=size, seed=seed,
                           image_size=image_size, frames=frames,
                           compound_fraction=compound_fraction, low_fraction=low_fraction,
                           align=align, workers=workers)
  path = dataset_dir(out_dir)
  old = synthetic_faces.existing_metadata(path)
  if old is not None and old.get('params') == builder.params:
    counts = dict(old['counts'])
  else:
    if os.path.exists(path):
      shutil.rmtree(path)
    builder.download_and_prepare()
    counts = dict(builder.info.metadata['counts'])
  downloads = os.path.join(os.fspath(out_dir), 'downloads')   # tfds' empty leftovers
  for d in (os.path.join(downloads, 'extracted'), downloads):
    try:
      os.rmdir(d)
    except OSError:
      pass
  if samples:
    write_samples(os.path.join(os.fspath(out_dir), 'clip_samples.png'), seed=seed,
                  image_size=image_size, frames=frames, align=align)
  return counts


def write_samples(path, *, seed: int = 0, image_size: int = 112, frames: int = schema.CLIP_FRAMES,
                  align: bool = True, tile: int = 64) -> None:
  """A strip per clip (frames in a row, `tile` px each): one per basic expression at a
  high apex, then happiness / surprise / anger at a low one. Under each frame its
  envelope value; the apex frame is framed in red, blink frames marked 'blink'."""
  rows = [(n, None) for n in labels.BASIC] + [(n, 0.2) for n in ('happiness', 'surprise', 'anger')]
  label_w, th = 150, tile + 14
  sheet = Image.new('RGB', (label_w + frames * tile, len(rows) * th), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  font = ImageFont.load_default(size=10)
  for r, (name, apex) in enumerate(rows):
    rec = make_record(r, seed=seed, split='samples', image_size=image_size, frames=frames,
                      align=align, expression=name, apex_intensity=apex or 0.8)
    nz = json.loads(rec['nuisance'])
    y = r * th
    draw.text((4, y + tile // 2 - 8), name, fill=(0, 0, 0), font=font)
    draw.text((4, y + tile // 2 + 4), f"apex {rec['intensity']:.2f} @ frame {nz['apex_frame']}",
              fill=(90, 90, 90), font=font)
    for k, png in enumerate(rec['frames']):
      x = label_w + k * tile
      sheet.paste(Image.open(io.BytesIO(png)).resize((tile, tile), Image.BILINEAR), (x, y))
      if k == nz['apex_frame']:
        draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=(220, 30, 30), width=2)
      note = 'blink' if nz['blink'][k] >= 0.5 else f"{nz['envelope'][k]:.2f}"
      draw.text((x + tile // 2, y + tile + 1), note, fill=(0, 0, 0), font=font, anchor='ma')
  sheet.save(path)

"""The one record schema every dataset builder writes (synthetic and real datasets).

A dataset that lacks a field stores its sentinel (below), so pipelines can mix sources
and mask losses per field: ints -1, floats NaN, text ''. Instruction/answer pairs are
made from these fields at pipeline time, not stored.

| field | type | meaning | absent |
|---|---|---|---|
| image | encoded image bytes (PNG for the synthetic corpus; real builders may keep their JPEG bytes) | HxWx3 uint8 | - (required) |
| id | text | unique within the source | - (required) |
| source | text | dataset name, e.g. 'rafdb' | - (required) |
| expression | int32 | index into labels.BASIC | -1 |
| compound | int32 | index into labels.COMPOUND | -1 |
| intensity | float32 | expression intensity in [0, 1] | NaN |
| valence, arousal | float32 | in [-1, 1] | NaN |
| aus | float32[len(AUS)] | AU amplitudes in [0, 1], order of labels.AUS | NaN |
| label_dist | float32[len(BASIC)] | soft label over BASIC (e.g. FERPlus votes), sums to 1 | NaN |
| caption | text | free description of the face | '' |
| rationale | text | which AUs show, e.g. 'AU6 cheek raiser, AU12 lip corner puller' | '' |
| age_group, gender, race | int32 | index into labels.AGE_GROUPS / GENDERS / RACES | -1 |
| nuisance | text | JSON of pose/lighting/occlusion etc., for analysis | '' |

Clip records (video datasets: DFEW, FERV39k, MAFW; data_prep/builders/video.py) are the
same record plus one field, so every image reader works on them unchanged:

| frames | a sequence of exactly T encoded images (`features(frames=T)`) | the clip | - |

and `image` holds the clip's middle sampled frame (`frames[T // 2]`), what a
single-image model or a frame-vote baseline reads. T is fixed per dataset and the frames
are sampled uniformly over the whole clip at build time (`clip_indices`), because:
a fixed T keeps the video step one compiled program; uniform over the whole clip covers
onset, apex and offset whatever the clip's length; and storing T frames instead of every
frame makes a clip dataset ~T/length of the decoded clips (DFEW clips run 50-150+
frames). T = 16 (`CLIP_FRAMES`) is what DFER-CLIP / Exp-CLIP sample. A reader gets
`frames` back from tfds as a list of T HxWx3 uint8 arrays (tfds' Sequence of Image;
`np.stack` them), and from the training reader (sources.open_split) as the T encoded
frames, decoded only when read (clips.decoded_frame); a builder makes every frame the
same size, so they stack.
"""

import math

import numpy as np

from unifer_jax.data import labels

_INT_FIELDS = ('expression', 'compound', 'age_group', 'gender', 'race')
_FLOAT_FIELDS = ('intensity', 'valence', 'arousal')
_VECTOR_FIELDS = {'aus': len(labels.AUS), 'label_dist': len(labels.BASIC)}
_TEXT_FIELDS = ('caption', 'rationale', 'nuisance')
_REQUIRED = ('image', 'id', 'source')
_VOCABS = {
    'expression': labels.BASIC, 'compound': labels.COMPOUND,
    'age_group': labels.AGE_GROUPS, 'gender': labels.GENDERS, 'race': labels.RACES,
}
FIELDS = _REQUIRED + _INT_FIELDS + _FLOAT_FIELDS + tuple(_VECTOR_FIELDS) + _TEXT_FIELDS
CLIP_FRAMES = 16   # T of the clip datasets (see the module docstring)


def clip_indices(num_frames: int, t: int = CLIP_FRAMES) -> list:
  """T frame indices spread uniformly over a clip of `num_frames` (each the middle of
  one of T equal segments); a clip shorter than T repeats frames."""
  if num_frames < 1 or t < 1:
    raise ValueError(f'clip_indices needs num_frames >= 1 and t >= 1, got {num_frames}, {t}')
  return [min(num_frames - 1, int((i + 0.5) * num_frames / t)) for i in range(t)]


def features(frames: int | None = None):
  """The shared `tfds.features.FeaturesDict` (images of any size, 3 channels); with
  `frames=T`, a clip dataset's (adds `frames`, T images)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import; only builders need it)
  f = tfds.features
  spec = {
      'image': f.Image(shape=(None, None, 3)),
      'id': f.Text(),
      'source': f.Text(),
  }
  spec.update({k: f.Scalar(np.int32) for k in _INT_FIELDS})
  spec.update({k: f.Scalar(np.float32) for k in _FLOAT_FIELDS})
  spec.update({k: f.Tensor(shape=(n,), dtype=np.float32)
               for k, n in _VECTOR_FIELDS.items()})
  spec.update({k: f.Text() for k in _TEXT_FIELDS})
  if frames is not None:
    if frames < 1:
      raise ValueError(f'features(frames=T) needs T >= 1, got {frames}')
    spec['frames'] = f.Sequence(f.Image(shape=(None, None, 3)), length=frames)
  return f.FeaturesDict(spec)


def empty_record(*, frames=None, **fields) -> dict:
  """A record with every schema field; absent ones hold their sentinel. `frames`
  (a clip's T encoded frames) makes it a clip record; image records leave it out.

  Values are checked and converted to the stored dtypes: ints must index their
  vocabulary (or be -1), vectors must have the schema length, scalars must be finite
  or NaN. `image`, `id` and `source` are required.
  """
  unknown = sorted(set(fields) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown record field(s) {unknown}; the schema has {list(FIELDS)}')
  missing = [k for k in _REQUIRED if k not in fields]
  if missing:
    raise ValueError(f'record is missing required field(s) {missing}')
  rec = {k: fields[k] for k in _REQUIRED}
  for k in _INT_FIELDS:
    v = int(fields.get(k, -1))
    if not -1 <= v < len(_VOCABS[k]):
      raise ValueError(f'field {k!r}={v} is not -1 or an index into {list(_VOCABS[k])}')
    rec[k] = np.int32(v)
  for k in _FLOAT_FIELDS:
    v = fields.get(k, math.nan)
    rec[k] = np.float32(math.nan if v is None else v)
  for k, n in _VECTOR_FIELDS.items():
    v = fields.get(k)
    v = np.full((n,), np.nan, np.float32) if v is None else np.asarray(v, np.float32)
    if v.shape != (n,):
      raise ValueError(f'field {k!r} must have shape ({n},), got {v.shape}')
    rec[k] = v
  for k in _TEXT_FIELDS:
    v = fields.get(k, '')
    if not isinstance(v, str):
      raise ValueError(f'field {k!r} must be a str, got {type(v).__name__}')
    rec[k] = v
  if frames is not None:
    frames = list(frames)
    if not frames:
      raise ValueError('field frames must hold at least one encoded frame, got none')
    rec['frames'] = frames
  return rec

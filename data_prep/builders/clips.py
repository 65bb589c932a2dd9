"""What the video-dataset readers (video.py) share: the common clip annotation txt,
frame folders, video files (PyAV) and the T frames of one clip record.

Free of TensorFlow Datasets imports like common.py (workers import it). A clip unit is
a `Clip`; `ClipSource.process` turns one into a record whose `frames` are T = 16
(schema.CLIP_FRAMES) face_size x face_size frames sampled uniformly over the clip
(schema.clip_indices), and whose `image` is the middle one (frames[T // 2]).

  * a frame folder (the faces the release already cropped, e.g. DFEW clip_224x224,
    FERV39k 2_ClipsforFaceCrop): its image files in name order; fewer files than the
    annotation's num_frames -> Skip(MISSING) naming the annotation line; each sampled
    frame is decoded fully (truncated -> Skip(UNREADABLE)) and resized to face_size.
  * a video file (DFEW Clip/original, MAFW clips: whole scenes): decoded with PyAV
    (its wheels bundle ffmpeg); unopenable or cut short -> Skip(UNREADABLE). The face
    is found by the detector on the middle sampled frame and that one square box cuts
    every frame, so the crop does not jitter over time (no face -> Skip(NO_FACE)).
"""

import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from data_prep.builders import common
from unifer_jax.data import faces, labels, schema

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.mov', '.webm')


class Clip(NamedTuple):
  key: str          # record id: the clip's name (e.g. '00025')
  path: str         # a frame folder or a video file
  num_frames: int   # frames the annotation promises (0: not stated, video files)
  expression: int   # index into labels.BASIC, or -1 (a class outside BASIC, kept)
  where: str        # 'annotation file:line' for skips
  nuisance: str = ''


def is_video_file(name: str) -> bool:
  return name.lower().endswith(VIDEO_EXTENSIONS) and not os.path.basename(name).startswith('.')


def read_annotation(path, rel) -> list:
  """(where, frame_dir, num_frames, label code) of each well-formed line of a
  `<frame_dir> <num_frames> <label>` txt, and the (where, line) of malformed ones."""
  good, bad = [], []
  for lineno, line in common.read_lines(path):
    where = f'{rel(path)}:{lineno}'
    parts = line.split()
    n = common.parse_int(parts[1]) if len(parts) == 3 else None
    code = common.parse_int(parts[2]) if len(parts) == 3 else None
    if n is None or code is None or n < 1:
      bad.append((where, line))
    else:
      good.append((where, parts[0], n, code))
  return good, bad


def resolve(src: str, path: str):
  """`path` as written in an annotation file, found on this machine: as is if it
  exists, else under src, else its trailing components under src (the DFER-CLIP
  txts carry their authors' absolute paths, e.g. /data/DFEW/Clip/clip_224x224/00025
  -> SRC/Clip/clip_224x224/00025). None if nothing matches."""
  if os.path.exists(path):
    return path
  parts = [p for p in path.replace('\\', '/').split('/') if p and p != '.']
  for i in range(len(parts)):
    candidate = os.path.join(src, *parts[i:])
    if os.path.exists(candidate):
      return candidate
  return None


def frame_files(folder: str) -> list:
  return sorted(f for f in os.listdir(folder) if common.is_image_file(f))


def _square(arr: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))


def folder_frames(clip: Clip, t: int, size: int) -> list:
  """T RGB arrays (size x size) sampled from a frame folder."""
  files = frame_files(clip.path)
  if not files or len(files) < clip.num_frames:
    raise common.Skip(common.MISSING, clip.where,
                      f'{len(files)} of {clip.num_frames} frames in {clip.path}')
  out = []
  for i in schema.clip_indices(len(files), t):
    try:
      img, _ = common.open_image(os.path.join(clip.path, files[i]), clip.where)
    except common.Skip as e:   # name the frame file, not only the annotation line
      raise common.Skip(e.outcome.reason, clip.where, f'{files[i]}: {e.outcome.detail}') from None
    out.append(_square(common.rgb_array(img), size))
  return out


def _decode(path: str, where: str, t: int, indices=None):
  """(frames decoded, {index: RGB array}) of one pass over a video: the arrays kept are
  `indices`, else the T of `schema.clip_indices` over the frame count the container
  declares (none kept when it declares none). Raises Skip(UNREADABLE) when PyAV cannot
  open the file, fails mid-stream, or decodes fewer frames than declared (a file cut
  short with its index intact)."""
  import av  # pylint: disable=g-import-not-at-top  (only the video readers need it)
  kept, n = {}, 0
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise common.Skip(common.UNREADABLE, where, f'{path}: no video stream')
      declared = container.streams.video[0].frames   # 0 when the container does not say
      if indices is None and declared:
        indices = schema.clip_indices(declared, t)
      keep = set(indices or ())
      for frame in container.decode(video=0):
        if n in keep:
          kept[n] = frame.to_ndarray(format='rgb24')
        n += 1
  except av.error.FFmpegError as e:
    raise common.Skip(common.UNREADABLE, where, f'{path}: {type(e).__name__}: {e}') from None
  if declared and n < declared:
    raise common.Skip(common.UNREADABLE, where, f'{path}: decoded {n} of the {declared} frames '
                                                f'its container declares (cut short?)')
  return n, kept


def video_frames(clip: Clip, t: int, size: int, margin: float) -> list:
  """T RGB face crops (size x size) sampled from a video file, one box for all. One
  decoding pass when the container declares its frame count and holds to it (mp4
  does), else a first pass counts the frames."""
  n, kept = _decode(clip.path, clip.where, t)
  if n == 0 or n < clip.num_frames:
    raise common.Skip(common.UNREADABLE, clip.where,
                      f'{clip.path}: decoded {n} of {clip.num_frames or "some"} frames')
  indices = schema.clip_indices(n, t)
  if set(kept) != set(indices):   # the container said nothing, or not the truth
    n_again, kept = _decode(clip.path, clip.where, t, indices)
    if n_again != n or set(kept) != set(indices):
      raise common.Skip(common.UNREADABLE, clip.where, f'{clip.path}: decodes differently twice')
  middle = kept[indices[t // 2]]
  boxes = faces.detect(middle)
  if not boxes:
    raise common.Skip(common.NO_FACE, clip.where, f'{clip.path} (middle frame {indices[t // 2]})')
  return [faces.crop(kept[i], boxes[0], size=size, margin=margin) for i in indices]


class ClipSource(common.Source):
  """A video dataset: subclasses set the label codes and implement `scan` (-> Clips)."""

  clip_frames = schema.CLIP_FRAMES

  def video_index(self, *folders) -> dict:
    """Clip name -> video file under the release's video folders (any depth: DFEW
    splits its videos into part_1..part_N)."""
    out = {}
    for folder in folders:
      root = os.path.join(self.src, folder)
      for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
          if is_video_file(f):
            out.setdefault(os.path.splitext(f)[0], os.path.join(dirpath, f))
    return out

  def clip_from_line(self, where, path, num_frames, code, codes, tally, *, videos=None,
                     keep_other=False, seen=None):
    """The Clip of one annotation line, or None after tallying why not. `codes`: label
    code -> class name (the release's naming); a class outside labels.BASIC is excluded
    (the report lists it, it does not count as a skip), or kept with expression -1 when
    `keep_other`. A missing frame folder falls back to the release's video of the same
    clip (`videos`: name -> file, from `video_index`) when there is one. `seen` (key ->
    where, one dict per split) turns a clip listed twice into a skip."""
    if code not in codes:
      tally.add(common.Skipped(common.LABEL, where,
                               f'code {code}, expected {min(codes)}..{max(codes)}'))
      return None
    name = codes[code]
    basic = labels.BASIC.index(name) if name in labels.BASIC else -1
    if basic < 0 and not keep_other:
      tally.add(common.Excluded(f'{self.name} class {name!r} is not in labels.BASIC', where))
      return None
    found = resolve(self.src, path)
    clip_name = os.path.splitext(os.path.basename(path.rstrip('/\\')))[0]
    if found is None and videos:
      found = videos.get(clip_name)
    if found is None:
      tally.add(common.Skipped(common.MISSING, where, f'{path} (not found under {self.src})'))
      return None
    key = os.path.splitext(self.rel(found))[0].replace(os.sep, '/')
    if seen is not None:   # tfds refuses a split with two records of one key
      if key in seen:
        tally.add(common.Skipped(common.MALFORMED, where, f'{key} already listed at {seen[key]}'))
        return None
      seen[key] = where
    nuisance = common.dumps({f'{self.name}_class': name})
    return Clip(key, found, 0 if os.path.isfile(found) else num_frames, basic, where, nuisance)

  def process(self, unit: Clip):
    if os.path.isdir(unit.path):
      frames = folder_frames(unit, self.clip_frames, self.face_size)
    elif is_video_file(unit.path):
      frames = video_frames(unit, self.clip_frames, self.face_size, self.face_margin)
    else:
      raise common.Skip(common.UNREADABLE, unit.where,
                        f'{unit.path} is neither a frame folder nor a {VIDEO_EXTENSIONS} video')
    encoded = [common.encode(f) for f in frames]
    dist = np.full(len(labels.BASIC), np.nan, np.float32)
    if unit.expression >= 0:
      dist[:] = 0
      dist[unit.expression] = 1
    yield common.Ok(unit.key, schema.empty_record(
        image=encoded[len(encoded) // 2], frames=encoded, id=unit.key, source=self.name,
        expression=unit.expression, label_dist=dist, nuisance=unit.nuisance))

"""Faces across the frames of a webcam stream: detect on every k-th frame, track between.

The LBP cascade (data/faces.py) costs ~120 ms on a whole 640 x 480 frame (it runs on a
320 px copy), too much for 10 frames a second on 2 cores. Between full detections each
known face is looked for again only in a window around where it was, downscaled so the
face spans ~48 px: the same cascade over a ~100 px window costs a few ms (benchmarks/
serve_stream.py measures both). A face the window misses for `max_misses` frames in a
row is dropped; faces that enter the picture are found at the next full detection.

  tracker = Tracker(detect_every=8)
  for frame in frames:                 # uint8 [H, W, 3]
    for track in tracker.update(frame):
      track.id, track.box              # a stable number per face, (x0, y0, x1, y1)

Not thread-safe: one Tracker per stream, its frames in order (the server keeps a lock
per stream).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unifer_jax.data import faces

WINDOW = 2.0      # the search window's side, in face-box sides
WINDOW_PX = 96    # ... downscaled to this many pixels: the face then spans ~48 px
SMOOTH = 0.5      # weight of the previous box in the new one (the cascade's boxes jitter)


@dataclasses.dataclass
class Track:
  id: int
  box: tuple          # (x0, y0, x1, y1) in frame pixels
  misses: int = 0     # frames in a row the window did not find it


def iou(a, b) -> float:
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def redetect(frame: np.ndarray, box) -> tuple | None:
  """The face near `box` in `frame`, searched in a window WINDOW times its size; None if
  the cascade finds none there. The box nearest the old centre wins."""
  h, w = frame.shape[:2]
  side = max(box[2] - box[0], box[3] - box[1]) * WINDOW
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
  x1, y1 = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
  if x1 - x0 < 16 or y1 - y0 < 16:
    return None
  found = faces.detect(frame[y0:y1, x0:x1], max_side=WINDOW_PX, min_size=20)
  if not found:
    return None
  near = min(found, key=lambda b: ((b[0] + b[2]) / 2 + x0 - cx) ** 2
             + ((b[1] + b[3]) / 2 + y0 - cy) ** 2)
  return (near[0] + x0, near[1] + y0, near[2] + x0, near[3] + y0)


class Tracker:
  """Per-frame face boxes with stable ids (see the module docstring)."""

  def __init__(self, detect_every: int = 8, max_misses: int = 3, max_faces: int = 8):
    if detect_every < 1:
      raise ValueError(f'detect_every must be >= 1, got {detect_every}')
    self.detect_every = detect_every
    self.max_misses = max_misses
    self.max_faces = max_faces
    self.tracks: list[Track] = []
    self.frame = 0
    self.next_id = 1
    self.full_detections = 0

  def _follow(self, frame: np.ndarray, tracks: list[Track]) -> None:
    for t in tracks:
      found = redetect(frame, t.box)
      if found is None:
        t.misses += 1
      else:
        t.misses = 0
        t.box = tuple(SMOOTH * o + (1 - SMOOTH) * n for o, n in zip(t.box, found))

  def _detect(self, frame: np.ndarray) -> list[Track]:
    """A full detection; a box that overlaps a known face keeps its id, and a known face
    the whole-frame pass missed (the cascade misses a face now and then) is looked for
    in its window as on other frames."""
    self.full_detections += 1
    boxes = faces.distinct(faces.detect(frame))[:self.max_faces]
    kept, free = [], list(self.tracks)
    for b in boxes:
      best = max(free, key=lambda t: iou(t.box, b), default=None)
      if best is not None and iou(best.box, b) > 0.3:
        free.remove(best)
        kept.append(Track(best.id, b))
      else:
        kept.append(Track(self.next_id, b))
        self.next_id += 1
    self._follow(frame, free)
    return kept + [t for t in free if all(iou(t.box, k.box) <= 0.3 for k in kept)]

  def update(self, frame: np.ndarray) -> list[Track]:
    if self.frame % self.detect_every == 0:
      tracks = self._detect(frame)
    else:
      tracks = self.tracks
      self._follow(frame, tracks)
    self.tracks = [t for t in tracks if t.misses <= self.max_misses][:self.max_faces]
    self.frame += 1
    return list(self.tracks)

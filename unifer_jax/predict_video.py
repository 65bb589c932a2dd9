"""`unifer predict --model DIR clip.mp4`: the expression of the face in a video, per frame
and for the clip, with a timeline PNG.

T frames are sampled uniformly over the video (``schema.clip_indices``, as the clip
builders sample; default T = 32, every frame of a shorter video). The face is found on every sampled frame (data/faces.py,
the builders' detector) and followed: each frame takes the detected box that overlaps the
previous frame's most, or keeps the previous box when the detector misses it there; the
boxes are then smoothed over time (a 5-frame moving average: the detector's boxes jitter
by ~10 % of their size from frame to frame, which alone moves a label). Each crop gets the model's basic-label probabilities (``model.label_probabilities``: the LLM's
label likelihood for a training workdir, the student's head for an export). Output (JSON)::

  {'video': path, 'model': kind, 'frames': T, 'duration_s': ..., 'label': clip label,
   'label_source': how it was reached, 'probabilities': {label: p} (clip),
   'per_frame': [{'t_s': time, 'label': ..., 'probabilities': {...}, 'box': [...],
                  'face_found': bool}, ...],
   'timeline': '<stem>_timeline.png' (in --report)}

The clip label is the mean of the per-frame distributions (a frame vote that weighs
confidence); the timeline PNG shows face crops along the top and each label's
probability over time below. A file PyAV cannot decode, a video without frames, or one
where no frame shows a face gets a one-line PredictError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unifer_jax.data import faces, labels, schema

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.mov', '.webm', '.y4m')
DEFAULT_FRAMES = 32
THUMBS = 8           # face crops along the timeline's top
THUMB_PX = 96


def is_video(path: str) -> bool:
  return str(path).lower().endswith(VIDEO_EXTENSIONS)


def read_frames(path: str, t: int = DEFAULT_FRAMES) -> tuple[list, list, float]:
  """(T RGB frames, their times in s, the video's duration in s), sampled uniformly.
  One pass when the container declares its frame count, else a counting pass first."""
  from unifer_jax.predict import PredictError  # pylint: disable=g-import-not-at-top
  import av  # pylint: disable=g-import-not-at-top  (only videos need PyAV)

  def one_pass(indices):
    kept, n, rate = {}, 0, 0.0
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise PredictError(f'{path}: no video stream')
      stream = container.streams.video[0]
      rate = float(stream.average_rate or 0) or 25.0
      if indices is None and stream.frames:
        indices = schema.clip_indices(stream.frames, min(t, stream.frames))
      keep = set(indices or ())
      for frame in container.decode(video=0):
        if n in keep:
          kept[n] = (frame.to_ndarray(format='rgb24'),
                     float(frame.time) if frame.time is not None else n / rate)
        n += 1
    return n, kept, indices, rate

  try:
    n, kept, indices, rate = one_pass(None)
    if n and (indices is None or not set(indices) <= set(kept)):
      n, kept, indices, rate = one_pass(schema.clip_indices(n, min(t, n)))
  except FileNotFoundError:
    raise PredictError(f'{path}: no such file') from None
  except av.error.FFmpegError as e:
    raise PredictError(f'{path}: not a readable video ({type(e).__name__}: '
                       f'{str(e).splitlines()[0][:100]})') from None
  if n == 0:
    raise PredictError(f'{path}: the video has no frames')
  frames = [kept[i][0] for i in indices]
  times = [kept[i][1] for i in indices]
  return frames, times, n / rate


def follow_face(frames: list) -> tuple[list, list]:
  """(one box per frame, whether the detector found it there). The first box is the
  largest face of the first frame that has one; later frames take the detection that
  overlaps the previous box most (any overlap), else keep it."""
  from unifer_jax.serve.tracking import iou  # pylint: disable=g-import-not-at-top
  detected = [faces.distinct(faces.detect(f)) for f in frames]
  first = next((k for k, b in enumerate(detected) if b), None)
  if first is None:
    return [], []
  box, boxes, found = detected[first][0], [], []
  for k, cands in enumerate(detected):
    best = max(cands, key=lambda b: iou(b, box), default=None) if k >= first else None
    hit = best is not None and (k == first or iou(best, box) > 0)
    if hit:
      box = best
    boxes.append(box)
    found.append(bool(hit))
  return boxes, found


def smooth_boxes(boxes: list, window: int = 5) -> list:
  """Each coordinate averaged over a centred window of frames (edges repeated)."""
  b = np.asarray(boxes, np.float64)
  if len(b) < 3:
    return [tuple(x) for x in b.round(1)]
  half = min(window, len(b) - (1 - len(b) % 2)) // 2
  padded = np.concatenate([b[:1].repeat(half, 0), b, b[-1:].repeat(half, 0)])
  kernel = np.ones(2 * half + 1) / (2 * half + 1)
  out = np.stack([np.convolve(padded[:, k], kernel, mode='valid') for k in range(4)], 1)
  return [tuple(x) for x in out.round(1)]   # to the 0.1 px the report gives: what was cut


def predict_video(model, path: str, report_dir: Path | None = None,
                  t: int = DEFAULT_FRAMES) -> dict:
  from unifer_jax.predict import PredictError  # pylint: disable=g-import-not-at-top
  frames, times, duration = read_frames(path, t)
  boxes, found = follow_face(frames)
  if not boxes:
    raise PredictError(f'{path}: no face found in any of {len(frames)} sampled frames')
  boxes = smooth_boxes(boxes)
  crops = np.stack([faces.crop(f, b, size=model.image_size) for f, b in zip(frames, boxes)])
  probs = np.asarray(model.label_probabilities(crops), np.float64)     # [T, 8]
  clip = probs.mean(0)
  names = labels.BASIC
  rec = {
      'video': str(path), 'model': model.kind, 'frames': len(frames),
      'duration_s': round(duration, 3),
      'label': names[int(clip.argmax())],
      'label_source': f'mean of the {len(frames)} sampled frames\' label distributions '
                      f'({model.label_source})',
      'probabilities': {n: float(p) for n, p in zip(names, clip)},
      'per_frame': [{'t_s': round(tt, 3), 'label': names[int(p.argmax())],
                     'probabilities': {n: float(v) for n, v in zip(names, p)},
                     'box': [round(float(v), 1) for v in b], 'face_found': f}
                    for tt, p, b, f in zip(times, probs, boxes, found)],
  }
  if report_dir is not None:
    thumbs = [faces.crop(frames[k], boxes[k], size=THUMB_PX)
              for k in np.linspace(0, len(frames) - 1, min(THUMBS, len(frames))).astype(int)]
    out = Path(report_dir) / f'{Path(path).stem}_timeline.png'
    plot_timeline(times, probs, thumbs, rec['label'], Path(path).name, out)
    rec['timeline'] = out.name
  return rec


def plot_timeline(times, probs: np.ndarray, thumbs: list, clip_label: str, title: str,
                  out: Path) -> Path:
  """Face crops along the top; each basic label's probability over time below (the
  clip's label drawn thick)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = plt.figure(figsize=(10, 5.2))
  grid = fig.add_gridspec(2, len(thumbs), height_ratios=(1, 2.4), hspace=0.25)
  for k, im in enumerate(thumbs):
    ax = fig.add_subplot(grid[0, k])
    ax.imshow(im)
    ax.axis('off')
  ax = fig.add_subplot(grid[1, :])
  colours = plt.get_cmap('tab10')
  for c, name in enumerate(labels.BASIC):
    ax.plot(times, probs[:, c], color=colours(c), label=name,
            linewidth=3 if name == clip_label else 1.2)
  ax.set_xlabel('time (s)')
  ax.set_ylabel('p(label)')
  ax.set_ylim(0, 1)
  ax.legend(ncol=4, fontsize=8, loc='upper left')
  fig.suptitle(f'{title}: {clip_label}')
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=80, bbox_inches='tight')
  plt.close(fig)
  return out

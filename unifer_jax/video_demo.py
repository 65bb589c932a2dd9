"""`unifer demo --video`: the clip part of the demo, after instruct (issue 34 item 5).

synthetic_clips (CLIPS clips of 16 frames at 64 px, basic expressions only: the figures of
configs/video.py were measured on such a corpus) -> the `video` stage from the demo's
instruct checkpoint (configs/video.py:demo) -> held-out clips answered by the clip model
and, as the baseline, by the instruct model frame by frame with a majority vote
(evaluators/video.py). Adds to report.json: ``video_clip_acc``,
``video_clip_acc_low_intensity``, ``video_frame_vote_acc``,
``video_frame_vote_acc_low_intensity``, ``video_n``, ``video_low_intensity_n``.

Expected (after `unifer demo` of 2026-12-08 on a 2-core AMD EPYC, quiet; n = 250 test
clips, 89 of them low-intensity): clip model 0.608 / 0.517 (all / low apex intensity),
the instruct model's frame vote 0.392 / 0.281. It took 285 s (clips 28 s, 400 steps 219
s, evaluation 38 s). Off by default: the demo without it does not fit its 20 minutes yet.
"""

from __future__ import annotations

import time
from pathlib import Path

CLIPS = 2500          # 2000 train / 250 validation / 250 test (synthetic_clips' split shares)
CLIP_PX = 64          # the demo ViT's input size: no resize, and a quarter of 112 px's cost
KEYS = ('video_clip_acc', 'video_clip_acc_low_intensity', 'video_frame_vote_acc',
        'video_frame_vote_acc_low_intensity', 'video_n', 'video_low_intensity_n')


def run_video(workdir: Path, overrides=(), preset: str = 'demo', size: int = CLIPS,
              image_size: int = CLIP_PX) -> dict:
  from data_prep import synthetic_clips  # pylint: disable=g-import-not-at-top
  from unifer_jax import demo  # pylint: disable=g-import-not-at-top
  from unifer_jax.evaluators import model_io, video as video_eval  # pylint: disable=g-import-not-at-top
  from unifer_jax.train import loop  # pylint: disable=g-import-not-at-top
  timings = {}
  t = time.monotonic()
  counts = synthetic_clips.prepare(workdir / 'clips', size=size, seed=0, image_size=image_size,
                                   compound_fraction=0.0)
  timings['clips_s'] = time.monotonic() - t
  print(f'clips: {counts}', flush=True)
  t = time.monotonic()
  config = demo.stage_config('video', workdir, workdir / 'instruct', overrides, preset)
  config.input.data_dir = str(workdir / 'clips')
  loop.train(config, workdir / 'video')
  timings['video_train_s'] = time.monotonic() - t
  t = time.monotonic()
  model = model_io.load(workdir / 'video')
  evaluator = video_eval.VideoClips('video', config.evals.video.to_dict())
  results = evaluator.run(model, workdir)
  timings['video_eval_s'] = time.monotonic() - t
  out = {k: results[k] for k in KEYS if k in results}
  out['video_timings'] = timings
  print({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()
         if k != 'video_timings'}, flush=True)
  return out


def markdown(r: dict) -> str:
  if 'video_clip_acc' not in r:
    return ''
  f = lambda k: f'{r[k]:.3f}' if isinstance(r.get(k), (int, float)) else 'n/a'
  return '\n'.join([
      '', '## Clips (`--video`)', '',
      f'Held-out synthetic clips ({r.get("video_n", "?")}, of them '
      f'{r.get("video_low_intensity_n", "?")} with a low apex intensity), basic label.', '',
      '| | all clips | low apex intensity |', '|---|---|---|',
      f'| clip model (configs/video.py) | {f("video_clip_acc")} | '
      f'{f("video_clip_acc_low_intensity")} |',
      f'| instruct model, majority over the frames | {f("video_frame_vote_acc")} | '
      f'{f("video_frame_vote_acc_low_intensity")} |', ''])

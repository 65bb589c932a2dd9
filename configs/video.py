r"""Stage `video`: clips of T frames answered as one (issue 34 item 3). Warm-started from an
instruct workdir; trains what instruct's demo trains (projection, Q-Former queries and
cross-attention, the LLM) plus the clip weights (models/video.py: zero-initialised, so
step 0 is the frame model), with the loss on answer tokens only, on synthetic_clips and
the instruct ``basic`` task. The input reads ``frames`` [T, S, S, 3] per row
(data/clips.py: T sampled uniformly from the 16 stored).

  unifer prep synthetic_clips --out W/clips --size 2500 --image_size 64
  unifer train --config configs/video.py:demo --workdir W/video \
      --config.init.checkpoint=W/instruct --config.input.data_dir=W/clips \
      --config.input.tokenizer=W/tokenizer

Expected: see MEASURED below (filled from the runs that chose the default mode).
Args: the model preset (default demo; tiny for tests).
"""

from unifer_jax import config_lib
from unifer_jax.models import video

FRAMES = 8


def get_config(arg: str = 'demo'):
  preset = arg or 'demo'
  demo = preset == 'demo'
  frozen = (config_lib.VISION_AND_STAGE1_HEADS, config_lib.QFORMER_TEXT_SIDE)
  c = config_lib.stage_config('video', preset, steps=200 if demo else 20, batch_size=16,
                              peak_lr=3e-4, freeze='|'.join(frozen))
  c.model.video = video.default_config(mode='memory', frames=FRAMES, pool='attention')
  c.input.name = 'synthetic_clips'
  c.input.frames = 0                 # 0 = model.video.frames
  # The basic task; a compound clip (synthetic_clips' default corpus has 30 %) is asked
  # its compound label instead (a record is asked only what it is labelled with).
  c.input.tasks = ['basic', 'compound']
  c.input.task_weights = []
  c.input.seq_len = 112 if demo else 64
  # As instruct's demo: the frozen image path was trained un-augmented in place.
  c.input.augment.enabled = False
  c.evals = dict(video=dict(type='video', every_steps=0, dataset=dict(split='test'),
                            max_items=300, frame_model='', batch_size=32))
  if demo:
    for tower in ('vit', 'qformer', 'llm'):
      c.model[tower].unroll_layers = True
  return c

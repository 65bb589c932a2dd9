"""A tiny clip corpus and a tiny video-stage workdir for the clip tests: real records
built by data_prep.synthetic_clips (16 stored frames, 32 px: the tiny preset's size)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def clip_corpus(root: Path, size: int = 30) -> Path:
  """ROOT/clips: ``size`` clips (80/10/10 train/validation/test), basic labels only."""
  from data_prep import synthetic_clips as sc
  sc.prepare(root / 'clips', size=size, seed=0, image_size=32, workers=1, samples=False,
             compound_fraction=0.0)
  return root / 'clips'


def video_config(instruct: dict, clips: Path, *extra: str):
  """configs/video.py:tiny warm-started from ``workdir_util.instruct_workdir(root,
  lora_rank=0)``'s model (T = 4 frames, batch 8: one row per fake device)."""
  from unifer_jax import config_lib
  return config_lib.load(str(REPO / 'configs/video.py:tiny'), [
      f'--config.init.checkpoint={instruct["workdir"]}', f'--config.input.data_dir={clips}',
      f'--config.input.tokenizer={instruct["root"] / "tok"}', *TINY_OVERRIDES, *extra])


# The tiny instruct workdir's vocabulary and lengths, T = 4 frames, batch 8.
TINY_OVERRIDES = (
    '--config.input.seq_len=96', '--config.input.text_len=48', '--config.model.llm.vocab_size=512',
    '--config.model.qformer.vocab_size=512', '--config.model.llm.max_seq_len=320',
    '--config.model.video.frames=4', '--config.input.batch_size=8',
    '--config.checkpoint.async_save=False', '--config.log_every_steps=1')

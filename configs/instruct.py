r"""Stage 3: FER instruction tuning -- basic and compound labels, intensity,
valence/arousal, rationale (action units), uncertainty, open-vocabulary choice -- with
the loss on answer tokens only. Trains the projection, the Q-Former and LoRA adapters
on the LLM (`--config.model.lora.rank=0 --config.freeze=...` for full tuning).

  unifer train --config configs/instruct.py:demo --workdir W/instruct \
      --config.init.checkpoint=W/generate --config.input.data_dir=W/data \
      --config.input.tokenizer=W/tokenizer

Expected (demo preset, 2-core CPU, ~5 min): answers parse to the right basic label
>= 85 % and compound >= 60 % on the held-out split (`unifer demo` measures it).
Args: the model preset (default demo).
"""

from unifer_jax import config_lib


def get_config(arg: str = 'demo'):
  c = config_lib.stage_config(
      'instruct', arg or 'demo', steps=500, batch_size=32, peak_lr=1e-3,
      freeze='|'.join((config_lib.VISION_AND_STAGE1_HEADS, config_lib.QFORMER_TEXT_SIDE,
                       config_lib.LLM_BUT_LORA)))
  c.model.lora.rank = 16
  c.input.seq_len = 128
  if (arg or 'demo') == 'demo':
    # The 2-10-layer CPU towers run their stacked layers as straight-line code (same
    # parameters and checkpoints as the scan): no zero-filled [L, ...] residual stacks
    # (~20 % of the step's op time in a profile) -- 0-6 % faster wall on the shared
    # 2-core box, within its noise (benchmarks/train_step.py docstring).
    for tower in ('vit', 'qformer', 'llm'):
      c.model[tower].unroll_layers = True
  return c

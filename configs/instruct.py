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
      freeze=config_lib.VISION_AND_STAGE1_HEADS + '|' + config_lib.LLM_BUT_LORA)
  c.model.lora.rank = 16
  c.input.seq_len = 128
  return c

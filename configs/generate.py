r"""Stage 2 (BLIP-2 stage 2): the Q-Former's queries, projected, become the prefix of the
frozen LLM; LM loss on the captions. Trains the Q-Former and the projection.

  unifer train --config configs/generate.py:demo --workdir W/generate \
      --config.init.checkpoint=W/align --config.input.data_dir=W/data \
      --config.input.tokenizer=W/tokenizer

Expected (demo preset, 2-core CPU, ~1.5 min): caption token loss well below the
text-only LM's on the same captions (the image tells which action units to name).
Args: the model preset (default demo).
"""

from unifer_jax import config_lib


POD_BATCH = 4096
POD_REMAT = dict(llm='dots')


def get_config(arg: str = 'demo'):
  pod = arg == 'pod'
  c = config_lib.stage_config(
      'generate', '7b' if pod else arg or 'demo', steps=200, batch_size=32, peak_lr=1e-3,
      freeze=config_lib.VISION_STAGE1_HEADS_AND_LLM + '|' + config_lib.QFORMER_TEXT_SIDE)
  c.input.seq_len = 48
  if pod:
    config_lib.pod_variant(c, batch_size=POD_BATCH, remat=POD_REMAT, trained=('qformer',))
  return c

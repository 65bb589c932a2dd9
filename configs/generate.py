r"""Stage 2 (BLIP-2 stage 2): the Q-Former's queries, projected, become the prefix of the
frozen LLM; LM loss on the captions. Trains the Q-Former and the projection.

  unifer train --config configs/generate.py:demo --workdir W/generate \
      --config.init.checkpoint=W/align --config.input.data_dir=W/data \
      --config.input.tokenizer=W/tokenizer

Expected (demo preset, 2-core CPU, ~1.5 min): caption token loss well below the
text-only LM's on the same captions (the image tells which action units to name).
Packed rows (``config.input.pack``, data/packing.py) stay off here: 92 % of the positions
real instead of 64 %, but the frozen LLM leaves the image path the step's bound and the
packed step (16 rows of 128, 4 image slots each) made 0.88x the text tokens per second
(benchmarks/data_pipeline.py, 2026-12-07).
Pod variant, `configs/generate.py:pod`: the 7b preset, FSDP over every chip, bf16 compute,
the frozen ViT and LLM in bf16, the Q-Former in f32; global batch 4096 (64 captions of
48 tokens + 32 query tokens per chip on v5p-128); LLM remat 'dots' (the gradient flows
back through the frozen LLM to the prefix: its matmul outputs are kept, no matmul is
recomputed).

  unifer compile-check --config configs/generate.py:pod --topology v5p-128

Expected (2026-12-07, libtpu 0.0.42, 8 min to compile here): fits at 22.7 GiB of 95 per
chip (24 %); model FLOPs 1.471e+14 per chip (= executed); HBM traffic 396.8 GiB by the
compiled HLO; roofline compute 320.4 ms, HBM 154.1 ms, communication 87.4 ms:
compute-bound, implied MFU <= 100 % (matmuls only: the bound is the compute time).
Args: the model preset (default demo), or pod.
"""

from unifer_jax import config_lib


POD_BATCH = 4096
POD_REMAT = dict(llm='dots')


def get_config(arg: str = 'demo'):
  pod = arg == 'pod'
  c = config_lib.stage_config(
      'generate', '7b' if pod else arg or 'demo', steps=200, batch_size=32, peak_lr=1e-3,
      freeze=config_lib.VISION_STAGE1_HEADS_AND_LLM + '|' + config_lib.QFORMER_TEXT_SIDE)
  # [bos] caption [eos]: the corpus's captions name the face's look too (data_prep/
  # look_words.py), 71 tokens at most over the demo's training faces; at 48 a third of the
  # rows lost their tail. Cost on the demo (2026-12-07, 35 steps each, shared 2-core box):
  # 48 -> 80 tokens multiplied the step's FLOPs by 1.42 (0.84 -> 1.16 s); 72 sits between.
  # (The image prefix comes on top: a preset with a short LLM -- tiny -- gets what fits.)
  c.input.seq_len = 48 if pod else min(72, c.model.llm.max_seq_len - c.model.qformer.num_queries)
  # Captions say left and right (head turn, light): a mirrored image would contradict them.
  c.input.augment.flip = 0.0
  if pod:
    config_lib.pod_variant(c, batch_size=POD_BATCH, remat=POD_REMAT, trained=('qformer',))
  return c

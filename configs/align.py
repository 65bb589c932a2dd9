r"""Stage 1 (BLIP-2 stage 1): ITC + ITM (hard negatives) + ITG on the Q-Former, weighted by
`config.align.weights` (a zero ITM weight skips it; see the note on ITM below). The demo
trains the ViT too (it starts from scratch); with a pretrained ViT (`init.vision`) freeze
it with `--config.freeze='^(vit|llm|llm_proj)(/|$)'`.

  unifer train --config configs/align.py:demo --workdir W/align \
      --config.input.data_dir=W/data --config.input.tokenizer=W/tokenizer

Expected (demo preset, from configs/vision.py's checkpoint, 400 steps, 2-core CPU, about
3.5 min quiet): ITC well below ln(batch) = 3.47 (1.9 at step 400); ITM's loss leaves its 1:2
prior's entropy (0.637) after ~120 steps and ends near 0.44 (training accuracy 0.78).
Every caption names the face's look beside its action units (data_prep/look_words.py: no
two faces share one), so retrieval is scored per face and per label. On 1000 held-out
faces (one run, 2026-12-07, demo vision checkpoint, shared box): zero-shot accuracy over
the 8 basic classes 0.827, held-out ITM accuracy 0.773 (positives 0.606, negatives 0.857;
prior 0.667), label-level R@1 0.723, per-face image->text R@1 / 5 / 10 0.025 / 0.113 /
0.221 (chance 0.001). The same stage with ITM off: zero-shot 0.599, per-face R@1 0.080,
label R@1 0.766; run-to-run spread of zero-shot is wide (0.39-0.83 across runs of this
corpus), so compare with benchmarks/seeds.py, not one run. Goals (issue 32): ITM >= 0.85,
per-face R@1 >= 0.30, zero-shot >= 0.80 over 3 seeds. text_len 80 holds every caption
(mean 46 tokens, max 71): step FLOPs x1.25 of 48.
Pod variant, `configs/align.py:pod`: the 7b preset with its pretrained ViT-L frozen (bf16),
the Q-Former trained in f32 under full remat, FSDP over every chip, bf16 compute, the
ViT's attention on the fused TPU kernel (models/flash.py); global batch 8192 (128 images
per chip on v5p-128; ITC contrasts over all 8192).

  unifer compile-check --config configs/align.py:pod --topology v5p-128

Expected (2026-12-07, libtpu 0.0.42, 22 min and 8 GB to compile here): fits at 12.7 GiB
of 95 per chip (13 %); model FLOPs 5.555e+13 per chip, executed 6.829e+13 (remat, and
the kernel's keys padded 257 -> 384); HBM traffic 337.5 GiB by the compiled HLO; roofline
compute 148.8 ms, HBM 131.1 ms, communication 15.5 ms: compute-bound, implied MFU <=
81.3 %. Before (plain-XLA attention, Dense matmuls on [B*T, D]): 439.3 GiB, 147.9 vs
170.6 ms, HBM-bound, MFU <= 70.9 %; neither batch 16384 nor 96-token captions tipped it.
What tipped it was mostly the matmul layout: Dense on [B, T, D] on TPU (merging 128 x
257 tokens is a relayout under the TPU's (8, 128) tiles). With it and XLA attention
(`--config.attention=xla`) the step is compute-bound already: 346.2 GiB, HBM 134.4 ms vs
compute 147.9 ms, MFU <= 81.8 % (12.8 GiB); the kernel takes 8.7 GiB more off for 0.9 ms
of padded-key compute (a wash under the roofline's perfect overlap; less traffic to hide
without it). On the frozen ViT-L's forward alone (128 images per chip, v5p:2x2x1): 119
GiB per chip flattened, 59 GiB on [B, T, D], 50 GiB on the fused kernel (no f32 scores;
q/k/v projected straight into its [B, N, T, H] layout). The
Q-Former stays on XLA attention: on the kernel (keys padded 80 -> 128 and 257 -> 384, f32
softmax statistics saved for its backward) the step moved 473 GiB instead of 439. Left in
the HLO: the Q-Former's remat recompute and backward matmuls (55 GiB), its XLA attention
(45 GiB), the towers' forward matmuls (21 GiB), async copies (27 GiB).
Args: the model preset (default demo), or pod.
"""

import ml_collections

from unifer_jax import config_lib

POD_BATCH = 8192
POD_REMAT = dict(qformer='full')


def get_config(arg: str = 'demo'):
  pod = arg == 'pod'
  c = config_lib.stage_config('align', '7b' if pod else arg or 'demo', steps=400, batch_size=32,
                              peak_lr=1e-3, freeze=config_lib.LLM_PROJ_AND_LABEL_HEAD)
  # The corpus's captions name the face's look beside its action units (data_prep/
  # look_words.py): with [CLS] and EOS 46 tokens on average, p99 64, max 71 over the demo's
  # 16000 training faces; 80 keeps every one whole (the pipeline warns when a row is cut).
  # The pod's compile-check figures above are for 48-token captions; the tiny test preset
  # holds 64 positions.
  c.input.text_len = 48 if pod else min(80, c.model.qformer.max_position)
  # Captions say left and right (head turn, light): a mirrored image would contradict them.
  c.input.augment.flip = 0.0
  # itm_hardness scales the ITC similarities ITM's negatives are drawn by: 1 = BLIP-2's
  # hard mining, 0 = uniform over the true negatives; itm_uniform_fraction draws that share
  # of the negatives uniformly whatever the hardness (align_losses.sample_hard_negatives).
  c.align = ml_collections.ConfigDict(dict(weights=dict(itc=1.0, itm=1.0, itg=1.0),
                                            itm_hardness=1.0, itm_uniform_fraction=0.0))
  if pod:
    # A pretrained ViT (init.vision), frozen; the Q-Former learns to query it.
    c.freeze = r'^(vit|vision_norm)(/|$)|' + config_lib.LLM_PROJ_AND_LABEL_HEAD
    config_lib.pod_variant(c, batch_size=POD_BATCH, remat=POD_REMAT, trained=('qformer',))
    # The frozen ViT's self-attention (257 tokens, 16 heads) on the fused TPU kernel
    # (models/flash.py): its f32 scores were the largest HBM traffic left in plain XLA.
    # Not the Q-Former's: over 32 queries or 80 tokens its scores are small, and the
    # kernel's key padding (-> 384 / 128) and f32 softmax statistics moved more bytes
    # than they saved (473 vs 439 GiB with both towers on it).
    c.model.vit.attention = 'flash'
  if (arg or 'demo') == 'demo':
    # ITM from scratch needs weight against ITC and ITG on the shared Q-Former (at weight 1
    # its loss sat at the prior's entropy for the whole stage, with hard or uniform
    # negatives) and some easy negatives to start from (hard ones alone: no learning before
    # step ~200, held-out 0.719 with a "no" bias). It costs ~38 % of the align step.
    c.align.weights.itm = 10.0
    c.align.itm_uniform_fraction = 0.2
  return c

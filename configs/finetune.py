r"""Fine-tune a pretrained BLIP-2 / InstructBLIP on real FER data: the recipe for photos.

The demo's model knows only the rendered faces of the built-in corpus; real photos need
a model that has seen the world. This starts from a whole Hugging Face BLIP-2 or
InstructBLIP directory (every tower, the aligned queries and the projection load;
convert/vlm.py): ViT frozen, Q-Former and projection trained, LoRA on the LLM, FER
instructions (basic and compound labels, FERBench-style candidate lists, valence/arousal
and FERPlus's vote distributions where the data has them) from
the real datasets as they ship, prepared once with `unifer prep` (DATASETS.md):

  unifer prep rafdb --src /data/RAF-DB --out W/data
  unifer prep rafdb_compound --src /data/RAF-DB --out W/data
  unifer prep ferplus --src /data/FERPlus --out W/data
  unifer prep affectnet --src /data/AffectNet --out W/data
  unifer train --config configs/finetune.py:7b,/models/instructblip-vicuna-7b \
      --workdir W/finetune --config.input.data_dir=W/data
  unifer eval --config configs/evals/ferbench.py:/data/fer --workdir W/finetune
  unifer train --config configs/distill.py:224 --workdir W/distill \
      --config.distill.teacher_workdir=W/finetune --config.input.data_dir=W/data \
      --config.input.mixture="[['rafdb', 1.0], ['ferplus', 1.0], ['affectnet', 1.0]]"
  unifer export --workdir W/distill --out W/export --format onnx

On a TPU pod, launch the same train command with launch/tpu_pod.py; check first that it
fits: `unifer compile-check --config configs/finetune.py:7b --topology v5p-8`.
The tokenizers (the LLM's in HF_DIR, the Q-Former's in HF_DIR/qformer_tokenizer as
InstructBlipProcessor saves it) and the image normalisation (HF_DIR's
preprocessor_config.json) come from the directory.

Expected: no figure measured here -- this machine has neither the pretrained weights
nor the licensed datasets. What runs here is the whole recipe on a tiny random
InstructBLIP and a RAF-DB-layout fixture (tests/test_finetune.py: 30 steps, FERBench
protocol, distillation, export). For comparison (DATASETS.md): ExpLLM (LoRA on
Vicuna-7B) RAF-DB 91.03; GPT-4V zero-shot 75.81; UniFER-7B FERBench overall 68.84.

Args: VARIANT[,HF_DIR]. VARIANT: '7b' (pods: FSDP over every device, bf16 compute,
full remat) or 'cpu' (one CPU, small batches: the test's tiny models). HF_DIR: the
BLIP-2 / InstructBLIP directory; for '7b' it defaults to configs/hf/instructblip-vicuna-7b,
which holds InstructBLIP-Vicuna-7B's config.json only -- enough for compile-check, not for
training (give the downloaded directory).
"""

import json
from pathlib import Path


from unifer_jax import config_lib
from unifer_jax.data import augment
from unifer_jax.evaluators import ferbench
from unifer_jax.models import presets

SHAPES_ONLY = Path(__file__).parent / 'hf' / 'instructblip-vicuna-7b'
# Prepared with `unifer prep` (tfds names); weights follow the datasets' sizes loosely.
MIXTURE = [['rafdb', 1.0], ['rafdb_compound', 0.5], ['ferplus', 1.0], ['affectnet', 2.0]]
# ViT frozen (its post_layernorm included), the LLM frozen but for its LoRA adapters;
# the Q-Former (queries, instruction embeddings) and the projection train.
FREEZE = r'^vit/|' + config_lib.LLM_BUT_LORA


def _preprocessing(hf_dir: Path) -> tuple[tuple, tuple]:
  """The directory's pixel statistics; BLIP-2's (CLIP's) where it has none."""
  path = hf_dir / 'preprocessor_config.json'
  c = json.loads(path.read_text()) if path.is_file() else {}
  return (tuple(c.get('image_mean', augment.CLIP_MEAN)),
          tuple(c.get('image_std', augment.CLIP_STD)))


def get_config(arg: str = '7b'):
  variant, _, hf_dir = (arg or '7b').partition(',')
  if variant not in ('7b', 'cpu'):
    raise ValueError(f'configs/finetune.py:{arg}: VARIANT must be 7b or cpu')
  if not hf_dir and variant != '7b':
    raise ValueError(f'configs/finetune.py:{arg}: give the BLIP-2 / InstructBLIP directory '
                     '(configs/finetune.py:cpu,HF_DIR)')
  hf_dir = Path(hf_dir or SHAPES_ONLY).absolute()
  pod = variant == '7b'
  c = config_lib.stage_config('instruct', '7b' if pod else 'tiny', steps=3000 if pod else 30,
                              batch_size=128 if pod else 8, peak_lr=1e-4 if pod else 1e-3,
                              freeze=FREEZE)
  c.init.vlm = str(hf_dir)
  model = c.model
  model.stage1_heads = False   # no ITC/ITM/label heads: this recipe trains the answers
  model.lora.rank = 16
  model.lora.alpha = 32.0
  if pod:
    presets.set_compute_dtype(model, 'bfloat16')
    # The frozen towers stay in the checkpoint's bf16; the trained Q-Former keeps f32.
    model.vit.param_dtype = model.llm.param_dtype = 'bfloat16'
    model.qformer.param_dtype = 'float32'
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.remat = 'full'
  # Inputs: the directory's tokenizers and preprocessing, the real datasets' instructions.
  c.input.tokenizer = str(hf_dir)
  qformer_tokenizer = hf_dir / 'qformer_tokenizer'
  c.input.text_tokenizer = str(qformer_tokenizer) if qformer_tokenizer.is_dir() else ''
  c.input.image_mean, c.input.image_std = _preprocessing(hf_dir)
  c.input.mixture = MIXTURE if pod else [['rafdb', 1.0], ['rafdb_compound', 1.0]]
  # What the real datasets label: RAF-DB basic / compound, FERPlus's vote distribution
  # (uncertainty), AffectNet's valence/arousal; FERBench-style candidate lists.
  c.input.tasks = ['basic', 'compound', 'valence_arousal', 'uncertainty', 'open_vocab']
  c.input.seq_len = 256 if pod else 64
  # The Q-Former reads the prompt too (InstructBLIP); FERBench-style candidate lists run
  # to ~90 WordPiece tokens.
  c.input.text_len = 128 if pod else 64
  c.input.augment.enabled = pod   # flips, colour, occlusion; no crops (stage_config)
  c.checkpoint.every_steps = 500 if pod else 10
  # FERBench at the end of training (--config.ferbench.image_root=/data/fer).
  c.ferbench = dict(image_root='', items='/work/shared/ferbench')
  c.evals = ferbench.evals_config(c.ferbench.get_ref('image_root'), c.ferbench.get_ref('items'),
                                  max_new_tokens=256 if pod else 32)
  for entry in c.evals.values():
    entry.every_steps = c.total_steps
  return c

"""Model presets: named UniFER sizes, each a full model ConfigDict.

| preset | vision                     | Q-Former              | LLM                        | use |
|--------|----------------------------|-----------------------|----------------------------|-----|
| tiny   | 32 px, 2x32                | 2x32, 4 queries       | 2x32, vocab 128            | unit tests |
| demo   | 64 px /8, conv stem, 4x128 | 2x128, 16 queries     | 4x192, GQA 4:2, vocab 2048 | `unifer demo` on CPU, minutes |
| base   | ViT-B/16 224               | BERT-base, 32 queries | ~1.2B Llama-3.2-1B shape   | first real runs |
| 7b     | ViT-L/14 224               | BERT-base, 32 queries | Llama-2-7B shape           | pod runs |

`python -m unifer_jax.cli params --preset tiny demo base 7b` (or `make params`) prints
their parameter counts, built abstractly with `jax.eval_shape` (nothing allocated).
"""

from __future__ import annotations

import ml_collections

from unifer_jax.models import llm, qformer, vit

PRESETS = ('tiny', 'demo', 'base', '7b')


def _vit(**kw):
  return vit.default_config(**kw)


def _qformer(**kw):
  return qformer.default_config(**kw)


def _llm(**kw):
  # Llama-2-7B shape unless overridden.
  base = dict(vocab_size=32000, hidden=4096, depth=32, heads=32, kv_heads=32, head_dim=128,
              mlp_dim=11008, rope_theta=10000.0, rms_eps=1e-5, max_seq_len=2048)
  base.update(kw)
  return llm.default_config(**base)


def _unifer(vit, qformer, llm, embed_dim=256, from_scratch=False):
  qformer.encoder_width = vit.width
  # LoRA on the LLM (rank 0 = off; the instruct stage turns it on by config).
  adapters = dict(rank=0, alpha=16.0, targets=r'attn/(q|k|v|o)$|mlp/(gate|up|down)$')
  return ml_collections.ConfigDict(dict(vit=vit, qformer=qformer, llm=llm, embed_dim=embed_dim,
                                        vision_layernorm=True, lora=adapters,
                                        # Towers trained from scratch (no HF
                                        # checkpoint) need both; see models/unifer.py.
                                        vision_token_gain=from_scratch,
                                        text_pool='mean' if from_scratch else 'cls'))


def get(name: str) -> ml_collections.ConfigDict:
  """The UniFER model config of a preset."""
  if name == 'tiny':
    return _unifer(
        _vit(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64),
        _qformer(hidden=32, depth=2, heads=2, mlp_dim=64, num_queries=4, vocab_size=128,
                 max_position=64),
        _llm(vocab_size=128, hidden=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64,
             max_seq_len=64),
        embed_dim=16)
  if name == 'demo':
    # Sized for the 2-core CPU demo (~25 align / ~40 instruct samples per CPU-second):
    # the Q-Former runs 6 passes per align sample (ITC x2, ITM x3, ITG), so it stays small.
    return _unifer(
        # A conv stem: the from-scratch tower reads the faint mouth-corner cues that
        # separate contempt from neutral (vit.ConvStem).
        _vit(image_size=64, patch_size=8, width=128, depth=4, heads=4, mlp_dim=512,
             stem='conv', stem_channels=(32, 64, 128)),
        _qformer(hidden=128, depth=2, heads=4, mlp_dim=512, num_queries=16,
                 cross_attention_freq=1, vocab_size=2048, max_position=128),
        _llm(vocab_size=2048, hidden=192, depth=4, heads=4, kv_heads=2, head_dim=48,
             mlp_dim=512, max_seq_len=256, tie_embeddings=True),
        embed_dim=128, from_scratch=True)
  if name == 'base':
    return set_compute_dtype(_unifer(
        _vit(),
        _qformer(),
        _llm(vocab_size=128256, hidden=2048, depth=16, heads=32, kv_heads=8, head_dim=64,
             mlp_dim=8192, rope_theta=500000.0, rope_scaling='llama3', rope_factor=32.0,
             tie_embeddings=True, max_seq_len=4096),
    ), 'bfloat16')
  if name == '7b':
    return set_compute_dtype(_unifer(
        _vit(patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096),
        _qformer(),
        _llm(max_seq_len=4096),
    ), 'bfloat16')
  raise ValueError(f'unknown model preset {name!r}; expected one of {PRESETS}')


def resolve(model) -> ml_collections.ConfigDict:
  """``config.model`` may be a preset name or a full model config."""
  if isinstance(model, str):
    return get(model)
  return model


def set_compute_dtype(model_cfg: ml_collections.ConfigDict, dtype: str) -> ml_collections.ConfigDict:
  """bf16 (or f32) compute for every tower; parameters stay in their param_dtype."""
  for tower in ('vit', 'qformer', 'llm'):
    model_cfg[tower].dtype = dtype
  return model_cfg


def vision_config(model_cfg) -> ml_collections.ConfigDict:
  """The image encoder's config: UniFER's ``vit``, a student's ``encoder``."""
  return model_cfg.vit if 'vit' in model_cfg else model_cfg.encoder

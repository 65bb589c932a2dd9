"""``unifer convert check``: the HF PyTorch model and ours on the same random inputs.

MaxText's forward-pass logit checker, for every tower: both models run in float32
(bf16 weights are upcast exactly on both sides, so only the implementations differ).
LLMs: max abs diff of the logits and KL(HF || ours) of the next-token distributions at
every position (plus top-1 agreement). Encoders (vision, BERT, Q-Former): max abs diff
and cosine similarity of the last hidden states per token (unpadded ones). InstructBLIP's
Q-Former runs on queries plus a right-padded instruction; inside a whole BLIP-2 /
InstructBLIP the learned queries' outputs are compared (the LLM prefix before projection). Fails (exit 1) when the max
abs diff exceeds ``--atol`` or, for LLMs, the max KL exceeds ``--max-kl``.

torch is only in the test extra: without it the check explains that and exits 2.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from unifer_jax import convert
from unifer_jax.convert import commands, llm, vision, vlm
from unifer_jax.convert.hf_io import ConversionError

NEEDS_TORCH = (
    'unifer convert check runs the Hugging Face model in PyTorch as the reference, and '
    'torch is not importable in this environment. Install it (CPU build) with the test '
    "extra: pip install -e '.[test]' (torch==2.13.0), then run the check again. "
    'Conversion itself (from-hf / to-hf) does not need torch.')


@dataclasses.dataclass
class Result:
  lines: list[str]
  max_abs: float
  max_kl: float | None  # LLMs only
  ok: bool


# -- inputs and the two models ---------------------------------------------------------

_NOT_IN_AUTO_MODEL = {'blip_2_vision_model': 'Blip2VisionModel',
                      'instructblip_vision_model': 'InstructBlipVisionModel'}


def _input_kind(model_type: str) -> str:
  if model_type in llm.MODEL_TYPES:
    return 'tokens'
  if model_type in vision.MODEL_TYPES:
    return 'pixels'
  if model_type in vlm.MODEL_TYPES:
    return 'vlm'
  return {'bert': 'text', 'blip_2_qformer': 'queries', 'instructblip_qformer': 'instruction'
          }[model_type]


def _padded_ids(rng, vocab: int, batch: int, length: int, avoid: int = -1) -> dict:
  """Random ids in [1, vocab) but ``avoid``, the last row right-padded to half."""
  ids = rng.integers(1, vocab - 1, (batch, length))
  ids = np.where(ids >= avoid, ids + 1, ids) if avoid >= 1 else ids
  mask = np.ones((batch, length), np.int64)
  mask[-1, length // 2:] = 0
  return dict(ids=ids, mask=mask)


def _inputs(kind: str, cfg, rng: np.random.Generator, batch: int, seq_len: int) -> dict:
  if kind == 'vlm':  # the text avoids the image token, which HF replaces by the queries
    s, c = cfg.vit.image_size, cfg.vit.num_channels
    out = _padded_ids(rng, cfg.llm.vocab_size, batch, seq_len, cfg.image_token_index)
    out['pixels'] = rng.standard_normal((batch, s, s, c), np.float32)
    if cfg.qformer.get('instruction_aware', False):
      q = _padded_ids(rng, cfg.qformer.vocab_size, batch, min(seq_len, cfg.qformer.max_position))
      out.update(qformer_ids=q['ids'], qformer_mask=q['mask'])
    return out
  if kind == 'tokens':
    return dict(ids=rng.integers(0, cfg.vocab_size, (batch, min(seq_len, cfg.max_seq_len))))
  if kind == 'pixels':
    s, c = cfg.image_size, cfg.num_channels
    return dict(pixels=rng.standard_normal((batch, s, s, c), np.float32))
  if kind == 'text':  # right padding on the last row; compared on valid tokens only
    return _padded_ids(rng, cfg.vocab_size, batch, min(seq_len, cfg.max_position))
  image = rng.standard_normal((batch, 10, cfg.encoder_width), np.float32)
  queries = rng.standard_normal((batch, cfg.num_queries or 8, cfg.hidden), np.float32)
  if kind == 'queries':
    return dict(queries=queries, image=image)
  # 'instruction': HF's mask covers queries and text
  text = _padded_ids(rng, cfg.vocab_size, batch, min(seq_len, cfg.max_position))
  full = np.concatenate([np.ones(queries.shape[:2], np.int64), text['mask']], axis=1)
  return dict(ids=text['ids'], full_mask=full, queries=queries, image=image, valid=full)


def _hf_forward(hf_dir: Path, model_type: str, cfg, kind: str):
  """(HF class name, fn(inputs) -> numpy output) of the PyTorch reference."""
  import torch
  import transformers as T

  def load(cls, **kw):
    return cls.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True, **kw).eval()

  t = torch.from_numpy
  if kind == 'vlm':
    m = load(getattr(T, vlm.HF_CLASS[model_type]))
    q = cfg.qformer.num_queries

    def fn(x):
      b = len(x['ids'])
      extra = {}
      if 'qformer_ids' in x:
        extra = dict(qformer_input_ids=t(x['qformer_ids']),
                     qformer_attention_mask=t(x['qformer_mask']))
      ids = np.concatenate([np.full((b, q), cfg.image_token_index), x['ids']], 1)
      mask = np.concatenate([np.ones((b, q), np.int64), x['mask']], 1)
      return m(pixel_values=t(x['pixels'].transpose(0, 3, 1, 2).copy()), input_ids=t(ids),
               attention_mask=t(mask), **extra).logits
  elif kind == 'tokens':
    m = load(T.AutoModelForCausalLM)
    fn = lambda x: m(input_ids=t(x['ids'])).logits
  elif kind == 'pixels':
    if model_type == 'vit':
      m = load(T.ViTModel, add_pooling_layer=bool(cfg.get('pooler', False)))
    elif model_type in _NOT_IN_AUTO_MODEL:  # AutoModel does not map these model_types
      m = load(getattr(T, _NOT_IN_AUTO_MODEL[model_type]))
    else:
      m = load(T.AutoModel)
      m = m.vision_model if model_type in ('clip', 'siglip') else m
    fn = lambda x: m(pixel_values=t(x['pixels'].transpose(0, 3, 1, 2).copy())).last_hidden_state
  elif kind == 'text':
    m = load(T.BertModel, add_pooling_layer=bool(cfg.get('pooler', False)))
    fn = lambda x: m(input_ids=t(x['ids']), attention_mask=t(x['mask'])).last_hidden_state
  elif kind == 'queries':
    m = load(T.Blip2QFormerModel)
    fn = lambda x: m(query_embeds=t(x['queries']),
                     encoder_hidden_states=t(x['image'])).last_hidden_state
  else:  # 'instruction'
    m = load(T.InstructBlipQFormerModel)
    fn = lambda x: m(input_ids=t(x['ids']), attention_mask=t(x['full_mask']),
                     query_embeds=t(x['queries']),
                     encoder_hidden_states=t(x['image'])).last_hidden_state

  def run(x):
    with torch.no_grad():
      return fn(x).float().numpy()
  return type(m).__name__, run


def _our_forward(tower: commands.Tower, kind: str):
  """fn(inputs) -> numpy output of our module, float32 params and compute."""
  cfg = ml_collections.ConfigDict(tower.cfg.to_dict())
  for sub in ([cfg[k] for k in ('vit', 'qformer', 'llm')] if kind == 'vlm' else [cfg]):
    sub.param_dtype = sub.dtype = 'float32'
  params = commands.cast_params(tower.params(cfg), 'float32')
  module = nnx.eval_shape(lambda: tower.converter.build(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(convert.fill(module, params))
  call = {'tokens': lambda m, x: m(x['ids']),
          'pixels': lambda m, x: m(x['pixels']),
          'text': lambda m, x: m(x['ids'], x['mask']),
          'queries': lambda m, x: m(x['queries'], x['image']),
          'instruction': lambda m, x: m(x['ids'], x['full_mask'], x['queries'], x['image']),
          'vlm': lambda m, x: m(x['pixels'], x['ids'], x['mask'],
                                qformer_input_ids=x.get('qformer_ids'),
                                qformer_attention_mask=x.get('qformer_mask'))}[kind]
  fn = jax.jit(lambda s, x: call(nnx.merge(graphdef, s), x))
  return lambda x: np.asarray(fn(state, x), np.float32)


# -- metrics ---------------------------------------------------------------------------

def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: np.ndarray, ours: np.ndarray, kind: str, valid=None, *, atol: float,
            max_kl: float) -> Result:
  if ref.shape != ours.shape:
    raise ConversionError(f'output shapes differ: HF {ref.shape}, unifer {ours.shape}')
  valid = np.ones(ref.shape[:-1], bool) if valid is None else valid.astype(bool)
  ref, ours = ref[valid], ours[valid]  # [N, D]: one row per compared position
  max_abs = float(np.abs(ref.astype(np.float64) - ours).max())
  ok = bool(max_abs <= atol)  # NaN fails
  lines = [f'  max abs diff {max_abs:.3e} (atol {atol:g}) over {ref.shape[0]} positions']
  kl_max = None
  if kind in ('tokens', 'vlm'):
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    kl_max = float(kl.max())
    ok = ok and bool(kl_max <= max_kl)
    top1 = float((ref.argmax(-1) == ours.argmax(-1)).mean())
    lines.append(f'  next-token KL(HF || unifer): max {kl_max:.3e}, mean {kl.mean():.3e} '
                 f'(max-kl {max_kl:g}); top-1 agreement {100 * top1:.1f}%')
  else:
    a, b = ref.astype(np.float64), ours.astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1),
                                       1e-30)
    lines.append(f'  cosine similarity per token: min {cos.min():.8f}, mean {cos.mean():.8f}')
  return Result(lines, max_abs, kl_max, ok)


# -- the check ---------------------------------------------------------------------------

def check(hf_dir, src, *, atol: float = 1e-3, max_kl: float = 1e-4, batch: int = 2,
          seq_len: int = 16, seed: int = 0) -> Result:
  """Runs the HF model in ``hf_dir`` (PyTorch) and the tower in ``src`` (a converted
  tower directory, or an HF directory read by our converter) on the same inputs."""
  hf_dir = Path(hf_dir)
  converter, hf_config, hf_cfg = convert.hf_tower_config(hf_dir)
  model_type = hf_config['model_type']
  tower = commands.read_tower(src)
  if tower.converter is not converter:
    raise ConversionError(f'--hf {hf_dir} holds a {model_type!r} model, --src {src} a '
                          f'{tower.kind} tower ({tower.model_type!r}); compare like with like')
  kind = _input_kind(model_type)
  inputs = _inputs(kind, tower.cfg, np.random.default_rng(seed), batch, seq_len)
  hf_class, hf_run = _hf_forward(hf_dir, model_type, hf_cfg, kind)
  ref = hf_run(inputs)
  ours = _our_forward(tower, kind)(inputs)
  valid = inputs.get('valid', inputs.get('mask'))
  if kind == 'vlm':  # every image position, then the unpadded text
    valid = np.concatenate([np.ones((batch, tower.cfg.qformer.num_queries), np.int64), valid], 1)
  result = compare(ref, ours, kind, valid, atol=atol, max_kl=max_kl)
  shape = 'x'.join(map(str, next(iter(inputs.values())).shape))
  result.lines.insert(0, f'check: HF {hf_class} ({hf_dir}, torch float32) vs unifer '
                         f'{tower.describe()} on random {kind} {shape} (seed {seed})')
  result.lines.append('PASS' if result.ok else 'FAIL: above tolerance')
  return result


def run(args) -> int:
  try:
    import torch  # noqa: F401
  except ImportError:
    print(NEEDS_TORCH, file=sys.stderr)
    return 2
  result = check(args.hf, args.src, atol=args.atol, max_kl=args.max_kl, batch=args.batch,
                 seq_len=args.seq_len, seed=args.seed)
  print('\n'.join(result.lines))
  return 0 if result.ok else 1

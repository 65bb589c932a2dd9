"""The UniFER train step's MFU against a matmul peak, and its step time against HF PyTorch.

  python benchmarks/train_step.py [--dims demo|reference|both] [--iters 5]
      [--hf_iters 3] [--no_hf]

Measured in ONE run (these machines are shared and noisy, so every number is put next
to a baseline taken minutes apart at most):

1. matmul peak: a jitted f32 and a bf16 [N, N] @ [N, N] (N = 2048, 17 GFLOP), median of
   several timed runs after a warm-up -> GFLOP/s. The f32 one is the denominator of MFU
   (the step computes in f32, as the demo preset does).
2. our step: the trainer's own pieces (``train/state.build`` + ``train/step.compile_step``
   with the ``instruct`` loss of ``configs/instruct.py:demo``: vision tower and stage-1
   heads frozen, LLM frozen but for LoRA rank 16, so the Q-Former, the LLM projection
   and the LoRA adapters train; AdamW), batch 32, seq_len 128 with the loss on the last
   32 tokens (the answer). ``--dims reference`` swaps in the issue's reference sizes
   (ViT 6x256 at 112 px /16, Q-Former 4x256 with 32 queries, LLM 6x384 with vocab 4096).
   Step time = median of ``--iters`` steps after a warm-up, each ended by
   ``block_until_ready``; model FLOPs from ``train/step_cost.step_flops`` (the matmul FLOPs
   of the step's jaxpr, scan bodies times their trip count, the loss's target switch at
   the branch this batch takes -- the costliest branch is printed too); MFU = achieved
   FLOP/s / f32 matmul peak (goal >= 65 %). (The 2048^3 jitted matmul ran on one
   thread on 2026-11-24 and on both cores on 2026-12-02: compare runs by the
   per-CPU-second figures.)
3. HF reference: ``transformers.Blip2ForConditionalGeneration`` with a ``LlamaConfig``
   text model of the same dimensions (vision width/depth/heads/MLP/patch/image size,
   Q-Former depth/width/heads/MLP/queries/cross-attention frequency, LLM depth/width/
   heads/kv-heads/head dim/MLP/vocab, tied embeddings), dropout 0, the same batch and
   sequence lengths (the 32 image tokens Blip2 needs in ``input_ids`` stand for our
   query prefix), the SAME trainable set (Q-Former + query tokens + language projection
   + rank-16 LoRA on the Llama q/k/v/o/gate/up/down, written here since peft is not
   installed), ``torch.optim.AdamW``, ``loss.backward()``; ``torch.set_num_threads`` =
   the machine's cores. Ratio = HF step time / ours (goal >= 1.1x).

Prints numbers and ratios; asserts nothing.

Result on the 2-core box, 2026-11-24, quiet (load 0.2), `--dims demo --iters 5 --hf_iters 3`,
before branch bench-speed: matmul peak f32 186.9 GFLOP/s wall; ours 1317 ms/step (54.4
GFLOP, MFU 22 %), HF 1140 ms -> HF / ours = 0.87x. (Under load 12-15 the same script
printed 3.6x and 67 %: only quiet-machine runs mean anything.)

After bench-speed (2-D Dense matmuls, target-only fused vocabulary projection, grouped
attention, unrolled demo towers), 2026-11-24 -- the box was NEVER quiet during the work
(two other engineers' test suites; load 3-8), so these are loaded numbers:
* same command, load 5.4-6.9, the old code (main) and the new one back to back: ours
  2479 -> 1304 ms wall, 1561 -> 862 ms CPU; MFU per CPU-second 19.8 % -> 33.2 % (49.5
  GFLOP/step now: the vocabulary projection at the non-target positions is no longer
  computed, nor counted; 54.4 before); HF 4029 ms wall, 2662 ms CPU -> HF / ours 3.09x
  wall, 3.09x CPU.
* `--no_hf`, load 3.2, with the first two changes only: matmul peak 188.9 GFLOP/s; ours
  772 ms wall, 769 ms CPU, 49.5 GFLOP -> MFU 34.0 %. Interleaved A/Bs of the full
  branch at load ~3.5 (/tmp scripts, not this one) saw 480-495 ms (best of 11) and
  ~620 ms (median): MFU ~43-55 % against a 187 GFLOP/s peak.
Quiet-machine rerun, 2026-12-02 (load 0.5-0.9, nothing else running), same command:
matmul peak f32 366.8 GFLOP/s wall (184.1 per CPU-second: the jitted matmul now uses
both cores); ours 506 ms wall, 868 ms CPU, 49.5 GFLOP -> MFU 26.7 % of the wall peak
(31.0 % per CPU-second); HF 555 ms wall, 1103 ms CPU -> HF / ours = 1.10x wall, 1.27x
CPU. (Before the demo config's full LLM tuning was overridden back to LoRA rank 16 here,
the two sides trained different sets: ours 548-587 ms at 59.2 GFLOP vs HF 575-666 ms.)
Goal >= 1.1x faster than HF: met at the margin (1.10x wall; 1.27x in CPU time).
Goal MFU >= 65 %: NOT met (27 % of a two-core matmul peak). At the reference dims,
2026-12-02, load ~1, `--dims reference --no_hf`: 2513 ms wall, 282.5 GFLOP -> MFU 38.8 %
(43.8 % per CPU-second). benchmarks/matmul_bound.py bounds what is reachable: with every
matmul at its isolated speed and everything else free, 49-57 % (demo dims) / 71.4 %
(reference dims).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from unifer_jax import config_lib, sharding  # noqa: E402
from unifer_jax.train import losses, step_cost  # noqa: E402
from unifer_jax.train import state as state_lib, step as step_lib  # noqa: E402

BATCH, SEQ_LEN, ANSWER_LEN, LORA_RANK = 32, 128, 32, 16


# ------------------------------------------------------------------ configurations
def demo_config() -> ml_collections.ConfigDict:
  config = config_lib.load('configs/instruct.py:demo')
  config.input.batch_size = BATCH
  config.input.seq_len = SEQ_LEN
  # The demo's instruct tunes its from-scratch LLM in full; the comparison trains what
  # the HF side trains (and what real runs on a pretrained LLM train): LoRA rank 16.
  config.model.lora.rank = LORA_RANK
  config.freeze = config.freeze + '|' + config_lib.LLM_BUT_LORA
  return config


def reference_config() -> ml_collections.ConfigDict:
  """The issue's reference sizes, everything else as configs/instruct.py:demo."""
  config = demo_config()
  m = config.model
  m.vit.update(image_size=112, patch_size=16, width=256, depth=6, heads=4, mlp_dim=1024)
  m.qformer.update(hidden=256, depth=4, heads=4, mlp_dim=1024, num_queries=32,
                   cross_attention_freq=2, encoder_width=256)
  m.llm.update(vocab_size=4096, hidden=384, depth=6, heads=6, kv_heads=2, head_dim=64,
               mlp_dim=1024)
  m.embed_dim = 256
  return config


CONFIGS = {'demo': demo_config, 'reference': reference_config}


def describe(m) -> str:
  v, q, l = m.vit, m.qformer, m.llm
  return (f'ViT {v.depth}x{v.width} (heads {v.heads}, mlp {v.mlp_dim}) at {v.image_size} px '
          f'/{v.patch_size}; Q-Former {q.depth}x{q.hidden} (heads {q.heads}, mlp {q.mlp_dim}, '
          f'{q.num_queries} queries, cross-attn every {q.cross_attention_freq}); LLM '
          f'{l.depth}x{l.hidden} (heads {l.heads}:{l.kv_heads}, head dim {l.head_dim}, mlp '
          f'{l.mlp_dim}, vocab {l.vocab_size}, tied {l.tie_embeddings}); batch {BATCH}, '
          f'text {SEQ_LEN} tokens, loss on the last {ANSWER_LEN}')


def random_batch(m, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  size = m.vit.image_size
  loss_mask = np.zeros((BATCH, SEQ_LEN), np.float32)
  loss_mask[:, -ANSWER_LEN:] = 1
  return {'image': rng.standard_normal((BATCH, size, size, 3)).astype(np.float32),
          # the top id is kept for HF's image token
          'tokens': rng.integers(0, m.llm.vocab_size - 1, (BATCH, SEQ_LEN)).astype(np.int32),
          'loss_mask': loss_mask,
          'attention_mask': np.ones((BATCH, SEQ_LEN), np.int32)}


def timed(fn, iters: int, warmup: int = 1) -> tuple[float, float]:
  """Median wall seconds and median CPU seconds (all threads of this process) of fn()
  (fn blocks until its result is ready). On a shared box the CPU seconds move much less
  with the other users' load than the wall time does."""
  for _ in range(warmup):
    fn()
  wall, cpu = [], []
  for _ in range(iters):
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return statistics.median(wall), statistics.median(cpu)


# ------------------------------------------------------------------ 1. matmul peak
def matmul_peak(dtype, n: int = 2048, iters: int = 7) -> float:
  """GFLOP/s of a jitted [n, n] @ [n, n]."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  wall, cpu = timed(lambda: mm(a, b).block_until_ready(), iters, warmup=2)
  return 2 * n ** 3 / wall / 1e9, 2 * n ** 3 / cpu / 1e9


# ------------------------------------------------------------------ 2. our step
def our_step(config, iters: int) -> dict:
  mesh = sharding.make_mesh(dict(config.mesh))
  setup = state_lib.build(config, mesh)
  loss_fn = losses.get(config.stage)
  batch = random_batch(setup.model_cfg)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  t = time.perf_counter()
  compiled = step_lib.compile_step(setup, loss_fn, spec).lower(
      *step_lib.abstract_args(setup, spec)).compile()
  compile_s = time.perf_counter() - t
  state = setup.init_state()
  from unifer_jax.data import inputs  # pylint: disable=g-import-not-at-top
  device_batch = inputs.to_global(batch, mesh)
  rng = jax.random.key(0)
  # The loss's target switch counted at the branch this batch takes (its costliest
  # branch, the vocabulary projection at every position, is the upper bound).
  flops = step_cost.step_flops(config, mesh, spec, args=(state, device_batch, rng)).model_flops
  flops_max = step_cost.step_flops(config, mesh, spec).model_flops
  holder = {'state': state}

  def run():
    holder['state'], m = compiled(holder['state'], device_batch, rng)
    jax.block_until_ready(m['loss'])
    holder['loss'] = float(m['loss'])

  step_s, cpu_s = timed(run, iters)
  return dict(step_s=step_s, cpu_s=cpu_s, flops=flops, flops_max=flops_max,
              compile_s=compile_s, loss=holder['loss'],
              model_cfg=setup.model_cfg, batch=batch, freeze=config.freeze)


# ------------------------------------------------------------------ 3. HF reference
def hf_step(m, batch: dict, iters: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import transformers as tr  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  v, q, l = m.vit, m.qformer, m.llm
  image_token = l.vocab_size - 1
  config = tr.Blip2Config(
      vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim,
                         num_hidden_layers=v.depth, num_attention_heads=v.heads,
                         image_size=v.image_size, patch_size=v.patch_size,
                         attention_dropout=0.0, qkv_bias=True),
      qformer_config=dict(vocab_size=q.vocab_size, hidden_size=q.hidden,
                          num_hidden_layers=q.depth, num_attention_heads=q.heads,
                          intermediate_size=q.mlp_dim, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0,
                          cross_attention_frequency=q.cross_attention_freq,
                          encoder_hidden_size=v.width),
      text_config=tr.LlamaConfig(
          vocab_size=l.vocab_size, hidden_size=l.hidden, intermediate_size=l.mlp_dim,
          num_hidden_layers=l.depth, num_attention_heads=l.heads,
          num_key_value_heads=l.kv_heads, head_dim=l.head_dim,
          max_position_embeddings=l.max_seq_len, tie_word_embeddings=l.tie_embeddings,
          attention_dropout=0.0),
      num_query_tokens=q.num_queries, image_token_index=image_token)
  model = tr.Blip2ForConditionalGeneration(config)
  model.train()

  class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)), base frozen, B zero-initialised."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
      super().__init__()
      self.base, self.scale = base, alpha / rank
      self.a = nn.Linear(base.in_features, rank, bias=False)
      self.b = nn.Linear(rank, base.out_features, bias=False)
      nn.init.zeros_(self.b.weight)

    def forward(self, x):
      return self.base(x) + self.scale * self.b(self.a(x))

  for p in model.parameters():
    p.requires_grad_(False)
  for p in list(model.qformer.parameters()) + list(model.language_projection.parameters()):
    p.requires_grad_(True)
  model.query_tokens.requires_grad_(True)
  decoder = getattr(model.language_model, 'model', model.language_model)  # CausalLM or base
  for layer in decoder.layers:
    for parent, names in ((layer.self_attn, ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
                          (layer.mlp, ('gate_proj', 'up_proj', 'down_proj'))):
      for name in names:
        setattr(parent, name, LoRALinear(getattr(parent, name), LORA_RANK, 16.0))
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)

  nq = q.num_queries
  tokens = torch.from_numpy(batch['tokens']).long()
  input_ids = torch.cat([torch.full((BATCH, nq), image_token), tokens], 1)
  attention = torch.ones_like(input_ids)
  labels = torch.where(torch.from_numpy(batch['loss_mask']) > 0, tokens, -100)
  labels = torch.cat([torch.full((BATCH, nq), -100), labels], 1)
  pixels = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).contiguous()
  out = {}

  def run():
    opt.zero_grad(set_to_none=True)
    loss = model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention,
                 labels=labels).loss
    loss.backward()
    opt.step()
    out['loss'] = float(loss)

  step_s, cpu_s = timed(run, iters)
  return dict(step_s=step_s, cpu_s=cpu_s, loss=out['loss'], trainable=sum(p.numel() for p in trainable),
              attn=config.text_config._attn_implementation, torch=torch.__version__,
              transformers=tr.__version__)


# ------------------------------------------------------------------ report
def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--dims', choices=[*CONFIGS, 'both'], default='demo')
  ap.add_argument('--iters', type=int, default=5, help='timed steps of ours (median)')
  ap.add_argument('--hf_iters', type=int, default=3, help='timed steps of HF (median)')
  ap.add_argument('--no_hf', action='store_true', help='skip the HF reference')
  args = ap.parse_args()
  print(f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}', flush=True)
  peak32, peak32_cpu = matmul_peak(jnp.float32)
  peak16, _ = matmul_peak(jnp.bfloat16)
  print(f'matmul peak (2048^3, jitted): f32 {peak32:.1f} GFLOP/s wall ({peak32_cpu:.1f} per '
        f'CPU-second), bf16 {peak16:.1f} GFLOP/s wall', flush=True)

  rows = []
  for name in (list(CONFIGS) if args.dims == 'both' else [args.dims]):
    ours = our_step(CONFIGS[name](), args.iters)
    m = ours['model_cfg']
    gflop = ours['flops'] / 1e9
    row = dict(name=name, step_s=ours['step_s'], cpu_s=ours['cpu_s'], gflop=gflop,
               mfu=gflop / ours['step_s'] / peak32, mfu_cpu=gflop / ours['cpu_s'] / peak32_cpu)
    print(f'\n[{name}] {describe(m)}', flush=True)
    print(f'  ours: freeze={ours["freeze"]!r}, LoRA rank {m.lora.rank}; compile '
          f'{ours["compile_s"]:.1f} s; step {ours["step_s"] * 1e3:.0f} ms wall, '
          f'{ours["cpu_s"] * 1e3:.0f} ms CPU (medians of {args.iters}); {gflop:.1f} GFLOP/step '
          f'(costliest branches {ours["flops_max"] / 1e9:.1f}); '
          f'{gflop / ours["step_s"]:.1f} GFLOP/s; MFU {row["mfu"]:.1%} of the f32 peak '
          f'({row["mfu_cpu"]:.1%} per CPU-second; goal >= 65 %); loss {ours["loss"]:.3f}',
          flush=True)
    if not args.no_hf:
      hf = hf_step(m, ours['batch'], args.hf_iters)
      print(f'  HF Blip2ForConditionalGeneration + Llama (torch {hf["torch"]}, transformers '
            f'{hf["transformers"]}, attn {hf["attn"]}, {hf["trainable"] / 1e6:.2f} M trainable'
            f'): step {hf["step_s"] * 1e3:.0f} ms wall, {hf["cpu_s"] * 1e3:.0f} ms CPU '
            f'(medians of {args.hf_iters}); loss {hf["loss"]:.3f}', flush=True)
      row.update(hf_s=hf['step_s'], hf_cpu_s=hf['cpu_s'], ratio=hf['step_s'] / ours['step_s'],
                 ratio_cpu=hf['cpu_s'] / ours['cpu_s'])
      print(f'  ratio HF / ours: {row["ratio"]:.2f}x wall, {row["ratio_cpu"]:.2f}x CPU '
            f'(goal >= 1.1x)', flush=True)
    rows.append(row)

  print('\n| dims | ours ms wall / CPU | GFLOP/step | MFU wall / CPU | HF ms wall / CPU '
        '| HF/ours wall / CPU |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    hf = (f'{r["hf_s"] * 1e3:.0f} / {r["hf_cpu_s"] * 1e3:.0f} | {r["ratio"]:.2f}x / '
          f'{r["ratio_cpu"]:.2f}x' if 'hf_s' in r else '- | -')
    print(f'| {r["name"]} | {r["step_s"] * 1e3:.0f} / {r["cpu_s"] * 1e3:.0f} | {r["gflop"]:.1f} '
          f'| {r["mfu"]:.1%} / {r["mfu_cpu"]:.1%} | {hf} |')
  print(f'(matmul peak f32 {peak32:.1f} GFLOP/s wall, {peak32_cpu:.1f} per CPU-second; bf16 '
        f'{peak16:.1f}; load average now {os.getloadavg()[0]:.1f})')


if __name__ == '__main__':
  main()

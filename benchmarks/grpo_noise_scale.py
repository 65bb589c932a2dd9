"""GRPO's gradient noise scale: how many prompts one update needs before its reward
signal outweighs its sampling noise (McCandlish et al. 2018, B_simple = tr(Sigma) / |G|^2).

  python benchmarks/grpo_noise_scale.py --workdir W [--batches 8] [--random_reward]
      [--config.key=value ...]

W is a demo workdir holding data/, tokenizer/ and instruct/. The grpo stage of
``configs/grpo.py:demo`` (with the overrides) is built from W/instruct as the trainer
builds it; ``--batches`` K rollout batches of ``config.input.batch_size`` B prompts are
sampled from the warm start (the stage's own hook: G completions each, rewards,
advantages) and the loss gradient of each is taken at the same parameters. With g_k the
batch gradients (means over their B prompts):

  |G|^2        ~ (|sum_k g_k|^2 - sum_k |g_k|^2) / (K (K - 1))   (unbiased: the signal)
  tr(Sigma_B)  ~ mean_k |g_k - g_mean|^2 * K / (K - 1)           (the batch's noise)
  B_noise      = B * tr(Sigma_B) / |G|^2   prompts per update for signal = noise

``--random_reward`` replaces every reward by a coin flip (p = 0.47, the sampled compound
accuracy): the estimator's control, whose signal should read ~0 and B_noise huge or
negative. Prints the figures; asserts nothing.

Today (2026-12-07, 2-core AMD EPYC, load ~6; the demo's instruct checkpoint, the
config's B = 16 prompts x G = 8, its tasks and rewards; 2.57 M trainable weights):

  rewards               K    |G|^2      tr(Sigma_B)  noise / signal at B = 16
  the config's          24   8.4e-04    0.267        319  (B_noise ~5100 prompts)
  the config's          8    2.9e-03    0.255        89
  coin flips (control)  8   -9.4e-04    0.091        -- (signal reads 0 +- ~1e-3)

The signal estimate's own spread (the control's |G|^2 over its noise, ~1 %, shrinking
~1/K) is ~9e-4 at K = 24: the config's signal is within 1-2 of its sd of zero, so an
update needs >= ~1600 prompts (x 8 completions) before its reward signal matches its
sampling noise -- 100x the demo's batch. Why the demo's GRPO moves the policy without
improving it: Adam steps at lr per weight whatever the gradient's SNR.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from unifer_jax import config_lib, sharding  # noqa: E402
from unifer_jax.data import inputs as inputs_lib  # noqa: E402
from unifer_jax.train import optim, rewards, state as state_lib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def coin_flip_rewards(p: float = 0.47, seed: int = 0):
  """rewards.score with every total replaced by a Bernoulli(p) draw."""
  real, rng = rewards.score, np.random.default_rng(seed)

  def score(completions, prompts, weights):
    totals, values = real(completions, prompts, weights)
    coin = (rng.random(len(completions)) < p).astype(float)
    return list(coin), {**values, 'answer': list(coin)}
  return score


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='demo workdir: data/, tokenizer/, instruct/')
  p.add_argument('--batches', type=int, default=8)
  p.add_argument('--random_reward', action='store_true')
  args, overrides = p.parse_known_args(argv)
  if args.batches < 2:
    raise SystemExit('--batches must be >= 2 (the signal estimate pairs batches)')
  w = Path(args.workdir).absolute()
  if args.random_reward:
    rewards.score = coin_flip_rewards()
  config = config_lib.load(str(REPO / 'configs' / 'grpo.py') + ':demo', [
      f'--config.init.checkpoint={w / "instruct"}', f'--config.input.data_dir={w / "data"}',
      f'--config.input.tokenizer={w / "tokenizer"}'] + overrides)
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.build(config, mesh)
  stage = setup.stage
  data = stage.adapt_input(inputs_lib.make_input(config, setup.model_cfg), None)
  state = setup.init_state()
  trainable, frozen = optim.split_trainable(state['params'], config.freeze)
  loss_fn, rules = stage.loss(), [tuple(r) for r in config.sharding.rules]

  @jax.jit
  def flat_grad(trainable, frozen, batch, rng):
    def loss_of(t):
      model = stage.model_view(state_lib.bind(setup.graphdef, optim.merge_params(t, frozen)),
                               None)
      return loss_fn(model, batch, rng)[0]
    with sharding.use_mesh(mesh, rules):
      g = jax.grad(loss_of)(trainable)
    return jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in jax.tree.leaves(g)])

  total, norms, grads = None, [], []
  rows = config.input.batch_size
  start = time.monotonic()
  for k in range(args.batches):
    batch, host = stage.before_step(state, data.next_local_batch(), k, None,
                                    data.next_local_batch)
    g = np.asarray(flat_grad(trainable, frozen, batch, jax.random.key(k)), np.float64)
    grads.append(g)
    total = g if total is None else total + g
    norms.append(float(g @ g))
    done = k + 1
    eta = (time.monotonic() - start) / done * (args.batches - done)
    print(f'batch {done}/{args.batches}: |g|^2 {norms[-1]:.3e}, rollout {host["rollout_s"]:.1f} s, '
          f'zero-variance groups {host["rollout_zero_var_frac"]:.2f}, ETA {eta:.0f} s', flush=True)
  k = args.batches
  signal = (float(total @ total) - sum(norms)) / (k * (k - 1))
  mean = total / k
  noise = sum(float((g - mean) @ (g - mean)) for g in grads) / (k - 1)
  print(f'\nB = {rows} prompts x G = {config.grpo.group_size}, {k} batches, '
        f'{len(mean)} trainable weights{" (coin-flip rewards)" if args.random_reward else ""}')
  print(f'  |G|^2 (signal)      {signal:.3e}')
  print(f'  tr(Sigma_B) (noise) {noise:.3e}')
  print(f'  noise / signal      {noise / signal if signal > 0 else float("inf"):.1f} at B = {rows}')
  print(f'  B_noise             {rows * noise / signal if signal > 0 else float("inf"):.0f} prompts '
        f'per update for signal = noise')


if __name__ == '__main__':
  main()

"""The grpo stage: advantages and the loss on a hand-computed group; the first update's
ratio 1 and KL 0 (both references); a toy where rewarding one label makes the policy name
it more; DAPO refills; resume after kill -9 equal to an uninterrupted run.

Runs use the tiny preset from a random-weight instruct workdir (tests/workdir_util.py)
on the 8 fake devices: rollouts and updates sharded over the data axis.
"""

import json
import os
import random
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from unifer_jax import config_lib
from unifer_jax.data import labels
from unifer_jax.evaluators import ferbench
from unifer_jax.train import grpo_loss, loop, rewards

import workdir_util
from test_train import REPO, UNIFER, _env, _run_until

STEPS = 6


def settings(**kw):
  base = dict(group_size=2, temperature=1.0, clip_low=0.2, clip_high=0.28, kl_weight=0.1,
              kl_estimator='k3', aggregation='sequence_mean', scale_rewards='group',
              max_new_tokens=3, reward_names=(), stored_old_logp=True)
  return grpo_loss.Settings(**{**base, **kw})


# ---- by hand -------------------------------------------------------------------------

def test_group_advantages_by_hand():
  r = jnp.asarray([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
  # Group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; group 2 has no spread.
  a = 0.5 / (np.sqrt(1 / 3) + 1e-4)
  np.testing.assert_allclose(grpo_loss.group_advantages(r, 4), [a, -a, -a, a, 0, 0, 0, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(grpo_loss.group_advantages(r, 4, 'none'),
                             [.5, -.5, -.5, .5, 0, 0, 0, 0])
  np.testing.assert_array_equal(grpo_loss.zero_variance(r, 4), [False, True])


def test_clipped_loss_and_kl_by_hand():
  # One group of two completions (rewards 1, 0: advantages +a, -a), three token slots; the
  # first completion ended after two tokens.
  a = 0.5 / (np.sqrt(0.5) + 1e-4)
  logp = jnp.asarray([[-1.0, -2.0, -9.0], [-0.5, -1.0, -1.5]])
  old = jnp.asarray([[-1.1, -1.5, -9.0], [-0.5, -1.2, -1.0]])
  ref = jnp.asarray([[-1.0, -1.8, -9.0], [-0.7, -1.0, -1.5]])
  mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  adv = grpo_loss.group_advantages(jnp.asarray([1.0, 0.0]), 2)
  np.testing.assert_allclose(adv, [a, -a], rtol=1e-6)
  # Ratios e^0.1 (in the clip range), e^-0.5 (below 0.8, but the advantage is positive:
  # min() keeps the unclipped term), 1, e^0.2 (below 1.28), e^-0.5 (advantage negative:
  # the clip binds, -(0.8)(-a) is the larger loss term ... and its gradient is zero).
  pg = [[-np.exp(0.1) * a, -np.exp(-0.5) * a],
        [a, np.exp(0.2) * a, max(np.exp(-0.5), 0.8) * a]]
  k3 = lambda lp, rf: np.exp(rf - lp) - (rf - lp) - 1
  kl = [[k3(-1.0, -1.0), k3(-2.0, -1.8)], [k3(-0.5, -0.7), k3(-1.0, -1.0), k3(-1.5, -1.5)]]
  tok = [[p + 0.1 * k for p, k in zip(pr, kr)] for pr, kr in zip(pg, kl)]
  want = {'sequence_mean': (np.mean(tok[0]) + np.mean(tok[1])) / 2,
          'token_mean': (sum(tok[0]) + sum(tok[1])) / 5,
          'constant': (sum(tok[0]) + sum(tok[1])) / (2 * 3)}
  for mode, value in want.items():
    loss, aux = grpo_loss.policy_loss(logp, old, ref, adv, mask, settings(aggregation=mode))
    np.testing.assert_allclose(loss, value, rtol=1e-5, err_msg=mode)
  assert float(aux['clip_frac']) == pytest.approx(1 / 5)       # the one bound token
  np.testing.assert_allclose(aux['kl'], (sum(kl[0]) + sum(kl[1])) / 5, rtol=1e-5)
  k2 = grpo_loss.token_kl(logp, ref, 'k2')
  np.testing.assert_allclose(k2[0, 1], 0.5 * 0.2 ** 2, rtol=1e-5)
  # Same policy, reference and sampler: ratio 1, KL 0, the loss is -mean(A) = 0.
  loss, aux = grpo_loss.policy_loss(logp, logp, logp, adv, mask, settings())
  assert float(aux['ratio']) == 1.0 and float(aux['kl']) == 0.0 and abs(float(loss)) < 1e-6


# ---- runs ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def instruct(tmp_path_factory):
  """A tiny instruct workdir without LoRA (random weights)."""
  return workdir_util.instruct_workdir(tmp_path_factory.mktemp('grpo'), lora_rank=0)['root']


def overrides(root, **kw) -> list[str]:
  o = {'init.checkpoint': root / 'instruct', 'input.data_dir': root / 'data',
       'input.tokenizer': root / 'tok', 'model.llm.vocab_size': 512,
       'model.qformer.vocab_size': 512, 'input.text_len': 48, 'input.batch_size': 8,
       'grpo.group_size': 4, 'checkpoint.async_save': False, 'checkpoint.keep': 10}
  o.update(kw)
  return [f'--config.{k}={v}' for k, v in o.items()]


# LoRA policy (reference: the adapters off), mu = 2 updates per rollout batch (the
# rollout records the sampling policy's logprobs), DAPO refills of zero-variance groups.
# (No open-vocabulary prompts: with the tiny BPE some exceed prompt_len.)
LORA = {'input.tasks': "['basic', 'compound', 'intensity', 'valence_arousal', 'rationale']",
        'input.task_weights': '[]', 'model.lora.rank': 2, 'freeze': '^(?!.*lora_)', 'grpo.updates_per_batch': 2,
        'grpo.dynamic_sampling': True, 'grpo.max_refills': 1, 'total_steps': STEPS,
        'checkpoint.every_steps': 2, 'schedule.peak_lr': 3e-2}


def records(workdir) -> dict[int, dict]:
  return {r['step']: r for r in map(json.loads, (workdir / 'metrics.jsonl').read_text()
                                    .splitlines())}


@pytest.fixture(scope='module')
def lora_run(instruct, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('lora_run')
  loop.train(config_lib.load('configs/grpo.py:tiny', overrides(instruct, **LORA)), workdir)
  return workdir, records(workdir)


def test_lora_run_first_update_and_metrics(lora_run):
  workdir, recs = lora_run
  first = recs[1]
  # Both passes of step 1 see the start (warmup: the first update has lr 0): the stored
  # sampling logprobs agree with the update's, the adapters-off reference with the policy.
  assert abs(first['ratio'] - 1) < 1e-5 and first['kl'] < 1e-6 and first['clip_frac'] == 0
  assert recs[STEPS]['kl'] > 1e-4                            # the adapters moved
  for key in ('loss', 'kl', 'entropy', 'response_len', 'clip_frac', 'reward', 'accuracy',
              'format_rate', 'reward_au_f1', 'zero_var_frac', 'rollout_zero_var_frac',
              'refills', 'rollout_s', 'update_s', 'rollout_tokens_per_s'):
    assert key in recs[STEPS], key
  # A random policy's groups mostly score alike: refills ran and kept the batch's shape.
  assert any(r['refills'] > 0 for r in recs.values())
  assert (workdir / 'reward_curves.png').stat().st_size > 1000


def test_rewarding_one_label_makes_the_policy_name_it(instruct, tmp_path, monkeypatch):
  """The toy: a reward of 1 whenever FERBench's extraction reads 'happiness' from the
  completion. From a random policy (~10 % of completions) the full-LLM policy names it
  in most completions within 20 steps. Its reference is a frozen copy of the start."""
  toy = lambda c, p: float(ferbench.extract_label(c, labels.BASIC) == 'happiness')
  monkeypatch.setitem(rewards.REWARDS, 'toy', toy)
  config = config_lib.load('configs/grpo.py:tiny', overrides(
      instruct, **{'input.tasks': "['basic', 'compound']", 'input.task_weights': '[]',
                   'grpo.rewards': "{'toy': 1.0}", 'total_steps': 20,
                   'checkpoint.every_steps': 100, 'schedule.peak_lr': 2e-2}))
  loop.train(config, tmp_path)
  recs = records(tmp_path)
  assert recs[1]['ratio'] == 1.0 and recs[1]['kl'] < 1e-6
  before = np.mean([recs[s]['reward_toy'] for s in (1, 2, 3)])
  after = np.mean([recs[s]['reward_toy'] for s in (18, 19, 20)])
  assert after > max(0.5, before + 0.3), (before, after)


@pytest.mark.multiprocess
def test_kill9_resumes_exactly(lora_run, instruct, tmp_path):
  """`unifer train` killed with SIGKILL mid-run, then rerun: every step's metrics equal
  the uninterrupted in-process run's (the rollout randomness comes from the step, the
  input's position -- refills included -- from the checkpoint)."""
  _, reference = lora_run
  cmd = UNIFER + ['train', '--config', 'configs/grpo.py:tiny', '--workdir', str(tmp_path)] \
      + overrides(instruct, **LORA)
  env = _env(os.environ['JAX_COMPILATION_CACHE_DIR'])
  kill_at = random.Random().randint(3, STEPS - 1)   # checkpoint 2 exists from step 3 on
  code, out = _run_until(cmd, env, tmp_path, kill_at, signal.SIGKILL)
  assert code == -signal.SIGKILL, out
  done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert 'resumed from checkpoint step' in done.stdout
  got = records(tmp_path)
  for s in range(1, STEPS + 1):
    for key in ('loss', 'reward', 'kl', 'entropy', 'refills', 'zero_var_frac'):
      assert got[s][key] == reference[s][key], (kill_at, s, key)


@pytest.mark.multiprocess
def test_two_processes_roll_out_and_refill_together(instruct, tmp_path):
  """2 processes x 2 devices: each samples its own prompts' groups on the shared mesh,
  they agree on every refill (one global rollout program) and the metrics are global.
  (Not equal to one process: the input shards its records by process count.)"""
  cmd = [sys.executable, str(REPO / 'launch' / 'local.py'), '-n', '2', '--devices', '4',
         '--'] + UNIFER + ['train', '--config', 'configs/grpo.py:tiny', '--workdir',
                           str(tmp_path)] + overrides(instruct, **{**LORA, 'total_steps': 3})
  env = _env(tmp_path / 'two_process_jax_cache', devices=4)
  done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  recs = records(tmp_path)
  assert sorted(recs) == [1, 2, 3]
  assert abs(recs[1]['ratio'] - 1) < 1e-5 and recs[1]['kl'] < 1e-6
  assert all(r['refills'] >= 0 and 0 <= r['rollout_zero_var_frac'] <= 1 for r in recs.values())

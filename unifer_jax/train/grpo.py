"""Stage 3b, ``grpo``: reinforcement learning with verifiable rewards after instruction
tuning (GRPO, DeepSeekMath; UniFER's second stage), on the one train loop.

Each step (``before_step``, the stage's hook, then the compiled update):

  1. B prompts from the instruct pipeline (train/grpo_data.py: its tasks, phrasings and
     candidate lists), left-padded;
  2. G completions per prompt sampled inside one jit with the KV cache (temperature,
     top-p, max new tokens, stop at EOS; the prompt is prefilled once per group); the
     randomness is ``fold_in(seed, step, round)``, so a resumed run samples what an
     uninterrupted one would have;
  3. the reference's log-probabilities of those tokens in the same jit -- with LoRA the
     policy with its adapters off (``lora_b`` zeroed: no second copy of the weights),
     otherwise the policy as it started (one frozen copy);
  4. rewards on the host (train/rewards.py, ``config.grpo.rewards``); a group whose
     completions all scored the same carries no signal: counted, and with
     ``dynamic_sampling`` (DAPO) replaced by groups of further prompts, up to
     ``max_refills`` more rollouts;
  5. ``updates_per_batch`` (mu) optimizer updates on the batch (train/grpo_loss.py).

Metrics per step (metrics.jsonl): loss, kl, ratio, clip_frac, entropy, response_len,
reward (the weighted total) and each reward_<name>, accuracy (= reward_answer) and
accuracy_<task> per label task, format_rate (= reward_format), zero_var_frac (of the update batch) and rollout_zero_var_frac (of every
group sampled), refills, rollout_s / update_s and rollout_tokens_per_s;
``reward_curves.png`` in the workdir at the end. configs/grpo.py runs it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from unifer_jax import sharding
from unifer_jax.data import inputs as inputs_lib
from unifer_jax.data import tokenizer as tokenizer_lib
from unifer_jax.models import llm as llm_lib
from unifer_jax.train import grpo_data, grpo_loss, optim, rewards as rewards_lib, stages
from unifer_jax.train.state import bind

REFERENCES = ('auto', 'adapters_off', 'initial')
_ROLLOUT_TAG = 0x524F4C4C   # 'ROLL': rollout randomness apart from the step's own rng
PROMPT_KEYS = ('image', 'prompt_ids', 'prompt_mask', 'qformer_ids', 'qformer_mask')


def completion_mask(tokens: jax.Array, eos_id: int) -> jax.Array:
  """1.0 on each row's tokens up to and including its first EOS (all of them if none)."""
  is_eos = (tokens == eos_id).astype(jnp.int32)
  return ((jnp.cumsum(is_eos, axis=1) - is_eos) == 0).astype(jnp.float32)


def without_adapters(params: dict) -> dict:
  """The parameters with every LoRA ``lora_b`` zeroed: the base model, computed exactly."""
  flat = optim.flat(params)
  is_b = lambda path: path.rsplit('/', 1)[-1] == 'lora_b'
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if is_b(optim.keypath_str(p)) else x, params) \
      if any(is_b(k) for k in flat) else params


class GRPOStage(stages.Stage):

  has_hook = True

  @classmethod
  def updates_per_step(cls, config) -> int:
    mu = int(config.grpo.updates_per_batch)
    if mu < 1:
      raise ValueError(f'config.grpo.updates_per_batch={mu}; expected >= 1')
    return mu

  def __init__(self, config, setup):
    super().__init__(config, setup)
    g = config.grpo
    self.weights = rewards_lib.check_weights(g.rewards)
    # Every reward is computed and logged; the weights decide which ones train.
    self.settings = grpo_loss.Settings.from_config(config, tuple(rewards_lib.REWARDS))
    self.reference = self._reference_mode(g.get('reference', 'auto'))
    if not 0.0 < float(g.top_p) <= 1.0:
      raise ValueError(f'config.grpo.top_p={g.top_p}; expected in (0, 1]')
    if float(g.temperature) <= 0:
      raise ValueError(f'config.grpo.temperature={g.temperature}: sampling needs > 0')
    self.tok = None          # loaded with the input (compile-check needs none)
    self._rollout = None
    self._reference_params = None

  def _reference_mode(self, mode: str) -> str:
    if mode not in REFERENCES:
      raise ValueError(f'config.grpo.reference={mode!r}; expected one of {REFERENCES}')
    trainable, _ = optim.split_trainable(self.setup.abstract_state['params'], self.config.freeze)
    names = list(optim.flat(trainable))
    lora_only = all('/lora_' in '/' + n for n in names)
    if mode == 'auto':
      return 'adapters_off' if lora_only else 'initial'
    if mode == 'adapters_off' and not lora_only:
      others = [n for n in names if '/lora_' not in '/' + n]
      raise ValueError(f"config.grpo.reference='adapters_off' needs LoRA adapters as the only "
                       f"trainable parameters (config.freeze); also trained: {others[:3]}")
    return mode

  # -- the loss side ----------------------------------------------------------------------
  def loss(self):
    return grpo_loss.grpo_loss

  def model_view(self, model, extra):
    del extra
    return model, self.settings

  def adapt_input(self, data, workdir):
    del workdir
    self.tok = tokenizer_lib.load(self.config.input.tokenizer)
    return grpo_data.PromptInput(data, self.config.grpo.prompt_len, self.tok.pad_id)

  def step_batch_spec(self, input_spec: dict) -> dict:
    s, rows = self.settings, input_spec['image'].shape[0]
    n, length = rows * s.group_size, s.max_new_tokens
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
    prompt = jax.ShapeDtypeStruct((rows, int(self.config.grpo.prompt_len)), np.int32)
    spec = {k: input_spec[k] for k in ('image', 'qformer_ids', 'qformer_mask') if k in input_spec}
    spec.update(prompt_ids=prompt, prompt_mask=prompt,
                completion=jax.ShapeDtypeStruct((n, length), np.int32),
                completion_mask=f32(n, length), ref_logp=f32(n, length), rewards=f32(n),
                completion_task=jax.ShapeDtypeStruct((n,), np.int32),
                reward_values=f32(n, len(s.reward_names)),
                reward_applies=f32(n, len(s.reward_names)))
    if s.stored_old_logp:
      spec['old_logp'] = f32(n, length)
    return spec

  # -- sampling ---------------------------------------------------------------------------
  def _compile_rollout(self):
    setup, s, g = self.setup, self.settings, self.config.grpo
    rules = [tuple(r) for r in self.config.sharding.rules]
    eos, pad = self.tok.eos_id, self.tok.pad_id
    adapters_off = self.reference == 'adapters_off'

    def rollout(params, ref_params, batch, rng):
      with sharding.use_mesh(setup.mesh, rules):
        model = bind(setup.graphdef, params)
        embeds, mask = model.prefixed_inputs(batch['image'], batch['prompt_ids'],
                                             batch['prompt_mask'], batch.get('qformer_ids'),
                                             batch.get('qformer_mask'))
        completion = llm_lib.generate(
            model.llm, inputs_embeds=embeds, attention_mask=mask,
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=float(g.top_p),
            rng=rng, eos_id=eos, pad_id=pad, num_samples=s.group_size)
        full = dict(batch, completion=completion,
                    completion_mask=completion_mask(completion, eos))
        ref = bind(setup.graphdef, without_adapters(params) if adapters_off else ref_params)
        out = {'completion': completion, 'completion_mask': full['completion_mask'],
               'ref_logp': grpo_loss.completion_logprobs(ref, full, s.group_size,
                                                         s.temperature)}
        if s.stored_old_logp:
          out['old_logp'] = grpo_loss.completion_logprobs(model, full, s.group_size,
                                                          s.temperature)
        return jax.lax.stop_gradient(out)

    rows = NamedSharding(setup.mesh, P(sharding.BATCH_AXES))
    replicated = NamedSharding(setup.mesh, P())
    ref_shardings = None if adapters_off else setup.state_shardings['params']
    return jax.jit(rollout, in_shardings=(setup.state_shardings['params'], ref_shardings,
                                          rows, replicated), out_shardings=rows)

  def _reference(self, state):
    if self.reference == 'adapters_off':
      return None
    if self._reference_params is None:
      # The policy as it started: this run's init (warm start from config.init.checkpoint
      # + the seed's fresh parameters) -- also after a resume, when `state` has moved on.
      self._reference_params = self.setup.init_state()['params']
    return self._reference_params

  def _sample(self, state, local: dict, step: int, round_: int) -> dict:
    """One rollout of this process's prompt rows -> local numpy arrays: the prompt keys
    per prompt, completion keys per completion (b * G)."""
    if self._rollout is None:
      self._rollout = self._compile_rollout()
    mesh = self.setup.mesh
    prompts = {k: local[k] for k in PROMPT_KEYS if k in local}
    rng = jax.random.fold_in(jax.random.fold_in(
        jax.random.fold_in(jax.random.key(self.config.seed), _ROLLOUT_TAG), step), round_)
    out = self._rollout(state['params'], self._reference(state),
                        inputs_lib.to_global(prompts, mesh), rng)
    if jax.process_count() > 1:
      out = multihost_utils.global_array_to_host_local_array(out, mesh, P(sharding.BATCH_AXES))
    return {**local, **jax.tree.map(np.asarray, out)}

  def _score(self, rollout: dict) -> dict:
    """Adds rewards (weighted total), reward_values / reward_applies ([b * G, R])."""
    g = self.settings.group_size
    prompts = [p for p in grpo_data.prompts_of(rollout, self.tok) for _ in range(g)]
    texts = []
    for row, m in zip(rollout['completion'], rollout['completion_mask']):
      n = int(m.sum())
      ids = row[:n - 1] if n and row[n - 1] == self.tok.eos_id else row[:n]
      texts.append(self.tok.decode(ids))
    totals, values = rewards_lib.score(texts, prompts, {n: self.weights.get(n, 0.0)
                                                        for n in rewards_lib.REWARDS})
    names = self.settings.reward_names
    rollout['rewards'] = np.asarray(totals, np.float32)
    rollout['reward_values'] = np.asarray([[values[n][i] or 0.0 for n in names]
                                           for i in range(len(texts))], np.float32)
    rollout['reward_applies'] = np.asarray([[values[n][i] is not None for n in names]
                                            for i in range(len(texts))], np.float32)
    rollout['completion_task'] = np.repeat(rollout['task'], g).astype(np.int32)
    rollout['_texts'] = texts
    return rollout

  # -- the hook -------------------------------------------------------------------------
  def before_step(self, state, local, step, extra, next_local):
    del extra
    g, cfg = self.settings.group_size, self.config.grpo
    if step == 0 and self.reference == 'adapters_off':
      _check_fresh_adapters(state['params'])
    jax.block_until_ready(state['params'])   # the previous update is not rollout time
    start = time.monotonic()
    rounds = [self._score(self._sample(state, local, step, 0))]
    rows = len(local['image'])
    flat = lambda r: r['rewards'].reshape(-1, g)
    useful = lambda r: ~np.all(flat(r) == flat(r)[:, :1], axis=1)
    sampled, zero = rows, int((~useful(rounds[0])).sum())
    if cfg.dynamic_sampling:
      # DAPO: groups with no signal are replaced by groups of further prompts. Every
      # process rolls out the same number of times (the rollout is one global program).
      have = int(useful(rounds[0]).sum())
      while len(rounds) <= int(cfg.max_refills) and _any_process(have < rows):
        extra_round = self._score(self._sample(state, next_local(), step, len(rounds)))
        rounds.append(extra_round)
        sampled += rows
        zero += int((~useful(extra_round)).sum())
        have += int(useful(extra_round).sum())
    batch = _select_groups(rounds, useful, rows, g)
    tokens = float(sum(r['completion_mask'].sum() for r in rounds))
    step_batch = {k: batch[k] for k in self.step_batch_spec(local)}
    step_batch = inputs_lib.to_global(step_batch, self.setup.mesh)
    elapsed = time.monotonic() - start
    host = {'rollout_s': elapsed, 'refills': float(len(rounds) - 1),
            'rollout_zero_var_frac': _global_sum(zero) / max(_global_sum(sampled), 1),
            'rollout_tokens_per_s': _global_sum(tokens) / max(elapsed, 1e-9)}
    self.last_texts = batch['_texts']
    return step_batch, host

  def log_record(self, record: dict) -> dict:
    # A reward whose task no prompt of the step had has no mean: left out, not NaN.
    record = {k: v for k, v in record.items()
              if not (k.startswith(('reward_', 'accuracy_')) and v != v)}
    if 'rollout_s' in record and 'step_time_s' in record:
      record['update_s'] = max(record['step_time_s'] - record['rollout_s'], 0.0)
    if 'reward_answer' in record:
      record['accuracy'] = record['reward_answer']
    if 'reward_format' in record:
      record['format_rate'] = record['reward_format']
    return record

  def finish(self, workdir) -> None:
    from unifer_jax.evaluators import plots  # pylint: disable=g-import-not-at-top (matplotlib)
    keys = ('reward', 'accuracy', 'format_rate') + tuple(
        f'reward_{n}' for n in rewards_lib.REWARDS if n not in ('answer', 'format'))
    plots.metric_curves(workdir / 'metrics.jsonl', workdir / 'reward_curves.png', keys,
                        'grpo: rewards on the rollouts (train/rewards.py)')


def _check_fresh_adapters(params) -> None:
  """'adapters_off' takes the model without adapters as the reference: right only if the
  warm start's adapters were fresh (lora_b = 0), not an instruct stage's trained ones."""
  trained = [k for k, v in optim.flat(params).items()
             if k.endswith('lora_b') and bool(jnp.any(v != 0))]
  if trained:
    raise ValueError(f"config.grpo.reference='adapters_off' but the warm start's LoRA "
                     f"adapters are trained ({trained[0]} != 0): the reference would drop "
                     f"them. Use reference='initial' (a frozen copy of the start) or another "
                     f"config.model.lora.rank (fresh adapters)")


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _global_sum(x: float) -> float:
  if jax.process_count() == 1:
    return float(x)
  return float(np.sum(multihost_utils.process_allgather(np.asarray(x, np.float64))))


def _select_groups(rounds: list, useful, rows: int, g: int) -> dict:
  """``rows`` groups for the update: every round's groups with signal in order, then (if
  they fall short) the first round's groups without -- the batch shape never changes."""
  picks = [(r, i) for r, rd in enumerate(rounds) for i in np.flatnonzero(useful(rd))]
  picks += [(0, i) for i in np.flatnonzero(~useful(rounds[0]))]
  picks = picks[:rows] if len(rounds) > 1 else [(0, i) for i in range(rows)]
  out = {}
  for key, value in rounds[0].items():
    if key == '_texts':
      out[key] = [rounds[r][key][i * g + j] for r, i in picks for j in range(g)]
      continue
    per_prompt = len(value) == rows
    parts = [rounds[r][key][i:i + 1] if per_prompt else rounds[r][key][i * g:(i + 1) * g]
             for r, i in picks]
    out[key] = np.concatenate(parts)
  return out


"""The GRPO objective on one rollout batch: group advantages, the clipped policy ratio
(separate low / high clip, DAPO's clip-higher), a KL term to the reference, and the
loss aggregation modes that decide how tokens and sequences are weighted.

  A_i      = (r_i - mean_g r) / (std_g r + eps)      scale_rewards='group' (GRPO)
           =  r_i - mean_g r                          scale_rewards='none'  (Dr. GRPO: the
                                                      std division favours easy / hard
                                                      prompts whose groups barely vary)
  rho_it   = exp(logp_it - logp_old_it)
  pg_it    = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
  kl_it    = k3: exp(ref - logp) - (ref - logp) - 1   (unbiased, >= 0; UniFER / R1-V, DeepSeekMath)
             k2: (logp - ref)^2 / 2                   (its gradient is the true KL's)
  loss     = aggregate(pg + beta * kl) over completion tokens:
             'sequence_mean'  mean over sequences of each one's token mean (GRPO; a long
                              answer's tokens each weigh less: a length bias)
             'token_mean'     sum over all tokens / their count (DAPO)
             'constant'       sum over all tokens / (sequences * max_new_tokens) (Dr. GRPO:
                              no length normalisation at all)

std is the unbiased (ddof=1) group standard deviation, as TRL computes it; eps = 1e-4.
``old`` logprobs are the sampling policy's: with one update per rollout batch they equal
the current ones (the ratio is 1 and only its gradient matters), so they are taken as
``stop_gradient`` of the current ones; with mu > 1 the rollout records them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from unifer_jax import sharding
from unifer_jax.data import instructions
from unifer_jax.models.llm import LOGIT_AXES

AGGREGATIONS = ('sequence_mean', 'token_mean', 'constant')
KL_ESTIMATORS = ('k3', 'k2', 'k1')
ADV_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.grpo, the parts the loss reads (hashable: a static of the step)."""
  group_size: int
  temperature: float
  clip_low: float
  clip_high: float
  kl_weight: float
  kl_estimator: str
  aggregation: str
  scale_rewards: str
  max_new_tokens: int
  reward_names: tuple
  stored_old_logp: bool     # mu > 1: the rollout recorded the sampling policy's logprobs

  @classmethod
  def from_config(cls, config, reward_names: tuple) -> 'Settings':
    g = config.grpo
    if g.loss_aggregation not in AGGREGATIONS:
      raise ValueError(f'config.grpo.loss_aggregation={g.loss_aggregation!r}; expected one '
                       f'of {AGGREGATIONS}')
    if g.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f'config.grpo.kl_estimator={g.kl_estimator!r}; expected one of '
                       f'{KL_ESTIMATORS}')
    if g.scale_rewards not in ('group', 'none'):
      raise ValueError(f"config.grpo.scale_rewards={g.scale_rewards!r}; expected 'group' or "
                       f"'none'")
    if int(g.group_size) < 2:
      raise ValueError(f'config.grpo.group_size={g.group_size}: a group needs >= 2 completions')
    return cls(group_size=int(g.group_size), temperature=float(g.temperature),
               clip_low=float(g.clip_low), clip_high=float(g.clip_high),
               kl_weight=float(g.kl_weight), kl_estimator=str(g.kl_estimator),
               aggregation=str(g.loss_aggregation), scale_rewards=str(g.scale_rewards),
               max_new_tokens=int(g.max_new_tokens), reward_names=reward_names,
               stored_old_logp=int(g.updates_per_batch) > 1)


# ---- the pieces ---------------------------------------------------------------------

def group_advantages(rewards: jax.Array, group_size: int, scale: str = 'group') -> jax.Array:
  """[N] rewards, N = prompts * group_size in group order -> [N] advantages."""
  r = rewards.reshape(-1, group_size).astype(jnp.float32)
  adv = r - r.mean(1, keepdims=True)
  if scale == 'group':
    adv = adv / (r.std(1, keepdims=True, ddof=1) + ADV_EPS)
  return adv.reshape(-1)


def zero_variance(rewards: jax.Array, group_size: int) -> jax.Array:
  """[N / group_size] bool: groups whose completions all scored the same (no signal)."""
  r = rewards.reshape(-1, group_size)
  return jnp.all(r == r[:, :1], axis=1)


def token_kl(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
  d = ref_logp - logp
  if estimator == 'k3':
    return jnp.exp(d) - d - 1.0
  if estimator == 'k2':
    return 0.5 * d * d
  return -d   # k1


def aggregate(x: jax.Array, mask: jax.Array, mode: str, max_len: int) -> jax.Array:
  """[N, L] per-token values -> scalar, by ``mode`` (module docstring)."""
  mask = mask.astype(jnp.float32)
  if mode == 'sequence_mean':
    per_seq = (x * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    return per_seq.mean()
  if mode == 'token_mean':
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  if mode == 'constant':
    return (x * mask).sum() / (x.shape[0] * max_len)
  raise ValueError(f'loss aggregation {mode!r}; expected one of {AGGREGATIONS}')


def policy_loss(logp, old_logp, ref_logp, advantages, mask, s: Settings) -> tuple[jax.Array, dict]:
  """The clipped surrogate + KL, aggregated; and its diagnostics (token means)."""
  ratio = jnp.exp(logp - old_logp)
  adv = advantages[:, None]
  clipped = jnp.clip(ratio, 1.0 - s.clip_low, 1.0 + s.clip_high)
  pg = -jnp.minimum(ratio * adv, clipped * adv)
  kl = token_kl(logp, ref_logp, s.kl_estimator)
  loss = aggregate(pg + s.kl_weight * kl, mask, s.aggregation, s.max_new_tokens)
  # Where the clip binds the token's gradient is zero: its share of the tokens.
  bound = ((ratio < 1.0 - s.clip_low) & (adv < 0)) | ((ratio > 1.0 + s.clip_high) & (adv > 0))
  m = mask.astype(jnp.float32)
  tmean = lambda v: (v * m).sum() / jnp.maximum(m.sum(), 1.0)
  aux = {'kl': tmean(kl), 'ratio': tmean(ratio), 'clip_frac': tmean(bound.astype(jnp.float32)),
         'pg_loss': aggregate(pg, mask, s.aggregation, s.max_new_tokens)}
  return loss, aux


# ---- the model side ------------------------------------------------------------------

def completion_logits(model, batch: dict, group_size: int, temperature: float) -> jax.Array:
  """f32 logits ``[N, L, V]`` (divided by the sampling temperature) that predict each
  completion token, from [image prefix; left-padded prompt; completion]. The image
  prefix and the prompt are computed once per prompt and repeated for its group."""
  images, prompt, prompt_mask = batch['image'], batch['prompt_ids'], batch['prompt_mask']
  completion, cmask = batch['completion'], batch['completion_mask']
  embeds, mask = model.prefixed_inputs(images, prompt, prompt_mask, batch.get('qformer_ids'),
                                       batch.get('qformer_mask'))
  embeds = jnp.repeat(embeds, group_size, axis=0)
  mask = jnp.repeat(mask, group_size, axis=0)
  text = model.llm.embed(completion)
  embeds = jnp.concatenate([embeds, text.astype(embeds.dtype)], axis=1)
  mask = jnp.concatenate([mask, cmask.astype(mask.dtype)], axis=1)
  hidden = model.llm.hidden_states(inputs_embeds=embeds, attention_mask=mask)
  length = completion.shape[1]
  # The left-padded prompt's last slot is its last token: position -L-1 predicts token 0.
  logits = model.llm.logits_from_hidden(hidden[:, -length - 1:-1])
  logits = sharding.constrain(logits, LOGIT_AXES)
  return logits / temperature if temperature else logits


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits, -1)
  return jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]


def completion_logprobs(model, batch: dict, group_size: int, temperature: float) -> jax.Array:
  """[N, L] log-probabilities of the completion tokens (what the rollout records)."""
  return token_logprobs(completion_logits(model, batch, group_size, temperature),
                        batch['completion'])


def grpo_loss(view, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
  """The stage loss: ``view`` is (model, Settings) from GRPOStage.model_view."""
  del rng
  model, s = view
  logits = completion_logits(model, batch, s.group_size, s.temperature)
  logp = token_logprobs(logits, batch['completion'])
  old = batch['old_logp'] if s.stored_old_logp else jax.lax.stop_gradient(logp)
  rewards, mask = batch['rewards'], batch['completion_mask']
  adv = group_advantages(rewards, s.group_size, s.scale_rewards)
  loss, aux = policy_loss(logp, old, batch['ref_logp'], adv, mask, s)
  m = mask.astype(jnp.float32)
  probs = jax.nn.softmax(logits, -1)
  entropy = -(probs * jax.nn.log_softmax(logits, -1)).sum(-1)
  aux['entropy'] = jax.lax.stop_gradient((entropy * m).sum() / jnp.maximum(m.sum(), 1.0))
  aux['response_len'] = m.sum(1).mean()
  aux['reward'] = rewards.mean()
  aux['zero_var_frac'] = zero_variance(rewards, s.group_size).astype(jnp.float32).mean()
  applies, values = batch['reward_applies'], batch['reward_values']
  for i, name in enumerate(s.reward_names):
    n = applies[:, i].sum()
    # NaN when no completion of the batch had this reward's task (kept out of curves).
    aux[f'reward_{name}'] = jnp.where(n > 0, (values[:, i] * applies[:, i]).sum()
                                      / jnp.maximum(n, 1.0), jnp.nan)
  # Sampled accuracy per label task (NaN where the batch had none of its prompts).
  answer = values[:, s.reward_names.index('answer')] if 'answer' in s.reward_names else None
  for task in ('basic', 'compound', 'open_vocab') if answer is not None else ():
    rows = (batch['completion_task'] == instructions.TASK_INDEX[task]).astype(jnp.float32)
    n = rows.sum()
    aux[f'accuracy_{task}'] = jnp.where(n > 0, (answer * rows).sum() / jnp.maximum(n, 1.0),
                                        jnp.nan)
  return loss, aux

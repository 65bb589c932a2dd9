"""The teacher's label distribution: the log-likelihood of each candidate label string,
normalised over the candidates, in one batched pass.

What is scored is exactly what instruction tuning taught the model to say: the user
prompt of the task (``instructions.prompt_for``, wrapped in the tokenizer's chat
template) followed by the answer as ``data/examples.py`` tokenises targets --
``tok.encode('<answer>{label}</answer>') + [eos]``. The answer-only hint is used
(``think=False``): a CoT answer would put a rationale between prompt and label that we
do not have at scoring time; training asks this form whenever a CoT target does not fit
``seq_len`` and for every non-CoT task, so the format is one the model learned.

The tokens every candidate answer shares (e.g. ``<answer>``) are moved into the prompt;
this does not change the normalised distribution and is computed once.

An instruction-aware Q-Former (InstructBLIP) reads the task's prompt beside its queries,
so each task then has its own image prefix (``task_queries``); otherwise one prefix
serves every task.

Design of the batched pass: image prefix + prompt go through the LLM ONCE, filling a
KV cache; the cache is then repeated over the C candidates and all B*C candidate
continuations (a few tokens each) run in one call on it. Repeating the whole
prefix per candidate instead would multiply the expensive part (Q image tokens + ~40
prompt tokens, vs ~5 answer tokens) by C = 8 or 11.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unifer_jax.data import examples, instructions, labels

VOCABULARIES = {'basic': labels.BASIC, 'compound': labels.COMPOUND}


@dataclasses.dataclass(frozen=True)
class LabelPrompt:
  """Token arrays of one label task: the shared prefix and each candidate's rest."""
  task: str
  names: tuple[str, ...]
  prompt_ids: np.ndarray       # [P] int32: chat prompt + the start all answers share
  candidate_ids: np.ndarray    # [C, L] int32: the rest of each answer + eos, right-padded
  candidate_mask: np.ndarray   # [C, L] int32: 1 on real candidate tokens
  qformer_ids: np.ndarray | None = None    # [Tq] the prompt for an instruction-aware
  qformer_mask: np.ndarray | None = None   # Q-Former (examples.ExampleMaker.qformer_text)

  def arrays(self) -> dict[str, np.ndarray]:
    """The jit inputs (a pytree of arrays)."""
    out = {'prompt_ids': self.prompt_ids, 'candidate_ids': self.candidate_ids,
           'candidate_mask': self.candidate_mask}
    if self.qformer_ids is not None:
      out.update(qformer_ids=self.qformer_ids, qformer_mask=self.qformer_mask)
    return out


def label_prompt(tok, task: str, *, think: bool = False, phrasing: int = 0,
                 hint: int = 0, text_tok=None, text_len: int = 32) -> LabelPrompt:
  """The prompt of ``task`` ('basic' | 'compound') and its candidate answers, tokenised as
  the instruct pipeline tokenises them; with ``text_tok`` (the Q-Former's tokenizer) also
  the prompt for an instruction-aware Q-Former."""
  if task not in VOCABULARIES:
    raise ValueError(f'label task {task!r}; expected one of {sorted(VOCABULARIES)}')
  if think:
    raise ValueError('think=True needs the rationale between prompt and label; score '
                     'with think=False (the answer-only form)')
  names = VOCABULARIES[task]
  message = instructions.prompt_for(task, think=False, phrasing=phrasing, hint=hint)
  prompt = tok.prompt_ids(message)
  answers = [tok.encode(f'<answer>{n}</answer>') + [tok.eos_id] for n in names]
  shared = 0
  while all(len(a) > shared + 1 for a in answers) and len({a[shared] for a in answers}) == 1:
    shared += 1
  rests = [a[shared:] for a in answers]
  width = max(len(r) for r in rests)
  ids = np.full((len(names), width), tok.pad_id, np.int32)
  mask = np.zeros((len(names), width), np.int32)
  for i, r in enumerate(rests):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  qformer = {}
  if text_tok is not None:
    q_ids, q_mask, _ = examples.qformer_text(text_tok, message, text_len)
    qformer = dict(qformer_ids=q_ids, qformer_mask=q_mask)
  return LabelPrompt(task, tuple(names), np.asarray(prompt + answers[0][:shared], np.int32),
                     ids, mask, **qformer)


_SCORED = ('prompt_ids', 'candidate_ids', 'candidate_mask')


def task_queries(model, images: jax.Array, prompts: dict) -> dict[str, jax.Array]:
  """{task: the Q-Former's image queries [B, Q, H]} the task's candidates are scored on:
  one pass shared by every task, or one per task when the prompts carry the Q-Former's
  prompt (instruction-aware)."""
  if not any('qformer_ids' in arrs for arrs in prompts.values()):
    shared = model.image_queries(images)
    return {task: shared for task in prompts}
  b = images.shape[0]
  tile = lambda x: jnp.broadcast_to(x, (b, *x.shape))
  return {task: model.image_queries(images, tile(arrs['qformer_ids']),
                                    tile(arrs['qformer_mask']))
          for task, arrs in prompts.items()}


def scored(arrs: dict) -> dict:
  """The arrays ``candidate_log_likelihoods`` takes (no Q-Former prompt)."""
  return {k: arrs[k] for k in _SCORED}


def candidate_log_likelihoods(model, prefix_embeds: jax.Array, prompt_ids: jax.Array,
                              candidate_ids: jax.Array, candidate_mask: jax.Array) -> jax.Array:
  """log p(candidate c | image, prompt), summed over its tokens: f32 [B, C].

  ``model``: a UniFER module; ``prefix_embeds``: ``model.prefix(images)`` [B, Q, D]
  (shared by the label tasks of one batch).
  """
  llm = model.llm
  b = prefix_embeds.shape[0]
  c, length = candidate_ids.shape
  text = llm.embed(prompt_ids)[None].astype(prefix_embeds.dtype)
  embeds = jnp.concatenate([prefix_embeds, jnp.broadcast_to(text, (b, *text.shape[1:]))], 1)
  cache = llm.init_cache(b, embeds.shape[1] + length)
  hidden, cache = llm.extend(cache, inputs_embeds=embeds)
  # The first candidate token is predicted by the last prompt position.
  first = jax.nn.log_softmax(llm.logits_from_hidden(hidden[:, -1]), -1)          # [B, V]
  token0 = first[:, candidate_ids[:, 0]]                                          # [B, C]

  # Row b * C + i of the candidate batch continues image b with candidate i.
  per_row = lambda x, axis: jnp.repeat(x, c, axis=axis)
  cache = dict(k=per_row(cache['k'], 1), v=per_row(cache['v'], 1),
               valid=per_row(cache['valid'], 0), index=cache['index'], pos=per_row(cache['pos'], 0))
  ids = jnp.tile(candidate_ids, (b, 1))
  mask = jnp.tile(candidate_mask, (b, 1))
  hidden, _ = llm.extend(cache, ids, attention_mask=mask)                          # [BC, L, D]
  if length == 1:
    return token0
  logp = jax.nn.log_softmax(llm.logits_from_hidden(hidden[:, :-1]), -1)          # [BC, L-1, V]
  rest = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0] * mask[:, 1:]
  return token0 + rest.sum(-1).reshape(b, c)


def label_log_likelihoods(model, images: jax.Array, prompts: dict) -> dict[str, jax.Array]:
  """{task: candidate log-likelihoods [B, C]} for ``prompts`` = {task: arrays()}; the
  image prefix is computed once for all tasks (per task if instruction-aware)."""
  queries = task_queries(model, images, prompts)
  return {task: candidate_log_likelihoods(model, model.llm_proj(queries[task]), **scored(arrs))
          for task, arrs in prompts.items()}


def label_distributions(model, images: jax.Array, prompts: dict) -> dict[str, jax.Array]:
  """{task: softmax over its candidates [B, C]} (label_log_likelihoods normalised)."""
  return {task: jax.nn.softmax(ll, -1)
          for task, ll in label_log_likelihoods(model, images, prompts).items()}

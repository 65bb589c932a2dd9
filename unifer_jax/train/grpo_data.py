"""GRPO's prompts, made from the instruct pipeline's batches (the input adapter of the
grpo stage) -- the same tasks, phrasings, hints and candidate lists instruction tuning
trained on, so the policy is asked what it learned to answer.

Each instruct row is ``[prompt; target]`` in ``tokens`` with ``loss_mask`` on the target.
:class:`PromptInput` keeps the prompt, left-padded to ``config.grpo.prompt_len`` (so the
last prompt slot is each row's last token and sampled tokens follow it directly), and
the target's tokens for the host to read what was asked (:func:`prompts_of`: the task,
whether it asked for ``<think>``, the offered candidates, the record's rationale).
"""

from __future__ import annotations

import jax
import numpy as np

from unifer_jax.data import instructions
from unifer_jax.train import rewards as rewards_lib

LABEL_KEYS = ('task', 'expression', 'compound', 'intensity', 'valence', 'arousal')
PASSED = ('image', 'qformer_ids', 'qformer_mask') + LABEL_KEYS


class PromptInput:
  """inputs.Input over an instruct-format input: rows of (image, left-padded prompt,
  target tokens, labels). Its position is the base input's (resume is exact)."""

  def __init__(self, base, prompt_len: int, pad_id: int):
    self.base, self.prompt_len, self.pad_id = base, int(prompt_len), int(pad_id)
    spec = base.batch_spec()
    missing = [k for k in ('tokens', 'loss_mask', 'attention_mask', 'task') if k not in spec]
    if missing:
      raise ValueError(f'the grpo stage reads instruct-format batches; this input lacks '
                       f'{missing} (config.input.format must be instruct)')
    self.target_len = spec['tokens'].shape[1]

  def next_local_batch(self) -> dict[str, np.ndarray]:
    return split_rows(self.base.next_local_batch(), self.prompt_len, self.pad_id)

  def get_state(self) -> dict:
    return self.base.get_state()

  def set_state(self, state: dict) -> None:
    self.base.set_state(state)

  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    spec = self.base.batch_spec()
    rows = spec['tokens'].shape[0]
    out = {k: spec[k] for k in PASSED if k in spec}
    out['prompt_ids'] = jax.ShapeDtypeStruct((rows, self.prompt_len), np.int32)
    out['prompt_mask'] = jax.ShapeDtypeStruct((rows, self.prompt_len), np.int32)
    out['target_ids'] = jax.ShapeDtypeStruct((rows, self.target_len), np.int32)
    return out


def split_rows(batch: dict, prompt_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Instruct rows -> left-padded prompts + right-padded targets (+ the passed keys)."""
  tokens, target = batch['tokens'], batch['loss_mask'] > 0
  in_prompt = (batch['attention_mask'] > 0) & ~target
  rows = len(tokens)
  prompt = np.full((rows, prompt_len), pad_id, np.int32)
  mask = np.zeros((rows, prompt_len), np.int32)
  answer = np.full(tokens.shape, pad_id, np.int32)
  for i in range(rows):
    if not target[i].any():   # seq_len cut into the prompt itself
      raise ValueError(f'a prompt (task {instructions.TASKS[int(batch["task"][i])]}) fills all '
                       f'config.input.seq_len={tokens.shape[1]} tokens; raise it')
    ids = tokens[i][in_prompt[i]]
    if len(ids) > prompt_len:
      raise ValueError(f'a {len(ids)}-token prompt (task '
                       f'{instructions.TASKS[int(batch["task"][i])]}) exceeds '
                       f'config.grpo.prompt_len={prompt_len}; raise it')
    prompt[i, prompt_len - len(ids):] = ids
    mask[i, prompt_len - len(ids):] = 1
    t = tokens[i][target[i]]
    answer[i, :len(t)] = t
  out = {k: batch[k] for k in PASSED if k in batch}
  out.update(prompt_ids=prompt, prompt_mask=mask, target_ids=answer)
  return out


def prompts_of(rows: dict, tok) -> list[rewards_lib.Prompt]:
  """The host's view of each local row: what its prompt asked and the truth to score."""
  out = []
  for i in range(len(rows['task'])):
    prompt = tok.decode(rows['prompt_ids'][i][rows['prompt_mask'][i] > 0])
    target = tok.decode(rows['target_ids'][i])
    record = {k: rows[k][i] for k in LABEL_KEYS[1:]}
    out.append(rewards_lib.prompt_from_texts(instructions.TASKS[int(rows['task'][i])], prompt,
                                             target, record))
  return out

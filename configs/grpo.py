r"""Stage 3b: GRPO with verifiable rewards after instruction tuning (train/grpo.py).
Warm-starts from an instruct workdir; each step samples G completions for each of B
instruct prompts (basic, compound, open vocabulary, intensity, valence/arousal,
rationale), scores them (answer under FERBench's extraction, format, AU F1, closeness)
and makes mu clipped-ratio updates with a KL term to the instruct model.

  unifer train --config configs/grpo.py:demo --workdir W/grpo \
      --config.init.checkpoint=W/instruct --config.input.data_dir=W/data \
      --config.input.tokenizer=W/tokenizer

Args: 'MODEL[,dr]' -- the model preset (demo | tiny; default demo) and, with ',dr', Dr.
GRPO's settings (no std scaling of the rewards, the constant loss normaliser, no KL).

Expected: see benchmarks/grpo_seeds.py for the held-out figures of this config over
seeds (filled in there with the numbers of the day).
"""

from unifer_jax import config_lib

# The instruct tasks whose answer a reward can check (train/rewards.py).
TASKS = ('basic', 'compound', 'open_vocab', 'intensity', 'valence_arousal', 'rationale')


def get_config(arg: str = 'demo'):
  parts = [p for p in (arg or 'demo').split(',') if p]
  model = parts[0] if parts else 'demo'
  dr = 'dr' in parts[1:]
  demo = model == 'demo'
  frozen = (config_lib.VISION_AND_STAGE1_HEADS, config_lib.QFORMER_TEXT_SIDE)
  c = config_lib.stage_config('grpo', model, steps=100 if demo else 20, batch_size=16 if demo else 4,
                              peak_lr=1e-5 if demo else 1e-3, freeze='|'.join(frozen))
  c.input.tasks = list(TASKS)
  # Compound faces are the hardest label (instruct gives that task twice the share).
  c.input.task_weights = [2.0 if t == 'compound' else 1.0 for t in TASKS]
  # Whole targets: the truth a reward reads (rationale, open-vocabulary answer) is in them.
  c.input.seq_len = 160 if demo else 256
  c.input.augment.enabled = False
  c.grpo = dict(
      group_size=8,                # G completions per prompt (UniFER: 8)
      temperature=1.0,             # sampling temperature (UniFER: 1.0)
      top_p=1.0,
      max_new_tokens=72 if demo else 16,   # the instruct evaluator's budget on the demo
      prompt_len=112,              # longest prompt (demo BPE: open vocabulary 106), left-padded
      clip_low=0.2,                # ratio clip below 1 ...
      clip_high=0.28,              # ... and above (DAPO's clip-higher keeps exploring)
      kl_weight=0.04,              # UniFER / R1-V
      kl_estimator='k3',           # 'k3' | 'k2' | 'k1'
      loss_aggregation='sequence_mean',   # 'sequence_mean' | 'token_mean' | 'constant'
      scale_rewards='group',       # 'group' (divide by the group's std) | 'none'
      updates_per_batch=1,         # mu (UniFER: 1)
      dynamic_sampling=False,      # DAPO: replace zero-variance groups by further prompts
      max_refills=2,               # ... at most this many extra rollouts per step
      reference='auto',            # 'adapters_off' (LoRA) | 'initial' (a frozen copy)
      rewards=dict(answer=1.0, format=0.5, au_f1=0.5, intensity=0.5, va=0.5),
  )
  if dr:   # Dr. GRPO (Liu et al. 2025): unbiased advantages and loss normaliser
    c.grpo.scale_rewards = 'none'
    c.grpo.loss_aggregation = 'constant'
    c.grpo.kl_weight = 0.0
  c.checkpoint.every_steps = 25 if demo else 5
  c.log_every_steps = 1
  if not demo:   # tests: a tokenizer's prompts and targets in whole
    c.model.llm.max_seq_len = 320
  if demo:
    for tower in ('vit', 'qformer', 'llm'):
      c.model[tower].unroll_layers = True
  return c

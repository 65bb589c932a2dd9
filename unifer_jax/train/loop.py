"""The one train loop, for every stage, on one CPU or a pod.

Reads top to bottom: distributed -> workdir -> mesh -> input -> model state (init or
resume) -> step -> checkpointing and preemption -> loop. ``unifer train`` calls
:func:`train`. What a stage adds (an input adapter, frozen extra step inputs, a per-step
hook such as grpo's rollouts) comes through ``setup.stage`` (train/stages.py); nothing
here names a stage.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from unifer_jax import config_lib, distributed, peer_watch, sharding, workdirs
from unifer_jax.data import inputs as inputs_lib
from unifer_jax.train import checkpoint as ckpt_lib
from unifer_jax.train import metrics as metrics_lib, profiling
from unifer_jax.train import state as state_lib, step as step_lib, step_cost


class NonFiniteLossError(RuntimeError):
  pass


class Preempted(Exception):
  """SIGTERM (or the multi-host preemption notice) stopped the run after a clean save:
  raised, not returned, so a caller that chains stages cannot go on to the next one
  with this one half trained. Rerunning the same command resumes at `step`."""

  def __init__(self, workdir: Path, step: int):
    super().__init__(f'{workdir}: preempted, checkpoint saved at step {step}; rerun to resume')
    self.workdir, self.step = workdir, step


def train(config, workdir: str | Path) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints).

  Returns the last logged metrics (process 0's view); raises :class:`Preempted` when a
  SIGTERM stopped it early.
  """
  # ------------------------------------------------------------------------------ #
  # Distributed and workdir                                                         #
  # ------------------------------------------------------------------------------ #
  distributed.initialize(peer_timeout_s=config.get('peer_timeout_s'))
  main = distributed.is_main()
  workdir = workdirs.path(workdir)   # a local folder or a URL (gs://BUCKET/run)
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
  writer = metrics_lib.MetricWriter(workdir, config.total_steps, enabled=main)

  # ------------------------------------------------------------------------------ #
  # Mesh                                                                            #
  # ------------------------------------------------------------------------------ #
  mesh = sharding.make_mesh(config.mesh)
  if main:
    _, dcn, granule = sharding.hybrid_shape(config.mesh, jax.devices())
    spans = {a: n for a, n in zip(sharding.MESH_AXES, dcn) if n > 1}
    print(f'mesh {dict(mesh.shape)} over {jax.device_count()} devices, '
          f'{jax.process_count()} process(es)'
          + (f'; across {"slices" if granule == "slice" else "processes"} (DCN): {spans}'
             if spans else ''), flush=True)

  # ------------------------------------------------------------------------------ #
  # Model, optimizer and their shardings (shared with compile-check)               #
  # ------------------------------------------------------------------------------ #
  setup = state_lib.build(config, mesh)
  stage = setup.stage

  # ------------------------------------------------------------------------------ #
  # Input                                                                           #
  # ------------------------------------------------------------------------------ #
  data = inputs_lib.make_input(config, setup.model_cfg)
  if main:   # after the input: a tokenizer it trained is there to copy into the workdir
    workdirs.save_config(config, workdir)
  data = stage.adapt_input(data, workdir)

  # ------------------------------------------------------------------------------ #
  # Checkpoint: resume or initialise                                                #
  # ------------------------------------------------------------------------------ #
  checkpointer = ckpt_lib.Checkpointer(workdir / 'checkpoints', config.checkpoint)
  restored = checkpointer.restore(setup.abstract_state)
  if restored is None:
    state = setup.init_state()
    first_step = 0
  else:
    first_step, state, data_state = restored
    data.set_state(data_state['input'])
    if main:
      print(f'resumed from checkpoint step {first_step} in {checkpointer.directory}', flush=True)
  config_json = json.loads(config_lib.to_json(config))
  if first_step >= config.total_steps:
    if main:
      print(f'already at step {first_step} of {config.total_steps}: nothing to train', flush=True)
    checkpointer.close()
    writer.close()
    return {'step': first_step}

  # ------------------------------------------------------------------------------ #
  # Step                                                                            #
  # ------------------------------------------------------------------------------ #
  loss_fn = stage.loss()
  batch_spec = stage.step_batch_spec(data.batch_spec())
  train_step = step_lib.compile_step(setup, loss_fn, batch_spec)
  traced = train_step.trace(*step_lib.abstract_args(setup, batch_spec))
  compiled = traced.lower().compile()
  # Frozen extra step inputs of the stage (distill: the teacher's params + label prompts).
  extra = stage.load_extra()
  extra_inputs = () if extra is None else (extra,)
  # Model FLOPs from the step's jaxpr, scanned layers counted per layer (XLA's cost
  # analysis counts a loop body once).
  flops_per_device = step_cost.step_flops(config, mesh, batch_spec, traced).model_flops / mesh.size
  peak = metrics_lib.device_peak_flops()
  leaf_names = step_lib.trainable_leaf_names(setup)
  rng = jax.random.key(config.seed)
  # [B, H, W, C], or [B, M, H, W, C] with several image slots per row (all computed).
  pixels = batch_spec.get('image', batch_spec.get('frames'))   # clips: B * T ViT passes
  images_per_batch = int(np.prod(pixels.shape[:-3])) if pixels is not None else 0
  tokens_per_batch = int(np.prod(batch_spec['tokens'].shape)) if 'tokens' in batch_spec else 0

  # ------------------------------------------------------------------------------ #
  # Preemption: SIGTERM saves a checkpoint and exits cleanly                        #
  # ------------------------------------------------------------------------------ #
  # One process: our own SIGTERM flag. Several: JAX's preemption service (started by
  # jax.distributed) propagates the notice and picks a step every process reaches.
  multi_process = jax.process_count() > 1
  preempted = {'flag': False}
  previous_handler = None if multi_process else signal.signal(
      signal.SIGTERM, lambda *_: preempted.update(flag=True))

  def should_stop(step: int) -> bool:
    if multi_process:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return preempted['flag']

  # ------------------------------------------------------------------------------ #
  # Evals (config.evals, each every_steps; results in metrics.jsonl)               #
  # ------------------------------------------------------------------------------ #
  # Every process runs them, each scoring its share of the items (evaluators/item_shards).
  evals = None
  if len(config.get('evals') or {}):
    from unifer_jax.evaluators import registry as eval_registry  # pylint: disable=g-import-not-at-top
    evals = eval_registry.InTraining(config, setup, workdir)

  # A jax.profiler trace of config.profile's steps (process 0; train/profiling.py).
  profiler = profiling.Profiler(config.get('profile'), workdir, enabled=main)

  def save(step: int, force: bool = False):
    writer.flush()   # metrics cover every checkpointed step (a gs:// workdir uploads here)
    checkpointer.save(step, state, {'input': data.get_state()}, config_json, force=force)

  # ------------------------------------------------------------------------------ #
  # Loop                                                                            #
  # ------------------------------------------------------------------------------ #
  distributed.start_together('first_step')   # peers compiled or loaded at unequal speed
  pending: list[tuple[int, dict]] = []
  last: dict = {}
  interval_start = time.monotonic()
  step = first_step
  try:
    while step < config.total_steps:
      peer_watch.progress(step + 1)   # the step this process is about to run
      with profiler.step(step + 1):
        local, host_metrics = data.next_local_batch(), {}
        if tokens_per_batch and 'attention_mask' in local:
          # Positions that hold a token (packed or not), on this process's rows.
          host_metrics['real_token_frac'] = float(np.mean(local['attention_mask'] > 0))
        if stage.has_hook:   # e.g. rollouts: the step's batch is made from the input's rows
          batch, host_metrics = stage.before_step(state, local, step, extra, data.next_local_batch)
        else:
          batch = inputs_lib.to_global(local, mesh)
        state, step_metrics = compiled(state, batch, rng, *extra_inputs)
      step += 1
      profiler.after(step, state)
      pending.append((step, step_metrics, host_metrics))

      if step % config.log_every_steps == 0 or step == config.total_steps:
        fetched = jax.device_get(pending)
        elapsed = time.monotonic() - interval_start
        per_step = elapsed / len(fetched)
        for s, m, host in fetched:
          if not m['finite']:
            bad = [leaf_names[i] for i, ok in enumerate(m['grad_leaf_finite']) if not ok]
            msg = (f'step {s}: non-finite loss/gradients (loss={float(m["loss"])}); first '
                   f'non-finite gradient leaf: {bad[0] if bad else "(loss only)"}')
            if config.nan_policy == 'stop':
              raise NonFiniteLossError(msg + '; the step was not applied, no checkpoint written')
            if main:
              print(f'WARNING: {msg}; step skipped (nan_policy=skip)', flush=True)
          record = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
          record['skipped'] = float(not m['finite'])
          record.update(step_time_s=per_step, img_per_s=images_per_batch / per_step,
                        tokens_per_s=tokens_per_batch / per_step)
          if 'real_token_frac' in host:
            record['real_tokens_per_s'] = host['real_token_frac'] * tokens_per_batch / per_step
          if flops_per_device and peak == peak:
            record['mfu'] = flops_per_device / per_step / peak
          record = stage.log_record({**record, **host})
          writer.write(s, record)
          last = {'step': s, **record}
        writer.progress(step, last)
        pending.clear()
        interval_start = time.monotonic()

      if checkpointer.due(step) or step == config.total_steps:
        save(step)
      if evals is not None:
        t_eval = time.monotonic()
        results = evals.run(step, state['params'], last=step == config.total_steps)
        if results:
          writer.write(step, results)
        interval_start += time.monotonic() - t_eval   # step times exclude the evals
      if should_stop(step):
        save(step, force=True)
        checkpointer.wait()
        if main:
          print(f'preempted (SIGTERM): saved step {step}, exiting', flush=True)
        raise Preempted(workdir, step)
    if main:
      writer.flush()   # what finish reads back (metrics.jsonl) is complete in the workdir
      stage.finish(workdir)
  finally:
    profiler.close()
    checkpointer.close()
    writer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  return last

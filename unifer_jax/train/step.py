"""The train step: a pure function ``(state, batch, rng) -> (state, metrics)``.

Compiled once with ``jax.jit(in_shardings, out_shardings, donate_argnums)`` by
:func:`compile_step`, the same call the AOT compile-check lowers for a TPU/GPU topology.
Gradients are taken only with respect to the trainable parameters (XLA then never
computes what a frozen tower's weights would have received). Gradient accumulation
scans over micro-batches. A step whose loss or gradients are not finite leaves the
state untouched and reports which gradient leaves were bad (the loop applies
``config.nan_policy``), so a NaN never reaches a checkpoint. The step is traced inside
``sharding.use_mesh`` so the models' activation constraints take effect.

What differs by stage comes from ``setup.stage`` (train/stages.py): a stage with extra
inputs (distill's online teacher) gets them as the step's fourth argument, the loss
receives ``stage.model_view(model, extra)``, and ``stage.updates_per_step`` optimizer
updates are made on each batch (grpo's mu passes over one rollout batch; each pass folds
its index into the rng).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from unifer_jax import sharding
from unifer_jax.train import optim
from unifer_jax.train.state import Setup, bind

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def make_step(setup: Setup, loss_fn: LossFn) -> Callable:
  config, graphdef, tx = setup.config, setup.graphdef, setup.tx
  accum = int(config.optimizer.get('grad_accum_steps', 1))
  freeze = config.freeze
  stage = setup.stage
  passes = stage.updates_per_step(config)

  def loss_of(trainable, frozen, batch, rng, extra):
    model = stage.model_view(bind(graphdef, optim.merge_params(trainable, frozen)), extra)
    loss, aux = loss_fn(model, batch, rng)
    return loss.astype(jnp.float32), aux

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def gradients(trainable, frozen, batch, rng, extra):
    if accum == 1:
      return grad_fn(trainable, frozen, batch, rng, extra)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, inp):
      mb, i = inp
      (loss, aux), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i), extra)
      acc_loss, acc_aux, acc_g = carry
      return (acc_loss + loss, jax.tree.map(jnp.add, acc_aux, aux),
              jax.tree.map(jnp.add, acc_g, g)), None

    (_, aux0), _ = jax.eval_shape(grad_fn, trainable, frozen,
                                  jax.tree.map(lambda x: x[0], micro), rng, extra)
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux0),
             jax.tree.map(jnp.zeros_like, trainable))
    (loss, aux, g), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    scale = 1.0 / accum
    return (loss * scale, jax.tree.map(lambda a: a * scale, aux)), jax.tree.map(
        lambda x: x * scale, g)

  rules = [tuple(r) for r in config.sharding.rules]

  def step(state, batch, rng, extra=None):
    # Traced with the mesh and rules active, so the models' activation constraints
    # (sharding.constrain) apply in the loop, compile-check and tests alike.
    with sharding.use_mesh(setup.mesh, rules):
      return unconstrained_step(state, batch, rng, extra)

  def update(trainable, opt_state, frozen, batch, rng, extra):
    """One optimizer update; a non-finite one leaves params and moments as they were."""
    (loss, aux), grads = gradients(trainable, frozen, batch, rng, extra)
    leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    ok = jnp.all(leaf_finite) & jnp.isfinite(loss)
    updates, new_opt = tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'finite': ok,
               'grad_leaf_finite': leaf_finite, **aux}
    return keep(new_trainable, trainable), keep(new_opt, opt_state), metrics

  def unconstrained_step(state, batch, rng, extra):
    trainable, frozen = optim.split_trainable(state['params'], freeze)
    rng = jax.random.fold_in(rng, state['step'])
    if passes == 1:
      trainable, opt_state, metrics = update(trainable, state['opt_state'], frozen, batch, rng,
                                             extra)
    else:
      # Several updates on one batch (a stage's updates_per_step): metrics are their mean,
      # 'finite' holds only if every pass was finite.
      def body(carry, i):
        tr, opt = carry
        tr, opt, m = update(tr, opt, frozen, batch, jax.random.fold_in(rng, i), extra)
        return (tr, opt), m

      (trainable, opt_state), per_pass = jax.lax.scan(
          body, (trainable, state['opt_state']), jnp.arange(passes))
      metrics = jax.tree.map(lambda x: x.mean(0) if x.dtype != jnp.bool_ else x.all(0),
                             per_pass)
    new_state = {
        'step': state['step'] + 1,
        'params': optim.merge_params(trainable, frozen),
        'opt_state': opt_state,
    }
    metrics['lr'] = setup.schedule(state['step'] * passes)
    return new_state, metrics

  return step


def compile_step(setup: Setup, loss_fn: LossFn, batch_spec: dict) -> Any:
  """``jax.jit`` of the step with explicit shardings (state donated).

  ``batch_spec``: {name: ShapeDtypeStruct} of the *global* batch; batches are split on
  their leading dimension over the mesh's batch axes.
  """
  mesh = setup.mesh
  batch_shardings = {k: NamedSharding(mesh, P(sharding.BATCH_AXES)) for k in batch_spec}
  replicated = NamedSharding(mesh, P())
  extra = setup.stage.extra_shardings()
  extra = () if extra is None else (extra,)
  return jax.jit(
      make_step(setup, loss_fn),
      in_shardings=(setup.state_shardings, batch_shardings, replicated, *extra),
      out_shardings=(setup.state_shardings, replicated),
      donate_argnums=(0,))


def abstract_args(setup: Setup, batch_spec: dict) -> tuple:
  """The (state, batch, rng[, the stage's extra inputs]) ShapeDtypeStructs the compiled
  step is lowered for."""
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_spec.items()}
  extra = setup.stage.extra_abstract()
  extra = () if extra is None else (extra,)
  return setup.abstract_state, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype), *extra


def trainable_leaf_names(setup: Setup) -> list[str]:
  """Paths of the gradient leaves in ``grad_leaf_finite`` order (for the NaN message)."""
  trainable, _ = optim.split_trainable(setup.abstract_state['params'], setup.config.freeze)
  return [optim.keypath_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]

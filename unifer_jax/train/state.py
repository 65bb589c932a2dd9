"""The train state, its shardings and its initialisation -- built in ONE place.

The train loop and ``unifer compile-check`` both call :func:`build`, so the compile
check lowers exactly the state, shardings and step that really run (MaxText's
train_compile idea).

State layout (a plain pytree, what orbax saves)::

  {'step': int32[], 'params': {nested, as nnx.to_pure_dict}, 'opt_state': optax state
   over the *trainable* params only}

Frozen parameters (``config.freeze``) live in ``params`` but have no optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unifer_jax import sharding
from unifer_jax.convert import compose
from unifer_jax.models import presets
from unifer_jax.models.student import Student
from unifer_jax.models.unifer import UniFER
from unifer_jax.train import optim, warm_start

# What a stage trains, by ``model.kind`` (absent = 'unifer'), and the towers of each that
# carry their own dtype / remat / scan settings.
MODELS = {'unifer': (UniFER, ('vit', 'qformer', 'llm')), 'student': (Student, ('encoder',))}


@dataclasses.dataclass
class Setup:
  """Everything the loop and the compile-check share."""
  config: ml_collections.ConfigDict
  model_cfg: ml_collections.ConfigDict
  mesh: Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: Any          # ShapeDtypeStructs carrying their shardings
  state_shardings: Any         # NamedShardings, same structure as the state
  logical_axes: dict           # flat 'path' -> logical axis names of every parameter
  stage: Any = None            # train.stages.Stage: what the stage adds to the loop

  @property
  def teacher(self):
    """The distill stage's frozen teacher (None for other stages and cached targets)."""
    return getattr(self.stage, 'teacher', None)

  def init_state(self, seed: int | None = None) -> Any:
    """Concrete state, created directly in its shards (never whole on one host); the
    towers named in ``config.init`` then replace their random weights."""
    seed = self.config.seed if seed is None else seed
    model_cfg, freeze, tx = self.model_cfg, self.config.freeze, self.tx

    def init_params():
      model = model_class(model_cfg)(model_cfg, rngs=nnx.Rngs(seed))
      return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def with_optimizer(params):
      trainable, _ = optim.split_trainable(params, freeze)
      return {'step': jnp.zeros((), jnp.int32), 'params': params,
              'opt_state': tx.init(trainable)}

    init = lambda: jax.jit(init_params, out_shardings=self.state_shardings['params'])()
    checkpoint = self.config.init.get('checkpoint')
    if checkpoint and not compose.has_init(self.config):
      # Warm start from an earlier stage's workdir, restored straight into the shardings.
      # The random init runs only for what the checkpoint lacks (a stage's whole model
      # usually comes from it; the init's compile was ~4 s of a demo stage's start).
      params, loaded, fresh = warm_start.load_matching(checkpoint, self.abstract_state['params'])
      if fresh:
        params = warm_start.fill_fresh(params, init(), fresh)
    else:
      params = init()
      if compose.has_init(self.config):
        params, report = compose.apply_init(params, self.config.init, model_cfg, seed=seed)
        if jax.process_index() == 0:
          print(report.summary(), flush=True)
      if checkpoint:
        params, loaded, fresh = warm_start.load_matching(checkpoint, params)
    if checkpoint and jax.process_index() == 0:
      print(f'init.checkpoint {checkpoint}: loaded {len(loaded)} parameters; '
            f'fresh: {", ".join(fresh) if fresh else "none"}', flush=True)
    return jax.jit(with_optimizer, out_shardings=self.state_shardings, donate_argnums=0)(params)


def model_class(model_cfg) -> type:
  kind = model_cfg.get('kind', 'unifer')
  if kind not in MODELS:
    raise KeyError(f'config.model.kind={kind!r}; expected one of {sorted(MODELS)}')
  return MODELS[kind][0]


def towers(model_cfg) -> tuple[str, ...]:
  """The sub-configs with their own dtype / remat / scan_layers keys."""
  model_class(model_cfg)
  return MODELS[model_cfg.get('kind', 'unifer')][1]


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The resolved model config with the run-wide dtype / remat overrides applied."""
  cfg = ml_collections.ConfigDict(presets.resolve(config.model).to_dict())
  for tower in towers(cfg):
    if config.get('compute_dtype'):
      cfg[tower].dtype = config.compute_dtype
    if config.get('remat'):
      cfg[tower].remat = config.remat
    if config.get('attention') and 'attention' in cfg[tower]:
      cfg[tower].attention = config.attention
  if compose.has_init(config):  # pretrained towers decide their own architecture
    cfg = compose.model_config_with_init(cfg, config.init)
  return cfg


def _named(tree_of_variables, fn) -> dict:
  """Applies fn(variable) to every variable of an nnx.State -> nested pure dict."""
  flat = {}
  for path, var in nnx.to_flat_state(tree_of_variables):
    flat[tuple(path)] = fn(var)
  return traverse_util.unflatten_dict(flat)


def build(config: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
  """Abstract model and optimizer state with their shardings; nothing is allocated."""
  model_cfg = model_config(config)
  abstract_model = nnx.eval_shape(lambda: model_class(model_cfg)(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, param_state = nnx.split(abstract_model, nnx.Param)
  rules = [tuple(r) for r in config.sharding.rules]
  shardings_state = sharding.state_shardings(param_state, mesh, rules)
  param_shardings = _named(shardings_state, lambda v: v.get_value())
  logical = optim.flat(_named(param_state, lambda v: sharding._logical_axes_of(v)))
  abstract_params = nnx.to_pure_dict(param_state)

  from unifer_jax.train import stages  # pylint: disable=g-import-not-at-top (it builds on Setup)
  stage_class = stages.stage_class(config.stage)
  # The schedule counts optimizer updates (a stage may make several per step).
  sched = optim.schedule(config.schedule,
                         config.total_steps * stage_class.updates_per_step(config))
  trainable, _ = optim.split_trainable(abstract_params, config.freeze)
  if not jax.tree.leaves(trainable):
    raise ValueError(f'config.freeze={config.freeze!r} freezes every parameter')
  tx = optim.make_optimizer(config.optimizer, sched, trainable)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  trainable_shardings, _ = optim.split_trainable(param_shardings, config.freeze)
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, trainable_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))

  state_shardings = {'step': replicated, 'params': param_shardings, 'opt_state': opt_shardings}
  abstract_state = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract_params,
                    'opt_state': abstract_opt}
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      state_shardings)
  setup = Setup(config=config, model_cfg=model_cfg, mesh=mesh, graphdef=graphdef, tx=tx,
                schedule=sched, abstract_state=abstract_state,
                state_shardings=state_shardings, logical_axes=logical)
  setup.stage = stage_class(config, setup)
  return setup


def bind(graphdef, params) -> nnx.Module:
  """The module with these (possibly traced) parameters."""
  return nnx.merge(graphdef, params)


LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]

"""Sharded execution equals single-device execution, and weights carry the rule's specs.

On 8 fake CPU devices, for each (data, fsdp, tensor) mesh: the tiny UniFER forward pass
and one AdamW train step (the real step of unifer_jax.train) match one device to 1e-5;
also with an OPT-shaped LLM (LayerNorm, learned positions, ReLU MLP, biases).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unifer_jax import config_lib, sharding
from unifer_jax.data import random_batches
from unifer_jax.models import presets
from unifer_jax.train import losses, optim, state as state_lib, step as step_lib, step_cost

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
# The tiny preset's LLM with OPT's switches (kv_heads = heads, as OPT has).
OPT_LLM = dict(norm='layer', position_embedding='learned', mlp='relu', kv_heads=4,
               qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True)


def _config(mesh_shape, llm=None):
  config = config_lib.load('configs/smoke.py:tiny')
  if llm:
    model = presets.get('tiny')
    model.llm.update(llm)
    with config.ignore_type():  # a full model config where the preset name was
      config.model = model
  config.mesh = dict(zip(sharding.MESH_AXES, mesh_shape))
  config.schedule.warmup_steps = 0
  config.schedule.peak_lr = 1e-3
  # Adam's first update is lr * g / (|g| + eps): for gradient entries of size ~eps it is
  # ill-conditioned, so the last-bit differences of a different reduction order become
  # ~1% of lr (seen: 1.03e-5 in llm/layers/mlp/up/kernel with eps=1e-8, lr=1e-3).
  # eps=1e-6 keeps the comparison about the sharding, not that amplification; entries
  # with |g| >> 1e-6 still take the full-size Adam step.
  config.optimizer.eps = 1e-6
  return config


def _run(mesh_shape, devices, llm=None):
  config = _config(mesh_shape, llm)
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = state_lib.build(config, mesh)
  state = setup.init_state()
  batch_np = random_batches.global_batch(config, setup.model_cfg, step=0)
  batch = sharding.shard_batch(batch_np, mesh)

  @jax.jit
  def forward(params, batch):
    model = state_lib.bind(setup.graphdef, params)
    return model(batch['image'], batch['tokens'])

  logits = np.asarray(forward(state['params'], batch))
  params_before = jax.tree.map(np.asarray, state['params'])
  loss_fn = losses.get(config.stage)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  compiled = step_lib.compile_step(setup, loss_fn, spec)
  new_state, metrics = compiled(state, batch, jax.random.key(0))
  return dict(setup=setup, state=new_state, logits=logits, params_before=params_before,
              params=jax.tree.map(np.asarray, new_state['params']),
              loss=float(metrics['loss']))


@pytest.fixture(scope='module')
def reference():
  return _run((1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize('mesh_shape', MESHES, ids=lambda m: 'x'.join(map(str, m)))
def test_sharded_forward_and_step_match_single_device(reference, mesh_shape):
  assert len(jax.devices()) == 8
  _assert_matches(_run(mesh_shape, jax.devices()), reference)


@pytest.fixture(scope='module')
def opt_reference():
  return _run((1, 1, 1), jax.devices()[:1], OPT_LLM)


def test_opt_llm_sharded_forward_and_step_match_single_device(opt_reference):
  # One mesh with every axis > 1 (each run compiles the whole UniFER step: ~25 CPU-s).
  got = _run((2, 2, 2), jax.devices(), OPT_LLM)
  _assert_matches(got, opt_reference)
  # OPT's own weights are really sharded by the rules: position rows replicated, width
  # over fsdp; fc1 (mlp/up) and its bias over tensor.
  params = optim.flat(got['state']['params'])
  assert params['llm/pos_embed/embedding'].sharding.spec == P(None, 'fsdp')
  assert params['llm/layers/mlp/up/kernel'].sharding.spec == P(None, 'fsdp', 'tensor')
  assert params['llm/layers/mlp/up/bias'].sharding.spec == P(None, 'tensor')
  assert 'llm/layers/mlp/gate/kernel' not in params


def _assert_matches(got, reference):
  np.testing.assert_allclose(got['logits'], reference['logits'], atol=1e-5, rtol=0)
  assert abs(got['loss'] - reference['loss']) <= 1e-5
  # Same initial parameters (sharded init) and same parameters after one AdamW step.
  for name, tree in (('init', 'params_before'), ('after step', 'params')):
    ref = optim.flat(reference[tree])
    diffs = {p: float(np.max(np.abs(a - ref[p]))) for p, a in optim.flat(got[tree]).items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-5, f'{name}: max abs diff {diffs[worst]} at {worst}'
  # The step really moved the parameters.
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got['params'], got['params_before'])
  assert max(jax.tree.leaves(moved)) > 1e-4


@pytest.mark.parametrize('mesh_shape', [(1, 4, 2), (2, 2, 2)], ids=lambda m: 'x'.join(map(str, m)))
def test_weights_carry_the_rules_partition_specs(mesh_shape):
  config = _config(mesh_shape)
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.build(config, mesh)
  state = setup.init_state()
  flat_params = optim.flat(state['params'])
  rules = dict(sharding.DEFAULT_RULES)
  checked = 0
  for path, axes in setup.logical_axes.items():
    assert axes is not None, f'{path} has no logical axis names'
    array = flat_params[path]
    expected = sharding.logical_to_spec(axes, config.sharding.rules, mesh)
    expected = sharding._fit_to_shape(expected, array.shape, mesh)
    assert array.sharding.spec == expected, path
    checked += 1
  assert checked == len(flat_params)
  # Spot checks written out by hand: an MLP up-projection is [layers, embed, mlp] and
  # shards embed over fsdp and mlp over tensor; the vocab embedding shards vocab over tensor.
  mlp_in = [p for p, a in setup.logical_axes.items() if p.startswith('llm/') and a == ('layers', 'embed', 'mlp')]
  assert mlp_in, 'expected scanned LLM MLP kernels'
  for p in mlp_in:
    assert flat_params[p].sharding.spec == P(None, 'fsdp', 'tensor'), p
  vocab = [p for p, a in setup.logical_axes.items() if p.startswith('llm/') and a == ('vocab', 'embed')]
  assert vocab and flat_params[vocab[0]].sharding.spec == P('tensor', 'fsdp')
  assert rules['embed'] == 'fsdp' and rules['mlp'] == 'tensor'
  # Optimizer moments are sharded like their parameters.
  mu = jax.tree.leaves(state['opt_state'])
  assert any(getattr(x, 'sharding', None) is not None and x.sharding.spec == P(None, 'fsdp', 'tensor')
             for x in mu)


def test_logical_to_spec_rules():
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(('embed', 'mlp'), rules) == P('fsdp', 'tensor')
  # A mesh axis is used once per array: [embed, embed] shards only the first.
  assert sharding.logical_to_spec(('embed', 'embed'), rules) == P('fsdp')
  assert sharding.logical_to_spec(('layers', 'heads', 'embed'), rules) == P(None, 'tensor', 'fsdp')
  assert sharding.logical_to_spec(('batch', None), rules) == P(('data', 'fsdp'))
  with pytest.raises(ValueError, match='needs 6 devices'):
    sharding.mesh_shape({'data': 2, 'fsdp': 3, 'tensor': 1}, 8)
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 2}, 8) == (2, 2, 2)


# -- activation constraints ----------------------------------------------------------

ACT = ('activation_batch', 'activation_length', 'activation_embed')


def _spec(s):
  """A PartitionSpec as a tuple without trailing Nones (P('a') == P('a', None))."""
  t = tuple(s)
  while t and t[-1] is None:
    t = t[:-1]
  return t


def _constraints(jaxpr, in_scan=False):
  """(inside a scan body?, operand shape, PartitionSpec) of every sharding constraint."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'sharding_constraint':
      yield in_scan, eqn.invars[0].aval.shape, _spec(eqn.params['sharding'].spec)
    for sub in step_cost._sub_jaxprs(list(eqn.params.values())):
      yield from _constraints(sub, in_scan or eqn.primitive.name == 'scan')


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((8, 4, 6))
  assert sharding.constrain(x, ACT) is x
  jaxpr = jax.make_jaxpr(lambda a: sharding.constrain(a, ACT) * 2)(x).jaxpr
  assert not list(_constraints(jaxpr))
  with pytest.raises(ValueError, match=r'3 logical axes .* shape \(4, 6\)'):
    sharding.constrain(x[0], ACT)
  # With a mesh set the jax way (jax.set_mesh), the default rules apply.
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(lambda a: sharding.constrain(a, ACT) * 2)(x).jaxpr
  assert [c[2] for c in _constraints(jaxpr)] == [(('data', 'fsdp'),)]


@pytest.mark.parametrize('mesh_shape', [(1, 4, 2)], ids=lambda m: 'x'.join(map(str, m)))
def test_train_step_pins_activations_to_the_batch_axes(mesh_shape):
  """The traced train step carries the constraints: the layer-scan carry (forward and
  backward) split over the batch axes, logits' vocab over tensor. Without them XLA's
  propagation decides, and on a pod it replicated the batch inside the scan (base on
  v5e-16 did not fit)."""
  config = _config(mesh_shape)
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.build(config, mesh)
  spec = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in
          random_batches.batch_spec(config, setup.model_cfg).items()}
  traced = step_lib.compile_step(setup, losses.get(config.stage), spec).trace(
      *step_lib.abstract_args(setup, spec))
  found = list(_constraints(traced.jaxpr.jaxpr))
  b = config.input.batch_size
  scan_carries = [(shape, s) for in_scan, shape, s in found if in_scan and len(shape) == 3]
  assert scan_carries and all(s == ('fsdp',) and shape[0] == b for shape, s in scan_carries)
  towers = {shape[1:] for shape, _ in scan_carries}  # ViT, Q-Former and LLM widths/lengths
  assert len(towers) >= 3, towers
  vocab = setup.model_cfg.llm.vocab_size
  logits = [s for _, shape, s in found if shape[-1] == vocab and len(shape) == 3]
  assert logits and all(s == ('fsdp', None, 'tensor') for s in logits)

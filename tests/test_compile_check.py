"""`unifer compile-check`: the real train step compiled for a TPU topology on this CPU box.

Real compiles (libtpu, deviceless) of the tiny preset on v5e:2x2: the generative step
under FSDP with an HBM too small (exit 1, the report's fields), and the text-only step
data-parallel (exit 0), on one slice and on two (cross-slice bytes apart); the text-only
step for 2 H100s (the CUDA PJRT plugin of the gpu-aot extra, which `make test` installs).
Plus product-name mapping checked against libtpu itself, and the FLOP, collective and
DCN counters against hand-counted programs.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unifer_jax import cli, sharding
from unifer_jax.train import aot_targets, compile_check as cc, hlo_memory, hlo_stats, step_cost

TINY = ['compile-check', '--config', 'configs/smoke.py:tiny', '--topology', 'v5e:2x2']


@pytest.mark.parametrize('name, platform, topology, chips', [
    ('v5p-128', 'tpu', 'v5p:4x4x4', 64),
    ('v5p-8', 'tpu', 'v5p:2x2x1', 4),
    ('v5p-32', 'tpu', 'v5p:2x2x4', 16),
    ('v5e-16', 'tpu', 'v5e:4x4', 16),
    ('v5litepod-256', 'tpu', 'v5e:16x16', 256),
    ('v6e-64', 'tpu', 'v6e:8x8', 64),
    ('v4-32', 'tpu', 'v4:2x2x4', 16),
    ('v5p:4x4x4', 'tpu', 'v5p:4x4x4', 64),
    ('h100x8', 'cuda', '1x1x8', 8),
    ('gpu:h100x8', 'cuda', '1x1x8', 8),
    ('h100x16', 'cuda', '1x2x8', 16),
])
def test_topology_names(name, platform, topology, chips):
  target = aot_targets.resolve_topology(name)
  assert (target.platform, target.topology, target.chips) == (platform, topology, chips)


@pytest.mark.parametrize('name, devices, hosts', [('v5p-128', 64, 16), ('v4-32', 16, 4),
                                                   ('v6e-64', 64, 16), ('v5e-16', 16, 4)])
def test_mapped_topologies_are_real_libtpu_topologies(name, devices, hosts):
  found = aot_targets.topology_devices(aot_targets.resolve_topology(name))
  assert len(found) == devices and len({d.process_index for d in found}) == hosts


def test_topology_libtpu_lacks_is_a_clear_error(capsys):
  assert cli.main(['compile-check', '--config', 'configs/smoke.py:tiny', '--topology', 'v5e:3x3']) == 2
  assert 'libtpu cannot make v5e:3x3' in capsys.readouterr().err


@pytest.mark.parametrize('name', ['v5p-12', 'v5p-100', 'v7-8', 'h100x12', 'a100x8', 'v5e:4x4x4x4'])
def test_unknown_topology_lists_the_known_ones(name, capsys):
  with pytest.raises(ValueError, match='Known: TPU products.*v5p-128.*h100x8'):
    aot_targets.resolve_topology(name)
  assert cli.main(['compile-check', '--config', 'configs/smoke.py:tiny', '--topology', name]) == 2
  assert 'v5p-128' in capsys.readouterr().err


def test_matmul_cost_counts_scan_iterations_remat_and_grads():
  def layers(x, ws):
    body = jax.checkpoint(lambda c, w: (jnp.tanh(c @ w), None))
    return jax.lax.scan(body, x, ws)[0].sum()

  x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  ws = jax.ShapeDtypeStruct((5, 16, 16), jnp.float32)
  one = 2 * 8 * 16 * 16
  fwd, fwd_bytes = step_cost.matmul_cost(jax.make_jaxpr(layers)(x, ws), batch_sizes={8}, batch_shards=2)
  assert fwd == 5 * one
  # Per matmul: x [8,16] and the output split over 2 batch shards, the weight whole.
  assert fwd_bytes == 5 * 4 * (8 * 16 / 2 + 16 * 16 + 8 * 16 / 2)
  # Gradient w.r.t. x and ws: forward + recomputed forward (remat) + 2 backward matmuls.
  grad, _ = step_cost.matmul_cost(jax.make_jaxpr(jax.grad(layers, argnums=(0, 1)))(x, ws))
  assert grad == 4 * 5 * one
  # XLA's own cost analysis counts the loop body once: why compile_check does not use it.
  xla = jax.jit(layers).lower(x, ws).compile().cost_analysis()['flops']
  assert xla < 2 * one


def test_matmul_cost_counts_a_switch_at_its_costliest_or_its_taken_branch():
  def f(x, w, n):  # the branch (how many rows go through the matmul) depends on data
    return jax.lax.switch(n, [lambda x: (x[:2] @ w).sum(), lambda x: (x @ w).sum()], x)

  x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
  closed = jax.make_jaxpr(f)(x, w, 0)
  assert step_cost.matmul_cost(closed)[0] == 2 * 8 * 16 * 4  # upper bound
  for n, rows in ((0, 2), (1, 8)):
    taken = step_cost.taken_branches(closed, (x, w, jnp.int32(n)))
    assert list(taken.values()) == [n]
    assert step_cost.matmul_cost(closed, branches=taken)[0] == 2 * rows * 16 * 4


def test_collective_stats_multiply_loop_bodies_by_their_trip_count():
  devices = aot_targets.topology_devices(aot_targets.resolve_topology('v5e:2x2'))
  mesh = Mesh(np.array(devices), ('x',))

  def layers(x, ws):  # weights sharded: every layer all-gathers its own
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0].sum()

  x = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=NamedSharding(mesh, P('x')))
  ws = jax.ShapeDtypeStruct((5, 512, 512), jnp.float32,
                            sharding=NamedSharding(mesh, P(None, 'x')))
  hlo = jax.jit(layers).lower(x, ws).compile().as_text()
  stats, biggest = hlo_stats.collective_stats(hlo)
  gather = stats['all-gather']
  assert gather['ops'] == 1 and gather['runs'] == 5
  # Each run gathers one whole layer's weight (XLA may gather it already cast to bf16).
  assert gather['bytes'] in (5 * 512 * 512 * 2, 5 * 512 * 512 * 4)
  assert biggest[0][1] == 'all-gather' and 'while/body' in biggest[0][3]
  assert stats['all-reduce']['runs'] == 1  # the final sum, outside the loop


def test_hbm_bytes_count_a_scanned_layers_weights_once_per_layer():
  device = aot_targets.topology_devices(aot_targets.resolve_topology('v5e:2x2'))[0]
  layers, width = 6, 2048

  def stack(x, ws):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

  one = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((width, width), jnp.bfloat16, sharding=one)
  ws = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=one)
  program = hlo_stats.Program(jax.jit(stack).lower(x, ws).compile().as_text())
  total, biggest = hlo_memory.hbm_bytes(program)
  layer = width * width * 2  # one layer's weight (and the activation: same shape)
  # Each layer's matmul fusion reads its own [width, width] slice of the [6, ...] stack
  # (not the whole stack, which a naive count of the fusion's operand would give: 6x);
  # the activation stays in on-chip memory (S(1)) after one copy in.
  assert biggest[0][1] == 'fusion' and biggest[0][0] == layers * layer
  assert layers * layer < total <= layers * layer + 3 * layer
  # The compiled program's own placement beats the jaxpr estimate (operands and result of
  # each matmul from HBM) here: that one would say 3 x 6 layers.
  assert step_cost.matmul_cost(jax.make_jaxpr(stack)(x, ws))[1] == 3 * layers * layer
  # Differentiated, the forward writes each layer's residuals into [6, 4 x width, width]
  # stacks in place and the backward reads them back a slice per layer: no instruction
  # counts a whole stack per layer (that would be >= 6 x 6 x 4 layers' worth).
  loss = lambda x, ws: stack(x, ws).astype(jnp.float32).sum()
  x4 = jax.ShapeDtypeStruct((4 * width, width), jnp.bfloat16, sharding=one)
  grads = jax.jit(jax.grad(loss, argnums=1)).lower(x4, ws).compile().as_text()
  total, biggest = hlo_memory.hbm_bytes(grads)
  assert biggest[0][0] <= layers * 4 * (4 * layer) and total < layers * 60 * layer


def test_a_conditional_counts_its_costliest_branch():
  devices = aot_targets.topology_devices(aot_targets.resolve_topology('v5e:2x2'))
  mesh = Mesh(np.array(devices), ('x',))

  def f(n, x):  # each branch sums a different number of columns over the sharded rows
    part = lambda k: lambda x: jnp.zeros(512).at[:k].set(x[:, :k].sum(0))
    return jax.lax.switch(n, [lambda x: x.sum(0), part(8), part(4)], x)

  x = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=NamedSharding(mesh, P('x')))
  n = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
  hlo = jax.jit(f, out_shardings=NamedSharding(mesh, P())).lower(n, x).compile().as_text()
  stats, biggest = hlo_stats.collective_stats(hlo)
  # One branch runs: its all-reduce of 512 floats, not all three branches' (512 + 8 + 4).
  assert stats['all-reduce'] == {'ops': 1, 'runs': 1, 'bytes': 512 * 4}
  assert 'branch_0' in biggest[0][3]


@pytest.fixture(scope='module')
def fsdp_tiny_hbm(tmp_path_factory):
  """`unifer compile-check` of tiny under FSDP over 4 v5e chips, with 0.01 GiB of HBM."""
  out = tmp_path_factory.mktemp('cc') / 'report.json'
  code = cli.main(TINY + ['--config.mesh.data=1', '--config.mesh.fsdp=-1', '--hbm_gib=0.01',
                          '--json', str(out)])
  return code, json.loads(out.read_text())


def test_does_not_fit_exits_1_with_the_reason(fsdp_tiny_hbm, capsys):
  code, report = fsdp_tiny_hbm
  assert code == 1 and report['fits'] is False
  assert report['peak_bytes'] > report['hbm_bytes'] == int(0.01 * aot_targets.GiB)


def test_fsdp_report_fields(fsdp_tiny_hbm):
  _, r = fsdp_tiny_hbm
  assert r['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1} and r['devices'] == 4
  assert r['chip'] == 'TPU v5e' and r['platform'] == 'tpu'
  for key in ('param_bytes', 'opt_bytes', 'argument_bytes', 'output_bytes', 'temp_bytes',
              'peak_bytes', 'model_flops', 'executed_flops', 'hbm_traffic_bytes', 'jaxpr_hbm_bytes',
              'step_time_s', 'mfu', 'compile_s'):
    assert r[key] > 0, key
  # FSDP: each device holds a quarter of the sharded weights (f32), small ones replicated.
  full = 4 * r['params']
  assert full / 4 < r['param_bytes'] < full / 2
  # AdamW moments mirror the params; state donated: outputs alias the state inputs.
  assert 2 * r['param_bytes'] <= r['opt_bytes'] < 2 * r['param_bytes'] + 1024
  assert r['alias_bytes'] >= r['param_bytes'] + r['opt_bytes']
  assert r['peak_bytes'] >= r['argument_bytes']
  # FSDP gathers weights and reduces gradients.
  c = r['collectives']
  assert c['all-gather']['ops'] > 0 and c['all-gather']['bytes'] > 0
  assert c['all-reduce']['ops'] + c['reduce-scatter']['ops'] > 0
  assert all(v['runs'] >= v['ops'] for v in c.values())
  assert r['biggest_collectives'][0][0] == max(b[0] for b in r['biggest_collectives']) > 0
  assert r['executed_flops'] >= r['model_flops']
  assert r['peak_flops'] == 197e12 and r['hbm_bytes_per_s'] == 819e9
  assert r['step_time_s'] == max(r['executed_flops'] / 197e12, r['hbm_traffic_bytes'] / 819e9,
                                 r['comm_time_s'])
  assert r['mfu'] == r['model_flops'] / r['step_time_s'] / 197e12


def test_report_format_states_the_verdict(fsdp_tiny_hbm):
  _, fields = fsdp_tiny_hbm
  fields = {k: v for k, v in fields.items() if k in cc.Report.__dataclass_fields__}
  report = cc.Report(**fields)
  text = cc.format(report)
  assert 'does not fit: peak' in text and 'all-gather' in text and 'MFU' in text
  fitting = cc.Report(**{**fields, 'hbm_bytes': 16 * aot_targets.GiB})
  assert fitting.fits and 'fits: peak' in cc.format(fitting)


def test_data_parallel_text_step_fits_exit_0(tmp_path, capsys):
  out = tmp_path / 'r.json'
  code = cli.main(TINY + ['--config.stage=lm', '--config.mesh.data=-1', '--json', str(out)])
  printed = capsys.readouterr().out
  assert code == 0 and 'fits: peak' in printed
  r = json.loads(out.read_text())
  assert r['fits'] and r['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  # Pure data parallelism: replicated weights, so no gathers; gradients are all-reduced.
  assert r['collectives']['all-gather']['ops'] == 0 and r['collectives']['all-reduce']['ops'] > 0
  assert r['param_bytes'] == 4 * r['params']  # every f32 weight whole on each device


def test_gpu_target_compiles_with_the_cuda_plugin(tmp_path):
  out = tmp_path / 'r.json'
  assert cli.main(['compile-check', '--config', 'configs/smoke.py:tiny', '--topology', 'h100x2',
                   '--config.stage=lm', '--json', str(out)]) == 0
  r = json.loads(out.read_text())
  assert (r['platform'], r['chip'], r['devices'], r['hosts']) == ('cuda', 'NVIDIA H100 SXM 80GB', 2, 1)
  assert r['fits'] and r['hbm_bytes'] == 80 * aot_targets.GiB and r['peak_bytes'] > 0
  assert r['xla_flops'] is None and r['model_flops'] > 0  # the GPU path has no cost analysis
  # Data parallel over 2 GPUs: the (trained) gradients are all-reduced, nothing gathered.
  assert 0 < r['collectives']['all-reduce']['bytes'] <= r['param_bytes']
  assert r['collectives']['all-gather']['ops'] == 0


# -- multislice ----------------------------------------------------------------------


@pytest.fixture(scope='module')
def two_slices():
  """The devices of 2 x v5e:2x2 (libtpu's multislice topology): 8 chips, 2 slices."""
  target = aot_targets.resolve_topology('v5e:2x2', num_slices=2)
  assert target.describe() == '2 x v5e:2x2 = 2 x v5e:2x2 (8 chips over DCN)'
  return aot_targets.topology_devices(target)


def test_multislice_mesh_spans_slices_with_the_dcn_axes(two_slices):
  slice_of = np.vectorize(lambda d: d.slice_index)
  # Default dcn (data=-1): data parallel across slices, FSDP inside each.
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1}, two_slices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert (slice_of(mesh.devices)[:, :, 0] == [[0] * 4, [1] * 4]).all()
  # FSDP across slices instead: each slice a contiguous half of the fsdp axis.
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 2,
                             'dcn': {'data': 1, 'fsdp': -1, 'tensor': 1}}, two_slices)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 4, 'tensor': 2}
  assert (slice_of(mesh.devices)[0, :, 0] == [0, 0, 1, 1]).all()
  with pytest.raises(ValueError, match=r"config.mesh.dcn \{'data': 3.*needs 3 slices, but 2"):
    sharding.make_mesh({'data': -1, 'dcn': {'data': 3}}, two_slices)
  with pytest.raises(ValueError, match=r'config.mesh \(one of 2 slices\).*needs 8 devices, but 4'):
    sharding.make_mesh({'data': 1, 'fsdp': 8, 'tensor': 1}, two_slices)


def test_dcn_stats_count_cross_slice_transfers_apart(two_slices):
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1}, two_slices)

  def weight_grads(x, ws):  # data parallel: every layer's gradient reduced over the batch
    return jax.lax.scan(lambda c, w: (c, x.T @ (x @ w)), 0, ws)[1]

  x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P(('data', 'fsdp'))))
  ws = jax.ShapeDtypeStruct((3, 256, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
  program = hlo_stats.Program(jax.jit(weight_grads, out_shardings=NamedSharding(mesh, P()))
                              .lower(x, ws).compile().as_text())
  dcn, _ = hlo_stats.dcn_stats(program)
  inside, _ = hlo_stats.collective_stats(program)
  # 3 layers x a [256, 256] f32 sum over both slices, reduce-scattered inside each slice
  # first: each device exchanges its quarter over the DCN. XLA peels the first layer out
  # of the loop (the counter then starts at 1): still 3 runs in all.
  assert dcn['all-reduce']['runs'] == 3
  assert dcn['all-reduce']['bytes'] == 3 * 256 * 256 * 4 // 4
  assert sum(v['bytes'] for v in inside.values()) > 0  # the in-slice part of the reduction
  assert hlo_stats.dcn_stats(hlo_stats.Program(jax.jit(weight_grads).lower(
      jax.ShapeDtypeStruct((64, 256), jnp.float32), jax.ShapeDtypeStruct((3, 256, 256), jnp.float32)
  ).compile().as_text()))[0] == {}


def test_compile_check_num_slices_reports_dcn_bytes_apart(tmp_path, capsys):
  out = tmp_path / 'r.json'
  code = cli.main(TINY + ['--num_slices', '2', '--config.stage=lm', '--config.mesh.data=1',
                          '--config.mesh.fsdp=-1', '--json', str(out)])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  r = json.loads(out.read_text())
  assert r['slices'] == 2 and r['devices'] == 8 and r['hosts'] == 2
  assert r['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert 'across slices' in printed.err and 'cross-slice (DCN) all-reduce' in printed.out
  # Gradients cross the DCN once, already reduce-scattered inside the slice: at most each
  # device's own shard of the (f32) train state's parameters.
  dcn = r['dcn_collectives']['all-reduce']['bytes']
  assert 0 < dcn <= r['param_bytes']
  assert r['dcn_bytes_per_s'] == 25e9 / 8 and r['dcn_time_s'] > 0
  assert r['step_time_s'] == max(r['compute_time_s'], r['memory_time_s'], r['comm_time_s'],
                                 r['dcn_time_s'])


def test_num_slices_is_for_tpu_topologies(capsys):
  assert cli.main(['compile-check', '--config', 'configs/smoke.py:tiny', '--topology', 'h100x8',
                   '--num_slices', '2']) == 2
  assert 'multislice is a TPU topology' in capsys.readouterr().err

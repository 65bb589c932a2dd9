"""The pod variants of the stage configs (``configs/{align,generate,instruct}.py:pod``):
the 7b preset with the batch, sequence length, remat and shardings chosen with ``unifer
compile-check --topology v5p-128``, whose figures each docstring gives.

A 7B compile takes 10-25 minutes here, so the test does not repeat it: it traces each
pod step on the real v5p-128 topology (seconds) and checks that the docstring's model
FLOPs per chip -- MFU's numerator, which moves with every batch / sequence / freezing
choice -- still describe the config. A config edited without rerunning the compile-check
fails here.
"""

import ast
import re
from pathlib import Path

import pytest

from unifer_jax import config_lib, sharding
from unifer_jax.data import inputs as inputs_lib
from unifer_jax.train import aot_targets, step_cost
from unifer_jax.train import state as state_lib

REPO = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r'model FLOPs ([\d.]+e\+\d+) per chip')


def _docstring(stage):
  return ast.get_docstring(ast.parse((REPO / 'configs' / f'{stage}.py').read_text()))


@pytest.fixture(scope='module')
def v5p_128():
  return aot_targets.topology_devices(aot_targets.resolve_topology('v5p-128'))


@pytest.mark.parametrize('stage', ['align', 'generate', 'instruct'])
def test_pod_docstring_figures_describe_the_config(stage, v5p_128):
  config = config_lib.load(str(REPO / 'configs' / f'{stage}.py') + ':pod')
  mesh = sharding.make_mesh(config.mesh, v5p_128)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 64, 'tensor': 1}
  assert state_lib.model_config(config).llm.hidden == 4096  # the 7b preset
  stated = FIGURE.search(_docstring(stage))
  assert stated, f'configs/{stage}.py: no "model FLOPs N per chip" figure in the docstring'
  spec = inputs_lib.batch_spec(config, state_lib.model_config(config))
  flops = step_cost.step_flops(config, mesh, spec).model_flops / mesh.size
  assert flops == pytest.approx(float(stated.group(1)), rel=5e-3), (stage, f'{flops:.4g}')


def test_flash_attention_flops_match_xla_on_the_pod_align_step(v5p_128):
  """compile-check's FLOPs of configs/align.py:pod (the ViT-L's attention on the fused
  TPU kernel, models/flash.py) against the same step with XLA attention: the model
  FLOPs equal, and the executed ones more only by the kernel's key padding (257 -> 384)
  -- the kernels counted, never as zero."""
  costs = {}
  for attention in ('flash', 'xla'):
    config = config_lib.load(str(REPO / 'configs' / 'align.py') + ':pod',
                             ['--config.attention=xla'] if attention == 'xla' else [])
    mesh = sharding.make_mesh(config.mesh, v5p_128)
    spec = inputs_lib.batch_spec(config, state_lib.model_config(config))
    setup, traced = step_cost.trace_step(config, mesh, spec)
    assert ('pallas_call' in str(traced.jaxpr)) == (attention == 'flash')
    costs[attention] = step_cost.step_flops(config, mesh, spec, traced)
  fused, xla = costs['flash'], costs['xla']
  assert fused.model_flops == xla.model_flops
  assert xla.executed_flops < fused.executed_flops < 1.03 * xla.executed_flops, (
      f'{fused.executed_flops:.4g} vs {xla.executed_flops:.4g}')

"""Student export: ONNX (onnxruntime), StableHLO (jax.export round trip) and safetensors,
each parity-checked in its runtime; a real mismatch (the int8 model against 1e-4) fails
loudly; the standalone predictor imports only onnxruntime / numpy / pillow (checked on
its source, then run in a subprocess where importing jax is impossible) and matches the
JAX student on the training pipeline's own eval preprocessing."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import onnx
import pytest

from unifer_jax.data import augment, labels
import unifer_jax.export as export_pkg
from unifer_jax.export import onnx_export, standalone, student_fn

import student_util


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp('export')
  # A non-default mean: meta.json must carry it.
  reports = student_util.export_student(root, formats=('onnx', 'stablehlo', 'safetensors'),
                                        int8=True, image_mean=(0.4, 0.5, 0.6))
  return root, reports


def test_every_format_matches_the_jax_student(exported):
  root, reports = exported
  assert reports['onnx']['onnx_max_abs_diff'] <= 1e-4
  assert reports['stablehlo']['stablehlo_max_abs_diff'] <= 1e-4
  assert reports['safetensors']['safetensors_max_abs_diff'] <= 1e-4
  meta = json.loads((root / 'out' / 'meta.json').read_text())
  assert meta['image_size'] == 32 and meta['preprocessing']['mean'] == [0.4, 0.5, 0.6]
  assert meta['outputs']['compound']['labels'] == list(labels.COMPOUND)
  for f in meta['files'].values():
    assert (root / 'out' / f).stat().st_size > 0
  assert 0 <= reports['onnx']['int8_basic_agreement_with_f32'] <= 1
  # Dense layers are weight MatMuls, so the quantiser really turned their weights into int8.
  assert reports['onnx']['onnx_dense_matmuls'] >= 6
  # ... so the weights shrink (the file less: the tiny graph outweighs its weights).
  assert reports['onnx']['int8_bytes'] < reports['onnx']['onnx_bytes']
  weight_bytes = lambda f: sum(len(i.raw_data) for i in onnx.load(root / 'out' / f).graph.initializer)
  assert weight_bytes(onnx_export.INT8_FILE) < 0.6 * weight_bytes(onnx_export.FILE)


def test_int8_is_per_channel_static_qdq_and_timed_against_f32(exported):
  root, reports = exported
  report = reports['onnx']
  graph = onnx.load(root / 'out' / onnx_export.INT8_FILE).graph
  inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
  made_by = {o: n for n in graph.node for o in n.output}
  quantised, channels = 0, []
  for node in graph.node:
    if node.op_type not in onnx_export.INT8_OPS:
      continue
    # Static QDQ: the activation comes through Quantize -> Dequantize (calibrated range,
    # no DynamicQuantizeLinear), the weight is an int8 initializer with one scale per
    # output channel.
    act, weight = (made_by.get(i) for i in node.input[:2])
    assert act is not None and act.op_type == 'DequantizeLinear', node.name
    assert made_by[act.input[0]].op_type == 'QuantizeLinear', node.name
    assert weight is not None and weight.op_type == 'DequantizeLinear', node.name
    w, scale = inits[weight.input[0]], inits[weight.input[1]]
    axis = {a.name: onnx.helper.get_attribute_value(a) for a in weight.attribute}.get('axis', 1)
    assert w.dtype == np.int8 and scale.size == w.shape[axis], (node.name, w.shape, scale.shape)
    quantised += 1
    channels.append(scale.size)
  assert quantised >= report['onnx_dense_matmuls']   # every Dense (and conv) weight
  assert max(channels) > 1
  assert not any(n.op_type == 'DynamicQuantizeLinear' for n in graph.node)
  # ... which onnxruntime fuses into integer kernels: no float weight product is left.
  import onnxruntime as ort
  opts = ort.SessionOptions()
  opts.optimized_model_filepath = str(root / 'int8.fused.onnx')
  ort.InferenceSession(str(root / 'out' / onnx_export.INT8_FILE), opts,
                       providers=['CPUExecutionProvider'])
  fused = [n.op_type for n in onnx.load(root / 'int8.fused.onnx').graph.node]
  assert not {'MatMul', 'Gemm', 'Conv'} & set(fused), sorted(set(fused))
  assert sum(op in ('QGemm', 'QLinearMatMul', 'QLinearConv') for op in fused) == quantised
  assert report['int8_calibration_images'] == onnx_export.CALIBRATION_IMAGES
  # Random student weights (scale 0.3): int8 still picks the f32 label nearly always.
  assert report['int8_basic_agreement_with_f32'] >= 0.9, report
  assert 0 < report['int8_max_abs_diff'] < 0.1, report
  for key in ('int8_ms_per_image', 'f32_ms_per_image'):
    assert 0 < report[key] < 1e3, report


def test_a_real_mismatch_fails_loudly(exported):
  root, _ = exported
  student = student_fn.load(root / 'distill')
  images = student_fn.parity_images(student)
  reference = jax.device_get(jax.jit(student_fn.predict_fn(student, unroll=False))(images))
  int8 = onnx_export.run(onnx_export.session(root / 'out' / onnx_export.INT8_FILE), images)
  with pytest.raises(student_fn.ParityError, match='exceeds'):
    student_fn.check_parity('int8', reference, int8, atol=1e-7)
  with pytest.raises(FileNotFoundError, match='no config.json'):
    student_fn.load(root)


def test_standalone_imports_only_its_runtime():
  tree = ast.parse(Path(standalone.__file__).read_text())
  roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split('.')[0]
           for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
           for a in (n.names if isinstance(n, ast.Import) else [n])}
  assert roots <= {'__future__', 'json', 'pathlib', 'numpy', 'onnxruntime', 'PIL'}, roots


def test_standalone_predicts_what_the_student_does(exported):
  root, _ = exported
  rng = np.random.default_rng(0)
  faces = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)   # not square: centre crop
  np.save(root / 'faces.npy', faces)
  code = (
      'import sys, json, importlib.util, numpy as np\n'
      'sys.modules["jax"] = None; sys.modules["unifer_jax"] = None  # must not be needed\n'
      f'spec = importlib.util.spec_from_file_location("standalone", {str(standalone.__file__)!r})\n'
      'mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n'
      f'p = mod.load({str(root / "out")!r})\n'
      f'print(json.dumps(p(np.load({str(root / "faces.npy")!r}))))\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  # The JAX student on the training pipeline's eval preprocessing of the same faces.
  student = student_fn.load(root / 'distill')
  x = np.stack([augment.model_image(f, 32, mean=(0.4, 0.5, 0.6)) for f in faces])
  want = jax.device_get(jax.jit(student_fn.predict_fn(student, unroll=False))(x))
  for i, r in enumerate(results):
    np.testing.assert_allclose([r['basic'][n] for n in labels.BASIC], want['basic'][i], atol=1e-4)
    assert r['label'] == labels.BASIC[int(np.argmax(want['basic'][i]))]
    assert r['compound'] == labels.COMPOUND[int(np.argmax(want['compound'][i]))]
    np.testing.assert_allclose(r['intensity'], want['intensity'][i], atol=1e-4)
    np.testing.assert_allclose([r['valence'], r['arousal']], want['va'][i], atol=1e-4)
  predictor = export_pkg.load(root / 'out')    # the entry `unifer predict` uses
  assert predictor.image_size == 32
  assert predictor(faces)[0]['label'] == results[0]['label']
  with pytest.raises(ValueError, match='uint8'):
    predictor(np.zeros((2, 8, 8, 3), np.float32))

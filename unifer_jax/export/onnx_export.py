"""Student -> ONNX (jax2onnx), checked in onnxruntime before success is reported; and
the optional int8 model with its size, speed and agreement with f32.

  unifer export --workdir W/distill --out W/export --format onnx --int8

The graph takes ``image`` f32 [B, S, S, 3] (B dynamic, normalised as meta.json says)
and returns ``basic``, ``compound`` (probabilities), ``intensity``, ``va``.

int8 (:func:`quantize_int8`): onnxruntime's graph optimisations first (constant folding,
MatMul + Add -> Gemm: ``quant_pre_process``), then static per-channel QDQ quantisation
of the MatMul / Gemm / Conv weights (int8, one scale per output channel) and their
activations (uint8, ranges calibrated on 32 of the student's training faces);
onnxruntime fuses each QuantizeLinear -> op -> DequantizeLinear into an integer kernel at load (the
demo student: QGemm for its 29 Dense layers, QLinearConv for its 4 stem convolutions).
Measured 2026-12-07 on the 2-core AMD EPYC box (no AMX), demo-size student (random
weights), one process, the same images, interleaved rounds, best of each, load 3.8 (two
trainings beside it): with one onnxruntime thread int8 / f32 ms per image 0.437 / 0.517
at batch 8, 0.390 / 0.481 at 32, 0.383 / 0.473 at 64 (0.81-0.84x; at load 7.5 0.68-0.84x);
the dynamic MatMul quantiser this replaces ran 0.432 / 0.403 / 0.392, within 3 % of it.
With both threads every model ran slower than on one under that load and int8 / f32
scattered 0.83-1.20x: only a quiet machine says more. Size 865 KB vs 2.74 MB f32
(dynamic int8 1.14 MB). Agreement with f32 on the basic label 1.0 over 32 inputs
(random: no corpus beside that student), max abs diff 0.015 on the outputs; the demo's
report gives the trained student's f32 and int8 agreement with the teacher. (The demo's
earlier "int8 0.47 vs f32 0.39 ms" timed 8 images against 64; both now time the same
batch.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from unifer_jax.export import student_fn

FILE = 'student.onnx'
INT8_FILE = 'student.int8.onnx'


def _quiet_plugin_warnings():
  # jax2onnx imports every plugin it ships and logs each optional one whose library
  # (equinox examples, dm_pix) is missing; none is used for the student.
  logging.getLogger('jax2onnx.plugins.plugin_system').setLevel(logging.ERROR)
  # onnx_ir warns once per shape-constant it writes without a value type (~100 lines
  # for the demo student's conv stem); the parity run in onnxruntime checks the graph.
  logging.getLogger('onnx_ir.serde').setLevel(logging.ERROR)


def session(path: Path):
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  opts = ort.SessionOptions()
  opts.log_severity_level = 3
  return ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])


def run(sess, images: np.ndarray) -> dict:
  names = [o.name for o in sess.get_outputs()]
  return dict(zip(names, sess.run(None, {'image': np.asarray(images, np.float32)})))


def export(student: student_fn.TrainedStudent, out: Path, *, atol: float = 1e-4,
           int8: bool = False) -> dict:
  _quiet_plugin_warnings()
  import jax2onnx  # pylint: disable=g-import-not-at-top
  predict = student_fn.predict_fn(student)
  s = student.image_size
  t = time.monotonic()

  def outputs(x):  # ONE forward pass; the graph would hold a copy per output otherwise
    res = predict(x)
    return tuple(res[k] for k in student_fn.OUTPUTS)

  model = jax2onnx.to_onnx(outputs, [('B', s, s, 3)], model_name='unifer_student',
                           input_names=['image'], output_names=list(student_fn.OUTPUTS))
  dense_to_matmul(model)
  import onnx  # pylint: disable=g-import-not-at-top
  onnx.save(model, str(out / FILE))
  report = {'onnx_file': FILE, 'onnx_bytes': (out / FILE).stat().st_size,
            'onnx_dense_matmuls': weight_matmuls(model),
            'onnx_convert_s': time.monotonic() - t}
  images = student_fn.parity_images(student)
  reference = student_fn.reference_outputs(student, images)
  sess = session(out / FILE)
  report['onnx_max_abs_diff'] = student_fn.check_parity('onnx', reference, run(sess, images),
                                                        atol)
  if int8:
    report.update(quantize_int8(out, student))
  return report


def weight_matmuls(model) -> int:
  """MatMul / Gemm nodes multiplying by a weight initializer: what the int8 quantiser
  quantises (jax2onnx writes 2-D Dense products as MatMul itself, others as Einsum)."""
  weights = {i.name for i in model.graph.initializer}
  return sum(n.op_type in ('MatMul', 'Gemm') and any(i in weights for i in n.input)
             for n in model.graph.node)


def dense_to_matmul(model) -> int:
  """Rewrites Einsum 'abc,cd->abd' with a weight initializer (how jax2onnx writes our
  Dense layers) as MatMul, in place: the same product, but onnxruntime's dynamic
  quantiser only quantises MatMul/Gemm (with Einsum it left ~99 % of the weights in f32).
  Returns the number of nodes rewritten."""
  import onnx  # pylint: disable=g-import-not-at-top
  weights = {i.name: i for i in model.graph.initializer}
  done = 0
  for node in model.graph.node:
    if node.op_type != 'Einsum' or len(node.input) != 2 or node.input[1] not in weights:
      continue
    eq = onnx.helper.get_attribute_value(node.attribute[0]).decode().replace(' ', '')
    lhs, out = eq.split('->')
    x, w = lhs.split(',')
    if (len(w) == 2 and len(weights[node.input[1]].dims) == 2 and x[-1] == w[0]
        and out == x[:-1] + w[1] and len(set(x + w[1])) == len(x) + 1):
      node.op_type = 'MatMul'
      del node.attribute[:]
      done += 1
  return done


CALIBRATION_IMAGES = 32
INT8_OPS = ('MatMul', 'Gemm', 'Conv')


def quantize_int8(out: Path, student: student_fn.TrainedStudent) -> dict:
  """``out/INT8_FILE`` from ``out/FILE`` (see the module docstring), calibrated on
  training faces; reports its size, its agreement with the f32 model and both models' ms
  per image on as many held-out faces (same process, same images, best of interleaved
  rounds)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from onnxruntime import quantization as q  # pylint: disable=g-import-not-at-top
  from onnxruntime.quantization import shape_inference  # pylint: disable=g-import-not-at-top

  # Activation ranges from training faces; agreement and speed on held-out ones.
  calibration = student_fn.parity_images(student, n=CALIBRATION_IMAGES, seed=1, split='train')
  images = student_fn.parity_images(student, n=CALIBRATION_IMAGES)

  class Faces(q.CalibrationDataReader):
    def __init__(self):
      self.rows = iter(calibration[i:i + 1] for i in range(len(calibration)))

    def get_next(self):
      row = next(self.rows, None)
      return None if row is None else {'image': row}

  with tempfile.TemporaryDirectory() as tmp:
    optimized = Path(tmp) / 'optimized.onnx'
    # Symbolic shape inference stops at jax2onnx's Shape nodes (dynamic batch); ONNX's
    # own shape inference and onnxruntime's optimiser still run.
    shape_inference.quant_pre_process(str(out / FILE), str(optimized), skip_symbolic_shape=True)
    q.quantize_static(
        str(optimized), str(out / INT8_FILE), Faces(), quant_format=q.QuantFormat.QDQ,
        per_channel=True, weight_type=q.QuantType.QInt8, activation_type=q.QuantType.QUInt8,
        op_types_to_quantize=list(INT8_OPS),
        # onnxruntime 1.32 fails on per-channel Gemm biases when it widens weight scales
        # for the int32 bias; our biases are far from that limit.
        extra_options={'QDQDisableWeightAdjustForInt32Bias': True})
  f32, q8 = session(out / FILE), session(out / INT8_FILE)
  want, got = run(f32, images), run(q8, images)
  speed = ms_per_image({'f32': f32, 'int8': q8}, images)
  return {'int8_file': INT8_FILE, 'int8_bytes': (out / INT8_FILE).stat().st_size,
          'int8_calibration_images': len(calibration),
          'int8_basic_agreement_with_f32': float(np.mean(
              got['basic'].argmax(-1) == want['basic'].argmax(-1))),
          'int8_max_abs_diff': float(max(np.abs(want[k] - got[k]).max()
                                         for k in student_fn.OUTPUTS)),
          'int8_ms_per_image': speed['int8'], 'f32_ms_per_image': speed['f32']}


def ms_per_image(sessions: dict, images: np.ndarray, rounds: int = 5, calls: int = 2) -> dict:
  """{name: ms per image} of each onnxruntime session on ``images``: ``rounds`` rounds,
  each of ``calls`` calls to every session in turn (so a noisy neighbour hits all of
  them alike), the best call of each session."""
  best = {}
  for name, sess in sessions.items():
    run(sess, images)  # warm-up
    best[name] = float('inf')
  for _ in range(rounds):
    for name, sess in sessions.items():
      for _ in range(calls):
        t = time.perf_counter()
        run(sess, images)
        best[name] = min(best[name], time.perf_counter() - t)
  return {name: s / len(images) * 1e3 for name, s in best.items()}

"""Student -> ONNX (jax2onnx), checked in onnxruntime before success is reported; and
the optional int8 model (onnxruntime's dynamic quantiser) with its size, speed and
agreement change.

The graph takes ``image`` f32 [B, S, S, 3] (B dynamic, normalised as meta.json says)
and returns ``basic``, ``compound`` (probabilities), ``intensity``, ``va``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
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
    report.update(quantize_int8(out, images, reference))
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


def quantize_int8(out: Path, images: np.ndarray, reference: dict) -> dict:
  """Dynamic int8 weights (MatMul); reports size, speed and agreement with f32."""
  from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=g-import-not-at-top
  quantize_dynamic(str(out / FILE), str(out / INT8_FILE), weight_type=QuantType.QInt8)
  f32, q8 = session(out / FILE), session(out / INT8_FILE)
  got = run(q8, images)
  return {'int8_file': INT8_FILE, 'int8_bytes': (out / INT8_FILE).stat().st_size,
          'int8_basic_agreement_with_f32': float(np.mean(
              got['basic'].argmax(-1) == np.asarray(reference['basic']).argmax(-1))),
          'int8_max_abs_diff': float(max(np.abs(np.asarray(reference[k]) - got[k]).max()
                                         for k in student_fn.OUTPUTS)),
          'int8_ms_per_image': ms_per_image(q8, images),
          'f32_ms_per_image': ms_per_image(f32, images)}


def ms_per_image(sess, images: np.ndarray, repeats: int = 5) -> float:
  run(sess, images)  # warm-up
  t = time.perf_counter()
  for _ in range(repeats):
    run(sess, images)
  return (time.perf_counter() - t) / repeats / len(images) * 1e3

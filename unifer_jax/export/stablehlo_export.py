"""Student -> StableHLO via ``jax.export`` (serialised bytes; batch dimension symbolic),
deserialised and run before success is reported. Any JAX (or an XLA/IREE runtime that
reads StableHLO) can run it without this codebase: ``jax.export.deserialize(bytes).call(x)``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from unifer_jax.export import student_fn

FILE = 'student.stablehlo'


def export(student: student_fn.TrainedStudent, out: Path, *, atol: float = 1e-4) -> dict:
  predict = student_fn.predict_fn(student)
  s = student.image_size
  (b,) = jax.export.symbolic_shape('b')
  exported = jax.export.export(jax.jit(predict))(
      jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32))
  (out / FILE).write_bytes(exported.serialize())
  (out / (FILE + '.mlir')).write_text(exported.mlir_module())
  images = student_fn.parity_images(student)
  reference = student_fn.reference_outputs(student, images)
  restored = jax.export.deserialize(bytearray((out / FILE).read_bytes()))
  got = jax.device_get(restored.call(jnp.asarray(images)))
  diff = student_fn.check_parity('stablehlo', reference, got, atol)
  return {'stablehlo_file': FILE, 'stablehlo_bytes': (out / FILE).stat().st_size,
          'stablehlo_max_abs_diff': diff}

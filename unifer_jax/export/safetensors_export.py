"""Student parameters -> ``student.safetensors`` ('/'-joined parameter paths), plus the
architecture in meta.json; checked by loading the file back into a fresh student and
comparing its outputs with the trained one's."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from unifer_jax.export import student_fn
from unifer_jax.train import optim

FILE = 'student.safetensors'


def export(student: student_fn.TrainedStudent, out: Path, *, atol: float = 1e-4) -> dict:
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in
          optim.flat(jax.device_get(student.params)).items()}
  save_file(flat, str(out / FILE), metadata={'format': 'unifer_student',
                                             'step': str(student.step)})
  loaded = load_file(str(out / FILE))
  params = traverse_util.unflatten_dict(
      {tuple(int(p) if p.isdigit() else p for p in k.split('/')): v for k, v in loaded.items()})
  images = student_fn.parity_images(student)
  reference = student_fn.reference_outputs(student, images)
  reloaded = student_fn.TrainedStudent(student.workdir, student.step, student.model_cfg,
                                       student.input_cfg, student.graphdef, params)
  got = jax.device_get(jax.jit(student_fn.predict_fn(reloaded, unroll=False))(images))
  diff = student_fn.check_parity('safetensors', reference, got, atol)
  return {'safetensors_file': FILE, 'safetensors_bytes': (out / FILE).stat().st_size,
          'safetensors_max_abs_diff': diff,
          'architecture': student.model_cfg.to_dict()}

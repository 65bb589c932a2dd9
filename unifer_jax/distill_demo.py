"""The demo's last mile: instruct -> distill -> ONNX export -> student vs teacher.

``run_distill_and_export(workdir)`` trains the distill stage from the demo's instruct
workdir (configs/distill.py, the shared loop), exports the student to ONNX (+ int8),
and measures on the held-out split:

* ``student_teacher_agreement``: basic label of the JAX student == the teacher's
  (argmax of its label likelihood, evaluators/likelihood.py), over held-out basic faces;
* ``student_speedup``: teacher seconds per image / student seconds per image, same
  batch of held-out faces, same process, both jitted and warmed up; the teacher is its
  GENERATIVE answer to the basic-label prompt (how the UniFER model answers a user:
  the evaluator's greedy KV-cache decoding). ``student_speedup_vs_likelihood`` is the
  same against the teacher's one-pass label-likelihood scoring (a stricter baseline);
* what bounds the agreement: ``student_teacher_agreement_decisive`` over the faces where
  the teacher is decisive (top-1 minus top-2 probability >= 0.5; ``teacher_decisive_fraction``
  of them), ``teacher_mirror_consistency``: how often the teacher gives a face and its
  mirror image the same label (basic expressions are left-right symmetric labels, so a
  teacher that changes its mind under a flip is undecided there), and
  ``teacher_reworded_agreement`` (mean, and ``_min``; first 256 faces): how often its
  label stays the same when the question is asked in the other wordings instruction
  tuning used
  (``instructions.prompt_variants``). The student is scored against one wording; where
  the teacher agrees with itself less often than the goal asks of the student, its label
  depends on the words as well as the face;
* ``onnx_max_abs_diff`` (the export's parity check), ``int8_agreement_drop`` (student
  f32 ONNX vs int8 ONNX agreement with the teacher), sizes and ms/image;
* the student's confusion matrix vs the true labels: ``student_basic_confusion.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from unifer_jax import config_lib, sharding
from unifer_jax.data import instructions, labels
from unifer_jax.data import tokenizer as tokenizer_lib
from unifer_jax.evaluators import data as eval_data, instruct as instruct_eval, likelihood, plots
from unifer_jax.export import commands as export_commands, onnx_export, student_fn
from unifer_jax.train import loop, teacher as teacher_lib

REPO = Path(__file__).resolve().parents[1]


def _batches(fn, images: np.ndarray, batch: int) -> np.ndarray:
  """fn over fixed-size batches (the last padded by repetition: one compiled shape)."""
  out = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    out.append(np.asarray(fn(chunk))[:n])
  return np.concatenate(out)


def _seconds_per_image(fn, images: np.ndarray, repeats: int = 5) -> float:
  """Wall seconds per image of fn(images), the fastest of ``repeats`` timed calls (the
  least disturbed by whatever else the machine runs; fn returns host values or jax
  arrays)."""
  jax.block_until_ready(fn(images))  # compiled and warm
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(images))
    best = min(best, time.perf_counter() - t)
  return best / len(images)


def run_distill_and_export(workdir: str | Path, overrides=(), test: dict | None = None,
                           eval_limit: int = 1000, batch: int = 64) -> dict:
  """Runs the distill stage in ``workdir/distill`` from ``workdir/instruct``, exports to
  ``workdir/export`` and returns the report entries (see the module docstring)."""
  workdir = Path(workdir).absolute()
  t0 = time.monotonic()
  config = config_lib.load(str(REPO / 'configs' / 'distill.py') + ':demo', list(overrides))
  config.distill.teacher_workdir = str(workdir / 'instruct')
  config.input.data_dir = str(workdir / 'data')
  last = loop.train(config, workdir / 'distill')
  timings = {'distill_train_s': time.monotonic() - t0}

  t = time.monotonic()
  export = export_commands.export(workdir / 'distill', workdir / 'export', ['onnx'],
                                  int8=True)['onnx']
  timings['export_s'] = time.monotonic() - t

  # ---- held-out faces: teacher vs student ------------------------------------------ #
  t = time.monotonic()
  student = student_fn.load(workdir / 'distill')
  if test is None:
    test = eval_data.load_split(config.input, 'test', student.image_size, limit=eval_limit)
  basic = np.flatnonzero(test['expression'] >= 0)
  images, truth = test['image'][basic], test['expression'][basic]

  teacher = teacher_lib.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  teacher_inputs = jax.device_get(teacher.load())
  tok = tokenizer_lib.load(config.distill.tokenizer or
                           teacher_lib.read_config(workdir / 'instruct').input.tokenizer)
  asked = jax.jit(lambda p, x, prompt: likelihood.label_distributions(
      teacher.bind({'params': p}), x, {'basic': prompt})['basic'])
  # The teacher's basic-label distribution, asked in the wording the student learnt from.
  label_pass = lambda x, prompt=teacher_inputs['prompts']['basic']: asked(
      teacher_inputs['params'], x, prompt)
  teacher_probs = _batches(label_pass, images, batch)
  teacher_pred = teacher_probs.argmax(-1)
  top2 = np.sort(teacher_probs, -1)[:, -2:]
  decisive = top2[:, 1] - top2[:, 0] >= 0.5
  mirrored_pred = _batches(label_pass, np.ascontiguousarray(images[:, :, ::-1]),
                           batch).argmax(-1)
  # The teacher's label agreement with itself, asked in its other wordings: on the first
  # 256 faces (SE <= 0.03; five more passes of the teacher over all of them cost ~15 s).
  reworded, few = [], slice(0, 256)
  for phrasing, hint in instructions.prompt_variants('basic')[1:]:
    prompt = likelihood.label_prompt(tok, 'basic', phrasing=phrasing, hint=hint).arrays()
    pred = _batches(lambda x, q=prompt: label_pass(x, q), images[few], batch)
    reworded.append(float(np.mean(pred.argmax(-1) == teacher_pred[few])))

  predict = jax.jit(student_fn.predict_fn(student))
  student_pred = _batches(lambda x: predict(x)['basic'], images, batch).argmax(-1)
  sess_f32 = onnx_export.session(workdir / 'export' / onnx_export.FILE)
  sess_int8 = onnx_export.session(workdir / 'export' / onnx_export.INT8_FILE)
  onnx_pred = _batches(lambda x: onnx_export.run(sess_f32, x)['basic'], images, batch).argmax(-1)
  int8_pred = _batches(lambda x: onnx_export.run(sess_int8, x)['basic'], images, batch).argmax(-1)
  timings['agreement_s'] = time.monotonic() - t

  # ---- speed: one batch of held-out faces, same process ---------------------------- #
  t = time.monotonic()
  x = images[:batch]
  if len(x) < batch:
    x = np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])
  student_s = _seconds_per_image(predict, x)
  likelihood_s = _seconds_per_image(label_pass, x)
  answer = lambda im: instruct_eval.answers(teacher.graphdef, teacher_inputs['params'], im,
                                            'basic', tok, batch_size=batch)
  generative_s = _seconds_per_image(answer, x, repeats=3)  # ~50 sequential decode steps
  # Does the likelihood argmax say what the teacher answers when asked? (same batch)
  said = [instructions.parse_answer('basic', a) for a in answer(x)]
  said_agree = float(np.mean([s == p for s, p in zip(said, teacher_pred[:len(x)])]))
  onnx_ms = onnx_export.ms_per_image({'f32': sess_f32, 'int8': sess_int8}, x)
  onnx_s = onnx_ms['f32'] / 1e3
  timings['speed_s'] = time.monotonic() - t

  cm = plots.confusion_matrix(truth, student_pred, len(labels.BASIC))
  acc = float(np.mean(student_pred == truth))
  plots.plot_confusion(cm, labels.BASIC, f'distilled student (acc {acc:.3f}, agreement with '
                       f'teacher {np.mean(student_pred == teacher_pred):.3f})',
                       workdir / 'student_basic_confusion.png')
  agrees = student_pred == teacher_pred
  agreement = float(np.mean(agrees))
  onnx_agreement = float(np.mean(onnx_pred == teacher_pred))
  int8_agreement = float(np.mean(int8_pred == teacher_pred))
  return {
      'student_teacher_agreement': agreement,
      'student_teacher_n': int(len(basic)),
      'student_teacher_agreement_decisive': (float(np.mean(agrees[decisive]))
                                             if decisive.any() else None),
      'teacher_decisive_fraction': float(np.mean(decisive)),
      'teacher_mirror_consistency': float(np.mean(mirrored_pred == teacher_pred)),
      'teacher_reworded_agreement': float(np.mean(reworded)) if reworded else None,
      'teacher_reworded_agreement_min': min(reworded) if reworded else None,
      'student_basic_acc': acc,
      'teacher_likelihood_basic_acc': float(np.mean(teacher_pred == truth)),
      'student_speedup': generative_s / student_s,
      'student_speedup_vs_likelihood': likelihood_s / student_s,
      'student_ms_per_image': student_s * 1e3,
      'student_onnx_ms_per_image': onnx_s * 1e3,
      'teacher_generative_ms_per_image': generative_s * 1e3,
      'teacher_likelihood_ms_per_image': likelihood_s * 1e3,
      'speed_batch': batch,
      'teacher_likelihood_vs_generative_agreement': said_agree,
      'onnx_max_abs_diff': export['onnx_max_abs_diff'],
      'onnx_teacher_agreement': onnx_agreement,
      'int8_teacher_agreement': int8_agreement,
      'int8_agreement_drop': onnx_agreement - int8_agreement,
      'int8_ms_per_image': onnx_ms['int8'],   # the same batch as the f32 figure
      'onnx_bytes': export['onnx_bytes'], 'int8_bytes': export.get('int8_bytes'),
      'student_confusion': cm.tolist(),
      'distill_final': {k: v for k, v in last.items() if isinstance(v, (int, float))},
      'distill_timings': {**timings, 'total_s': time.monotonic() - t0},
  }


def markdown(r: dict) -> str:
  """The report.md section of these entries ('' when the distill stage did not run)."""
  if 'student_teacher_agreement' not in r:
    return ''
  f = lambda k, fmt='{:.3f}': fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else 'n/a'
  rows = [
      ('student / teacher basic-label agreement (held-out, teacher = argmax label likelihood)',
       f'{f("student_teacher_agreement")} (n={r.get("student_teacher_n")})'),
      ('... on the faces where the teacher is decisive (margin >= 0.5; their fraction)',
       f'{f("student_teacher_agreement_decisive")} ({f("teacher_decisive_fraction")})'),
      ('teacher: same label for a face and its mirror image', f('teacher_mirror_consistency')),
      ('teacher: same label when asked in its other trained wordings (mean / min, 256 faces)',
       f'{f("teacher_reworded_agreement")} / {f("teacher_reworded_agreement_min")}'),
      ('student basic accuracy / teacher (likelihood) basic accuracy',
       f'{f("student_basic_acc")} / {f("teacher_likelihood_basic_acc")}'),
      ('student speedup per image vs the teacher\'s generative answer',
       f'{f("student_speedup", "{:.0f}")}x'),
      ('student speedup per image vs the teacher\'s label-likelihood pass',
       f'{f("student_speedup_vs_likelihood", "{:.0f}")}x'),
      ('ms per image: student JAX / ONNX / int8 ONNX',
       f'{f("student_ms_per_image")} / {f("student_onnx_ms_per_image")} / '
       f'{f("int8_ms_per_image")}'),
      ('ms per image: teacher generative / label likelihood',
       f'{f("teacher_generative_ms_per_image")} / {f("teacher_likelihood_ms_per_image")}'),
      ('teacher: likelihood argmax == its generative answer (one batch)',
       f('teacher_likelihood_vs_generative_agreement')),
      ('ONNX max abs diff vs JAX', f('onnx_max_abs_diff', '{:.2e}')),
      ('int8 ONNX agreement drop (vs f32 ONNX, with the teacher)', f('int8_agreement_drop')),
  ]
  lines = ['', '## Distilled student (exported to ONNX)', '', '| metric | value |', '|---|---|']
  lines += [f'| {a} | {b} |' for a, b in rows]
  lines += ['', '![student confusion](student_basic_confusion.png)', '']
  return '\n'.join(lines)

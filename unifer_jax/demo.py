"""`unifer demo`: the whole pipeline on the built-in procedural FACS corpus, on a CPU.

corpus -> tokenizer -> lm -> vision -> align -> (zero-shot, retrieval) -> generate -> instruct ->
(answers to every FER task) -> report.md / report.json / PNGs in the workdir.
Every stage is the real config in configs/ run by the one train loop, warm-started from
the stage before it (``config.init.checkpoint``). Rerunning resumes: finished stages
are kept (their checkpoints are final), the corpus and tokenizer are reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from unifer_jax import config_lib, sharding, video_demo
from unifer_jax.data import instructions, labels
from unifer_jax.data import tokenizer as tokenizer_lib
from unifer_jax.evaluators import alignment, data as eval_data, instruct as instruct_eval, plots
from unifer_jax.train import align_losses, checkpoint as ckpt_lib, loop, state as state_lib

REPO = Path(__file__).resolve().parents[1]
STAGES = ('lm', 'vision', 'align', 'generate', 'instruct')
# Prompts in the corpus captions' own phrasing (its templates that name the expression),
# as CLIP matches prompts to its training text; label words only, no action units.
# On two demo runs' align checkpoints: 0.611 / 0.715 vs 0.512 / 0.692 with CLIP-style
# prompts ('a face showing {noun}.', 'a photo of a {adj} person.', ...), 2026-12-02.
ZERO_SHOT_TEMPLATES = ('a {adj} face.', 'a {adj} expression.', 'this person looks {adj}.',
                       'the expression reads as {adj}.')


def _banner(text: str):
  print(f'\n==== {text} ' + '=' * max(0, 70 - len(text)), flush=True)


def stage_config(stage: str, workdir: Path, previous: Path | None, overrides=(),
                 preset: str = 'demo'):
  c = config_lib.load(str(REPO / 'configs' / f'{stage}.py') + ':' + preset, list(overrides))
  c.input.data_dir = str(workdir / 'data')
  c.input.tokenizer = str(workdir / 'tokenizer')
  if previous is not None:
    c.init.checkpoint = str(previous)
  return c


def restore_params(config, workdir: Path):
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.build(config, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir / 'checkpoints', config.checkpoint)
  restored = ckpt.restore(setup.abstract_state)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}')
  return setup, restored[1]['params']


# ---- evaluations ------------------------------------------------------------------------

def _encode_texts(tok, texts, length):
  ids = np.zeros((len(texts), length), np.int32)
  mask = np.zeros((len(texts), length), np.int32)
  for i, t in enumerate(texts):
    seq = ([tok.cls_id] + tok.encode(t) + [tok.eos_id])[:length]
    ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
  return ids, mask


def evaluate_alignment(config, workdir: Path, test: dict, tok, out: Path) -> dict:
  setup, params = restore_params(config, workdir)
  graphdef = setup.graphdef
  img_fn = jax.jit(lambda p, x: alignment.image_features(state_lib.bind(graphdef, p), x))
  txt_fn = jax.jit(lambda p, i, m: alignment.text_features(state_lib.bind(graphdef, p), i, m))
  image_feats = alignment.encode_in_batches(lambda x: img_fn(params, x), [test['image']], 64)
  # Zero-shot over the 8 basic classes from text prompts (prompt ensembles).
  prompts, prompt_class = [], []
  for c, name in enumerate(labels.BASIC):
    forms = instructions.SYNONYMS[name]
    for t in ZERO_SHOT_TEMPLATES:
      prompts.append(t.format(adj=forms[1], noun=forms[0]))
      prompt_class.append(c)
  ids, mask = _encode_texts(tok, prompts, config.input.text_len)
  class_feats = alignment.class_embeddings(txt_fn(params, ids, mask), np.asarray(prompt_class),
                                           len(labels.BASIC))
  basic = test['expression'] >= 0
  pred = np.asarray(alignment.scores(image_feats[basic], class_feats)).argmax(-1)
  true = test['expression'][basic]
  cm = plots.confusion_matrix(true, pred, len(labels.BASIC))
  plots.plot_confusion(cm, labels.BASIC, f'zero-shot after align (acc {np.mean(pred == true):.3f})',
                       out / 'zero_shot_confusion.png')
  # Retrieval over the test captions, both ways: at instance level (only the face's own
  # caption counts) and at label level (any caption of a face with the same expression).
  ids, mask = _encode_texts(tok, test['caption'], config.input.text_len)
  text_feats = alignment.encode_in_batches(lambda i, m: txt_fn(params, i, m), [ids, mask], 64)
  sim = np.asarray(alignment.scores(image_feats, text_feats))
  recall = alignment.retrieval_recalls(sim, (1, 5, 10), test['expression'], test['compound'])
  # ITM on held-out pairs, 1 positive : 2 hard negatives, built as training builds them.
  excluded = np.asarray(align_losses.not_negatives(ids, mask, test['expression'], test['compound']))
  temp = float(np.clip(np.asarray(params['temp']), *align_losses.TEMP_RANGE))
  itm_fn = jax.jit(lambda p, x, i, m: alignment.itm_logits(state_lib.bind(graphdef, p), x, i, m))
  itm = alignment.matching_accuracy(lambda x, i, m: itm_fn(params, x, i, m), test['image'], ids,
                                    mask, alignment.matching_pairs(sim, excluded, temp))
  return {'zero_shot_acc': float(np.mean(pred == true)), 'zero_shot_n': int(basic.sum()),
          # retrieval_r1/r5: image->text at label level. Until 2026-12-07 an identical
          # caption counted, which the corpus then repeated within a label; its captions
          # now name the face's look too (data_prep/look_words.py) and rarely repeat.
          'retrieval_r1': recall['label_i2t_r1'], 'retrieval_r5': recall['label_i2t_r5'],
          **{f'retrieval_{d}_r{k}': recall[f'{d}_r{k}']
             for d in ('i2t', 't2i') for k in (1, 5, 10)},
          **itm,
          'zero_shot_confusion': cm.tolist()}


def evaluate_vision(config, workdir: Path, test: dict) -> dict:
  """Accuracy of the vision stage's label head on the held-out basic / compound faces."""
  setup, params = restore_params(config, workdir)
  graphdef = setup.graphdef
  fn = jax.jit(lambda p, x: state_lib.bind(graphdef, p).label_logits(x))
  out = {}
  for head, (task, key) in enumerate((('basic', 'expression'), ('compound', 'compound'))):
    has = test[key] >= 0
    logits = alignment.encode_in_batches(lambda x, h=head: fn(params, x)[h],
                                         [test['image'][has]], 64)
    out[f'vision_{task}_acc'] = float(np.mean(np.argmax(logits, -1) == test[key][has]))
  return out


def evaluate_instruct(config, workdir: Path, test: dict, tok, out: Path, max_per_task: int):
  setup, params = restore_params(config, workdir)
  metrics, raw = instruct_eval.evaluate(setup.graphdef, params, test, tok,
                                        max_per_task=max_per_task)
  for task, key, names in (('basic', 'expression', labels.BASIC),
                            ('compound', 'compound', labels.COMPOUND)):
    if task in raw:
      idx = np.asarray(raw[task]['index'])
      cm = plots.confusion_matrix(test[key][idx], np.asarray(raw[task]['pred']), len(names))
      plots.plot_confusion(cm, names, f'instructed answers: {task} expression',
                           out / f'instruct_{task}_confusion.png')
      metrics[f'instruct_{task}_confusion'] = cm.tolist()
  sample = list(range(min(8, len(test['image']))))
  qa, titles = [], []
  for i in sample:
    qa.append([(instructions.prompt_for(task).split('?')[0] + '?',
                raw[task]['answers'][raw[task]['index'].index(i)])
               for task in ('basic', 'intensity', 'rationale')
               if task in raw and i in raw[task]['index']])
    truth = (labels.BASIC[test['expression'][i]] if test['expression'][i] >= 0
             else labels.COMPOUND[test['compound'][i]])
    titles.append(f'{i + 1}. truth: {truth}')
  plots.faces_with_answers(test['image'][sample], qa, out / 'samples_with_answers.png', titles)
  return metrics, raw


# ---- the pipeline -------------------------------------------------------------------------

def run(workdir: str | Path, size: int = 20000, overrides: dict | None = None,
        eval_limit: int = 1000, max_per_task: int = 400, *, preset: str = 'demo',
        stages: tuple = STAGES, video: bool = False) -> dict:
  """Runs the demo; ``overrides``: {stage: ['--config.key=value', ...]} (tests shrink it).
  ``preset`` is the stage configs' argument; ``stages`` a subset of STAGES, in order,
  each warm-started from the one before it (without ``instruct`` the instructed answers,
  distillation and export are skipped: benchmarks/seeds.py at tiny dims). ``video``
  adds the clip corpus, stage and evaluation after instruct (video_demo.py)."""
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f'demo stages {unknown}: expected a subset of {STAGES}')
  stages = tuple(s for s in STAGES if s in stages)
  t0 = time.monotonic()
  given, workdir = workdir, Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  overrides = overrides or {}
  timings = {}

  _banner(f'corpus: {size} procedural FACS faces')
  from data_prep import synthetic_faces  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # our own banners and progress lines are the console output
  t = time.monotonic()
  counts = synthetic_faces.prepare(workdir / 'data', size=size, seed=0)
  timings['corpus_s'] = time.monotonic() - t
  print(f'corpus: {counts}', flush=True)

  _banner('tokenizer: BPE on the corpus text')
  tok_dir = workdir / 'tokenizer'
  if not tokenizer_lib.is_tokenizer_dir(tok_dir):
    tokenizer_lib.train_for_datasets(['synthetic_faces'], tok_dir, data_dir=str(workdir / 'data'))
  tok = tokenizer_lib.load(tok_dir)

  report: dict = {'corpus': counts}
  previous, test = None, None
  configs = {}
  for stage in stages:
    _banner(f'stage {stage}')
    t = time.monotonic()
    config = stage_config(stage, workdir, previous, overrides.get(stage, ()), preset)
    configs[stage] = config
    last = loop.train(config, workdir / stage)
    timings[f'{stage}_s'] = time.monotonic() - t
    report[f'{stage}_final'] = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    previous = workdir / stage
    if test is None and stage != 'lm':
      test = eval_data.load_split(config.input, 'test', config.model.vit.image_size,
                                  limit=eval_limit)
    if stage == 'vision':
      report.update(evaluate_vision(config, workdir / 'vision', test))
      print({k: report[k] for k in ('vision_basic_acc', 'vision_compound_acc')}, flush=True)
    if stage == 'align':
      _banner('eval: zero-shot and retrieval after align')
      t = time.monotonic()
      report.update(evaluate_alignment(config, workdir / 'align', test, tok, workdir))
      timings['eval_align_s'] = time.monotonic() - t
      print({k: report[k] for k in ('zero_shot_acc', 'retrieval_r1', 'retrieval_i2t_r1',
                                    'retrieval_t2i_r1', 'itm_acc')}, flush=True)

  from unifer_jax import distill_demo  # pylint: disable=g-import-not-at-top
  if 'instruct' in stages:
    _banner('eval: instructed answers on the held-out split')
    t = time.monotonic()
    metrics, raw = evaluate_instruct(configs['instruct'], workdir / 'instruct', test, tok,
                                     workdir, max_per_task)
    timings['eval_instruct_s'] = time.monotonic() - t
    report.update(metrics)
    (workdir / 'answers.json').write_text(json.dumps(raw, indent=1))
    _banner('distill -> ONNX export -> student vs teacher on the held-out split')
    report.update(distill_demo.run_distill_and_export(workdir, overrides.get('distill', ()),
                                                      test))
  if video and 'instruct' in stages:
    _banner('video: synthetic clips -> clip stage from instruct -> clips vs the frame vote')
    report.update(video_demo.run_video(workdir, overrides.get('video', ()), preset))
  plots.loss_curves({s: workdir / s for s in stages}, workdir / 'loss_curves.png')
  report['timings'] = timings
  report['wall_s'] = time.monotonic() - t0
  (workdir / 'report.json').write_text(json.dumps(report, indent=2, sort_keys=True))
  (workdir / 'report.md').write_text(markdown(report) + (
      distill_demo.markdown(report) if 'instruct' in stages else '') + (
      video_demo.markdown(report)))
  _banner(f'done in {report["wall_s"]:.0f} s: {workdir / "report.md"}')
  print(f'Analyse your own photos or webcam with the result (a page on http://127.0.0.1:8000/):\n'
        f'  unifer serve --model {given}        # the student; --backend full adds the rationale',
        flush=True)
  return report


def markdown(r: dict) -> str:
  def f(key, fmt='{:.3f}'):
    return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else 'n/a'
  rows = [('vision stage: basic / compound label-head accuracy',
           f'{f("vision_basic_acc")} / {f("vision_compound_acc")}'),
          ('zero-shot accuracy, 8 basic classes (chance 0.125)', f('zero_shot_acc')),
          ('image->text retrieval, label level, R@1 / R@5',
           f'{f("retrieval_r1")} / {f("retrieval_r5")}'),
          ('image->text retrieval, instance level, R@1 / R@5 / R@10',
           f'{f("retrieval_i2t_r1")} / {f("retrieval_i2t_r5")} / {f("retrieval_i2t_r10")}'),
          ('text->image retrieval, instance level, R@1 / R@5 / R@10',
           f'{f("retrieval_t2i_r1")} / {f("retrieval_t2i_r5")} / {f("retrieval_t2i_r10")}'),
          ('ITM accuracy, held-out 1:2 pairs (prior 0.667)', f('itm_acc')),
          ('instructed basic label accuracy', f('instruct_basic_acc')),
          ('instructed compound label accuracy (chance 0.09)', f('instruct_compound_acc')),
          ('intensity MAE', f('intensity_mae')),
          ('valence/arousal CCC (mean)', f('va_ccc')),
          ('rationale action-unit F1', f('rationale_au_f1')),
          ('wall time (s)', f('wall_s', '{:.0f}'))]
  lines = ['# unifer demo report', '',
           'Held-out test split of the built-in procedural FACS corpus.', '',
           '| metric | value |', '|---|---|'] + [f'| {a} | {b} |' for a, b in rows]
  lines += ['', '## Stage timings (s)', '', '| part | seconds |', '|---|---|']
  lines += [f'| {k} | {v:.0f} |' for k, v in r.get('timings', {}).items()]
  lines += ['', '## Figures', '', '![loss curves](loss_curves.png)', '',
            '![zero-shot confusion](zero_shot_confusion.png)', '',
            '![instructed basic confusion](instruct_basic_confusion.png)', '',
            '![instructed compound confusion](instruct_compound_confusion.png)', '',
            '![faces with answers](samples_with_answers.png)', '']
  return '\n'.join(lines)

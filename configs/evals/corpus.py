r"""Every evaluator on the held-out split of the built-in corpus (or of whatever tfds
dataset the workdir trained on): zero-shot with a prompt ensemble, the LLM's
likelihood of each candidate label (calibrated like a classifier), generative answers
under the FERBench protocol (RAF-DB's 7 candidate words), the instruct tasks
(compound accuracy, intensity MAE, valence/arousal CCC and RMSE, rationale AU F1),
a linear probe, image-text retrieval; calibration on the validation split.

  unifer eval --config configs/evals/corpus.py --workdir workdir/demo/instruct
  unifer eval --config configs/evals/corpus.py:200 --workdir workdir/demo/align \
      --config.evals.generative.decoding.max_new_tokens=32

Writes report.md / report.json / *_confusion.png / *_reliability.png in the workdir.
Arg: faces per split (default 500). Zero-shot and retrieval need the align heads
(align stage onward); generative and instruct need an instruction-tuned LLM (instruct
stage) -- on earlier stages they run and score what the model says, near 0.
Expected: not measured here yet (no finished demo workdir on this machine); instruct.py's
docstring expects >= 0.85 basic and >= 0.60 compound accuracy for the demo preset.
"""

import ml_collections


def get_config(arg: str = ''):
  n = int(arg or 500)
  test = dict(type='tfds', split='test', limit=n)
  c = ml_collections.ConfigDict()
  c.evals = dict(
      zero_shot=dict(type='zero_shot', dataset=test),
      likelihood=dict(type='likelihood', dataset=test),
      generative=dict(type='generative', dataset=test, prompt='ferbench',
                      decoding=dict(max_new_tokens=64)),
      instruct=dict(type='instruct', dataset=test, max_per_task=n),
      linear_probe=dict(type='linear_probe', dataset=test,
                        train=dict(type='tfds', split='train', limit=4 * n)),
      retrieval=dict(type='retrieval', dataset=test, ks=[1, 5, 10]),
  )
  return c

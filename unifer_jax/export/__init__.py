"""Student export (`unifer export`) and the exported student's predictor.

``load(export_dir)`` -> a ``standalone.Predictor``; imported lazily so that the package
(and the `unifer` command line) never needs onnxruntime until a predictor is asked for.
"""


def load(export_dir, **kwargs):
  from unifer_jax.export import standalone  # pylint: disable=g-import-not-at-top
  return standalone.load(export_dir, **kwargs)

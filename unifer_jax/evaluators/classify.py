"""Evaluators that score every candidate label and pick the best: zero-shot from text
prompts (prompt ensembles over any label words, so open vocabulary) and a linear probe
on frozen image features. Both report the label metrics (weighted and mean-class
accuracy, per-class P/R/F1, confusion) and calibration: ECE and a reliability
diagram, and with a validation split a fitted temperature and the ECE after it.

Config keys (``config.evals.NAME``):
  zero_shot: dataset, templates (prompt set: strings with '{}' for the label word),
    val (dataset for the temperature; default: the tfds 'validation' split), bins
  linear_probe: dataset, train (dataset; default: the tfds 'train' split, limit 2000),
    val, C (inverse L2 strength), max_iter, bins
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unifer_jax import workdirs
from unifer_jax.evaluators import eval_sets, metrics, plots

TEMPLATES = ('a {} face.', 'a face showing {}.', 'a photo of a person with a {} expression.',
             'the facial expression is {}.')


def label_metrics(true, pred, classes, out_dir: Path | None, tag: str, title: str) -> dict:
  """metrics.classification + its confusion matrix PNG."""
  r = metrics.classification(true, pred, classes)
  if out_dir is not None:
    png = workdirs.path(out_dir) / f'{tag}_confusion.png'
    plots.plot_confusion(np.asarray(r['confusion']), classes,
                         f'{title}: acc {r["acc_weighted"]:.3f} (weighted), '
                         f'{r["acc_mean_class"]:.3f} (mean class)', png)
    r['figures'] = [png.name]
  return r


def write_missing(data, out_dir: Path | None, tag: str) -> None:
  """The full list of absent images (the notes show the first few)."""
  if data.missing and out_dir is not None:
    (workdirs.path(out_dir) / f'{tag}_missing_images.txt').write_text('\n'.join(data.missing) + '\n')


def calibration_report(logits, true, val_logits, val_true, out_dir, tag, title, bins) -> dict:
  cal = metrics.calibration(logits, true, val_logits, val_true, bins)
  if out_dir is not None:
    tables = {'raw': cal['reliability']}
    if 'reliability_scaled' in cal:
      tables[f"T={cal['temperature']:.2f}"] = cal['reliability_scaled']
    png = workdirs.path(out_dir) / f'{tag}_reliability.png'
    plots.plot_reliability(tables, title, png)
    cal['figures'] = [png.name]
  return cal


def val_spec(cfg: dict, fallback_split: str):
  """The validation dataset: cfg['val'], else the same tfds dataset's other split."""
  if cfg.get('val') is not None:
    return cfg['val'] or None   # {} / '' turns it off
  data = dict(cfg['dataset'])
  if data.get('type', 'tfds') != 'tfds':
    return None
  data.update(split=fallback_split, limit=data.get('limit', 0) or 0)
  return data


class ZeroShot:
  """Text prompts per label word -> ensembled class embeddings -> ITC scores / T."""

  def __init__(self, name: str, cfg: dict):
    self.name, self.cfg = name, cfg

  def _logits(self, model, data: eval_sets.EvalSet) -> np.ndarray:
    templates = list(self.cfg.get('templates') or TEMPLATES)
    bad = [t for t in templates if '{}' not in t]
    if bad:
      raise ValueError(f'evals.{self.name}.templates: {bad} lack the {{}} for the label word')
    texts = [t.format(word) for word in data.classes for t in templates]
    feats = model.text_features(texts).reshape(len(data.classes), len(templates), -1)
    cls = feats.mean(axis=1)
    cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
    img = model.image_features(data.images)
    return np.einsum('nqe,ce->ncq', img, cls).max(-1) / model.temperature()

  def run(self, model, out_dir: Path | None) -> dict:
    data = eval_sets.load(self.cfg['dataset'], model)
    logits = self._logits(model, data)
    r = label_metrics(data.true, logits.argmax(-1), data.classes, out_dir, self.name,
                      f'{self.name} (zero-shot)')
    vspec = val_spec(self.cfg, 'validation')
    val = eval_sets.load(vspec, model) if vspec else None
    r['calibration'] = calibration_report(
        logits, data.true, self._logits(model, val) if val else None,
        val.true if val else None, out_dir, self.name, f'{self.name}: reliability',
        int(self.cfg.get('bins', 10)))
    r['notes'] = data.notes
    write_missing(data, out_dir, self.name)
    return r


def probe_features(model, images: np.ndarray) -> np.ndarray:
  """[N, Q * E]: the image's ITC query embeddings, concatenated (the queries are learned
  and keep their order, so concatenating keeps what each one attends to)."""
  feats = model.image_features(images)
  return feats.reshape(len(feats), -1)


class LinearProbe:
  """Multinomial logistic regression (L-BFGS, scikit-learn) on frozen image features
  (probe_features) of a training split."""

  def __init__(self, name: str, cfg: dict):
    self.name, self.cfg = name, cfg

  def run(self, model, out_dir: Path | None) -> dict:
    from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
    data = eval_sets.load(self.cfg['dataset'], model)
    train_spec = self.cfg.get('train') or dict(self.cfg['dataset'], split='train', limit=2000)
    train = eval_sets.load(train_spec, model)
    if train.classes != data.classes:
      raise ValueError(f'evals.{self.name}: train labels {train.classes} differ from the '
                       f'evaluated dataset\'s {data.classes}')
    x_train = probe_features(model, train.images)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(C=float(self.cfg.get('C', 1.0)),
                             max_iter=int(self.cfg.get('max_iter', 200)))
    clf.fit((x_train - mu) / sd, train.true)

    def logits(d):
      # Columns follow clf.classes_ (the labels seen in training); unseen ones get -inf.
      out = np.full((len(d.images), len(d.classes)), -1e9)
      scores = clf.decision_function((probe_features(model, d.images) - mu) / sd)
      if scores.ndim == 1:   # two classes: one score, for classes_[1]
        scores = np.stack([np.zeros_like(scores), scores], axis=1)
      out[:, clf.classes_] = scores
      return out

    test_logits = logits(data)
    r = label_metrics(data.true, test_logits.argmax(-1), data.classes, out_dir, self.name,
                      f'{self.name} (linear probe)')
    r['train_acc'] = float(clf.score((x_train - mu) / sd, train.true))
    r['train_n'] = int(len(train.true))
    vspec = val_spec(self.cfg, 'validation')
    val = eval_sets.load(vspec, model) if vspec else None
    r['calibration'] = calibration_report(
        test_logits, data.true, logits(val) if val else None, val.true if val else None,
        out_dir, self.name, f'{self.name}: reliability', int(self.cfg.get('bins', 10)))
    r['notes'] = data.notes
    write_missing(data, out_dir, self.name)
    return r

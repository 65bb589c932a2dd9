"""Numbers every evaluator reports, computed the same way everywhere (numpy only).

Classification: the confusion matrix over [true, pred] (a prediction of -1 = "unknown"
counts as wrong and goes to an extra column), accuracy both sample-weighted
(``acc_weighted``: correct / all) and mean over classes (``acc_mean_class``: the mean
of per-class recalls, over classes that occur) -- papers report either, so every
report shows both, labelled -- and per-class precision / recall / F1 with their macro
means. Regression: MAE, RMSE, Lin's CCC. Calibration: ECE over equal-width confidence
bins, the reliability table behind the diagram, and a temperature fitted on a
validation split by minimising the NLL.
"""

from __future__ import annotations

import numpy as np


# ---- classification ------------------------------------------------------------------

def confusion(true, pred, num_classes: int) -> np.ndarray:
  """[C, C + 1] counts: row = true class, column = predicted class, last column =
  predictions outside [0, C) (unknown / unparsed)."""
  true, pred = np.asarray(true, np.int64), np.asarray(pred, np.int64)
  if true.shape != pred.shape:
    raise ValueError(f'true {true.shape} and pred {pred.shape} differ in shape')
  if len(true) and (true.min() < 0 or true.max() >= num_classes):
    raise ValueError(f'true labels must lie in [0, {num_classes}), got {true.min()}..{true.max()}')
  col = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
  cm = np.zeros((num_classes, num_classes + 1), np.int64)
  np.add.at(cm, (true, col), 1)
  return cm


def classification(true, pred, names) -> dict:
  """Accuracy (weighted and mean-class), per-class P/R/F1, macro P/R/F1, unknown rate,
  and the confusion matrix (list of lists, last column = unknown)."""
  names = list(names)
  c = len(names)
  cm = confusion(true, pred, c)
  n = cm.sum()
  tp = np.diag(cm[:, :c]).astype(np.float64)
  support = cm.sum(axis=1).astype(np.float64)           # true count per class
  predicted = cm[:, :c].sum(axis=0).astype(np.float64)  # predicted count per class
  with np.errstate(invalid='ignore', divide='ignore'):
    precision = np.where(predicted > 0, tp / predicted, 0.0)
    recall = np.where(support > 0, tp / support, np.nan)
    f1 = np.where(precision + np.nan_to_num(recall) > 0,
                  2 * precision * recall / (precision + recall), 0.0)
  present = support > 0
  # Macro means follow scikit-learn's (and so the FERBench scripts'): over the labels
  # that occur in the truth or the predictions, 'unknown' included when predicted,
  # 0 where undefined.
  occurs = present | (predicted > 0)
  unknown = cm[:, c].sum() > 0
  k = occurs.sum() + unknown
  out = {
      'n': int(n),
      'acc_weighted': float(tp.sum() / n) if n else float('nan'),
      'acc_mean_class': float(recall[present].mean()) if present.any() else float('nan'),
      'unknown_rate': float(cm[:, c].sum() / n) if n else float('nan'),
      'macro_precision': float(precision[occurs].sum() / k) if k else float('nan'),
      'macro_recall': float(np.nan_to_num(recall[occurs]).sum() / k) if k else float('nan'),
      'macro_f1': float(np.nan_to_num(f1[occurs]).sum() / k) if k else float('nan'),
      'per_class': {name: {'precision': float(precision[i]), 'recall': float(recall[i]),
                           'f1': float(np.nan_to_num(f1[i])), 'support': int(support[i])}
                    for i, name in enumerate(names)},
      'confusion': cm.tolist(),
      'labels': names,
  }
  return out


# ---- regression ----------------------------------------------------------------------

def ccc(pred, true) -> float:
  """Lin's concordance correlation coefficient (population moments)."""
  pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  mp, mt = pred.mean(), true.mean()
  cov = ((pred - mp) * (true - mt)).mean()
  denom = pred.var() + true.var() + (mp - mt) ** 2
  return float(2 * cov / denom) if denom > 0 else float('nan')


def rmse(pred, true) -> float:
  d = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
  return float(np.sqrt((d ** 2).mean()))


def mae(pred, true) -> float:
  return float(np.abs(np.asarray(pred, np.float64) - np.asarray(true, np.float64)).mean())


# ---- calibration ---------------------------------------------------------------------

def softmax(logits, temperature: float = 1.0) -> np.ndarray:
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def reliability(probs, true, bins: int = 10) -> dict:
  """Per equal-width confidence bin: count, mean confidence, accuracy; and the ECE
  (sum over bins of |accuracy - confidence| weighted by the bin's share of samples)."""
  probs, true = np.asarray(probs, np.float64), np.asarray(true, np.int64)
  conf = probs.max(axis=-1)
  correct = (probs.argmax(axis=-1) == true).astype(np.float64)
  # Bin i holds (i/B, (i+1)/B]; a confidence of exactly 0 goes to bin 0.
  idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
  count = np.bincount(idx, minlength=bins).astype(np.float64)
  conf_sum = np.bincount(idx, weights=conf, minlength=bins)
  acc_sum = np.bincount(idx, weights=correct, minlength=bins)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean_conf = np.where(count > 0, conf_sum / count, np.nan)
    acc = np.where(count > 0, acc_sum / count, np.nan)
  n = count.sum()
  ece = float(np.nansum(count / n * np.abs(acc - mean_conf))) if n else float('nan')
  return {'ece': ece, 'bins': bins, 'count': count.astype(int).tolist(),
          'confidence': mean_conf.tolist(), 'accuracy': acc.tolist()}


def nll(logits, true, temperature: float = 1.0) -> float:
  p = softmax(logits, temperature)
  return float(-np.log(np.maximum(p[np.arange(len(true)), np.asarray(true)], 1e-12)).mean())


def fit_temperature(logits, true, lo: float = 0.05, hi: float = 20.0) -> float:
  """The T > 0 minimising the NLL of softmax(logits / T): golden-section search over
  log T (the NLL is unimodal in T for fixed logits)."""
  a, b = np.log(lo), np.log(hi)
  g = (np.sqrt(5) - 1) / 2
  c, d = b - g * (b - a), a + g * (b - a)
  fc, fd = nll(logits, true, np.exp(c)), nll(logits, true, np.exp(d))
  for _ in range(60):
    if fc < fd:
      b, d, fd = d, c, fc
      c = b - g * (b - a)
      fc = nll(logits, true, np.exp(c))
    else:
      a, c, fc = c, d, fd
      d = a + g * (b - a)
      fd = nll(logits, true, np.exp(d))
  return float(np.exp((a + b) / 2))


def calibration(logits, true, val_logits=None, val_true=None, bins: int = 10) -> dict:
  """ECE and NLL before and (with a validation split) after temperature scaling."""
  out = {'ece': reliability(softmax(logits), true, bins)['ece'], 'nll': nll(logits, true),
         'reliability': reliability(softmax(logits), true, bins)}
  if val_logits is not None and len(val_logits):
    t = fit_temperature(val_logits, val_true)
    scaled = reliability(softmax(logits, t), true, bins)
    out.update(temperature=t, ece_scaled=scaled['ece'], nll_scaled=nll(logits, true, t),
               reliability_scaled=scaled)
  return out

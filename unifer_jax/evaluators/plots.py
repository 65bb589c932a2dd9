"""Figures people would rather look at than read: loss curves, confusion matrices,
faces with the model's answers. Written as PNG next to the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def loss_curves(stage_workdirs: dict[str, Path], out: Path, keys=('loss',)) -> Path:
  stages = [s for s, w in stage_workdirs.items() if (Path(w) / 'metrics.jsonl').exists()]
  fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    recs = [json.loads(l) for l in (Path(stage_workdirs[stage]) / 'metrics.jsonl').read_text().splitlines()]
    steps = [r['step'] for r in recs]
    for key in keys + tuple(k for k in ('itc', 'itm', 'itg') if k in recs[0]):
      ax.plot(steps, [r[key] for r in recs], label=key)
    ax.set_title(stage)
    ax.set_xlabel('step')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """[true, pred] counts; predictions outside [0, C) (unparsed) are dropped."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  ok = (pred >= 0) & (pred < num_classes)
  np.add.at(cm, (true[ok], pred[ok]), 1)
  return cm


def plot_confusion(cm: np.ndarray, names, title: str, out: Path) -> Path:
  """Row-normalised [true, pred] counts; an extra last column is 'unknown'."""
  cm = np.asarray(cm)
  cols = list(names) + ['unknown'] * (cm.shape[1] - len(names))
  rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(0.6 * len(cols) + 2, 0.6 * len(names) + 1.5))
  ax.imshow(rows, cmap='Blues', vmin=0, vmax=1)
  ax.set_xticks(range(len(cols)), cols, rotation=60, ha='right', fontsize=7)
  ax.set_yticks(range(len(names)), names, fontsize=7)
  for i in range(len(names)):
    for j in range(len(cols)):
      if cm[i, j]:
        ax.text(j, i, str(cm[i, j]), ha='center', va='center', fontsize=6,
                color='white' if rows[i, j] > 0.5 else 'black')
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def faces_with_answers(images: np.ndarray, captions: list[str], out: Path, cols: int = 4,
                       mean=0.5, std=0.5) -> Path:
  n = len(images)
  rows = int(np.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, img, text in zip(axes.ravel(), images, captions):
    ax.imshow(np.clip(img * std + mean, 0, 1))
    ax.set_title(text, fontsize=7, wrap=True)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def plot_reliability(tables: dict, title: str, out: Path) -> Path:
  """Reliability diagram: accuracy vs confidence per bin, one line per table
  ({label: metrics.reliability(...)}), the diagonal = perfect calibration."""
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot([0, 1], [0, 1], color='grey', lw=0.8, ls='--')
  for label, t in tables.items():
    conf, acc = np.asarray(t['confidence'], float), np.asarray(t['accuracy'], float)
    ok = np.isfinite(conf)
    ax.plot(conf[ok], acc[ok], marker='o', label=f"{label} (ECE {t['ece']:.3f})")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel('confidence')
  ax.set_ylabel('accuracy')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def plot_grouped_bars(rows: list[dict], metric: str, group: str, series: str, out: Path) -> Path:
  """One bar per (group, series) value of `metric` (sweep results)."""
  groups = list(dict.fromkeys(r[group] for r in rows))
  names = list(dict.fromkeys(r[series] for r in rows))
  width = 0.8 / max(len(names), 1)
  fig, ax = plt.subplots(figsize=(1.2 * len(groups) * max(1, len(names) / 2) + 2, 3.2))
  for k, name in enumerate(names):
    vals = [next((r[metric] for r in rows if r[group] == g and r[series] == name
                  and isinstance(r.get(metric), (int, float))), np.nan) for g in groups]
    ax.bar(np.arange(len(groups)) + k * width, vals, width, label=str(name))
  ax.set_xticks(np.arange(len(groups)) + width * (len(names) - 1) / 2, groups, fontsize=7,
                rotation=20, ha='right')
  ax.set_ylabel(metric)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out

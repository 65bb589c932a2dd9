"""Figures people would rather look at than read: loss curves, confusion matrices,
faces with the model's answers. Written as PNG next to the numbers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from unifer_jax import workdirs


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
  return _save(fig, out, 100)


def _save(fig, out, dpi: int):
  """The figure as a PNG at ``out`` (a local path or a URL: workdirs.write_via)."""
  workdirs.write_via(out, lambda f: fig.savefig(f, dpi=dpi, format='png'), suffix='.png')
  plt.close(fig)
  return out


def metric_curves(metrics_jsonl: Path, out: Path, keys, title: str = '') -> Path:
  """``keys`` of a workdir's metrics.jsonl against the step, one line each (a record
  without a key leaves a gap)."""
  recs = [json.loads(l) for l in workdirs.path(metrics_jsonl).read_text().splitlines()
          if l.strip()]
  steps = [r['step'] for r in recs]
  fig, ax = plt.subplots(figsize=(7, 4))
  for key in keys:
    if any(key in r for r in recs):
      ax.plot(steps, [r.get(key, np.nan) for r in recs], label=key)
  ax.set_xlabel('step')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, out, 100)


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
  return _save(fig, out, 100)


# faces_with_answers: points per text line (7.5 pt type), inches per face picture and per
# text column (52 characters of DejaVu Sans at 7.5 pt fit in ~3 in).
_QA_FONT, _QA_LINE, _QA_IMAGE_IN, _QA_TEXT_IN, _QA_WRAP = 7.5, 9.5, 1.3, 3.5, 52


def _qa_lines(pairs, width: int, max_chars: int) -> list[tuple[str, bool]]:
  """(line, is_question) for the wrapped questions and answers of one face."""
  lines = []
  for question, answer in pairs:
    if lines:
      lines.append(('', False))
    lines += [(l, True) for l in textwrap.wrap(question, width)]
    answer = ' '.join(str(answer).split())
    if len(answer) > max_chars:
      answer = answer[:max_chars - 1] + '\u2026'
    lines += [(l, False) for l in (textwrap.wrap(answer, width) or ['(no answer)'])]
  return lines


def faces_with_answers(images: np.ndarray, qa: list, out: Path, titles=None, cols: int = 2,
                       mean=0.5, std=0.5, max_chars: int = 360) -> Path:
  """Each face with its questions (bold) and the model's wrapped answers beside it, as the
  `unifer serve` page shows a face beside its reading. ``qa[i]`` is face i's list of
  (question, answer). A row is as tall as the longest text in it, so the answers of
  neighbouring faces never overlap (the old grid put each answer in a wrapped title
  over its face, where long answers ran into the faces above and beside)."""
  fig = answers_figure(images, qa, titles, cols, mean, std, max_chars)
  return _save(fig, out, 110)


def answers_figure(images, qa, titles=None, cols: int = 2, mean=0.5, std=0.5,
                   max_chars: int = 360):
  """The figure of faces_with_answers (each face's texts carry ``gid`` 'face<i>')."""
  blocks = [_qa_lines(pairs, _QA_WRAP, max_chars) for pairs in qa]
  n = len(images)
  rows = int(np.ceil(n / cols))
  heights = [max(_QA_IMAGE_IN + 0.25, max(len(b) for b in blocks[r * cols:(r + 1) * cols])
                 * _QA_LINE / 72 + 0.15) for r in range(rows)]
  fig = plt.figure(figsize=(cols * (_QA_IMAGE_IN + _QA_TEXT_IN), sum(heights) + 0.2))
  grid = fig.add_gridspec(rows, 2 * cols, height_ratios=heights, hspace=0.08, wspace=0.04,
                          width_ratios=[_QA_IMAGE_IN, _QA_TEXT_IN] * cols,
                          left=0.01, right=0.99, top=0.99, bottom=0.01)
  for i, (img, lines) in enumerate(zip(images, blocks)):
    r, c = divmod(i, cols)
    ax = fig.add_subplot(grid[r, 2 * c])
    ax.imshow(np.clip(img * std + mean, 0, 1))
    ax.set_anchor('N')
    ax.axis('off')
    ax.set_gid(f'face{i}')
    if titles is not None:   # under the picture, inside its row (a title above would
      ax.annotate(titles[i], (0, 0), xycoords='axes fraction', xytext=(0, -3),  # leave it)
                  textcoords='offset points', va='top', fontsize=_QA_FONT).set_gid(f'face{i}')
    text = fig.add_subplot(grid[r, 2 * c + 1])
    text.axis('off')
    for k, (line, question) in enumerate(lines):
      text.annotate(line, (0, 1), xycoords='axes fraction', xytext=(3, -k * _QA_LINE),
                    textcoords='offset points', va='top', fontsize=_QA_FONT,
                    fontweight='bold' if question else 'normal').set_gid(f'face{i}')
  return fig


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
  return _save(fig, out, 100)


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
  return _save(fig, out, 100)

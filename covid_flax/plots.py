"""Evaluation and training figures, each written to one PNG file.

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing depends on a display or on
global pyplot state. Every function creates the parent folder of `path` and returns `path`.

  plot_roc(curves, path, title)                ROC of one or more models, operating points marked
  plot_precision_recall(curves, path, title)   PR curves with the prevalence baseline
  plot_confusion_matrix(confusion, path, title)
  plot_reliability(labels, probs, path, n_bins=10, title)   reliability diagram + histogram
  plot_training_curves(records, path, title)   loss/accuracy/AUC per step from metrics.jsonl
  gradcam_grid(groups, path, ncols=4, ...)     Grad-CAM overlays, one block of rows per category
`curves` maps a legend name to a `Curve` (`curve_from_results` builds one from metrics.json).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from sklearn import metrics as skm

from covid_flax import metrics as metrics_lib

CLASS_NAMES = ("non-COVID", "COVID")
_MARKERS = "o^sDvP*X"
_DPI = 110


class Curve(NamedTuple):
  """One model's predictions on one split, for `plot_roc` and `plot_precision_recall`."""

  labels: Any  # (N,) 0 = non-COVID, 1 = COVID.
  probs: Any  # (N,) P(COVID).
  operating_points: Mapping[str, float] = {}  # Name -> threshold, marked on the curves.
  roc_auc_ci: tuple[float | None, float | None] | None = None  # For the legends.
  pr_auc_ci: tuple[float | None, float | None] | None = None


def curve_from_results(labels: Any, probs: Any, results: Mapping[str, Any]) -> Curve:
  """A Curve with the thresholds and AUC intervals of a metrics.json dict (metrics.py)."""
  points, cis = {}, {}
  for key, rec in results.items():
    if key.startswith("threshold_") and isinstance(rec, Mapping):
      points[key.removeprefix("threshold_").replace("val", "val threshold")] = rec["threshold"]
      for name in ("roc_auc", "pr_auc"):
        cis.setdefault(name, (rec["metrics"][name]["ci_low"], rec["metrics"][name]["ci_high"]))
  return Curve(labels, probs, points, cis.get("roc_auc"), cis.get("pr_auc"))


def _figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str | Path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=_DPI)
  return path


def _ci_text(ci: tuple[float | None, float | None] | None) -> str:
  if ci is None or ci[0] is None or ci[1] is None or any(map(math.isnan, ci)):
    return ""
  return f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]"


def _counts_text(labels: np.ndarray) -> str:
  return f"n={labels.size}: {int(labels.sum())} COVID, {int((labels == 0).sum())} non-COVID"


def _both_classes(name: str, labels: np.ndarray) -> None:
  if not 0 < labels.sum() < labels.size:
    raise ValueError(f"{name}: a ROC or PR curve needs both classes ({_counts_text(labels)})")


def plot_roc(curves: Mapping[str, Curve], path: str | Path, title: str = "ROC curve") -> Path:
  """ROC curves with AUC (and CI) and counts in the legend; operating points as markers."""
  fig = _figure(6.4, 6.0)
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance (AUC 0.5)")
  for i, (name, curve) in enumerate(curves.items()):
    labels, probs = metrics_lib.check_predictions(curve.labels, curve.probs)
    _both_classes(name, labels)
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    auc = skm.roc_auc_score(labels, probs)
    color = f"C{i}"
    ax.plot(
      fpr,
      tpr,
      color=color,
      lw=2,
      label=f"{name}: AUC {auc:.3f}{_ci_text(curve.roc_auc_ci)}\n{_counts_text(labels)}",
    )
    for j, (point, threshold) in enumerate(curve.operating_points.items()):
      pred = probs >= threshold
      sens, fpr_t = pred[labels == 1].mean(), pred[labels == 0].mean()
      ax.plot(
        fpr_t,
        sens,
        _MARKERS[j % len(_MARKERS)],
        color=color,
        ms=9,
        mec="black",
        label=f"{name} @ {point} (t={threshold:.3g}): sens {sens:.3f}, spec {1 - fpr_t:.3f}",
      )
  ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title)
  ax.set_xlabel("False positive rate (1 - specificity)")
  ax.set_ylabel("True positive rate (sensitivity)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=7.5)
  return _save(fig, path)


def plot_precision_recall(
  curves: Mapping[str, Curve], path: str | Path, title: str = "Precision-recall curve"
) -> Path:
  """PR curves with average precision (and CI) in the legend; dashed lines at the prevalence."""
  fig = _figure(6.4, 6.0)
  ax = fig.add_subplot()
  for i, (name, curve) in enumerate(curves.items()):
    labels, probs = metrics_lib.check_predictions(curve.labels, curve.probs)
    _both_classes(name, labels)
    precision, recall, _ = skm.precision_recall_curve(labels, probs)
    ap = skm.average_precision_score(labels, probs)
    color = f"C{i}"
    ax.step(
      recall,
      precision,
      where="post",
      color=color,
      lw=2,
      label=f"{name}: AP {ap:.3f}{_ci_text(curve.pr_auc_ci)}\n{_counts_text(labels)}",
    )
    prevalence = labels.mean()
    ax.axhline(
      prevalence,
      ls="--",
      color=color,
      alpha=0.6,
      label=f"{name}: chance = prevalence {prevalence:.3f}",
    )
    for j, (point, threshold) in enumerate(curve.operating_points.items()):
      pred = probs >= threshold
      if pred.any():
        sens, ppv = pred[labels == 1].mean(), labels[pred].mean()
        ax.plot(
          sens,
          ppv,
          _MARKERS[j % len(_MARKERS)],
          color=color,
          ms=9,
          mec="black",
          label=f"{name} @ {point} (t={threshold:.3g}): recall {sens:.3f}, precision {ppv:.3f}",
        )
  ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title)
  ax.set_xlabel("Recall (sensitivity)")
  ax.set_ylabel("Precision (PPV)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower left", fontsize=7.5)
  return _save(fig, path)


def plot_confusion_matrix(
  confusion: Mapping[str, int] | Sequence[Sequence[int]],
  path: str | Path,
  title: str = "Confusion matrix",
  class_names: Sequence[str] = CLASS_NAMES,
) -> Path:
  """`confusion`: {"tn", "fp", "fn", "tp"} or [[tn, fp], [fn, tp]]. Cells: count and row share."""
  if isinstance(confusion, Mapping):
    confusion = [[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]]
  counts = np.asarray(confusion, dtype=np.int64)
  if counts.shape != (2, 2):
    raise ValueError(f"confusion matrix must be 2x2, got shape {counts.shape}")
  rows = counts.sum(1, keepdims=True)
  share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
  fig = _figure(5.2, 4.6)
  ax = fig.add_subplot()
  image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
  for (r, c), n in np.ndenumerate(counts):
    ax.text(
      c,
      r,
      f"{n}\n({100 * share[r, c]:.1f}% of row)",
      ha="center",
      va="center",
      color="white" if share[r, c] > 0.5 else "black",
      fontsize=12,
    )
  ax.set_xticks([0, 1], [f"{n}" for n in class_names])
  ax.set_yticks([0, 1], [f"{n}\n(n={rows[i, 0]})" for i, n in enumerate(class_names)])
  ax.set_xlabel("Predicted class")
  ax.set_ylabel("True class")
  fig.suptitle(f"{title}\n{int(counts.sum())} images")  # Over the colour bar too, not under it.
  fig.colorbar(image, ax=ax, label="share of the true class")
  return _save(fig, path)


def plot_reliability(
  labels: Any, probs: Any, path: str | Path, n_bins: int = 10, title: str = "Reliability diagram"
) -> Path:
  """Observed COVID fraction per equal-width bin vs mean prediction; histogram of predictions."""
  labels, probs = metrics_lib.check_predictions(labels, probs)
  frac_pos, mean_prob, counts = metrics_lib.calibration_bins(labels, probs, n_bins)
  ece = metrics_lib.expected_calibration_error(labels, probs, n_bins)
  fig = _figure(6.0, 7.2)
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.4))
  top.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
  top.plot(mean_prob, frac_pos, "o-", color="C0", label=f"model (ECE {ece:.3f}, {n_bins} bins)")
  for x, y, n in zip(mean_prob, frac_pos, counts, strict=True):
    top.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7)
  top.set(xlim=(0, 1), ylim=(-0.07, 1.04), ylabel="Observed fraction COVID", title=title)
  top.grid(alpha=0.3)
  top.legend(loc="upper left", fontsize=8)
  edges = np.linspace(0, 1, n_bins + 1)
  bottom.hist(
    [probs[labels == 0], probs[labels == 1]],
    bins=edges,
    stacked=True,
    color=["C2", "C3"],
    label=[f"true {n} ({(labels == i).sum()})" for i, n in enumerate(CLASS_NAMES)],
  )
  bottom.set(xlabel="Predicted P(COVID)", ylabel="Images")
  bottom.legend(fontsize=8)
  return _save(fig, path)


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
  """The JSON objects of a .jsonl file; blank, truncated or non-object lines are skipped."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def _number(x: Any) -> float | None:
  if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
    return None
  return float(x)


def plot_training_curves(
  records: Iterable[Mapping[str, Any]],
  path: str | Path,
  title: str = "Training curves",
  keys: Sequence[str] = ("loss", "accuracy", "auc", "sensitivity", "specificity"),
) -> Path:
  """One panel per key in `keys` that some record has, one line per split, against step or epoch.

  Records are metrics.jsonl lines ({"step", "epoch", "split", "loss", ...}). x is "step" if at least
  half the records have one, else "epoch" likewise, else the record's position; a record without
  that x or without a finite value is left out of that panel.
  """
  records = [r for r in records if isinstance(r, Mapping)]

  def has(record: Mapping[str, Any], key: str) -> bool:
    return _number(record.get(key)) is not None

  x_key = next(
    (k for k in ("step", "epoch") if 2 * sum(has(r, k) for r in records) >= len(records) > 0), None
  )
  panels = [k for k in keys if any(has(r, k) for r in records)]
  fig = _figure(4.6 * max(1, len(panels)), 4.2)
  axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
  if not panels:
    axes[0].text(0.5, 0.5, "no training metrics found", ha="center", va="center")
    axes[0].set_axis_off()
  splits = list(dict.fromkeys(str(r.get("split", "all")) for r in records))
  both = [r for r in records if has(r, "step") and has(r, "epoch") and r["epoch"] > 0]
  last = max(both, key=lambda r: r["step"], default=None)  # Gives the steps per epoch.
  per_epoch = _number(last["step"]) / _number(last["epoch"]) if last else None
  for ax, key in zip(axes[: len(panels)], panels, strict=True):
    for i, split in enumerate(splits):
      points = sorted(
        (_number(r[x_key]) if x_key else n, _number(r[key]))
        for n, r in enumerate(records)
        if str(r.get("split", "all")) == split and has(r, key) and (x_key is None or has(r, x_key))
      )
      if points:
        xs, ys = zip(*points, strict=True)
        marker = "o" if len(points) < 60 else None
        ax.plot(xs, ys, marker=marker, ms=3, color=f"C{i}", label=f"{split} ({len(points)} points)")
    ax.set(title=key, xlabel=x_key or "record", ylabel=key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if x_key == "step" and per_epoch:
      to_epoch = (lambda s: s / per_epoch, lambda e: e * per_epoch)
      epoch_axis = ax.secondary_xaxis("top", functions=to_epoch)
      epoch_axis.set_xlabel("epoch (approx.)")
  fig.suptitle(title)
  return _save(fig, path)


def _display_image(image: Any) -> np.ndarray:
  """A 2-D float image in [0, 1]: uint8 / 255, floats outside [0, 1] min-max scaled."""
  image = np.asarray(image)
  image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
  if image.ndim != 2:
    raise ValueError(f"expected a grayscale (H, W) image, got shape {image.shape}")
  if image.dtype == np.uint8:
    return image / 255.0
  image = image.astype(np.float64)
  lo, hi = float(image.min()), float(image.max())
  if lo < 0 or hi > 1:
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
  return image


def gradcam_grid(
  groups: Mapping[str, tuple[Any, Any, Sequence[str] | None]],
  path: str | Path,
  ncols: int = 4,
  alpha: float = 0.45,
  cmap: str = "jet",
  title: str = "Grad-CAM",
  max_per_group: int | None = None,
  totals: Mapping[str, int] | None = None,
) -> Path:
  """Heat maps over their images, a block of rows per category, e.g. {"true positives": (...)}.

  Each value is (images (N, H, W) uint8 or float, heatmaps (N, h, w) in [0, 1] stretched over the
  image, titles: N strings or None). An empty category gets one row saying so. `totals`: how many
  images each category has in all, where the images given are a sample (row labels "4 of 13").
  """
  blocks = []
  for name, (images, heatmaps, titles) in groups.items():
    images, heatmaps = list(images), list(heatmaps)
    titles = [""] * len(images) if titles is None else list(titles)
    if not len(images) == len(heatmaps) == len(titles):
      raise ValueError(
        f"{name}: {len(images)} images, {len(heatmaps)} heatmaps, {len(titles)} "
        "titles; they must match"
      )
    keep = len(images) if max_per_group is None else min(len(images), max_per_group)
    total = len(images) if totals is None else totals.get(name, len(images))
    blocks.append((name, total, images[:keep], heatmaps[:keep], titles[:keep]))
  n_rows = sum(max(1, math.ceil(len(b[2]) / ncols)) for b in blocks) or 1
  fig = _figure(2.3 * ncols + 1.2, 2.5 * n_rows + 0.6)
  axes = fig.subplots(n_rows, ncols, squeeze=False)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_frame_on(False)
  row, colormap = 0, colormaps[cmap]
  for name, total, images, heatmaps, titles in blocks:
    shown = f"{len(images)} of {total}" if len(images) < total else f"{total}"
    axes[row, 0].set_ylabel(f"{name}\n({shown})", fontsize=10, fontweight="bold")
    if not images:
      axes[row, 0].text(0.05, 0.5, "no images in this category", va="center", fontsize=9)
    for i, (image, heat, text) in enumerate(zip(images, heatmaps, titles, strict=True)):
      ax = axes[row + i // ncols, i % ncols]
      image = _display_image(image)
      extent = (0, image.shape[1], image.shape[0], 0)
      ax.imshow(image, cmap="gray", vmin=0, vmax=1, extent=extent)
      ax.imshow(
        np.clip(np.asarray(heat, dtype=np.float64), 0, 1),
        cmap=colormap,
        vmin=0,
        vmax=1,
        alpha=alpha,
        extent=extent,
        interpolation="bilinear",
      )
      ax.set_title(text, fontsize=8)
    row += max(1, math.ceil(len(images) / ncols))
  if not blocks:
    axes[0, 0].text(0.05, 0.5, "no images", va="center")
  mappable = ScalarMappable(norm=Normalize(0, 1), cmap=colormap)
  fig.colorbar(mappable, ax=axes, shrink=0.6, label="Grad-CAM activation")
  fig.suptitle(title)
  return _save(fig, path)

"""Binary COVID metrics with patient-level confidence intervals, and the operating-point choice.

Labels are 0 = non_covid, 1 = covid (the positive class); `probs` are P(covid). An image is called
positive iff `prob >= threshold`. Point metrics come from scikit-learn; undefined values (e.g.
sensitivity without positives, AUC with one class) are NaN here and None in JSON, with a note.

metrics.json's layout (`evaluate_at_thresholds`; records from `evaluate_predictions`):
docs/evaluation.md. The bootstrap resamples patients with replacement (a patient's images stay
together); the threshold is held fixed, so the intervals do not include the uncertainty of choosing
it. Wilson intervals treat images as independent, true only with one image per patient:
`proportion_ci="auto"` makes Wilson the headline interval of the proportions then, and the patient
bootstrap otherwise (both are always stored). A bootstrapped proportion of all or none (e.g. 0 of 19
external normals called normal) has a zero-width interval; Wilson's interval over the patients
involved replaces it ("wilson_patients", with a note). The bootstrap computes every resample at once
from per-image repeat counts in numpy (sklearn takes 15-40 ms a call); tests check it equals
`compute_metrics` (sklearn) on the same resamples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
from scipy import stats
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning

PROPORTIONS = ("accuracy", "sensitivity", "specificity", "ppv", "npv")
METRICS = (*PROPORTIONS, "f1", "roc_auc", "pr_auc", "brier", "ece")
# name: (label in reports, why it can be undefined).
_INFO = {
  "accuracy": ("Accuracy", ""),
  "sensitivity": ("Sensitivity (COVID recall)", "no COVID images"),
  "specificity": ("Specificity", "no non-COVID images"),
  "ppv": ("PPV (precision)", "no image called COVID"),
  "npv": ("NPV", "no image called non-COVID"),
  "f1": ("F1", "no COVID image, none called COVID"),
  "roc_auc": ("ROC-AUC", "needs both classes"),
  "pr_auc": ("PR-AUC (average precision)", "needs both classes"),
  "brier": ("Brier score (lower is better)", ""),
  "ece": ("ECE (lower is better)", ""),
}
METRIC_LABELS = {name: label for name, (label, _) in _INFO.items()}
# Proportions as (successes, trials) in confusion-matrix cells.
_PROPORTION_CELLS = {
  "accuracy": ("tp tn", "tp tn fp fn"),
  "sensitivity": ("tp", "tp fn"),
  "specificity": ("tn", "tn fp"),
  "ppv": ("tp", "tp fp"),
  "npv": ("tn", "tn fn"),
}


def check_predictions(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
  """(int64 labels, float64 probs); ValueError unless 1-D, same length, 0/1 and in [0, 1]."""
  labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
  if labels.ndim != 1 or labels.shape != probs.shape or labels.size == 0:
    raise ValueError(f"labels {labels.shape} and probs {probs.shape}: need equal, non-empty 1-D")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"labels must be 0 (non_covid) or 1 (covid), got {np.unique(labels)}")
  if not (np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0):
    raise ValueError("probs must be finite probabilities in [0, 1]")
  return labels.astype(np.int64), probs


def calibration_bins(
  labels: Any, probs: Any, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fraction positive, mean prob, count) of each non-empty equal-width bin, as sklearn bins."""
  labels, probs = check_predictions(labels, probs)
  frac_pos, mean_prob = calibration_curve(labels, probs, n_bins=n_bins, pos_label=1)
  # calibration_curve drops empty bins and gives no counts; this is its own binning rule.
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  counts = np.bincount(np.searchsorted(edges[1:-1], probs), minlength=n_bins)
  return frac_pos, mean_prob, counts[counts > 0]


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = 10) -> float:
  """Sum over equal-width bins of (bin share of images) * |fraction positive - mean prob|."""
  frac_pos, mean_prob, counts = calibration_bins(labels, probs, n_bins)
  return float(np.sum(counts / counts.sum() * np.abs(frac_pos - mean_prob)))


def compute_metrics(labels: Any, probs: Any, threshold: float, n_bins: int = 10) -> dict[str, Any]:
  """METRICS (floats, NaN where undefined) and "confusion_matrix" [[tn, fp], [fn, tp]]."""
  labels, probs = check_predictions(labels, probs)
  preds = (probs >= threshold).astype(np.int64)
  nan = np.nan
  both_classes = 0 < labels.sum() < labels.size
  out = {
    "accuracy": skm.accuracy_score(labels, preds),
    "sensitivity": skm.recall_score(labels, preds, pos_label=1, zero_division=nan),
    "specificity": skm.recall_score(labels, preds, pos_label=0, zero_division=nan),
    "ppv": skm.precision_score(labels, preds, pos_label=1, zero_division=nan),
    "npv": skm.precision_score(labels, preds, pos_label=0, zero_division=nan),
    "f1": skm.f1_score(labels, preds, pos_label=1, zero_division=nan),
    "roc_auc": skm.roc_auc_score(labels, probs) if both_classes else nan,
    "pr_auc": skm.average_precision_score(labels, probs, pos_label=1) if both_classes else nan,
    "brier": skm.brier_score_loss(labels, probs, pos_label=1, labels=[0, 1]),
    "ece": expected_calibration_error(labels, probs, n_bins),
  }
  out = {k: float(v) for k, v in out.items()}
  out["confusion_matrix"] = skm.confusion_matrix(labels, preds, labels=[0, 1]).tolist()
  return out


def choose_threshold(labels: Any, probs: Any, target_sensitivity: float = 0.95) -> float:
  """The highest threshold whose sensitivity on (validation) `labels` is >= the target.

  Candidates are sklearn's roc_curve thresholds without dropping any, i.e. every distinct score, so
  tied probabilities are all called positive or all negative together; the result is itself a score,
  the largest one that still reaches the target. If only the lowest score reaches it, that score is
  returned (possibly 0.0) and every image is called positive, with a warning. roc_curve's leading
  +inf threshold has sensitivity 0 and is never picked for a target > 0; were it picked it would be
  clamped to the float just above 1.0.
  """
  labels, probs = check_predictions(labels, probs)
  if not 0.0 < target_sensitivity <= 1.0:
    raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
  if labels.sum() == 0:
    raise ValueError("no COVID (label 1) examples: cannot choose a threshold for a sensitivity")
  with warnings.catch_warnings():  # No negatives: fpr is undefined, tpr is all we use.
    warnings.simplefilter("ignore", UndefinedMetricWarning)
    _, tpr, thresholds = skm.roc_curve(labels, probs, pos_label=1, drop_intermediate=False)
  threshold = float(thresholds[int(np.argmax(tpr >= target_sensitivity))])
  if not math.isfinite(threshold):
    threshold = float(np.nextafter(1.0, 2.0))
  if threshold <= probs.min() and (labels == 0).any():
    warnings.warn(
      f"sensitivity {target_sensitivity} is reached only at the lowest score {threshold}: "
      "every image is called COVID (specificity 0)",
      stacklevel=2,
    )
  return threshold


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (no continuity correction); NaNs if n == 0."""
  if n <= 0:
    return (math.nan, math.nan)
  ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
  return (float(ci.low), float(ci.high))


def _patient_of_image(patient_ids: Any, n_images: int) -> tuple[np.ndarray, int]:
  """(patient index of each image, number of patients); ids compare as text, bytes decoded."""
  ids = np.asarray(patient_ids)
  if ids.shape != (n_images,) or n_images == 0:
    raise ValueError(f"patient_ids has shape {ids.shape}, expected ({n_images},) with n > 0")
  ids = np.array([i.decode() if isinstance(i, bytes) else str(i) for i in ids.tolist()], dtype=str)
  if blank := int((np.char.strip(ids) == "").sum()):
    raise ValueError(
      f"{blank} images have an empty patient_id; they would be resampled as one patient. "
      "Give images of unknown patients unique ids (e.g. the filename)."
    )
  _, inverse = np.unique(ids, return_inverse=True)
  return inverse, int(inverse.max()) + 1


def _patient_draws(n_patients: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
  """Per resample, how many times each patient is drawn (n_patients draws with replacement)."""
  rng = np.random.default_rng(seed)
  for _ in range(n_resamples):
    yield np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)


def patient_bootstrap_indices(
  patient_ids: Any, n_resamples: int = 1000, seed: int = 0
) -> Iterator[np.ndarray]:
  """Image indices of each resample: patients drawn with replacement, each with all its images.

  A patient drawn k times contributes each of its images k times; image order is irrelevant.
  `bootstrap_distribution` with the same seed evaluates exactly these resamples.
  """
  patient_of_image, n_patients = _patient_of_image(patient_ids, len(patient_ids))
  images = np.arange(patient_of_image.size)
  for draws in _patient_draws(n_patients, n_resamples, seed):
    yield np.repeat(images, draws[patient_of_image])


def _weighted_metrics(
  labels: np.ndarray, probs: np.ndarray, weights: np.ndarray, threshold: float, n_bins: int
) -> dict[str, np.ndarray]:
  """METRICS on each row r of `weights` (R, N), image i repeated weights[r, i] times.

  The same quantities as `compute_metrics` (tests pin the two together on real resamples), but for
  all resamples at once: sklearn costs 15-40 ms a call, too slow for thousands of resamples.
  """
  y, pred = labels.astype(np.float64), (probs >= threshold).astype(np.float64)
  n = weights.sum(1)
  tp, fp, fn = weights @ (y * pred), weights @ ((1 - y) * pred), weights @ (y * (1 - pred))
  tn = n - tp - fp - fn
  # Equal-width bins exactly as sklearn's calibration_curve; ECE = sum_b |sum_b (y - p)| / n.
  bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], probs)
  ece = np.abs(weights @ (np.eye(n_bins)[bins] * (y - probs)[:, None])).sum(1) / n
  # Ranking metrics over the distinct scores, highest first; ties form one group.
  order = np.argsort(-probs, kind="stable")
  starts = np.flatnonzero(np.r_[True, np.diff(probs[order]) != 0])
  w = weights[:, order]
  wpos = np.add.reduceat(w * y[order], starts, axis=1)
  wneg = np.add.reduceat(w * (1 - y[order]), starts, axis=1)
  cum_pos, cum_neg = np.cumsum(wpos, 1), np.cumsum(wneg, 1)
  n_pos, n_neg = cum_pos[:, -1], cum_neg[:, -1]
  with np.errstate(divide="ignore", invalid="ignore"):
    # AUC: each positive beats the negatives scored strictly lower, half credit for ties.
    auc = (wpos * (n_neg[:, None] - cum_neg + 0.5 * wneg)).sum(1) / (n_pos * n_neg)
    # Average precision: sum over thresholds of (recall gained) * (precision there).
    precision = np.where(wpos > 0, cum_pos / np.maximum(cum_pos + cum_neg, 1e-300), 0.0)
    ap = (wpos * precision).sum(1) / n_pos
    both = (n_pos > 0) & (n_neg > 0)
    return {
      "accuracy": (tp + tn) / n,
      "sensitivity": tp / (tp + fn),
      "specificity": tn / (tn + fp),
      "ppv": tp / (tp + fp),
      "npv": tn / (tn + fn),
      "f1": 2 * tp / (2 * tp + fp + fn),
      "roc_auc": np.where(both, auc, np.nan),
      "pr_auc": np.where(both, ap, np.nan),
      "brier": weights @ (probs - y) ** 2 / n,
      "ece": ece,
    }


def bootstrap_distribution(
  labels: Any,
  probs: Any,
  patient_ids: Any,
  threshold: float,
  n_resamples: int = 1000,
  seed: int = 0,
  n_bins: int = 10,
) -> dict[str, np.ndarray]:
  """Each metric on each patient resample, shape (n_resamples,); NaN where undefined."""
  labels, probs = check_predictions(labels, probs)
  patient_of_image, n_patients = _patient_of_image(patient_ids, labels.size)
  chunk = max(1, 2_000_000 // labels.size)  # Resamples per block: bounds memory at ~16 MB a copy.
  draws = _patient_draws(n_patients, n_resamples, seed)
  parts = [{name: np.empty(0) for name in METRICS}]
  for start in range(0, n_resamples, chunk):
    block = np.stack([next(draws) for _ in range(min(chunk, n_resamples - start))])
    weights = block[:, patient_of_image].astype(np.float64)
    parts.append(_weighted_metrics(labels, probs, weights, threshold, n_bins))
  return {name: np.concatenate([p[name] for p in parts]) for name in METRICS}


class BootstrapInterval(NamedTuple):
  low: float  # NaN when no resample gave a value.
  high: float
  n_valid: int  # Resamples on which the metric was defined.


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> BootstrapInterval:
  """Percentile interval over the non-NaN samples."""
  valid = np.asarray(samples, dtype=np.float64)
  valid = valid[~np.isnan(valid)]
  if valid.size == 0:
    return BootstrapInterval(math.nan, math.nan, 0)
  low, high = np.quantile(valid, [0.5 - confidence / 2, 0.5 + confidence / 2])
  return BootstrapInterval(float(low), float(high), int(valid.size))


def bootstrap_ci(
  labels: Any,
  probs: Any,
  patient_ids: Any,
  threshold: float,
  n_resamples: int = 1000,
  seed: int = 0,
  confidence: float = 0.95,
  n_bins: int = 10,
) -> dict[str, BootstrapInterval]:
  """Patient-bootstrap percentile interval per metric, skipping resamples where it is undefined."""
  dist = bootstrap_distribution(labels, probs, patient_ids, threshold, n_resamples, seed, n_bins)
  return {name: percentile_interval(samples, confidence) for name, samples in dist.items()}


def _json_float(x: float) -> float | None:
  return None if x is None or math.isnan(x) else float(x)


def _proportion_interval(
  name: str,
  rec: dict[str, Any],
  cm: Mapping[str, int],
  cell_of_image: Mapping[str, np.ndarray],
  patient_of_image: np.ndarray,
  proportion_ci: str,
  confidence: float,
) -> str | None:
  """Adds Wilson's interval to the proportion `name`'s record, and makes it the interval where
  `proportion_ci` says so, or where the proportion is all or none (the bootstrap interval then has
  zero width: Wilson over the patients involved instead, each counted once). Returns a note for
  the latter."""
  hits, cells = (sum(cm[c] for c in s.split()) for s in _PROPORTION_CELLS[name])
  wilson = [_json_float(x) for x in wilson_interval(hits, cells, confidence)]
  rec.update(wilson_ci=wilson, successes=hits, trials=cells)
  if proportion_ci == "wilson":
    rec.update(ci_low=wilson[0], ci_high=wilson[1], ci_method="wilson")
    return None
  if not cells or hits not in (0, cells):
    return None
  in_cells = np.any([cell_of_image[c] for c in _PROPORTION_CELLS[name][1].split()], axis=0)
  k = len(np.unique(patient_of_image[in_cells]))
  low, high = wilson_interval(k if hits else 0, k, confidence)
  rec.update(ci_low=_json_float(low), ci_high=_json_float(high), ci_method="wilson_patients")
  return (
    f"{name}: {hits} of {cells} images, so the patient bootstrap interval has zero width; "
    f"the interval is Wilson's over the {k} patient{'s' * (k != 1)} involved."
  )


def evaluate_predictions(
  labels: Any,
  probs: Any,
  patient_ids: Any,
  threshold: float,
  n_resamples: int = 1000,
  seed: int = 0,
  confidence: float = 0.95,
  n_bins: int = 10,
  proportion_ci: str = "auto",
) -> dict[str, Any]:
  """One RECORD (module docstring). `proportion_ci`: "auto", "wilson" or "patient_bootstrap"."""
  if proportion_ci not in ("auto", "wilson", "patient_bootstrap"):
    raise ValueError(f"proportion_ci must be auto, wilson or patient_bootstrap: {proportion_ci!r}")
  labels, probs = check_predictions(labels, probs)
  n_images, n_patients = labels.size, _patient_of_image(patient_ids, labels.size)[1]
  point = compute_metrics(labels, probs, threshold, n_bins)
  cm = dict(
    zip(("tn", "fp", "fn", "tp"), map(int, np.ravel(point["confusion_matrix"])), strict=True)
  )
  boot = bootstrap_ci(labels, probs, patient_ids, threshold, n_resamples, seed, confidence, n_bins)
  patient_of_image = _patient_of_image(patient_ids, n_images)[0]
  preds = probs >= threshold
  cell_of_image = {
    "tp": (labels == 1) & preds,
    "fn": (labels == 1) & ~preds,
    "tn": (labels == 0) & ~preds,
    "fp": (labels == 0) & preds,
  }
  if proportion_ci == "auto":
    proportion_ci = "wilson" if n_patients == n_images else "patient_bootstrap"
  notes = [f"{n_images} images from {n_patients} patients."] if n_patients < n_images else []
  records = {}
  for name in METRICS:
    b, value = boot[name], _json_float(point[name])
    lo, hi = _json_float(b.low), _json_float(b.high)
    rec = {"value": value, "ci_low": lo, "ci_high": hi, "ci_method": "patient_bootstrap"}
    rec.update(bootstrap_ci=[lo, hi], n_valid_resamples=b.n_valid)
    if name in PROPORTIONS:
      note = _proportion_interval(
        name, rec, cm, cell_of_image, patient_of_image, proportion_ci, confidence
      )
      notes += [note] if note else []
    problems = [f"undefined here ({_INFO[name][1]})"] if value is None else []
    if b.n_valid < n_resamples:
      problems.append(f"defined on {b.n_valid} of {n_resamples} resamples")
    if problems:
      rec["note"] = "; ".join(problems)
      notes.append(f"{name}: {rec['note']}.")
    records[name] = rec
  n_pos = int(labels.sum())
  return {
    "threshold": float(threshold),
    "confidence": confidence,
    "ece_bins": n_bins,
    "counts": {
      "n_images": n_images,
      "n_patients": n_patients,
      "n_positive": n_pos,
      "n_negative": n_images - n_pos,
    },
    "confusion_matrix": cm,
    "bootstrap": {"unit": "patient", "n_resamples": n_resamples, "seed": seed},
    "metrics": records,
    "notes": notes,
  }


def evaluate_at_thresholds(
  labels: Any,
  probs: Any,
  patient_ids: Any,
  val_threshold: float,
  target_sensitivity: float | None = None,
  **kwargs: Any,
) -> dict[str, Any]:
  """The metrics.json structure: records at the validation-chosen threshold and at 0.5.

  `kwargs` go to `evaluate_predictions` (n_resamples, seed, confidence, n_bins, proportion_ci).
  """
  return {
    "target_sensitivity": target_sensitivity,
    "threshold_val": evaluate_predictions(labels, probs, patient_ids, val_threshold, **kwargs),
    "threshold_0.5": evaluate_predictions(labels, probs, patient_ids, 0.5, **kwargs),
  }


def threshold_records(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
  """The RECORDs of a metrics.json dict, by key ("threshold_val", "threshold_0.5")."""
  return {k: v for k, v in results.items() if k.startswith("threshold_") and isinstance(v, Mapping)}

"""An evaluation's files: the Markdown report of a metrics.json dict
(`metrics.evaluate_at_thresholds`: metrics with their confidence intervals per threshold, and the
confusion counts) and predictions.csv (one row per image)."""

import contextlib
import csv
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from covid_flax.metrics import METRIC_LABELS, METRICS, threshold_records

PREDICTION_COLUMNS = ("filename", "patient_id", "label", "probability")


# An evaluation's outputs live in `<workdir>/eval/<name>-<tag>/` (name: a split, "images-<dir>",
# "cv"; tag: a step, "ensemble<k>-<hash>", "latest", with "-tta" for test-time flips). These two
# functions are the one place that knows it; every reader and writer goes through them.
EVAL_DIR = "eval"


def eval_dir(workdir: str | os.PathLike, name: str, tag: str | int) -> str:
  """Where the evaluation `name` of checkpoint (or ensemble, or cross-validation) `tag` goes."""
  return os.path.join(workdir, EVAL_DIR, f"{name}-{tag}")


def latest_eval_dir(workdir: str | os.PathLike, split: str) -> Path:
  """`eval_dir(workdir, split, step)` with the highest step that has a metrics.json."""
  eval_root = Path(workdir) / EVAL_DIR
  pattern = re.compile(rf"{re.escape(split)}-(\d+)")
  dirs = sorted(eval_root.iterdir()) if eval_root.is_dir() else []
  found = [
    (int(m.group(1)), d)
    for d in dirs
    if (m := pattern.fullmatch(d.name)) and (d / "metrics.json").is_file()
  ]
  if not found:
    raise FileNotFoundError(
      f"no evaluation results in {eval_root}: expected {eval_root}/{split}-<step>/metrics.json "
      "(run the evaluation first, or pick another --split)"
    )
  return max(found)[1]


def write_predictions(
  path: str | os.PathLike,
  filenames: Sequence[str],
  patient_ids: Sequence[str],
  labels: Sequence[int],
  probs: Sequence[float],
  attributes: Mapping[str, Sequence[str]] | None = None,
) -> None:
  """PREDICTION_COLUMNS, then one column per attribute (source, view, ...)."""
  attributes = attributes or {}
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([*PREDICTION_COLUMNS, *attributes])
    columns = zip(filenames, patient_ids, labels, probs, *attributes.values(), strict=True)
    for name, patient, label, p, *extra in columns:
      writer.writerow([name, patient, int(label), repr(float(p)), *extra])


@contextlib.contextmanager
def atomic_dir(out_dir: str) -> Iterator[str]:
  """A fresh temporary folder beside `out_dir` that replaces `out_dir` when the block completes:
  readers never see half an output, and a failure leaves the previous one."""
  tmp = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_results(
  folder: str,
  results: Mapping[str, Any],
  filenames: Sequence[str],
  patient_ids: Sequence[str],
  labels: Sequence[int],
  probs: Sequence[float],
  attributes: Mapping[str, Sequence[str]] | None = None,
) -> None:
  """folder/metrics.json (`results`) and folder/predictions.csv."""
  with open(os.path.join(folder, "metrics.json"), "w") as f:
    json.dump(results, f, indent=2, allow_nan=False)
  write_predictions(
    os.path.join(folder, "predictions.csv"), filenames, patient_ids, labels, probs, attributes
  )


def read_predictions(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels, probs, patient_ids) of a predictions.csv; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing (written by the evaluation with metrics.json)")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = set(PREDICTION_COLUMNS) - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{path}: missing columns {sorted(missing)}")
    rows = list(reader)
  try:
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    probs = np.array([float(r["probability"]) for r in rows], dtype=np.float64)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return labels, probs, np.array([r["patient_id"] for r in rows], dtype=object)


def read_filenames(path: str | os.PathLike) -> list[str]:
  """The `filename` column of a predictions.csv that `read_predictions` has accepted."""
  with open(path, newline="") as f:
    return [row["filename"] for row in csv.DictReader(f)]


def format_value(rec: Mapping[str, Any], digits: int = 3) -> str:
  """'0.912 [0.871, 0.945]' from a metric record; 'n/a' for undefined values."""
  if rec.get("value") is None:
    return "n/a"
  text = f"{rec['value']:.{digits}f}"
  if rec.get("ci_low") is not None and rec.get("ci_high") is not None:
    text += f" [{rec['ci_low']:.{digits}f}, {rec['ci_high']:.{digits}f}]"
  return text


_CONFUSION_ROWS = (
  ("tp", "COVID called COVID (TP)"),
  ("fn", "COVID missed (FN)"),
  ("tn", "non-COVID called non-COVID (TN)"),
  ("fp", "non-COVID called COVID (FP)"),
)


def markdown_report(results: Mapping[str, Any], title: str = "Evaluation") -> str:
  """Markdown of a metrics.json dict (or one RECORD): metrics with CIs per threshold, counts."""
  records = list(({"": results} if "metrics" in results else threshold_records(results)).items())
  if not records:
    raise ValueError("no RECORD found (expected 'threshold_*' keys or a 'metrics' key)")
  first = records[0][1]
  c, b = first["counts"], first["bootstrap"]
  summary = (
    f"{c['n_images']} images ({c['n_positive']} COVID, {c['n_negative']} non-COVID) "
    f"from {c['n_patients']} patients."
  )
  if results.get("target_sensitivity") is not None:
    summary += (
      f" Val threshold: the highest with val sensitivity >= {results['target_sensitivity']}."
    )
  heads = [f"threshold {r['threshold']:.4g}{' (val)' * (k == 'threshold_val')}" for k, r in records]
  lines = [f"# {title}", "", summary, "", f"| Metric | {' | '.join(heads)} |"]
  lines.append("|---" * (len(heads) + 1) + "|")
  rows = [(METRIC_LABELS[n], [format_value(r["metrics"][n]) for _, r in records]) for n in METRICS]
  rows += [
    (f"Count: {t}", [str(r["confusion_matrix"][c]) for _, r in records]) for c, t in _CONFUSION_ROWS
  ]
  lines += [f"| {name} | {' | '.join(cells)} |" for name, cells in rows]
  methods = {m["ci_method"] for _, r in records for m in r["metrics"].values()}
  lines.append(
    f"\nIn brackets: {round(100 * first['confidence'])} % confidence intervals "
    f"({', '.join(sorted(methods))}); the patient bootstrap draws {b['n_resamples']} resamples "
    f"of patients (seed {b['seed']}) with all their images."
  )
  # A note every column shares is said once; the others say which column (threshold) they are of.
  shared = set.intersection(*(set(r.get("notes", [])) for _, r in records))
  notes = sorted(shared) + [
    f"{head}: {n}" for head, (_, r) in zip(heads, records) for n in r.get("notes", [])
    if n not in shared
  ]  # fmt: skip
  return "\n".join(lines + (["", "Notes:", ""] + [f"- {n}" for n in notes] if notes else [])) + "\n"

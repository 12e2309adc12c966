"""How well an evaluated model separates the classes within each image source: a shortcut check.

  python -m covid_flax.by_source runs/ct/eval/test-741 [--source_regex='^([a-z]+)_']
  python -m covid_flax.by_source runs/ct/eval/test-741 --images_root=DATA/COVID-CT/Images-processed

Reads `predictions.csv` and `metrics.json` of one evaluation. An image's source is the first group
of `--source_regex` matched against its patient id; by default the id without its trailing number
(COVID-CT: "medpix_patient_2" -> "medpix_patient", "crawled_patient_7" -> "crawled_patient",
"Patient 167" -> "Patient"). For each source of one class it prints the ROC-AUC of that source
against *all* images of the other class, with a patient-bootstrap 95 % interval, and the share of
its images called COVID at the val threshold (at 0.5 where the evaluation has none, as in
cross-validation). A model that detects the disease separates the classes about equally well
whatever the source; one that detects the source does not. With `--images_root` (the folder the
predictions' file names are relative to) the groups are the images' file formats instead, read
from their content (COVID-CT: all COVID files are named .png, but 34 hold JPEG data).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.metrics import roc_auc_score

from covid_flax import metrics as metrics_lib
from covid_flax import report
from covid_flax.datasets.common import LABEL_NAMES

_DEFAULT_REGEX = r"^(.*?)[\s_-]*\d*$"


def source_of(patient_id: str, source_regex: str = _DEFAULT_REGEX) -> str:
  """The source named by a patient id (see the module docstring); '?' if the regex misses."""
  match = re.search(source_regex, patient_id)
  return (match.group(1) if match and match.groups() else "") or "?"


def format_of(path: Path) -> str:
  """The image file's format by content ('jpeg', 'png', ...), whatever its name says."""
  try:
    with Image.open(path) as image:
      return image.format.lower()
  except (OSError, UnidentifiedImageError) as e:
    raise ValueError(
      f"{path}: cannot read the image's format ({e}); is --images_root right?"
    ) from e


def by_source(
  eval_dir: str | Path,
  source_regex: str = _DEFAULT_REGEX,
  n_resamples: int = 1000,
  images_root: str | Path | None = None,
) -> list[dict]:
  """One row per (class, source): n, share called COVID at the val threshold (0.5 without one),
  ROC-AUC against all images of the other class with its patient-bootstrap interval. The sources
  are the images' formats when `images_root` is given."""
  try:
    groups = re.compile(source_regex).groups
  except re.error as e:
    raise ValueError(f"--source_regex={source_regex!r} is not a regular expression: {e}") from e
  if groups < 1:
    raise ValueError(f"--source_regex={source_regex!r} needs a group, (...), naming the source")
  eval_dir = Path(eval_dir)
  labels, probs, pids = report.read_predictions(eval_dir / "predictions.csv")
  with open(eval_dir / "metrics.json") as f:
    results = json.load(f)
  record = results.get("threshold_val") or results.get("threshold_0.5")
  if record is None:
    raise ValueError(
      f"{eval_dir / 'metrics.json'} has no 'threshold_val' or 'threshold_0.5' record"
    )
  threshold = record["threshold"]
  if images_root is None:
    sources = np.array([source_of(str(p), source_regex) for p in pids])
  else:
    names = report.read_filenames(eval_dir / "predictions.csv")
    sources = np.array([format_of(Path(images_root) / name) for name in names])
  rows = []
  for label in (1, 0):
    for source in sorted(set(sources[labels == label])):
      keep = (labels != label) | (sources == source)
      mine = keep & (labels == label)
      y, p = labels[keep], probs[keep]
      ci = metrics_lib.bootstrap_ci(y, p, pids[keep], threshold, n_resamples)["roc_auc"]
      rows.append({
        "class": LABEL_NAMES[label],
        "source": source,
        "n_images": int(mine.sum()),
        "threshold": threshold,
        "called_covid": float(np.mean(probs[mine] >= threshold)),
        "roc_auc_vs_other_class": float(roc_auc_score(y, p)),
        "roc_auc_ci": [ci.low, ci.high],
      })  # fmt: skip
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("eval_dir", help="an evaluation folder: workdir/eval/<split>-<step>")
  parser.add_argument("--source_regex", default=_DEFAULT_REGEX,
                      help="regex over patient ids whose first group names the source")  # fmt: skip
  parser.add_argument("--images_root", default=None,
                      help="group by file format instead, reading the images under this folder")  # fmt: skip
  parser.add_argument("--n_resamples", type=int, default=1000)
  args = parser.parse_args(argv)
  try:
    rows = by_source(args.eval_dir, args.source_regex, args.n_resamples, args.images_root)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  group = "source" if args.images_root is None else "format"
  threshold = f"{rows[0]['threshold']:.3g}" if rows else "n/a"
  print(f"| class | {group} | images | called COVID (threshold {threshold}) | "
        "ROC-AUC vs the other class |")  # fmt: skip
  print("|---|---|---|---|---|")
  for r in rows:
    lo, hi = r["roc_auc_ci"]
    print(f"| {r['class']} | {r['source']} | {r['n_images']} | {r['called_covid']:.3f} | "
          f"{r['roc_auc_vs_other_class']:.3f} [{lo:.3f}, {hi:.3f}] |")  # fmt: skip
  return 0


if __name__ == "__main__":
  sys.exit(main())

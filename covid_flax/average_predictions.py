"""The ensemble of runs that are only predictions: average their probabilities, score the average.

  python -m covid_flax.average_predictions runs/cv_s0/eval/cv-latest runs/cv_s1/eval/cv-latest \
      --output=runs/cv_ensemble

For evaluation folders without checkpoints behind them, chiefly cross-validations (seeds or recipes
on the same folds): what an ensemble would score, measured without the test split. Runs with
checkpoints use `covid_flax.evaluate --ensemble` instead, which also carries a val-chosen threshold.
Each folder's predictions.csv must score the same images (filename, patient and label); the output
folder gets predictions.csv, metrics.json at threshold 0.5 (a mean of probabilities has no val
threshold of its own) and report.md, so `covid_flax.compare` and `covid_flax.by_source` read it like
any evaluation. It is written whole or not at all.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covid_flax import metrics, report


def read_scored_images(eval_dir: Path) -> dict[str, tuple[str, int, float]]:
  """filename -> (patient_id, label, probability) of `eval_dir/predictions.csv`."""
  path = eval_dir / "predictions.csv"
  labels, probs, patient_ids = report.read_predictions(path)  # Checks the file and its columns.
  filenames = report.read_filenames(path)
  scored = dict(zip(filenames, zip(patient_ids, labels.tolist(), probs.tolist())))
  if len(scored) != len(filenames):
    raise ValueError(f"{path}: a filename appears more than once")
  return scored


def average_predictions(
  eval_dirs: Sequence[str | Path], output_dir: str | Path, n_resamples: int = 1000
) -> dict[str, Any]:
  """Writes output_dir/{predictions.csv, metrics.json, report.md}; returns metrics.json's dict."""
  if len(eval_dirs) < 2:
    raise ValueError(f"average at least two evaluation folders, got {len(eval_dirs)}")
  runs = [read_scored_images(Path(d)) for d in eval_dirs]
  first = runs[0]
  for d, run in zip(eval_dirs[1:], runs[1:], strict=True):
    if run.keys() != first.keys():
      extra, missing = sorted(run.keys() - first.keys()), sorted(first.keys() - run.keys())
      raise ValueError(
        f"{d} scored other images than {eval_dirs[0]}: {len(extra)} not there "
        f"({extra[:3]}), {len(missing)} missing ({missing[:3]})"
      )
    for name, (patient, label, _) in run.items():
      if (patient, label) != first[name][:2]:
        raise ValueError(
          f"{d}: {name} has patient {patient!r}, label {label}; {eval_dirs[0]} has "
          f"patient {first[name][0]!r}, label {first[name][1]}"
        )
  filenames = sorted(first)
  patient_ids = np.array([first[f][0] for f in filenames], dtype=object)
  labels = np.array([first[f][1] for f in filenames], dtype=np.int64)
  probs = np.mean([[run[f][2] for f in filenames] for run in runs], axis=0)
  results = {
    "target_sensitivity": None,
    "threshold_0.5": metrics.evaluate_predictions(
      labels, probs, patient_ids, 0.5, n_resamples=n_resamples
    ),
    "split": f"average{len(runs)}",
    "members": [str(d) for d in eval_dirs],
  }
  output_dir = Path(output_dir)
  output_dir.parent.mkdir(parents=True, exist_ok=True)
  with report.atomic_dir(str(output_dir)) as tmp:
    report.write_results(tmp, results, filenames, patient_ids, labels, probs)
    members = "\n".join(f"- `{d}`" for d in eval_dirs)
    title = f"Mean probability of {len(runs)} runs"
    text = f"{report.markdown_report(results, title=title)}\nMembers:\n\n{members}\n"
    (Path(tmp) / "report.md").write_text(text)
  return results


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("eval_dirs", nargs="+", help="evaluation folders with predictions.csv")
  parser.add_argument("--output", required=True, help="the folder to write")
  parser.add_argument("--n_resamples", type=int, default=1000, help="patient-bootstrap resamples")
  args = parser.parse_args(argv)
  average_predictions(args.eval_dirs, args.output, args.n_resamples)
  print((Path(args.output) / "report.md").read_text())


if __name__ == "__main__":
  main()

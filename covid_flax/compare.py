"""Compare two runs (e.g. CXR and CT): one Markdown table and both ROC curves on one figure.

  python -m covid_flax.compare runs/cxr runs/ct [--output=DIR] [--split=test] [--names=CXR,CT]
  python -m covid_flax.compare runs/a/eval/cv-latest runs/b/eval/cv-latest --threshold=threshold_0.5

From each workdir it reads the latest `eval/<split>-<step>/metrics.json` and `predictions.csv`
(columns filename, patient_id, label, probability), or those of an evaluation folder given directly
(an ensemble's, a cross-validation's), and, if present, the workdir's `train_summary.json`
({"train_time_s", "num_train_examples", ...}). It writes to DIR (default: `comparison/` next to the
first workdir) `comparison.md`, `comparison.json` and `roc_comparison.png`.

For each metric the table gives both values with their intervals from metrics.json, the difference
(first minus second), a patient-bootstrap interval of that difference and whether the two intervals
overlap. When both runs scored the same patients (two recipes on one test split or on the same
cross-validation folds) the difference is bootstrapped paired, both runs on each resample of
patients, which removes the test set's own variation from it; otherwise (CXR vs CT) each set is
resampled on its own. Overlapping intervals do not show that the runs are equal; an interval of the
difference that excludes 0 is the better evidence of a difference.

  python -m covid_flax.compare A_seed0,A_seed1,A_fold0 B_seed0,B_seed1,B_fold0 --output=DIR

With comma-separated lists, the runs are paired in order (A_i with B_i: the seeds or folds of two
recipes, every run on the same images) and DIR gets `pooled.md` and `pooled.json`: each pair's
difference and their mean, with an interval from one patient bootstrap shared by every run, so a
patient's luck counts once rather than once a pair. Single-seed differences on a small external
set often spread wider than the effect sought; their pooled mean is the estimate to quote.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from covid_flax import metrics as metrics_lib
from covid_flax import plots, report

LOWER_IS_BETTER = ("brier", "ece")


class Run(NamedTuple):
  name: str
  workdir: Path
  eval_dir: Path
  results: dict[str, Any]  # metrics.json
  labels: np.ndarray
  probs: np.ndarray
  patient_ids: np.ndarray
  train_summary: dict[str, Any] | None


def load_run(path: str | Path, split: str = "test", name: str | None = None) -> Run:
  """A workdir's latest evaluation of `split`, or the evaluation folder `path` itself."""
  path = Path(path)
  if (path / "metrics.json").is_file():  # workdir/eval/<name>: its workdir is two levels up.
    in_workdir = path.parent.name == report.EVAL_DIR
    eval_dir, workdir = path, path.parent.parent if in_workdir else path
    # A folder kept on its own (results/...) is named once, not "x/x".
    name = name or (f"{workdir.resolve().name}/{path.name}" if in_workdir else path.resolve().name)
  else:
    workdir, eval_dir = path, report.latest_eval_dir(path, split)
  with open(eval_dir / "metrics.json") as f:
    results = json.load(f)
  if not metrics_lib.threshold_records(results):
    raise ValueError(f"{eval_dir / 'metrics.json'} has no 'threshold_*' records")
  labels, probs, patient_ids = report.read_predictions(eval_dir / "predictions.csv")
  summary_path = workdir / "train_summary.json"
  summary = None
  if summary_path.is_file():
    with open(summary_path) as f:
      summary = json.load(f)
  return Run(
    name or workdir.resolve().name, workdir, eval_dir, results, labels, probs, patient_ids, summary
  )


def same_patients(a: Run, b: Run) -> bool:
  """Whether both runs scored the same images: the same patients, each with the same labels."""
  pairs = [sorted(zip(r.patient_ids.tolist(), r.labels.tolist(), strict=True)) for r in (a, b)]
  return pairs[0] == pairs[1]


def intervals_overlap(a: Sequence[float | None], b: Sequence[float | None]) -> bool | None:
  """Whether closed intervals a and b share a point; None if either is missing."""
  if None in (*a, *b):
    return None
  return a[0] <= b[1] and b[0] <= a[1]


def _duration(seconds: Any) -> str:
  if not isinstance(seconds, int | float):
    return "unknown"
  s = round(seconds)
  return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s ({seconds:.0f} s)"


def _fmt(x: float | None, digits: int = 3, sign: bool = False) -> str:
  return "n/a" if x is None else f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def compare_runs(
  workdirs: Sequence[str | Path],
  output_dir: str | Path,
  names: Sequence[str] | None = None,
  split: str = "test",
  threshold_key: str = "threshold_val",
  n_resamples: int = 1000,
  seed: int = 0,
) -> dict[str, Any]:
  """Writes comparison.md, comparison.json and roc_comparison.png; returns comparison.json's dict.

  Its "metrics" map each metric name to {"values": [a, b], "cis": [[lo, hi], [lo, hi]],
  "difference", "difference_ci", "intervals_overlap", "better"}.
  """
  if len(workdirs) != 2:
    raise ValueError(f"compare exactly two workdirs, got {len(workdirs)}")
  names = list(names) if names else [None, None]
  if len(names) != 2:
    raise ValueError(f"give two names, one per workdir, got {names}")
  runs = [load_run(w, split, n) for w, n in zip(workdirs, names, strict=True)]
  if runs[0].name == runs[1].name:
    runs = [r._replace(name=f"{r.name} ({r.workdir})") for r in runs]
  a, b = runs
  split = a.results.get("split") or split  # An evaluation folder given directly says its own.
  records = []
  for run in runs:
    if threshold_key not in run.results:
      raise ValueError(f"{run.eval_dir / 'metrics.json'} has no {threshold_key!r} record")
    records.append(run.results[threshold_key])
  paired = same_patients(a, b)
  dists = [  # The same seed draws the same patients when both runs have the same ones.
    metrics_lib.bootstrap_distribution(
      run.labels, run.probs, run.patient_ids, rec["threshold"], n_resamples, seed + i * (not paired)
    )
    for i, (run, rec) in enumerate(zip(runs, records, strict=True))
  ]
  out_metrics = {}
  for name in metrics_lib.METRICS:
    m = [rec["metrics"][name] for rec in records]
    values = [r["value"] for r in m]
    cis = [[r["ci_low"], r["ci_high"]] for r in m]
    diff = None if None in values else values[0] - values[1]
    d = metrics_lib.percentile_interval(dists[0][name] - dists[1][name])
    diff_ci = [None if np.isnan(d.low) else d.low, None if np.isnan(d.high) else d.high]
    better = "no clear difference"
    if diff is not None and None not in diff_ci and (diff_ci[0] > 0 or diff_ci[1] < 0):
      first_higher = diff_ci[0] > 0
      better = runs[0 if first_higher != (name in LOWER_IS_BETTER) else 1].name
    out_metrics[name] = {
      "values": values,
      "cis": cis,
      "ci_methods": [r["ci_method"] for r in m],
      "difference": diff,
      "difference_ci": diff_ci,
      "difference_n_valid": d.n_valid,
      "intervals_overlap": intervals_overlap(*cis),
      "better": better,
    }
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  curves = {r.name: plots.curve_from_results(r.labels, r.probs, r.results) for r in runs}
  plots.plot_roc(curves, output_dir / "roc_comparison.png", f"ROC on {split}: {a.name} vs {b.name}")
  comparison = {
    "runs": [
      {
        "name": r.name,
        "workdir": str(r.workdir),
        "eval_dir": str(r.eval_dir),
        "threshold": rec["threshold"],
        "counts": rec["counts"],
        "train_time_s": (r.train_summary or {}).get("train_time_s"),
        "num_train_examples": (r.train_summary or {}).get("num_train_examples"),
      }
      for r, rec in zip(runs, records, strict=True)
    ],
    "split": split,
    "threshold_key": threshold_key,
    "difference_bootstrap": {
      "n_resamples": n_resamples,
      "seed": seed,
      "unit": "patient",
      "paired": paired,
    },
    "metrics": out_metrics,
  }
  with open(output_dir / "comparison.json", "w") as f:
    json.dump(comparison, f, indent=2)
  (output_dir / "comparison.md").write_text(comparison_markdown(comparison))
  return comparison


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
  """The comparison table and the stated differences, from `compare_runs`'s dict."""
  ra, rb = comparison["runs"]
  a, b, split = ra["name"], rb["name"], comparison["split"]
  lines = [f"# {a} vs {b} ({split} split)", ""]
  lines += [f"| | {a} | {b} | Difference ({a} - {b}) [95% CI] | Intervals overlap |"]
  lines += ["|---|---|---|---|---|"]
  for name, m in comparison["metrics"].items():
    vals = [
      report.format_value({"value": v, "ci_low": c[0], "ci_high": c[1]})
      for v, c in zip(m["values"], m["cis"], strict=True)
    ]
    lo, hi = m["difference_ci"]
    diff = f"{_fmt(m['difference'], sign=True)} [{_fmt(lo, sign=True)}, {_fmt(hi, sign=True)}]"
    overlap = {True: "yes", False: "no", None: "n/a"}[m["intervals_overlap"]]
    lines.append(
      f"| {metrics_lib.METRIC_LABELS[name]} | {vals[0]} | {vals[1]} | {diff} | {overlap} |"
    )
  for label, key in (
    (f"{split} images", "n_images"),
    (f"{split} patients", "n_patients"),
    (f"{split} COVID images", "n_positive"),
    (f"{split} non-COVID images", "n_negative"),
  ):
    lines.append(f"| {label} | {ra['counts'][key]} | {rb['counts'][key]} | | |")
  train = [r["num_train_examples"] for r in (ra, rb)]
  lines.append("| Training images | " + " | ".join(str(t or "unknown") for t in train) + " | | |")
  lines.append(
    f"| Training time | {_duration(ra['train_time_s'])} | {_duration(rb['train_time_s'])} | | |"
  )
  lines.append(f"| Threshold | {ra['threshold']:.4g} | {rb['threshold']:.4g} | | |")
  boot = comparison["difference_bootstrap"]
  methods = [
    "/".join(sorted({m["ci_methods"][i] for m in comparison["metrics"].values()})) for i in (0, 1)
  ]
  lines += [
    "",
    (
      f"Metrics at `{comparison['threshold_key']}`, 95 % intervals from each run's metrics.json "
      f"({a}: {methods[0]}; {b}: {methods[1]}). Intervals of the differences: "
      + (
        f"{boot['n_resamples']} resamples of the patients both runs scored (paired). "
        if boot.get("paired")
        else f"{boot['n_resamples']} independent patient resamples of each {split} set. "
      )
      + "Overlapping "
      "intervals do not mean the runs are equal; a difference interval that excludes 0 is the "
      "stronger evidence."
    ),
    "",
    "Differences:",
    "",
  ]
  for name, m in comparison["metrics"].items():
    label = metrics_lib.METRIC_LABELS[name]
    if m["difference"] is None:
      lines.append(f"- {label}: undefined for at least one run.")
      continue
    overlap = {True: "overlap", False: "do not overlap", None: "cannot be compared"}
    verdict = (
      "no clear difference" if m["better"] == "no clear difference" else f"{m['better']} is better"
    )
    lines.append(
      f"- {label}: {a} {_fmt(m['values'][0])} vs {b} {_fmt(m['values'][1])}, difference "
      f"{_fmt(m['difference'], sign=True)}; the intervals {overlap[m['intervals_overlap']]}; "
      f"{verdict}."
    )
  lines += ["", "![ROC curves](roc_comparison.png)", ""]
  return "\n".join(lines)


def pooled_difference(
  pairs: Sequence[tuple[str | Path, str | Path]],
  output_dir: str | Path,
  split: str = "test",
  threshold_key: str = "threshold_val",
  n_resamples: int = 1000,
  seed: int = 0,
) -> dict[str, Any]:
  """Writes pooled.md and pooled.json: for every metric each pair's difference (A_i - B_i) and
  their mean, its interval from the same patient resamples for every run. Returns the dict."""
  if len(pairs) < 2:
    raise ValueError(f"pool at least two pairs of runs, got {len(pairs)}")
  runs = [[load_run(path, split) for path in pair] for pair in pairs]
  first = runs[0][0]
  for run in (r for pair in runs for r in pair):
    if not same_patients(first, run):
      raise ValueError(
        f"{run.eval_dir} scored other images or labels than {first.eval_dir}: a pooled paired "
        "difference needs every run on the same images"
      )
    if threshold_key not in run.results:
      raise ValueError(f"{run.eval_dir / 'metrics.json'} has no {threshold_key!r} record")
  dists = [  # One seed: every run is scored on the same resamples of patients.
    [
      metrics_lib.bootstrap_distribution(
        r.labels, r.probs, r.patient_ids, r.results[threshold_key]["threshold"], n_resamples, seed
      )
      for r in pair
    ]
    for pair in runs
  ]
  out_metrics = {}
  for name in metrics_lib.METRICS:
    values = [[r.results[threshold_key]["metrics"][name]["value"] for r in pair] for pair in runs]
    diffs = [None if None in v else v[0] - v[1] for v in values]
    pooled = np.mean([a[name] - b[name] for a, b in dists], axis=0)
    interval = metrics_lib.percentile_interval(pooled)
    out_metrics[name] = {
      "pair_differences": diffs,
      "mean_difference": None if None in diffs else float(np.mean(diffs)),
      "mean_difference_ci": [None if np.isnan(x) else x for x in (interval.low, interval.high)],
      "n_valid": interval.n_valid,
    }
  result = {
    "pairs": [[str(r.eval_dir) for r in pair] for pair in runs],
    "threshold_key": threshold_key,
    "bootstrap": {"n_resamples": n_resamples, "seed": seed, "unit": "patient", "shared": True},
    "metrics": out_metrics,
  }
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  with open(output_dir / "pooled.json", "w") as f:
    json.dump(result, f, indent=2)
  lines = [
    f"# Pooled paired difference over {len(runs)} pairs (first minus second of each pair)",
    "",
    "| | " + " | ".join(f"pair {i + 1}" for i in range(len(runs))) + " | mean [95% CI] |",
    "|---|" + "---|" * (len(runs) + 1),
  ]
  for name, m in out_metrics.items():
    lo, hi = m["mean_difference_ci"]
    cells = [_fmt(d, sign=True) for d in m["pair_differences"]]
    mean = f"{_fmt(m['mean_difference'], sign=True)} [{_fmt(lo, sign=True)}, {_fmt(hi, sign=True)}]"
    lines.append(f"| {metrics_lib.METRIC_LABELS[name]} | {' | '.join(cells)} | {mean} |")
  note = (f"Metrics at `{threshold_key}`; the interval: {n_resamples} resamples of the patients, "
          f"the same for every run (seed {seed}). Pairs:")  # fmt: skip
  lines += ["", note, ""]
  lines += [f"{i + 1}. `{a}` - `{b}`" for i, (a, b) in enumerate(result["pairs"])]
  (output_dir / "pooled.md").write_text("\n".join(lines) + "\n")
  return result


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "workdirs",
    nargs=2,
    help="the two run directories, e.g. runs/cxr runs/ct "
    "(or two comma-separated lists of runs, paired in order: pooled)",
  )
  parser.add_argument("--output", help="output folder (default: comparison/ next to the first)")
  parser.add_argument("--split", default="test", help="evaluated split to compare (default test)")
  parser.add_argument("--names", help="comma-separated display names (default: folder names)")
  parser.add_argument(
    "--threshold",
    default="threshold_val",
    help="metrics.json record: threshold_val or threshold_0.5",
  )
  parser.add_argument("--n_resamples", type=int, default=1000, help="bootstrap of the differences")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  names = args.names.split(",") if args.names else None
  output = Path(args.output) if args.output else Path(args.workdirs[0]).parent / "comparison"
  lists = [w.split(",") for w in args.workdirs]
  try:
    if any(len(runs) > 1 for runs in lists):  # Two recipes' runs, paired in order.
      if len(lists[0]) != len(lists[1]):
        raise ValueError(f"pair the runs one to one: {len(lists[0])} vs {len(lists[1])} given")
      pairs = list(zip(*lists, strict=True))
      pooled_difference(pairs, output, args.split, args.threshold, args.n_resamples, args.seed)
      print(f"Wrote {output / 'pooled.md'}")
      return 0
    compare_runs(
      args.workdirs, output, names, args.split, args.threshold, args.n_resamples, args.seed
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {output / 'comparison.md'}, {output / 'roc_comparison.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

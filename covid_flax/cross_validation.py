"""Patient-wise K-fold cross-validation: every fold trained, the pooled out-of-fold predictions
evaluated. The command line and what it writes: `covid_flax/cross_validate.py`."""

import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from sklearn import metrics as skm

from covid_flax import (
  config_lib,
  evaluation,
  inference,
  input_pipeline,
  metrics,
  plots,
  report,
  subgroups,
  train,
)


def _fold_entry(
  k: int, run: inference.Run, data: input_pipeline.SplitData, probs: np.ndarray
) -> dict:
  summary_path = os.path.join(run.workdir, "train_summary.json")
  train_time = None
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      train_time = json.load(f).get("train_time_s")
  return {
    "fold": k,
    "workdir": run.workdir,
    "step": run.step,
    "n_images": len(data),
    "n_patients": len(np.unique(data.patient_ids)),
    "roc_auc": float(skm.roc_auc_score(data.labels, probs)),
    "accuracy": float(np.mean((probs >= 0.5) == data.labels)),
    "train_time_s": train_time,
  }


def cross_validate(
  config: ml_collections.ConfigDict,
  workdir: str,
  checkpoint: str = "latest",
  n_resamples: int = 1000,
  matched_sources: Sequence[str] = (),
  images_dir: str | None = None,
  labels_csv: str | None = None,
) -> str:
  """Trains and scores every fold of config.cv_folds; returns the output folder.
  `matched_sources`: the source-matched subset of the results by group (`subgroups`);
  `images_dir` (with `labels_csv`, default images_dir/labels.csv): an external folder that each
  fold's model is also scored on (`score_external`)."""
  if config.cv_folds < 2:
    raise config_lib.ConfigError(
      f"config.cv_folds={config.cv_folds}: cross-validation needs 2 or more folds, e.g. "
      "--config.cv_folds=5"
    )
  if config.cv_fold:
    raise config_lib.ConfigError(
      f"config.cv_fold={config.cv_fold}: cross_validate trains every fold; leave it 0 (use "
      "covid_flax.main to train a single fold)"
    )
  streamed = input_pipeline.resolve_input_mode(config) == "stream"
  pool = input_pipeline.load_split(config, config.train_split, stream=streamed)
  subgroups.check_matched_sources(matched_sources, pool.attributes)  # Before hours of training.
  external = None
  if images_dir:  # Its labels csv and images checked before hours of training too.
    external = inference.load_images_dir(images_dir, config, labels_csv)
  parts, folds, runs = [], [], []
  for k in range(config.cv_folds):
    fold_config = config.copy_and_resolve_references()
    fold_config.cv_fold = k
    fold_dir = os.path.join(workdir, f"fold_{k}")
    train.train_and_evaluate(fold_config, fold_dir)
    run = inference.load_run(fold_dir, checkpoint, fold_config, strict=False)  # Its tta_hflip.
    data = pool.subset(input_pipeline.cv_fold_indices(pool, config.cv_folds, k)[1])
    probs = run.predict(data)
    runs.append(run)
    parts.append((data, probs))
    folds.append(_fold_entry(k, run, data, probs))
    logging.info("Fold %d of %d: %s", k, config.cv_folds, folds[-1])
  labels = np.concatenate([d.labels for d, _ in parts])
  probs = np.concatenate([p for _, p in parts])
  patient_ids = np.concatenate([d.patient_ids for d, _ in parts])
  filenames = np.concatenate([d.filenames for d, _ in parts])
  attributes = {k: np.concatenate([d.attributes[k] for d, _ in parts]) for k in pool.attributes}
  aucs = [f["roc_auc"] for f in folds]
  tag = checkpoint + ("-tta" if config.tta_hflip else "")
  results = {
    "target_sensitivity": None,
    "threshold_0.5": metrics.evaluate_predictions(
      labels, probs, patient_ids, 0.5, n_resamples=n_resamples
    ),
    "subgroups": subgroups.subgroup_results(
      labels, probs, patient_ids, attributes, 0.5, n_resamples, matched_sources
    ),
    "split": f"cv-{tag}",
    "dataset": config.dataset,
    "model": config.model,
    "cv": {
      "train_split": config.train_split,
      "folds": folds,
      "checkpoint": checkpoint,
      "fold_roc_auc_mean": float(np.mean(aucs)),
      "fold_roc_auc_std": float(np.std(aucs, ddof=1)),
    },
  }
  out_dir = report.eval_dir(workdir, "cv", tag)
  if jax.process_index() == 0:
    _write(out_dir, results, filenames, patient_ids, labels, probs, attributes, config)
  if external is not None:
    name = evaluation.images_dir_name(images_dir, labels_csv)
    external_dir = report.eval_dir(workdir, f"cv-{name}", tag)
    score_external(runs, external, name, external_dir, n_resamples)
    logging.info("The fold models on %s: %s", images_dir, external_dir)
  return out_dir


def score_external(
  runs: Sequence[inference.Run],
  data: input_pipeline.SplitData,
  name: str,
  out_dir: str,
  n_resamples: int = 1000,
) -> dict:
  """Each fold's model on external images (`evaluation.evaluate` into its own workdir: the
  operating point chosen on the fold's held-out part, the results by group, Grad-CAM), and the
  folds' mean probability at 0.5 in `out_dir`, which `covid_flax.compare` pairs between two
  cross-validated recipes. Returns out_dir's metrics.json dict."""
  folds, fold_probs = [], []
  for k, run in enumerate(runs):
    fold_dir = evaluation.evaluate(run, data, name, n_resamples)
    with open(os.path.join(fold_dir, "metrics.json")) as f:
      scored = json.load(f)
    _, probs, _ = report.read_predictions(os.path.join(fold_dir, "predictions.csv"))
    fold_probs.append(probs)
    at_val = scored["threshold_val"]
    folds.append({
      "fold": k,
      "eval_dir": fold_dir,
      "roc_auc": scored["threshold_0.5"]["metrics"]["roc_auc"],
      "threshold": at_val["threshold"],
      "sensitivity": at_val["metrics"]["sensitivity"],
      "specificity": at_val["metrics"]["specificity"],
    })  # fmt: skip
    logging.info("Fold %d on %s: ROC-AUC %.3f", k, name, folds[-1]["roc_auc"]["value"])
  mean = np.mean(fold_probs, axis=0)
  results = {
    "target_sensitivity": None,
    "threshold_0.5": metrics.evaluate_predictions(
      data.labels, mean, data.patient_ids, 0.5, n_resamples=n_resamples
    ),
    "subgroups": subgroups.subgroup_results(
      data.labels, mean, data.patient_ids, data.attributes, 0.5, n_resamples
    ),
    "split": os.path.basename(out_dir),
    "cv_folds": folds,
  }
  title = f"{name}: the mean probability of the {len(runs)} cross-validation folds' models"
  if jax.process_index() == 0:
    with report.atomic_dir(out_dir) as tmp:
      report.write_results(
        tmp, results, data.filenames, data.patient_ids, data.labels, mean, data.attributes
      )
      lines = [
        report.markdown_report(results, title=title),
        "Each fold's model alone (threshold chosen on the fold's held-out part):",
        "",
        "| fold | ROC-AUC [95 % CI] | threshold | sensitivity | specificity | evaluation |",
        "|---|---|---|---|---|---|",
      ]
      for f in folds:
        lines.append(
          f"| {f['fold']} | {report.format_value(f['roc_auc'])} | {f['threshold']:.3f} | "
          f"{report.format_value(f['sensitivity'])} | {report.format_value(f['specificity'])} | "
          f"`{f['eval_dir']}` |"
        )
      _write_report(tmp, lines, results)
  return results


def _write(out_dir, results, filenames, patient_ids, labels, probs, attributes, config) -> None:
  with report.atomic_dir(out_dir) as tmp:
    report.write_results(tmp, results, filenames, patient_ids, labels, probs, attributes)
    cv = results["cv"]
    title = f"{config.model} on {config.dataset}, {len(cv['folds'])}-fold cross-validation"
    curve = plots.curve_from_results(labels, probs, results)
    plots.plot_roc({config.model: curve}, os.path.join(tmp, "roc.png"), title=f"ROC: {title}")
    lines = [
      report.markdown_report(results, title=f"Out-of-fold predictions: {title}"),
      f"Every image of `{cv['train_split']}` predicted once, by the model of the fold that held "
      f"its patient out ({cv['checkpoint']} checkpoint of each fold). Fold ROC-AUC "
      f"{cv['fold_roc_auc_mean']:.3f} ± {cv['fold_roc_auc_std']:.3f} (mean ± std).",
      "",
      "| fold | images | patients | ROC-AUC | accuracy (0.5) | step | training time (s) |",
      "|---|---|---|---|---|---|---|",
    ]
    for f in cv["folds"]:
      time_s = "unknown" if f["train_time_s"] is None else f"{f['train_time_s']:.0f}"
      lines.append(
        f"| {f['fold']} | {f['n_images']} | {f['n_patients']} | {f['roc_auc']:.3f} | "
        f"{f['accuracy']:.3f} | {f['step']} | {time_s} |"
      )
    _write_report(tmp, lines, results)


def _write_report(folder: str, lines: list[str], results: dict) -> None:
  """folder/report.md: `lines`, then the results by group where there are any."""
  if results["subgroups"]:
    lines = [*lines, "", subgroups.markdown(results["subgroups"])]
  with open(os.path.join(folder, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

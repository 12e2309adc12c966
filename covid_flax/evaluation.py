"""Evaluation of a checkpoint (or ensemble) on a split or a folder of external images: every metric
with a 95 % CI at the val-chosen operating point and at 0.5, the results by group, and the plots.
The command line: `covid_flax/evaluate.py`; cross-validation also scores its fold models here."""

import os
from collections.abc import Sequence

import numpy as np

from covid_flax import (
  gradcam,
  inference,
  input_pipeline,
  metrics,
  models,
  plots,
  report,
  subgroups,
)


def images_dir_name(images_dir: str, labels: str | None = None) -> str:
  """The evaluation name of an external folder: images-<dir>[-<labels csv stem>]."""
  name = "images-" + os.path.basename(os.path.normpath(images_dir))
  if labels:
    name += "-" + os.path.splitext(os.path.basename(labels))[0]
  return name


def _gradcam_groups(run, data, probs, threshold, per_group: int) -> tuple[dict, dict]:
  """A fixed (seeded) sample of true positives, false positives and false negatives, and how many
  of each there are."""
  preds = probs >= threshold
  kinds = {
    "true positives": (data.labels == 1) & preds,
    "false positives": (data.labels == 0) & preds,
    "false negatives": (data.labels == 1) & ~preds,
  }
  rng = np.random.default_rng(0)
  model = run.model()
  dtype = models.compute_dtype(run.config)
  groups, totals = {}, {name: int(mask.sum()) for name, mask in kinds.items()}
  for name, mask in kinds.items():
    idx = np.flatnonzero(mask)
    idx = np.sort(rng.choice(idx, size=min(per_group, len(idx)), replace=False))
    if len(idx):
      heat = gradcam.gradcam(model, data.images[idx], dtype)
    else:
      heat = np.zeros((0, *data.images.shape[1:3]))
    titles = [f"{data.filenames[i][-28:]}\np={probs[i]:.2f}" for i in idx]
    groups[name] = (data.images[idx, ..., 0], heat, titles)
  return groups, totals


def _write_plots(tmp, run, data, probs, results, point, title: str, gradcam_per_group: int) -> None:
  """ROC and PR curves (both classes only), confusion matrix, reliability, training curves and
  the Grad-CAM grid, into `tmp`."""
  curve = plots.curve_from_results(data.labels, probs, results)
  if len(np.unique(data.labels)) == 2:  # ROC and PR curves need both classes.
    plots.plot_roc({run.config.model: curve}, os.path.join(tmp, "roc.png"), title=f"ROC: {title}")
    plots.plot_precision_recall({run.config.model: curve}, os.path.join(tmp, "pr.png"))
  val_record = metrics.threshold_records(results)["threshold_val"]
  plots.plot_confusion_matrix(
      val_record["confusion_matrix"], os.path.join(tmp, "confusion_matrix.png"),
      title=f"Confusion matrix at threshold {point['threshold']:.3f} (chosen on val)",
  )  # fmt: skip
  plots.plot_reliability(data.labels, probs, os.path.join(tmp, "reliability.png"))
  log = os.path.join(run.workdir, "metrics.jsonl")
  if os.path.exists(log):
    plots.plot_training_curves(plots.load_jsonl(log), os.path.join(tmp, "training_curves.png"))
  groups, totals = _gradcam_groups(run, data, probs, point["threshold"], gradcam_per_group)
  plots.gradcam_grid(
    groups, os.path.join(tmp, "gradcam.png"), title=f"Grad-CAM: {title}", totals=totals
  )


def evaluate(
  run: inference.Run | inference.Ensemble,
  data: input_pipeline.SplitData,
  name: str,
  n_resamples: int = 1000,
  gradcam_per_group: int = 4,
  num_trained_on: int = 0,
  matched_sources: Sequence[str] = (),
) -> str:
  """Writes every evaluation output for `data` to workdir/eval/<name>-<step>; returns the path.
  `num_trained_on`: how many of its examples the run trained on (said in the report);
  `matched_sources`: the source-matched subset (`subgroups.subgroup_results`)."""
  subgroups.check_matched_sources(matched_sources, data.attributes)
  point = inference.operating_point(run)
  probs = run.predict(data)
  results = metrics.evaluate_at_thresholds(
      data.labels, probs, data.patient_ids, point["threshold"],
      target_sensitivity=point["target_sensitivity"], n_resamples=n_resamples,
  )  # fmt: skip
  results.update(split=name, step=run.step, dataset=run.config.dataset, model=run.config.model,
                 threshold_chosen_on=point["chosen_on"], num_trained_on=num_trained_on)  # fmt: skip
  results.update(run.describe())
  results["subgroups"] = subgroups.subgroup_results(
    data.labels, probs, data.patient_ids, data.attributes, point["threshold"], n_resamples,
    matched_sources,
  )  # fmt: skip
  out_dir = report.eval_dir(run.workdir, name, run.tag)
  which = f"step {run.step}" if isinstance(run, inference.Run) else f"{len(run.runs)}-run ensemble"
  title = f"{run.config.model} on {run.config.dataset} {name}, {which}"
  notes = []
  if num_trained_on:
    notes.append(f"**Not held out**: the run trained on {num_trained_on} of these {len(data)} "
                 f"examples ({run.config.train_split!r}).")  # fmt: skip
  if len(np.unique(data.labels)) < 2:
    notes.append("Only one class is present: no ROC or precision-recall curve.")
  if isinstance(run, inference.Ensemble):
    members = ", ".join(f"{r.workdir} (step {r.step})" for r in run.runs)
    notes.append(f"Ensemble: the mean probability of {members}.")
  notes.append(f"Operating point: threshold {point['threshold']:.4f}, the highest with "
               f"sensitivity >= {point['target_sensitivity']} on {point['chosen_on']}.")  # fmt: skip
  with report.atomic_dir(out_dir) as tmp:
    report.write_results(
      tmp, results, data.filenames, data.patient_ids, data.labels, probs, data.attributes
    )
    _write_plots(tmp, run, data, probs, results, point, title, gradcam_per_group)
    markdown = report.markdown_report(results, title=f"Evaluation: {title}")
    if results["subgroups"]:
      markdown += "\n" + subgroups.markdown(results["subgroups"])
    with open(os.path.join(tmp, "report.md"), "w") as f:
      f.write(markdown + "".join(f"\n{note}\n" for note in notes))
  return out_dir

"""Evaluates a trained checkpoint on a split, or on a folder of external images.

  python -m covid_flax.evaluate --workdir=runs/cxr [--config=configs/cxr.py]
      [--checkpoint=best|latest|STEP] [--split=test] [--images_dir=DIR [--labels=CSV]]
      [--ensemble=DIR2,DIR3]

Writes `workdir/eval/<split>-<step>/` (or `images-<dir name>[-<labels name>]-<step>/`): metrics.json
(every metric with a 95 % CI, at the operating point chosen on val and at 0.5, and by image source,
view and finding where the data has them: `covid_flax.subgroups`), predictions.csv, report.md, and
PNG plots (ROC, precision-recall, confusion matrix, reliability, training curves, Grad-CAM). The
folder is written under a temporary name and renamed at the end: it is complete or absent.
`--ensemble` averages the probabilities of more runs (seeds) with this one; its outputs are tagged
`ensemble<k>-<hash of the members>` instead of the step.
"""

import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from covid_flax import (
  checkpointing,
  config_lib,
  cpu_defaults,
  errors,
  gradcam,
  inference,
  input_pipeline,
  metric_writers,
  metrics,
  models,
  plots,
  report,
  subgroups,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Optional: must agree with the run's saved config.")
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("checkpoint", "best", "'best' (by val AUC), 'latest' or a step number.")
flags.DEFINE_string("split", "test", "The dataset split to evaluate.")
flags.DEFINE_string(
  "images_dir",
  None,
  "Evaluate this folder (with labels.csv: relpath,label[,patient_id][,source]...) instead of a "
  "split. Labels, case-insensitive: covid, covid-19, positive, 1 / non_covid, normal, negative, "
  "pneumonia, 0.",
)
flags.DEFINE_string(
  "labels",
  None,
  "With --images_dir: the labels csv (relpaths relative to --images_dir); "
  "default --images_dir/labels.csv.",
)
flags.DEFINE_list("ensemble", [], "More workdirs (same data) to average with --workdir's run; "
                  "each uses its --checkpoint.")  # fmt: skip
flags.DEFINE_bool("tta_hflip", None, "Average each prediction with its mirror image's (outputs "
                  "tagged <step>-tta); default: the run's config.tta_hflip.")  # fmt: skip
flags.DEFINE_list("matched_sources", [], "The sources of the source-matched subset in the "
                  "results by group (default: every source with images of both classes).")  # fmt: skip
flags.DEFINE_integer("n_resamples", 1000, "Patient-bootstrap resamples for the CIs.")
flags.DEFINE_integer("gradcam_per_group", 4, "Images per Grad-CAM row group (TP, FP, FN).")
flags.mark_flags_as_required(["workdir"])


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metric_writers.quiet_library_logs()
  if FLAGS.labels and not FLAGS.images_dir:
    sys.exit(f"error: --labels={FLAGS.labels} needs --images_dir (the folder its relpaths are in)")
  try:
    config = FLAGS.config
    if FLAGS.tta_hflip is not None:
      config = config or config_lib.with_added_fields(
        checkpointing.load_saved_config(FLAGS.workdir)
      )
      config = config.copy_and_resolve_references()
      config.tta_hflip = FLAGS.tta_hflip
    run = inference.load_run(FLAGS.workdir, FLAGS.checkpoint, config)
    if FLAGS.ensemble:
      others = [inference.load_run(w, FLAGS.checkpoint, config, strict=False)
                for w in FLAGS.ensemble]  # fmt: skip
      run = inference.Ensemble([run, *others])
    if FLAGS.images_dir:
      data = inference.load_images_dir(FLAGS.images_dir, run.config, FLAGS.labels)
      name = "images-" + os.path.basename(os.path.normpath(FLAGS.images_dir))
      if FLAGS.labels:
        name += "-" + os.path.splitext(os.path.basename(FLAGS.labels))[0]
      trained_on = 0
    else:
      streamed = input_pipeline.resolve_input_mode(run.config, FLAGS.split) == "stream"
      data = input_pipeline.load_split(run.config, FLAGS.split, stream=streamed)
      name = FLAGS.split
      trained_on = input_pipeline.count_trained_on(run.config, FLAGS.split)
    out_dir = evaluate(run, data, name, FLAGS.n_resamples, FLAGS.gradcam_per_group, trained_on,
                       FLAGS.matched_sources)  # fmt: skip
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  logging.info("Wrote %s", out_dir)
  print(open(os.path.join(out_dir, "report.md")).read())
  print(f"Evaluation written to {out_dir}")


if __name__ == "__main__":
  cpu_defaults.apply()
  app.run(main, flags_parser=config_lib.parse_flags)

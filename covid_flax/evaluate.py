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

from absl import app, flags, logging
from ml_collections import config_flags

from covid_flax import (
  checkpointing,
  config_lib,
  cpu_defaults,
  errors,
  evaluation,
  inference,
  input_pipeline,
  metric_writers,
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
      name = evaluation.images_dir_name(FLAGS.images_dir, FLAGS.labels)
      trained_on = 0
    else:
      streamed = input_pipeline.resolve_input_mode(run.config, FLAGS.split) == "stream"
      data = input_pipeline.load_split(run.config, FLAGS.split, stream=streamed)
      name = FLAGS.split
      trained_on = input_pipeline.count_trained_on(run.config, FLAGS.split)
    out_dir = evaluation.evaluate(run, data, name, FLAGS.n_resamples, FLAGS.gradcam_per_group,
                                  trained_on, FLAGS.matched_sources)  # fmt: skip
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  logging.info("Wrote %s", out_dir)
  print(open(os.path.join(out_dir, "report.md")).read())
  print(f"Evaluation written to {out_dir}")


if __name__ == "__main__":
  cpu_defaults.apply()
  app.run(main, flags_parser=config_lib.parse_flags)

"""Predicts COVID-19 for image files with a trained run:

  python -m covid_flax.predict --workdir=runs/cxr IMAGE... [--checkpoint=best] [--output=preds.csv]

Prints P(covid) and the decision at the run's operating point (chosen on the validation split and
stored by `covid_flax.evaluate`; computed and stored here if evaluation has not run yet).
"""

import csv
import sys

import numpy as np
from absl import app, flags

from covid_flax import config_lib, cpu_defaults, errors, inference, input_pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("checkpoint", "best", "'best' (by val AUC), 'latest' or a step number.")
flags.DEFINE_string("output", None, "Also write the predictions to this CSV file.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("Give one or more image files.")
  try:
    run = inference.load_run(FLAGS.workdir, FLAGS.checkpoint)
    images, failures = inference.load_usable_images(paths, run.config)
    threshold = inference.operating_point(run)["threshold"]
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  usable = [p for p in paths if p not in failures]
  rows = []
  if usable:
    names = np.asarray(usable)
    probs = run.predict(
      input_pipeline.SplitData(images, np.zeros(len(usable), np.int32), names, names)
    )
    rows = [
      (p, float(q), "covid" if q >= threshold else "non_covid") for p, q in zip(usable, probs)
    ]
  print(f"# step {run.step}, threshold {threshold:.4f} (chosen on validation)")
  for path, prob, decision in rows:
    print(f"{path}\t{prob:.4f}\t{decision}")
  if FLAGS.output:
    with open(FLAGS.output, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["filename", "probability", "decision", "threshold", "step"])
      for path, prob, decision in rows:
        writer.writerow([path, repr(prob), decision, threshold, run.step])
  if failures:  # The predictions that could be made are out; the rest are named, and it fails.
    sys.exit(f"error: {inference.unusable_listing(failures)}")


if __name__ == "__main__":
  cpu_defaults.apply()
  app.run(main, flags_parser=config_lib.parse_flags)

"""Patient-wise K-fold cross-validation, to choose a recipe on more than one small val split:

  python -m covid_flax.cross_validate --config=configs/ct.py --workdir=runs/ct_cv \
      --config.train_split=train+val --config.cv_folds=5 [--checkpoint=latest]

Trains fold k in workdir/fold_k (each resumable, as `covid_flax.main`), predicts every held-out fold
with the model that did not train on its patients, and evaluates the pooled out-of-fold predictions:
each image of config.train_split is predicted once. Writes workdir/eval/cv-<checkpoint>/ (with
--config.tta_hflip=True: cv-<checkpoint>-tta/, predicted with test-time flips; on a finished
cross-validation that trains nothing, it only scores the folds again):
metrics.json (threshold 0.5, patient-bootstrap CIs, and each fold's "folds" entry), predictions.csv,
report.md and roc.png. The folds depend only on the data (`input_pipeline.cv_fold_indices`), so two
recipes cross-validated on the same train_split are scored on the same images; compare them with a
paired bootstrap:

  python -m covid_flax.compare runs/a/eval/cv-latest runs/b/eval/cv-latest --threshold=threshold_0.5

`--images_dir=DIR [--labels=CSV]` also scores every fold's model on a folder of external images
(e.g. a probe from another hospital; `covid_flax.evaluate --images_dir` into workdir/fold_k/eval/,
the threshold chosen on the fold's held-out part) and writes the folds' mean probability to
workdir/eval/cv-images-<dir>[-<labels>]-<checkpoint>/, which `compare` pairs between two recipes:
model selection on cross-validation and on the external images, both reported.

`--checkpoint=latest` (default) scores each fold's last checkpoint, which is what a final fit keeps
(it has no held-out data to choose by); `best` takes the checkpoint each fold's own AUC picked, an
optimistic estimate.
"""

import os

import jax
import ml_collections
from absl import app, flags

from covid_flax import config_lib, cpu_defaults, cross_validation
from covid_flax import main as cli

FLAGS = flags.FLAGS
flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "Which checkpoint of each fold.")
flags.DEFINE_integer("n_resamples", 1000, "Patient-bootstrap resamples for the intervals.")
flags.DEFINE_list("matched_sources", [], "The sources of the source-matched subset in the "
                  "results by group (default: every source with images of both classes).")  # fmt: skip
flags.DEFINE_string("images_dir", None, "Also score each fold's model on this folder of external "
                    "images (labels as in covid_flax.evaluate), and the folds' mean.")  # fmt: skip
flags.DEFINE_string("labels", None, "With --images_dir: its labels csv (default "
                    "--images_dir/labels.csv).")  # fmt: skip


def main(argv: list[str]) -> None:
  if FLAGS.labels and not FLAGS.images_dir:
    raise app.UsageError(f"--labels={FLAGS.labels} needs --images_dir (the folder of its relpaths)")

  def entry(config: ml_collections.ConfigDict, workdir: str) -> None:
    out_dir = cross_validation.cross_validate(
      config, workdir, FLAGS.checkpoint, FLAGS.n_resamples, FLAGS.matched_sources,
      FLAGS.images_dir, FLAGS.labels,
    )  # fmt: skip
    if jax.process_index() == 0:
      print(open(os.path.join(out_dir, "report.md")).read())
      print(f"Cross-validation written to {out_dir}")

  cli.run(entry, argv)


if __name__ == "__main__":
  cpu_defaults.apply(restart=True)  # Malloc tunables: restarts once, before any work.
  app.run(main, flags_parser=config_lib.parse_flags)

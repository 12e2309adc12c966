"""Trains a model: `python -m covid_flax.main --config=configs/cxr.py --workdir=runs/cxr`.

Any config field can be overridden on the command line, e.g. `--config.batch_size=64`.
Running the same command again resumes from the latest checkpoint in the workdir.
"""

import sys
from typing import Any, Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from covid_flax import config_lib, cpu_defaults, errors, metric_writers, parallel, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file (a get_config()); override a field with --config.<field>=VALUE. Every field, with "
  "its default and meaning: configs/default.py.",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def run(entry: Callable[[ml_collections.ConfigDict, str], Any], argv: list[str]) -> None:
  """Runs `entry(config, workdir)` from the flags; user errors end in one line, no traceback.
  Shared by this module and `covid_flax.pretrain`."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metric_writers.quiet_library_logs()
  config = FLAGS.config
  logging.info(
    "%s: dataset %s, model %s, %d px, %d epochs of batch %d, learning rate %g (every field: "
    "--verbosity=1, or config.json in the workdir)", FLAGS["config"].serialize().split("=", 1)[-1],
    config.dataset, config.model, config.image_size, config.num_epochs, config.batch_size,
    config.learning_rate,
  )  # fmt: skip
  logging.vlog(1, "Config:\n%s", config)
  try:
    parallel.initialize_distributed(FLAGS.config)
    entry(FLAGS.config, FLAGS.workdir)
  except errors.UserError as e:
    sys.exit(f"error: {e}")


def main(argv: list[str]) -> None:
  run(train.train_and_evaluate, argv)


if __name__ == "__main__":
  cpu_defaults.apply(restart=True)  # Malloc tunables: restarts once, before any work.
  app.run(main, flags_parser=config_lib.parse_flags)

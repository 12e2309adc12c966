"""Self-supervised pretraining (SimCLR) of a classifier's encoder on the training images:

  python -m covid_flax.pretrain --config=configs/ct_ssl.py --workdir=runs/ct_ssl
  python -m covid_flax.main --config=configs/ct.py --config.init_from=runs/ct_ssl --workdir=runs/ct

Running the same command again resumes from the latest checkpoint. See covid_flax/ssl.py.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from covid_flax import checkpointing, config_lib, metric_writers, parallel, ssl, train
from covid_flax.datasets import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pretraining config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for the pretraining checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metric_writers.quiet_library_logs()
  parallel.initialize_distributed(FLAGS.config)
  logging.info("Config:\n%s", FLAGS.config)
  try:
    ssl.pretrain(FLAGS.config, FLAGS.workdir)
  except (config_lib.ConfigError, common.DatasetError, checkpointing.CheckpointError,
          train.NonFiniteLossError) as e:  # fmt: skip
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)

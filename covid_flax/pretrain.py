"""Self-supervised pretraining (SimCLR) of a classifier's encoder on the training images:

  python -m covid_flax.pretrain --config=configs/ct_ssl.py --workdir=runs/ct_ssl
  python -m covid_flax.main --config=configs/ct.py --config.init_from=runs/ct_ssl --workdir=runs/ct

Same flags as `covid_flax.main`; running the same command again resumes from the latest
checkpoint. See covid_flax/simclr.py.
"""

from absl import app

from covid_flax import config_lib, cpu_defaults, simclr
from covid_flax import main as cli


def main(argv: list[str]) -> None:
  cli.run(simclr.pretrain, argv)


if __name__ == "__main__":
  cpu_defaults.apply(restart=True)  # Malloc tunables: restarts once, before any work.
  app.run(main, flags_parser=config_lib.parse_flags)

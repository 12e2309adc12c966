"""Prints the leakage audit report of a prepared real dataset.

  python scripts/audit_data.py --dataset=covid_ct [--data_dir=DIR] [--json]

`--dataset` is a TFDS name with an optional config (`covid_ct`, `covid_cxr/keep_duplicates`); the
report is `<data_dir>/<name>/<config>/<version>/leakage_audit.json`, written when the dataset was
prepared (by training, or `tfds build`). Nothing is prepared here.
"""

import json
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Run from a checkout, uninstalled.

import tensorflow_datasets as tfds

import covid_flax.datasets  # noqa: F401  (registers the builders)
from covid_flax.datasets import audit

_DATASET = flags.DEFINE_string("dataset", "covid_ct", "TFDS name, e.g. covid_ct or covid_cxr.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir; '' means the TFDS default.")
_JSON = flags.DEFINE_bool("json", False, "Print the raw JSON report instead of the summary.")


def report_path(dataset: str, data_dir: str | None) -> Path:
  """Where the report of a prepared dataset is."""
  builder = tfds.builder(dataset, data_dir=data_dir or None)
  return Path(builder.data_path) / audit.REPORT_FILENAME


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  path = report_path(_DATASET.value, _DATA_DIR.value)
  if not path.is_file():
    print(
      f"No leakage report at {path}: prepare {_DATASET.value} first (e.g. by training with it, "
      f"with --config.data_dir pointing at the same data_dir).",
      file=sys.stderr,
    )
    return 1
  report = audit.read_report(path.parent)
  print(json.dumps(report, indent=1) if _JSON.value else audit.format_report(report))
  return 0


if __name__ == "__main__":
  app.run(main)

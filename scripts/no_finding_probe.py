"""Writes the labels csv of ieee8023's frontal "No Finding" films: an external probe of adult
films without COVID-19 findings (most are early or normal films of COVID-19 patients, so it
measures false positives on adult normal-looking films, not on healthy people).

  python scripts/no_finding_probe.py DATA/covid-chestxray-dataset runs/no_finding.csv
  python -m covid_flax.evaluate --workdir=runs/cxr_adult \
      --images_dir=DATA/covid-chestxray-dataset --labels=runs/no_finding.csv

Rows: relpath (relative to the ieee8023 folder), label non_covid, patient_id, source (the site of
the url, as in the covid_cxr builder), view. Listed files that are absent are skipped and counted.
"""

import csv
import sys
from pathlib import Path

if __package__ in (None, ""):  # Run as a script from a checkout: make covid_flax importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covid_flax.datasets import covid_cxr


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise SystemExit(__doc__)
  try:
    rows, absent = covid_cxr.no_finding_probe(Path(argv[1]))
  except covid_cxr.DatasetError as e:
    raise SystemExit(f"error: {e}") from None
  with open(argv[2], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print(f"Wrote {argv[2]}: {len(rows)} films of {len({r['patient_id'] for r in rows})} patients "
        f"({absent} listed files absent, skipped)")  # fmt: skip


if __name__ == "__main__":
  main(sys.argv)

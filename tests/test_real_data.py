"""Integration tests on the real data at ../shared/data (relative to the repo root); skipped if absent.

Prepares covid_ct (both configs) and covid_cxr into a temporary data_dir (about 30 s on 2 cores).
"""

import collections
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from covid_flax.datasets import audit, common, covid_ct, covid_cxr

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = [
  pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real data not found at {DATA} (../shared/data from the repo root)"
  ),
  pytest.mark.slow,
]

OFFICIAL_CT = {"train": (191, 234), "val": (60, 58), "test": (98, 105)}  # (COVID, NonCOVID)
KNOWN_CT_DUPLICATES = {
  frozenset({"CT_COVID/kjr-21-e24-p5-29.png", "CT_NonCOVID/71%0.jpg"}): 5,
  frozenset({"CT_COVID/kjr-21-e24-p5-31.png", "CT_NonCOVID/71%1.jpg"}): 12,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("tfds")


def _prepare(builder_cls, config, data_dir):
  mp = pytest.MonkeyPatch()
  mp.setenv(common.NO_DOWNLOAD_ENV, "1")
  try:
    builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(DATA)))
  finally:
    mp.undo()
  return builder


def _metadata(name: str, data_dir: Path) -> dict[str, list[tuple[int, str]]]:
  """{split: [(label, patient_id)]}, read back without decoding the images."""
  sources = tfds.data_source(
    name, data_dir=data_dir, download=False, decoders={"image": tfds.decode.SkipDecoding()}
  )
  return {
    split: [(int(e["label"]), e["patient_id"].decode()) for e in (s[i] for i in range(len(s)))]
    for split, s in sources.items()
  }


def _counts(meta):
  return {
    split: (sum(l for l, _ in rows), sum(1 - l for l, _ in rows)) for split, rows in meta.items()
  }


def _assert_patient_wise(meta):
  owner = {}
  for split, rows in meta.items():
    for label, patient in rows:
      assert owner.setdefault((label, patient), split) == split, (label, patient)


@pytest.fixture(scope="module")
def ct_keep(data_dir):
  return _prepare(covid_ct.CovidCt, "keep_duplicates", data_dir)


@pytest.fixture(scope="module")
def ct_default(data_dir):
  return _prepare(covid_ct.CovidCt, None, data_dir)


@pytest.fixture(scope="module")
def cxr(data_dir):
  return _prepare(covid_cxr.CovidCxr, None, data_dir)


@pytest.fixture(scope="module")
def cxr_adult(data_dir):
  return _prepare(covid_cxr.CovidCxr, "adult", data_dir)


def test_covid_ct_keep_duplicates_is_exactly_the_official_split(ct_keep, data_dir):
  meta = _metadata("covid_ct/keep_duplicates", data_dir)
  assert _counts(meta) == OFFICIAL_CT
  _assert_patient_wise(meta)
  sources = tfds.data_source("covid_ct/keep_duplicates", data_dir=data_dir, download=False)
  by_source = collections.Counter(
    (int(e["label"]), e["source"].decode()) for s in sources.values() for e in s
  )
  assert by_source == {(1, "paper"): 349, (0, "crawled"): 202, (0, "medpix"): 195}


def test_audit_flags_the_two_known_ct_duplicates(ct_keep, ct_default, data_dir):
  report = audit.read_report(ct_keep.data_path)
  flagged = {frozenset({p["a"]["key"], p["b"]["key"]}): p for p in report["pairs"]}
  for pair, distance in KNOWN_CT_DUPLICATES.items():
    assert pair in flagged
    assert flagged[pair]["cross_split"] and flagged[pair]["cross_class"]
    assert flagged[pair]["ahash_distance"] == distance
  cross_split = {k for k, p in flagged.items() if p["cross_split"]}
  assert cross_split == set(KNOWN_CT_DUPLICATES)
  assert len(report["pairs"]) < 60  # Neighbouring slices, not the world.
  # The default config leaves the two COVID test copies out, and says so.
  default = audit.read_report(ct_default.data_path)
  assert sorted(e["key"] for e in default["excluded"]) == [
    "CT_COVID/kjr-21-e24-p5-29.png",
    "CT_COVID/kjr-21-e24-p5-31.png",
  ]
  meta = _metadata("covid_ct", data_dir)
  assert _counts(meta) == {**OFFICIAL_CT, "test": (96, 105)}


def test_covid_cxr_split_and_audit(cxr, data_dir):
  meta = _metadata("covid_cxr", data_dir)
  assert _counts(meta) == {"train": (72, 77), "val": (28, 22), "test": (20, 21)}
  _assert_patient_wise(meta)
  report = audit.read_report(cxr.data_path)
  assert (
    report["build"]["ieee8023_absent_skipped"] == 314 and report["build"]["ieee8023_listed"] == 434
  )
  pairs = {frozenset({p["a"]["key"], p["b"]["key"]}): p for p in report["pairs"]}
  known = frozenset(
    {"covid-chestxray-dataset/images/AR-1.jpg", "covid-chestxray-dataset/images/extubation-1.jpg"}
  )
  assert known in pairs and not pairs[known]["cross_split"]
  assert report["summary"]["excluded_from_test"] == 0


def test_prepared_datasets_read_back(ct_default, cxr, data_dir):
  for name in ("covid_ct", "covid_cxr"):
    source = tfds.data_source(name, split="test", data_dir=data_dir, download=False)
    for i in (0, len(source) - 1):
      example = source[i]
      assert example["image"].dtype == np.uint8 and example["image"].shape[2] == 1
      assert min(example["image"].shape[:2]) > 32
      assert example["filename"] and example["patient_id"]


def test_covid_cxr_adult_counts_split_and_sources(cxr_adult, data_dir):
  """81 films of 45 patients with other lung disease (data README section 2b) against the 120
  COVID films; split 55 / 7 / 19 non-COVID images by the salted rule; no patient in two splits."""
  sources = tfds.data_source(
    "covid_cxr/adult", data_dir=data_dir, download=False,
    decoders={"image": tfds.decode.SkipDecoding()},
  )  # fmt: skip
  rows = [
    (split, int(e["label"]), e["patient_id"].decode(), e["source"].decode(), e["finding"].decode())
    for split, s in sources.items()
    for e in (s[i] for i in range(len(s)))
  ]
  negatives = [r for r in rows if r[1] == 0]
  assert len(negatives) == 81 and len({r[2] for r in negatives}) == 45
  assert sum(r[1] for r in rows) == 120
  assert _counts(_metadata("covid_cxr/adult", data_dir)) == {
    "train": (72, 55), "val": (28, 7), "test": (20, 19),
  }  # fmt: skip
  _assert_patient_wise(_metadata("covid_cxr/adult", data_dir))
  assert not {r[4] for r in negatives} & {"No Finding", "todo", "COVID-19"}
  by_source = {s: sum(r[3] == s for r in negatives) for s in {r[3] for r in negatives}}
  assert by_source == {"eurorad": 32, "radiopaedia": 31, "rsna": 11, "ncbi": 5, "wikipedia": 2}
  matched = sorted({r[3] for r in rows if r[1] == 1} & set(by_source))
  assert matched == ["eurorad", "ncbi", "radiopaedia", "rsna"]
  report = audit.read_report(cxr_adult.data_path)
  assert report["build"]["ieee8023_listed_twice"] == [
    "images/000001-24.jpg", "images/000006-17.jpg", "images/000007-15.jpg", "images/000001-27.jpg",
  ]  # fmt: skip


def test_no_finding_probe_has_the_19_adult_films():
  rows, absent = covid_cxr.no_finding_probe(DATA / "covid-chestxray-dataset")
  assert (len(rows), absent, len({r["patient_id"] for r in rows})) == (19, 0, 16)
  assert all((DATA / "covid-chestxray-dataset" / r["relpath"]).is_file() for r in rows)

"""covid_cxr builder on small fake upstream trees (ieee8023 metadata.csv + Kaggle NORMAL folders)."""

import csv
import hashlib
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import assert_nothing_prepared, smooth_image
from PIL import Image

from covid_flax.datasets import audit, common, covid_cxr
from covid_flax.datasets.common import DatasetError

# The real metadata.csv header (it ends with a comma: an unnamed last column).
_HEADER = [
  "patientid",
  "offset",
  "sex",
  "age",
  "finding",
  "survival",
  "intubated",
  "intubation_present",
  "went_icu",
  "in_icu",
  "needed_supplemental_O2",
  "extubated",
  "temperature",
  "pO2_saturation",
  "leukocyte_count",
  "neutrophil_count",
  "lymphocyte_count",
  "view",
  "modality",
  "date",
  "location",
  "folder",
  "filename",
  "doi",
  "url",
  "license",
  "clinical_notes",
  "other_notes",
  "",
]


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
  monkeypatch.setenv(common.NO_DOWNLOAD_ENV, "1")


def documented_split(patient_id: str) -> str:
  """The split rule as the issue states it (independent of the builder's code)."""
  u = int(hashlib.sha1(("covid_cxr:" + patient_id).encode("utf-8")).hexdigest(), 16) / 16**40
  return "train" if u < 0.60 else "val" if u < 0.80 else "test"


def pick(split: str, fmt: str, skip: int = 0) -> str:
  """The (skip+1)-th id fmt.format(i) that the rule puts in `split`."""
  ids = (fmt.format(i) for i in range(1000))
  return [p for p in ids if documented_split(p) == split][skip]


# Patients: a COVID patient in train with two images, whose first image reappears (rescaled) under
# a test patient: a cross-split near duplicate; two NORMAL patients in different rule splits
# sharing one identical file: merged into the first one's split.
P_TRAIN, P_TRAIN2, P_VAL, P_VAL2, P_TEST, P_DUP = (
  pick("train", "{}"),
  pick("train", "{}b", 1),
  pick("val", "{}"),
  pick("val", "{}c", 1),
  pick("test", "{}"),
  pick("test", "{}d", 2),
)
N_TRAIN, N_VAL, N_TEST = (
  pick("train", "IM-{:04d}"),
  pick("val", "IM-{:04d}"),
  pick("test", "IM-{:04d}"),
)
N2_TEST = pick("test", "NORMAL2-IM-{:04d}")
# Other lung disease (the adult configs' negatives), one patient per split and a second test one.
O_TRAIN, O_VAL, O_TEST, O_TEST2 = (
  pick("train", "o{}"),
  pick("val", "o{}"),
  pick("test", "o{}"),
  pick("test", "o{}", 1),
)
N_COPY_FIRST, N_COPY_SECOND = sorted([pick("val", "IM-{:04d}", 3), pick("train", "IM-{:04d}", 4)])

# (patientid, finding, view, modality, folder, filename, written?)
_ROWS = [
  (P_TRAIN, "COVID-19", "PA", "X-ray", "images", "t1.png", "RGBA"),
  (P_TRAIN, "COVID-19", "AP", "X-ray", "images", "t2.jpeg", "JPEG"),
  (P_TRAIN, "No Finding", "PA", "X-ray", "images", "nofinding.jpg", "JPEG"),  # Not a control.
  (P_TRAIN2, "COVID-19", "PA", "X-ray", "images", "t3.jpg", "JPEG"),
  (P_VAL, "COVID-19, ARDS", "AP Supine", "X-ray", "images", "v1.png", "L"),
  (P_VAL2, "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", "v2.PNG", "RGB"),
  (P_VAL2, "COVID-19", "L", "X-ray", "images", "lateral.png", "L"),  # Not frontal.
  (P_TEST, "COVID-19", "PA", "X-ray", "images", "s1.png", "L"),
  (P_DUP, "COVID-19", "AP", "X-ray", "images", "dup-of-t1.png", "dup"),
  (P_TEST, "COVID-19", "Axial", "CT", "images", "ct.png", "L"),  # Not an X-ray.
  (P_TEST, "COVID-19", "PA", "X-ray", "images", "absent1.jpg", None),
  (P_TEST, "COVID-19", "PA", "X-ray", "images", "absent2.jpg", None),
  (P_VAL, "COVID-19", "AP", "X-ray", "volumes", "absent3.nii.gz", None),
  ("999", "COVID-19", "PA", "X-ray", "images", "v1.png", None),  # Listed twice.
  ("998", "SARS", "PA", "X-ray", "images", "sars.png", "L"),
  (O_TRAIN, "Pneumonia/Bacterial/Streptococcus", "PA", "X-ray", "images", "strep1.jpg", "JPEG"),
  (O_TRAIN, "Streptococcus", "AP", "X-ray", "images", "strep2.png", "L"),  # A serial film.
  (O_VAL, "Pneumocystis", "AP Supine", "X-ray", "images", "pcp.png", "RGBA"),
  (O_TEST, "Legionella", "PA", "X-ray", "images", "leg.jpg", "JPEG"),
  (O_TEST2, "Legionella", "PA", "X-ray", "images", "leg.jpg", None),  # Listed twice.
  (O_TEST, "Klebsiella", "PA", "X-ray", "images", "absent-kleb.jpg", None),
  (O_VAL, "Klebsiella", "L", "X-ray", "images", "kleb-lateral.png", "L"),  # Not frontal.
  ("997", "todo", "PA", "X-ray", "images", "todo.png", "L"),  # Unlabelled: never a negative.
  ("996", "Unknown", "AP", "X-ray", "images", "unknown.png", "L"),
]
# The url column (the `source` feature is its site) and the age column; blank elsewhere.
_URLS = {
  "t1.png": "https://radiopaedia.org/cases/covid-1?lang=us",
  "strep1.jpg": "https://www.eurorad.org/case/10483",
  "sars.png": "https://pubs.rsna.org/doi/10.1148/radiol.2303030853",
  "pcp.png": "https://www.ncbi.nlm.nih.gov/pmc/articles/PMC1/",
}
_AGES = {"t1.png": "65", "strep1.jpg": "41.0", "pcp.png": " "}
_NORMAL = {
  "train": [
    f"{N_TRAIN}-0001.jpeg",
    f"{N_TRAIN}-0001-0002.jpeg",
    f"{N_VAL}-0001.jpeg",
    f"{N_COPY_FIRST}-0001.jpeg",
    f"{N_COPY_SECOND}-0001.jpeg",
  ],
  "val": [f"{N2_TEST}-0004.jpeg"],
  "test": [f"{N_TEST}-0001.jpeg"],
}


def make_cxr_tree(manual: Path, normal_splits=("train", "val", "test")) -> Path:
  root = manual / "covid-chestxray-dataset"
  (root / "images").mkdir(parents=True)
  with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(_HEADER)
    for patient, finding, view, modality, folder, filename, how in _ROWS:
      row = dict.fromkeys(_HEADER, "")
      row.update(
        patientid=patient,
        finding=finding,
        view=view,
        modality=modality,
        folder=folder,
        filename=filename,
        doi=f"10.1/{filename}",
        url=_URLS.get(filename, ""),
        age=_AGES.get(filename, ""),
        clinical_notes='says "hi",\nnewline',
      )
      writer.writerow([row[c] for c in _HEADER])
      seed = zlib.crc32(filename.encode())
      path = root / folder / filename
      if how == "dup":
        smooth_image(zlib.crc32(b"t1.png")).resize((90, 68), Image.Resampling.BILINEAR).save(path)
      elif how == "JPEG":
        smooth_image(seed).save(path, "JPEG")
      elif how == "RGBA":
        smooth_image(seed).convert("RGBA").save(path, "PNG")
      elif how:
        smooth_image(seed).convert(how).save(path, "PNG")
  for split in normal_splits:
    folder = manual / "chest_xray" / split / "NORMAL"
    folder.mkdir(parents=True)
    (folder / ".DS_Store").write_bytes(b"\0")
    for name in _NORMAL[split]:
      smooth_image(zlib.crc32(name.encode()), (72, 60)).save(folder / name, "JPEG")
  train = manual / "chest_xray/train/NORMAL"
  if train.is_dir():
    shutil.copy(train / f"{N_COPY_FIRST}-0001.jpeg", train / f"{N_COPY_SECOND}-0001.jpeg")
  return manual


def build(manual: Path, data_dir: Path, config: str | None = None) -> covid_cxr.CovidCxr:
  builder = covid_cxr.CovidCxr(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def read_all(name: str, data_dir: Path) -> dict[str, dict[str, dict]]:
  sources = tfds.data_source(name, data_dir=data_dir, download=False)
  return {
    split: {s[i]["filename"].decode(): s[i] for i in range(len(s))} for split, s in sources.items()
  }


def expected_splits() -> dict[str, str]:
  """filename -> split, by the documented rule; the copied NORMAL file follows its first owner."""
  expected = {}
  for patient, finding, view, modality, folder, filename, how in _ROWS:
    if how and modality == "X-ray" and view != "L" and "COVID-19" in finding:
      expected[f"covid-chestxray-dataset/{folder}/{filename}"] = documented_split(patient)
  for split, names in _NORMAL.items():
    for name in names:
      patient = covid_cxr.kermany_patient_id(name)
      expected[f"chest_xray/{split}/NORMAL/{name}"] = documented_split(
        N_COPY_FIRST if patient == N_COPY_SECOND else patient
      )
  return expected


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
  return make_cxr_tree(tmp_path_factory.mktemp("manual"))


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  return build(tree, data_dir), read_all("covid_cxr", data_dir)


def test_split_sizes_follow_the_documented_rule(built):
  builder, splits = built
  assert builder.builder_config.name == "exclude_duplicates"
  expected = expected_splits()
  dup_key = "covid-chestxray-dataset/images/dup-of-t1.png"
  assert expected.pop(dup_key) == "test"  # Left out: near duplicate of t1.png (train).
  got = {key: split for split, examples in splits.items() for key in examples}
  assert got == expected
  assert documented_split(N_COPY_SECOND) != documented_split(N_COPY_FIRST)  # A real merge.
  assert covid_cxr.patient_split("IM-0115") == documented_split("IM-0115")


def test_features(built):
  builder, splits = built
  examples = {k: e for split in splits.values() for k, e in split.items()}
  t1 = examples["covid-chestxray-dataset/images/t1.png"]
  assert t1["image"].shape == (48, 64, 1) and t1["image"].dtype == np.uint8
  assert (int(t1["label"]), t1["patient_id"].decode(), t1["view"].decode()) == (1, P_TRAIN, "PA")
  assert (t1["source"].decode(), t1["finding"].decode(), int(t1["age"])) == (
    "radiopaedia",
    "COVID-19",
    65,
  )
  assert examples["covid-chestxray-dataset/images/t2.jpeg"]["source"].decode() == "unknown"
  normal = examples[f"chest_xray/train/NORMAL/{N_TRAIN}-0001-0002.jpeg"]
  assert (int(normal["label"]), normal["patient_id"].decode()) == (0, N_TRAIN)
  assert normal["view"].decode() == "AP" and normal["source"].decode() == "kermany"
  assert (normal["finding"].decode(), int(normal["age"])) == ("normal", -1)
  assert examples[f"chest_xray/val/NORMAL/{N2_TEST}-0004.jpeg"]["patient_id"].decode() == N2_TEST
  assert "cohen2020covid" in builder.info.citation and "kermany" in builder.info.citation
  assert builder.info.homepage == "https://github.com/ieee8023/covid-chestxray-dataset"


def test_patient_wise(built):
  _, splits = built
  owner = {}
  for split, examples in splits.items():
    for e in examples.values():
      assert owner.setdefault(e["patient_id"], split) == split


def test_absent_and_skipped_are_counted(tree, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  builder = build(tree, tmp_path, "keep_duplicates")
  report = audit.read_report(builder.data_path)
  build_counts = report["build"]
  # Listed: 9 frontal COVID X-rays in images/ (v1.png counted once) + 1 in volumes/; 3 absent.
  assert (build_counts["ieee8023_listed"], build_counts["ieee8023_absent_skipped"]) == (10, 3)
  assert build_counts["covid_kept"] == 7
  assert build_counts["ieee8023_listed_twice"] == ["images/v1.png"]
  assert build_counts["normal_folders"] == [
    f"chest_xray/{s}/NORMAL" for s in ("train", "val", "test")
  ]
  assert build_counts["patients_merged_by_exact_duplicates"] == [[N_COPY_FIRST, N_COPY_SECOND]]
  assert "3 of 10 listed images absent, skipped" in caplog.text
  # keep_duplicates keeps the near-duplicate test image; the report still has the pair.
  keys = {k for split in read_all("covid_cxr/keep_duplicates", tmp_path).values() for k in split}
  assert "covid-chestxray-dataset/images/dup-of-t1.png" in keys
  kinds = {(p["kind"], p["cross_split"]) for p in report["pairs"]}
  assert kinds == {("near", True), ("exact", False)}


def test_only_present_normal_folders_are_needed(tmp_path):
  manual = make_cxr_tree(tmp_path / "manual", normal_splits=("train",))
  build(manual, tmp_path / "data")
  splits = read_all("covid_cxr", tmp_path / "data")
  assert not any(k.startswith("chest_xray/val") for s in splits.values() for k in s)


def _drop_present_covid(root: Path) -> None:
  for path in (root / "covid-chestxray-dataset/images").iterdir():
    if path.name not in ("nofinding.jpg", "ct.png", "lateral.png", "sars.png"):
      path.unlink()


BAD_INPUTS = {
  "no covid image present": (_drop_present_covid, "no COVID-19 frontal X-ray image found"),
  "unparseable normal name": (
    lambda root: smooth_image(1).save(root / "chest_xray/train/NORMAL/person1_bacteria_1.jpeg"),
    "person1_bacteria_1.jpeg: cannot derive a patient id",
  ),
  "non-image normal file": (
    lambda root: (root / f"chest_xray/test/NORMAL/{N_TEST}-0009.jpeg").write_text("oops"),
    f"{N_TEST}-0009.jpeg: not an image",
  ),
  "truncated covid image": (
    lambda root: (root / "covid-chestxray-dataset/images/t2.jpeg").write_bytes(
      (root / "covid-chestxray-dataset/images/t2.jpeg").read_bytes()[:300]
    ),
    "t2.jpeg: corrupt or truncated",
  ),
  "missing metadata column": (
    lambda root: (root / "covid-chestxray-dataset/metadata.csv").write_text(
      "patientid,finding\n1,x\n"
    ),
    "metadata.csv: missing columns",
  ),
  "no normal folders": (
    lambda root: shutil.rmtree(root / "chest_xray"),
    "chest-xray-pneumonia",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_the_build_and_names_it(case, tree, tmp_path):
  mutate, message = BAD_INPUTS[case]
  manual = tmp_path / "manual"
  shutil.copytree(tree, manual)
  mutate(manual)
  with pytest.raises(DatasetError, match=message.replace(".", r"\.")):
    build(manual, tmp_path / "data")
  assert_nothing_prepared(tmp_path / "data", "covid_cxr")


def test_no_data_says_what_to_download_and_which_flag(tmp_path):
  with pytest.raises(DatasetError) as error:
    build(tmp_path / "nowhere", tmp_path / "data")
  message = str(error.value)
  for needle in (
    "kaggle.com",
    "DIR/chest_xray/train/NORMAL",
    "github.com/ieee8023",
    "DIR/covid-chestxray-dataset/metadata.csv",
    "--config.manual_dir=DIR",
  ):
    assert needle in message
  assert_nothing_prepared(tmp_path / "data", "covid_cxr")


def test_covid_part_downloads_without_network(tree, tmp_path, monkeypatch):
  """NORMAL from manual_dir; the ieee8023 archive is fetched (here: faked) when absent."""
  manual = tmp_path / "manual"
  shutil.copytree(tree / "chest_xray", manual / "chest_xray")
  extracted = tmp_path / "extracted"
  shutil.copytree(
    tree / "covid-chestxray-dataset", extracted / f"covid-chestxray-dataset-{'0' * 40}"
  )
  requested = []

  def fake_download_and_extract(self, url):
    requested.append(url)
    return extracted

  monkeypatch.setattr(common, "downloads_allowed", lambda: True)
  monkeypatch.setattr(
    tfds.download.DownloadManager, "download_and_extract", fake_download_and_extract
  )
  builder = build(manual, tmp_path / "data")
  archive = "584034aa7fbf06496741f11008d72fd791c8e443.zip"
  assert requested == [f"https://github.com/ieee8023/covid-chestxray-dataset/archive/{archive}"]
  assert builder.info.splits["train"].num_examples > 0


# ---------------------------------------------------------------------------------------------
# covid_cxr/adult: COVID-19 vs other adult lung disease, ieee8023 only.
# ---------------------------------------------------------------------------------------------

_OTHER_DISEASE = {  # filename -> (patient, finding, view, source, age) of every kept negative.
  "strep1.jpg": (O_TRAIN, "Pneumonia/Bacterial/Streptococcus", "PA", "eurorad", 41),
  "strep2.png": (O_TRAIN, "Streptococcus", "AP", "unknown", -1),
  "pcp.png": (O_VAL, "Pneumocystis", "AP Supine", "ncbi", -1),
  "leg.jpg": (O_TEST, "Legionella", "PA", "unknown", -1),
  "sars.png": ("998", "SARS", "PA", "rsna", -1),
}


@pytest.fixture(scope="module")
def adult(tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("adult")
  return build(tree, data_dir, "adult_keep_duplicates"), read_all(
    "covid_cxr/adult_keep_duplicates", data_dir
  )


def test_adult_negatives_are_other_lung_disease_with_their_features(adult):
  builder, splits = adult
  examples = {k: (split, e) for split, ex in splits.items() for k, e in ex.items()}
  negatives = {k: e for k, (_, e) in examples.items() if int(e["label"]) == 0}
  prefix = "covid-chestxray-dataset/images/"
  assert set(negatives) == {prefix + f for f in _OTHER_DISEASE}  # No Kermany, todo, lateral.
  for name, (patient, finding, view, source, age) in _OTHER_DISEASE.items():
    split, e = examples[prefix + name]
    got = tuple(e[k].decode() for k in ("patient_id", "finding", "view", "source"))
    assert got + (int(e["age"]),) == (patient, finding, view, source, age)
    assert split == documented_split(patient)  # The same salted rule as covid_cxr.
  covid = {k for k, (_, e) in examples.items() if int(e["label"]) == 1}
  assert covid == {k for k in expected_splits() if k.startswith("covid-chestxray")}
  assert builder.info.features["age"].np_dtype == np.int32


def test_adult_build_counts_and_audit(adult):
  builder, _ = adult
  build_counts = audit.read_report(builder.data_path)["build"]
  # Frontal X-rays listed: 10 COVID (3 absent) + 6 other disease (leg.jpg once, 1 absent).
  assert (build_counts["ieee8023_listed"], build_counts["ieee8023_absent_skipped"]) == (16, 4)
  assert (build_counts["covid_kept"], build_counts["other_disease_kept"]) == (7, 5)
  assert build_counts["ieee8023_listed_twice"] == ["images/v1.png", "images/leg.jpg"]
  assert "normal_folders" not in build_counts  # Kermany is not read.


def test_adult_needs_no_kermany_images(tree, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(tree / "covid-chestxray-dataset", manual / "covid-chestxray-dataset")
  build(manual, tmp_path / "data", "adult")
  splits = read_all("covid_cxr/adult", tmp_path / "data")
  assert "covid-chestxray-dataset/images/dup-of-t1.png" not in splits["test"]  # Left out.


def _drop_other_disease(root: Path) -> None:
  for name in _OTHER_DISEASE:
    (root / "covid-chestxray-dataset/images" / name).unlink()


def _bad_age(root: Path) -> None:
  path = root / "covid-chestxray-dataset/metadata.csv"
  path.write_text(path.read_text().replace("41.0", "forty"))


@pytest.mark.parametrize(
  "mutate,message",
  [
    (_drop_other_disease, "no frontal X-ray of another lung disease found"),
    (_bad_age, "age 'forty' is not a number"),
  ],
)
def test_adult_bad_input_stops_the_build_and_names_it(mutate, message, tree, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(tree, manual)
  mutate(manual)
  with pytest.raises(DatasetError, match=message) as error:
    build(manual, tmp_path / "data", "adult")
  assert "metadata.csv" in str(error.value)
  assert_nothing_prepared(tmp_path / "data", "covid_cxr")


@pytest.mark.parametrize(
  "url,site",
  [
    ("https://radiopaedia.org/cases/x", "radiopaedia"),
    ("https://www.eurorad.org/case/10483", "eurorad"),
    ("https://www.sirm.org/2020/03/covid-19-caso-1/", "sirm"),
    ("https://pubs.rsna.org/doi/10.1148/x", "rsna"),
    ("https://pubmed.ncbi.nlm.nih.gov/1/", "ncbi"),
    ("https://www.ams.edu.sg/x", "ams"),
    ("https://github.com/ml-workgroup/covid-19-image-repository", "github"),
    ("", "unknown"),
    ("not a url", "unknown"),
  ],
)
def test_site_of_url(url, site):
  assert covid_cxr.site_of_url(url) == site


def test_other_disease_rule():
  assert covid_cxr.is_other_disease("SARS")
  assert covid_cxr.is_other_disease("Pneumonia/Bacterial/Klebsiella")
  for finding in ("COVID-19", "Pneumonia/Viral/COVID-19", "No Finding", "todo", "Unknown", ""):
    assert not covid_cxr.is_other_disease(finding)


def test_no_finding_probe_lists_the_present_frontal_no_finding_films(tree, tmp_path):
  root = tree / "covid-chestxray-dataset"
  rows, absent = covid_cxr.no_finding_probe(root)
  assert (rows, absent) == (
    [{"relpath": "images/nofinding.jpg", "label": "non_covid", "patient_id": P_TRAIN,
      "source": "unknown", "view": "PA"}],
    0,
  )  # fmt: skip
  manual = tmp_path / "manual"
  shutil.copytree(root, manual)
  (manual / "images/nofinding.jpg").unlink()
  with pytest.raises(
    DatasetError, match=r"metadata.csv: no frontal 'No Finding' X-ray present \(1"
  ):
    covid_cxr.no_finding_probe(manual)

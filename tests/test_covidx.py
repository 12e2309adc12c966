"""covidx_cxr and covidx_ct builders on small fake trees in the exact upstream layouts."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import assert_nothing_prepared, smooth_image
from PIL import Image

from covid_flax.datasets import audit, common, covidx_ct, covidx_cxr
from covid_flax.datasets.common import DatasetError


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
  monkeypatch.setenv(common.NO_DOWNLOAD_ENV, "1")


def _build(cls, manual: Path, data_dir: Path, config: str):
  builder = cls(config=config, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def _read(name: str, data_dir: Path) -> dict[str, dict[str, dict]]:
  sources = tfds.data_source(name, data_dir=data_dir, download=False)
  return {s: {x[i]["filename"].decode(): x[i] for i in range(len(x))} for s, x in sources.items()}


def _text(example, feature):
  return example[feature].decode()


# ---------------------------------------------------------------------------------------------
# covidx_cxr
# ---------------------------------------------------------------------------------------------


def _patients(n_val: int, n_train: int) -> tuple[list[str], list[str]]:
  """Patient ids that the documented rule sends to val (fraction < 0.1) and keeps in train."""
  val, train, i = [], [], 0
  while len(val) < n_val or len(train) < n_train:
    pid = f"p{i}"
    fraction = common.salted_fraction("covidx_cxr:", pid)
    (val if fraction < covidx_cxr.VAL_FRACTION else train).append(pid)
    i += 1
  return val[:n_val], train[:n_train]


VAL_PATIENTS, TRAIN_PATIENTS = _patients(2, 3)

# (split, line without the label, label 9A, label 9B, trailing source or None). Quirks: a patient id
# with a space, 'rnsa', a line without source, two films of one patient.
_CXR_LINES = [
  ("train", "COVID 1 COVID(1).png", "COVID-19", "positive", "sirm"),
  ("train", "0a1b-2c3d rsna-a.png", "normal", "negative", "rnsa"),
  ("train", "4e5f-6a7b rsna-b.png", "pneumonia", "negative", None),
  ("train", f"{TRAIN_PATIENTS[0]} t0.jpeg", "COVID-19", "positive", "cohen"),
  ("train", f"{TRAIN_PATIENTS[1]} t1.png", "normal", "negative", "stonybrook"),
  ("train", f"{TRAIN_PATIENTS[2]} t2.png", "pneumonia", "negative", "rsna"),
  ("train", f"{VAL_PATIENTS[0]} v0a.png", "COVID-19", "positive", "bimcv"),
  ("train", f"{VAL_PATIENTS[0]} v0b.png", "COVID-19", "positive", "bimcv"),
  ("train", f"{VAL_PATIENTS[1]} v1.png", "normal", "negative", "rsna"),
  ("test", "419639-003251 ricord.png", "COVID-19", "positive", "ricord"),
  ("test", "x9 rsna-t1.png", "normal", "negative", "rsna"),
  ("test", "x10 rsna-t2.png", "pneumonia", "negative", "rsna"),
]


def _write_label_files(root: Path, version: str, lines, eol="\n") -> None:
  (root / "labels").mkdir(parents=True, exist_ok=True)
  for split in ("train", "test"):
    text = ""
    for s, head, label_a, label_b, source in lines:
      if s == split:
        label = label_a if version.endswith("A") else label_b
        text += f"{head} {label}" + (f" {source}" if source else "") + eol
    (root / "labels" / f"{split}_COVIDx{version}.txt").write_text(text, newline="")


def _cxr_tree(root: Path) -> Path:
  for i, (split, head, *_) in enumerate(_CXR_LINES):
    folder = root / "data" / split
    folder.mkdir(parents=True, exist_ok=True)
    smooth_image(100 + i).save(folder / head.split()[-1], format="PNG")
  smooth_image(99).save(root / "data" / "train" / "unlisted.png")
  _write_label_files(root, "9A", _CXR_LINES, eol="\r\n")
  _write_label_files(root, "9B", _CXR_LINES)
  return root


@pytest.fixture(scope="module")
def cxr_tree(tmp_path_factory):
  return _cxr_tree(tmp_path_factory.mktemp("covidx_cxr"))


@pytest.fixture(scope="module")
def cxr_9a(cxr_tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("cxr_data")
  builder = _build(covidx_cxr.CovidxCxr, cxr_tree, data_dir, "9a")
  return builder, _read("covidx_cxr/9a", data_dir)


def test_cxr_parses_from_the_right():
  parse = covidx_cxr.parse_label_line
  assert parse("COVID 1 COVID(1).png COVID-19 sirm", "f:1") == covidx_cxr.LabelLine(
    "COVID 1", "COVID(1).png", "covid-19", "sirm"
  )
  assert parse("a b rnsa.png pneumonia", "f:2").source == "unknown"
  assert parse("a b rnsa.png pneumonia", "f:2").patient_id == "a b"
  assert parse("7 x.png Negative RNSA", "f:3").source == "rsna"
  for bad in ("7 x.png covid", "x.png normal", "7 x.png sick rsna", ""):
    with pytest.raises(DatasetError, match="f:9: expected 'patient_id filename label"):
      parse(bad, "f:9")


def test_cxr_9a_splits_labels_and_features(cxr_9a):
  builder, splits = cxr_9a
  expected = {}
  for split, head, label_a, _, source in _CXR_LINES:
    patient, name = head.rsplit(" ", 1)
    if split == "train" and patient in VAL_PATIENTS:
      split = "val"
    expected[f"{'test' if split == 'test' else 'train'}/{name}"] = (
      split,
      int(label_a == "COVID-19"),
      patient,
      label_a.lower(),
      {"rnsa": "rsna", None: "unknown"}.get(source, source),
    )
  found = {
    key: (split, int(e["label"]), _text(e, "patient_id"), _text(e, "finding"), _text(e, "source"))
    for split, examples in splits.items()
    for key, e in examples.items()
  }
  assert found == expected
  image = splits["train"]["train/COVID(1).png"]["image"]
  np.testing.assert_array_equal(image[..., 0], np.asarray(smooth_image(100)))
  report = audit.read_report(builder.data_path)
  assert report["build"]["val_carved_from_train"] == {"patients": 2, "images": 3}
  assert report["build"]["unlisted_files"] == {"train": 1, "test": 0}


def test_cxr_9b_is_binary_with_the_upstream_finding(cxr_tree, tmp_path):
  _build(covidx_cxr.CovidxCxr, cxr_tree, tmp_path, "9b_keep_duplicates")
  splits = _read("covidx_cxr/9b_keep_duplicates", tmp_path)
  examples = [e for s in splits.values() for e in s.values()]
  assert {(_text(e, "finding"), int(e["label"])) for e in examples} == {
    ("positive", 1),
    ("negative", 0),
  }


def test_cxr_uses_a_val_file_when_the_version_has_one(cxr_tree, tmp_path):
  root = tmp_path / "tree"
  _cxr_tree(root)
  (root / "data" / "val").mkdir()
  smooth_image(300).save(root / "data" / "val" / "own-val.png")
  (root / "labels" / "val_COVIDx9A.txt").write_text("v9 own-val.png COVID-19 ricord\n")
  data = tmp_path / "data"
  builder = _build(covidx_cxr.CovidxCxr, root, data, "9a")
  assert list(_read("covidx_cxr/9a", data)["val"]) == ["val/own-val.png"]
  assert "val_carved_from_train" not in audit.read_report(builder.data_path)["build"]


@pytest.mark.parametrize(
  "change, message",
  [
    (
      lambda r: (r / "data/train/t1.png").unlink(),
      r"train_COVIDx9A.txt: 1 of 9 listed images are not in",
    ),
    (
      lambda r: (r / "labels/test_COVIDx9A.txt").write_text("q t1.png normal rsna\n"),
      r"'t1.png' is also in the train list",
    ),
    (
      lambda r: (r / "labels/test_COVIDx9A.txt").write_text("q a.png normal\nq a.png normal\n"),
      r"test_COVIDx9A.txt:2: 'a.png' is listed again \(first on line 1\)",
    ),
    (
      lambda r: (r / "labels/test_COVIDx9A.txt").write_text("q a.png sick rsna\n"),
      r"test_COVIDx9A.txt:1: expected 'patient_id filename label",
    ),
    (lambda r: (r / "data/test/ricord.png").write_bytes(b"not an image"), r"ricord.png"),
    (lambda r: (r / "labels/test_COVIDx9A.txt").unlink(), r"no train_/test_COVIDx9A.txt"),
  ],
)
def test_cxr_bad_inputs_name_the_culprit_and_write_nothing(tmp_path, change, message):
  root = _cxr_tree(tmp_path / "tree")
  change(root)
  with pytest.raises(DatasetError, match=message):
    _build(covidx_cxr.CovidxCxr, root, tmp_path / "data", "9a")
  assert_nothing_prepared(tmp_path / "data", "covidx_cxr", "9a")


def test_cxr_without_data_says_what_to_download(tmp_path):
  with pytest.raises(DatasetError, match=r"(?s)lindawangg/COVID-Net.*--config.manual_dir=DIR"):
    _build(covidx_cxr.CovidxCxr, tmp_path / "empty", tmp_path / "data", "9a")


# ---------------------------------------------------------------------------------------------
# covidx_ct
# ---------------------------------------------------------------------------------------------

_META = [  # patient id, source, finding
  ("NCP_96", "CNCB", "COVID-19"),
  ("NCP_9", "CNCB", "COVID-19"),  # A prefix of NCP_96: must not capture its slices.
  ("CP_3", "CNCB", "Pneumonia"),
  ("Normal_7", "CNCB", "Normal"),
  ("patient392", "COVID-CTset", "Normal"),
  ("volume-covid19-A-0003", "TCIA", "COVID-19"),
  ("LIDC-IDRI-0001", "LIDC-IDRI", "Normal"),
]
_BOX = (4, 6, 60, 44)  # Inside a 64 x 48 slice.
# split, filename, class, patient, image seed. NCP_96 has three neighbouring (near-duplicate)
# slices in train; 'Normal_7_..._0001' (test) is a copy of CP_3's train slice: cross-split leakage.
_CT_LINES = [
  ("train", "NCP_96_1328_0032.png", 2, "NCP_96", 1),
  ("train", "NCP_96_1328_0033.png", 2, "NCP_96", 1),
  ("train", "NCP_96_1328_0034.png", 2, "NCP_96", 1),
  ("train", "NCP_9_1_0001.png", 2, "NCP_9", 2),
  ("train", "CP_3_77_0010.png", 1, "CP_3", 3),
  ("train", "normal5_patient392_SR_2_IM00019.png", 0, "patient392", 4),
  ("val", "volume-covid19-A-0003_ct-0042.png", 2, "volume-covid19-A-0003", 5),
  ("val", "LIDC-IDRI-0001-1.3.6.1.4-0184.png", 0, "LIDC-IDRI-0001", 6),
  ("test", "Normal_7_1163_0068.png", 0, "Normal_7", 7),
  ("test", "Normal_7_1163_0001.png", 0, "Normal_7", 3),
  ("test", "NCP_96_2000_0001.png", 2, "NCP_96", 8),
  ("test", "NCP_868_2396_0063.png", 2, "NCP_868", 9),  # CNCB name, patient not in metadata.csv.
]


def _ct_slice(seed: int, name: str) -> Image.Image:
  image = np.asarray(smooth_image(seed), np.int16)
  bump = int(name[-6:-4]) % 3  # Neighbouring slices differ a little.
  return Image.fromarray(np.clip(image + bump, 0, 255).astype(np.uint8))


def _ct_tree(root: Path, version="3A", lines=_CT_LINES) -> Path:
  images = root / f"{version}_images"
  images.mkdir(parents=True)
  with open(root / "metadata.csv", "w") as f:
    f.write(
      "patient id,source,country,sex,age,finding,verified finding,slice selection,view,modality\n"
    )
    for patient, source, finding in _META:
      f.write(f"{patient},{source},,,,{finding},Yes,Expert,Axial,CT\n")
  for split in ("train", "val", "test"):
    with open(root / f"{split}_COVIDx_CT-{version}.txt", "w") as f:
      for s, name, klass, _, seed in lines:
        if s == split:
          _ct_slice(seed, name).save(images / name)
          f.write(f"{name} {klass} {' '.join(map(str, _BOX))}\n")
  return root


@pytest.fixture(scope="module")
def ct_3a(tmp_path_factory):
  root = _ct_tree(tmp_path_factory.mktemp("covidx_ct"))
  data_dir = tmp_path_factory.mktemp("ct_data")
  builder = _build(covidx_ct.CovidxCt, root, data_dir, "3a")
  return builder, _read("covidx_ct/3a", data_dir)


def test_ct_patient_of_is_token_bounded_and_longest():
  ids = {p for p, *_ in _META}
  for _, name, _, patient, _ in _CT_LINES:
    if patient != "NCP_868":
      assert covidx_ct.patient_of(name, ids) == patient
  assert covidx_ct.patient_of("NCP_961_1_0001.png", ids) is None
  assert covidx_ct.patient_of("XNCP_96_1_0001.png", ids) is None


def test_ct_splits_crop_finding_source(ct_3a):
  builder, splits = ct_3a
  source = {**dict((p, s) for p, s, _ in _META), "NCP_868": "CNCB"}
  kept = {}
  for split, name, klass, patient, seed in _CT_LINES:
    kept[name] = (split, int(klass == 2), patient, covidx_ct.FINDINGS[klass], source[patient])
  del kept["Normal_7_1163_0001.png"]  # The test copy of a train slice: left out (default config).
  found = {
    key: (split, int(e["label"]), _text(e, "patient_id"), _text(e, "finding"), _text(e, "source"))
    for split, examples in splits.items()
    for key, e in examples.items()
  }
  assert found == kept
  example = splits["val"]["volume-covid19-A-0003_ct-0042.png"]
  crop = np.asarray(_ct_slice(5, "volume-covid19-A-0003_ct-0042.png").crop(_BOX))
  np.testing.assert_array_equal(example["image"][..., 0], crop)
  assert example["bbox"].tolist() == list(_BOX)
  report = audit.read_report(builder.data_path)
  assert report["summary"]["within_patient_pairs_not_listed"] == 3  # NCP_96's three slices.
  assert [e["key"] for e in report["excluded"]] == ["Normal_7_1163_0001.png"]
  assert report["splits"]["train"] == {"covid": 4, "non_covid": 2}
  assert report["build"]["patients_from_cncb_names"] == 1


def test_ct_b_variant_takes_val_and_test_from_a(tmp_path):
  root = _ct_tree(tmp_path / "tree")
  (root / "train_COVIDx_CT-3A.txt").rename(root / "train_COVIDx_CT-3B.txt")
  _build(covidx_ct.CovidxCt, root, tmp_path / "data", "3b_keep_duplicates")
  splits = _read("covidx_ct/3b_keep_duplicates", tmp_path / "data")
  assert {s: len(x) for s, x in splits.items()} == {"train": 6, "val": 2, "test": 4}


@pytest.mark.parametrize(
  "line, message",
  [
    ("NCP_9_2_0001.png 2 0 0 65 48", r"test_COVIDx_CT-3A.txt:1: box \(xmin 0, ymin 0, xmax 65"),
    ("NCP_9_2_0001.png 2 10 0 10 48", r"box .* is not inside NCP_9_2_0001.png \(64x48\)"),
    ("NCP_9_2_0001.png 3 0 0 8 8", r"test_COVIDx_CT-3A.txt:1: class 3 is not 0"),
    ("NCP_9_2_0001.png 2 0 0 8", r"test_COVIDx_CT-3A.txt:1: expected 'filename class xmin"),
    (
      "NCP_9_1_0001.png 2 0 0 8 8",
      r"test_COVIDx_CT-3A.txt:1: 'NCP_9_1_0001.png' is also in the train",
    ),
    ("Mystery_1_0001.png 0 0 0 8 8", r"1 slices match no patient id of .*metadata.csv"),
    ("NCP_9_404.png 2 0 0 8 8", r"'NCP_9_404.png' is not in"),
  ],
)
def test_ct_bad_lines_name_the_file_and_line_and_write_nothing(tmp_path, line, message):
  root = _ct_tree(tmp_path / "tree")
  for name in ("Mystery_1_0001.png", "NCP_9_2_0001.png"):
    smooth_image(1).save(root / "3A_images" / name)
  (root / "test_COVIDx_CT-3A.txt").write_text(line + "\n")
  with pytest.raises(DatasetError, match=message):
    _build(covidx_ct.CovidxCt, root, tmp_path / "data", "3a")
  assert_nothing_prepared(tmp_path / "data", "covidx_ct", "3a")


def test_ct_without_data_says_what_to_download(tmp_path):
  with pytest.raises(DatasetError, match=r"(?s)val_COVIDx_CT-2A.txt.*kaggle.*--config.manual_dir"):
    _build(covidx_ct.CovidxCt, tmp_path / "empty", tmp_path / "data", "2a")


# ---------------------------------------------------------------------------------------------
# End to end: train on a fake COVIDx CXR tree, evaluate, results by finding and source.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_and_evaluate_on_covidx_cxr_reports_specificity_per_finding(tmp_path):
  import json

  from helpers import tiny_config

  from covid_flax import evaluation, inference, input_pipeline, train

  root = tmp_path / "covidx"
  findings = ("COVID-19", "normal", "pneumonia")
  lines = []
  for i in range(96):
    split = "test" if i % 4 == 0 else "train"
    finding, source = findings[i % 3], ("cohen", "rsna")[(i // 4) % 2]
    lines.append((split, f"p{i} img{i}.png", finding, "", source))
    image = np.asarray(smooth_image(1000 + i), np.float32) * (0.5 if finding == "COVID-19" else 1)
    (root / "data" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint8)).save(root / "data" / split / f"img{i}.png")
  _write_label_files(root, "9A", lines)
  config = tiny_config(
    str(tmp_path / "tfds"), dataset="covidx_cxr/9a", manual_dir=str(root), batch_size=8
  )
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  run = inference.load_run(workdir, "best")
  out = evaluation.evaluate(run, input_pipeline.load_split(run.config, "test"), "test", 100)
  results = json.load(open(Path(out) / "metrics.json"))
  by_finding = results["subgroups"]["finding"]
  assert set(by_finding) == {"covid-19", "normal", "pneumonia"}
  for finding in ("normal", "pneumonia"):
    group = by_finding[finding]
    assert group["counts"]["n_positive"] == 0 and group["counts"]["n_negative"] == 8
    assert 0 <= group["metrics"]["specificity"]["value"] <= 1
  assert set(results["subgroups"]["source"]) == {"cohen", "rsna"}
  report = (Path(out) / "report.md").read_text()
  assert "By finding:" in report and "| pneumonia |" in report


def test_splits_larger_than_the_shuffle_buffer_spill_to_disk_without_tensorflow(
  tmp_path, monkeypatch
):
  """TFDS spills a split over its 1 GB buffer through tf.io.gfile; with a 1 kB buffer this tiny
  build spills too (its PNGs are ~1 kB), and must work (and read back whole) without TensorFlow."""
  from tensorflow_datasets.core import shuffle

  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1_000)
  root = _cxr_tree(tmp_path / "tree")
  _build(covidx_cxr.CovidxCxr, root, tmp_path / "data", "9a")
  splits = _read("covidx_cxr/9a", tmp_path / "data")
  assert sum(len(s) for s in splits.values()) == len(_CXR_LINES)
  image = splits["train"]["train/COVID(1).png"]["image"]
  np.testing.assert_array_equal(image[..., 0], np.asarray(smooth_image(100)))

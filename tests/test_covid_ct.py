"""covid_ct builder on small fake upstream trees; image_io and audit unit tests."""

import io
import json
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import tensorflow_datasets as tfds
from helpers import assert_nothing_prepared, smooth_image
from PIL import Image

from configs import default
from covid_flax import config_lib, input_pipeline
from covid_flax.datasets import audit, common, covid_ct, image_io
from covid_flax.datasets.common import DatasetError


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
  monkeypatch.setenv(common.NO_DOWNLOAD_ENV, "1")


def png_bomb(path: Path, width: int = 40000, height: int = 40000) -> None:
  """A tiny PNG whose header claims width x height pixels."""
  buffer = io.BytesIO()
  Image.new("L", (8, 8)).save(buffer, "PNG")
  data = bytearray(buffer.getvalue())
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
  path.write_bytes(bytes(data))


# name: (split, patient id, how to write it). COVID 'kjr-dup.png' (test) is a rescaled copy of
# NonCOVID '71%0.jpg' (train): the planted cross-class, cross-split near duplicate.
_COVID = {
  "a-p1-1.png": ("train", "Patient 1", "RGBA"),
  "2020.01.24.919183-p27-1.png": ("train", "Patient 2", "P"),
  "a-p1-2.png": ("train", "Patient 1", "JPEG-in-png"),
  "b-p3.png": ("val", "Patient 3", "I;16"),
  "c-p4.png": ("val", "Patient 4", "RGB"),
  "kjr-dup.png": ("test", "Patient 5", "dup"),
  "d-p6.png": ("test", "Patient 6", "L"),
  "e-p7.png": ("test", "Patient 7", "L"),
}
_NONCOVID = {
  "0.jpg": ("train", "crawled_patient_0", "JPEG"),
  "1%0.jpg": ("train", "crawled_patient_1", "JPEG"),
  "71%0.jpg": ("train", "crawled_patient_71", "JPEG"),
  "10.png": ("val", "medpix_patient_1", "RGB"),
  "11.png": ("val", "medpix_patient_2", "L"),
  "20.png": ("test", "medpix_patient_3", "L"),
  "21.png": ("test", "medpix_patient_4", "RGB"),
}


_XLSX_COLUMNS = "File name,Patient ID,Age,Gender,Location,Medical history,Time,Severity,Other diseases,DOI,Captions"


def _write_image(path: Path, how: str, seed: int) -> None:
  gray = smooth_image(seed)
  if how == "dup":
    source = smooth_image(_seed("71%0.jpg"))
    source.resize((80, 60), Image.Resampling.BILINEAR).save(path, "PNG")
  elif how in ("JPEG", "JPEG-in-png"):
    gray.convert("RGB").save(path, "JPEG", quality=90)
  elif how == "RGBA":
    rgba = gray.convert("RGBA")
    rgba.putalpha(255)
    rgba.save(path, "PNG")
  elif how == "I;16":
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(path, "PNG")
  else:
    gray.convert(how).save(path, "PNG")


def _seed(name: str) -> int:
  return zlib.crc32(name.encode())


def make_ct_tree(manual_dir: Path) -> Path:
  """The upstream COVID-CT layout under manual_dir/COVID-CT; returns that root."""
  root = manual_dir / "COVID-CT"
  for folder, split_dir, table in (
    ("CT_COVID", "COVID", _COVID),
    ("CT_NonCOVID", "NonCOVID", _NONCOVID),
  ):
    images = root / "Images-processed" / folder
    images.mkdir(parents=True)
    (root / "Data-split" / split_dir).mkdir(parents=True)
    for name, (_, _, how) in table.items():
      _write_image(images / name, how, _seed(name))
    for split in common.SPLITS:
      names = [n for n, (s, _, _) in table.items() if s == split]
      # Like upstream: NonCOVID lists have CRLF line ends; no list here ends with a newline.
      newline = "\r\n" if split_dir == "NonCOVID" else "\n"
      (root / "Data-split" / split_dir / f"{split}CT_{split_dir}.txt").write_bytes(
        newline.join(names).encode()
      )
  (root / "Images-processed" / "CT_NonCOVID" / ".DS_Store").write_bytes(b"\0junk")
  smooth_image(999).save(root / "Images-processed" / "CT_NonCOVID" / "unlisted.png")
  workbook = openpyxl.Workbook()
  sheet = workbook.active
  sheet.title = "positive_captions"
  sheet.append(_XLSX_COLUMNS.split(","))
  for i, (name, (_, patient, _)) in enumerate(_COVID.items()):
    shown = name[:-4] if i % 2 else name  # Upstream: 83 names have no extension.
    sheet.append(
      [shown, patient + " ", 50, "M", "", "", "", "", "", f"10.1000/{i}" if i else None, ""]
    )
  sheet.append([None] * 11)
  workbook.save(root / "COVID-CT-MetaInfo.xlsx")
  lines = [",image name,patient id"] + [
    f"{i},{name},{patient}" for i, (name, (_, patient, _)) in enumerate(_NONCOVID.items())
  ]
  (root / "NonCOVID-CT-MetaInfo.csv").write_text("\n".join(lines) + "\n")
  return root


def build(manual_dir: Path, data_dir: Path, config: str | None = None) -> covid_ct.CovidCt:
  builder = covid_ct.CovidCt(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder


def read_all(name: str, data_dir: Path) -> dict[str, list[dict]]:
  sources = tfds.data_source(name, data_dir=data_dir, download=False)
  return {split: [source[i] for i in range(len(source))] for split, source in sources.items()}


def counts(examples: list[dict]) -> tuple[int, int]:
  labels = [int(e["label"]) for e in examples]
  return labels.count(1), labels.count(0)


@pytest.fixture(scope="module")
def ct_tree(tmp_path_factory) -> Path:
  manual = tmp_path_factory.mktemp("manual")
  make_ct_tree(manual)
  return manual


@pytest.fixture(scope="module")
def built_keep(ct_tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  builder = build(ct_tree, data_dir, "keep_duplicates")
  return builder, read_all("covid_ct/keep_duplicates", data_dir)


def test_keep_duplicates_has_the_official_split(built_keep):
  builder, splits = built_keep
  assert {s: counts(e) for s, e in splits.items()} == {
    "train": (3, 3),
    "val": (2, 2),
    "test": (3, 2),
  }
  assert builder.info.homepage == "https://github.com/UCSD-AI4H/COVID-CT"
  assert "zhao2020COVID-CT-Dataset" in builder.info.citation
  assert list(Path(builder.data_path).glob("covid_ct-train.array_record*"))


def test_features(built_keep):
  _, splits = built_keep
  by_name = {e["filename"].decode(): e for examples in splits.values() for e in examples}
  assert set(by_name) == {f"CT_COVID/{n}" for n in _COVID} | {f"CT_NonCOVID/{n}" for n in _NONCOVID}
  for key, example in by_name.items():
    folder, name = key.split("/")
    table = _COVID if folder == "CT_COVID" else _NONCOVID
    assert example["image"].dtype == np.uint8 and example["image"].ndim == 3
    assert example["image"].shape[2] == 1
    assert example["patient_id"].decode() == table[name][1]  # Trailing space stripped.
    assert int(example["label"]) == (folder == "CT_COVID")
  assert by_name["CT_COVID/a-p1-1.png"]["image"].shape == (48, 64, 1)  # Original size.
  assert by_name["CT_COVID/kjr-dup.png"]["image"].shape == (60, 80, 1)
  covid = by_name["CT_COVID/2020.01.24.919183-p27-1.png"]
  assert (covid["source"].decode(), covid["doi"].decode()) == ("paper", "10.1000/1")
  noncovid = by_name["CT_NonCOVID/0.jpg"]
  assert (noncovid["source"].decode(), noncovid["doi"].decode()) == ("crawled", "")
  assert by_name["CT_NonCOVID/10.png"]["source"].decode() == "medpix"
  sources = {e["source"].decode() for e in by_name.values()}
  assert sources == {"paper", "crawled", "medpix"}
  # 16-bit is scaled (x*257 -> x), not clipped to 255.
  expected = np.asarray(smooth_image(_seed("b-p3.png")))
  np.testing.assert_array_equal(by_name["CT_COVID/b-p3.png"]["image"][..., 0], expected)


def test_train_sources_keeps_those_sources_for_training_only(built_keep):
  builder, _ = built_keep
  config = default.get_config()
  config.dataset = "covid_ct/keep_duplicates"
  config.data_dir = str(Path(builder.data_dir).parents[2])  # DATA_DIR/covid_ct/CONFIG/VERSION.
  config.image_size = 32
  config.train_split = "train+test"  # The fake tree's MedPix slices are in val and test.
  whole_train, whole_val = input_pipeline.load_train_and_eval(config)
  assert "medpix" in whole_train.attributes["source"]
  config.train_sources = "paper, crawled"
  for stream in (False, True):
    train, val = input_pipeline.load_train_and_eval(config, stream=stream)
    keep = whole_train.attributes["source"] != "medpix"
    np.testing.assert_array_equal(train.filenames, whole_train.filenames[keep])
    np.testing.assert_array_equal(train.labels, whole_train.labels[keep])
    np.testing.assert_array_equal(val.filenames, whole_val.filenames)  # Validation stays whole.
  test = input_pipeline.load_split(config, "test")  # Evaluations count what the run trained on.
  assert input_pipeline.count_trained_on(config, "test") == sum(
    test.attributes["source"] != "medpix"
  )
  config.train_sources = "paper,pubmed"
  with pytest.raises(config_lib.ConfigError, match=r"train_sources='paper,pubmed'.*\['pubmed'\]"):
    input_pipeline.load_train_and_eval(config)
  config.train_sources = "crawled,medpix"
  with pytest.raises(config_lib.ConfigError, match="train_sources='crawled,medpix' leaves one"):
    input_pipeline.load_train_and_eval(config)
  no_source = input_pipeline.SplitData(whole_train.images, whole_train.labels, None, None)
  with pytest.raises(config_lib.ConfigError, match="records no `source`"):
    input_pipeline.keep_sources(no_source, config)


def test_patient_wise(built_keep):
  _, splits = built_keep
  owner = {}
  for split, examples in splits.items():
    for e in examples:
      assert owner.setdefault((int(e["label"]), e["patient_id"]), split) == split


def test_audit_report_flags_the_planted_pair_and_default_excludes_it(ct_tree, built_keep, tmp_path):
  builder, _ = built_keep
  report = audit.read_report(builder.data_path)
  cross = [p for p in report["pairs"] if p["cross_split"]]
  assert len(cross) == 1 and cross[0]["cross_class"]
  assert {cross[0]["a"]["key"], cross[0]["b"]["key"]} == {
    "CT_COVID/kjr-dup.png",
    "CT_NonCOVID/71%0.jpg",
  }
  assert report["summary"]["excluded_from_test"] == 0
  assert report["build"]["unlisted_files"] == {"CT_COVID": [], "CT_NonCOVID": ["unlisted.png"]}

  default = build(ct_tree, tmp_path)
  assert default.builder_config.name == "exclude_duplicates"
  splits = read_all("covid_ct", tmp_path)
  assert {s: counts(e) for s, e in splits.items()} == {
    "train": (3, 3),
    "val": (2, 2),
    "test": (2, 2),
  }
  report = json.loads((Path(default.data_path) / audit.REPORT_FILENAME).read_text())
  assert [e["key"] for e in report["excluded"]] == ["CT_COVID/kjr-dup.png"]
  assert report["splits"]["test"] == {"covid": 2, "non_covid": 2}


def test_zipped_images_and_determinism(ct_tree, built_keep, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(ct_tree, manual)
  images = manual / "COVID-CT" / "Images-processed"
  with zipfile.ZipFile(images / "CT_COVID.zip", "w") as archive:
    for path in sorted((images / "CT_COVID").iterdir()):
      archive.write(path, f"CT_COVID/{path.name}")
  shutil.rmtree(images / "CT_COVID")
  builder = build(manual, tmp_path / "data", "keep_duplicates")
  reference, _ = built_keep
  for path in sorted(Path(reference.data_path).glob("*.array_record*")):
    assert (Path(builder.data_path) / path.name).read_bytes() == path.read_bytes()


def _append_to_list(root: Path, list_name: str, name: str) -> None:
  path = next((root / "Data-split").glob(f"*/{list_name}"))
  path.write_bytes(path.read_bytes().rstrip() + b"\r\n" + name.encode())


def _corrupt(root, name="d-p6.png"):
  (root / "Images-processed/CT_COVID" / name).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))


def _truncate(root, name="0.jpg"):
  path = root / "Images-processed/CT_NonCOVID" / name
  path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _write(relative: str, text: str):
  return lambda root: (root / relative).write_text(text)


def _unlink(relative: str):
  return lambda root: (root / relative).unlink()


BAD_INPUTS = {
  "corrupt image": (_corrupt, "d-p6.png"),
  "truncated image": (_truncate, "0.jpg"),
  "non-image file": (_write("Images-processed/CT_COVID/e-p7.png", "not an image"), "e-p7.png"),
  "listed but missing": (_unlink("Images-processed/CT_NonCOVID/21.png"), "21.png"),
  "listed twice": (lambda root: _append_to_list(root, "trainCT_NonCOVID.txt", "0.jpg"), "0.jpg"),
  "in two splits": (lambda root: _append_to_list(root, "testCT_NonCOVID.txt", "10.png"), "10.png"),
  "decompression bomb": (
    lambda root: png_bomb(root / "Images-processed/CT_COVID/d-p6.png"),
    "d-p6.png",
  ),
  "no patient id": (
    lambda root: _append_to_list(root, "trainCT_NonCOVID.txt", "unlisted.png"),
    "unlisted.png",
  ),
  "empty class": (
    lambda root: [p.write_bytes(b"") for p in (root / "Data-split/COVID").iterdir()],
    "no 'covid' images",
  ),
  "missing split list": (_unlink("Data-split/COVID/valCT_COVID.txt"), "valCT_COVID.txt"),
  "missing meta": (_unlink("NonCOVID-CT-MetaInfo.csv"), "NonCOVID-CT-MetaInfo.csv"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_the_build_and_names_it(case, ct_tree, tmp_path):
  mutate, named = BAD_INPUTS[case]
  manual = tmp_path / "manual"
  shutil.copytree(ct_tree, manual)
  mutate(manual / "COVID-CT")
  with pytest.raises(DatasetError, match=named.replace(".", r"\.")):
    build(manual, tmp_path / "data")
  assert_nothing_prepared(tmp_path / "data", "covid_ct", "exclude_duplicates")


def test_every_unusable_image_is_named_in_one_error(ct_tree, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(ct_tree, manual)
  _corrupt(manual / "COVID-CT")
  _truncate(manual / "COVID-CT")
  with pytest.raises(DatasetError, match="2 of .* images cannot be used") as e:
    build(manual, tmp_path / "data")
  assert "d-p6.png" in str(e.value) and "0.jpg" in str(e.value)
  assert_nothing_prepared(tmp_path / "data", "covid_ct", "exclude_duplicates")


def test_failure_while_writing_leaves_no_dataset(ct_tree, tmp_path, monkeypatch):
  calls, original = [], image_io.encode_png

  def failing_encode(image):
    calls.append(1)
    if len(calls) > 3:
      raise DatasetError("disk trouble while writing")
    return original(image)

  monkeypatch.setattr(image_io, "encode_png", failing_encode)
  with pytest.raises(DatasetError, match="disk trouble"):
    build(ct_tree, tmp_path)
  assert_nothing_prepared(tmp_path, "covid_ct", "exclude_duplicates")


def test_no_data_says_what_to_download_and_which_flag(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "README.txt").write_text("nothing here")
  with pytest.raises(DatasetError) as error:
    build(tmp_path / "manual", tmp_path / "data")
  message = str(error.value)
  for needle in (
    "github.com/UCSD-AI4H/COVID-CT",
    "DIR/COVID-CT/Images-processed/CT_COVID",
    "--config.manual_dir=DIR",
    str(tmp_path / "manual"),
  ):
    assert needle in message
  assert_nothing_prepared(tmp_path / "data", "covid_ct", "exclude_duplicates")


def test_read_split_list_handles_crlf_and_no_final_newline(tmp_path):
  path = tmp_path / "list.txt"
  path.write_bytes(b"a.png\r\n b.png \r\n\r\nc.png")
  assert covid_ct.read_split_list(path) == ["a.png", "b.png", "c.png"]


def test_download_path_without_network(ct_tree, built_keep, tmp_path, monkeypatch):
  """With no manual data and 'online', the upstream files are fetched (here: faked) and used."""
  root = ct_tree / "COVID-CT"
  files = tmp_path / "fetched"
  files.mkdir()
  for folder in ("CT_COVID", "CT_NonCOVID"):
    with zipfile.ZipFile(files / f"{folder}.zip", "w") as archive:
      for path in sorted((root / "Images-processed" / folder).iterdir()):
        archive.write(path, f"{folder}/{path.name}")
  for path in [
    root / "COVID-CT-MetaInfo.xlsx",
    root / "NonCOVID-CT-MetaInfo.csv",
    *(root / "Data-split").glob("*/*.txt"),
  ]:
    shutil.copy(path, files / path.name)
  requested = {}

  def fake_download(self, urls):
    requested.update(urls)
    return {name: files / name for name in urls}

  monkeypatch.setattr(common, "downloads_allowed", lambda: True)
  monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
  builder = covid_ct.CovidCt(config="keep_duplicates", data_dir=tmp_path / "data")
  builder.download_and_prepare()
  assert all(
    url.startswith("https://raw.githubusercontent.com/UCSD-AI4H/COVID-CT/")
    for url in requested.values()
  )
  reference, _ = built_keep
  assert builder.info.splits["test"].num_examples == reference.info.splits["test"].num_examples

  def failing_download(self, urls):
    raise OSError("HTTP 404")

  monkeypatch.setattr(tfds.download.DownloadManager, "download", failing_download)
  with pytest.raises(DatasetError, match="(?s)the download failed: HTTP 404.*--config.manual_dir"):
    covid_ct.CovidCt(data_dir=tmp_path / "data2").download_and_prepare()


# --- image_io -----------------------------------------------------------------------------------


def _saved(tmp_path: Path, image: Image.Image, fmt: str, name: str = "x.bin") -> Path:
  path = tmp_path / name
  image.save(path, fmt)
  return path


def test_load_grayscale_modes(tmp_path):
  rgba = Image.new("RGBA", (4, 2), (200, 100, 50, 255))
  rgba.putpixel((0, 0), (255, 255, 255, 0))  # Fully transparent: composited on black.
  out = np.asarray(image_io.load_grayscale(_saved(tmp_path, rgba, "PNG")))
  assert out[0, 0] == 0 and out[1, 1] == round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)
  la = Image.new("LA", (2, 2), (100, 128))
  assert np.asarray(image_io.load_grayscale(_saved(tmp_path, la, "PNG"))).max() == 50
  palette = Image.new("RGB", (3, 3), (10, 20, 30)).convert("P")
  assert image_io.load_grayscale(_saved(tmp_path, palette, "PNG")).mode == "L"
  sixteen = Image.fromarray(np.array([[0, 65535, 32768]], np.uint16))
  np.testing.assert_array_equal(
    np.asarray(image_io.load_grayscale(_saved(tmp_path, sixteen, "PNG"))), [[0, 255, 128]]
  )
  jpeg_named_png = _saved(tmp_path, Image.new("RGB", (8, 8), (90, 90, 90)), "JPEG", "x.png")
  assert image_io.load_grayscale(jpeg_named_png).size == (8, 8)


def test_load_grayscale_errors_name_the_file(tmp_path, monkeypatch):
  text = tmp_path / "notes.png"
  text.write_text("hello")
  with pytest.raises(DatasetError, match="notes.png: not an image"):
    image_io.load_grayscale(text)
  with pytest.raises(DatasetError, match="missing.png: file not found"):
    image_io.load_grayscale(tmp_path / "missing.png")
  png_bomb(tmp_path / "bomb.png", 12000, 12000)  # 144 MP: over our limit, under Pillow's.
  with pytest.raises(DatasetError, match="bomb.png: 12000x12000 .* over the limit"):
    image_io.load_grayscale(tmp_path / "bomb.png")
  monkeypatch.setattr(image_io, "MAX_PIXELS", 10)
  with pytest.raises(DatasetError, match="small.png: 4x4"):
    image_io.load_grayscale(_saved(tmp_path, Image.new("L", (4, 4)), "PNG", "small.png"))

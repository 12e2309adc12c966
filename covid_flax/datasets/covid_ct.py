"""`covid_ct`: the UCSD-AI4H COVID-CT dataset (349 COVID / 397 NonCOVID CT slices), official split.

Configs (chosen by name, e.g. `covid_ct` = `covid_ct/exclude_duplicates`):
  * `exclude_duplicates` (default): test images that duplicate a train/val image are left out of
    test and counted (on the real data: the two known COVID/NonCOVID cross-class pairs, so test
    has 96 COVID instead of 98).
  * `keep_duplicates`: exactly the official lists (train 191/234, val 60/58, test 98/105
    COVID/NonCOVID); the audit report still lists the duplicates.

Input (`manual_dir`, or `manual_dir/COVID-CT/`), the upstream layout:
  Images-processed/CT_COVID/ and CT_NonCOVID/  (or CT_COVID.zip / CT_NonCOVID.zip in their place)
  Data-split/{COVID,NonCOVID}/{train,val,test}CT_{COVID,NonCOVID}.txt
  COVID-CT-MetaInfo.xlsx, NonCOVID-CT-MetaInfo.csv  (at the root, or in Data-split/)
When no such folder is there it downloads the same files from GitHub (if online).

Rules:
  * Split lists: one file name per line; '\\r' and surrounding whitespace stripped, empty lines
    skipped. A name listed twice, or in two splits, or missing from the image folder is an error.
    Files in the image folders that no list names are not used; they are counted in the log and
    in the report (`build.unlisted_files`).
  * Patient ids: COVID from the xlsx `Patient ID` (trailing spaces stripped), matched on the file
    name with or without its image extension; NonCOVID from the csv `patient id`. A listed image
    without a patient id is an error.
  * `source` (where the image came from, the confound the evaluation reports by): 'paper' for every
    COVID slice (figures of preprints and papers; their DOI, where the xlsx has one, is `doi`),
    'medpix' or 'crawled' for NonCOVID slices by their patient id (`medpix_patient_N`,
    `crawled_patient_N`), else 'other'.
  * Images are opened by content and converted to 8-bit grayscale (see `image_io`).
"""

import functools
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import openpyxl
import tensorflow_datasets as tfds
from absl import logging

from covid_flax.datasets import common, image_io
from covid_flax.datasets.common import Candidate, DatasetError

_UPSTREAM = "https://github.com/UCSD-AI4H/COVID-CT"
_RAW = "https://raw.githubusercontent.com/UCSD-AI4H/COVID-CT/master"
_CLASSES = (("CT_NonCOVID", "NonCOVID", 0), ("CT_COVID", "COVID", 1))  # folder, split dir, label
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_COVID_META = "COVID-CT-MetaInfo.xlsx"
_NONCOVID_META = "NonCOVID-CT-MetaInfo.csv"

_CITATION = """
@article{zhao2020COVID-CT-Dataset,
  title={COVID-CT-Dataset: a CT scan dataset about COVID-19},
  author={Zhao, Jinyu and Zhang, Yichen and He, Xuehai and Xie, Pengtao},
  journal={arXiv preprint arXiv:2003.13865},
  year={2020}
}
"""

_WHAT_TO_DOWNLOAD = f"""
Download the COVID-CT dataset from {_UPSTREAM}:
  Images-processed/CT_COVID.zip and CT_NonCOVID.zip (unzipped or not), the Data-split/ folder,
  COVID-CT-MetaInfo.xlsx and NonCOVID-CT-MetaInfo.csv, and arrange them as
    DIR/COVID-CT/Images-processed/CT_COVID/        (or CT_COVID.zip)
    DIR/COVID-CT/Images-processed/CT_NonCOVID/     (or CT_NonCOVID.zip)
    DIR/COVID-CT/Data-split/COVID/{{train,val,test}}CT_COVID.txt
    DIR/COVID-CT/Data-split/NonCOVID/{{train,val,test}}CT_NonCOVID.txt
    DIR/COVID-CT/COVID-CT-MetaInfo.xlsx
    DIR/COVID-CT/NonCOVID-CT-MetaInfo.csv
"""


def _download_urls() -> dict[str, str]:
  urls = {
    "CT_COVID.zip": f"{_RAW}/Images-processed/CT_COVID.zip",
    "CT_NonCOVID.zip": f"{_RAW}/Images-processed/CT_NonCOVID.zip",
    _COVID_META: f"{_RAW}/{_COVID_META}",
    _NONCOVID_META: f"{_RAW}/{_NONCOVID_META}",
  }
  for _, split_dir, _ in _CLASSES:
    for split in common.SPLITS:
      urls[f"{split}CT_{split_dir}.txt"] = (
        f"{_RAW}/Data-split/{split_dir}/{split}CT_{split_dir}.txt"
      )
  return urls


def _find_root(manual_dir: Path | None) -> Path | None:
  """The COVID-CT folder under manual_dir (or manual_dir itself), if one is there."""
  if manual_dir is None:
    return None
  for root in (manual_dir / "COVID-CT", manual_dir):
    if (root / "Images-processed").is_dir() or (root / "Data-split").is_dir():
      return root
  return None


def _first_existing(*paths: Path) -> Path:
  for path in paths:
    if path.exists():
      return path
  raise DatasetError(f"covid_ct: missing {paths[0]} (looked for: {', '.join(map(str, paths))})")


def _local_sources(root: Path) -> dict[str, Path]:
  """{name: path} of every input file in the upstream layout under `root`."""
  sources = {}
  for folder, _, _ in _CLASSES:
    images = root / "Images-processed"
    sources[folder] = _first_existing(images / folder, images / f"{folder}.zip")
  for meta in (_COVID_META, _NONCOVID_META):
    sources[meta] = _first_existing(root / meta, root / "Data-split" / meta)
  for _, split_dir, _ in _CLASSES:
    for split in common.SPLITS:
      name = f"{split}CT_{split_dir}.txt"
      sources[name] = _first_existing(root / "Data-split" / split_dir / name)
  return sources


def _image_index(location: Path) -> dict[str, Any]:
  """{file name: loader} for an image folder or a zip of one (members matched by base name)."""
  if location.is_dir():
    return {
      p.name: functools.partial(image_io.load_grayscale, p)
      for p in sorted(location.iterdir())
      if p.is_file() and not p.name.startswith(".")
    }
  try:
    with zipfile.ZipFile(location) as archive:
      members = [m for m in archive.infolist() if not m.is_dir() and "__MACOSX" not in m.filename]
  except (zipfile.BadZipFile, OSError) as e:
    raise DatasetError(f"{location}: not a readable zip file: {e}") from e
  index = {}
  for member in members:
    name = member.filename.rsplit("/", 1)[-1]
    if not name or name.startswith("."):
      continue
    if name in index:
      raise DatasetError(f"{location}: two members are named {name!r}")
    index[name] = functools.partial(_load_zip_member, location, member.filename)
  return index


def _load_zip_member(archive_path: Path, member: str):
  try:
    with zipfile.ZipFile(archive_path) as archive:
      data = archive.read(member)
  except (zipfile.BadZipFile, OSError, KeyError) as e:
    raise DatasetError(f"{archive_path}:{member}: cannot read it from the zip: {e}") from e
  return image_io.load_grayscale_bytes(data, f"{archive_path}:{member}")


def read_split_list(path: Path) -> list[str]:
  """File names in a split list (CRLF or LF, with or without a final newline)."""
  text = common.read_text(path, "split list")
  names = [line.strip() for line in text.replace("\r", "\n").split("\n")]
  names = [n for n in names if n]
  seen = set()
  for name in names:
    if name in seen:
      raise DatasetError(f"{path}: lists {name!r} twice")
    seen.add(name)
  return names


def _stem(name: str) -> str:
  """The name without an image extension (other dots, as in '2020.01.24.919183-p27', stay)."""
  lower = name.lower()
  for ext in _IMAGE_EXTENSIONS:
    if lower.endswith(ext):
      return name[: -len(ext)]
  return name


def _cell(row: tuple, i: int | None) -> str:
  return "" if i is None or i >= len(row) or row[i] is None else str(row[i]).strip()


def read_covid_meta(path: Path) -> dict[str, tuple[str, str]]:
  """{file stem: (patient id, DOI)} from COVID-CT-MetaInfo.xlsx."""
  try:
    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
  except Exception as e:  # openpyxl raises many types for a bad file.
    raise DatasetError(f"{path}: cannot read the xlsx: {e}") from e
  try:
    names = workbook.sheetnames
    sheet = workbook["positive_captions"] if "positive_captions" in names else workbook.active
    rows = sheet.iter_rows(values_only=True)
    header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
    for column in ("File name", "Patient ID"):
      if column not in header:
        raise DatasetError(f"{path}: no column {column!r} (columns: {header})")
    i_name, i_patient = header.index("File name"), header.index("Patient ID")
    i_doi = header.index("DOI") if "DOI" in header else None
    meta: dict[str, tuple[str, str]] = {}
    for row in rows:
      name, patient = _cell(row, i_name), _cell(row, i_patient)
      if not name:
        continue
      if not patient:
        raise DatasetError(f"{path}: {name!r} has no 'Patient ID'")
      entry = (patient, _cell(row, i_doi))
      if meta.setdefault(_stem(name), entry)[0] != patient:
        raise DatasetError(f"{path}: {name!r} is listed with two patient ids")
  finally:
    workbook.close()
  return meta


def read_noncovid_meta(path: Path) -> dict[str, str]:
  """{image name: patient id} from NonCOVID-CT-MetaInfo.csv."""
  rows = [row for _, row in common.read_csv(path, ("image name", "patient id"))]
  meta: dict[str, str] = {}
  for row in rows:
    name, patient = row["image name"].strip(), row["patient id"].strip()
    if name and patient and meta.setdefault(name, patient) != patient:
      raise DatasetError(f"{path}: {name!r} is listed with two patient ids")
  return meta


def source_of(label: int, patient_id: str) -> str:
  """'paper' (COVID), 'medpix' / 'crawled' (NonCOVID, by patient id prefix) or 'other'."""
  if label == 1:
    return "paper"
  prefix = patient_id.split("_", 1)[0].lower()
  return prefix if prefix in ("medpix", "crawled") else "other"


class CovidCt(common.RealImageBuilder):
  """COVID-CT (Zhao et al. 2020), split by the official patient-wise lists."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "Official split, grayscale originals, leakage audit.",
    "1.1.0": "`source` is paper / medpix / crawled (per-source results); the DOI moved to `doi`.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _WHAT_TO_DOWNLOAD + (
    "where DIR is the manual_dir (the files are downloaded automatically when online)."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=common.base_features(doi=tfds.features.Text()),
      supervised_keys=("image", "label"),
      homepage=_UPSTREAM,
      citation=_CITATION,
    )

  def _sources(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Path]:
    root = _find_root(common.manual_dir_or_none(dl_manager))
    if root is not None:
      logging.info("covid_ct: reading %s", root)
      return _local_sources(root)
    if not common.downloads_allowed():
      raise common.no_data_error(self.name, _WHAT_TO_DOWNLOAD, dl_manager)
    try:
      paths = dl_manager.download(_download_urls())
    except Exception as e:  # Any failure: say what to download by hand.
      reason = f"the download failed: {e}"
      raise common.no_data_error(self.name, _WHAT_TO_DOWNLOAD, dl_manager, reason) from e
    paths = {name: Path(p) for name, p in paths.items()}
    paths["CT_COVID"], paths["CT_NonCOVID"] = paths["CT_COVID.zip"], paths["CT_NonCOVID.zip"]
    return paths

  def _find_candidates(self, dl_manager):
    sources = self._sources(dl_manager)
    covid_meta = read_covid_meta(sources[_COVID_META])
    noncovid_meta = read_noncovid_meta(sources[_NONCOVID_META])
    candidates, unlisted, split_of = [], {}, {}
    for folder, split_dir, label in _CLASSES:
      index = _image_index(sources[folder])
      listed = set()
      for split in common.SPLITS:
        list_path = sources[f"{split}CT_{split_dir}.txt"]
        for name in read_split_list(list_path):
          if name in split_of.get(folder, {}):
            raise DatasetError(
              f"{list_path}: {name!r} is also in the {split_of[folder][name]} list"
            )
          split_of.setdefault(folder, {})[name] = split
          if name not in index:
            raise DatasetError(f"{list_path}: lists {name!r}, which is not in {sources[folder]}")
          if label == 1:
            patient, doi = covid_meta.get(_stem(name), ("", ""))
          else:
            patient, doi = noncovid_meta.get(name, ""), ""
          if not patient:
            meta = sources[_COVID_META if label == 1 else _NONCOVID_META]
            raise DatasetError(f"{sources[folder]}/{name}: no patient id for it in {meta}")
          listed.add(name)
          candidates.append(
            Candidate(
              f"{folder}/{name}",
              label,
              patient,
              source_of(label, patient),
              index[name],
              split,
              extra={"doi": doi},
            )
          )
      unlisted[folder] = sorted(set(index) - listed)
      if unlisted[folder]:
        logging.warning(
          "covid_ct: %d files in %s are in no split list and are not used: %s",
          len(unlisted[folder]),
          sources[folder],
          unlisted[folder][:5],
        )
    return candidates, {"unlisted_files": unlisted}

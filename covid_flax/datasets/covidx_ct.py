"""`covidx_ct`: COVIDx CT (COVIDNet-CT; Gunraj, Wang & Wong 2020), read from its split files.

Configs (`covidx_ct/<version>[_keep_duplicates]`; the first is the default): `3a`, `3b`, `2a`,
`2b`, `1`: the split files `{train,val,test}_COVIDx_CT-<version>.txt` of haydengunraj/COVIDNet-CT
(`splits/v*/`). The "B" variants add unverified cases to train only: their val and test are the
"A" files (used when the B ones are absent). Test slices that duplicate a train/val slice are left
out of test; `_keep_duplicates` keeps them (the audit still lists them).

Input (`manual_dir` DIR), the Kaggle release's layout:
  DIR/{train,val,test}_COVIDx_CT-3A.txt   (or in DIR/splits/)
  DIR/metadata.csv                        (the repository's: patient id, source, finding, ...)
  DIR/3A_images/<filename>                (or DIR/<version>_images/, DIR/images/)

Rules:
  * A line is `filename class xmin ymin xmax ymax`: class 0 normal, 1 pneumonia, 2 COVID-19;
    the box is the body crop, applied when the image is written (the stored image is the crop,
    the box stays as `bbox`). A box outside its image, another class, a malformed line, a slice
    listed twice or missing from the images is an error naming the file and line.
  * `label` is binary (COVID-19 = covid); `finding` keeps normal / pneumonia / covid-19, so
    evaluation reports specificity for normal and pneumonia separately.
  * Patient id: the longest metadata.csv `patient id` that the file name contains between
    separators ('_', '-', start, end): 'NCP_96_1328_0032.png' -> 'NCP_96',
    'normal5_patient392_SR_2_IM00019.png' -> 'patient392'. Slices named in CNCB's pattern
    (`NCP|CP|Normal_<patient>_<scan>_<slice>.png`) whose patient the current metadata.csv no longer
    lists (22 slices of CT-1) get `NCP_<patient>` and source 'CNCB', counted in the report
    (`build.patients_from_cncb_names`); any other slice without a patient is an error.
    `source` is the patient's metadata `source` (CNCB, TCIA, STOIC, iCTCF, ...).
  * Neighbouring slices of one patient are near duplicates by design: the audit counts them
    (`within_patient_pairs_not_listed`) and lists only pairs across patients or splits.
"""

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from covid_flax.datasets import common, image_io
from covid_flax.datasets.common import Candidate, DatasetError

_HOME = "https://github.com/haydengunraj/COVIDNet-CT"
_KAGGLE = "https://www.kaggle.com/datasets/hgunraj/covidxct"
_VERSIONS = ("3A", "3B", "2A", "2B", "1")
FINDINGS = ("normal", "pneumonia", "covid-19")  # Index = the split files' class.

_CITATION = """
@article{gunraj2020covidnet,
  title={COVIDNet-CT: A Tailored Deep Convolutional Neural Network Design for Detection of
         COVID-19 Cases From Chest CT Images},
  author={Gunraj, Hayden and Wang, Linda and Wong, Alexander},
  journal={Frontiers in Medicine}, volume={7}, pages={608525}, year={2020}
}
"""

_WHAT_TO_DOWNLOAD = f"""
Download COVIDx CT from Kaggle ({_KAGGLE}; or build it with {_HOME}'s create_COVIDx_CT.ipynb),
and metadata.csv from {_HOME}, arranged as
    DIR/train_COVIDx_CT-<version>.txt  DIR/val_COVIDx_CT-<version>.txt  DIR/test_COVIDx_CT-<version>.txt
    DIR/metadata.csv
    DIR/<version>_images/<slice files>
"""


@dataclasses.dataclass(eq=False)
class CovidxCtConfig(common.LeakageConfig):
  """A split-file version ('3A', ...) and the duplicate option."""

  release: str = "3A"


def _configs() -> list[CovidxCtConfig]:
  return [
    CovidxCtConfig(
      name=version.lower() + ("" if leakage.exclude_cross_split_duplicates else "_keep_duplicates"),
      description=f"COVIDx CT-{version} split files; {leakage.description}",
      release=version,
      exclude_cross_split_duplicates=leakage.exclude_cross_split_duplicates,
    )
    for version in _VERSIONS
    for leakage in common.leakage_configs()
  ]


@dataclasses.dataclass(frozen=True)
class SplitLine:
  filename: str
  finding: str
  box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax in pixels of the original slice.
  where: str  # file:line, for errors.


def read_split_file(path: Path) -> list[SplitLine]:
  """Every line of a split file (blank lines skipped); errors name the file and line."""
  text = common.read_text(path, "split file")
  lines, first_line = [], {}
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    fields = line.split()
    try:
      if len(fields) != 6:
        raise ValueError
      klass, *box = (int(f) for f in fields[1:])
    except ValueError:
      raise DatasetError(
        f"{where}: expected 'filename class xmin ymin xmax ymax' (integers), got {line.strip()!r}"
      ) from None
    if not 0 <= klass < len(FINDINGS):
      raise DatasetError(f"{where}: class {klass} is not 0 (normal), 1 (pneumonia) or 2 (COVID-19)")
    if fields[0] in first_line:
      raise DatasetError(
        f"{where}: {fields[0]!r} is listed again (first on line {first_line[fields[0]]})"
      )
    first_line[fields[0]] = number
    lines.append(SplitLine(fields[0], FINDINGS[klass], tuple(box), where))
  return lines


def read_metadata(path: Path) -> dict[str, tuple[str, str]]:
  """{patient id: (source, finding)} from COVIDNet-CT's metadata.csv."""
  meta = {}
  for _, row in common.read_csv(path, ("patient id", "source")):
    if row["patient id"].strip():
      meta[row["patient id"].strip()] = (
        row["source"].strip(),
        row.get("finding", "").strip().lower(),
      )
  if not meta:
    raise DatasetError(f"{path}: no patients")
  return meta


_SEPARATOR = re.compile(r"[_-]")
_CNCB_NAME = re.compile(r"^((?:NCP|CP|Normal)_\d+)_\d+_\d+\.png$")


def patient_of(filename: str, patients: set[str] | dict[str, Any]) -> str | None:
  """The longest known patient id the file name contains between separators (module docstring)."""
  stem = filename.rsplit(".", 1)[0]
  cuts = [m.start() for m in _SEPARATOR.finditer(stem)]
  starts, ends = [0] + [c + 1 for c in cuts], cuts + [len(stem)]
  best = None
  for start in starts:
    for end in ends:
      if end > start and (best is None or end - start > len(best)) and stem[start:end] in patients:
        best = stem[start:end]
  return best


def load_cropped(path: Path, box: tuple[int, int, int, int], where: str) -> Image.Image:
  """The slice at `path`, cropped to `box`; a box outside the image is an error naming `where`."""
  image = image_io.load_grayscale(path)
  xmin, ymin, xmax, ymax = box
  if not (0 <= xmin < xmax <= image.width and 0 <= ymin < ymax <= image.height):
    raise DatasetError(
      f"{where}: box (xmin {xmin}, ymin {ymin}, xmax {xmax}, ymax {ymax}) is not inside "
      f"{path.name} ({image.width}x{image.height})"
    )
  return image.crop(box)


def _find_split_file(root: Path, split: str, version: str) -> Path | None:
  versions = [version] + ([version[0] + "A"] if version.endswith("B") and split != "train" else [])
  for v in versions:
    for folder in (root, root / "splits"):
      path = folder / f"{split}_COVIDx_CT-{v}.txt"
      if path.is_file():
        return path
  return None


def _image_folders(root: Path, version: str) -> list[Path]:
  names = [f"{version}_images", f"{version[0]}A_images", "images"]
  return [root / n for n in dict.fromkeys(names) if (root / n).is_dir()]


class CovidxCt(common.RealImageBuilder):
  """COVIDx CT from its split files: body crop applied, binary label, finding and source kept."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Versions 1, 2A/2B, 3A/3B; leakage audit."}
  BUILDER_CONFIGS = _configs()
  MANUAL_DOWNLOAD_INSTRUCTIONS = _WHAT_TO_DOWNLOAD + "where DIR is the manual_dir."
  LIST_WITHIN_PATIENT = False

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=common.base_features(
        finding=tfds.features.Text(), bbox=tfds.features.Tensor(shape=(4,), dtype=np.int32)
      ),
      supervised_keys=("image", "label"),
      homepage=_HOME,
      citation=_CITATION,
    )

  def _find_candidates(self, dl_manager):
    version = self.builder_config.release
    root = common.manual_dir_or_none(dl_manager)
    paths = {s: _find_split_file(root, s, version) for s in common.SPLITS} if root else {}
    if not root or not all(paths.values()):
      missing = [f"{s}_COVIDx_CT-{version}.txt" for s in common.SPLITS if not paths.get(s)]
      reason = f"it has no {', '.join(missing)} (in it or its splits/ folder)"
      raise common.no_data_error(self.name, _WHAT_TO_DOWNLOAD, dl_manager, reason)
    if not (root / "metadata.csv").is_file():
      raise DatasetError(f"{self.name}: no metadata.csv in {root} (get it from {_HOME})")
    meta = read_metadata(root / "metadata.csv")
    folders = _image_folders(root, version)
    if not folders:
      raise DatasetError(f"{self.name}: no image folder {version}_images/ or images/ in {root}")
    index: dict[str, Path] = {}
    for folder in reversed(folders):  # The first folder wins.
      index.update({e.name: Path(e.path) for e in os.scandir(folder) if e.is_file()})
    candidates, split_of, no_patient, disagree, from_names = [], {}, [], 0, 0
    for split, path in paths.items():
      for line in read_split_file(path):
        if line.filename in split_of:
          raise DatasetError(
            f"{line.where}: {line.filename!r} is also in the {split_of[line.filename]} list"
          )
        split_of[line.filename] = split
        if line.filename not in index:
          raise DatasetError(
            f"{line.where}: {line.filename!r} is not in {', '.join(map(str, folders))}"
          )
        patient = patient_of(line.filename, meta)
        cncb = _CNCB_NAME.match(line.filename)
        if patient is None and cncb:  # A CNCB patient that metadata.csv has dropped since.
          patient, from_names = cncb.group(1), from_names + 1
          meta.setdefault(patient, ("CNCB", ""))
        if patient is None:
          no_patient.append(line.where)
          continue
        source, meta_finding = meta[patient]
        disagree += bool(meta_finding) and meta_finding != line.finding
        candidates.append(
          Candidate(
            key=line.filename,
            label=int(line.finding == "covid-19"),
            patient_id=patient,
            source=source,
            load=functools.partial(load_cropped, index[line.filename], line.box, line.where),
            split=split,
            extra={"finding": line.finding, "bbox": np.asarray(line.box, np.int32)},
          )
        )
    if no_patient:
      raise DatasetError(
        f"{self.name}: {len(no_patient)} slices match no patient id of {root / 'metadata.csv'}: "
        f"{no_patient[:5]}"
      )
    if disagree:
      logging.warning(
        "%s: %d slices' class differs from metadata.csv's finding", self.name, disagree
      )
    build = {
      "split_files": {s: str(p) for s, p in paths.items()},
      "unlisted_files": len(index) - len(candidates),
      "class_differs_from_metadata_finding": disagree,
      "patients_from_cncb_names": from_names,
    }
    return candidates, build

"""`covidx_cxr`: COVIDx CXR (COVID-Net; Wang, Lin & Wong 2020), read from its published label files.

Configs (`covidx_cxr/<version>[_keep_duplicates]`; the first is the default):
  * `9a`, `9b`, `8a`, `8b`: the label files `{train,test}_COVIDx<version>.txt` of
    lindawangg/COVID-Net (`labels/`). "A" files label `normal` / `pneumonia` / `COVID-19`,
    "B" files `negative` / `positive`. Test images that duplicate a train/val image are left out.
  * `<version>_keep_duplicates`: every listed image kept (the audit still lists the duplicates).

Input (`manual_dir` DIR), the layout COVID-Net's notebooks write:
  DIR/labels/train_COVIDx9A.txt, DIR/labels/test_COVIDx9A.txt  (or directly in DIR/)
  DIR/data/train/<filename>, DIR/data/test/<filename>          (or DIR/train/, DIR/test/)
  A `val_COVIDx<version>.txt` with DIR/data/val/ is used when present.

Rules:
  * A line is `patient_id filename label [source]`, parsed **from the right** because patient ids
    may contain spaces (SIRM 'COVID 1', upstream issue #126): if the last field is a label there
    is no source ('unknown'; some RSNA lines), else it is the source. Source `rnsa` (9A/9B) is
    read as `rsna`. Labels are case-insensitive; a line with another label, a file listed twice
    or in two splits, or a listed file that is not in its image folder is an error naming the
    file and line. Files no list names are counted in the report (`build.unlisted_files`).
  * `label` is binary (COVID-19/positive = covid); `finding` keeps the upstream label (normal,
    pneumonia, covid-19, negative, positive), so evaluation reports specificity for normal and
    pneumonia separately; `source` is the upstream source (cohen, sirm, rsna, ricord, ...).
  * Val: the version's val file where there is one, else carved from train patient-wise, the same
    for every user (`common.salted_fraction`): the train patients with
    sha1("covidx_cxr:" + patient_id) / 16**40 < 0.1. Test is upstream's, untouched.
"""

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from absl import logging

from covid_flax.datasets import common, image_io
from covid_flax.datasets.common import Candidate, DatasetError

_HOME = "https://github.com/lindawangg/COVID-Net"
_VERSIONS = ("9A", "9B", "8A", "8B")
_COVID = {"covid-19", "positive"}
_LABELS = {"normal", "pneumonia", "negative"} | _COVID
_SOURCE_SPELLING = {"rnsa": "rsna"}
VAL_FRACTION = 0.1

_CITATION = """
@article{wang2020covidnet,
  title={COVID-Net: a tailored deep convolutional neural network design for detection of
         COVID-19 cases from chest X-ray images},
  author={Wang, Linda and Lin, Zhong Qiu and Wong, Alexander},
  journal={Scientific Reports}, volume={10}, pages={19549}, year={2020}
}
"""

_WHAT_TO_DOWNLOAD = f"""
Get COVIDx CXR as {_HOME} describes (docs/COVIDx.md: its notebooks create_COVIDx.ipynb /
create_COVIDx_binary.ipynb gather the images from the public sources; a packaged release is on
Kaggle), and the label files of your version from its labels/ folder, arranged as
    DIR/labels/train_COVIDx<version>.txt   DIR/labels/test_COVIDx<version>.txt
    DIR/data/train/<image files>           DIR/data/test/<image files>
"""


@dataclasses.dataclass(eq=False)
class CovidxConfig(common.LeakageConfig):
  """A label-file version ('9A', ...) and the duplicate option."""

  release: str = "9A"


def _configs() -> list[CovidxConfig]:
  configs = []
  for version in _VERSIONS:
    for leakage in common.leakage_configs():
      keep = not leakage.exclude_cross_split_duplicates
      configs.append(
        CovidxConfig(
          name=version.lower() + ("_keep_duplicates" if keep else ""),
          description=f"COVIDx{version} label files; {leakage.description}",
          release=version,
          exclude_cross_split_duplicates=not keep,
        )
      )
  return configs


@dataclasses.dataclass(frozen=True)
class LabelLine:
  patient_id: str
  filename: str
  finding: str  # Lower case: normal, pneumonia, covid-19, negative, positive.
  source: str


def parse_label_line(line: str, where: str) -> LabelLine:
  """One line of a COVIDx label file, parsed from the right (module docstring)."""
  fields = line.split()
  if len(fields) >= 3 and fields[-1].lower() in _LABELS:
    *patient, filename, label = fields
    source = "unknown"
  elif len(fields) >= 4 and fields[-2].lower() in _LABELS:
    *patient, filename, label, source = fields
    source = _SOURCE_SPELLING.get(source.lower(), source.lower())
  else:
    raise DatasetError(
      f"{where}: expected 'patient_id filename label [source]' with a label in "
      f"{sorted(_LABELS)}, got {line.strip()!r}"
    )
  return LabelLine(" ".join(patient), filename, label.lower(), source)


def read_label_file(path: Path) -> list[LabelLine]:
  """Every line of a label file (blank lines skipped; CRLF accepted); a file listed twice is an
  error naming both lines."""
  text = common.read_text(path, "label file")
  lines, first_line = [], {}
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    parsed = parse_label_line(line, f"{path}:{number}")
    if parsed.filename in first_line:
      raise DatasetError(
        f"{path}:{number}: {parsed.filename!r} is listed again (first on line "
        f"{first_line[parsed.filename]})"
      )
    first_line[parsed.filename] = number
    lines.append(parsed)
  return lines


def _first_dir(*paths: Path) -> Path | None:
  return next((p for p in paths if p.is_dir()), None)


def _label_path(root: Path, split: str, version: str) -> Path | None:
  name = f"{split}_COVIDx{version}.txt"
  return next((p for p in (root / "labels" / name, root / name) if p.is_file()), None)


class CovidxCxr(common.RealImageBuilder):
  """COVIDx CXR from its label files; binary label, upstream finding and source kept."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Label files 8A/8B/9A/9B, leakage audit."}
  BUILDER_CONFIGS = _configs()
  MANUAL_DOWNLOAD_INSTRUCTIONS = _WHAT_TO_DOWNLOAD + "where DIR is the manual_dir."

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=common.base_features(finding=tfds.features.Text()),
      supervised_keys=("image", "label"),
      homepage=_HOME,
      citation=_CITATION,
    )

  def _find_candidates(self, dl_manager):
    version = self.builder_config.release
    root = common.manual_dir_or_none(dl_manager)
    paths = {s: _label_path(root, s, version) for s in common.SPLITS} if root else {}
    if not root or not paths["train"] or not paths["test"]:
      missing = f"no train_/test_COVIDx{version}.txt in it or its labels/ folder"
      raise common.no_data_error(self.name, _WHAT_TO_DOWNLOAD, dl_manager, missing)
    candidates, split_of, unlisted = [], {}, {}
    for split, label_path in paths.items():
      if label_path is None:
        continue
      images = _first_dir(root / "data" / split, root / split)
      if images is None:
        raise DatasetError(
          f"{label_path}: its images should be in {root / 'data' / split} or {root / split}, "
          "and neither is a folder"
        )
      present = {e.name for e in os.scandir(images) if e.is_file()}
      lines = read_label_file(label_path)
      for line in lines:
        if line.filename in split_of:
          raise DatasetError(
            f"{label_path}: {line.filename!r} is also in the {split_of[line.filename]} list"
          )
        split_of[line.filename] = split
      absent = [line.filename for line in lines if line.filename not in present]
      if absent:
        raise DatasetError(
          f"{label_path}: {len(absent)} of {len(lines)} listed images are not in {images}: "
          f"{absent[:5]}"
        )
      for line in lines:
        candidates.append(
          Candidate(
            key=f"{split}/{line.filename}",
            label=int(line.finding in _COVID),
            patient_id=line.patient_id,
            source=line.source,
            load=functools.partial(image_io.load_grayscale, images / line.filename),
            split=split,
            extra={"finding": line.finding},
          )
        )
      unlisted[split] = len(present) - len(lines)
      if unlisted[split]:
        logging.warning("%s: %d files in %s are in no list", self.name, unlisted[split], images)
    build: dict[str, Any] = {"label_files": {s: str(p) for s, p in paths.items() if p}}
    build["unlisted_files"] = unlisted
    if paths["val"] is None:
      carved = common.carve_val(candidates, f"{self.name}:", VAL_FRACTION)
      build["val_carved_from_train"] = carved
      logging.info("%s: no val list; val carved from train: %s", self.name, carved)
    return candidates, build

"""`covid_cxr`: COVID-19 chest X-rays (ieee8023 collection) against one of two negative classes.

Configs (chosen by name, e.g. `covid_cxr` = `covid_cxr/exclude_duplicates`):
  * `exclude_duplicates` (default): the study's task, COVID-19 vs NORMAL (Kermany/Kaggle, children).
    It measures the dataset pairing (adults from many sources vs children from one hospital), not
    COVID-19 detection. Test images that duplicate a train/val image are left out of test.
  * `keep_duplicates`: the same, nothing left out (the leakage report still lists duplicates).
  * `adult`: COVID-19 vs other adult lung disease (SARS, bacterial pneumonia, Pneumocystis, ...)
    from the same collection, the honest task this data allows; duplicates left out of test.
  * `adult_keep_duplicates`: the same, nothing left out.

Input (`manual_dir`):
  covid-chestxray-dataset/metadata.csv and covid-chestxray-dataset/<folder>/<filename>
      (ieee8023/covid-chestxray-dataset; downloaded at commit 584034aa when absent and online)
  chest_xray/{train,val,test}/NORMAL/*  (Kaggle "chest-xray-pneumonia"; whichever folders exist;
      manual download only)

Rules:
  * COVID: metadata rows with modality 'X-ray', a finding containing 'COVID-19' ('COVID-19',
    'COVID-19, ARDS', later 'Pneumonia/Viral/COVID-19'), view PA, AP or AP Supine. Listed files
    that are absent are skipped and counted ("314 of 434 listed images absent, skipped"); none
    present is an error; a file listed twice is used once (first row) and counted. 'No Finding'
    rows are not used: most are early films of COVID-19 patients, not healthy controls.
  * Non-COVID lung disease (adult configs): rows like the COVID ones whose finding is neither
    COVID-19 nor 'No Finding', 'todo' or 'Unknown' (e.g. 'SARS', 'Pneumocystis',
    'Pneumonia/Bacterial/Streptococcus'); every film of a patient is kept.
  * Features: `source` is the site the row's `url` names (`site_of_url`: radiopaedia, eurorad, sirm,
    rsna, ...; 'unknown' without a url; Kermany images 'kermany'), `finding` the upstream string
    ('normal' for Kermany), `view`, `age` in years (-1 unknown; Kermany children 'aged 1-5' are -1).
  * NORMAL: every file (names starting with '.' are skipped) in those folders; the patient id is
    the match of `^((?:NORMAL2-)?IM-\\d{4})-` on the file name (a name that does not match is an
    error). view 'AP', source 'kermany'.
  * Split, patient-wise and the same for every user (`patient_split`):
      u = int(sha1(("covid_cxr:" + patient_id).encode("utf-8")).hexdigest(), 16) / 16**40
      train if u < 0.60, val if u < 0.80, else test.
    Patients whose images are exact duplicates of each other (same decoded pixels) are merged:
    the whole group goes to the split of the patient seen first (metadata order, then NORMAL in
    train/val/test folder and file name order).
"""

import dataclasses
import functools
import re
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar
from urllib.parse import urlparse

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from covid_flax.datasets import common, image_io
from covid_flax.datasets.common import Candidate, DatasetError

_IEEE_COMMIT = "584034aa7fbf06496741f11008d72fd791c8e443"
_IEEE_HOME = "https://github.com/ieee8023/covid-chestxray-dataset"
_IEEE_ARCHIVE = f"{_IEEE_HOME}/archive/{_IEEE_COMMIT}.zip"
_KAGGLE = "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia"
_KERMANY_DOI = "10.17632/rscbjbr9sj.2"
FRONTAL_VIEWS = ("PA", "AP", "AP Supine")
_KERMANY_PATIENT = re.compile(r"^((?:NORMAL2-)?IM-\d{4})-")
_REQUIRED_COLUMNS = ("patientid", "finding", "view", "modality", "filename")
# Findings that are neither COVID-19 nor a diagnosed other disease: never negatives.
_NOT_A_DISEASE = ("no finding", "todo", "unknown", "")
# Host labels that name a service or a subdomain, not the site: skipped by `site_of_url`.
_GENERIC_HOST_LABELS = frozenset(
  "www en pubs cases app academic link onlinelibrary journal pubmed nlm".split()
)

_CITATION = """
@article{cohen2020covid,
  title={COVID-19 image data collection},
  author={Joseph Paul Cohen and Paul Morrison and Lan Dao},
  journal={arXiv 2003.11597},
  url={https://github.com/ieee8023/covid-chestxray-dataset},
  year={2020}
}
@article{kermany2018identifying,
  title={Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning},
  author={Kermany, Daniel S. and Goldbaum, Michael and Cai, Wenjia and others},
  journal={Cell}, volume={172}, number={5}, pages={1122--1131.e9}, year={2018},
  doi={10.1016/j.cell.2018.02.010}
}
"""

_NORMAL_INSTRUCTIONS = f"""
NORMAL (manual download): the Kaggle dataset "chest-xray-pneumonia" ({_KAGGLE};
also Mendeley Data doi:{_KERMANY_DOI}). Unzip it so that its NORMAL folders are at
    DIR/chest_xray/train/NORMAL/*.jpeg   (and, if you have them, val/NORMAL, test/NORMAL)
"""
_COVID_INSTRUCTIONS = f"""
COVID (downloaded automatically when online): {_IEEE_HOME} (e.g. {_IEEE_ARCHIVE}),
unzipped or cloned as
    DIR/covid-chestxray-dataset/metadata.csv
    DIR/covid-chestxray-dataset/images/...
"""


def patient_split(patient_id: str) -> str:
  """The documented deterministic split of a patient: 'train' (60%), 'val' (20%) or 'test'."""
  u = common.salted_fraction("covid_cxr:", patient_id)
  return "train" if u < 0.60 else "val" if u < 0.80 else "test"


def is_covid_finding(finding: str) -> bool:
  return "COVID-19" in (part.strip() for part in re.split(r"[/,]", finding or ""))


def is_other_disease(finding: str) -> bool:
  """A diagnosed non-COVID finding (the adult task's negatives): not COVID-19, not 'No Finding',
  not an unlabelled 'todo'/'Unknown'."""
  return not is_covid_finding(finding) and finding.strip().lower() not in _NOT_A_DISEASE


def site_of_url(url: str) -> str:
  """The site a metadata row's url names: 'https://www.eurorad.org/case/1' -> 'eurorad',
  'https://pubs.rsna.org/doi/..' -> 'rsna', 'https://www.ncbi.nlm.nih.gov/..' -> 'ncbi'."""
  host = urlparse(url.strip()).hostname or ""
  labels = [x for x in host.split(".")[:-1] if x not in _GENERIC_HOST_LABELS]
  return labels[0] if labels else "unknown"


def _age(text: str, where: str) -> int:
  if not text.strip():
    return -1
  try:
    return round(float(text))
  except ValueError:
    raise DatasetError(f"{where}: age {text!r} is not a number") from None


def kermany_patient_id(filename: str) -> str | None:
  match = _KERMANY_PATIENT.match(filename)
  return match.group(1) if match else None


def _find_ieee_root(base: Path | None) -> Path | None:
  if base is None:
    return None
  roots = [base / "covid-chestxray-dataset", base, *sorted(base.glob("covid-chestxray-dataset-*"))]
  return next((r for r in roots if (r / "metadata.csv").is_file()), None)


def _normal_dirs(manual_dir: Path | None) -> list[tuple[str, Path]]:
  if manual_dir is None:
    return []
  dirs = [(s, manual_dir / "chest_xray" / s / "NORMAL") for s in common.SPLITS]
  return [(s, d) for s, d in dirs if d.is_dir()]


def _field(row: dict[str, str | None], column: str) -> str:
  return (row.get(column) or "").strip()


def _frontal_xray_rows(root: Path) -> tuple[Path, list[tuple[int, Any]]]:
  """(metadata.csv's path, [(line number, field getter)] of its frontal X-ray rows)."""
  path = root / "metadata.csv"
  rows = [
    (n, functools.partial(_field, row)) for n, row in common.read_csv(path, _REQUIRED_COLUMNS)
  ]
  frontal = [(n, get) for n, get in rows if get("modality") == "X-ray"]
  return path, [(n, get) for n, get in frontal if get("view") in FRONTAL_VIEWS]


def read_ieee_candidates(
  root: Path, other_disease: bool = False
) -> tuple[list[Candidate], dict[str, Any]]:
  """The COVID images of an ieee8023 checkout, and with `other_disease` its non-COVID lung-disease
  images too (rules in the module docstring)."""
  path, rows = _frontal_xray_rows(root)
  candidates, seen, listed_twice, absent = [], set(), [], 0
  for line, get in rows:
    covid = is_covid_finding(get("finding"))
    if not covid and not (other_disease and is_other_disease(get("finding"))):
      continue
    relative = PurePosixPath(get("folder") or "images") / get("filename")
    if not get("filename") or relative.is_absolute() or ".." in relative.parts:
      raise DatasetError(f"{path}, line {line}: bad filename {get('filename')!r}")
    if relative in seen:
      listed_twice.append(str(relative))
      continue
    seen.add(relative)
    file = root / relative
    if not file.is_file():
      absent += 1
      continue
    if not get("patientid"):
      raise DatasetError(f"{path}, line {line}: {relative} has an empty patientid")
    candidates.append(
      Candidate(
        key=f"covid-chestxray-dataset/{relative}",
        label=int(covid),
        patient_id=get("patientid"),
        source=site_of_url(get("url")),
        load=functools.partial(image_io.load_grayscale, file),
        extra={
          "view": get("view"),
          "finding": get("finding"),
          "age": _age(get("age"), f"{path}, line {line}"),
        },
      )
    )
  n_covid = sum(c.label for c in candidates)
  message = (
    f"{absent} of {len(seen)} listed images absent, skipped; {len(candidates)} kept "
    f"({n_covid} COVID-19, {len(candidates) - n_covid} other lung disease)"
  )
  logging.info("covid_cxr: %s (%s)", message, path)
  if listed_twice:
    logging.warning(
      "covid_cxr: %d files listed twice in %s, used once: %s",
      len(listed_twice),
      path,
      listed_twice[:5],
    )
  if not n_covid:
    raise DatasetError(f"{path}: no COVID-19 frontal X-ray image found ({message})")
  if other_disease and n_covid == len(candidates):
    raise DatasetError(f"{path}: no frontal X-ray of another lung disease found ({message})")
  build = {
    "ieee8023_listed": len(seen),
    "ieee8023_absent_skipped": absent,
    "covid_kept": n_covid,
    "other_disease_kept": len(candidates) - n_covid,
    "ieee8023_listed_twice": listed_twice,
  }
  return candidates, build


def no_finding_probe(root: Path) -> tuple[list[dict[str, str]], int]:
  """The rows of a labels csv (relpath,label,patient_id,source,view; relpaths relative to `root`)
  of the frontal 'No Finding' X-rays of an ieee8023 checkout that are present, and how many listed
  ones are absent: an external probe of adult films without COVID-19 findings (most are early or
  normal films of COVID-19 patients, so never training negatives)."""
  path, rows = _frontal_xray_rows(root)
  probe, absent = [], 0
  for _, get in rows:
    if get("finding").lower() != "no finding":
      continue
    relpath = f"{get('folder') or 'images'}/{get('filename')}"
    if not (root / relpath).is_file():
      absent += 1
      continue
    source = site_of_url(get("url"))
    probe.append(dict(relpath=relpath, label="non_covid", patient_id=get("patientid"),
                      source=source, view=get("view")))  # fmt: skip
  if not probe:
    raise DatasetError(f"{path}: no frontal 'No Finding' X-ray present ({absent} absent)")
  return probe, absent


def read_normal_candidates(dirs: list[tuple[str, Path]]) -> list[Candidate]:
  """The NORMAL images of the Kaggle folders (rules in the module docstring)."""
  candidates = []
  for split, folder in dirs:
    for file in sorted(folder.iterdir()):
      if file.name.startswith("."):
        continue
      if not file.is_file():
        raise DatasetError(f"{file}: not a file (only images belong in {folder})")
      patient = kermany_patient_id(file.name)
      if patient is None:
        raise DatasetError(
          f"{file}: cannot derive a patient id; Kermany NORMAL names look like IM-0115-0001.jpeg "
          f"or NORMAL2-IM-1427-0001.jpeg (pattern {_KERMANY_PATIENT.pattern})"
        )
      candidates.append(
        Candidate(
          key=f"chest_xray/{split}/NORMAL/{file.name}",
          label=0,
          patient_id=patient,
          source="kermany",
          load=functools.partial(image_io.load_grayscale, file),
          extra={"view": "AP", "finding": "normal", "age": -1},
        )
      )
  return candidates


@dataclasses.dataclass(eq=False)
class CxrConfig(common.LeakageConfig):
  """A covid_cxr config: which negatives ('kermany' children or 'adult' lung disease)."""

  negatives: str = "kermany"


def _configs() -> list[CxrConfig]:
  """exclude_duplicates and keep_duplicates (Kermany), adult and adult_keep_duplicates."""
  adult_names = {"exclude_duplicates": "adult", "keep_duplicates": "adult_keep_duplicates"}
  what = {
    "kermany": "COVID-19 vs Kermany NORMAL (children). ",
    "adult": "COVID-19 vs other adult lung disease (ieee8023 only). ",
  }
  return [
    CxrConfig(
      name=c.name if negatives == "kermany" else adult_names[c.name],
      description=what[negatives] + c.description,
      exclude_cross_split_duplicates=c.exclude_cross_split_duplicates,
      negatives=negatives,
    )
    for negatives in what
    for c in common.leakage_configs()
  ]


class CovidCxr(common.RealImageBuilder):
  """COVID-19 (ieee8023) vs NORMAL (Kermany) or other adult lung disease (ieee8023) chest X-rays,
  split patient-wise by a fixed hash."""

  BUILDER_CONFIGS: ClassVar[list[CxrConfig]] = _configs()
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "Hash patient-wise split, grayscale originals, leakage audit.",
    "1.1.0": "Adult configs (other lung disease as negatives); source is the site of the url; "
    "finding and age features.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    _NORMAL_INSTRUCTIONS + _COVID_INSTRUCTIONS + "where DIR is the manual_dir."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=common.base_features(
        view=tfds.features.Text(),
        finding=tfds.features.Text(),
        age=tfds.features.Scalar(dtype=np.int32),
      ),
      supervised_keys=("image", "label"),
      homepage=_IEEE_HOME,
      citation=_CITATION,
    )

  def _ieee_root(self, dl_manager: tfds.download.DownloadManager, manual_dir: Path | None) -> Path:
    root = _find_ieee_root(manual_dir)
    if root is not None:
      return root
    if not common.downloads_allowed():
      raise common.no_data_error(self.name, _COVID_INSTRUCTIONS, dl_manager)
    try:
      root = _find_ieee_root(Path(dl_manager.download_and_extract(_IEEE_ARCHIVE)))
    except Exception as e:  # Any failure: say what to download by hand.
      reason = f"the download failed: {e}"
      raise common.no_data_error(self.name, _COVID_INSTRUCTIONS, dl_manager, reason) from e
    if root is None:
      raise DatasetError(f"covid_cxr: no metadata.csv in the downloaded {_IEEE_ARCHIVE}")
    return root

  def _find_candidates(self, dl_manager):
    manual_dir = common.manual_dir_or_none(dl_manager)
    if self.builder_config.negatives == "adult":
      return read_ieee_candidates(self._ieee_root(dl_manager, manual_dir), other_disease=True)
    normal_dirs = _normal_dirs(manual_dir)
    if not normal_dirs:  # Checked first: no point downloading the COVID images without these.
      what = _NORMAL_INSTRUCTIONS
      if _find_ieee_root(manual_dir) is None:
        what += _COVID_INSTRUCTIONS
      reason = "the NORMAL images need a manual download"
      raise common.no_data_error(self.name, what, dl_manager, reason)
    normal = read_normal_candidates(normal_dirs)
    if not normal:
      raise DatasetError(
        f"covid_cxr: the NORMAL folders {[str(d) for _, d in normal_dirs]} are empty"
      )
    covid, build = read_ieee_candidates(self._ieee_root(dl_manager, manual_dir))
    build["normal_folders"] = [f"chest_xray/{s}/NORMAL" for s, _ in normal_dirs]
    build["normal_files"] = len(normal)
    return covid + normal, build

  def _assign_splits(self, candidates, fingerprints):
    """`patient_split` of each patient, with patients linked by exact duplicates merged."""
    parent: dict[str, str] = {}
    order: dict[str, int] = {}

    def find(p: str) -> str:
      while parent[p] != p:
        parent[p] = parent[parent[p]]
        p = parent[p]
      return p

    first_by_sha: dict[str, str] = {}
    for c, fp in zip(candidates, fingerprints):
      parent.setdefault(c.patient_id, c.patient_id)
      order.setdefault(c.patient_id, len(order))
      other = first_by_sha.setdefault(fp.sha256, c.patient_id)
      a, b = find(c.patient_id), find(other)
      if a != b:  # The root is always the patient seen first.
        a, b = sorted((a, b), key=order.__getitem__)
        parent[b] = a
    groups: dict[str, list[str]] = {}
    for p in order:
      groups.setdefault(find(p), []).append(p)
    for c in candidates:
      c.split = patient_split(find(c.patient_id))
    merged = [g for g in groups.values() if len(g) > 1]
    if merged:
      logging.info("covid_cxr: patients merged because they share an identical image: %s", merged)
    return {"patients_merged_by_exact_duplicates": merged}

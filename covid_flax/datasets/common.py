"""What every covid_flax TFDS builder shares: labels, features, errors."""

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib.util
import multiprocessing
import os
import sys
import types
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging
from PIL import Image

from covid_flax import errors
from covid_flax.datasets import audit, image_io


def _spill_shuffle_buckets_without_tensorflow() -> None:
  """TFDS shuffles a split in memory up to 1 GB of examples, then spills them to bucket files on
  disk through `tf.io.gfile`, which fails without TensorFlow (not in this install): every split
  over 1 GB (COVIDx, the 100k synthetic set) would. Where TensorFlow is absent, give TFDS's
  shuffler plain local files instead (tested in tests/test_covidx.py with a tiny buffer)."""
  if importlib.util.find_spec("tensorflow") is not None:
    return
  from tensorflow_datasets.core import shuffle

  class _NeverRaised(Exception):
    pass

  gfile = types.SimpleNamespace(GFile=open, exists=os.path.exists, remove=os.remove)
  shuffle.tf = types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=gfile),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised),
  )


_spill_shuffle_buckets_without_tensorflow()

# Index 1 is the positive class everywhere (metrics, thresholds, Grad-CAM).
LABEL_NAMES = ("non_covid", "covid")
POSITIVE_LABEL = 1


DatasetError = errors.DatasetError  # Here too: what the builders raise.


_LISTED = 50  # Unusable images named in one error; the rest are counted.


def base_features(**extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """The features every builder has (plus `extra`): the input pipeline reads only these."""
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
      "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
      "patient_id": tfds.features.Text(),
      "filename": tfds.features.Text(),
      "source": tfds.features.Text(),
      **extra,
    }
  )


# ---------------------------------------------------------------------------------------------
# Shared machinery of the real-data builders (covid_ct, covid_cxr).
# ---------------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")

# Set (to anything non-empty) to never download, e.g. in tests and air-gapped clusters.
NO_DOWNLOAD_ENV = "COVID_FLAX_NO_DOWNLOAD"


@dataclasses.dataclass(eq=False)
class LeakageConfig(tfds.core.BuilderConfig):
  """A real-data builder config; the option decides what happens to cross-split duplicates."""

  exclude_cross_split_duplicates: bool = True


def leakage_configs() -> list[LeakageConfig]:
  """The two configs of every real builder; the first is the default."""
  return [
    LeakageConfig(
      name="exclude_duplicates",
      description="Default. Test images that duplicate (exactly or nearly) an image in train or "
      "val are left out of test; the leakage report lists and counts them.",
      exclude_cross_split_duplicates=True,
    ),
    LeakageConfig(
      name="keep_duplicates",
      description="Every image is kept (e.g. the official COVID-CT split exactly); the leakage "
      "report still lists the cross-split duplicates.",
      exclude_cross_split_duplicates=False,
    ),
  ]


@dataclasses.dataclass
class Candidate:
  """One image a builder found, before the audit: `key` is also its `filename` feature."""

  key: str
  label: int
  patient_id: str
  source: str
  load: Callable[[], Image.Image]
  split: str | None = None
  extra: dict[str, str] = dataclasses.field(default_factory=dict)


def read_text(path: Path, what: str) -> str:
  """A UTF-8 text file (a BOM is dropped); unreadable -> DatasetError naming it as `what`."""
  try:
    return path.read_bytes().decode("utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetError(f"{path}: cannot read the {what}: {e}") from e


def read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
  """[(line number, row)] of a csv with a header holding every `required` column (error
  otherwise, listing the missing ones); empty cells are ''."""
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f)
      missing = [c for c in required if c not in (reader.fieldnames or ())]
      if missing:
        raise DatasetError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
      return [(reader.line_num, {k: v or "" for k, v in row.items()}) for row in reader]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DatasetError(f"{path}: cannot read the csv: {e}") from e


def salted_fraction(salt: str, patient_id: str) -> float:
  """A number in [0, 1) fixed by (salt, patient id): patient-wise splits that every user gets."""
  return int(hashlib.sha1((salt + patient_id).encode("utf-8")).hexdigest(), 16) / 16**40


def carve_val(candidates: Sequence[Candidate], salt: str, fraction: float) -> dict[str, int]:
  """Moves the train patients with `salted_fraction(salt, id) < fraction` to val, whole; returns
  {"patients": ..., "images": ...} moved."""
  moved = {c.patient_id for c in candidates if c.split == "train"}
  moved = {p for p in moved if salted_fraction(salt, p) < fraction}
  images = 0
  for c in candidates:
    if c.split == "train" and c.patient_id in moved:
      c.split, images = "val", images + 1
  return {"patients": len(moved), "images": images}


def manual_dir_or_none(dl_manager: tfds.download.DownloadManager) -> Path | None:
  """The manual_dir if it exists and is not empty, else None (TFDS raises in that case)."""
  try:
    return Path(dl_manager.manual_dir)
  except (AssertionError, ValueError):
    return None


def manual_dir_described(dl_manager: tfds.download.DownloadManager) -> str:
  where = getattr(dl_manager, "_manual_dir", None)
  return f"'{where}'" if where else "(none given)"


def downloads_allowed(probe_url: str = "https://github.com", timeout_s: float = 5.0) -> bool:
  """False when $COVID_FLAX_NO_DOWNLOAD is set or `probe_url` does not answer within timeout_s."""
  if os.environ.get(NO_DOWNLOAD_ENV):
    return False
  try:
    request = urllib.request.Request(probe_url, method="HEAD")
    with urllib.request.urlopen(request, timeout=timeout_s):
      return True
  except Exception:  # noqa: BLE001  (any failure means: do not try to download)
    return False


OFFLINE = f"it cannot be downloaded now (offline, or ${NO_DOWNLOAD_ENV} is set)"


def no_data_error(
  dataset: str, what: str, dl_manager: tfds.download.DownloadManager, reason: str = OFFLINE
) -> DatasetError:
  """The error raised when there is no usable data: what to download, where, and which flag."""
  return DatasetError(
    f"{dataset}: no usable data in manual_dir {manual_dir_described(dl_manager)}, and {reason}."
    f"\n{what.strip()}\nThen point at DIR with --config.manual_dir=DIR (training), "
    "--manual_dir=DIR (tfds build) or tfds.download.DownloadConfig(manual_dir=DIR)."
  )


class RealImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Finds candidates, audits them for leakage, then writes train/val/test.

  Subclasses implement `_find_candidates` and may override `_assign_splits`. Every image is
  decoded twice (audit, then writing) so that memory does not grow with the dataset.
  """

  BUILDER_CONFIGS = leakage_configs()
  # False for CT volumes: the audit then counts, but does not list, the (near-duplicate)
  # neighbouring slices of one patient in one split.
  LIST_WITHIN_PATIENT = True

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    # array_record by default: random access for grain, and no TensorFlow needed (TFDS's default,
    # tfrecord, needs it).
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _find_candidates(
    self, dl_manager: tfds.download.DownloadManager
  ) -> tuple[list[Candidate], dict[str, Any]]:
    """(candidates in a deterministic order, builder-specific counts for the report)."""
    raise NotImplementedError

  def _assign_splits(self, candidates: list[Candidate], fingerprints: Sequence[Any]) -> dict:
    """Sets `split` on every candidate; returns extra counts for the report."""
    return {}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    candidates, build = self._find_candidates(dl_manager)
    for label, name in enumerate(LABEL_NAMES):
      if not any(c.label == label for c in candidates):
        raise DatasetError(f"{self.name}: no '{name}' images found; an empty class is an error")
    repeated = sorted(k for k, n in collections.Counter(c.key for c in candidates).items() if n > 1)
    if repeated:
      raise DatasetError(f"{self.name}: images found twice: {repeated[:5]}")
    fingerprints, unusable = [], []
    # Every image is checked, so one error lists all the unusable ones.
    for fp, error in tqdm.tqdm(
      ordered_map(_fingerprint_or_error, candidates),
      total=len(candidates),
      desc=f"{self.name}: audit",
      unit="img",
      mininterval=2,
    ):
      fingerprints.append(fp)
      if error:
        unusable.append(error)
    if unusable:
      listing = "\n  ".join(
        unusable[:_LISTED] + [f"... and {len(unusable) - _LISTED} more"] * (len(unusable) > _LISTED)
      )
      raise DatasetError(
        f"{self.name}: {len(unusable)} of {len(candidates)} images cannot be used (nothing was "
        f"written):\n  {listing}"
      )
    build.update(self._assign_splits(candidates, fingerprints))
    records = [
      audit.ImageRecord(c.key, c.split, LABEL_NAMES[c.label], c.patient_id, fp)
      for c, fp in zip(candidates, fingerprints)
    ]
    patients_splits: dict[str, set[str]] = {}
    for c in candidates:
      patients_splits.setdefault(f"{LABEL_NAMES[c.label]}:{c.patient_id}", set()).add(c.split)
    shared = sorted(p for p, s in patients_splits.items() if len(s) > 1)
    build["patients_in_several_splits"] = shared
    if shared:
      logging.warning(
        "%s: %d patients are in more than one split: %s", self.name, len(shared), shared[:10]
      )
    pairs, not_listed = audit.find_duplicate_pairs(records, within_patient=self.LIST_WITHIN_PATIENT)
    excluded = (
      audit.test_exclusions(pairs) if self.builder_config.exclude_cross_split_duplicates else {}
    )
    report = audit.build_report(
      dataset=f"{self.name}/{self.builder_config.name}",
      version=str(self.version),
      config={"exclude_cross_split_duplicates": self.builder_config.exclude_cross_split_duplicates},
      records=records,
      pairs=pairs,
      excluded=excluded,
      build=build,
      not_listed=not_listed,
    )
    for split in SPLITS:
      if split not in report["splits"]:
        raise DatasetError(
          f"{self.name}: split '{split}' would be empty ({len(candidates)} images found)"
        )
    # At generation time data_path is TFDS's incomplete.* directory, renamed only on success.
    audit.write_report(report, self.data_path)
    for line in audit.summary_lines(report):
      logging.info("%s", line)
    logging.info("%s: examples per split %s", self.name, report["splits"])
    return {
      split: self._generate_examples(
        [c for c in candidates if c.split == split and c.key not in excluded]
      )
      for split in SPLITS
    }

  def _generate_examples(self, candidates: list[Candidate]) -> Iterator[tuple[str, dict[str, Any]]]:
    for c, png in zip(candidates, ordered_map(lambda c: image_io.encode_png(c.load()), candidates)):
      yield (
        c.key,
        {
          "image": png,
          "label": c.label,
          "patient_id": c.patient_id,
          "filename": c.key,
          "source": c.source,
          **c.extra,
        },
      )


def _fingerprint_or_error(candidate: Candidate) -> tuple[audit.Fingerprint | None, str]:
  try:
    return audit.fingerprint(candidate.load()), ""
  except DatasetError as e:
    return None, str(e)


def ordered_map(
  fn: Callable[[Any], Any],
  items: Sequence[Any],
  workers: int | None = None,
  processes: bool = False,
) -> Iterator[Any]:
  """`map(fn, items)` on `workers` threads (default: every core), in order, at most 4 results per
  worker ahead of the consumer so memory stays bounded. Threads by default: PIL decodes, resizes
  and encodes without the GIL, and on 2 cores threads measured 1.6x (audit) and 2.0x (PNG writing)
  over one thread, spawned processes 1.1x and 1.75x (their start-up and pickling). `processes=True`
  is for numpy-heavy Python that holds the GIL (the synthetic images); `fn` must then be a
  module-level function. Workers are forked, or spawned once JAX has started its threaded
  backends (a fork can then deadlock; spawning needs the `if __name__ == "__main__"` guard that the
  entry points have). An exception in `fn` is raised here, in order."""
  workers = workers or os.cpu_count() or 1
  if workers == 1 or len(items) < 2:
    yield from map(fn, items)
    return
  if processes:
    context = multiprocessing.get_context("spawn" if _jax_started() else "fork")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
  else:
    pool = concurrent.futures.ThreadPoolExecutor(workers)
  with pool:
    pending: collections.deque = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 4 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _jax_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # Private, but the one place that knows.

  return xla_bridge.backends_are_initialized()

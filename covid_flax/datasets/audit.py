"""Leakage audit: exact and near-duplicate images within and across splits and classes.

Run by the real-data builders at build time; the report is written beside the prepared dataset as
`<data_dir>/<name>/<config>/<version>/leakage_audit.json` (`scripts/audit_data.py` prints it).

Duplicate rules (pairs of images, each pair reported once):
  * exact: equal SHA-256 of the decoded 8-bit grayscale pixels and size, so the same picture in
    another file format or encoding also counts.
  * near: 16x16 average hash (bilinear downscale, bit = pixel > mean) Hamming distance
    <= `AHASH_MAX` **and** 16x16 difference hash (17x16 downscale, bit = right > left) distance
    <= `DHASH_MAX`, both out of 256 bits. The aHash alone reproduces the distances of the known
    pairs documented with the data (COVID-CT 5 and 12, ieee8023 AR-1/extubation-1 8) but, at a
    threshold with a safety margin over 12, also matches unrelated radiographs with a similar
    global layout; those differ in dHash (gradients, >= 60), the known pairs do not (<= 18).

Pairs where one image is in `test` and the other in another split are "cross-split test" pairs;
with the builders' default config their test member is left out of the dataset (and counted).

Report JSON (all keys always present):
  {"dataset": str, "version": str, "config": {...builder options},
   "method": {"exact": str, "near": str, "ahash_max": int, "dhash_max": int, "hash_bits": 256},
   "summary": {"images": int, "pairs": int, "exact_pairs": int, "near_pairs": int,
               "within_split_same_class": int, "within_split_cross_class": int,
               "cross_split_same_class": int, "cross_split_cross_class": int,
               "cross_split_involving_test": int, "excluded_from_test": int,
               "within_patient_pairs_not_listed": int},  # see find_duplicate_pairs
   "splits": {split: {label_name: int}},   # examples written, after exclusions
   "build": {...builder-specific counts: absent/unlisted/merged files, ...},
   "excluded": [{"key", "split", "label", "patient_id", "reason"}],
   "pairs": [{"kind": "exact"|"near", "ahash_distance": int, "dhash_distance": int,
              "cross_split": bool, "cross_class": bool, "same_patient": bool,
              "a": {"key", "split", "label", "patient_id"}, "b": {...}}]}
"""

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from covid_flax.datasets import image_io

REPORT_FILENAME = "leakage_audit.json"
HASH_SIZE = 16
AHASH_MAX = 16
DHASH_MAX = 32
_BLOCK = 1024  # Rows of the pairwise distance matrix computed at a time (bounded memory).


def average_hash(image: Image.Image, size: int = HASH_SIZE) -> np.ndarray:
  """(size*size,) bool average hash of a grayscale image."""
  pixels = np.asarray(
    image.convert("L").resize((size, size), Image.Resampling.BILINEAR), np.float64
  )
  return (pixels > pixels.mean()).ravel()


def difference_hash(image: Image.Image, size: int = HASH_SIZE) -> np.ndarray:
  """(size*size,) bool horizontal difference hash of a grayscale image."""
  small = image.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR)
  pixels = np.asarray(small, np.float64)
  return (pixels[:, 1:] > pixels[:, :-1]).ravel()


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  sha256: str
  ahash: np.ndarray
  dhash: np.ndarray


def fingerprint(image: Image.Image) -> Fingerprint:
  """Exact and perceptual hashes of one grayscale image."""
  return Fingerprint(image_io.pixel_sha256(image), average_hash(image), difference_hash(image))


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image as the audit sees it."""

  key: str
  split: str
  label: str
  patient_id: str
  fingerprint: Fingerprint

  def describe(self) -> dict[str, str]:
    return {
      "key": self.key,
      "split": self.split,
      "label": self.label,
      "patient_id": self.patient_id,
    }


def _hamming_pairs(
  bits: np.ndarray, max_distance: int, groups: np.ndarray | None = None
) -> tuple[dict[tuple[int, int], int], int]:
  """({(i, j): distance} for i < j with Hamming distance <= max_distance, number of such pairs
  left out because `groups[i] == groups[j]`), in blocks of rows of the upper triangle so memory
  stays O(block * n) and an 80k-image set takes about a minute on 2 cores."""
  ones = bits.astype(np.float32)
  zeros = 1.0 - ones
  found, skipped = {}, 0
  for start in range(0, len(bits), _BLOCK):
    block = slice(start, start + _BLOCK)
    # (block, n - start), exact for small integers.
    dist = ones[block] @ zeros[start:].T + zeros[block] @ ones[start:].T
    close = dist <= max_distance + 0.5
    close &= np.arange(start, start + len(close))[:, None] < np.arange(start, len(bits))[None, :]
    if groups is not None:
      same = groups[block][:, None] == groups[start:][None, :]
      skipped += int(np.count_nonzero(close & same))
      close &= ~same
    rows, cols = np.nonzero(close)
    for r, c in zip(rows.tolist(), cols.tolist()):
      found[(start + r, start + c)] = round(float(dist[r, c]))
  return found, skipped


def find_duplicate_pairs(
  records: Sequence[ImageRecord],
  ahash_max: int = AHASH_MAX,
  dhash_max: int = DHASH_MAX,
  within_patient: bool = True,
) -> tuple[list[dict[str, Any]], int]:
  """(every exact or near-duplicate pair in record order (module docstring), the number of pairs
  not listed). `within_patient=False` leaves out pairs of one patient, class and split: the
  neighbouring slices of a CT volume, millions in COVIDx CT and no leakage; they are only counted
  (the count includes aHash-only candidates that the dHash test would have dropped)."""
  if not records:
    return [], 0
  ahashes = np.stack([r.fingerprint.ahash for r in records])
  dhashes = np.stack([r.fingerprint.dhash for r in records])
  groups = None
  if not within_patient:
    keys = [f"{r.split}\0{r.label}\0{r.patient_id}" for r in records]
    groups = np.unique(np.asarray(keys), return_inverse=True)[1]
  candidates, skipped = _hamming_pairs(ahashes, ahash_max, groups)
  by_sha: dict[str, list[int]] = {}
  for i, r in enumerate(records):
    by_sha.setdefault(r.fingerprint.sha256, []).append(i)
  # Equal pixels have equal hashes, so a skipped exact pair is already in `skipped`.
  exact = {
    (g[x], g[y])
    for g in by_sha.values()
    for x in range(len(g))
    for y in range(x + 1, len(g))
    if groups is None or groups[g[x]] != groups[g[y]]
  }
  pairs = []
  for i, j in sorted(set(candidates) | exact):
    a, b = records[i], records[j]
    a_dist = int(np.count_nonzero(ahashes[i] != ahashes[j]))
    d_dist = int(np.count_nonzero(dhashes[i] != dhashes[j]))
    is_exact = (i, j) in exact
    if not is_exact and d_dist > dhash_max:
      continue
    pairs.append(
      {
        "kind": "exact" if is_exact else "near",
        "ahash_distance": a_dist,
        "dhash_distance": d_dist,
        "cross_split": a.split != b.split,
        "cross_class": a.label != b.label,
        "same_patient": a.patient_id == b.patient_id,
        "a": a.describe(),
        "b": b.describe(),
      }
    )
  return pairs, skipped


def test_exclusions(pairs: Sequence[dict[str, Any]]) -> dict[str, str]:
  """{key: reason} for the test member of every pair that crosses from test to another split."""
  excluded: dict[str, str] = {}
  for pair in pairs:
    for mine, other in (("a", "b"), ("b", "a")):
      me, them = pair[mine], pair[other]
      if me["split"] == "test" and them["split"] != "test":
        reason = (
          f"{pair['kind']} duplicate (aHash {pair['ahash_distance']}/256) of {them['key']} "
          f"({them['split']}, {them['label']}, patient {them['patient_id']})"
        )
        excluded.setdefault(me["key"], reason)
  return excluded


def _summary(records, pairs, excluded, not_listed) -> dict[str, int]:
  def count(cross_split: bool, cross_class: bool) -> int:
    return sum(p["cross_split"] == cross_split and p["cross_class"] == cross_class for p in pairs)

  return {
    "images": len(records),
    "pairs": len(pairs),
    "exact_pairs": sum(p["kind"] == "exact" for p in pairs),
    "near_pairs": sum(p["kind"] == "near" for p in pairs),
    "within_split_same_class": count(False, False),
    "within_split_cross_class": count(False, True),
    "cross_split_same_class": count(True, False),
    "cross_split_cross_class": count(True, True),
    "cross_split_involving_test": sum(
      p["cross_split"] and "test" in (p["a"]["split"], p["b"]["split"]) for p in pairs
    ),
    "excluded_from_test": len(excluded),
    "within_patient_pairs_not_listed": not_listed,
  }


def build_report(
  *,
  dataset: str,
  version: str,
  config: dict[str, Any],
  records: Sequence[ImageRecord],
  pairs: Sequence[dict[str, Any]],
  excluded: dict[str, str],
  build: dict[str, Any],
  not_listed: int = 0,
) -> dict[str, Any]:
  """The JSON-serialisable report (schema in the module docstring); `not_listed`: the second
  value of `find_duplicate_pairs`."""
  by_key = {r.key: r for r in records}
  splits: dict[str, dict[str, int]] = {}
  for r in records:
    if r.key not in excluded:
      per_label = splits.setdefault(r.split, {})
      per_label[r.label] = per_label.get(r.label, 0) + 1
  return {
    "dataset": dataset,
    "version": version,
    "config": dict(config),
    "method": {
      "exact": "sha256 of the decoded 8-bit grayscale pixels and the image size",
      "near": (
        f"average hash {HASH_SIZE}x{HASH_SIZE} distance <= ahash_max and difference hash "
        f"{HASH_SIZE}x{HASH_SIZE} distance <= dhash_max (bilinear downscale, Hamming distance)"
      ),
      "ahash_max": AHASH_MAX,
      "dhash_max": DHASH_MAX,
      "hash_bits": HASH_SIZE * HASH_SIZE,
    },
    "summary": _summary(records, pairs, excluded, not_listed),
    "splits": {s: dict(sorted(v.items())) for s, v in sorted(splits.items())},
    "build": dict(build),
    "excluded": [{**by_key[k].describe(), "reason": why} for k, why in sorted(excluded.items())],
    "pairs": list(pairs),
  }


def write_report(report: dict[str, Any], directory: str | os.PathLike) -> Path:
  path = Path(directory) / REPORT_FILENAME
  path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n", encoding="utf-8")
  return path


def read_report(directory: str | os.PathLike) -> dict[str, Any]:
  return json.loads((Path(directory) / REPORT_FILENAME).read_text(encoding="utf-8"))


def summary_lines(report: dict[str, Any]) -> list[str]:
  """A few log lines: the counts and every cross-split pair."""
  s = report["summary"]
  lines = [
    (
      f"{report['dataset']}: leakage audit of {s['images']} images: {s['pairs']} duplicate pairs "
      f"({s['exact_pairs']} exact, {s['near_pairs']} near): within split {s['within_split_same_class']}"
      f" same class + {s['within_split_cross_class']} cross class; across splits "
      f"{s['cross_split_same_class']} same class + {s['cross_split_cross_class']} cross class; "
      f"{s['excluded_from_test']} test images excluded"
    ),
  ]
  for p in report["pairs"]:
    if p["cross_split"]:
      a, b = p["a"], p["b"]
      lines.append(
        f"  cross-split {p['kind']} pair (aHash {p['ahash_distance']}, dHash {p['dhash_distance']}"
        f"): {a['key']} [{a['split']}, {a['label']}, {a['patient_id']}] ~ {b['key']} "
        f"[{b['split']}, {b['label']}, {b['patient_id']}]"
      )
  for e in report["excluded"]:
    lines.append(f"  excluded from test: {e['key']}: {e['reason']}")
  return lines


def format_report(report: dict[str, Any]) -> str:
  """Human-readable text of a whole report (what scripts/audit_data.py prints)."""
  out = summary_lines(report)
  out.append(
    f"method: {report['method']['near']}; ahash_max={report['method']['ahash_max']}, "
    f"dhash_max={report['method']['dhash_max']} of {report['method']['hash_bits']} bits"
  )
  out.append(f"config: {json.dumps(report['config'])}")
  out.append("examples per split: " + json.dumps(report["splits"]))
  out.append("build: " + json.dumps(report["build"]))
  out.append("all pairs:")
  for p in report["pairs"]:
    a, b = p["a"], p["b"]
    where = "cross-split" if p["cross_split"] else "same split"
    klass = "cross-class" if p["cross_class"] else "same class"
    out.append(
      f"  {p['kind']:5s} a={p['ahash_distance']:3d} d={p['dhash_distance']:3d} {where}, {klass}: "
      f"{a['key']} [{a['split']}, {a['patient_id']}] ~ {b['key']} [{b['split']}, {b['patient_id']}]"
    )
  return "\n".join(out)

"""The leakage audit (shared by every real builder): duplicate pairs and test exclusions, the
blocked pair search at scale, pairs within one patient left unlisted, and `ordered_map`."""

import numpy as np
import pytest
from helpers import smooth_image
from PIL import Image

from covid_flax.datasets import audit


def _record(key, split, label, patient, image):
  return audit.ImageRecord(key, split, label, patient, audit.fingerprint(image))


def _records():
  base, other = smooth_image(1), smooth_image(2)
  slightly = base.resize((96, 72), Image.Resampling.BILINEAR)
  return [
    _record("s1", "train", "covid", "p1", base),  # Three "slices" of one patient...
    _record("s2", "train", "covid", "p1", base.copy()),
    _record("s3", "train", "covid", "p1", slightly),
    _record("t1", "test", "covid", "p1", base.copy()),  # ...one in test: leakage, listed.
    _record("o1", "train", "non_covid", "p2", other),
    _record("o2", "train", "covid", "p3", other.copy()),  # Another patient: listed.
  ] + [_record(f"n{i}", "val", "covid", f"q{i}", smooth_image(10 + i)) for i in range(9)]


def _report(records, pairs, **kwargs):
  excluded = audit.test_exclusions(pairs)
  return audit.build_report(dataset="x", version="1", config={}, records=records, pairs=pairs,
                            excluded=excluded, build={}, **kwargs)  # fmt: skip


def test_audit_pairs_and_exclusions():
  base = smooth_image(1)
  records = [
    _record("a", "train", "covid", "p1", base),
    _record("b", "test", "non_covid", "p2", base.resize((96, 72), Image.Resampling.BILINEAR)),
    _record("c", "test", "covid", "p3", base.copy()),  # Exact duplicate of 'a'.
    _record("d", "val", "covid", "p4", smooth_image(2)),
  ] + [_record(f"n{i}", "train", "covid", f"q{i}", smooth_image(10 + i)) for i in range(30)]
  pairs, not_listed = audit.find_duplicate_pairs(records)
  assert not_listed == 0
  found = {(p["a"]["key"], p["b"]["key"]): p["kind"] for p in pairs}
  assert found == {("a", "b"): "near", ("a", "c"): "exact", ("b", "c"): "near"}
  assert set(audit.test_exclusions(pairs)) == {"b", "c"}
  report = _report(records, pairs)
  assert report["summary"]["cross_split_involving_test"] == 2
  assert "test" not in report["splits"]
  assert "2 test images excluded" in audit.summary_lines(report)[0]


def _keys(pairs):
  return {(p["a"]["key"], p["b"]["key"]) for p in pairs}


@pytest.mark.parametrize("block", [1024, 4, 1])
def test_blocked_search_finds_the_same_pairs_as_brute_force(monkeypatch, block):
  monkeypatch.setattr(audit, "_BLOCK", block)
  records = _records()
  pairs, not_listed = audit.find_duplicate_pairs(records)
  bits = np.stack([r.fingerprint.ahash for r in records])
  dhash = np.stack([r.fingerprint.dhash for r in records])
  expected = {
    (records[i].key, records[j].key)
    for i in range(len(records))
    for j in range(i + 1, len(records))
    if np.count_nonzero(bits[i] != bits[j]) <= audit.AHASH_MAX
    and np.count_nonzero(dhash[i] != dhash[j]) <= audit.DHASH_MAX
  }
  assert _keys(pairs) == expected and not_listed == 0
  assert {("s1", "s2"), ("s1", "t1"), ("o1", "o2")} <= expected


@pytest.mark.parametrize("block", [1024, 2])
def test_pairs_of_one_patient_class_and_split_are_counted_not_listed(monkeypatch, block):
  monkeypatch.setattr(audit, "_BLOCK", block)
  records = _records()
  listed, not_listed = audit.find_duplicate_pairs(records, within_patient=False)
  everything, _ = audit.find_duplicate_pairs(records)
  same = {("s1", "s2"), ("s1", "s3"), ("s2", "s3")}
  assert same <= _keys(everything)
  assert _keys(listed) == _keys(everything) - same and not_listed == 3
  assert {("s1", "t1"), ("o1", "o2")} <= _keys(listed)  # Across splits or patients: kept.
  report = _report(records, listed, not_listed=not_listed)
  assert report["summary"]["within_patient_pairs_not_listed"] == 3
  assert report["summary"]["excluded_from_test"] == 1


def test_ordered_map_keeps_order_bounds_the_window_and_raises_in_order():
  from covid_flax.datasets import common

  started = []

  def square(x):
    started.append(x)
    if x == 30:
      raise ValueError("item 30")
    return x * x

  results = common.ordered_map(square, list(range(40)), workers=2)
  assert next(results) == 0
  assert len(started) <= 8  # At most 4 per worker ahead of the consumer.
  assert [next(results) for _ in range(29)] == [x * x for x in range(1, 30)]
  with pytest.raises(ValueError, match="item 30"):
    next(results)
  assert list(common.ordered_map(square, [3, 4], workers=1)) == [9, 16]


def test_ordered_map_in_worker_processes_keeps_order():
  from covid_flax.datasets import common

  got = list(common.ordered_map(abs, [-3, 1, -4, 1, -5], workers=2, processes=True))
  assert got == [3, 1, 4, 1, 5]

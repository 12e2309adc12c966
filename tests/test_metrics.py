"""covid_flax.metrics: point values, threshold choice, Wilson and patient-bootstrap intervals."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from covid_flax import metrics, report

LABELS = np.array([0, 0, 0, 1, 1, 1])


def _random_data(n=120, n_patients=40, seed=0, round_to=None):
  rng = np.random.default_rng(seed)
  patients = rng.integers(0, n_patients, n)
  labels = (rng.random(n_patients) < 0.5).astype(int)[patients]  # One label per patient.
  probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
  if round_to is not None:
    probs = np.round(probs, round_to)
  return labels, probs, np.array([f"p{i}" for i in patients])


def test_perfect_classifier():
  m = metrics.compute_metrics(LABELS, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], 0.5)
  for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc", "pr_auc"):
    assert m[name] == 1.0, name
  assert m["confusion_matrix"] == [[3, 0], [0, 3]]
  assert m["brier"] == pytest.approx(np.mean([0.01, 0.04, 0.09, 0.09, 0.04, 0.01]))


def test_inverted_classifier():
  m = metrics.compute_metrics(LABELS, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], 0.5)
  assert m["confusion_matrix"] == [[0, 3], [3, 0]]
  for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc"):
    assert m[name] == 0.0, name
  # Average precision: positives ranked 4th, 5th, 6th -> (1/4 + 2/5 + 3/6) / 3.
  assert m["pr_auc"] == pytest.approx((1 / 4 + 2 / 5 + 3 / 6) / 3)


def test_hand_checked_values_with_ties():
  labels = [0, 0, 1, 1, 0, 1]
  probs = [0.2, 0.5, 0.5, 0.8, 0.8, 0.8]
  m = metrics.compute_metrics(labels, probs, 0.5)  # 0.5 is called positive (>=).
  assert m["confusion_matrix"] == [[1, 2], [0, 3]]
  assert m["sensitivity"] == 1.0
  assert m["specificity"] == pytest.approx(1 / 3)
  assert m["ppv"] == pytest.approx(3 / 5)
  assert m["npv"] == 1.0
  assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 0))
  wins = sum(
    1.0 if p > q else 0.5 if p == q else 0.0
    for p, y in zip(probs, labels, strict=True)
    if y == 1
    for q, z in zip(probs, labels, strict=True)
    if z == 0
  )
  assert m["roc_auc"] == pytest.approx(wins / 9)
  assert m["roc_auc"] == pytest.approx(6.5 / 9)


def test_ece_by_hand():
  # Bin [0.0, 0.1]: two at 0.05, one positive -> |0.5 - 0.05| * 2/4; bin (0.9, 1]: 0.95, 0.95, both
  # positive -> |1 - 0.95| * 2/4.
  ece = metrics.expected_calibration_error([0, 1, 1, 1], [0.05, 0.05, 0.95, 0.95])
  assert ece == pytest.approx(0.45 * 0.5 + 0.05 * 0.5)
  assert metrics.compute_metrics([0, 1, 1, 1], [0.05, 0.05, 0.95, 0.95], 0.5)["ece"] == ece


def test_undefined_values_are_nan_not_errors():
  m = metrics.compute_metrics([0, 0, 0], [0.1, 0.6, 0.2], 0.5)  # No positives.
  for name in ("sensitivity", "roc_auc", "pr_auc"):
    assert math.isnan(m[name]), name
  assert m["specificity"] == pytest.approx(2 / 3)
  assert m["ppv"] == 0.0
  m = metrics.compute_metrics([0, 1], [0.1, 0.2], 0.9)  # Nothing called positive.
  assert math.isnan(m["ppv"]) and m["f1"] == 0.0  # sklearn: 2tp / (2tp + fp + fn).
  assert math.isnan(metrics.compute_metrics([0, 0], [0.1, 0.2], 0.5)["f1"])  # 0 / 0.
  m = metrics.compute_metrics([1, 1], [0.2, 0.7], 0.5)  # No negatives.
  assert math.isnan(m["specificity"]) and m["npv"] == 0.0
  assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
  record = metrics.evaluate_predictions([0, 0, 0], [0.1, 0.6, 0.2], ["a", "b", "c"], 0.5, 50)
  assert record["metrics"]["sensitivity"]["value"] is None
  assert "undefined" in record["metrics"]["sensitivity"]["note"]
  assert record["metrics"]["roc_auc"]["n_valid_resamples"] == 0
  json.dumps(record, allow_nan=False)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="0 .non_covid. or 1"):
    metrics.compute_metrics([0, 2], [0.1, 0.2], 0.5)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    metrics.compute_metrics([0, 1], [0.1, 1.2], 0.5)
  with pytest.raises(ValueError, match="empty patient_id"):
    list(metrics.patient_bootstrap_indices(["a", "", "b"], 1))


def test_choose_threshold_with_ties():
  labels = [0, 1, 1, 0, 1, 0]
  probs = [0.2, 0.6, 0.6, 0.6, 0.9, 0.1]
  # Sensitivity 1/3 at 0.9; all three tied 0.6 images flip together, giving 1.0.
  assert metrics.choose_threshold(labels, probs, 0.3) == 0.9
  assert metrics.choose_threshold(labels, probs, 1 / 3) == 0.9
  assert metrics.choose_threshold(labels, probs, 0.34) == 0.6
  assert metrics.choose_threshold(labels, probs, 1.0) == 0.6
  # Positives in a row without negatives between them: collinear ROC points, which sklearn drops
  # by default, are still candidates.
  assert metrics.choose_threshold([0, 0, 1, 1, 1, 1], [0.1, 0.1, 0.9, 0.8, 0.7, 0.6], 0.5) == 0.8


def test_choose_threshold_hits_target_and_is_highest():
  labels, probs, _ = _random_data(n=300, seed=1, round_to=2)  # Many ties.

  def sens(thr):
    return (probs[labels == 1] >= thr).mean()

  for target in (0.5, 0.8, 0.9, 0.95, 1.0):
    t = metrics.choose_threshold(labels, probs, target)
    assert sens(t) >= target
    higher = probs[probs > t]
    assert higher.size == 0 or sens(higher.min()) < target, target
    assert t in probs


def test_choose_threshold_unreachable_until_zero():
  with pytest.warns(UserWarning, match="every image is called COVID"):
    t = metrics.choose_threshold([0, 1, 1, 0], [0.0, 0.0, 0.8, 0.5], 0.95)
  assert t == 0.0
  m = metrics.compute_metrics([0, 1, 1, 0], [0.0, 0.0, 0.8, 0.5], t)
  assert m["sensitivity"] == 1.0 and m["specificity"] == 0.0
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert metrics.choose_threshold([1, 1], [0.3, 0.7], 0.5) == 0.7  # No negatives: fine.
  with pytest.raises(ValueError, match="no COVID"):
    metrics.choose_threshold([0, 0], [0.3, 0.7], 0.9)
  with pytest.raises(ValueError, match="target_sensitivity"):
    metrics.choose_threshold([0, 1], [0.3, 0.7], 0.0)


def test_wilson_known_values():
  lo, hi = metrics.wilson_interval(8, 10)
  assert (lo, hi) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)  # Textbook example.
  for k, n, conf in ((0, 12, 0.95), (12, 12, 0.95), (37, 91, 0.9), (1, 2, 0.99)):
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
    assert metrics.wilson_interval(k, n, conf) == pytest.approx((ref.low, ref.high), abs=1e-12)
  assert all(math.isnan(x) for x in metrics.wilson_interval(0, 0))


def test_bootstrap_keeps_patients_together():
  patient_ids = np.array(["a", "a", "a", "b", "c", "c", "d"])
  sizes = {"a": 3, "b": 1, "c": 2, "d": 1}
  for idx in metrics.patient_bootstrap_indices(patient_ids, 200, seed=3):
    drawn = patient_ids[idx]
    assert sum(np.sum(drawn == p) // sizes[p] for p in sizes) == 4  # Four patients drawn.
    for p, size in sizes.items():
      assert np.sum(drawn == p) % size == 0  # Whole patients only.
      assert set(idx[drawn == p]) in (set(), set(np.flatnonzero(patient_ids == p)))


def test_bootstrap_is_seeded():
  labels, probs, pids = _random_data()
  a = metrics.bootstrap_ci(labels, probs, pids, 0.5, n_resamples=100, seed=7)
  b = metrics.bootstrap_ci(labels, probs, pids, 0.5, n_resamples=100, seed=7)
  c = metrics.bootstrap_ci(labels, probs, pids, 0.5, n_resamples=100, seed=8)
  assert a == b and a != c


def test_patient_bootstrap_wider_than_image_bootstrap_for_clustered_data():
  # Each patient has 20 identical images: a per-image resample would think n = 400, not 20.
  rng = np.random.default_rng(0)
  patient_labels = np.array([0, 1] * 10)
  patient_probs = np.clip(0.5 + (patient_labels - 0.5) * 0.3 + rng.normal(0, 0.25, 20), 0, 1)
  labels, probs = np.repeat(patient_labels, 20), np.repeat(patient_probs, 20)
  by_patient = metrics.bootstrap_ci(labels, probs, np.repeat(np.arange(20), 20), 0.5, 300)
  by_image = metrics.bootstrap_ci(labels, probs, np.arange(400), 0.5, 300)
  for name in ("accuracy", "roc_auc"):
    patient, image = by_patient[name], by_image[name]
    assert patient.high - patient.low > 2.5 * (image.high - image.low), name


@pytest.mark.parametrize("round_to", [None, 1])
def test_vectorised_bootstrap_equals_sklearn_on_each_resample(round_to):
  labels, probs, pids = _random_data(n=60, n_patients=12, seed=2, round_to=round_to)
  dist = metrics.bootstrap_distribution(labels, probs, pids, 0.45, n_resamples=60, seed=5)
  undefined = 0
  for r, idx in enumerate(metrics.patient_bootstrap_indices(pids, 60, seed=5)):
    ref = metrics.compute_metrics(labels[idx], probs[idx], 0.45)
    for name in metrics.METRICS:
      if math.isnan(ref[name]):
        undefined += 1
        assert math.isnan(dist[name][r]), (name, r)
      else:
        assert dist[name][r] == pytest.approx(ref[name], abs=1e-12), (name, r)
  assert undefined < 60 * len(metrics.METRICS)


def test_bootstrap_reports_valid_resamples():
  # Two patients, one per class: about half the resamples lack a class, so AUC is skipped there.
  labels, probs, pids = [0, 0, 1, 1], [0.2, 0.3, 0.7, 0.6], ["n", "n", "c", "c"]
  ci = metrics.bootstrap_ci(labels, probs, pids, 0.5, n_resamples=400, seed=0)
  assert 120 < ci["roc_auc"].n_valid < 280
  assert ci["accuracy"].n_valid == 400
  record = metrics.evaluate_predictions(labels, probs, pids, 0.5, n_resamples=400)
  assert "resamples" in record["metrics"]["roc_auc"]["note"]


def test_evaluate_predictions_schema_and_ci_methods():
  labels, probs, pids = _random_data()
  t = metrics.choose_threshold(labels, probs, 0.9)
  results = metrics.evaluate_at_thresholds(labels, probs, pids, t, 0.9, n_resamples=200)
  text = json.dumps(results, allow_nan=False)
  assert set(json.loads(text)) == {"target_sensitivity", "threshold_val", "threshold_0.5"}
  record = results["threshold_val"]
  assert record["threshold"] == t
  assert record["counts"]["n_images"] == 120
  assert record["counts"]["n_patients"] == len(set(pids))
  assert sum(record["confusion_matrix"].values()) == 120
  point = metrics.compute_metrics(labels, probs, t)
  for name in metrics.METRICS:
    rec = record["metrics"][name]
    assert rec["value"] == pytest.approx(point[name])
    assert rec["ci_low"] <= rec["value"] <= rec["ci_high"] or name == "ece", name
    assert rec["ci_method"] == "patient_bootstrap"  # Several images per patient.
  sens = record["metrics"]["sensitivity"]
  assert sens["successes"] == record["confusion_matrix"]["tp"]
  assert sens["wilson_ci"] == pytest.approx(
    metrics.wilson_interval(sens["successes"], sens["trials"])
  )
  # One image per patient: Wilson becomes the headline interval of the proportions.
  single = metrics.evaluate_predictions(labels, probs, np.arange(120), t, n_resamples=50)
  assert single["metrics"]["accuracy"]["ci_method"] == "wilson"
  assert single["metrics"]["roc_auc"]["ci_method"] == "patient_bootstrap"
  assert [single["metrics"]["ppv"][k] for k in ("ci_low", "ci_high")] == single["metrics"]["ppv"][
    "wilson_ci"
  ]


def test_all_or_none_proportion_gets_a_patient_wilson_interval_not_a_zero_width_one():
  labels = np.zeros(19, np.int32)  # 19 negatives of 16 patients, all called positive.
  probs = np.full(19, 0.9)
  pids = [f"p{i}" for i in range(16)] + ["p0", "p1", "p2"]
  rec = metrics.evaluate_predictions(labels, probs, pids, 0.5, n_resamples=100)["metrics"]
  spec = rec["specificity"]
  assert spec["value"] == 0 and spec["bootstrap_ci"] == [0, 0]
  assert spec["ci_method"] == "wilson_patients"
  assert [spec["ci_low"], spec["ci_high"]] == pytest.approx(metrics.wilson_interval(0, 16))
  assert rec["accuracy"]["ci_method"] == "wilson_patients"  # 0 of 19 as well.


def test_markdown_report():
  labels, probs, pids = _random_data()
  results = metrics.evaluate_at_thresholds(labels, probs, pids, 0.4, 0.95, n_resamples=100)
  text = report.markdown_report(results, "CXR test")
  assert text.startswith("# CXR test")
  assert "| Metric | threshold 0.4 (val) | threshold 0.5 |" in text
  auc = results["threshold_val"]["metrics"]["roc_auc"]
  assert f"| ROC-AUC | {auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" in text
  assert (
    f"| Count: COVID missed (FN) | {results['threshold_val']['confusion_matrix']['fn']} |" in text
  )
  assert report.markdown_report(results["threshold_0.5"]).count("\n| ") == 15


def test_report_notes_say_which_threshold_they_are_of():
  """All 19 negatives called COVID at 0.5 but not at the val threshold: the note of the 0.5
  column must say it is about threshold 0.5, and shared notes appear once."""
  labels = np.zeros(19, np.int32)
  probs = np.r_[np.full(4, 0.6), np.full(15, 0.95)]
  pids = np.r_[np.arange(16), [0, 1, 2]]
  results = metrics.evaluate_at_thresholds(labels, probs, pids, 0.9, 0.95, n_resamples=100)
  text = report.markdown_report(results)
  notes = text.split("Notes:")[1]
  assert notes.count("19 images from 16 patients.") == 1
  assert "- threshold 0.5: specificity: 0 of 19 images" in notes
  assert "- threshold 0.9 (val): specificity" not in notes

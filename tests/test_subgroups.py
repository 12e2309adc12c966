"""Results by image group (source, view): the shortcut check in every evaluation."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from covid_flax import subgroups

# Source "a" has both classes, "b" only negatives (all called COVID: a source shortcut), "c" only
# positives. Patients p0..p9 with two images each.
LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0])
PROBS = np.array([.9, .8, .4, .3, .2, .6, .7, .9, .8, .95, .7, .6, .9, .8, .1, .2, .3, .35, .55,
                  .45])  # fmt: skip
SOURCES = np.array(list("aaaaaabbbbccccaaaaaa"))
VIEWS = np.array(["PA"] * 10 + ["AP"] * 10)
PATIENTS = np.repeat([f"p{i}" for i in range(10)], 2)


@pytest.fixture(scope="module")
def results():
  attributes = {"source": SOURCES, "view": VIEWS, "finding": np.array(["x"] * 20)}
  return subgroups.subgroup_results(LABELS, PROBS, PATIENTS, attributes, 0.5, n_resamples=200)


def test_every_group_of_every_attribute_with_two_values(results):
  assert results["threshold"] == 0.5
  assert set(results) == {"threshold", "source", "view", "source_matched"}  # finding: one value.
  assert list(results["source"]) == ["a", "b", "c"] and list(results["view"]) == ["AP", "PA"]
  b = results["source"]["b"]
  assert b["counts"] == {"n_images": 4, "n_patients": 2, "n_positive": 0, "n_negative": 4}
  assert b["called_covid"]["value"] == 1.0 and b["called_covid"]["ci_low"] < 1.0
  assert b["metrics"]["specificity"]["value"] == 0.0
  assert b["metrics"]["roc_auc"]["value"] is None  # One class: no AUC.
  assert results["source"]["c"]["metrics"]["sensitivity"]["value"] == 1.0


def test_auc_within_a_source_and_on_the_matched_sources(results):
  a = SOURCES == "a"
  got = results["source"]["a"]["metrics"]["roc_auc"]
  assert got["value"] == pytest.approx(roc_auc_score(LABELS[a], PROBS[a]))
  assert got["ci_low"] <= got["value"] <= got["ci_high"]
  matched = results["source_matched"]
  assert matched["sources"] == ["a"]  # The only source with both classes.
  assert matched["counts"]["n_images"] == int(a.sum())
  assert matched["metrics"]["roc_auc"]["value"] == pytest.approx(got["value"])
  called = (PROBS[a] >= 0.5).mean()
  assert matched["called_covid"]["value"] == pytest.approx(called)


def test_no_groups_no_entry():
  assert subgroups.subgroup_results(LABELS, PROBS, PATIENTS, {}, 0.5, 50) == {}
  assert subgroups.subgroup_results(LABELS, PROBS, PATIENTS, {"source": ["s"] * 20}, 0.5, 50) == {}
  assert subgroups.markdown({}) == ""


def test_no_source_in_both_classes_no_matched_subset():
  sources = np.where(LABELS == 1, "covid_site", "other_site")
  out = subgroups.subgroup_results(LABELS, PROBS, PATIENTS, {"source": sources}, 0.5, 50)
  assert "source_matched" not in out and set(out["source"]) == {"covid_site", "other_site"}


def test_markdown_lists_each_group(results):
  text = subgroups.markdown(results)
  assert "**Source-matched subset** (a):" in text
  assert "| b | 0 / 4 | 2 | 1.00 [" in text  # 0 COVID / 4 non-COVID images, all called COVID.
  assert "By view:" in text and "| AP |" in text


def test_named_matched_sources():
  attributes = {"source": SOURCES}
  out = subgroups.subgroup_results(LABELS, PROBS, PATIENTS, attributes, 0.5, 50, ["c", "a"])
  assert out["source_matched"]["sources"] == ["a", "c"]
  assert out["source_matched"]["counts"]["n_images"] == int(np.isin(SOURCES, ["a", "c"]).sum())
  with pytest.raises(subgroups.SubgroupError, match=r"\['x'\] not among the sources"):
    subgroups.subgroup_results(LABELS, PROBS, PATIENTS, attributes, 0.5, 50, ["a", "x"])
  with pytest.raises(subgroups.SubgroupError, match="no source to match"):
    subgroups.check_matched_sources(["a"], {"view": VIEWS})


# The kept outputs behind docs/cxr_adult.md: each metrics.json agrees with its predictions.csv,
# by group too (the group columns are in predictions.csv).
_KEPT = Path(__file__).resolve().parents[1] / "results"
_KEPT_CV = sorted(p for p in (_KEPT / "cxr_adult_cv3").glob("*") if p.is_dir())
_KEPT_PROBES = sorted(p for p in (_KEPT / "cxr_adult_test").glob("*") if p.is_dir())


def _read(folder: Path):
  with open(folder / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  labels = np.array([int(r["label"]) for r in rows])
  probs = np.array([float(r["probability"]) for r in rows])
  groups = {
    k: np.array([r[k] for r in rows]) for k in ("source", "view", "finding") if k in rows[0]
  }
  return rows, labels, probs, groups, json.loads((folder / "metrics.json").read_text())


def test_kept_results_exist():
  assert len(_KEPT_CV) == 8 and len(_KEPT_PROBES) == 9


@pytest.mark.parametrize("folder", _KEPT_CV, ids=lambda p: p.name)
def test_kept_adult_cross_validation_matches_its_predictions(folder):
  rows, labels, probs, groups, results = _read(folder)
  record = results["threshold_0.5"]
  assert record["counts"] == {"n_images": 162, "n_patients": 137, "n_positive": 100,
                              "n_negative": 62}  # fmt: skip
  assert record["metrics"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(labels, probs))
  reference = {r["filename"] for r in _read(_KEPT / "cxr_adult_cv3" / "recipe_seed0")[0]}
  assert {r["filename"] for r in rows} == reference  # The same folds' images.
  matched = results["subgroups"]["source_matched"]
  assert matched["sources"] == ["eurorad", "radiopaedia"]
  mask = np.isin(groups["source"], matched["sources"])
  assert (int(mask.sum()), int(labels[mask].sum())) == (78, 24)
  assert matched["metrics"]["roc_auc"]["value"] == pytest.approx(
    roc_auc_score(labels[mask], probs[mask])
  )
  for view, group in results["subgroups"]["view"].items():
    in_view = groups["view"] == view
    assert group["counts"]["n_images"] == int(in_view.sum())
    assert group["called_covid"]["value"] == pytest.approx(np.mean(probs[in_view] >= 0.5))


@pytest.mark.parametrize("folder", _KEPT_PROBES, ids=lambda p: p.name)
def test_kept_test_and_probe_results_match_their_predictions(folder):
  _, labels, probs, groups, results = _read(folder)
  threshold = results["threshold_val"]["threshold"]
  called = np.mean(probs >= threshold)
  assert 1 - results["threshold_val"]["metrics"]["accuracy"]["value"] == pytest.approx(
    np.mean((probs >= threshold) != labels)
  )
  if "nih" in folder.name:
    assert len(labels) == 80 and not labels.any()
    by_source = results["subgroups"]["source"]
    assert set(by_source) == {"nih_no_finding", "nih_pneumonia"}
    for source, group in by_source.items():
      share = np.mean(probs[groups["source"] == source] >= threshold)
      assert group["called_covid"]["value"] == pytest.approx(share)
  if "no_finding" in folder.name:
    assert len(labels) == 19 and not labels.any()
    assert results["threshold_val"]["confusion_matrix"]["fp"] == round(called * 19)


_KEPT_CT = sorted(
  [*(_KEPT / "ct_probe").glob("*_seed[0-9]_*"), *(_KEPT / "ct_probe").glob("*_fold[0-9]_*")]
)


@pytest.mark.parametrize("folder", _KEPT_CT, ids=lambda p: p.name)
def test_kept_ct_test_and_probe_results_match_their_predictions(folder):
  """docs/ct_probe.md's numbers: the CT recipes kept, on test and on the external probe."""
  _, labels, probs, groups, results = _read(folder)
  assert results["threshold_val"]["metrics"]["roc_auc"]["value"] == pytest.approx(
    roc_auc_score(labels, probs)
  )
  if folder.name.endswith("_probe"):
    assert (len(labels), int(labels.sum())) == (120, 60)
    threshold = results["threshold_val"]["threshold"]
    for finding, group in results["subgroups"]["finding"].items():
      share = np.mean(probs[groups["finding"] == finding] >= threshold)
      assert group["called_covid"]["value"] == pytest.approx(share)
    assert int(np.sum(groups["finding"] == "ground-glass visible")) == 39
  else:
    assert results["threshold_val"]["counts"]["n_images"] == 201


def test_kept_ct_results_exist():
  assert [p.name for p in _KEPT_CT] == ["bf16_onednn_seed0_probe", "bf16_onednn_seed0_test",
                                        "bf16_onednn_seed1_probe", "black_fill_f32_seed0_probe",
                                        "clahe_bf16_seed0_probe",
                                        "clahe_cv3_w32_fold0_probe",
                                        "clahe_cv3_w32_fold1_probe",
                                        "clahe_cv3_w32_fold2_probe",
                                        "clahe_f32_seed0_probe", "clahe_f32_seed0_test",
                                        "clahe_f32_seed1_probe", "clahe_f32_seed2_probe",
                                        "clahe_strongest_cv3_w32_fold0_probe",
                                        "clahe_strongest_cv3_w32_fold1_probe",
                                        "clahe_strongest_cv3_w32_fold2_probe",
                                        "clahe_strongest_f32_seed0_probe",
                                        "clahe_strongest_f32_seed1_probe",
                                        "crop_app_seed0_probe",
                                        "crop_app_seed0_test", "crops_seed0_probe",
                                        "crops_seed0_test", "crops_seed1_probe",
                                        "cutmix_f32_seed0_probe",
                                        "eqlungs_f32_seed0_probe",
                                        "hull_cv3_w32_fold0_probe",
                                        "hull_cv3_w32_fold1_probe",
                                        "hull_cv3_w32_fold2_probe",
                                        "hull_f32_seed0_probe", "hull_f32_seed0_test", "hull_f32_seed1_probe",
                                        "jpeg_seed0_probe", "jpeg_seed1_probe",
                                        "mixstyle1_f32_seed0_probe",
                                        "mixstyle1_f32_seed1_probe",
                                        "mixstyle_f32_seed0_probe",
                                        "old_seed0_probe", "old_seed0_test",
                                        "papers_only_f32_seed0_probe",
                                        "papers_only_f32_seed0_test",
                                        "papers_only_f32_seed1_probe",
                                        "ssl_strong_seed0_probe", "ssl_strong_seed1_probe",
                                        "strong_crops_f32_seed0_probe",
                                        "strong_crops_f32_seed0_test",
                                        "strong_crops_jpeg_seed0_probe",
                                        "strong_crops_seed0_probe", "strong_crops_seed0_test",
                                        "strong_crops_seed1_probe",
                                        "strongest_crops_f32_seed0_probe",
                                        "strongest_crops_f32_seed0_test",
                                        "strongest_crops_f32_seed1_probe",
                                        "window_downscale_seed0_probe",
                                        "window_downscale_seed1_probe"]  # fmt: skip

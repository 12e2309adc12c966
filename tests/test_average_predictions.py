"""covid_flax/average_predictions.py: the ensemble of prediction-only runs (cross-validations)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from covid_flax import average_predictions as average
from covid_flax import compare, report

_ROOT = Path(__file__).resolve().parents[1]


def _eval_dir(root, name, probs, labels=None, patients=None, filenames=None):
  n = len(probs)
  labels = np.arange(n) % 2 if labels is None else labels
  patients = [f"p{i // 2}" for i in range(n)] if patients is None else patients
  filenames = [f"img{i}.png" for i in range(n)] if filenames is None else filenames
  d = root / name
  d.mkdir()
  report.write_predictions(d / "predictions.csv", filenames, patients, labels, probs)
  return d


def test_average_scores_the_mean_probability_and_compare_reads_it(tmp_path):
  rng = np.random.default_rng(0)
  n = 60
  labels = np.arange(n) % 2
  members = [np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, n), 0, 1) for _ in range(3)]
  order = rng.permutation(n)  # Each member lists the images in its own order.
  dirs = [_eval_dir(tmp_path, "a", members[0], labels)]
  for name, probs in zip(("b", "c"), members[1:], strict=True):
    dirs.append(
      _eval_dir(
        tmp_path,
        name,
        probs[order],
        labels[order],
        [f"p{i // 2}" for i in order],
        [f"img{i}.png" for i in order],
      )
    )
  out = tmp_path / "ensemble"
  results = average.average_predictions(dirs, out, n_resamples=50)

  mean = np.mean(members, axis=0)
  got_labels, got_probs, got_patients = report.read_predictions(out / "predictions.csv")
  by_name = {f"img{i}.png": i for i in range(n)}
  with open(out / "predictions.csv", newline="") as f:
    index = [by_name[row["filename"]] for row in csv.DictReader(f)]
  np.testing.assert_allclose(got_probs, mean[index])
  np.testing.assert_array_equal(got_labels, labels[index])
  auc = results["threshold_0.5"]["metrics"]["roc_auc"]["value"]
  assert auc == pytest.approx(roc_auc_score(labels, mean))
  assert auc > max(roc_auc_score(labels, m) for m in members)  # Independent noise averages out.
  assert json.loads((out / "metrics.json").read_text())["members"] == [str(d) for d in dirs]
  assert "Mean probability of 3 runs" in (out / "report.md").read_text()

  pair = tmp_path / "pair"
  average.average_predictions(dirs[:2], pair, n_resamples=50)
  comparison = compare.compare_runs(
    [out, pair], tmp_path / "cmp", threshold_key="threshold_0.5", n_resamples=50
  )
  assert comparison["difference_bootstrap"]["paired"]
  assert comparison["metrics"]["roc_auc"]["difference"] == pytest.approx(
    auc - roc_auc_score(labels, np.mean(members[:2], axis=0))
  )


@pytest.mark.parametrize(
  "change, message",
  [
    ({"filenames": [f"other{i}.png" for i in range(10)]}, "scored other images"),
    ({"labels": np.ones(10, int)}, "img0.png has patient 'p0', label 1"),
    ({"patients": [f"q{i}" for i in range(10)]}, "img0.png has patient 'q0'"),
  ],
)
def test_members_that_scored_different_images_are_refused(tmp_path, change, message):
  first = _eval_dir(tmp_path, "a", np.linspace(0, 1, 10))
  second = _eval_dir(tmp_path, "b", np.linspace(1, 0, 10), **change)
  out = tmp_path / "ensemble"
  with pytest.raises(ValueError, match=message) as error:
    average.average_predictions([first, second], out)
  assert str(second) in str(error.value)
  assert not out.exists() and not list(tmp_path.glob(".ensemble*"))


def test_bad_inputs_name_what_is_wrong(tmp_path, capsys):
  one = _eval_dir(tmp_path, "a", np.linspace(0, 1, 10))
  with pytest.raises(ValueError, match="at least two"):
    average.average_predictions([one], tmp_path / "out")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
    average.average_predictions([one, tmp_path / "missing"], tmp_path / "out")
  twice = _eval_dir(tmp_path, "b", np.linspace(0, 1, 10), filenames=["same.png"] * 10)
  with pytest.raises(ValueError, match="appears more than once"):
    average.average_predictions([one, twice], tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_existing_output_survives_a_failed_average(tmp_path):
  one = _eval_dir(tmp_path, "a", np.linspace(0, 1, 10))
  out = tmp_path / "ensemble"
  average.main([str(one), str(_eval_dir(tmp_path, "b", np.linspace(1, 0, 10))), f"--output={out}"])
  before = (out / "predictions.csv").read_text()
  other = _eval_dir(tmp_path, "c", np.linspace(0, 1, 10), filenames=[f"x{i}" for i in range(10)])
  with pytest.raises(ValueError):
    average.main([str(one), str(other), f"--output={out}"])
  assert (out / "predictions.csv").read_text() == before


def test_kept_cross_validation_seeds_average_to_the_readme_numbers(tmp_path):
  """docs/results.md "Cross-validated checks": the 3-seed ensemble of the no-dropout recipe."""
  kept = _ROOT / "results" / "ct_cv3_w32"
  seeds = [kept / s for s in ("dropout_0", "dropout_0_seed1", "dropout_0_seed2")]
  record = average.average_predictions(seeds, tmp_path / "ens", n_resamples=20)["threshold_0.5"]
  assert record["counts"]["n_images"] == 543 and record["counts"]["n_patients"] == 289
  assert round(record["metrics"]["roc_auc"]["value"], 3) == 0.849
  assert round(record["metrics"]["accuracy"]["value"], 3) == 0.792


def test_kept_cross_validation_recipes_average_to_the_results_numbers(tmp_path):
  """docs/results.md "Cross-validated checks": 3 seeds + 96 pixels + SAM, 5 training paths."""
  kept = _ROOT / "results" / "ct_cv3_w32"
  names = (
    "dropout_0",
    "dropout_0_seed1",
    "dropout_0_seed2",
    "dropout_0_img96",
    "dropout_0_sam05_e60",
  )
  record = average.average_predictions([kept / n for n in names], tmp_path / "ens", n_resamples=20)
  assert round(record["threshold_0.5"]["metrics"]["roc_auc"]["value"], 3) == 0.856
  assert round(record["threshold_0.5"]["metrics"]["accuracy"]["value"], 3) == 0.794


def test_kept_test_seeds_average_to_what_evaluate_ensemble_wrote(tmp_path):
  """README / docs/results.md CT tables: `evaluate --ensemble` and this script agree on the 3-seed final fit."""
  kept = _ROOT / "results" / "ct_test"
  seeds = [kept / f"dropout_0_final_fit_seed{s}" for s in range(3)]
  record = average.average_predictions(seeds, tmp_path / "ens", n_resamples=20)["threshold_0.5"]
  assert record["counts"]["n_images"] == 201
  assert round(record["metrics"]["accuracy"]["value"], 3) == 0.751
  assert round(record["metrics"]["roc_auc"]["value"], 3) == 0.816
  ours = average.read_scored_images(tmp_path / "ens")
  theirs = average.read_scored_images(kept / "dropout_0_final_fit_ensemble3")
  assert ours.keys() == theirs.keys() and len(ours) == 201
  for name, (patient, label, probability) in theirs.items():
    assert ours[name][:2] == (patient, label)
    assert ours[name][2] == pytest.approx(probability, abs=1e-6)

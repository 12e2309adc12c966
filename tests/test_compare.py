"""covid_flax/compare.py on fake workdirs built with covid_flax.metrics."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from covid_flax import compare, metrics


def _fake_workdir(root, name, separation, seed, step=300, summary=None, n_patients=80):
  """A workdir with eval/test-<step>/{metrics.json,predictions.csv}; 2 images per patient."""
  rng = np.random.default_rng(seed)
  patient_labels = rng.integers(0, 2, n_patients)
  labels = np.repeat(patient_labels, 2)
  probs = np.clip(rng.normal(0.5 + separation * (labels - 0.5), 0.15), 0, 1)
  pids = np.repeat([f"{name}-{i}" for i in range(n_patients)], 2)
  workdir = root / name
  eval_dir = workdir / "eval" / f"test-{step}"
  eval_dir.mkdir(parents=True)
  (workdir / "eval" / "test-99999").mkdir()  # Newer but without results: must be ignored.
  threshold = metrics.choose_threshold(labels, probs, 0.9)
  results = metrics.evaluate_at_thresholds(labels, probs, pids, threshold, 0.9, n_resamples=200)
  (eval_dir / "metrics.json").write_text(json.dumps(results))
  with open(eval_dir / "predictions.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["filename", "patient_id", "label", "probability"])
    for i, (pid, y, p) in enumerate(zip(pids, labels, probs, strict=True)):
      writer.writerow([f"img{i}.png", pid, int(y), repr(float(p))])
  if summary is not None:
    (workdir / "train_summary.json").write_text(json.dumps(summary))
  return workdir, results


@pytest.fixture
def runs(tmp_path):
  good, good_results = _fake_workdir(
    tmp_path, "cxr", 0.7, 0, summary={"train_time_s": 3725.0, "num_train_examples": 1234}
  )
  weak, weak_results = _fake_workdir(tmp_path, "ct", 0.05, 1)
  return tmp_path, (good, good_results), (weak, weak_results)


def test_compare_writes_table_and_figure(runs):
  root, (good, good_results), (weak, weak_results) = runs
  out = root / "out"
  result = compare.compare_runs([good, weak], out, n_resamples=200)
  table = (out / "comparison.md").read_text()
  assert json.loads((out / "comparison.json").read_text()) == json.loads(json.dumps(result))
  assert result["difference_bootstrap"]["paired"] is False  # Different patients: independent.
  with Image.open(out / "roc_comparison.png") as image:
    assert image.format == "PNG" and image.size[0] > 300
    assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20
  assert "| | cxr | ct | Difference (cxr - ct) [95% CI] | Intervals overlap |" in table
  assert "| Training time | 1h 02m 05s (3725 s) | unknown | | |" in table
  assert "| Training images | 1234 | unknown | | |" in table
  assert "| test patients | 80 | 80 | | |" in table
  # A strong vs a near-chance classifier: AUC intervals apart, a clear winner.
  auc = result["metrics"]["roc_auc"]
  good_auc = good_results["threshold_val"]["metrics"]["roc_auc"]
  weak_auc = weak_results["threshold_val"]["metrics"]["roc_auc"]
  assert auc["values"] == [good_auc["value"], weak_auc["value"]]
  assert auc["intervals_overlap"] is False
  assert auc["better"] == "cxr"
  assert auc["difference"] == pytest.approx(good_auc["value"] - weak_auc["value"])
  assert auc["difference_ci"][0] > 0
  row = next(line for line in table.splitlines() if line.startswith("| ROC-AUC |"))
  assert row.endswith("| no |")
  assert "- ROC-AUC: cxr" in table and "do not overlap; cxr is better." in table
  # Every overlap flag agrees with the intervals in the two metrics.json files.
  for name, m in result["metrics"].items():
    a = good_results["threshold_val"]["metrics"][name]
    b = weak_results["threshold_val"]["metrics"][name]
    expected = a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]
    assert m["intervals_overlap"] == expected, name


def test_compare_identical_runs_overlap(runs, tmp_path):
  _, (good, _), _ = runs
  twin = tmp_path / "twin"
  shutil.copytree(good, twin)
  result = compare.compare_runs([good, twin], tmp_path / "o", names=["A", "B"], n_resamples=100)
  assert result["difference_bootstrap"]["paired"] is True  # The same patients: paired.
  for name, m in result["metrics"].items():
    assert m["intervals_overlap"] is True, name
    assert m["difference"] == 0.0
    assert m["difference_ci"] == [0.0, 0.0], name  # Both runs on every resample: no spread.
    assert m["better"] == "no clear difference", name
  assert "A vs B" in (tmp_path / "o" / "comparison.md").read_text()


def test_intervals_overlap():
  assert compare.intervals_overlap([0.1, 0.5], [0.5, 0.9]) is True  # Touching counts.
  assert compare.intervals_overlap([0.1, 0.4], [0.5, 0.9]) is False
  assert compare.intervals_overlap([0.6, 0.7], [0.5, 0.9]) is True
  assert compare.intervals_overlap([None, 0.7], [0.5, 0.9]) is None


def test_missing_eval_results_name_the_path(runs, tmp_path, capsys):
  _, (good, _), _ = runs
  empty = tmp_path / "empty_run"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=str(empty / "eval")):
    compare.compare_runs([good, empty], tmp_path / "o")
  assert compare.main([str(good), str(empty), f"--output={tmp_path / 'o'}"]) == 2
  assert str(empty / "eval") in capsys.readouterr().err
  (next((good / "eval").glob("test-300")) / "predictions.csv").unlink()
  with pytest.raises(FileNotFoundError, match="predictions.csv"):
    compare.load_run(good)


def test_main_cli(runs, tmp_path):
  _, (good, _), (weak, _) = runs
  assert compare.main([str(good), str(weak), "--n_resamples=50"]) == 0
  assert (good.parent / "comparison" / "comparison.md").is_file()
  assert (good.parent / "comparison" / "roc_comparison.png").is_file()


def _write_eval_dir(eval_dir, labels, probs, pids):
  eval_dir.mkdir(parents=True)
  results = metrics.evaluate_at_thresholds(labels, probs, pids, 0.5, n_resamples=100)
  results["split"] = "cv-latest"
  (eval_dir / "metrics.json").write_text(json.dumps(results))
  with open(eval_dir / "predictions.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["filename", "patient_id", "label", "probability"])
    writer.writerows([f"img{i}.png", p, int(y), repr(float(q))]
                     for i, (p, y, q) in enumerate(zip(pids, labels, probs, strict=True)))  # fmt: skip


def test_two_recipes_on_the_same_patients_are_compared_paired(tmp_path):
  """A small but consistent gain on every patient: a paired bootstrap finds it, resampling the two
  sets independently (the old way) buries it in the spread between patients."""
  rng = np.random.default_rng(0)
  labels = np.repeat(rng.integers(0, 2, 150), 2)
  pids = np.repeat([f"p{i}" for i in range(150)], 2)
  weak = np.clip(rng.normal(0.5 + 0.2 * (labels - 0.5), 0.2), 0, 1)
  strong = np.clip(weak + 0.02 * (2 * labels - 1), 0, 1)
  _write_eval_dir(tmp_path / "a" / "eval" / "cv-latest", labels, strong, pids)
  _write_eval_dir(tmp_path / "b" / "eval" / "cv-latest", labels, weak, pids)
  dirs = [tmp_path / "a" / "eval" / "cv-latest", tmp_path / "b" / "eval" / "cv-latest"]
  result = compare.compare_runs(dirs, tmp_path / "o", threshold_key="threshold_0.5")
  assert result["difference_bootstrap"]["paired"] is True
  assert [r["name"] for r in result["runs"]] == ["a/cv-latest", "b/cv-latest"]
  assert result["split"] == "cv-latest"
  auc = result["metrics"]["roc_auc"]
  assert auc["intervals_overlap"] is True  # Each run's own interval cannot tell them apart,
  assert auc["difference_ci"][0] > 0 and auc["better"] == "a/cv-latest"  # the paired one can.
  assert "(paired)" in (tmp_path / "o" / "comparison.md").read_text()
  kept = tmp_path / "kept_probe"  # An evaluation folder kept on its own: named once.
  (tmp_path / "a" / "eval" / "cv-latest").rename(kept)
  result = compare.compare_runs([kept, dirs[1]], tmp_path / "o2", threshold_key="threshold_0.5")
  assert [r["name"] for r in result["runs"]] == ["kept_probe", "b/cv-latest"]
  unpaired = [
    metrics.bootstrap_distribution(labels, p, pids, 0.5, 1000, seed)["roc_auc"]
    for seed, p in ((0, strong), (1, weak))
  ]
  assert metrics.percentile_interval(unpaired[0] - unpaired[1]).low < 0


def test_pooled_difference_of_several_seed_pairs(tmp_path, capsys):
  """Three seeds of two recipes on the same 120 patients: each pair's difference, their mean, and
  one bootstrap shared by every run (the interval of a small consistent gain excludes 0)."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 120)
  pids = np.array([f"p{i}" for i in range(120)])
  a_dirs, b_dirs, expected = [], [], []
  for seed in range(3):
    base = np.clip(rng.normal(0.5 + 0.15 * (labels - 0.5), 0.2), 0, 1)  # Each seed's own noise.
    better = np.clip(base + 0.03 * (2 * labels - 1), 0, 1)
    for dirs, probs, tag in ((a_dirs, better, "a"), (b_dirs, base, "b")):
      dirs.append(tmp_path / f"{tag}{seed}")
      _write_eval_dir(dirs[-1], labels, probs, pids)
    expected.append(roc_auc_score(labels, better) - roc_auc_score(labels, base))
  pairs = list(zip(a_dirs, b_dirs, strict=True))
  result = compare.pooled_difference(pairs, tmp_path / "o", threshold_key="threshold_0.5")
  auc = result["metrics"]["roc_auc"]
  np.testing.assert_allclose(auc["pair_differences"], expected, atol=1e-9)
  assert auc["mean_difference"] == pytest.approx(np.mean(expected))
  assert 0 < auc["mean_difference_ci"][0] < auc["mean_difference"] < auc["mean_difference_ci"][1]
  assert json.loads((tmp_path / "o" / "pooled.json").read_text()) == json.loads(json.dumps(result))
  table = (tmp_path / "o" / "pooled.md").read_text()
  assert "| ROC-AUC |" in table and "3 pairs" in table and f"`{a_dirs[2]}` - `{b_dirs[2]}`" in table

  # From the command line: two comma-separated lists, paired in order.
  argv = [",".join(map(str, a_dirs)), ",".join(map(str, b_dirs)), f"--output={tmp_path / 'cli'}",
          "--threshold=threshold_0.5"]  # fmt: skip
  assert compare.main(argv) == 0
  assert json.loads((tmp_path / "cli" / "pooled.json").read_text())["metrics"] == result["metrics"]
  assert compare.main([argv[0], ",".join(map(str, b_dirs[:2])), argv[2]]) == 2
  assert "pair the runs one to one: 3 vs 2 given" in capsys.readouterr().err

  other = tmp_path / "other"  # Other patients: no paired difference.
  _write_eval_dir(other, labels, labels * 0.5 + 0.25, np.array([f"q{i}" for i in range(120)]))
  with pytest.raises(ValueError, match=f"{other} scored other images"):
    compare.pooled_difference([*pairs[:2], (a_dirs[2], other)], tmp_path / "o3")


_KEPT = Path(__file__).resolve().parents[1] / "results" / "ct_cv3_w32"


@pytest.mark.parametrize(
  "run_dir", sorted(p for p in _KEPT.iterdir() if p.is_dir()), ids=lambda p: p.name
)
def test_kept_cv_results_match_their_predictions(run_dir):
  """Each kept run's metrics.json agrees with its predictions.csv, on the same patient-wise folds."""
  from sklearn.metrics import roc_auc_score

  run = compare.load_run(run_dir)
  record = run.results["threshold_0.5"]
  assert record["counts"] == {
    "n_images": 543,
    "n_patients": 289,
    "n_positive": 251,
    "n_negative": 292,
  }
  assert record["metrics"]["roc_auc"]["value"] == pytest.approx(
    roc_auc_score(run.labels, run.probs)
  )
  accuracy = np.mean((run.probs >= 0.5) == run.labels)
  assert record["metrics"]["accuracy"]["value"] == pytest.approx(accuracy)
  reference = compare.load_run(_KEPT / "recipe")
  assert compare.same_patients(run, reference), f"{run_dir} scored other images than the recipe"

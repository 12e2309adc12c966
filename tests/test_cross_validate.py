"""Patient-wise cross-validation: the folds, a fold run, and `covid_flax.cross_validate` end to end."""

import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO_ROOT, tiny_config
from PIL import Image
from sklearn import metrics as skm

from covid_flax import (
  checkpointing,
  config_lib,
  cross_validation,
  errors,
  inference,
  input_pipeline,
)
from covid_flax.datasets import common

pytestmark = pytest.mark.slow  # Trains or starts processes (README: the unit-only run skips it).


def _split_data(n_patients: int, seed: int = 0) -> input_pipeline.SplitData:
  """1-3 images per patient, one label per patient, about a third positive."""
  rng = np.random.default_rng(seed)
  per_patient = rng.integers(1, 4, n_patients)
  patient_labels = (rng.random(n_patients) < 0.35).astype(np.int32)
  patients = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
  labels = np.repeat(patient_labels, per_patient)
  filenames = np.array([f"img{i}.png" for i in range(len(labels))])
  images = np.zeros((len(labels), 4, 4, 1), np.uint8)
  return input_pipeline.SplitData(images, labels, patients, filenames)


def _external_folder(config, folder):
  """The synthetic test split's first 24 images as files, with probe.csv (relpath, label and a
  `finding` of each image: bright or dark by its mean)."""
  test = input_pipeline.load_split(config, "test")
  folder.mkdir()
  rows = [("relpath", "label", "finding")]
  for i in range(24):
    Image.fromarray(test.images[i, ..., 0]).save(folder / f"img{i:02d}.png")
    finding = "bright" if test.images[i].mean() > test.images[:24].mean() else "dark"
    rows.append((f"img{i:02d}.png", common.LABEL_NAMES[test.labels[i]], finding))
  with open(folder / "probe.csv", "w", newline="") as f:
    csv.writer(f).writerows(rows)
  return folder


def test_folds_are_patient_wise_stratified_disjoint_and_fixed():
  data = _split_data(90)
  held_out = []
  for fold in range(3):
    train_idx, eval_idx = input_pipeline.cv_fold_indices(data, 3, fold)
    assert not set(data.patient_ids[train_idx]) & set(data.patient_ids[eval_idx])
    assert sorted([*train_idx, *eval_idx]) == list(range(len(data)))
    assert abs(data.labels[eval_idx].mean() - data.labels.mean()) < 0.1  # Stratified.
    again = input_pipeline.cv_fold_indices(data, 3, fold)  # The same folds for every run.
    np.testing.assert_array_equal(again[1], eval_idx)
    held_out.extend(eval_idx.tolist())
  assert sorted(held_out) == list(range(len(data)))  # Every image held out exactly once.
  fold = data.subset(input_pipeline.cv_fold_indices(data, 3, 0)[1])
  assert len(fold) == len(fold.filenames) == len(fold.patient_ids) == len(fold.images)


@pytest.mark.filterwarnings("ignore:The least populated class")
def test_too_few_patients_for_the_folds_names_the_field():
  with pytest.raises(config_lib.ConfigError, match="config.cv_folds=5: 4 patients"):
    input_pipeline.cv_fold_indices(_split_data(4), 5, 0)
  labels = np.zeros(30, np.int32)
  labels[:2] = 1  # Two COVID patients cannot fill three folds.
  names = np.array([f"p{i}" for i in range(30)])
  rare = input_pipeline.SplitData(np.zeros((30, 4, 4, 1), np.uint8), labels, names, names)
  problems = []
  for fold in range(3):
    try:
      input_pipeline.cv_fold_indices(rare, 3, fold)
    except config_lib.ConfigError as e:
      problems.append(str(e))
  assert problems and all("one class only" in p for p in problems), problems


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(cv_folds=1), "config.cv_folds=1 is not allowed"),
    (dict(cv_folds=3, cv_fold=3), r"config.cv_fold=3 is not allowed .* must be 0..2"),
  ],
)
def test_bad_fold_fields_are_refused(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(tiny_config("", **overrides))


def _with_two_sources(load_split):
  """load_split, with the source of each image 'odd' or 'even' by its patient's number."""

  def load(config, split, **kwargs):
    data = load_split(config, split, **kwargs)
    numbers = np.array([int("".join(filter(str.isdigit, p)) or 0) for p in data.patient_ids])
    sources = np.where(numbers % 2, "odd", "even")
    return dataclasses.replace(data, attributes={**data.attributes, "source": sources})

  return load


def test_cross_validate_scores_every_image_once_with_the_model_that_held_it_out(
  synthetic_data_dir, tmp_path, monkeypatch
):
  monkeypatch.setattr(input_pipeline, "load_split", _with_two_sources(input_pipeline.load_split))
  workdir = str(tmp_path / "cv")
  config = tiny_config(synthetic_data_dir, cv_folds=2, num_epochs=1)
  pool = input_pipeline.load_split(config, "train")
  out = cross_validation.cross_validate(config, workdir, n_resamples=50)

  with open(f"{out}/predictions.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["filename"] for r in rows) == sorted(pool.filenames.tolist())
  source_of = dict(zip(pool.filenames, pool.attributes["source"], strict=True))
  assert all(r["source"] == source_of[r["filename"]] for r in rows)  # Pooled in fold order.
  results = json.load(open(f"{out}/metrics.json"))
  labels = np.array([int(r["label"]) for r in rows])
  probs = np.array([float(r["probability"]) for r in rows])
  auc = results["threshold_0.5"]["metrics"]["roc_auc"]["value"]
  assert auc == pytest.approx(skm.roc_auc_score(labels, probs))
  folds = results["cv"]["folds"]
  assert [f["fold"] for f in folds] == [0, 1]
  assert sum(f["n_images"] for f in folds) == len(pool)
  assert "2-fold cross-validation" in open(f"{out}/report.md").read()
  by_source = results["subgroups"]["source"]
  assert set(by_source) == {"even", "odd"} and results["subgroups"]["threshold"] == 0.5
  odd = np.array([r["source"] == "odd" for r in rows])
  assert by_source["odd"]["metrics"]["roc_auc"]["value"] == pytest.approx(
    skm.roc_auc_score(labels[odd], probs[odd])
  )
  assert "By source:" in open(f"{out}/report.md").read()

  # Each fold run trained on the rest of the pool and validated (and chose its threshold) on its fold.
  run = inference.load_run(f"{workdir}/fold_0", "latest")
  summary = json.load(open(f"{workdir}/fold_0/train_summary.json"))
  assert summary["num_train_examples"] == len(pool) - folds[0]["n_images"]
  assert inference.operating_point(run)["chosen_on"] == "covid_synthetic/cxr:train fold 0 of 2"
  assert input_pipeline.count_trained_on(run.config, "train") == summary["num_train_examples"]
  assert input_pipeline.count_trained_on(run.config, "test") == 0
  fold_0 = pool.subset(input_pipeline.cv_fold_indices(pool, 2, 0)[1])
  by_name = dict(zip((r["filename"] for r in rows), probs, strict=True))
  np.testing.assert_allclose(run.predict(fold_0), [by_name[f] for f in fold_0.filenames], 1e-5)

  # Fold models trained on each other's validation data: no ensemble, no resuming another fold.
  with pytest.raises(config_lib.ConfigError, match="config.cv_fold"):
    inference.Ensemble([run, inference.load_run(f"{workdir}/fold_1", "latest")])
  other_fold = tiny_config(synthetic_data_dir, cv_folds=2, cv_fold=1, num_epochs=1)
  with pytest.raises(config_lib.ConfigError, match="cv_fold"):
    checkpointing.check_workdir_compatible(f"{workdir}/fold_0", other_fold)

  # Running it again trains nothing and scores the same.
  steps = checkpointing.create_manager(f"{workdir}/fold_0", read_only=True).all_steps()
  cross_validation.cross_validate(config, workdir, n_resamples=50)
  assert checkpointing.create_manager(f"{workdir}/fold_0", read_only=True).all_steps() == steps
  assert json.load(open(f"{out}/metrics.json")) == results

  # An external folder: each fold's model scored on it (its threshold from its own held-out fold)
  # and the folds' mean probability, still training nothing.
  probe = _external_folder(config, tmp_path / "probe")
  cross_validation.cross_validate(config, workdir, n_resamples=50, images_dir=str(probe),
                                  labels_csv=str(probe / "probe.csv"))  # fmt: skip
  assert checkpointing.create_manager(f"{workdir}/fold_0", read_only=True).all_steps() == steps
  external = inference.load_images_dir(str(probe), config, str(probe / "probe.csv"))
  fold_probs = []
  for k in range(2):
    fold_run = inference.load_run(f"{workdir}/fold_{k}", "latest")
    scored = json.load(
      open(f"{workdir}/fold_{k}/eval/images-probe-probe-{fold_run.step}/metrics.json")
    )
    assert scored["threshold_chosen_on"] == f"covid_synthetic/cxr:train fold {k} of 2"
    fold_probs.append(fold_run.predict(external))
  ext_dir = f"{workdir}/eval/cv-images-probe-probe-latest"
  ext = json.load(open(f"{ext_dir}/metrics.json"))
  with open(f"{ext_dir}/predictions.csv") as f:
    ext_rows = {r["filename"]: float(r["probability"]) for r in csv.DictReader(f)}
  mean = np.mean(fold_probs, axis=0)
  np.testing.assert_allclose([ext_rows[n] for n in external.filenames], mean, atol=1e-6)
  assert ext["threshold_0.5"]["metrics"]["roc_auc"]["value"] == pytest.approx(
    skm.roc_auc_score(external.labels, mean)
  )
  for k, fold in enumerate(ext["cv_folds"]):
    assert fold["roc_auc"]["value"] == pytest.approx(
      skm.roc_auc_score(external.labels, fold_probs[k]), abs=1e-6
    )
  assert set(ext["subgroups"]["finding"]) == {"bright", "dark"}
  report_md = open(f"{ext_dir}/report.md").read()
  assert "mean probability of the 2 cross-validation folds' models" in report_md
  assert "By finding:" in report_md
  assert json.load(open(f"{out}/metrics.json")) == results  # The pooled CV folder is untouched.
  # A bad labels csv is refused before any fold trains.
  (probe / "bad.csv").write_text("relpath,label\nmissing.png,covid\n")
  with pytest.raises(errors.UserError, match="missing.png"):
    cross_validation.cross_validate(config, str(tmp_path / "cv2"), images_dir=str(probe),
                                    labels_csv=str(probe / "bad.csv"))  # fmt: skip
  assert not (tmp_path / "cv2").exists()

  # With test-time flips it still trains nothing and writes its own folder, from the flipped
  # predictions; the earlier folder stays as it was.
  flipped = tiny_config(synthetic_data_dir, cv_folds=2, num_epochs=1, tta_hflip=True)
  out_tta = cross_validation.cross_validate(flipped, workdir, n_resamples=50)
  assert out_tta == f"{workdir}/eval/cv-latest-tta"
  assert checkpointing.create_manager(f"{workdir}/fold_0", read_only=True).all_steps() == steps
  assert json.load(open(f"{out}/metrics.json")) == results
  with open(f"{out_tta}/predictions.csv") as f:
    by_name_tta = {r["filename"]: float(r["probability"]) for r in csv.DictReader(f)}
  tta_probs = [by_name_tta[f] for f in fold_0.filenames]
  run_tta = inference.load_run(f"{workdir}/fold_0", "latest", flipped, strict=False)
  np.testing.assert_allclose(run_tta.predict(fold_0), tta_probs, 1e-5)
  assert np.abs(np.subtract(tta_probs, [by_name[f] for f in fold_0.filenames])).max() > 1e-6
  assert json.load(open(f"{out_tta}/metrics.json"))["split"] == "cv-latest-tta"


@pytest.mark.parametrize(
  "args, message",
  [
    ([], "error: config.cv_folds=0: cross-validation needs 2 or more folds"),
    (["--config.cv_folds=2", "--labels=probe.csv"], "--labels=probe.csv needs --images_dir"),
  ],
)
def test_cross_validate_cli_refuses_bad_flags_before_training(tmp_path, args, message):
  result = subprocess.run(
    [sys.executable, "-m", "covid_flax.cross_validate", "--config=configs/synthetic.py",
     f"--workdir={tmp_path / 'cv'}", *args],
    cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 1
  assert message in result.stderr
  assert not (tmp_path / "cv").exists()

"""Evaluation end to end on a checkpoint trained on the synthetic dataset, `predict`, bad input."""

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import REPO_ROOT, tiny_config
from PIL import Image

from covid_flax import (
  checkpointing,
  config_lib,
  evaluation,
  image_prep,
  inference,
  input_pipeline,
  metrics,
  train,
)
from covid_flax.datasets import common

pytestmark = pytest.mark.slow  # Trains or starts processes (README: the unit-only run skips it).

PLOTS = ("roc.png", "pr.png", "confusion_matrix.png", "reliability.png", "training_curves.png",
         "gradcam.png")  # fmt: skip


@pytest.fixture(scope="module")
def trained_workdir(synthetic_data_dir, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(tiny_config(synthetic_data_dir), workdir)
  return workdir


@pytest.fixture(scope="module")
def run(trained_workdir) -> inference.Run:
  return inference.load_run(trained_workdir, "best")


@pytest.fixture
def images_dir(tmp_path, run) -> str:
  """A folder of external images (the synthetic test split saved as files) with labels.csv."""
  test = input_pipeline.load_split(run.config, "test")
  rows = []
  for i in range(0, 24):
    name = f"img{i:02d}.png"
    Image.fromarray(test.images[i, ..., 0]).save(tmp_path / name)
    rows.append((name, common.LABEL_NAMES[test.labels[i]]))
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([("relpath", "label"), *rows])
  return str(tmp_path)


def _eval_entries(workdir):
  return sorted(os.listdir(os.path.join(workdir, "eval")))


def test_evaluate_writes_every_file(run):
  test = input_pipeline.load_split(run.config, "test")
  out = evaluation.evaluate(run, test, "test", n_resamples=200)
  assert out.endswith(f"eval/test-{run.step}")
  for name in PLOTS:
    with Image.open(os.path.join(out, name)) as image:
      pixels = np.asarray(image.convert("L"))
    assert min(pixels.shape) > 200 and pixels.std() > 10, name  # decodes, not blank
  results = json.load(open(os.path.join(out, "metrics.json")))
  val_record = results["threshold_val"]
  assert val_record["counts"]["n_images"] == len(test)
  for name in metrics.METRICS:
    assert name in val_record["metrics"]
  assert results["threshold_0.5"]["threshold"] == 0.5
  with open(os.path.join(out, "predictions.csv")) as f:
    preds = list(csv.DictReader(f))
  assert len(preds) == len(test)
  assert list(preds[0]) == ["filename", "patient_id", "label", "probability", "source"]
  assert results["subgroups"] == {}  # One source ('synthetic'): nothing to compare.
  assert "Sensitivity" in open(os.path.join(out, "report.md")).read()
  assert not [e for e in _eval_entries(run.workdir) if e.endswith(".tmp")]


def test_threshold_is_chosen_on_val_not_test(run):
  point = inference.operating_point(run)
  assert point["chosen_on"].endswith(":val")
  val = input_pipeline.load_split(run.config, "val")
  expected = metrics.choose_threshold(val.labels, run.predict(val), run.config.target_sensitivity)
  assert point["threshold"] == pytest.approx(expected)
  test = input_pipeline.load_split(run.config, "test")
  out = evaluation.evaluate(run, test, "test", n_resamples=100)
  results = json.load(open(os.path.join(out, "metrics.json")))
  assert results["threshold_val"]["threshold"] == pytest.approx(expected)


def test_predict_agrees_with_evaluate(run, images_dir, tmp_path):
  data = inference.load_images_dir(images_dir, run.config)
  out = evaluation.evaluate(run, data, "images-ext", n_resamples=100)
  with open(os.path.join(out, "predictions.csv")) as f:
    expected = {r["filename"]: float(r["probability"]) for r in csv.DictReader(f)}
  paths = sorted(os.path.join(images_dir, n) for n in expected)
  output = tmp_path / "preds.csv"
  subprocess.run(
      [sys.executable, "-m", "covid_flax.predict", f"--workdir={run.workdir}",
       f"--output={output}", *paths],
      cwd=REPO_ROOT, check=True, capture_output=True,
  )  # fmt: skip
  with open(output) as f:
    got = {os.path.basename(r["filename"]): r for r in csv.DictReader(f)}
  threshold = inference.operating_point(run)["threshold"]
  for name, prob in expected.items():
    assert float(got[name]["probability"]) == pytest.approx(prob, abs=1e-6)
    assert got[name]["decision"] == ("covid" if prob >= threshold else "non_covid")


def test_predict_writes_what_it_can_and_names_every_failure(run, images_dir, tmp_path):
  good = sorted(os.path.join(images_dir, n) for n in os.listdir(images_dir) if n.endswith(".png"))
  (tmp_path / "broken.png").write_bytes(b"not an image")
  Image.new("L", (1, 1), 128).save(tmp_path / "dot.png")
  paths = [good[0], str(tmp_path / "missing.png"), good[1], str(tmp_path / "broken.png"),
           str(tmp_path / "dot.png")]  # fmt: skip
  output = tmp_path / "preds.csv"
  proc = subprocess.run(
    [sys.executable, "-m", "covid_flax.predict", f"--workdir={run.workdir}", f"--output={output}",
     *paths], cwd=REPO_ROOT, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 1
  assert "2 images cannot be used" in proc.stderr
  assert "missing.png: file not found" in proc.stderr and "broken.png" in proc.stderr
  assert "dot.png is only 1x1 pixels" in proc.stderr  # Scored, with a warning.
  with open(output) as f:
    assert [r["filename"] for r in csv.DictReader(f)] == [
      good[0],
      good[1],
      str(tmp_path / "dot.png"),
    ]


def test_every_bad_row_of_a_labels_csv_is_named_in_one_error(run, images_dir):
  with open(os.path.join(images_dir, "labels.csv"), "w") as f:
    f.write("relpath,label\nimg00.png,covid\nmissing.png,covid\nimg01.png,maybe\n")
  with pytest.raises(common.DatasetError, match="2 rows of .* cannot be used") as e:
    inference.load_images_dir(images_dir, run.config)
  assert "line 3: image 'missing.png' not found" in str(e.value)
  assert "line 4: unknown label 'maybe'" in str(e.value)


def test_missing_workdir_and_checkpoint(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
    inference.load_run(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in"):
    inference.load_run(str(tmp_path / "empty"))


def test_bad_checkpoint_choice(trained_workdir):
  with pytest.raises(
    checkpointing.CheckpointError, match="use 'best', 'latest' or one of the steps"
  ):
    inference.load_run(trained_workdir, "12345")


def test_conflicting_config_names_fields(trained_workdir):
  config = tiny_config("", model="seed_cnn")
  with pytest.raises(
    config_lib.ConfigError, match=r"model: checkpoint 'tiny_cnn' vs --config 'seed_cnn'"
  ):
    inference.load_run(trained_workdir, "latest", config)


def test_checkpoint_from_another_model(trained_workdir, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained_workdir, workdir)
  step = max(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  config_file = workdir / "checkpoints" / str(step) / "config" / "metadata"
  saved = json.loads(config_file.read_text())
  saved["model"] = "resnet18"
  config_file.write_text(json.dumps(saved))
  with pytest.raises(checkpointing.CheckpointError, match="does not restore as a 'resnet18' model"):
    inference.load_run(str(workdir), str(step))


@pytest.mark.parametrize(
  "labels_csv,extra_file,message",
  [
    ("relpath,label\nimg00.png,covid\nmissing.png,covid\n", None, "image 'missing.png' not found"),
    ("relpath,label\nimg00.png,maybe\n", None, "unknown label 'maybe'.*positive.*pneumonia"),
    ("relpath,label\n", None, "lists no images"),
    ("path,label\nimg00.png,covid\n", None, "needs the header 'relpath,label"),
    ("relpath,label\nimg00.png,covid\nbad.png,non_covid\n", b"not an image", "bad.png"),
  ],
)
def test_bad_images_dir(run, images_dir, labels_csv, extra_file, message):
  with open(os.path.join(images_dir, "labels.csv"), "w") as f:
    f.write(labels_csv)
  if extra_file:
    with open(os.path.join(images_dir, "bad.png"), "wb") as f:
      f.write(extra_file)
  with pytest.raises(common.DatasetError, match=message):
    inference.load_images_dir(images_dir, run.config)


@pytest.mark.parametrize(
  "args,message",
  [
    (["covid_flax.evaluate", "--workdir={nope}"], "does not exist"),
    (["covid_flax.predict", "--workdir={nope}", "x.png"], "does not exist"),
    (["covid_flax.evaluate", "--workdir={nope}", "--labels=x.csv"], "--labels=x.csv needs --images_dir"),
    (
      ["covid_flax.main", "--config=configs/synthetic.py", "--workdir={nope}",
       "--config.center_crop=0.1"],
      "config.center_crop=0.1 is not allowed",
    ),
  ],
)  # fmt: skip
def test_cli_reports_user_errors_in_one_line(tmp_path, args, message):
  args = [a.format(nope=tmp_path / "nope") for a in args]
  proc = subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert "error: " in proc.stderr and message in proc.stderr
  assert not (tmp_path / "nope").exists()


def test_external_set_with_one_class(run, images_dir):
  """External negatives only (e.g. adult normals for a CXR model): no ROC curve, still a report."""
  with open(os.path.join(images_dir, "labels.csv"), "w") as f:
    f.write("relpath,label\n" + "".join(f"img{i:02d}.png,non_covid\n" for i in range(6)))
  data = inference.load_images_dir(images_dir, run.config)
  out = evaluation.evaluate(run, data, "images-negatives", n_resamples=100)
  assert not os.path.exists(os.path.join(out, "roc.png"))
  assert "Only one class is present" in open(os.path.join(out, "report.md")).read()
  results = json.load(open(os.path.join(out, "metrics.json")))
  assert results["threshold_val"]["metrics"]["roc_auc"]["value"] is None


def test_external_patient_ids_keep_a_patients_images_together(run, images_dir):
  rows = "".join(f"img{i:02d}.png,non_covid,{'p1' if i < 3 else ''}\n" for i in range(6))
  with open(os.path.join(images_dir, "labels.csv"), "w") as f:
    f.write("relpath,label,patient_id\n" + rows)
  data = inference.load_images_dir(images_dir, run.config)
  assert list(data.patient_ids) == ["p1", "p1", "p1", "img03.png", "img04.png", "img05.png"]
  out = evaluation.evaluate(run, data, "images-grouped", n_resamples=100)
  assert "6 images (0 COVID, 6 non-COVID) from 4 patients" in open(f"{out}/report.md").read()


@pytest.fixture(scope="module")
def second_run(synthetic_data_dir, tmp_path_factory) -> inference.Run:
  workdir = str(tmp_path_factory.mktemp("run_seed1"))
  train.train_and_evaluate(tiny_config(synthetic_data_dir, seed=1), workdir)
  return inference.load_run(workdir, "best")


def test_ensemble_averages_its_members(run, second_run):
  ensemble = inference.Ensemble([run, second_run])
  val = input_pipeline.load_split(run.config, "val")
  single, other = run.predict(val), second_run.predict(val)
  assert np.abs(single - other).max() > 1e-3  # Two different models.
  np.testing.assert_allclose(ensemble.predict(val), (single + other) / 2, rtol=1e-6)
  point = inference.operating_point(ensemble)
  expected = metrics.choose_threshold(val.labels, (single + other) / 2, 0.95)
  assert point["threshold"] == pytest.approx(expected)
  assert [m["workdir"] for m in point["ensemble"]] == [run.workdir, second_run.workdir]


def test_ensemble_from_the_command_line(run, second_run):
  result = subprocess.run(
      [sys.executable, "-m", "covid_flax.evaluate", f"--workdir={run.workdir}",
       f"--ensemble={second_run.workdir}", "--n_resamples=50", "--gradcam_per_group=1"],
      cwd=REPO_ROOT, capture_output=True, text=True,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  out = [e for e in _eval_entries(run.workdir) if e.startswith("test-ensemble2-")]
  assert len(out) == 1
  results = json.load(open(os.path.join(run.workdir, "eval", out[0], "metrics.json")))
  assert [m["step"] for m in results["ensemble"]] == [run.step, second_run.step]
  assert "Ensemble: the mean probability of" in result.stdout


def test_test_time_flips_from_the_command_line(run):
  """`--tta_hflip` needs no --config (the run's saved one is used)."""
  result = subprocess.run(
      [sys.executable, "-m", "covid_flax.evaluate", f"--workdir={run.workdir}", "--split=val",
       "--tta_hflip", "--n_resamples=50", "--gradcam_per_group=1"],
      cwd=REPO_ROOT, capture_output=True, text=True,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.load(
    open(os.path.join(run.workdir, "eval", f"val-{run.step}-tta", "metrics.json"))
  )
  assert results["tta_hflip"] is True


@pytest.mark.parametrize(
  "field,value", [("image_size", 32), ("center_crop", 0.7), ("equalize", True)]
)
def test_ensemble_members_must_share_the_data(run, field, value):
  config = run.config.copy_and_resolve_references()
  config[field] = value
  with pytest.raises(config_lib.ConfigError, match=f"ensemble members differ in config.{field}"):
    inference.Ensemble([run, dataclasses.replace(run, config=config)])


def test_test_time_flips_are_an_evaluation_option(run, trained_workdir, synthetic_data_dir):
  config = tiny_config(synthetic_data_dir, tta_hflip=True)
  config.data_dir = ""  # An empty path in --config keeps the run's own data location.
  flipped = inference.load_run(trained_workdir, "best", config)
  assert flipped.config.data_dir == synthetic_data_dir
  assert flipped.tag == f"{run.step}-tta" and run.tag == str(run.step)
  val = input_pipeline.load_split(run.config, "val")
  mirrored = dataclasses.replace(val, images=val.images[:, :, ::-1].copy())
  np.testing.assert_allclose(
    flipped.predict(val), (run.predict(val) + run.predict(mirrored)) / 2, rtol=1e-5, atol=1e-6
  )


def _framed_image(height: int = 80, width: int = 100) -> np.ndarray:
  """Black centre, white frame a quarter of each side wide (a border or marker a crop removes)."""
  image = np.full((height, width), 255, np.uint8)
  image[height // 4 : height - height // 4, width // 4 : width - width // 4] = 0
  return image


def test_center_crop_removes_the_border():
  image = _framed_image()
  assert image_prep.resize(image, 32).max() == 255
  cropped = image_prep.resize(image, 32, center_crop=0.5)
  assert cropped.shape == (32, 32, 1) and cropped.max() == 0


def test_equalize_stretches_a_low_contrast_image():
  ramp = np.repeat(np.arange(100, 116, dtype=np.uint8), 4)[None].repeat(64, 0)  # 16 grey levels.
  plain, equalized = image_prep.resize(ramp, 16), image_prep.resize(ramp, 16, equalize=True)
  assert (plain.min(), plain.max()) == (100, 115)
  assert equalized.min() < 20 and equalized.max() > 230
  assert np.all(np.diff(equalized[0, :, 0].astype(int)) > 0)  # The order of grey levels is kept.


def test_external_images_are_cropped_and_equalized_like_the_training_data(run, tmp_path):
  Image.fromarray(_framed_image()).save(tmp_path / "framed.png")
  (tmp_path / "labels.csv").write_text("relpath,label\nframed.png,covid\n")
  whole = inference.load_images_dir(str(tmp_path), run.config)
  config = run.config.copy_and_resolve_references()
  config.center_crop = 0.5
  cropped = inference.load_images_dir(str(tmp_path), config)
  assert whole.images.max() == 255 and cropped.images.max() == 0
  config.center_crop, config.equalize = 0.7, True
  image = np.asarray(Image.open(tmp_path / "framed.png"))
  np.testing.assert_array_equal(
    inference.load_images_dir(str(tmp_path), config).images[0],
    image_prep.resize(image, config.image_size, 0.7, equalize=True),
  )


def test_training_data_is_cropped_and_equalized_by_the_config(run):
  config = run.config.copy_and_resolve_references()
  config.center_crop, config.equalize = 0.5, True
  prepared = input_pipeline.load_split(config, "val")
  source = tfds.data_source(config.dataset, split="val", data_dir=config.data_dir, download=False)
  image = source[3]["image"]
  expected = image_prep.resize(image, config.image_size, 0.5, equalize=True)
  np.testing.assert_array_equal(prepared.images[3], expected)
  for other in (image_prep.resize(image, config.image_size, 0.5),
                image_prep.resize(image, config.image_size, equalize=True)):  # fmt: skip
    assert not np.array_equal(expected, other)


def test_external_sources_from_another_labels_file_give_results_by_source(
  run, images_dir, tmp_path
):
  """A labels csv outside the images folder (--labels), with a source column: the share of each
  source's images called COVID at the val threshold is in metrics.json and report.md."""
  labels_csv = tmp_path / "elsewhere" / "probe.csv"
  labels_csv.parent.mkdir()
  rows = [f"img{i:02d}.png,NON_COVID,,{'nih_pneumonia' if i % 2 else 'nih_no_finding'},PA"
          for i in range(10)]  # fmt: skip
  labels_csv.write_text("relpath,label,patient_id,source,view\n" + "\n".join(rows) + "\n")
  data = inference.load_images_dir(images_dir, run.config, str(labels_csv))
  assert list(data.attributes) == ["source", "view"] and data.attributes["source"][1] == (
    "nih_pneumonia"
  )
  out = evaluation.evaluate(run, data, "images-probe", n_resamples=100)
  results = json.load(open(os.path.join(out, "metrics.json")))
  threshold = results["threshold_val"]["threshold"]
  probs = run.predict(data)
  by_source = results["subgroups"]["source"]
  assert results["subgroups"]["threshold"] == threshold
  for name, mask in (
    ("nih_no_finding", np.arange(10) % 2 == 0),
    ("nih_pneumonia", np.arange(10) % 2 == 1),
  ):
    assert by_source[name]["called_covid"]["value"] == pytest.approx(
      np.mean(probs[mask] >= threshold)
    )
  assert "source_matched" not in results["subgroups"]  # Negatives only.
  assert "| nih_pneumonia | 0 / 5 |" in open(os.path.join(out, "report.md")).read()
  with open(os.path.join(out, "predictions.csv")) as f:
    assert [r["source"] for r in csv.DictReader(f)][:2] == ["nih_no_finding", "nih_pneumonia"]


def test_lung_mask_keeps_the_lung_fields_and_blacks_out_the_rest():
  mask = image_prep.lung_field_mask(64)
  assert mask.shape == (64, 64) and 0.25 < mask.mean() < 0.5
  for y, x in ((30, 19), (30, 45)):  # The centres of both lungs (0.47 of the height; 0.3, 0.7).
    assert mask[y, x]
  for y, x in ((0, 0), (0, 63), (63, 0), (63, 63), (30, 32), (2, 32)):  # Corners, mediastinum.
    assert not mask[y, x]
  framed = _framed_image()
  framed[:] = 200
  out = image_prep.resize(framed, 64, lung_mask=True)[..., 0]
  np.testing.assert_array_equal(out, np.where(mask, 200, 0))


def test_training_and_external_images_are_masked_by_the_config(run, tmp_path):
  config = run.config.copy_and_resolve_references()
  config.lung_mask = True
  prepared = input_pipeline.load_split(config, "val")
  assert not prepared.images[:, ~image_prep.lung_field_mask(config.image_size)].any()
  Image.fromarray(np.full((50, 60), 255, np.uint8)).save(tmp_path / "white.png")
  (tmp_path / "labels.csv").write_text("relpath,label\nwhite.png,covid\n")
  image = inference.load_images_dir(str(tmp_path), config).images[0, ..., 0]
  np.testing.assert_array_equal(image > 0, image_prep.lung_field_mask(config.image_size))


def test_labels_and_matched_sources_from_the_command_line(trained_workdir, images_dir, tmp_path):
  labels_csv = tmp_path / "probe.csv"
  rows = "".join(f"img{i:02d}.png,non_covid,,{'ab'[i % 2]}\n" for i in range(6))
  labels_csv.write_text("relpath,label,patient_id,source\n" + rows)
  base = [sys.executable, "-m", "covid_flax.evaluate", f"--workdir={trained_workdir}",
          f"--images_dir={images_dir}", f"--labels={labels_csv}", "--n_resamples=50",
          "--gradcam_per_group=1"]  # fmt: skip
  bad = subprocess.run([*base, "--matched_sources=a,nope"], cwd=REPO_ROOT, capture_output=True,
                       text=True)  # fmt: skip
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "error: --matched_sources: ['nope'] not among the sources ['a', 'b']" in bad.stderr
  good = subprocess.run(base, cwd=REPO_ROOT, capture_output=True, text=True)
  assert good.returncode == 0, good.stderr[-2000:]
  name = os.path.basename(images_dir)
  (out,) = [e for e in _eval_entries(trained_workdir) if e.startswith(f"images-{name}-probe-")]
  by_source = json.load(open(os.path.join(trained_workdir, "eval", out, "metrics.json")))
  assert set(by_source["subgroups"]["source"]) == {"a", "b"}


def test_labels_are_read_as_people_write_them():
  from covid_flax.inference import _parse_label

  for value in ("covid", "COVID-19", " Positive", "1", "covid19"):
    assert _parse_label(value, "x") == 1
  for value in ("non_covid", "Normal", "NEGATIVE", "pneumonia", "0", "non-covid"):
    assert _parse_label(value, "x") == 0

"""covid_flax/by_source.py on a fake evaluation where one negative source is a shortcut."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_flax import by_source, metrics, report


@pytest.fixture
def eval_dir(tmp_path) -> Path:
  """COVID from 'Patient N'; non-COVID 'medpix_patient_N' far from COVID (a shortcut) and
  'crawled_patient_N' mixed with it (chance)."""
  rng = np.random.default_rng(0)
  pids = ([f"Patient {i}" for i in range(40)] + [f"medpix_patient_{i}" for i in range(30)]
          + [f"crawled_patient_{i}" for i in range(30)])  # fmt: skip
  labels = np.r_[np.ones(40, int), np.zeros(60, int)]
  probs = np.r_[rng.uniform(0.4, 1.0, 40), rng.uniform(0.0, 0.2, 30), rng.uniform(0.4, 1.0, 30)]
  report.write_predictions(
    tmp_path / "predictions.csv", [f"{i}.png" for i in range(100)], pids, labels, probs
  )
  results = metrics.evaluate_at_thresholds(labels, probs, pids, 0.5, 0.95, n_resamples=20)
  (tmp_path / "metrics.json").write_text(json.dumps(results))
  return tmp_path


@pytest.mark.parametrize(
  "patient_id,source",
  [("medpix_patient_2", "medpix_patient"), ("Patient 167", "Patient"), ("person12", "person"),
   ("38", "?")],
)  # fmt: skip
def test_source_of_a_patient_id(patient_id, source):
  assert by_source.source_of(patient_id) == source


def test_a_shortcut_source_stands_out(eval_dir):
  rows = {(r["class"], r["source"]): r for r in by_source.by_source(eval_dir, n_resamples=100)}
  assert set(rows) == {("covid", "Patient"), ("non_covid", "medpix_patient"),
                       ("non_covid", "crawled_patient")}  # fmt: skip
  medpix, crawled = rows["non_covid", "medpix_patient"], rows["non_covid", "crawled_patient"]
  assert medpix["roc_auc_vs_other_class"] == 1.0 and medpix["called_covid"] == 0.0
  auc, (low, high) = crawled["roc_auc_vs_other_class"], crawled["roc_auc_ci"]
  assert 0.2 < auc < 0.7 and low < auc < high and crawled["n_images"] == 30
  assert rows["covid", "Patient"]["n_images"] == 40


def test_cli_prints_a_table_and_names_a_missing_file(eval_dir, tmp_path, capsys):
  assert by_source.main([str(eval_dir), "--source_regex=^([a-z]+)_", "--n_resamples=50"]) == 0
  out = capsys.readouterr().out
  assert "| non_covid | medpix | 30 | 0.000 | 1.000" in out
  assert "| covid | ? | 40 |" in out
  assert by_source.main([str(tmp_path / "nowhere")]) == 1
  assert "nowhere/predictions.csv is missing" in capsys.readouterr().err


@pytest.mark.parametrize(
  "regex,message",
  [("(", "is not a regular expression"), ("^[a-z]+", "needs a group")],
)
def test_bad_source_regex_is_named(eval_dir, regex, message, capsys):
  assert by_source.main([str(eval_dir), f"--source_regex={regex}"]) == 1
  err = capsys.readouterr().err
  assert f"--source_regex={regex!r}" in err and message in err


def test_metrics_without_a_val_threshold_is_named(eval_dir, capsys):
  (eval_dir / "metrics.json").write_text("{}")
  assert by_source.main([str(eval_dir)]) == 1
  assert "metrics.json has no 'threshold_val' or 'threshold_0.5' record" in capsys.readouterr().err


def test_cross_validation_predictions_use_threshold_half(eval_dir):
  """Pooled CV predictions have no val threshold: the shares called COVID are at 0.5."""
  results = json.loads((eval_dir / "metrics.json").read_text())
  results["threshold_val"]["threshold"] = 0.9  # Calls few COVID.
  (eval_dir / "metrics.json").write_text(json.dumps(results))
  rows = by_source.by_source(eval_dir, n_resamples=20)
  assert rows[0]["threshold"] == 0.9 and rows[0]["called_covid"] < 0.25
  del results["threshold_val"]
  (eval_dir / "metrics.json").write_text(json.dumps(results))
  rows = {(r["class"], r["source"]): r for r in by_source.by_source(eval_dir, n_resamples=20)}
  covid = rows["covid", "Patient"]
  assert covid["threshold"] == 0.5 and covid["called_covid"] > 0.75


def _write_image(path: Path, fmt: str) -> None:
  pixels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)


def test_groups_by_file_format_read_from_content(eval_dir, tmp_path, capsys):
  """Images 0-39 COVID, 40-69 the shortcut non-COVID group, 70-99 mixed with COVID. Formats:
  COVID PNG except 0-4, which hold JPEG data under a .png name; non-COVID 40-69 JPEG, 70-99 PNG."""
  images = tmp_path / "images"
  images.mkdir()
  for i in range(100):
    _write_image(images / f"{i}.png", "JPEG" if i < 5 or 40 <= i < 70 else "PNG")
  rows = by_source.by_source(eval_dir, n_resamples=20, images_root=images)
  rows = {(r["class"], r["source"]): r for r in rows}
  assert {key: r["n_images"] for key, r in rows.items()} == {
    ("covid", "jpeg"): 5, ("covid", "png"): 35, ("non_covid", "jpeg"): 30, ("non_covid", "png"): 30
  }  # fmt: skip
  assert rows["non_covid", "jpeg"]["roc_auc_vs_other_class"] == 1.0
  assert rows["non_covid", "png"]["roc_auc_vs_other_class"] < 0.7
  assert by_source.main([str(eval_dir), f"--images_root={images}", "--n_resamples=20"]) == 0
  assert "| class | format | images |" in capsys.readouterr().out
  (images / "7.png").unlink()
  assert by_source.main([str(eval_dir), f"--images_root={images}"]) == 1
  err = capsys.readouterr().err
  assert f"{images / '7.png'}: cannot read the image's format" in err and "--images_root" in err

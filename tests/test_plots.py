"""covid_flax.plots: every figure is written as a PNG that decodes and has real content."""

import json

import matplotlib.axes
import numpy as np
import pytest
from PIL import Image

from covid_flax import metrics, plots


def _check_png(path, min_size=(300, 250)):
  assert path.is_file(), path
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
    pixels = np.asarray(image.convert("RGB")).astype(int)
  colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
  assert len(colours) > 20, f"{path.name}: only {len(colours)} colours"
  assert (pixels.sum(-1) < 600).mean() > 0.005, f"{path.name}: almost blank"
  return pixels


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
  return labels, probs


def test_roc_and_pr_curves(tmp_path, data):
  labels, probs = data
  results = metrics.evaluate_at_thresholds(labels, probs, np.arange(200), 0.4, n_resamples=50)
  curve = plots.curve_from_results(labels, probs, results)
  assert curve.operating_points == {"val threshold": 0.4, "0.5": 0.5}
  assert curve.roc_auc_ci[0] < curve.roc_auc_ci[1]
  _check_png(plots.plot_roc({"CXR": curve}, tmp_path / "roc.png"))
  other = plots.Curve(labels, np.clip(probs + 0.1, 0, 1), {"val threshold": 0.5})
  _check_png(plots.plot_roc({"CXR": curve, "CT": other}, tmp_path / "sub" / "both.png"))
  _check_png(plots.plot_precision_recall({"CXR": curve}, tmp_path / "pr.png"))
  with pytest.raises(ValueError, match="both classes"):
    plots.plot_roc({"bad": plots.Curve([1, 1], [0.2, 0.3])}, tmp_path / "bad.png")


def test_confusion_matrix(tmp_path):
  _check_png(
    plots.plot_confusion_matrix({"tn": 50, "fp": 7, "fn": 3, "tp": 40}, tmp_path / "a.png")
  )
  _check_png(plots.plot_confusion_matrix([[0, 0], [2, 5]], tmp_path / "b.png"))  # Empty row.


def test_reliability(tmp_path, data):
  _check_png(plots.plot_reliability(*data, tmp_path / "rel.png", n_bins=10))


def test_training_curves(tmp_path):
  lines = []
  for step in range(10, 210, 10):
    lines.append({"step": step, "epoch": (step - 1) // 50 + 1, "split": "train", "loss": 1 / step})
    if step % 50 == 0:
      lines.append(
        {"step": step, "epoch": step // 50, "split": "val", "loss": 2 / step, "auc": 0.9}
      )
  lines.append({"step": 210, "split": "val", "accuracy": None, "loss": float("nan")})  # Tolerated.
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{truncated\n\n")
  records = plots.load_jsonl(path)
  assert len(records) == len(lines)
  _check_png(plots.plot_training_curves(records, tmp_path / "curves.png"))
  _check_png(plots.plot_training_curves([], tmp_path / "empty.png"), min_size=(200, 200))
  no_step = [{"epoch": e, "split": "val", "accuracy": 0.5 + e / 20} for e in range(1, 6)]
  _check_png(plots.plot_training_curves(no_step, tmp_path / "epochs.png"))


def test_gradcam_grid(tmp_path):
  rng = np.random.default_rng(1)
  yy, xx = np.mgrid[:64, :64]
  images = (rng.random((5, 64, 64)) * 80 + 100 * (((yy - 32) ** 2 + (xx - 20) ** 2) < 200)).astype(
    np.uint8
  )
  heat = np.exp(-(((yy - 32) ** 2 + (xx - 40) ** 2) / 150.0))[None].repeat(5, 0)
  groups = {
    "true positives": (images[:3], heat[:3], ["p=0.97", "p=0.91", "p=0.88"]),
    "false positives": (images[:0], heat[:0], []),
    "false negatives": (images[3:].astype(np.float32) / 255 * 4 - 2, heat[3:, ::8, ::8], None),
  }
  pixels = _check_png(plots.gradcam_grid(groups, tmp_path / "gradcam.png", ncols=2))
  assert pixels.shape[0] > pixels.shape[1]  # Four rows (2 + 1 empty + 1) of two columns.
  red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
  assert red.mean() > 0.002  # The overlay's hot spots are drawn.
  _check_png(plots.gradcam_grid({}, tmp_path / "none.png"), min_size=(200, 150))
  with pytest.raises(ValueError, match="false negatives: 2 images, 1 heatmaps"):
    plots.gradcam_grid({"false negatives": (images[:2], heat[:1], None)}, tmp_path / "x.png")


def test_gradcam_rows_count_every_image_of_their_category_not_only_those_shown(
  tmp_path, monkeypatch
):
  labels = []
  original = matplotlib.axes.Axes.set_ylabel
  monkeypatch.setattr(
    matplotlib.axes.Axes,
    "set_ylabel",
    lambda ax, text, **kw: labels.append(text) or original(ax, text, **kw),
  )
  images, heat = np.zeros((4, 16, 16), np.uint8), np.zeros((4, 16, 16))
  groups = {"false positives": (images, heat, None), "true positives": (images[:2], heat[:2], None)}
  plots.gradcam_grid(groups, tmp_path / "g.png", totals={"false positives": 13})
  assert labels[:2] == ["false positives\n(4 of 13)", "true positives\n(2)"]

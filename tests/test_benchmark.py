"""The benchmark runs and prints its fields (speed is never asserted in tests)."""

import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO_ROOT

from covid_flax import cpu_conv

pytestmark = pytest.mark.slow  # Trains or starts processes (README: the unit-only run skips it).


def _benchmark(data_dir: str, *extra: str) -> list[dict]:
  """The JSON records of scripts/benchmark.py on the synthetic set with a tiny model."""
  proc = subprocess.run(
    [sys.executable, "scripts/benchmark.py", "--config=configs/synthetic.py",
     f"--config.data_dir={data_dir}", "--model=tiny_cnn", "--image_size=32", "--batch_size=16",
     *extra],
    cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300,
  )  # fmt: skip
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_benchmark_prints_every_measure(synthetic_data_dir):
  records = _benchmark(
    synthetic_data_dir, "--steps=1", "--windows=2", "--input_split=val", "--reference=xla"
  )
  measures = {r["measure"] for r in records}
  assert {"environment", "compile", "train", "eval", "input", "memory"} <= measures
  reference = next(r for r in records if r["measure"] == "train_reference")
  assert reference["reference"] == "xla" and len(reference["windows"]) == 2
  assert reference["ratio"] > 0  # Ours (config.cpu_conv) over ours on XLA's convolutions.
  assert {r["cpu_conv"] for r in records if r["measure"] == "compile"} == {"onednn", "xla"}
  for r in records:
    assert {"model", "image_size", "batch_size", "devices"} <= set(r)
  train = next(r for r in records if r["measure"] == "train")
  assert train["img_per_s"] > 0 and train["model"] == "tiny_cnn" and train["devices"] == 8
  # oneDNN time of our windows only (the XLA reference's windows between them have none).
  assert (train["conv_ms"] > 0) == (train["cpu_conv"] == "onednn")
  assert {r["stage"] for r in records if r["measure"] == "input"} == {
    "decode_resize",
    "batches_from_cache",
  }


def test_input_benchmark_in_stream_mode_times_streamed_batches(synthetic_data_dir):
  records = _benchmark(synthetic_data_dir, "--steps=1", "--windows=1", "--input_split=val",
                       "--input_mode=stream")  # fmt: skip
  (record,) = [r for r in records if r["measure"] == "input"]
  assert record["stage"] == "stream_batches" and record["img_per_s"] > 0


@pytest.mark.parametrize("mode", ["cache", "stream"])
def test_scaling_benchmark_prints_its_fields(synthetic_data_dir, mode):
  records = _benchmark(
    synthetic_data_dir, "--steps=2", "--windows=2", "--scaling", f"--input_mode={mode}"
  )
  (scaling,) = [r for r in records if r["measure"] == "scaling"]
  assert scaling["input_mode"] == mode and scaling["train_examples"] == 618
  for field in ("time_to_first_step_s", "train_img_per_s", "input_img_per_s", "peak_rss_mib"):
    assert scaling[field] > 0
  assert len(scaling["train_windows"]) == 2 and "device_bytes_in_use" in scaling


def test_modes_ab_benchmark_prints_both_rates(synthetic_data_dir):
  records = _benchmark(synthetic_data_dir, "--steps=2", "--windows=2", "--modes_ab")
  (ab,) = [r for r in records if r["measure"] == "modes_ab"]
  assert ab["cache_img_per_s"] > 0 and ab["stream_img_per_s"] > 0
  assert len(ab["cache_windows"]) == len(ab["stream_windows"]) == 2 and ab["stream_over_cache"] > 0


def test_roofline_prints_matmul_peaks_and_every_convolution():
  paths = ["xla"] + (["onednn"] if cpu_conv.unavailable_reason() is None else [])
  proc = subprocess.run(
    [sys.executable, "scripts/roofline.py", "--image_size=20", "--batch_size=2", "--repeats=1",
     f"--cpu_conv={','.join(paths)}"],
    cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300,
  )  # fmt: skip
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert {r["dtype"] for r in records if r["measure"] == "matmul"} == {"float32", "bfloat16"}
  convs = [r for r in records if r["measure"] == "conv"]
  layers = ["1->32@20", "32->64@18", "64->64@8", "64->128@3"]
  assert [(r["layer"], r["cpu_conv"]) for r in convs] == [(a, p) for a in layers for p in paths]
  for r in convs:
    assert all(r[f"{p}_gflop_s"] > 0 for p in ("forward", "input_grad", "weight_grad"))


def test_roofline_tf_path_times_tensorflows_ops_or_names_the_extra():
  proc = subprocess.run(
    [sys.executable, "scripts/roofline.py", "--image_size=20", "--batch_size=2", "--repeats=1",
     "--cpu_conv=tf"],
    cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  if importlib.util.find_spec("tensorflow") is None:
    assert proc.returncode != 0
    assert "--cpu_conv=tf needs TensorFlow" in proc.stderr and "[bench]" in proc.stderr
    return
  assert proc.returncode == 0, proc.stderr[-2000:]
  convs = [json.loads(line) for line in proc.stdout.splitlines() if '"conv"' in line]
  assert [r["cpu_conv"] for r in convs] == ["tf"] * 4 and all(r["forward_ms"] > 0 for r in convs)


def test_roofline_tf_passes_equal_lax_gradients():
  pytest.importorskip("tensorflow", reason="the bench extra (tensorflow-cpu) is not installed")
  sys.path.insert(0, str(REPO_ROOT / "scripts"))
  import roofline

  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  conv = roofline._conv_on("xla")
  y, vjp = jax.vjp(conv, x, w)
  g = jax.random.normal(jax.random.key(2), y.shape)
  dx, dw = vjp(g)
  passes = roofline._tf_passes(x, w, g)
  for name, expected in (("forward", y), ("input_grad", dx), ("weight_grad", dw)):
    fn, args = passes[name]
    np.testing.assert_allclose(np.asarray(fn(*args)), expected, rtol=1e-4, atol=1e-4)

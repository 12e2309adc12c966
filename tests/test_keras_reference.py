"""The Keras twins that `scripts/benchmark.py --reference=keras` times against ours."""

import os
import sys

import jax
import pytest
from flax import nnx

from configs import cxr
from covid_flax import models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import keras_reference  # noqa: E402


def test_a_model_without_a_keras_twin_is_named():
  config = cxr.get_config()
  config.model = "densenet121"
  with pytest.raises(ValueError, match="no Keras twin of model 'densenet121'.*resnet18"):
    keras_reference.keras_model(config)
  with pytest.raises(ValueError, match="no Keras twin of model 'densenet121'"):
    keras_reference.Worker(config)


@pytest.mark.parametrize("model", ["seed_cnn", "resnet18"])
def test_the_keras_twin_has_our_parameters(model):
  pytest.importorskip("tensorflow", reason="the bench extra (tensorflow-cpu) is not installed")
  config = cxr.get_config()
  config.model, config.image_size = model, 128
  keras = keras_reference.keras_model(config)
  ours = models.from_config(config)
  trainable = sum(int(w.shape.num_elements()) for w in keras.trainable_weights)
  assert trainable == sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  assert keras.output_shape == (None, 2)


def test_without_tensorflow_the_reference_says_what_to_install(monkeypatch):
  monkeypatch.setattr(keras_reference.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(RuntimeError, match=r"needs TensorFlow in .*pip install -e '.\[bench\]'"):
    keras_reference.Worker(cxr.get_config())


def test_the_keras_worker_times_windows_in_its_own_process():
  pytest.importorskip("tensorflow", reason="the bench extra (tensorflow-cpu) is not installed")
  config = cxr.get_config()
  config.model, config.image_size, config.batch_size = "seed_cnn", 32, 4
  worker = keras_reference.Worker(config)
  try:
    rates = [worker.window(2) for _ in range(2)]
  finally:
    worker.close()
  assert all(rate > 0 for rate in rates)
  assert worker._proc.returncode == 0  # Closing stdin ended the worker's loop cleanly.


def test_a_dead_worker_is_reported_with_its_log(monkeypatch, tmp_path):
  script = tmp_path / "dies.py"
  script.write_text("import sys\nsys.stdin.readline()\nsys.exit('the twin could not be built')\n")
  monkeypatch.setattr(keras_reference, "__file__", str(script))
  monkeypatch.setattr(keras_reference.importlib.util, "find_spec", lambda name: object())
  with pytest.raises(RuntimeError, match="(?s)reference process .* died.*could not be built"):
    keras_reference.Worker(cxr.get_config())

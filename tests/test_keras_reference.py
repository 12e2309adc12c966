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

"""Model registry and layers: shapes of every model, and pooling equal to `nnx.max_pool`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covid_flax import models
from covid_flax.models.dropout import Dropout
from covid_flax.models.pooling import max_pool


@pytest.mark.parametrize("window,stride,shape", [(2, 2, (2, 13, 12, 3)), (3, 2, (2, 9, 10, 4))])
def test_max_pool_matches_nnx_values_and_gradients(window, stride, shape):
  x = jax.random.normal(jax.random.key(0), shape)  # Continuous values: no ties.
  reference = lambda x: nnx.max_pool(x, (window, window), strides=(stride, stride))  # noqa: E731
  ours = lambda x: max_pool(x, window, stride)  # noqa: E731
  np.testing.assert_array_equal(ours(x), reference(x))
  loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(x)))  # noqa: E731
  np.testing.assert_allclose(jax.grad(loss(ours))(x), jax.grad(loss(reference))(x), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tiling_max_pool_gives_tied_gradients_to_the_first_maximum_as_nnx_does(dtype):
  """Flat regions (black borders, saturated tissue) tie within a window: select-and-scatter gives
  the gradient to the first maximum (row-major), and so does ours, under jit too."""
  x = jnp.round(jax.random.normal(jax.random.key(0), (2, 9, 8, 3))).astype(dtype)  # Many ties.
  g = jax.random.normal(jax.random.key(1), (2, 4, 4, 3)).astype(dtype)
  grads = [
    jax.jit(jax.vjp(pool, x)[1])(g)[0]
    for pool in (lambda x: max_pool(x, 2, 2), lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2)))
  ]
  assert grads[0].dtype == dtype
  np.testing.assert_array_equal(grads[0], grads[1])
  assert (grads[0][:, 8] == 0).all()  # The odd row no window covers.
  windows = (grads[0][:, :8] != 0).reshape(2, 4, 2, 4, 2, 3).sum(axis=(2, 4))
  assert windows.max() == 1  # Never shared, nor copied, among ties.


_LARGE = (
  "resnet18",
  "resnet18_w16",
  "resnet18_w32",
  "resnet50",
  "densenet121",
  "densenet169",
)  # Seconds to compile each: slow.


@pytest.mark.parametrize(
  "name",
  [pytest.param(n, marks=pytest.mark.slow) if n in _LARGE else n for n in sorted(models.MODELS)],
)
def test_every_model_maps_images_to_logits_and_features_to_head(name):
  model = models.create_model(name, image_size=64, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 1))  # Zeros would map to zero logits.
  # One compiled program: run eagerly, op by op, a DenseNet takes 3x longer (CI time).
  logits, from_features = nnx.jit(lambda m, x: (m(x), m.head(m.features(x))))(model, x)
  assert logits.shape == (2, 2) and logits.dtype == jnp.float32
  np.testing.assert_allclose(from_features, logits, rtol=1e-6)
  for attribute in model.HEAD_MODULES:
    assert hasattr(model, attribute), f"{name}.HEAD_MODULES names a missing {attribute!r}"


@pytest.mark.parametrize(
  "name,torchvision_count",  # sum(p.numel() for p in torchvision.models.<name>().parameters())
  [("resnet18", 11_689_512), ("resnet50", 25_557_032), ("densenet121", 7_978_856),
   ("densenet169", 14_149_480)],
)  # fmt: skip
def test_imagenet_shaped_models_have_torchvisions_parameter_count(name, torchvision_count):
  model = nnx.eval_shape(
    lambda: models.create_model(
      name, image_size=224, num_classes=1000, input_norm="imagenet", rngs=nnx.Rngs(0)
    )
  )
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == torchvision_count


@pytest.mark.slow
def test_each_halving_of_the_resnet18_width_quarters_the_weights():
  def count(name):
    model = models.create_model(name, image_size=64, rngs=nnx.Rngs(0))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

  assert 0.24 < count("resnet18_w32") / count("resnet18") < 0.26
  assert 0.24 < count("resnet18_w16") / count("resnet18_w32") < 0.26


def test_unknown_model_names_the_choices():
  with pytest.raises(ValueError, match="config.model='vgg'.*resnet18"):
    models.create_model("vgg", image_size=64, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("rate, keep", [(0.25, 0.75), (0.5, 0.5), (0.2, 204 / 256)])
def test_dropout_keeps_its_quantised_share_and_the_expectation(rate, keep):
  x = jnp.ones((64, 33, 17, 8), jnp.bfloat16)  # A size that is no multiple of 4.
  out = Dropout(rate)(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert out.dtype == x.dtype and out.shape == x.shape
  kept = np.asarray(out, np.float32) > 0
  assert abs(kept.mean() - keep) < 0.005  # 287k draws: the standard error is ~0.001.
  np.testing.assert_allclose(np.asarray(out, np.float32)[kept], 1 / keep, rtol=1e-2)
  again = Dropout(rate)(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  assert (kept != (np.asarray(again, np.float32) > 0)).mean() > 0.2  # Another key, another mask.
  assert Dropout(rate)(x, deterministic=True) is x

"""MixStyle: mixed instance statistics, the same on any mesh, identity outside training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import data_mesh, tiny_config
from jax.sharding import PartitionSpec as P

from covid_flax import config_lib, models, parallel
from covid_flax.models import mixstyle


def _mixed_on(n_devices: int, x: np.ndarray, key: jax.Array, prob: float = 1.0) -> np.ndarray:
  fn = jax.shard_map(functools.partial(mixstyle.mix_styles, key=key, prob=prob),
                     mesh=data_mesh(n_devices), in_specs=P(parallel.DATA_AXIS),
                     out_specs=P(parallel.DATA_AXIS))  # fmt: skip
  return np.asarray(jax.jit(fn)(jnp.asarray(x)))


def _features(seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)  # Each example and channel with its own mean and scale.
  scale = rng.uniform(0.5, 3.0, (16, 1, 1, 3))
  return (rng.normal(size=(16, 6, 5, 3)) * scale + rng.normal(size=(16, 1, 1, 3)) * 4).astype(
    np.float32
  )


def _standardised(a: np.ndarray) -> np.ndarray:
  return (a - a.mean(axis=(1, 2), keepdims=True)) / a.std(axis=(1, 2), keepdims=True)


def test_each_example_takes_a_mix_of_its_own_and_a_partners_statistics():
  x, key = _features(), jax.random.key(3)
  out = _mixed_on(1, x, key)
  mu, sigma = x.mean(axis=(1, 2)), np.sqrt(x.var(axis=(1, 2)) + mixstyle.EPS)
  _, k_perm, k_lam = jax.random.split(key, 3)
  partner = np.asarray(jax.random.permutation(k_perm, 16))
  lam = np.asarray(jax.random.beta(k_lam, mixstyle.ALPHA, mixstyle.ALPHA, (16,)))[:, None]
  np.testing.assert_allclose(out.mean(axis=(1, 2)), lam * mu + (1 - lam) * mu[partner], atol=1e-4)
  expected_sigma = lam * sigma + (1 - lam) * sigma[partner]
  np.testing.assert_allclose(np.sqrt(out.var(axis=(1, 2))), expected_sigma, rtol=1e-4, atol=1e-4)
  moved = np.abs(out - x).max(axis=(1, 2, 3))
  assert (moved > 0.1).sum() >= 8  # Most examples changed style (a few drew themselves or lam ~ 1).
  # The layout within each map is kept: the same standardised values.
  np.testing.assert_allclose(_standardised(out), _standardised(x), atol=1e-3)


def test_eight_devices_mix_as_one_does():
  """Partners come from the whole global batch, by global position."""
  x, key = _features(1), jax.random.key(7)
  np.testing.assert_allclose(_mixed_on(8, x, key), _mixed_on(1, x, key), rtol=1e-5, atol=1e-5)


def test_probability_zero_and_a_skipped_step_keep_the_input():
  x = _features(2)
  np.testing.assert_array_equal(_mixed_on(1, x, jax.random.key(0), prob=0.0), x)
  skipped = [
    k for k in range(40) if not jax.random.bernoulli(jax.random.split(jax.random.key(k), 3)[0], 0.5)
  ]
  np.testing.assert_array_equal(_mixed_on(1, x, jax.random.key(skipped[0]), prob=0.5), x)


def test_the_statistics_are_constant_in_the_gradient():
  x, key = _features(3), jax.random.key(5)
  weights = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)

  def objective(a):
    return (mixstyle.mix_styles(a, key, 1.0) * weights).sum()

  fn = jax.shard_map(jax.grad(objective), mesh=data_mesh(1), in_specs=P(parallel.DATA_AXIS),
                     out_specs=P(parallel.DATA_AXIS))  # fmt: skip
  grad = np.asarray(fn(jnp.asarray(x)))
  out = _mixed_on(1, x, key)
  sigma = np.sqrt(x.var(axis=(1, 2), keepdims=True) + mixstyle.EPS)
  mixed_sigma = out.std(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(grad, weights * mixed_sigma / sigma, rtol=1e-3, atol=1e-4)


def _shard_forward(model, x, train, **keys):
  """The model's logits on a 1-device mesh, as the train step calls it (BatchNorm's update inside)."""
  graphdef, state = nnx.split(model)

  def forward(a, state):
    return nnx.merge(graphdef, state)(a, train=train, rngs=nnx.Rngs(dropout=0, **keys))

  return jax.shard_map(forward, mesh=data_mesh(1), in_specs=(P(parallel.DATA_AXIS), P()),
                       out_specs=P(parallel.DATA_AXIS))(x, state)  # fmt: skip


def test_tiny_model_mixes_in_training_only_and_needs_the_shared_key():
  model = models.create_model("tiny_cnn", image_size=32, mixstyle_prob=1.0, rngs=nnx.Rngs(0))
  plain = models.create_model("tiny_cnn", image_size=32, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 1)), jnp.float32)
  np.testing.assert_allclose(
    _shard_forward(model, x, False), _shard_forward(plain, x, False), rtol=1e-6
  )
  trained = np.asarray(_shard_forward(model, x, True, style=1))
  assert np.abs(trained - np.asarray(_shard_forward(plain, x, True))).max() > 1e-3
  with pytest.raises(
    ValueError, match="config.mixstyle_prob=1.0 needs the train step's 'style' key"
  ):
    _shard_forward(model, x, True)


def test_resnet_mixes_after_its_first_two_stages(monkeypatch):
  calls = []

  def record(x, key, prob, axis_name="data"):
    calls.append((x.shape, prob))
    return x

  monkeypatch.setattr(mixstyle, "mix_styles", record)
  model = models.create_model("resnet18_w16", image_size=32, mixstyle_prob=0.3, rngs=nnx.Rngs(0))
  x = jax.ShapeDtypeStruct((8, 32, 32, 1), jnp.float32)
  jax.eval_shape(lambda a: _shard_forward(model, a, True, style=1), x)  # Traced, not compiled.
  # 32 px: stem and max pool to 8x8 (layer1, 16 channels), layer2 halves it (32 channels).
  assert calls == [((8, 8, 8, 16), 0.3), ((8, 4, 4, 32), 0.3)]
  calls.clear()
  jax.eval_shape(lambda a: _shard_forward(model, a, False), x)
  assert calls == []


def test_models_without_mixstyle_refuse_the_field():
  config = tiny_config("", model="seed_cnn", mixstyle_prob=0.5)
  with pytest.raises(config_lib.ConfigError, match=r"config.mixstyle_prob=0.5 is for \["):
    config_lib.validate(config)
  assert {"resnet18", "resnet18_w32", "resnet50", "tiny_cnn"} <= set(models.STYLE_MODELS)

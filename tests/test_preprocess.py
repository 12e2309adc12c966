"""On-device augmentation: identity at zero strength, per-key determinism, the flip is a flip."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import synthetic
from covid_flax.preprocess import augment, normalize


def _images(n=4, size=32):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.random((n, size, size, 1), dtype=np.float32))


def _keys(n=4, seed=0):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def _config(**kw):
  config = synthetic.get_config()
  for k in ("aug_rotate", "aug_zoom", "aug_translate", "aug_brightness", "aug_contrast"):
    config[k] = 0.0
  config.aug_hflip = False
  for k, v in kw.items():
    config[k] = v
  return config


def test_zero_strength_is_identity():
  images = _images()
  np.testing.assert_allclose(augment(images, _keys(), _config()), images, atol=1e-6)


def test_same_key_same_result_and_keys_differ():
  images = _images()
  config = _config(aug_rotate=10.0, aug_zoom=0.1, aug_translate=0.1, aug_contrast=0.2)
  a, b = augment(images, _keys(), config), augment(images, _keys(), config)
  np.testing.assert_array_equal(a, b)
  c = augment(images, _keys(seed=1), config)
  assert float(jnp.abs(a - c).max()) > 1e-3
  assert a.shape == images.shape


def test_flip_is_a_mirror_image():
  images = _images(n=16)
  out = augment(images, _keys(16), _config(aug_hflip=True))
  flipped = [bool(jnp.allclose(o, i[:, ::-1], atol=1e-5)) for o, i in zip(out, images)]
  kept = [bool(jnp.allclose(o, i, atol=1e-5)) for o, i in zip(out, images)]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_normalize_uint8_and_float_agree():
  x = jnp.asarray([[0, 128, 255]], jnp.uint8)
  np.testing.assert_allclose(normalize(x), normalize(x.astype(jnp.float32) / 255.0))

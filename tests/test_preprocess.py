"""On-device augmentation: identity at zero strength, per-key determinism, the flip is a flip;
mixup and CutMix."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from configs import synthetic
from covid_flax import parallel
from covid_flax.preprocess import augment, mix, mixed_batch, normalize


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


def test_mixup_is_a_weighted_average():
  images, partners = _images(8), _images(8)[::-1]
  mixed, lam = mix(images, partners, _keys(8), mixup_alpha=0.4, cutmix_alpha=0.0)
  lam = np.asarray(lam)
  assert ((lam > 0) & (lam < 1)).all() and len(np.unique(lam)) == 8
  expected = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * partners
  np.testing.assert_allclose(np.asarray(mixed), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_cutmix_pastes_a_box_and_lam_is_the_visible_share():
  images = jnp.zeros((16, 32, 32, 1))
  partners = jnp.ones((16, 32, 32, 1))
  mixed, lam = mix(images, partners, _keys(16), mixup_alpha=0.0, cutmix_alpha=1.0)
  mixed = np.asarray(mixed)
  assert set(np.unique(mixed)) <= {0.0, 1.0}  # Every pixel is from one of the two images.
  np.testing.assert_allclose(np.asarray(lam), 1.0 - mixed.mean(axis=(1, 2, 3)), atol=1e-6)
  pasted = mixed[np.asarray(lam) < 1][..., 0]
  rows, cols = pasted.any(axis=2), pasted.any(axis=1)
  # A rectangle: its pixel count is the product of its row and column extents.
  np.testing.assert_array_equal(pasted.sum(axis=(1, 2)), rows.sum(axis=1) * cols.sum(axis=1))


def test_both_on_uses_both():
  images = jnp.zeros((64, 16, 16, 1))
  partners = jnp.ones((64, 16, 16, 1))
  mixed, _ = mix(images, partners, _keys(64), mixup_alpha=0.4, cutmix_alpha=1.0)
  fractional = (np.asarray(mixed) % 1 != 0).any(axis=(1, 2, 3))
  assert 10 < fractional.sum() < 54  # About half mixup (fractional pixels), half CutMix.


def test_mixed_batch_pairs_each_example_with_the_next_of_the_global_batch():
  """On 8 devices, with the partner of the last example on another device than its own."""
  mesh = parallel.create_mesh()
  cache = jnp.asarray(np.random.default_rng(1).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8))
  index = jnp.arange(16) * 2 + 3
  labels = jnp.arange(16) % 2
  config = _config(augment=False, mixup_alpha=0.4)

  def per_device(cache, index, label):
    local = index.shape[0]
    ids = jax.lax.axis_index(parallel.DATA_AXIS) * local + jnp.arange(local)
    batch = {"index": index, "label": label}
    return mixed_batch(cache, batch, ids, jax.random.key(0), jax.random.key(1), config)

  run = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                      out_specs=P("data"))  # fmt: skip
  images, lam, partner_labels = jax.jit(run)(cache, index, labels)
  partners = np.roll(np.asarray(index), -1)
  own, other = np.asarray(cache)[np.asarray(index)] / 255.0, np.asarray(cache)[partners] / 255.0
  lam4 = np.asarray(lam)[:, None, None, None]
  np.testing.assert_allclose(images, lam4 * own + (1 - lam4) * other, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(partner_labels, np.roll(np.asarray(labels), -1))


def test_fill_beyond_the_border_is_edge_or_black():
  # A white image shifted and zoomed out: with edge fill it stays white, with black fill the
  # uncovered part is black, and what the image still covers stays white.
  images = jnp.ones((8, 32, 32, 1))
  edge = augment(images, _keys(8), _config(aug_zoom=0.5, aug_translate=0.3))
  np.testing.assert_allclose(edge, images, atol=1e-6)
  black = np.asarray(augment(images, _keys(8), _config(aug_zoom=0.5, aug_translate=0.3,
                                                       aug_fill="black")))  # fmt: skip
  black_share = (black == 0).mean(axis=(1, 2, 3))
  assert (black_share > 0).sum() >= 6 and (black_share < 1).all()
  assert (black[black > 0.5] == 1).mean() > 0.9  # Only border pixels are a blend.

"""On-device preprocessing: normalisation, and the train-time augmentation of uint8 images."""

import jax
import jax.numpy as jnp
import ml_collections

_MEAN, _STD = 0.5, 0.25  # Normalisation of [0, 1] grayscale pixels.


def normalize(images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] float images -> zero-centred float32."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  return (images - _MEAN) / _STD


def augment(images: jax.Array, keys: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Per-example random affine transform (rotation, zoom, translation; bilinear, edge pixels
  repeated), horizontal flip and brightness/contrast jitter of [0, 1] images (N, H, W, 1)."""
  size = images.shape[1]
  center = (size - 1) / 2.0
  grid_y, grid_x = jnp.mgrid[0:size, 0:size].astype(jnp.float32) - center

  def uniform(key, bound):
    return jax.random.uniform(key, (), minval=-bound, maxval=bound)

  def one(image, key):
    k_rot, k_zoom, k_y, k_x, k_flip, k_bright, k_contrast = jax.random.split(key, 7)
    angle = jnp.deg2rad(uniform(k_rot, config.aug_rotate))
    zoom = jnp.exp(uniform(k_zoom, jnp.log1p(config.aug_zoom)))
    shift_y = uniform(k_y, config.aug_translate * size)
    shift_x = uniform(k_x, config.aug_translate * size)
    y, x = grid_y - shift_y, grid_x - shift_x  # Output pixel -> source pixel (inverse map).
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_y = (cos * y - sin * x) / zoom + center
    src_x = (sin * y + cos * x) / zoom + center
    if config.aug_hflip:
      src_x = jnp.where(jax.random.bernoulli(k_flip), 2 * center - src_x, src_x)
    image = jax.scipy.ndimage.map_coordinates(
      image[..., 0], [src_y, src_x], order=1, mode="nearest"
    )
    image = image + uniform(k_bright, config.aug_brightness)
    mean = image.mean()
    image = (image - mean) * (1.0 + uniform(k_contrast, config.aug_contrast)) + mean
    return image[..., None]

  return jax.vmap(one)(images, keys)

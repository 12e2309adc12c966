"""On-device preprocessing: normalisation, and the train-time augmentation of uint8 images."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from covid_flax.parallel import DATA_AXIS

PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # Normalisation of [0, 1] grayscale pixels.
JPEG_MAX_QUALITY = 95.0  # config.aug_jpeg draws the quality from U(aug_jpeg, this).


def normalize(images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] float images -> zero-centred float32."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  return (images - PIXEL_MEAN) / PIXEL_STD


_BINOMIAL_3X3 = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0  # numpy: no backend at import.
# JPEG's luminance quantisation table (ITU T.81 Annex K, libjpeg's base table) and the 8x8 DCT-II.
_JPEG_LUMA = np.array([
  [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
  [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
  [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
  [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=np.float32)  # fmt: skip
_DCT8 = np.sqrt(np.where(np.arange(8)[:, None] == 0, 1 / 8, 2 / 8)) * np.cos(
  np.pi * (2 * np.arange(8)[None] + 1) * np.arange(8)[:, None] / 16
)


def _downscale(image: jax.Array, factor: jax.Array, max_factor: float) -> jax.Array:
  """(H, W) image resampled to 1/factor of its resolution (area-weighted) and back (bilinear)."""
  height, width = image.shape
  pad = int(np.ceil(max_factor)) + 1  # Edge pixels beyond the end, so no black seeps in there.
  padded = jnp.pad(image, ((0, pad), (0, pad)), mode="edge")
  resample = functools.partial(
    jax.image.scale_and_translate, shape=padded.shape, spatial_dims=(0, 1),
    translation=jnp.zeros(2), method="linear",
  )  # fmt: skip
  low = resample(padded, scale=jnp.full(2, 1.0 / factor), antialias=True)
  return resample(low, scale=jnp.full(2, factor), antialias=False)[:height, :width]


def jpeg(image: jax.Array, quality: jax.Array) -> jax.Array:
  """(H, W) image in [0, 1] through a baseline grayscale JPEG encode and decode at `quality`
  (1-100, libjpeg's scaling of the table): 8x8 block DCT, quantised, rounded, inverted; the
  blocking and ringing of a figure saved as JPEG (tests compare it with Pillow's encoder)."""
  height, width = image.shape
  padded = jnp.pad(image, ((0, -height % 8), (0, -width % 8)), mode="edge")
  pixels = jnp.round(jnp.clip(padded, 0.0, 1.0) * 255.0) - 128.0
  blocks = pixels.reshape(padded.shape[0] // 8, 8, padded.shape[1] // 8, 8)
  scale = jnp.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality)
  table = jnp.clip(jnp.floor((_JPEG_LUMA * scale + 50.0) / 100.0), 1.0, 255.0)
  coeffs = jnp.einsum("uy,iyjx,vx->iujv", _DCT8, blocks, _DCT8)
  coeffs = jnp.round(coeffs / table[:, None]) * table[:, None]
  decoded = jnp.einsum("uy,iujv,vx->iyjx", _DCT8, coeffs, _DCT8).reshape(padded.shape)
  return (jnp.clip(jnp.round(decoded + 128.0), 0.0, 255.0) / 255.0)[:height, :width]


def randomize_appearance(
  image: jax.Array, key: jax.Array, config: ml_collections.ConfigDict
) -> jax.Array:
  """One (H, W) image with a random resolution drop, display window, gamma, blur or sharpening,
  noise and JPEG re-compression (config.aug_downscale, aug_window, aug_gamma, aug_sharpness,
  aug_noise, aug_jpeg): how a scanner, a window, a print and a re-encoding change an image's look,
  which a model should not learn as the class."""
  k_gamma, k_sharp, k_sigma, k_noise = jax.random.split(key, 4)
  bound = lambda k, b: jax.random.uniform(k, (), minval=-b, maxval=b)  # noqa: E731
  if config.aug_downscale > 1:  # Keys folded in: runs without these fields keep their draws.
    factor = jax.random.uniform(jax.random.fold_in(key, 11), (), minval=1.0,
                                maxval=config.aug_downscale)  # fmt: skip
    image = _downscale(image, factor, config.aug_downscale)
  if config.aug_window:  # Grey levels [lo, 1 - cut] to [0, 1], clipped below: a print's window.
    lo, cut = jax.random.uniform(jax.random.fold_in(key, 12), (2,), maxval=config.aug_window)
    image = (image - lo) / (1.0 - cut - lo)
  image = jnp.clip(image, 0.0, 1.0) ** jnp.exp(bound(k_gamma, config.aug_gamma))
  padded = jnp.pad(image, 1, mode="edge")
  blurred = jax.scipy.signal.convolve2d(padded, _BINOMIAL_3X3, mode="valid")
  image = image + bound(k_sharp, config.aug_sharpness) * (image - blurred)
  sigma = jax.random.uniform(k_sigma, (), maxval=config.aug_noise)
  image = image + sigma * jax.random.normal(k_noise, image.shape)
  if config.aug_jpeg:  # Saved last, as a figure taken from a paper or the web was.
    quality = jax.random.uniform(jax.random.fold_in(key, 13), (), minval=config.aug_jpeg,
                                 maxval=JPEG_MAX_QUALITY)  # fmt: skip
    image = jpeg(image, quality)
  return image


def augment(images: jax.Array, keys: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Per-example random affine transform (rotation, zoom, translation; bilinear; beyond the border
  edge pixels repeated or black, `aug_fill`), horizontal flip, brightness/contrast jitter and
  `randomize_appearance` (where its fields are on) of [0, 1] images (N, H, W, 1)."""
  size = images.shape[1]
  fill = "constant" if config.aug_fill == "black" else "nearest"  # constant: 0, black.
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
    image = jax.scipy.ndimage.map_coordinates(image[..., 0], [src_y, src_x], order=1, mode=fill)
    image = image + uniform(k_bright, config.aug_brightness)
    mean = image.mean()
    image = (image - mean) * (1.0 + uniform(k_contrast, config.aug_contrast)) + mean
    fields = (config.aug_gamma, config.aug_sharpness, config.aug_noise, config.aug_window,
              config.aug_jpeg)  # fmt: skip
    if any(fields) or config.aug_downscale > 1:
      # A key of its own: the draws above stay those of runs made before these fields existed.
      image = randomize_appearance(image, jax.random.fold_in(key, 7), config)
    return image[..., None]

  return jax.vmap(one)(images, keys)


def mix(
  images: jax.Array,
  partners: jax.Array,
  keys: jax.Array,
  mixup_alpha: float,
  cutmix_alpha: float,
) -> tuple[jax.Array, jax.Array]:
  """Mixup (a weighted average) or CutMix (a pasted box) of each image with its partner; with both
  alphas > 0 each example picks one at random. Returns the mixed images and, per example, the
  weight `lam` of the image's own label (for CutMix: the share of its pixels left visible)."""
  size = images.shape[1]
  yy, xx = jnp.mgrid[0:size, 0:size].astype(jnp.float32)

  def one(image, partner, key):
    k_choice, k_lam, k_y, k_x = jax.random.split(key, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
      use_cutmix = jax.random.bernoulli(k_choice)
    else:
      use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(k_lam, alpha, alpha)
    half = jnp.sqrt(1.0 - lam) * size / 2.0
    cy = jax.random.uniform(k_y, (), maxval=size)
    cx = jax.random.uniform(k_x, (), maxval=size)
    box = (jnp.abs(yy + 0.5 - cy) < half) & (jnp.abs(xx + 0.5 - cx) < half)
    cut = jnp.where(box[..., None], partner, image)
    blend = lam * image + (1.0 - lam) * partner
    mixed = jnp.where(use_cutmix, cut, blend)
    return mixed, jnp.where(use_cutmix, 1.0 - box.mean(), lam)

  return jax.vmap(one)(images, partners, keys)


def augmented_batch(
  cache: jax.Array,
  index: jax.Array,
  example_ids: jax.Array,
  aug_key: jax.Array,
  config: ml_collections.ConfigDict,
) -> jax.Array:
  """[0, 1] float images cache[index], augmented with a key per global example id."""
  images = jnp.take(cache, index, axis=0).astype(jnp.float32) / 255.0
  if not config.augment:
    return images
  keys = jax.vmap(functools.partial(jax.random.fold_in, aug_key))(example_ids)
  return augment(images, keys, config)


def mixed_batch(
  cache: jax.Array,
  batch: dict[str, jax.Array],
  example_ids: jax.Array,
  aug_key: jax.Array,
  mix_key: jax.Array,
  config: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixup/CutMix: each example is mixed with the next one of the *global* batch (all-gathered
  indices; its image is taken from the replicated cache and augmented with its own key), so the
  result does not depend on the number of devices. Returns the images, the weight of each one's own
  label and the partners' labels."""
  global_index = jax.lax.all_gather(batch["index"], DATA_AXIS, tiled=True)
  global_label = jax.lax.all_gather(batch["label"], DATA_AXIS, tiled=True)
  partner_ids = (example_ids + 1) % global_index.shape[0]
  images = augmented_batch(cache, batch["index"], example_ids, aug_key, config)
  partners = augmented_batch(cache, global_index[partner_ids], partner_ids, aug_key, config)
  mix_keys = jax.vmap(functools.partial(jax.random.fold_in, mix_key))(example_ids)
  images, lam = mix(images, partners, mix_keys, config.mixup_alpha, config.cutmix_alpha)
  return images, lam, global_label[partner_ids]

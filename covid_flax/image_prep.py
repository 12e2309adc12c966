"""How a stored image becomes a model input on the host: crop, equalise, mask and resize to uint8
(`prepare_image`), at once for a whole split (cache mode) or when indexed (`LazyImages`, stream
mode). Augmentation and normalisation happen later, on the device (`covid_flax.preprocess`)."""

import functools
import threading
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, ImageOps

from covid_flax import ct_crop as ct_crop_lib

# The lung-field prior of `lung_field_mask`, as fractions of the image's width and height: centre
# (x, y) and semi-axes (a, b) of each lung's ellipse on a frontal film (patient's right on the left).
LUNG_FIELDS = ((0.30, 0.47, 0.19, 0.33), (0.70, 0.47, 0.19, 0.33))


@functools.lru_cache(maxsize=8)
def lung_field_mask(size: int) -> np.ndarray:
  """(size, size) bool: True inside the two ellipses of LUNG_FIELDS. A fixed anatomical prior for
  frontal chest X-rays that fill the image (no segmentation, no weights): it keeps the lungs of a
  typical film and removes the corners and borders, where burned-in text, arrows, markers and
  figure labels sit."""
  y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
  inside = [((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1 for cx, cy, a, b in LUNG_FIELDS]
  return np.logical_or(*inside)


def resize(
  image: np.ndarray,
  size: int,
  center_crop: float = 1.0,
  equalize: bool = False,
  lung_mask: bool = False,
  ct_crop: bool = False,
  clahe: float = 0.0,
  equalize_over: str = "body",
) -> np.ndarray:
  """(H, W[, 1]) uint8 -> (size, size, 1) uint8, antialiased: the central `center_crop` of each
  side, stretched to a square (no padding, which would add borders that differ by source), its
  grey-level histogram equalised first if `equalize`, black outside `lung_field_mask` if
  `lung_mask`. With `ct_crop` the crop is `ct_crop.crop_to_lungs` instead (the equalisation, if
  any, by the ranks of the body's pixels or, `equalize_over="lungs"`, of the lung fields'; with
  `lung_mask` black outside the lungs it finds, equalised over them).
  `clahe` > 0: contrast-limited adaptive equalisation after those, before resizing
  (`ct_crop.adaptive_equalize`; with `ct_crop` over the pixels it keeps)."""
  image = np.asarray(image).reshape(image.shape[0], image.shape[1])
  if ct_crop:
    image = ct_crop_lib.crop_to_lungs(image, equalize, lung_mask, clahe, equalize_over)
    equalize = lung_mask = False
    clahe = 0.0
  pil = Image.fromarray(image, mode="L")
  if center_crop < 1.0:
    w, h = pil.size
    dw, dh = round(w * (1 - center_crop) / 2), round(h * (1 - center_crop) / 2)
    pil = pil.crop((dw, dh, w - dw, h - dh))
  if equalize:
    pil = ImageOps.equalize(pil)
  if clahe > 0:
    pil = Image.fromarray(ct_crop_lib.adaptive_equalize(np.asarray(pil), clahe), mode="L")
  if pil.size != (size, size):
    pil = pil.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
  out = np.asarray(pil, dtype=np.uint8)
  if lung_mask:
    out = np.where(lung_field_mask(size), out, 0).astype(np.uint8)
  return out[..., None]


def prepare_image(image: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """One decoded image as the run's model sees it before augmentation (`resize` with its config)."""
  return resize(
    image,
    config.image_size,
    config.center_crop,
    config.equalize,
    config.lung_mask,
    config.ct_crop,
    config.clahe,
    config.equalize_over,
  )


_decodes = 0
_decodes_lock = threading.Lock()


def decode(image: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """`prepare_image`, counted (`decode_count`)."""
  global _decodes
  with _decodes_lock:
    _decodes += 1
  return prepare_image(image, config)


def decode_count() -> int:
  """Images this process has prepared for a split so far (both modes): for tests and benchmarks."""
  return _decodes


class LazyImages:
  """The images of a split, decoded and resized when indexed (stream mode): `images[idx]` is a
  uint8 array (len(idx), S, S, 1) for an int array or slice `idx`, (S, S, 1) for an int; extra
  indices apply after decoding (`images[idx, ..., 0]`). Holds no pixels."""

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, source: Any, indices: np.ndarray, config: ml_collections.ConfigDict):
    self._source, self._indices, self._config = source, np.asarray(indices, np.int64), config
    self.shape = (len(self._indices), config.image_size, config.image_size, 1)

  def __len__(self) -> int:
    return self.shape[0]

  def subset(self, indices: np.ndarray) -> "LazyImages":
    return LazyImages(self._source, self._indices[indices], self._config)

  def __getitem__(self, key) -> np.ndarray:
    key, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
    images = self.examples(key)[0]
    return images[(slice(None),) * (images.ndim == 4) + rest] if rest else images

  def examples(self, key) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of `key` (an int, int array or slice), read from the same records."""
    positions = np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.asarray(key)
    unique, inverse = np.unique(np.atleast_1d(positions), return_inverse=True)  # Padding repeats.
    images = np.empty((len(unique), *self.shape[1:]), np.uint8)
    labels = np.empty((len(unique),), np.int32)
    for j, i in enumerate(self._indices[unique]):
      example = self._source[int(i)]
      images[j], labels[j] = decode(example["image"], self._config), example["label"]
    images, labels = images[inverse.reshape(-1)], labels[inverse.reshape(-1)]
    return (images[0], labels[0]) if positions.ndim == 0 else (images, labels)

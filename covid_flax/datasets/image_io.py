"""Safe image loading: any common format and mode -> 8-bit grayscale PIL 'L' image.

Used by the real-data builders and for evaluating arbitrary image files. The rules:

- Files are opened by content, not extension (34 COVID-CT '.png' files hold JPEG data).
- The size is checked against `MAX_PIXELS` *before* decoding (decompression bombs), and the
  image is fully decoded with `.load()` so truncated or corrupt files fail here, not later.
- EXIF orientation is applied; multi-frame files (GIF, TIFF) use their first frame.
- Colour (RGB, CMYK, YCbCr, ...) -> luma with Pillow's ITU-R 601-2 weights.
- Transparency (RGBA, LA, PA, palette with a transparent index) is composited on **black**:
  air is black in radiographs and CT, so transparent margins become background rather than a
  bright border that would differ between sources (a class shortcut).
- 16-bit ('I;16*') is scaled linearly from 0..65535 to 0..255 (never clipped at 255, which is
  what a plain `convert('L')` does); 32-bit integer ('I') and float ('F') images are stretched
  from their own min..max to 0..255 (a constant image becomes all zeros).

Every failure raises `DatasetError` naming the file.
"""

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from covid_flax.errors import DatasetError

# Images with more pixels than this are refused before decoding. 100 MP is far above any real CXR
# or CT slice (the largest here are ~4 MP) but well below what would exhaust memory.
MAX_PIXELS = 100_000_000

_TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION = 0x0112


def _to_grayscale(image: Image.Image) -> Image.Image:
  """Converts an opened, loaded image of any mode to mode 'L' (see the module docstring)."""
  mode = image.mode
  if mode == "L":
    return image
  if mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    mode = image.mode
  elif mode in ("1",):
    return image.convert("L")
  elif mode.startswith("I;16"):
    arr = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.rint(arr * (255.0 / 65535.0)).astype(np.uint8), mode="L")
  elif mode in ("I", "F"):
    arr = np.asarray(image).astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
  if mode in _TRANSPARENT_MODES:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("L")
  if mode != "RGB":
    image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
  return image.convert("L")


def open_grayscale(
  fileobj: BinaryIO, name: str | os.PathLike, max_pixels: int | None = None
) -> Image.Image:
  """Like `load_grayscale` but reads from an open binary file; `name` is used in errors."""
  max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise DatasetError(
      f"{name}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, so truncated images would load "
      "silently; unset it"
    )
  try:
    with warnings.catch_warnings():
      # Our own limit below replaces Pillow's warning; Pillow's hard error is still caught.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(fileobj) as image:
        width, height = image.size
        if width <= 0 or height <= 0:
          raise DatasetError(f"{name}: image has an empty size {width}x{height}")
        if width * height > max_pixels:
          raise DatasetError(
            f"{name}: {width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} (possible decompression bomb); refusing to decode it"
          )
        image.load()
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
          image = ImageOps.exif_transpose(image)
        gray = _to_grayscale(image)
        gray.load()
        return gray.copy() if gray is image else gray
  except DatasetError:
    raise
  except Image.DecompressionBombError as e:
    raise DatasetError(f"{name}: possible decompression bomb: {e}") from e
  except UnidentifiedImageError as e:
    raise DatasetError(f"{name}: not an image file Pillow can read") from e
  except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
    raise DatasetError(f"{name}: corrupt or truncated image: {e}") from e


def load_grayscale(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
  """Loads any image file as an 8-bit grayscale PIL image (mode 'L', original size).

  Args:
    path: the image file; its format is detected from its content.
    max_pixels: refuse images with more pixels (default: `MAX_PIXELS`, read at call time).

  Raises:
    DatasetError: naming `path`, for a missing, non-image, corrupt, truncated or oversized file.
  """
  path = Path(path)
  try:
    with open(path, "rb") as f:
      return open_grayscale(f, path, max_pixels)
  except FileNotFoundError as e:
    raise DatasetError(f"{path}: file not found") from e
  except IsADirectoryError as e:
    raise DatasetError(f"{path}: is a directory, not an image file") from e


def load_grayscale_bytes(
  data: bytes, name: str | os.PathLike, max_pixels: int | None = None
) -> Image.Image:
  """Like `load_grayscale` for an image held in memory (e.g. a zip member)."""
  return open_grayscale(io.BytesIO(data), name, max_pixels)


def pixel_sha256(image: Image.Image) -> str:
  """SHA-256 of a grayscale image's size and pixels: equal for the same pixels in any encoding."""
  digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
  digest.update(image.tobytes())
  return digest.hexdigest()


def encode_png(image: Image.Image, compress_level: int = 1) -> bytes:
  """PNG bytes of `image` (lossless). A low zlib level: much faster, a little larger."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", compress_level=compress_level)
  return buffer.getvalue()

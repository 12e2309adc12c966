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

DICOM files (recognised by content: 'DICM' at byte 128) are read with pydicom (compressed
transfer syntaxes decoded by python-gdcm; see `_dicom_to_grayscale`).

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

# The window (centre, width, in Hounsfield units) that maps CT DICOMs to 8 bits: a lung window
# (config.ct_window_center / ct_window_width at evaluation and prediction).
CT_LUNG_WINDOW = (-600.0, 1500.0)
# Radiographs without a VOI LUT or window: these percentiles of their values map to black and white.
_ROBUST_PERCENTILES = (0.5, 99.5)
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


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
  """DICOM's LINEAR window (PS3.3 C.11.2.1.2.1) onto [0, 1]: the CT window of the config, which
  replaces whatever window the file suggests."""
  return np.clip((values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _dicom_to_grayscale(ds, name, ct_window: tuple[float, float]) -> Image.Image:
  """A single-frame DICOM image as 8 bits: stored values -> modality LUT (RescaleSlope/Intercept:
  Hounsfield units for CT) -> for CT `ct_window`; for other images the file's VOI LUT or
  WindowCenter/WindowWidth, else a robust percentile window -> [0, 255], inverted for MONOCHROME1.
  12/16-bit data is windowed, never truncated. Colour images (RGB, YBR, palette) -> luma."""
  from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

  try:
    stored = ds.pixel_array
  except (RuntimeError, NotImplementedError, ValueError) as e:
    syntax = ds.file_meta.get("TransferSyntaxUID", None)
    why = "; ".join(line.strip() for line in str(e).splitlines()[-2:])
    if syntax is None or not syntax.is_compressed:
      raise DatasetError(f"{name}: corrupt or truncated DICOM pixel data ({why})") from e
    raise DatasetError(
      f"{name}: its pixel data ({syntax.name}, transfer syntax {syntax}) could not be decoded "
      f"({why}). python-gdcm (installed) decodes most compressed syntaxes; 12-bit JPEG Extended "
      "and some others need pylibjpeg with pylibjpeg-libjpeg (GPL-3.0): pip install pylibjpeg "
      "pylibjpeg-libjpeg"
    ) from e
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
  if not photometric.startswith("MONOCHROME"):
    rgb = apply_color_lut(stored, ds) if photometric == "PALETTE COLOR" else stored
    peak = float(2 ** int(ds.get("BitsStored", 8)) - 1) if rgb.dtype != np.uint8 else 255.0
    rgb = np.clip(rgb.astype(np.float64) * (255.0 / peak), 0, 255)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return Image.fromarray(np.rint(luma).astype(np.uint8), mode="L")
  modality = apply_modality_lut(stored, ds)  # Integers unless rescaled.
  values = modality.astype(np.float64)
  if str(ds.get("Modality", "")) == "CT":
    unit = _window(values, *ct_window)
  elif "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
    # pydicom applies the file's VOI LUT, or its window with its VOILUTFunction (LINEAR,
    # LINEAR_EXACT, SIGMOID); the output range is where values far below and above it land.
    lut = "VOILUTSequence" in ds
    x = np.rint(modality).astype(np.int64) if lut else values  # A LUT is indexed by integers.
    ends = np.array([np.iinfo(np.int32).min, np.iinfo(np.int32).max])  # Wider overflows a LUT.
    with np.errstate(over="ignore"):  # exp() of a SIGMOID window at the ends: 0 and 1.
      lo, hi = apply_voi_lut(ends, ds).astype(np.float64)
    unit = np.clip((apply_voi_lut(x, ds) - lo) / (hi - lo), 0.0, 1.0)
  else:
    lo, hi = np.percentile(values, _ROBUST_PERCENTILES)
    unit = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
  if photometric == "MONOCHROME1":  # Stored with black as the highest value.
    unit = 1.0 - unit
  return Image.fromarray(np.rint(unit * 255.0).astype(np.uint8), mode="L")


def _open_dicom(
  fileobj: BinaryIO, name, max_pixels: int, ct_window: tuple[float, float], force: bool = False
) -> Image.Image:
  """A DICOM file as 8-bit grey; `force`: a file without the 'DICM' preamble, accepted only if
  it reads as a dataset with pixel data (anything else is not an image)."""
  import pydicom
  from pydicom.errors import InvalidDicomError

  try:
    ds = pydicom.dcmread(fileobj, force=force)
    if force and "PixelData" not in ds:
      raise InvalidDicomError("no DICOM preamble and no pixel data")
  except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
    if force:
      raise DatasetError(f"{name}: not an image file Pillow or pydicom can read") from e
    raise DatasetError(f"{name}: not a readable DICOM file: {e}") from e
  if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
    kind = getattr(ds.get("SOPClassUID", None), "name", "unknown SOP class")
    raise DatasetError(f"{name}: a DICOM file without pixel data ({kind})")
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    raise DatasetError(
      f"{name}: a multi-frame DICOM ({frames} frames) where one image is expected; export the "
      "frame or slice you mean as a file of its own"
    )
  rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
  if rows * columns > max_pixels:
    raise DatasetError(f"{name}: {columns}x{rows} pixels is over the limit of {max_pixels}")
  try:
    return _dicom_to_grayscale(ds, name, ct_window)
  except DatasetError:
    raise
  except (AttributeError, KeyError, ValueError, TypeError, IndexError) as e:
    raise DatasetError(f"{name}: a DICOM file whose pixel data is unusable: {e}") from e


def _is_dicom(fileobj: BinaryIO) -> bool:
  start = fileobj.tell()
  head = fileobj.read(132)
  fileobj.seek(start)
  return head[128:132] == b"DICM"


def open_grayscale(
  fileobj: BinaryIO,
  name: str | os.PathLike,
  max_pixels: int | None = None,
  ct_window: tuple[float, float] = CT_LUNG_WINDOW,
) -> Image.Image:
  """Like `load_grayscale` but reads from an open binary file; `name` is used in errors."""
  max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
  if _is_dicom(fileobj):
    return _open_dicom(fileobj, name, max_pixels, ct_window)
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
  except UnidentifiedImageError:
    fileobj.seek(0)  # A DICOM file without its 128-byte preamble and 'DICM'?
    return _open_dicom(fileobj, name, max_pixels, ct_window, force=True)
  except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
    raise DatasetError(f"{name}: corrupt or truncated image: {e}") from e


def load_grayscale(
  path: str | os.PathLike,
  max_pixels: int | None = None,
  ct_window: tuple[float, float] = CT_LUNG_WINDOW,
) -> Image.Image:
  """Loads any image file as an 8-bit grayscale PIL image (mode 'L', original size).

  Args:
    path: the image file (any Pillow format, or DICOM); its format is detected from its content.
    max_pixels: refuse images with more pixels (default: `MAX_PIXELS`, read at call time).
    ct_window: (centre, width) in Hounsfield units for CT DICOMs.

  Raises:
    DatasetError: naming `path`, for a missing, non-image, corrupt, truncated or oversized file.
  """
  path = Path(path)
  try:
    with open(path, "rb") as f:
      return open_grayscale(f, path, max_pixels, ct_window)
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

"""Crop a CT slice to its lungs, with thresholds and connected components (no weights).

COVID-CT's slices are cut from paper figures (page margins, captions, panel letters, insets, the
scanner table, air around the body) and from web images; a hospital's own slices come cropped
inside the body. A model can tell these apart by everything *around* the lungs, so both are cut to
the same framing:

1. **Body.** The slice is thresholded (Otsu, on a lightly smoothed copy) and opened with a small
   disk, so that thin bridges (the table, a caption's underline, text strokes) break. Bright
   components that cover most of the image border are page margins or frames and are dropped; of
   the rest, the largest is the body wall and soft tissue of a lung-window slice. The body is its
   convex hull: that takes in the lungs (its holes), and also a lung that runs off a tight crop's
   edge, where the component is open and a hole fill would lose it. A slice already cropped inside
   the body (tissue round the border and no other large component) is all body. Still missed: a
   crop so tight that the body wall is left in pieces, where the largest component is the
   mediastinum alone (about 16 of COVID-CT's 746 slices; docs/ct_probe.md).
2. **Lungs.** Inside the body, the dark pixels (Otsu over the body) are opened, and the components
   of at least `_MIN_LUNG_FRACTION` of the body are the lungs (and the airways between them).
3. **Crop.** The lungs' bounding box plus `_MARGIN_FRACTION` of its size on each side (at least
   `_MIN_CROP_FRACTION` of the body's box, for slices low in the chest); everything
   outside the body set to black. With `equalize`, the grey levels are equalised over the body's
   pixels only: a rank transform, so any monotonic window (a paper's print, a clinical PNG) maps to
   the same grey levels. With `equalize_over="lungs"` the ranks are those of the lung fields
   (`lung_fields`) alone, applied to the whole body: the lungs' grey levels then fill 1..255 in
   every source and tissue brighter than any lung pixel saturates alike, where over the body a
   figure printed with saturated tissue spends half the range on a flat white wall. With `clahe`,
   then contrast-limited adaptive histogram equalisation (`adaptive_equalize`) over the crop: the
   same rank idea in local tiles, which raises the local contrast of fine lung texture (vessels,
   the edges of ground glass) that a global rank spends on large-scale gradients.

Where no lungs are found the crop falls back to the body, and where no body is found (under
`_MIN_BODY_FRACTION` of the image) to the whole image.
"""

import numpy as np
from scipy import ndimage, spatial
from skimage import exposure

EQUALIZE_OVER = ("body", "lungs")  # Whose grey-level ranks `equalize` uses.
_MIN_BODY_FRACTION = 0.1  # Of the image area.
_MIN_LUNG_FRACTION = 0.01  # Of the body's area.
_FRAME_BORDER_FRACTION = 0.6  # A bright component on this much of the border is a frame or margin.
_OPENING_FRACTION = 0.01  # Radius of the opening disk, as a fraction of the image's shorter side.
_MARGIN_FRACTION = 0.05  # Kept around the lungs' bounding box, as a fraction of its size.
_MIN_CROP_FRACTION = 0.6  # Of the body's box on each axis (a slice low in the chest: small lungs).
_LUNG_CLOSING_FRACTION = 0.04  # `lungs_only`: closing radius that takes in opacities at the pleura.


def otsu_threshold(values: np.ndarray) -> float:
  """The grey level that best separates `values` (uint8) into two classes (Otsu 1979)."""
  hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
  levels = np.arange(256)
  weight_low = np.cumsum(hist)
  weight_high = weight_low[-1] - weight_low
  sum_low = np.cumsum(hist * levels)
  mean_low = sum_low / np.maximum(weight_low, 1)
  mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
  between = weight_low * weight_high * (mean_low - mean_high) ** 2
  return float(np.argmax(between[:-1]))


def _disk(radius: int) -> np.ndarray:
  y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
  return x**2 + y**2 <= radius**2


def _open(mask: np.ndarray) -> np.ndarray:
  """`mask` opened with a disk; what touches the image border is not eroded away there."""
  radius = max(1, round(_OPENING_FRACTION * min(mask.shape)))
  padded = np.pad(mask, radius, mode="edge")
  opened = ndimage.binary_opening(padded, structure=_disk(radius))
  return opened[radius:-radius, radius:-radius]


def _border(array: np.ndarray) -> np.ndarray:
  return np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])


def convex_hull(mask: np.ndarray) -> np.ndarray:
  """The pixels whose centres lie in the convex hull of `mask`'s pixels (as unit squares)."""
  rows = np.flatnonzero(mask.any(axis=1))
  if rows.size == 0:
    return np.zeros(mask.shape, bool)
  first = mask[rows].argmax(axis=1)  # Each row's outermost pixels are all the hull needs.
  last = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
  points = np.concatenate(  # The outer corners of those pixels, as (y, x).
    [np.stack([rows + dy, x], axis=1) for x in (first, last + 1) for dy in (0, 1)]
  ).astype(np.float64)
  hull = points[spatial.ConvexHull(points).vertices]  # (y, x), counter-clockwise.
  (y0, x0), (y1, x1) = hull.T, np.roll(hull, -1, axis=0).T
  centres = np.arange(mask.shape[0])[:, None] + 0.5
  with np.errstate(divide="ignore", invalid="ignore"):
    crossing = x0 + (centres - y0) * (x1 - x0) / (y1 - y0)
  spans = (np.minimum(y0, y1) <= centres) & (centres <= np.maximum(y0, y1)) & (y0 != y1)
  left = np.where(spans, crossing, np.inf).min(axis=1)
  right = np.where(spans, crossing, -np.inf).max(axis=1)
  centres_x = np.arange(mask.shape[1]) + 0.5
  return (centres_x >= left[:, None]) & (centres_x <= right[:, None])


def body_mask(image: np.ndarray) -> np.ndarray | None:
  """(H, W) uint8 -> (H, W) bool mask of the body, or None where none is found."""
  smooth = ndimage.uniform_filter(np.asarray(image, np.uint8), size=3)
  labels, count = ndimage.label(_open(smooth > otsu_threshold(smooth)))
  sizes = np.bincount(labels.ravel(), minlength=count + 1)
  border = np.bincount(_border(labels), minlength=count + 1) / _border(labels).size
  frames = border > _FRAME_BORDER_FRACTION
  frames[0] = False
  sizes[0] = 0
  sizes[frames] = 0
  if sizes.any():
    body = labels == sizes.argmax()
    body = convex_hull(body)
    if body.sum() >= _MIN_BODY_FRACTION * image.size:
      return body
  # Tissue round the border and nothing else large: a slice cropped inside the body.
  return np.ones(image.shape, bool) if frames.any() else None


def lungs_mask(image: np.ndarray, body: np.ndarray) -> np.ndarray | None:
  """(H, W) bool mask of the lungs (the large dark components inside `body`), or None."""
  inside = np.asarray(image, np.uint8)[body]
  dark = _open(body & (image <= otsu_threshold(inside)))
  labels, count = ndimage.label(dark)
  sizes = np.bincount(labels.ravel(), minlength=count + 1)
  sizes[0] = 0
  keep = np.flatnonzero(sizes >= _MIN_LUNG_FRACTION * body.sum())
  return np.isin(labels, keep) if keep.size else None


def _box(mask: np.ndarray, outer: np.ndarray) -> tuple[slice, slice]:
  """Rows and columns of `mask`'s bounding box plus the margin, widened about its centre to at
  least `_MIN_CROP_FRACTION` of `outer`'s box on each axis."""
  box = []
  for axis in (1, 0):
    hits, outer_hits = np.flatnonzero(mask.any(axis=axis)), np.flatnonzero(outer.any(axis=axis))
    lo, hi = float(hits[0]), float(hits[-1] + 1)
    pad = max(
      _MARGIN_FRACTION * (hi - lo),
      (_MIN_CROP_FRACTION * (outer_hits[-1] + 1 - outer_hits[0]) - (hi - lo)) / 2,
    )
    size = mask.shape[1 - axis]
    box.append(slice(max(round(lo - pad), 0), min(round(hi + pad), size)))
  return box[0], box[1]


def lung_fields(lungs: np.ndarray) -> np.ndarray:
  """`lungs` closed with a disk and its holes filled: the dark lung plus the opacities inside and
  along it (consolidation and dense ground glass are brighter than the threshold that found the
  lungs, so they are holes or bays in `lungs`)."""
  radius = max(1, round(_LUNG_CLOSING_FRACTION * min(lungs.shape)))
  padded = np.pad(lungs, radius)
  closed = ndimage.binary_closing(padded, structure=_disk(radius))[radius:-radius, radius:-radius]
  return ndimage.binary_fill_holes(closed | lungs)


def adaptive_equalize(
  image: np.ndarray, clip_limit: float, keep: np.ndarray | None = None
) -> np.ndarray:
  """(H, W) uint8 -> CLAHE (scikit-image's, tiles of 1/8 of each side, `clip_limit` in (0, 1]:
  higher is stronger), uint8. Pixels outside `keep` stay black and those inside at least 1. A flat
  image is returned as it is (scikit-image would stretch it to near white)."""
  if image.min() == image.max():
    return image
  out = np.round(255 * exposure.equalize_adapthist(image, clip_limit=clip_limit)).astype(np.uint8)
  if keep is None:
    return out
  return np.where(keep, np.maximum(out, 1), 0).astype(np.uint8)


def crop_to_lungs(
  image: np.ndarray,
  equalize: bool = False,
  lungs_only: bool = False,
  clahe: float = 0.0,
  equalize_over: str = "body",
) -> np.ndarray:
  """(H, W) uint8 -> the lungs' bounding box (see the module docstring), black outside the body
  (outside `lung_fields` if `lungs_only`); the grey levels equalised if `equalize`, by the ranks
  of the pixels kept (`equalize_over="body"`) or of the lung fields' (`"lungs"`; the body's where
  no lungs are found), then adaptively (`adaptive_equalize`, clip limit `clahe`) if `clahe` > 0."""
  if equalize_over not in EQUALIZE_OVER:
    raise ValueError(f"equalize_over={equalize_over!r} must be one of {list(EQUALIZE_OVER)}")
  image = np.asarray(image, np.uint8)
  body = body_mask(image)
  if body is None:
    body = np.ones(image.shape, bool)
  lungs = lungs_mask(image, body)
  by_lungs = equalize and equalize_over == "lungs"
  fields = lung_fields(lungs) if lungs is not None and (lungs_only or by_lungs) else None
  keep = fields if lungs_only and fields is not None else body
  if equalize:  # The reference pixels' cumulative histogram onto 1..255; 0 stays the background's
    # black (PIL's ImageOps.equalize with a mask would send the body's darkest pixels to 0 as well).
    reference = fields if by_lungs and fields is not None else keep
    cdf = np.cumsum(np.bincount(image[reference], minlength=256)).astype(np.float64)
    image = np.round(1 + 254 * cdf / cdf[-1]).astype(np.uint8)[image]
  image = np.where(keep, image, 0).astype(np.uint8)
  rows, cols = _box(lungs if lungs is not None else body, body)
  if clahe > 0:
    return adaptive_equalize(image[rows, cols], clahe, keep[rows, cols])
  return image[rows, cols]

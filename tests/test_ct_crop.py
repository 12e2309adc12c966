"""The CT lung crop and the appearance randomisation, on small synthetic slices."""

import io

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps
from scipy import ndimage, spatial

from configs import default
from covid_flax import ct_crop, image_prep, preprocess


def _ellipse(shape, cy, cx, ry, rx) -> np.ndarray:
  y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
  return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _anatomy(shape, cy, cx, scale) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Body, lungs and a ground-glass patch in the right lung, centred at (cy, cx)."""
  body = _ellipse(shape, cy, cx, 30 * scale, 45 * scale)
  lungs = _ellipse(shape, cy, cx - 20 * scale, 22 * scale, 16 * scale)
  lungs |= _ellipse(shape, cy, cx + 20 * scale, 22 * scale, 16 * scale)
  patch = _ellipse(shape, cy + 5 * scale, cx - 22 * scale, 7 * scale, 6 * scale)
  return body, lungs, patch


def _slice(levels: dict[str, float], shape, cy, cx, scale, background: float, seed: int):
  """A lung-window slice: tissue `levels['tissue']`, lungs `levels['lung']` with texture, a
  ground-glass patch `levels['glass']`, on `background`."""
  rng = np.random.default_rng(seed)
  body, lungs, patch = _anatomy(shape, cy, cx, scale)
  image = np.full(shape, background, np.float64)
  image[body] = levels["tissue"]
  image[lungs] = levels["lung"] + rng.normal(0, 4, lungs.sum())
  image[lungs & patch] = levels["glass"] + rng.normal(0, 4, (lungs & patch).sum())
  return np.clip(image, 0, 255).astype(np.uint8)


def paper_figure() -> np.ndarray:
  """A slice as a paper's figure shows it: a white page margin, a black scanner field, the scanner
  table under the body, a caption and a panel letter."""
  image = _slice({"tissue": 200, "lung": 20, "glass": 90}, (240, 260), 110, 130, 1.6, 0, seed=0)
  image[:12], image[-30:], image[:, :10], image[:, -10:] = 255, 255, 255, 255  # Page margin.
  image[172:178, 40:220] = 190  # The table.
  pil = Image.fromarray(image)
  draw = ImageDraw.Draw(pil)
  draw.text((20, 15), "B", fill=255)  # Panel letter in the black field.
  draw.text((60, 222), "Fig. 3 COVID-19 pneumonia", fill=0)  # Caption on the margin.
  return np.asarray(pil)


def clinical_slice() -> np.ndarray:
  """The same anatomy as a hospital's PNG: cropped inside the body (tissue to every edge), another
  window (grey lungs), another size."""
  return _slice({"tissue": 250, "lung": 80, "glass": 150}, (160, 200), 80, 100, 2.0, 250, seed=1)


def _prepared(image: np.ndarray, size: int = 64) -> np.ndarray:
  return image_prep.resize(image, size, equalize=True, ct_crop=True)[..., 0].astype(float)


def test_a_paper_figure_and_a_clinical_slice_end_up_alike():
  figure, clinical = _prepared(paper_figure()), _prepared(clinical_slice())
  # Without the crop they differ grossly (margins, black field, framing); with it, far less.
  plain = [image_prep.resize(x, 64, equalize=True)[..., 0].astype(float)
           for x in (paper_figure(), clinical_slice())]  # fmt: skip
  assert np.abs(figure - clinical).mean() < 0.35 * np.abs(plain[0] - plain[1]).mean()
  dark_figure, dark_clinical = figure < 128, clinical < 128  # The lungs sit in the same place.
  assert (dark_figure & dark_clinical).sum() / (dark_figure | dark_clinical).sum() > 0.75
  # Intensities in the same order: lungs, then ground glass, then tissue.
  _, lungs, patch = _anatomy((64, 64), 31.5, 31.5, 0.6)  # Roughly where the crop puts them.
  for image in (figure, clinical):
    assert image[lungs & ~patch].mean() < image[patch & lungs].mean() < image[~lungs].mean()


def test_the_crop_removes_margin_caption_table_and_field():
  figure = paper_figure()
  cropped = ct_crop.crop_to_lungs(figure)
  body, lungs, _ = _anatomy(figure.shape, 110, 130, 1.6)
  height, width = (np.ptp(np.flatnonzero(lungs.any(axis))) + 1 for axis in (1, 0))
  # The lungs' box plus a 5 % margin: no page margin, caption or table is left.
  assert height * 1.1 - 1 <= cropped.shape[0] <= height * 1.1 + 1
  assert width * 1.1 - 1 <= cropped.shape[1] <= width * 1.1 + 1
  mask = ct_crop.body_mask(figure)
  assert mask[body].mean() > 0.97 and mask[~body].mean() < 0.01
  unmasked = ct_crop.crop_to_lungs(np.where(mask, figure, 0).astype(np.uint8))
  np.testing.assert_array_equal(cropped, unmasked)  # Nothing from outside the body is left.


def test_a_slice_cropped_inside_the_body_is_all_body():
  clinical = clinical_slice()
  assert ct_crop.body_mask(clinical).all()
  lungs = ct_crop.lungs_mask(clinical, ct_crop.body_mask(clinical))
  _, truth, _ = _anatomy(clinical.shape, 80, 100, 2.0)
  assert (lungs & truth).sum() / (lungs | truth).sum() > 0.9


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_a_lung_that_runs_off_the_edge_stays_in_the_body(turns):
  # A tight crop whose left lung (and body wall) the image edge cuts: the body component is open
  # there, so its holes alone would lose that lung. Turned to each edge in turn.
  args = ((200, 200), 100, 60, 2.0)
  image = _slice({"tissue": 200, "lung": 40, "glass": 110}, *args, background=0, seed=2)
  body_truth, lungs_truth, _ = _anatomy(*args)
  image, body_truth, lungs_truth = (np.rot90(x, turns) for x in (image, body_truth, lungs_truth))
  body = ct_crop.body_mask(image)
  assert body[lungs_truth].mean() > 0.99
  assert body[~body_truth].mean() < 0.05  # The air round the body stays out.
  lungs = ct_crop.lungs_mask(image, body)
  assert (lungs & lungs_truth).sum() / (lungs | lungs_truth).sum() > 0.9


def test_convex_hull_matches_qhull_on_pixel_centres():
  rng = np.random.default_rng(0)
  for _ in range(50):
    mask = rng.random(tuple(rng.integers(3, 40, size=2))) < rng.uniform(0.01, 0.3)
    mask[rng.integers(mask.shape[0]), rng.integers(mask.shape[1])] = True
    ys, xs = np.nonzero(mask)
    squares = np.concatenate([np.stack([ys + dy, xs + dx], 1) for dy in (0, 1) for dx in (0, 1)])
    facets = spatial.ConvexHull(squares).equations
    centres = np.stack(np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]], -1).reshape(-1, 2) + 0.5
    expected = (centres @ facets[:, :2].T + facets[:, 2] <= 1e-9).all(1).reshape(mask.shape)
    np.testing.assert_array_equal(ct_crop.convex_hull(mask), expected)
  assert not ct_crop.convex_hull(np.zeros((4, 5), bool)).any()


def test_lung_fields_keep_the_lungs_with_their_opacity_and_nothing_else():
  figure = paper_figure()
  body, lungs, patch = _anatomy(figure.shape, 110, 130, 1.6)
  fields = ct_crop.lung_fields(ct_crop.lungs_mask(figure, ct_crop.body_mask(figure)))
  assert fields[lungs].mean() > 0.97 and fields[patch & lungs].all()  # Ground glass included.
  near = ndimage.binary_dilation(lungs, iterations=12)  # The closing may round concave bays.
  assert fields[~near].sum() == 0
  only = ct_crop.crop_to_lungs(figure, equalize=True, lungs_only=True)
  with_body = ct_crop.crop_to_lungs(figure, equalize=True)
  assert only.shape == with_body.shape  # Same box: the lungs'.
  assert (only > 0).sum() < 0.8 * (with_body > 0).sum()  # The tissue around them is black.
  assert only.max() == 255  # Equalised over the lungs: their brightest pixels reach white.


def test_lung_mask_with_ct_crop_keeps_the_lungs_it_finds():
  config = default.get_config()
  config.image_size, config.equalize, config.ct_crop, config.lung_mask = 48, True, True, True
  image = paper_figure()
  expected = Image.fromarray(ct_crop.crop_to_lungs(image, equalize=True, lungs_only=True))
  expected = expected.resize((48, 48), Image.Resampling.BICUBIC, reducing_gap=3.0)
  np.testing.assert_array_equal(image_prep.prepare_image(image, config)[..., 0], expected)


@pytest.mark.parametrize(
  "image", [np.zeros((50, 60), np.uint8), np.full((50, 60), 255, np.uint8)], ids=["black", "white"]
)
def test_without_a_body_the_image_is_kept_whole(image):
  assert ct_crop.crop_to_lungs(image).shape == image.shape


def test_no_body_is_found_in_a_black_image():
  assert ct_crop.body_mask(np.zeros((50, 60), np.uint8)) is None


def test_otsu_threshold_separates_two_modes():
  values = np.concatenate([np.full(100, 30), np.full(50, 200)]).astype(np.uint8)
  assert 30 <= ct_crop.otsu_threshold(values) < 200


def test_ct_crop_is_part_of_the_prepared_image():
  config = default.get_config()
  config.image_size, config.equalize = 48, True
  image = paper_figure()
  plain = image_prep.prepare_image(image, config)
  config.ct_crop = True
  cropped = image_prep.prepare_image(image, config)
  assert cropped.shape == plain.shape == (48, 48, 1)
  expected = np.asarray(
    Image.fromarray(ct_crop.crop_to_lungs(image, equalize=True)).resize(
      (48, 48), Image.Resampling.BICUBIC, reducing_gap=3.0
    )
  )
  np.testing.assert_array_equal(cropped[..., 0], expected)


def _faint_texture_slice(texture_sd: float) -> tuple[np.ndarray, np.ndarray]:
  """A slice whose lungs carry a large-scale gradient (dependent density) and a fine texture."""
  rng = np.random.default_rng(0)
  body, lungs, _ = _anatomy((200, 240), 100, 120, 2.0)
  image = np.where(body, 220.0, 0.0)
  rows = np.mgrid[0:200, 0:240][0]
  image[lungs] = 20 + 0.5 * (rows[lungs] - 56) + rng.normal(0, texture_sd, lungs.sum())
  return np.clip(image, 0, 255).astype(np.uint8), lungs


def _lung_texture(prepared: np.ndarray) -> float:
  """Standard deviation of the fine texture (the image less its 5x5 mean) inside the lungs."""
  prepared = prepared.astype(float)
  lungs = ct_crop.lungs_mask(prepared.astype(np.uint8), prepared > 0)
  inner = ndimage.binary_erosion(lungs, iterations=4)
  return float((prepared - ndimage.uniform_filter(prepared, 5))[inner].std())


def test_clahe_raises_the_local_contrast_of_lung_texture_and_keeps_the_background_black():
  image, _ = _faint_texture_slice(texture_sd=2.0)
  plain = ct_crop.crop_to_lungs(image, equalize=True)
  adaptive = ct_crop.crop_to_lungs(image, equalize=True, clahe=0.01)
  assert adaptive.shape == plain.shape
  assert _lung_texture(adaptive) > 1.3 * _lung_texture(plain)  # 1.44 when written.
  assert _lung_texture(ct_crop.crop_to_lungs(image, True, clahe=0.03)) > _lung_texture(adaptive)
  flat = np.full((20, 30), 7, np.uint8)
  np.testing.assert_array_equal(ct_crop.adaptive_equalize(flat, 0.01), flat)
  figure = paper_figure()  # Outside the body stays black, the body is never black.
  np.testing.assert_array_equal(
    ct_crop.crop_to_lungs(figure, True, clahe=0.01) == 0, ct_crop.crop_to_lungs(figure, True) == 0
  )


@pytest.mark.parametrize("crop", [True, False])
def test_clahe_is_part_of_the_prepared_image(crop):
  config = default.get_config()
  config.image_size, config.equalize, config.ct_crop, config.clahe = 48, True, crop, 0.01
  image = paper_figure()
  if crop:
    expected = ct_crop.crop_to_lungs(image, equalize=True, clahe=0.01)
  else:
    expected = ct_crop.adaptive_equalize(
      np.asarray(ImageOps.equalize(Image.fromarray(image))), 0.01
    )
  expected = Image.fromarray(expected).resize((48, 48), Image.Resampling.BICUBIC, reducing_gap=3.0)
  prepared = image_prep.prepare_image(image, config)[..., 0]
  np.testing.assert_array_equal(prepared, expected)
  config.clahe = 0.0
  assert np.abs(prepared.astype(int) - image_prep.prepare_image(image, config)[..., 0]).mean() > 2


def _config(**fields):
  config = default.get_config()
  config.aug_rotate = config.aug_zoom = config.aug_translate = 0.0
  config.aug_brightness = config.aug_contrast = 0.0
  config.update(fields)
  return config


def test_appearance_randomisation_is_off_by_default_and_changes_images_when_on():
  images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
  keys = jax.random.split(jax.random.key(1), 4)
  np.testing.assert_allclose(preprocess.augment(images, keys, _config()), images, atol=1e-6)
  for field, value in [("aug_gamma", 0.5), ("aug_sharpness", 0.5), ("aug_noise", 0.5),
                       ("aug_window", 0.3), ("aug_downscale", 3.0), ("aug_jpeg", 20.0)]:  # fmt: skip
    out = preprocess.augment(images, keys, _config(**{field: value}))
    assert np.abs(out - images).mean() > 1e-3, field


def test_gamma_keeps_the_order_of_grey_levels_and_the_range():
  ramp = np.linspace(0, 1, 16)[None].repeat(16, 0)
  for seed in range(4):
    out = preprocess.randomize_appearance(ramp, jax.random.key(seed), _config(aug_gamma=0.7))
    assert np.all(np.diff(np.asarray(out[0])) > 0) and 0 <= out.min() and out.max() <= 1
  flat = np.full((8, 8), 0.4)
  out = preprocess.randomize_appearance(flat, jax.random.key(0), _config(aug_sharpness=1.0))
  np.testing.assert_allclose(out, flat, atol=1e-6)  # Blur and sharpening leave flat areas alone.


def test_window_stretches_and_clips_but_keeps_the_order_of_grey_levels():
  ramp = np.linspace(0, 1, 64)[None].repeat(4, 0)
  for seed in range(4):
    out = np.asarray(preprocess.randomize_appearance(ramp, jax.random.key(seed),
                                                     _config(aug_window=0.3)))  # fmt: skip
    assert np.all(np.diff(out[0]) >= 0) and out.min() == 0 and out.max() == 1
    assert np.any(out[0] == 0) and np.any(out[0] == 1)  # Both ends clipped, by at most 30 %.
    assert 0.4 < np.mean(out[0] > 0.5) < 0.6 and np.sum(out[0] == 0) <= 0.3 * 64 + 1


def test_downscale_blurs_detail_and_leaves_flat_images_and_edges_alone():
  stripes = np.tile(np.arange(32) % 2, (32, 1)).astype(np.float32)
  np.testing.assert_allclose(preprocess._downscale(stripes, 1.0, 4.0), stripes, atol=1e-6)
  for factor in (1.5, 2.0, 3.7):
    low = np.asarray(preprocess._downscale(stripes, factor, 4.0))
    assert low.shape == stripes.shape and low[4:-4, 4:-4].std() < 0.5 * stripes.std(), factor
    flat = np.asarray(preprocess._downscale(np.full((32, 32), 0.6), factor, 4.0))
    np.testing.assert_allclose(flat, 0.6, atol=1e-5)  # No black seeps in at any border.


@pytest.mark.parametrize("quality", [5, 10, 35, 50, 75, 95])
def test_jpeg_matches_pillows_encoder(quality):
  rng = np.random.default_rng(quality)
  smooth = ndimage.gaussian_filter(rng.uniform(0, 255, (40, 44)), 3)  # Not a multiple of 8.
  image = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).round().astype(np.uint8)
  out = np.round(np.asarray(preprocess.jpeg(image / 255.0, float(quality))) * 255.0)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
  pillow = np.asarray(Image.open(buffer), dtype=np.float64)
  error, pillow_error = np.abs(out - image).mean(), np.abs(pillow - image).mean()
  assert out.shape == image.shape and error > 1.0  # It does change the image, as much as Pillow
  assert abs(error - pillow_error) < 0.02 * pillow_error  # does, and the same way: pixels differ
  assert np.abs(out - pillow).mean() < 0.65 and np.abs(out - pillow).max() <= 8  # by rounding.


def test_jpeg_in_the_appearance_randomisation_draws_its_quality():
  image = np.asarray(jax.random.uniform(jax.random.key(0), (16, 16)))
  outs = [np.asarray(preprocess.randomize_appearance(image, jax.random.key(seed),
                                                     _config(aug_jpeg=5.0))) for seed in range(3)]  # fmt: skip
  errors = [np.abs(out - image).mean() for out in outs]
  assert min(errors) > 0.01 and len(set(np.round(errors, 6))) == 3  # Qualities differ by key.
  for out in outs:  # Decoded to grey levels.
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-3)


def _lungs_in_bodies(body_scales: tuple[float, ...]) -> list[np.ndarray]:
  """The same two textured lungs (grey 40) inside bodies of textured tissue (grey 200) of several
  sizes: a tight crop and a whole-body figure show different amounts of tissue round one lung."""
  rng = np.random.default_rng(0)
  shape = (260, 300)  # Lungs with a mediastinum wider than the closing of `lung_fields` bridges.
  lungs = _ellipse(shape, 130, 108, 35, 26) | _ellipse(shape, 130, 192, 35, 26)
  texture = rng.normal(0, 8, lungs.sum())
  images = []
  for scale in body_scales:
    image = 200 + rng.normal(0, 8, shape)
    image[~_ellipse(shape, 130, 150, 30 * scale, 45 * scale)] = 0
    image[lungs] = 40 + texture
    images.append(np.clip(image, 0, 255).astype(np.uint8))
  return images


def _lungs_and_tissue(image: np.ndarray, prepared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The grey levels `crop_to_lungs` gave the lungs' and the tissue's inner pixels (the masks of
  the unprepared slice, cut to the crop's box)."""
  body = ct_crop.body_mask(image)
  lungs = ct_crop.lungs_mask(image, body)
  rows, cols = ct_crop._box(lungs, body)
  lungs, body = lungs[rows, cols], body[rows, cols]
  inner_lungs = ndimage.binary_erosion(lungs, iterations=2)
  tissue = ndimage.binary_erosion(body, iterations=2) & ~ndimage.binary_dilation(
    lungs, iterations=2
  )
  return prepared[inner_lungs], prepared[tissue]


def test_equalizing_over_the_lungs_gives_them_the_same_grey_levels_whatever_the_tissue_around():
  tight, wide = _lungs_in_bodies((2.0, 3.0))
  for equalize_over in ("body", "lungs"):
    (tight_lungs, tight_tissue), (wide_lungs, wide_tissue) = [
      _lungs_and_tissue(x, ct_crop.crop_to_lungs(x, True, equalize_over=equalize_over))
      for x in (tight, wide)
    ]
    if equalize_over == "body":  # The lungs' share of the body sets their grey levels.
      assert np.median(tight_lungs) - np.median(wide_lungs) > 20
      assert np.mean(tight_tissue == 255) < 0.1  # The tissue keeps a spread of grey levels.
    else:  # The lungs fill the range alike and the tissue saturates in both.
      assert abs(np.median(tight_lungs) - np.median(wide_lungs)) <= 3
      assert 110 < np.median(tight_lungs) < 146
      assert np.all(tight_tissue == 255) and np.all(wide_tissue == 255)
  np.testing.assert_array_equal(
    ct_crop.crop_to_lungs(tight, True, equalize_over="lungs") == 0,
    ct_crop.crop_to_lungs(tight, True) == 0,
  )


def test_equalize_over_lungs_falls_back_to_the_body_and_is_part_of_the_prepared_image():
  black = np.zeros((50, 60), np.uint8)  # No body, no lungs: the body's (the whole image's) ranks.
  np.testing.assert_array_equal(
    ct_crop.crop_to_lungs(black, True, equalize_over="lungs"), ct_crop.crop_to_lungs(black, True)
  )
  with pytest.raises(ValueError, match="equalize_over='lung'"):
    ct_crop.crop_to_lungs(black, True, equalize_over="lung")
  config = default.get_config()
  config.image_size, config.equalize, config.ct_crop, config.equalize_over = 48, True, True, "lungs"
  image = paper_figure()
  expected = Image.fromarray(ct_crop.crop_to_lungs(image, True, equalize_over="lungs"))
  expected = expected.resize((48, 48), Image.Resampling.BICUBIC, reducing_gap=3.0)
  np.testing.assert_array_equal(image_prep.prepare_image(image, config)[..., 0], expected)

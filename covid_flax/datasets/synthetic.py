"""`covid_synthetic`: deterministic chest-like grayscale images, embedded so that everything runs
offline with no real data.

Configs:
  * `covid_synthetic/cxr`: a frontal chest radiograph: body, two dark lung fields, ribs, heart.
  * `covid_synthetic/ct`: an axial chest CT slice: body, two lungs, spine, vessels.
  * `covid_synthetic/cxr_n10000`, `cxr_n30000`, `cxr_n100000`: the cxr images at 256x256, with
    about N training images (N / 1.3 patients) and about 1,000 val and 1,000 test images: datasets
    too large for a device cache, for scaling runs without a download (`input_mode=stream`).
    Generated on every core (worker processes); 100,000 images take about 8 minutes on 2 cores.

The positive class (`covid`) has patchy peripheral opacities of random strength and number, some
of them faint; both classes have random anatomy, vessel markings, exposure and noise, so a small CNN
needs a few epochs to separate them. Patients have one or two images, always in one split.
Every image is a pure function of (config, split, index): every user gets the same dataset.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from covid_flax.datasets import common, image_io

_NATIVE_SIZE = 128


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  modality: str = "cxr"
  split_patients: tuple[tuple[str, int], ...] = (("train", 480), ("val", 80), ("test", 80))
  native_size: int = _NATIVE_SIZE


SCALING_SIZES = (10_000, 30_000, 100_000)  # Training images of the cxr_n<N> configs.


def _scaling_config(n: int) -> SyntheticConfig:
  return SyntheticConfig(
    name=f"cxr_n{n}",
    description=f"About {n} training images at 256x256 (scaling runs).",
    split_patients=(("train", round(n / 1.3)), ("val", 770), ("test", 770)),
    native_size=256,
  )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
  return yy * 2 - 1, xx * 2 - 1  # [-1, 1]


def _ellipse(yy, xx, cy, cx, ry, rx, soft=0.04):
  d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
  return 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / soft, 50.0)))


def _blobs(rng, yy, xx, centers, n, scale):
  """Sum of `n` textured Gaussian blobs around randomly chosen `centers`."""
  out = np.zeros_like(yy)
  for _ in range(n):
    cy, cx = centers[rng.integers(len(centers))]
    cy, cx = cy + rng.normal(0, 0.06), cx + rng.normal(0, 0.06)
    s = scale * rng.uniform(0.6, 1.4)
    out += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
  return out


def _lungs(rng, modality):
  """Per-image lung geometry: (cy, cx, ry, rx) for the left and right lung."""
  jitter = lambda v, s: v + rng.normal(0, s)  # noqa: E731
  if modality == "cxr":
    return [
      (jitter(0.0, 0.03), jitter(sx * 0.38, 0.03), jitter(0.55, 0.04), jitter(0.25, 0.02))
      for sx in (-1, 1)
    ]
  return [
    (jitter(-0.05, 0.03), jitter(sx * 0.35, 0.03), jitter(0.45, 0.04), jitter(0.27, 0.02))
    for sx in (-1, 1)
  ]


def _peripheral_points(lungs):
  """Points near the lateral and lower edges of each lung: where COVID opacities sit."""
  pts = []
  for cy, cx, ry, rx in lungs:
    side = np.sign(cx)
    for angle in np.linspace(-0.3 * np.pi, 0.45 * np.pi, 6):
      pts.append((cy + 0.8 * ry * np.sin(angle), cx + side * 0.8 * rx * np.cos(angle)))
  return pts


def draw_image(modality: str, label: int, seed: int, size: int = _NATIVE_SIZE) -> np.ndarray:
  """One uint8 (size, size) image; a pure function of its arguments."""
  rng = np.random.default_rng(seed)
  yy, xx = _grid(size)
  lungs = _lungs(rng, modality)
  lung_mask = np.maximum(*(_ellipse(yy, xx, *lung) for lung in lungs))
  if modality == "cxr":
    body = _ellipse(yy, xx, 0.1, 0.0, 1.05, rng.uniform(0.85, 0.95))
    img = 0.15 + 0.55 * body - 0.35 * lung_mask
    ribs = 0.5 + 0.5 * np.sin(yy * rng.uniform(26, 32) + 3.0 * xx**2 + rng.uniform(0, 6.28))
    img += 0.08 * lung_mask * ribs**4
    heart = _ellipse(yy, xx, 0.25, rng.normal(0.08, 0.03), 0.3, rng.uniform(0.18, 0.26))
    img += 0.25 * heart * lung_mask
  else:
    body = _ellipse(yy, xx, 0.0, 0.0, rng.uniform(0.7, 0.8), rng.uniform(0.9, 0.97))
    img = 0.05 + 0.5 * body - 0.45 * lung_mask
    img += 0.4 * _ellipse(yy, xx, 0.62, 0.0, 0.1, 0.1)  # spine
  # Vessel markings in both classes, densest near the hila.
  hila = [(cy, cx * 0.5) for cy, cx, _, _ in lungs]
  img += 0.1 * lung_mask * _blobs(rng, yy, xx, hila, rng.integers(4, 9), 0.04)
  if label == common.POSITIVE_LABEL:
    strength = rng.uniform(0.15, 0.45)
    patches = _blobs(rng, yy, xx, _peripheral_points(lungs), rng.integers(2, 6), 0.1)
    texture = 0.6 + 0.4 * rng.random(yy.shape)
    img += strength * lung_mask * np.minimum(patches, 1.2) * texture
  img = (img - 0.3) * rng.uniform(0.8, 1.2) + 0.3 + rng.normal(0, 0.04)
  img += rng.normal(0, 0.05, yy.shape)
  return (np.clip(img, 0, 1) * 255).astype(np.uint8)


class CovidSynthetic(tfds.core.GeneratorBasedBuilder):
  """Synthetic CXR- and CT-like COVID / non-COVID images with the real builders' features."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    SyntheticConfig(name="cxr", description="Frontal chest radiograph-like images."),
    SyntheticConfig(name="ct", modality="ct", description="Axial chest CT-like slices."),
    *(_scaling_config(n) for n in SCALING_SIZES),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=common.base_features(),
      supervised_keys=("image", "label"),
      description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {
      split: self._generate_examples(split, n) for split, n in self.builder_config.split_patients
    }

  def _generate_examples(self, split: str, num_patients: int):
    config = self.builder_config
    split_seed = {"train": 0, "val": 1, "test": 2}[split]
    examples = []  # (filename, label, patient, draw_image arguments): cheap, drawn in order.
    for patient in range(num_patients):
      rng = np.random.default_rng([split_seed, patient])
      label = int(rng.integers(2))
      for image_index in range(1 + int(rng.random() < 0.3)):
        seed = int(np.random.default_rng([split_seed, patient, image_index, 7]).integers(2**31))
        filename = f"{config.modality}-{split}-{patient:04d}-{image_index}.png"
        examples.append(
          (filename, label, patient, (config.modality, label, seed, config.native_size))
        )
    chunks = [examples[i : i + _CHUNK] for i in range(0, len(examples), _CHUNK)]
    # Processes only where they pay for their start-up (seconds on 2 cores).
    drawn = common.ordered_map(
      _draw_pngs, [[e[3] for e in chunk] for chunk in chunks], processes=len(chunks) > 4
    )
    for chunk, pngs in zip(chunks, drawn):
      for (filename, label, patient, _), png in zip(chunk, pngs):
        yield (
          filename,
          {
            "image": png,
            "label": label,
            "patient_id": f"syn-{split}-{patient:04d}",
            "filename": filename,
            "source": "synthetic",
          },
        )


_CHUNK = 256  # Images drawn per task.


def _draw_pngs(arguments: list[tuple[str, int, int, int]]) -> list[bytes]:
  """PNG bytes of `draw_image(*a)` for each `a` (module level: runs in worker processes)."""
  # PIL's default zlib level (6), not the builders' fast 1: smaller files for 100k images.
  return [image_io.encode_png(Image.fromarray(draw_image(*a), mode="L"), 6) for a in arguments]

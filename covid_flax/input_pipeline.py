"""Input pipeline: TFDS array_record data source -> decoded, resized uint8 cache -> grain batches.

Images are decoded and resized once per run (the datasets are small) and kept as uint8. For
training the whole cache is placed on every device once (`device_cache`); grain then shuffles,
batches and shards *indices* per process, and the train step gathers its images on the device,
augments and normalises them there (`preprocess.augmented_batch`). The host moves a few bytes per
step.
"""

import contextlib
import dataclasses
import functools
import io
from concurrent import futures
from typing import Iterator, Mapping

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image, ImageOps
from sklearn import model_selection

import covid_flax.datasets  # noqa: F401  (registers the builders)
from covid_flax import config_lib, parallel
from covid_flax import ct_crop as ct_crop_lib
from covid_flax.datasets import common

# Text features that evaluations report results by (`covid_flax.subgroups`), where a dataset has them.
GROUP_FEATURES = ("source", "view", "finding")


@dataclasses.dataclass(frozen=True)
class SplitData:
  """A whole split in memory: images (N, S, S, 1) uint8 and their metadata; `attributes` holds
  the GROUP_FEATURES the dataset has, each an (N,) array of strings."""

  images: np.ndarray
  labels: np.ndarray
  patient_ids: np.ndarray
  filenames: np.ndarray
  attributes: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices: np.ndarray) -> "SplitData":
    arrays = (self.images, self.labels, self.patient_ids, self.filenames)
    attributes = {k: v[indices] for k, v in self.attributes.items()}
    return SplitData(*(a[indices] for a in arrays), attributes)


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the dataset's builder, preparing it into the TFDS data_dir on first use."""
  try:
    builder = tfds.builder(
      config.dataset, data_dir=config.data_dir or None, file_format="array_record"
    )
  except tfds.core.registered.DatasetNotFoundError as e:
    raise config_lib.ConfigError(f"config.dataset={config.dataset!r} is unknown: {e}") from e
  except ValueError as e:  # A known dataset with an unknown builder config ("covid_ct/foo").
    raise config_lib.ConfigError(f"config.dataset={config.dataset!r}: {e}") from e
  # Process 0 prepares first; the others then find it done (shared file system) or prepare their
  # own copy. Two preparations racing for one folder leave one of them failing on the rename.
  if jax.process_index() == 0:
    _prepare(builder, config)
  parallel.sync_processes(f"prepared {config.dataset}")
  _prepare(builder, config)
  return builder


def _prepare(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> None:
  if builder.is_prepared():
    return
  logging.info("Preparing %s into %s (once)", config.dataset, builder.data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=config.manual_dir or None)
  try:
    # TFDS prints "Downloading and preparing dataset Unknown size" even for a builder that
    # downloads nothing; its progress bars (stderr) stay.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=download_config)
  except OSError:
    if not builder.is_prepared():  # Not another process having finished it first.
      raise


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
) -> np.ndarray:
  """(H, W[, 1]) uint8 -> (size, size, 1) uint8, antialiased: the central `center_crop` of each
  side, stretched to a square (no padding, which would add borders that differ by source), its
  grey-level histogram equalised first if `equalize`, black outside `lung_field_mask` if
  `lung_mask`. With `ct_crop` the crop is `ct_crop.crop_to_lungs` instead (the equalisation, if
  any, over the body only)."""
  image = np.asarray(image).reshape(image.shape[0], image.shape[1])
  if ct_crop:
    image, equalize = ct_crop_lib.crop_to_lungs(image, equalize), False
  pil = Image.fromarray(image, mode="L")
  if center_crop < 1.0:
    w, h = pil.size
    dw, dh = round(w * (1 - center_crop) / 2), round(h * (1 - center_crop) / 2)
    pil = pil.crop((dw, dh, w - dw, h - dh))
  if equalize:
    pil = ImageOps.equalize(pil)
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
  )


def load_split(config: ml_collections.ConfigDict, split: str, *, num_threads: int = 4) -> SplitData:
  """Decodes and resizes every image of `split` once, in parallel threads (PIL drops the GIL)."""
  builder = get_builder(config)
  split_examples(builder, split)  # A clear error for a split the dataset does not have.
  source = tfds.data_source(
    config.dataset, split=split, data_dir=config.data_dir or None, download=False
  )
  n = len(source)
  if n == 0:
    raise common.DatasetError(f"split {split!r} of {config.dataset} is empty")

  def load(i: int):
    ex = source[i]
    return prepare_image(ex["image"], config), ex

  images = np.empty((n, config.image_size, config.image_size, 1), np.uint8)
  labels = np.empty((n,), np.int32)
  patients, filenames = [], []
  groups = [f for f in GROUP_FEATURES if f in builder.info.features]
  attributes = {f: [] for f in groups}
  with futures.ThreadPoolExecutor(num_threads) as pool:
    for i, (image, ex) in enumerate(pool.map(load, range(n))):
      images[i], labels[i] = image, ex["label"]
      patients.append(_text(ex["patient_id"]))
      filenames.append(_text(ex["filename"]))
      for f in groups:
        attributes[f].append(_text(ex[f]))
  attributes = {f: np.asarray(v, dtype=str) for f, v in attributes.items()}
  return SplitData(images, labels, np.asarray(patients), np.asarray(filenames), attributes)


def cv_fold_indices(data: SplitData, folds: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
  """(training indices, held-out indices) of fold `fold` of `folds`: patient-wise (a patient's
  images stay in one fold) and stratified by label, with a fixed shuffle, so every run, whatever
  its seed or recipe, is compared on the same folds."""
  splitter = model_selection.StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
  try:
    train_idx, eval_idx = list(splitter.split(data.labels, data.labels, data.patient_ids))[fold]
  except ValueError as e:  # Fewer patients (or of one class) than folds.
    raise config_lib.ConfigError(
      f"config.cv_folds={folds}: {len(np.unique(data.patient_ids))} patients cannot be split "
      f"into {folds} patient-wise folds ({e})"
    ) from e
  for name, idx in (("training", train_idx), ("held-out", eval_idx)):
    if len(np.unique(data.labels[idx])) < 2:
      raise config_lib.ConfigError(
        f"config.cv_folds={folds}: the {name} part of fold {fold} has one class only"
      )
  return train_idx, eval_idx


def load_train_and_eval(config: ml_collections.ConfigDict) -> tuple[SplitData, SplitData]:
  """The data a run trains on and the data it is validated on (and picks its 'best' checkpoint
  and its threshold by): config.train_split and config.eval_split, or with config.cv_folds = K,
  config.train_split without its patient-wise fold config.cv_fold, and that fold."""
  train = load_split(config, config.train_split)
  if not config.cv_folds:
    return train, load_split(config, config.eval_split)
  train_idx, eval_idx = cv_fold_indices(train, config.cv_folds, config.cv_fold)
  return train.subset(train_idx), train.subset(eval_idx)


def load_eval(config: ml_collections.ConfigDict) -> SplitData:
  """The validation half of `load_train_and_eval`, without decoding the training split if it can."""
  if not config.cv_folds:
    return load_split(config, config.eval_split)
  return load_train_and_eval(config)[1]


def eval_name(config: ml_collections.ConfigDict) -> str:
  """What a run validates on, for logs and reports: 'val' or 'train+val fold 2 of 5'."""
  if config.cv_folds:
    return f"{config.train_split} fold {config.cv_fold} of {config.cv_folds}"
  return config.eval_split


def eval_is_held_out(config: ml_collections.ConfigDict) -> bool:
  """Whether the run's validation data is disjoint from what it trains on (a cross-validation
  fold always is; a final fit on train+val validating on val is not)."""
  if config.cv_folds:
    return True
  return not count_shared_examples(config, config.train_split, config.eval_split)


def count_trained_on(config: ml_collections.ConfigDict, split: str) -> int:
  """How many examples of `split` the run trained on."""
  shared = count_shared_examples(config, config.train_split, split)
  if not shared or not config.cv_folds:
    return shared
  trained = set(load_train_and_eval(config)[0].filenames.tolist())
  return sum(f in trained for f in load_split(config, split).filenames.tolist())


def split_examples(builder: tfds.core.DatasetBuilder, split: str) -> set[tuple[str, int]]:
  """(split name, index) of every example that `split` reads: TFDS split strings such as 'train',
  'train+val' (a final fit on both) or 'train[:80%]'."""
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  except (ValueError, KeyError) as e:
    raise config_lib.ConfigError(
      f"split {split!r} (config.train_split, config.eval_split or --split) is not a split of "
      f"{builder.name}; it has {sorted(builder.info.splits)} ({e})"
    ) from e
  examples = set()
  for part in instructions:
    indices = range(builder.info.splits[part.splitname].num_examples)[part.from_ : part.to]
    examples.update((part.splitname, i) for i in indices)
  return examples


def count_shared_examples(config: ml_collections.ConfigDict, split_a: str, split_b: str) -> int:
  """How many examples of the dataset both splits read (e.g. 'val' and 'train+val': all of val)."""
  builder = get_builder(config)
  return len(split_examples(builder, split_a) & split_examples(builder, split_b))


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _process_slice(global_batch_size: int) -> slice:
  local = global_batch_size // jax.process_count()
  return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def device_cache(mesh: jax.sharding.Mesh, data: SplitData) -> jax.Array:
  """All images of `data`, uint8, replicated on every device of the mesh (every process holds
  the same cache, so this works across hosts)."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.make_array_from_callback(data.images.shape, sharding, lambda index: data.images[index])


def train_dataset(data: SplitData, global_batch_size: int, seed: int) -> grain.MapDataset:
  """Endless batches of this process's rows of each global batch, as indices into the device cache
  plus labels. Epoch e is a permutation seeded by (seed, e), cut into len(data) // batch batches
  (the remainder is dropped); every process computes the same ones. Element i is step i's batch, so
  the iterator state is just the step: a resumed run sees exactly the batches it would have seen.
  One grain element per batch, not per image: grain's per-element cost stays off the step."""
  rows = _process_slice(global_batch_size)
  per_epoch = len(data) // global_batch_size
  if per_epoch == 0:
    raise common.DatasetError(
      f"{len(data)} training examples cannot fill one global batch of {global_batch_size}"
    )

  @functools.lru_cache(maxsize=2)
  def permutation(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(len(data))

  def batch(step: int) -> dict[str, np.ndarray]:
    epoch, k = divmod(int(step), per_epoch)
    idx = permutation(epoch)[k * global_batch_size : (k + 1) * global_batch_size]
    idx = idx[rows].astype(np.int32)
    return {"index": idx, "label": data.labels[idx]}

  return grain.MapDataset.range(2**62).map(batch)


def train_iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
  """An iterator with `get_state()`/`set_state()`, prefetching in a background thread."""
  read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
  return iter(dataset.to_iter_dataset(read_options))


def eval_batches(
  data: SplitData, global_batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """(each whole global batch, its real-row mask), in order; the last batch is padded. Every
  process holds the split and yields the same batches (for `parallel.global_batch_from_whole`), so
  outputs come back in this order on any mesh and the mask needs no communication."""
  n = len(data)
  for start in range(0, n, global_batch_size):
    global_idx = np.arange(start, start + global_batch_size)
    idx = np.where(global_idx < n, global_idx, 0)
    yield {"image": data.images[idx], "label": data.labels[idx]}, global_idx < n

"""Input pipeline: TFDS array_record data source -> decoded, resized uint8 images -> grain batches.

Two modes (`config.input_mode`, `resolve_input_mode`), the same batches in both:
  * cache: every image of a split is decoded and resized once per run and kept as uint8; the
    training set is placed whole on every device (`device_cache`), grain shuffles, batches and
    shards *indices* per process, and the train step gathers its images on the device. The host
    moves a few bytes per step; memory is O(dataset) on the host and on every device.
  * stream: a split is `LazyImages` (decoded and resized when indexed); grain's background threads
    read, for each step, only this process's rows of the global batch and hand uint8 images to the
    step. Memory is O(batch); every epoch decodes again.
Augmentation and normalisation happen on the device in both (`preprocess.augmented_batch`).
"""

import contextlib
import dataclasses
import functools
import io
import os
from concurrent import futures
from typing import Iterator, Mapping

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from sklearn import model_selection

import covid_flax.datasets  # noqa: F401  (registers the builders)
from covid_flax import config_lib, image_prep, parallel
from covid_flax.datasets import common

# Text features that evaluations report results by (`covid_flax.subgroups`), where a dataset has them.
GROUP_FEATURES = ("source", "view", "finding")


@dataclasses.dataclass(frozen=True)
class SplitData:
  """A split: images (N, S, S, 1) uint8, in memory (cache mode) or `LazyImages` (stream mode), and
  their metadata in memory; `attributes` holds the GROUP_FEATURES the dataset has, each an (N,)
  array of strings. A streamed split loaded without metadata (a training split: its labels come
  with each batch) has None for labels, patient_ids and filenames, so that starting does not read
  every record."""

  images: "np.ndarray | image_prep.LazyImages"
  labels: np.ndarray | None
  patient_ids: np.ndarray | None
  filenames: np.ndarray | None
  attributes: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.images)

  @property
  def streamed(self) -> bool:
    return isinstance(self.images, image_prep.LazyImages)

  def subset(self, indices: np.ndarray) -> "SplitData":
    images = self.images.subset(indices) if self.streamed else self.images[indices]
    arrays = (self.labels, self.patient_ids, self.filenames)
    attributes = {k: v[indices] for k, v in self.attributes.items()}
    return SplitData(images, *(None if a is None else a[indices] for a in arrays), attributes)


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


def load_split(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  stream: bool = False,
  metadata: bool = True,
  num_threads: int = 4,
) -> SplitData:
  """`split`'s metadata, and its images: decoded and resized once, in parallel threads (PIL drops
  the GIL), or with `stream` as `LazyImages` (the metadata pass then skips image decoding, and
  with `metadata=False` does not happen: O(1) start whatever the split's size)."""
  builder = get_builder(config)
  split_examples(builder, split)  # A clear error for a split the dataset does not have.
  kwargs = dict(split=split, data_dir=config.data_dir or None, download=False)
  source = tfds.data_source(config.dataset, **kwargs)
  n = len(source)
  if n == 0:
    raise common.DatasetError(f"split {split!r} of {config.dataset} is empty")
  if stream and not metadata:
    return SplitData(image_prep.LazyImages(source, np.arange(n), config), None, None, None)
  if stream:
    reader = tfds.data_source(
      config.dataset, decoders={"image": tfds.decode.SkipDecoding()}, **kwargs
    )

  def load(i: int) -> tuple[np.ndarray | None, dict]:
    if stream:
      return None, reader[i]
    example = source[i]
    return image_prep.decode(example["image"], config), example

  images = None if stream else np.empty((n, config.image_size, config.image_size, 1), np.uint8)
  labels = np.empty((n,), np.int32)
  patients, filenames = [], []
  groups = [f for f in GROUP_FEATURES if f in builder.info.features]
  attributes = {f: [] for f in groups}
  with futures.ThreadPoolExecutor(num_threads) as pool:
    for i, (image, ex) in enumerate(pool.map(load, range(n))):
      if images is not None:
        images[i] = image
      labels[i] = ex["label"]
      patients.append(_text(ex["patient_id"]))
      filenames.append(_text(ex["filename"]))
      for f in groups:
        attributes[f].append(_text(ex[f]))
  attributes = {f: np.asarray(v, dtype=str) for f, v in attributes.items()}
  if stream:
    images = image_prep.LazyImages(source, np.arange(n), config)
  return SplitData(images, labels, np.asarray(patients), np.asarray(filenames), attributes)


# Cache mode when the training set takes at most this share of the smallest device's memory and
# (with its host copy, and on CPU the devices' copies) of the host's available memory.
CACHE_MEMORY_SHARE = 0.5


def _host_available_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_input_mode(config: ml_collections.ConfigDict, split: str | None = None) -> str:
  """'cache' or 'stream' for `split` (default: the training split): `config.input_mode`, or for
  'auto' the memory rule above, decided by process 0 for all (all must run the same step)."""
  if config.input_mode != "auto":
    return config.input_mode
  builder = get_builder(config)
  n = len(split_examples(builder, split or config.train_split))
  cache_bytes = n * config.image_size**2
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
  on_host = jax.local_devices()[0].platform == "cpu" or not all(limits)
  host_need = cache_bytes * (1 + jax.local_device_count() * on_host)
  host_available = _host_available_bytes()
  host_ok = host_need <= CACHE_MEMORY_SHARE * host_available
  device_ok = on_host or cache_bytes <= CACHE_MEMORY_SHARE * min(limits)
  stream = not (host_ok and device_ok)
  if jax.process_count() > 1:
    stream = bool(multihost_utils.broadcast_one_to_all(np.int32(stream)))
  mode = "stream" if stream else "cache"
  logging.info(
    "input_mode=auto -> %s: the %d images of %s take %.2f GB as a cache (x%d devices); "
    "host needs %.2f GB of %.2f GB available, smallest device %s (share %.1f)",
    mode, n, split or config.train_split, cache_bytes / 1e9, jax.local_device_count(),
    host_need / 1e9, host_available / 1e9,
    "is the host" if on_host else f"has {min(limits) / 1e9:.2f} GB", CACHE_MEMORY_SHARE,
  )  # fmt: skip
  return mode


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


def load_train_and_eval(
  config: ml_collections.ConfigDict, stream: bool = False
) -> tuple[SplitData, SplitData]:
  """The data a run trains on and the data it is validated on (and picks its 'best' checkpoint
  and its threshold by): config.train_split and config.eval_split, or with config.cv_folds = K,
  config.train_split without its patient-wise fold config.cv_fold, and that fold."""
  # Streamed, the training split's metadata is read only where folds or sources need it.
  need = not stream or bool(config.cv_folds) or bool(config.train_sources)
  train = load_split(config, config.train_split, stream=stream, metadata=need)
  if not config.cv_folds:
    return keep_sources(train, config), load_split(config, config.eval_split, stream=stream)
  train_idx, eval_idx = cv_fold_indices(train, config.cv_folds, config.cv_fold)
  return keep_sources(train.subset(train_idx), config), train.subset(eval_idx)


def keep_sources(data: SplitData, config: ml_collections.ConfigDict) -> SplitData:
  """`data` without the examples whose `source` is not in config.train_sources (comma-separated;
  '' keeps all). For training only: what a run validates and is tested on stays whole."""
  if not config.train_sources:
    return data
  wanted = [s.strip() for s in config.train_sources.split(",")]
  if "source" not in data.attributes:
    raise config_lib.ConfigError(
      f"config.train_sources={config.train_sources!r}: {config.dataset} records no `source` "
      "for its examples; use '' (all)"
    )
  present = set(data.attributes["source"].tolist())
  unknown = sorted(set(wanted) - present)
  if unknown:
    raise config_lib.ConfigError(
      f"config.train_sources={config.train_sources!r}: no training example of {config.dataset} "
      f"has source {unknown}; its sources are {sorted(present)}"
    )
  kept = data.subset(np.flatnonzero(np.isin(data.attributes["source"], wanted)))
  if len(np.unique(kept.labels)) < 2:
    raise config_lib.ConfigError(
      f"config.train_sources={config.train_sources!r} leaves one class only in {config.train_split}"
    )
  return kept


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
  if not shared or not (config.cv_folds or config.train_sources):
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
  """Endless batches of this process's rows of each global batch: indices into the device cache
  and labels, or (stream mode) the decoded images and labels. Epoch e is a permutation seeded by
  (seed, e), cut into len(data) // batch batches (the remainder is dropped); every process
  computes the same ones. Element i is step i's batch, so the iterator state is just the step: a
  resumed run sees exactly the batches it would have seen. One grain element per batch, not per
  image: grain's per-element cost stays off the step."""
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
    if data.streamed:
      images, labels = data.images.examples(idx)
      return {"image": images, "label": labels}
    return {"index": idx, "label": data.labels[idx]}

  return grain.MapDataset.range(2**62).map(batch)


def train_iterator(dataset: grain.MapDataset, streamed: bool = False) -> grain.DatasetIterator:
  """An iterator with `get_state()`/`set_state()`, computing batches ahead in background threads:
  one for index batches; for streamed batches one per core (each decodes a whole batch; PIL drops
  the GIL), with 2 batches per thread in flight."""
  threads = (os.cpu_count() or 1) if streamed else 1
  read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(4, 2 * threads))
  return iter(dataset.to_iter_dataset(read_options))


def eval_batches(
  data: SplitData, global_batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """(each global batch, its real-row mask), in order; the last batch is padded. In cache mode
  every process yields the whole global batch (for `parallel.global_batch_from_whole`); streamed,
  only its own rows (for `parallel.global_batch`), decoded 2 batches ahead in threads. Either way
  outputs come back in this order on any mesh and the mask is global and needs no communication."""
  n = len(data)
  rows = _process_slice(global_batch_size) if data.streamed else slice(None)

  def batch(start: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    global_idx = np.arange(start, start + global_batch_size)
    idx = np.where(global_idx < n, global_idx, 0)[rows]
    return {"image": data.images[idx], "label": data.labels[idx]}, global_idx < n

  starts = range(0, n, global_batch_size)
  yield from common.ordered_map(batch, starts, workers=2) if data.streamed else map(batch, starts)

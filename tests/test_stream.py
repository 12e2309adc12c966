"""Stream mode (config.input_mode=stream): the same batches and parameters as cache mode, O(batch)
decoding, each process reading only its own rows, and the auto rule."""

import logging
import re

import jax
import numpy as np
import pytest
from helpers import tiny_config

from covid_flax import image_prep, input_pipeline, train


@pytest.fixture(scope="module")
def both(synthetic_data_dir):
  config = tiny_config(synthetic_data_dir)
  cached = input_pipeline.load_split(config, "val")
  before = image_prep.decode_count()
  streamed = input_pipeline.load_split(config, "val", stream=True)
  assert image_prep.decode_count() == before  # Metadata only: no image decoded up front.
  return config, cached, streamed


def test_lazy_images_index_like_the_cached_array(both):
  _, cached, streamed = both
  assert streamed.streamed and not cached.streamed
  assert streamed.images.shape == cached.images.shape and len(streamed.images) == len(cached)
  for name in ("labels", "patient_ids", "filenames"):
    np.testing.assert_array_equal(getattr(streamed, name), getattr(cached, name))
  idx = np.array([5, 0, 17, 5])
  np.testing.assert_array_equal(streamed.images[idx], cached.images[idx])
  np.testing.assert_array_equal(streamed.images[3], cached.images[3])
  np.testing.assert_array_equal(streamed.images[2:6], cached.images[2:6])
  np.testing.assert_array_equal(streamed.images[idx, ..., 0], cached.images[idx, ..., 0])
  sub = np.array([9, 4, 1])
  np.testing.assert_array_equal(streamed.subset(sub).images[[2, 0]], cached.images[sub][[2, 0]])
  before = image_prep.decode_count()
  streamed.images[np.array([7, 7, 7, 3])]  # Eval padding repeats an index: decoded once.
  assert image_prep.decode_count() - before == 2


def test_a_streamed_training_split_starts_without_reading_its_records(both, monkeypatch):
  config, cached, _ = both
  reads = []
  original = input_pipeline.tfds.data_source

  def counting_source(*args, **kwargs):
    source = original(*args, **kwargs)
    getitem = source.__class__.__getitem__
    monkeypatch.setattr(
      source.__class__, "__getitem__", lambda s, i: (reads.append(i), getitem(s, i))[1]
    )
    return source

  monkeypatch.setattr(input_pipeline.tfds, "data_source", counting_source)
  lazy = input_pipeline.load_split(config, "val", stream=True, metadata=False)
  assert reads == [] and len(lazy) == len(cached) and lazy.labels is None
  batch = input_pipeline.train_dataset(lazy, 16, seed=3)[0]
  expected = input_pipeline.train_dataset(cached, 16, seed=3)[0]
  np.testing.assert_array_equal(batch["label"], expected["label"])
  np.testing.assert_array_equal(batch["image"], cached.images[expected["index"]])
  assert len(reads) == 16  # One record per image of the batch, labels included.


def test_stream_batches_equal_cache_batches(both):
  _, cached, streamed = both
  by_cache = input_pipeline.train_dataset(cached, 16, seed=3)
  by_stream = input_pipeline.train_dataset(streamed, 16, seed=3)
  for step in (0, 1, len(cached) // 16 + 2):  # Into the second epoch.
    a, b = by_cache[step], by_stream[step]
    np.testing.assert_array_equal(b["label"], a["label"])
    np.testing.assert_array_equal(b["image"], cached.images[a["index"]])
  eval_cached = list(input_pipeline.eval_batches(cached, 32))
  eval_streamed = list(input_pipeline.eval_batches(streamed, 32))
  assert len(eval_cached) == len(eval_streamed)
  for (a, mask_a), (b, mask_b) in zip(eval_cached, eval_streamed):
    np.testing.assert_array_equal(mask_a, mask_b)
    np.testing.assert_array_equal(a["image"], b["image"])


def test_each_process_decodes_only_its_rows(both, monkeypatch):
  _, cached, streamed = both
  decoded = {}
  original = image_prep.LazyImages.examples

  def record(self, key):
    examples = self._indices[np.atleast_1d(key)].tolist()
    decoded.setdefault(jax.process_index(), []).extend(examples)
    return original(self, key)

  monkeypatch.setattr(image_prep.LazyImages, "examples", record)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  global_batches = []
  for process in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    dataset = input_pipeline.train_dataset(streamed, 16, seed=0)
    global_batches.append([dataset[step]["image"] for step in range(3)])
  assert len(decoded[0]) == len(decoded[1]) == 3 * 8
  assert not set(decoded[0]) & set(decoded[1])  # Disjoint examples.
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  whole = input_pipeline.train_dataset(cached, 16, seed=0)
  for step in range(3):  # Process 0's rows, then process 1's: the global batch.
    joined = np.concatenate([global_batches[0][step], global_batches[1][step]])
    np.testing.assert_array_equal(joined, cached.images[whole[step]["index"]])


def test_auto_streams_when_the_cache_does_not_fit(synthetic_data_dir, monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  config = tiny_config(synthetic_data_dir, input_mode="auto")
  assert input_pipeline.resolve_input_mode(config) == "cache"
  assert "input_mode=auto -> cache" in caplog.text
  # 618 images of 48 x 48 bytes, x (1 host copy + 8 CPU devices): 12.8 MB.
  monkeypatch.setattr(input_pipeline, "_host_available_bytes", lambda: 20_000_000)
  assert input_pipeline.resolve_input_mode(config) == "stream"
  assert re.search(r"input_mode=auto -> stream: the 618 images of train", caplog.text)
  for mode in ("cache", "stream"):
    assert (
      input_pipeline.resolve_input_mode(tiny_config(synthetic_data_dir, input_mode=mode)) == mode
    )


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [dict(augment=True), dict(augment=True, mixup_alpha=0.4)])
def test_stream_trains_the_same_parameters_as_cache(synthetic_data_dir, tmp_path, recipe):
  """On 8 fake devices: the same batches, augmentation keys and mixing partners, so the same
  parameters, bit for bit."""
  params = {}
  for mode in ("cache", "stream"):
    config = tiny_config(synthetic_data_dir, input_mode=mode, num_epochs=1, **recipe)
    state = train.train_and_evaluate(config, str(tmp_path / mode))
    params[mode] = jax.device_get(state.params)
  leaves = [jax.tree.leaves(params[m]) for m in ("cache", "stream")]
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))

"""What tests share besides fixtures (those are in conftest.py): configs, images, checks."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data_dir: str, **overrides):
  """configs/synthetic.py shrunk for tests: tiny model, small images, 2 epochs, no augmentation."""
  from configs import synthetic

  config = synthetic.get_config()
  config.data_dir = data_dir
  config.model = "tiny_cnn"
  config.image_size = 48
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 2
  config.learning_rate = 1e-2
  config.warmup_epochs = 0.2
  config.augment = False
  config.progress_bar = False
  for key, value in overrides.items():
    config[key] = value
  return config


@contextlib.contextmanager
def fill_disk(disk: Path):
  """Fills `disk` to the last byte for the duration of the block."""
  filler = disk / "filler"
  fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
  try:
    while os.write(fd, b"\0" * 4096):
      pass
  except OSError:
    pass
  finally:
    os.close(fd)
  try:
    yield
  finally:
    os.remove(filler)


def smooth_image(seed: int, size=(64, 48)):
  """A random low-frequency 'L' image: hashes are stable under rescaling, distinct per seed."""
  import numpy as np
  from PIL import Image

  small = np.random.default_rng(seed).integers(0, 256, (6, 8), dtype=np.uint8)
  return Image.fromarray(small, "L").resize(size, Image.Resampling.BICUBIC)


def assert_nothing_prepared(data_dir: Path, dataset: str, config: str | None = None) -> None:
  """No prepared (or half-prepared) copy of `dataset` in data_dir, and TFDS agrees."""
  import tensorflow_datasets as tfds

  assert not list(data_dir.glob(f"{dataset}/{config or '*'}/*.*.*"))
  assert not list(data_dir.glob(f"{dataset}/*/incomplete*"))
  name = f"{dataset}/{config}" if config else dataset
  assert not tfds.builder(name, data_dir=data_dir).is_prepared()
  with pytest.raises(KeyError, match="has not been generated"):
    tfds.data_source(name, split="train", data_dir=data_dir, download=False)


def data_mesh(n: int):
  """A 1-D `data` mesh over the first n (fake CPU) devices."""
  import jax
  import numpy as np

  from covid_flax import parallel

  return jax.sharding.Mesh(np.array(jax.devices()[:n]), (parallel.DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))  # fmt: skip


def kill_when_saved(cmd: list[str], checkpoint: Path, env: dict) -> None:
  """Runs `cmd` (from the repository root) and kills it with SIGKILL as soon as `checkpoint`
  exists: a crash right after a save, before the run could end."""
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)  # fmt: skip
  deadline = time.time() + 300
  while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert checkpoint.exists(), "killed before the checkpoint: the rerun would not resume"

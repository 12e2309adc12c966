"""Test setup: 8 fake CPU devices (set before JAX is imported), no network, shared fixtures."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("COVID_FLAX_NO_DOWNLOAD", "1")  # Builders never probe the network in tests.

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))  # For `import configs`.

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain reads absl flags.


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


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with covid_synthetic/cxr prepared once per test session."""
  from covid_flax import input_pipeline

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_builder(tiny_config(data_dir))
  return data_dir


@pytest.fixture
def small_disk(tmp_path) -> Path:
  """A 3 MiB tmpfs (needs root, as in CI); skipped where mounting is not allowed."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                    capture_output=True).returncode != 0:  # fmt: skip
    pytest.skip("cannot mount a small tmpfs here (needs root) to simulate a full disk")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


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

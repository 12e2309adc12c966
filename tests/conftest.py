"""Test setup: 8 fake CPU devices (set before JAX is imported), no network, shared fixtures."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("COVID_FLAX_NO_DOWNLOAD", "1")  # Builders never probe the network in tests.
# One persistent compilation cache for this test session and the processes its tests start: the
# many runs of the same tiny configurations (train, kill, resume) compile each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="covid_flax_test_jit_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))  # For `import configs`.

from covid_flax import cpu_defaults  # noqa: E402  (starts no JAX backend)

cpu_defaults.apply()  # As the entry points do.
if cpu_defaults._glibc_tunable():  # Entry points run by tests start with the settings that a
  os.environ["GLIBC_TUNABLES"] = cpu_defaults.MALLOC_TUNABLES  # restart would give them.

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

from helpers import tiny_config  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "slow: end-to-end (trains, starts processes); pytest -m 'not slow' skips them"
  )


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

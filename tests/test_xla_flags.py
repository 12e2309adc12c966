"""The XLA:CPU flags are set by entry points, not by importing the package."""

import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from covid_flax import cpu_conv, xla_flags

pytestmark = pytest.mark.slow  # Trains or starts processes (README: the unit-only run skips it).

# Entry points define clashing absl flags: one process per group.
MODULES = [("main", "pretrain", "cross_validate", "train", "input_pipeline", "preprocess",
            "inference", "ct_crop", "models", "simclr", "gradcam"), ("evaluate",), ("predict",)]  # fmt: skip


@pytest.mark.parametrize("modules", MODULES, ids=lambda m: m[0])
def test_importing_the_package_starts_no_backend_and_sets_no_flags(modules):
  code = (
    "import os; os.environ.pop('XLA_FLAGS', None)\n"
    + "".join(f"import covid_flax.{m}\n" for m in modules)
    + "from jax._src import xla_bridge\n"
    "print(bool(xla_bridge._backends), repr(os.environ.get('XLA_FLAGS')))\n"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                       text=True, check=True).stdout.split()  # fmt: skip
  assert out == ["False", "None"]  # So an entry point can still set XLA_FLAGS at its start.


def test_cpu_defaults_are_added_unless_named_or_turned_off(monkeypatch):
  monkeypatch.setattr(cpu_conv, "unavailable_reason", lambda: "no compiler")  # XLA's convolutions.
  flag = xla_flags.CPU_XLA_FLAGS[0]
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  xla_flags.use_cpu_defaults()
  assert xla_flags.os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {flag}"
  monkeypatch.setenv("XLA_FLAGS", flag.split("=")[0] + "=none")
  xla_flags.use_cpu_defaults()
  assert xla_flags.os.environ["XLA_FLAGS"] == flag.split("=")[0] + "=none"  # Named there: it wins.
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("COVID_FLAX_XLA_DEFAULTS", "0")
  xla_flags.use_cpu_defaults()
  assert xla_flags.os.environ["XLA_FLAGS"] == ""


def test_no_cpu_defaults_when_the_convolutions_run_on_onednn(monkeypatch):
  monkeypatch.setattr(cpu_conv, "unavailable_reason", lambda: None)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  xla_flags.use_cpu_defaults()
  assert xla_flags.os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"

"""The CPU process settings: set by entry points, not by importing the package."""

import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from covid_flax import cpu_conv, cpu_defaults

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
  flag = cpu_defaults.CPU_XLA_FLAGS[0]
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  cpu_defaults.apply()
  assert cpu_defaults.os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {flag}"
  monkeypatch.setenv("XLA_FLAGS", flag.split("=")[0] + "=none")
  cpu_defaults.apply()
  # Named there: it wins.
  assert cpu_defaults.os.environ["XLA_FLAGS"] == flag.split("=")[0] + "=none"
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("COVID_FLAX_CPU_DEFAULTS", "0")
  cpu_defaults.apply()
  assert cpu_defaults.os.environ["XLA_FLAGS"] == ""


def test_no_cpu_defaults_when_the_convolutions_run_on_onednn(monkeypatch):
  monkeypatch.setattr(cpu_conv, "unavailable_reason", lambda: None)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  cpu_defaults.apply()
  assert cpu_defaults.os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


# Touches a 256 MB block, frees it, and counts the page faults of touching a new one.
_REFAULT = """
import ctypes, resource, sys
sys.path.insert(0, {root!r})
from covid_flax import cpu_defaults
tuned = cpu_defaults._tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def touch():
  block = libc.malloc(256 << 20)
  ctypes.memset(block, 1, 256 << 20)
  libc.free(ctypes.c_void_p(block))
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_malloc_settings_keep_freed_memory_mapped_unless_the_environment_tunes_malloc():
  def run(**env):
    code = _REFAULT.format(root=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", **env}).stdout.split()  # fmt: skip
    return out[0] == "True", int(out[1])

  tuned, faults = run()
  assert tuned and faults < 1000, faults  # The second block reuses the first one's pages.
  tuned, faults = run(MALLOC_ARENA_MAX="2")  # The user's setting wins: glibc's defaults stay.
  assert not tuned and faults > 30_000, faults  # 65,536 pages of 4 KiB, mapped afresh.


# As a training entry point's __main__ block: restarts itself with the tunables where huge pages
# come on request, then touches a 64 MiB block and reports the huge pages it got.
_RESTART = """
import ctypes, os, sys
sys.path.insert(0, {root!r})
from covid_flax import cpu_defaults
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
cpu_defaults.apply(restart=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
ctypes.memset(libc.malloc(64 << 20), 1, 64 << 20)
huge = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup")
            if line.startswith("AnonHugePages"))
print("end", os.getpid(), os.environ.get("GLIBC_TUNABLES"), huge)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tunables")
def test_training_entry_points_restart_with_malloc_tunables_once_unless_the_user_tunes_malloc():
  def run(**env):
    code = _RESTART.format(root=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", **env}).stdout  # fmt: skip
    return [line.split() for line in out.splitlines()]

  lines = run()
  pid = lines[0][1]
  if not cpu_defaults._huge_pages_on_request():
    assert lines == [["start", pid, "None"], ["end", pid, "None", lines[1][3]]]  # mallopt only.
    pytest.skip("transparent huge pages are not 'madvise' here: no restart (checked)")
  tunables = cpu_defaults.MALLOC_TUNABLES
  assert lines[:2] == [["start", pid, "None"], ["start", pid, tunables]]  # exec: the same process.
  assert lines[2][:3] == ["end", pid, tunables]
  assert int(lines[2][3]) >= 2048, lines  # kB on 2 MiB pages: glibc asked for huge pages.
  user = run(MALLOC_ARENA_MAX="2")
  assert [line[0] for line in user] == ["start", "end"] and user[1][2] == "None"
  assert int(user[1][3]) == 0, user  # Nothing asked for huge pages.


def test_a_failed_restart_falls_back_to_mallopt(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setattr(cpu_defaults, "_huge_pages_on_request", lambda: True)
  monkeypatch.setattr(cpu_defaults, "_glibc_tunable", lambda: True)
  calls = []

  def no_exec(*args):
    calls.append("exec")
    raise OSError("no interpreter")

  monkeypatch.setattr(cpu_defaults.os, "execve", no_exec)
  monkeypatch.setattr(cpu_defaults, "_tune_malloc", lambda: calls.append("mallopt"))
  cpu_defaults.apply(restart=True)
  assert calls == ["exec", "mallopt"]
  calls.clear()
  cpu_defaults.apply()  # Without restart (evaluate, predict): mallopt only.
  assert calls == ["mallopt"]

"""Process settings measured to speed up this codebase's train steps on CPU (`scripts/benchmark.py`;
the numbers are in docs/performance.md): an XLA flag for XLA's own convolutions, and glibc malloc
settings that keep XLA's per-step buffers mapped, on huge pages where the kernel gives them on
request. Each entry point applies them where the program starts, before JAX creates a backend (its
first computation), never as a side effect of an import; COVID_FLAX_CPU_DEFAULTS=0 turns them off."""

import ctypes
import os
import sys
from pathlib import Path

# Faster convolutions on XLA, but with oneDNN's (covid_flax/cpu_conv, the default) the same flag
# slows the step: seed CNN 128² float32 41.8 -> 40.5 img/s, bfloat16 57.2 -> 49.0 (AMD EPYC).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)

# XLA:CPU allocates each step's temporaries (541 MB for the seed CNN at 128², batch 32) and frees
# them after it: glibc serves that from fresh mmaps, so every step page-faults 130 k pages in again.
# One arena, no mmap below 1 GiB and no trimming keep such blocks mapped and reused: seed CNN 128²
# float32 43.7 -> 53.0 img/s, page faults 2.06 M -> 0.43 M a run (AMD EPYC). Blocks past 1 GiB are
# mapped afresh as before: reusing the seed CNN's at 224² from the one heap fragmented it (peak RSS
# 2.8 -> 6.2 GB, 14.2 -> 11-12 img/s). Tunable name: (mallopt parameter from glibc's malloc.h, value).
_MALLOC = {"arena_max": (-8, 1), "mmap_threshold": (-3, 1 << 30), "trim_threshold": (-1, 2**31 - 1)}
MALLOC_SETTINGS = tuple(_MALLOC.values())
# The same settings as glibc tunables, plus huge pages for malloc's memory where the kernel's
# transparent huge pages are "madvise" (as on this project's machines): glibc reads tunables only
# when a process starts, so a training entry point restarts itself with them (exec, same pid; costs
# its imports again, ~3 s). The 224² seed CNN step's >1 GiB block is mmapped afresh each step; on
# 2 MiB pages bfloat16 trains 20.5 -> 26-27 img/s (AMD EPYC; docs/performance.md).
MALLOC_TUNABLES = ":".join(
  [f"glibc.malloc.{name}={value}" for name, (_, value) in _MALLOC.items()]
  + ["glibc.malloc.hugetlb=1"]
)
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def apply(restart: bool = False) -> None:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS where the convolutions will run on XLA (the oneDNN kernel
  cannot be built or loaded here; with --config.cpu_conv=xla, add them to XLA_FLAGS yourself),
  except those XLA_FLAGS already names (a flag given there wins), and tunes malloc where the C
  library is glibc and the environment sets no MALLOC_* variable or GLIBC_TUNABLES: with `restart`
  (training entry points, from their `__main__` block) and huge pages on request, by exec'ing the
  same command again with GLIBC_TUNABLES=MALLOC_TUNABLES; otherwise MALLOC_SETTINGS by mallopt."""
  if os.environ.get("COVID_FLAX_CPU_DEFAULTS", "1") == "0":
    return
  if restart and _huge_pages_on_request() and _glibc_tunable():
    sys.stdout.flush()
    sys.stderr.flush()
    try:
      os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES})  # fmt: skip
    except OSError:  # No interpreter to exec (embedded Python): mallopt below instead.
      pass
  _tune_malloc()
  from covid_flax import cpu_conv  # Builds the kernel if needed; starts no backend.

  if cpu_conv.unavailable_reason() is None:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  missing = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
  if missing:
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


def _glibc_tunable() -> bool:
  """Whether the C library is glibc and the user's environment leaves its malloc alone."""
  if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
    return False
  try:
    return bool(os.confstr("CS_GNU_LIBC_VERSION"))
  except (ValueError, OSError):  # Not glibc (macOS, musl).
    return False


def _huge_pages_on_request() -> bool:
  """Whether transparent huge pages are "madvise" and glibc >= 2.35: glibc.malloc.hugetlb=1 then
  asks for them (with "always" every process has them already; with "never" none)."""
  try:
    version = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
    major, minor = (int(x) for x in version.split()[-1].split(".")[:2])
    return (major, minor) >= (2, 35) and "[madvise]" in Path(_THP_MODE).read_text()
  except (ValueError, OSError, IndexError):
    return False


def _tune_malloc() -> bool:
  """MALLOC_SETTINGS through mallopt; False where not glibc or the user's environment tunes it."""
  if not _glibc_tunable():
    return False
  mallopt = ctypes.CDLL(None).mallopt
  return all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS)

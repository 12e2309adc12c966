"""XLA:CPU flags measured to speed up this codebase's train steps (`scripts/benchmark.py`; the
numbers are in docs/performance.md): YNNPACK's dot fusion. They only touch the CPU backend. Each entry point sets them where the program starts, before JAX creates a backend (its
first computation), never as a side effect of an import."""

import os

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)


def use_cpu_defaults() -> None:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS, except those XLA_FLAGS already names (a flag given there
  wins); COVID_FLAX_XLA_DEFAULTS=0 turns this off."""
  if os.environ.get("COVID_FLAX_XLA_DEFAULTS", "1") == "0":
    return
  flags = os.environ.get("XLA_FLAGS", "")
  missing = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
  if missing:
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()

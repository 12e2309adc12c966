"""XLA:CPU flags measured to speed up this codebase's train steps (`scripts/benchmark.py`; the
numbers are in docs/performance.md): YNNPACK's dot fusion, for XLA's own convolutions. They only
touch the CPU backend. Each entry point sets them where the program starts, before JAX creates a
backend (its first computation), never as a side effect of an import."""

import os

# Faster convolutions on XLA, but with oneDNN's (covid_flax/cpu_conv, the default) the same flag
# slows the step: seed CNN 128² float32 41.8 -> 40.5 img/s, bfloat16 57.2 -> 49.0 (AMD EPYC).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)


def use_cpu_defaults() -> None:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS where the convolutions will run on XLA (the oneDNN kernel
  cannot be built or loaded here; with --config.cpu_conv=xla, add them to XLA_FLAGS yourself),
  except those XLA_FLAGS already names (a flag given there wins); COVID_FLAX_XLA_DEFAULTS=0 turns
  this off."""
  from covid_flax import cpu_conv  # Builds the kernel if needed; starts no backend.

  if os.environ.get("COVID_FLAX_XLA_DEFAULTS", "1") == "0" or cpu_conv.unavailable_reason() is None:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  missing = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
  if missing:
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()

"""covid_flax: COVID-19 detection in chest X-ray and CT images with JAX/Flax."""

import os

# XLA:CPU flags measured to speed up this codebase's train steps (scripts/benchmark.py; README,
# "Performance"): YNNPACK's dot fusion, 2.6x the default on the study's CNN. They only
# touch the CPU backend, and must be set before JAX starts a backend, hence here. A flag already in
# XLA_FLAGS wins; COVID_FLAX_XLA_DEFAULTS=0 turns this off.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)

if os.environ.get("COVID_FLAX_XLA_DEFAULTS", "1") != "0":
  _flags = os.environ.get("XLA_FLAGS", "")
  _missing = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in _flags]
  if _missing:
    os.environ["XLA_FLAGS"] = " ".join([_flags, *_missing]).strip()

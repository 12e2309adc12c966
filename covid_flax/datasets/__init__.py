"""TFDS builders. Importing this package registers them with TFDS."""

from covid_flax.datasets import (
  covid_ct,  # noqa: F401  (registers 'covid_ct')
  covid_cxr,  # noqa: F401  (registers 'covid_cxr')
  covidx_ct,  # noqa: F401  (registers 'covidx_ct')
  covidx_cxr,  # noqa: F401  (registers 'covidx_cxr')
  synthetic,  # noqa: F401  (registers 'covid_synthetic')
)

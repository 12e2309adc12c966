"""TFDS builders. Importing this package registers them with TFDS."""

from covid_flax.datasets import synthetic  # noqa: F401  (registers 'covid_synthetic')

"""A very small CNN with BatchNorm, for tests: cheap to compile, exercises every code path."""

import jax
import jax.numpy as jnp
from flax import nnx

from covid_flax.models.dropout import Dropout
from covid_flax.models.mixstyle import MixStyle


class TinyCNN(nnx.Module):
  HEAD_MODULES = ("out",)  # Used only by `head`: not transferred from pretraining.

  def __init__(
    self,
    *,
    image_size: int,
    num_classes: int = 2,
    dropout_rate: float = 0.0,
    mixstyle_prob: float = 0.0,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    del image_size  # Global pooling: any size works.
    self.conv1 = nnx.Conv(1, 16, (3, 3), strides=(2, 2), dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), use_bias=False, dtype=dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(32, momentum=0.9, axis_name="data", dtype=dtype, rngs=rngs)
    self.mixstyle = MixStyle(mixstyle_prob)
    self.dropout = Dropout(dropout_rate)
    self.out = nnx.Linear(64, num_classes, dtype=dtype, rngs=rngs)

  def features(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    x = self.mixstyle(nnx.relu(self.conv1(x)), train=train, rngs=rngs)
    return nnx.relu(self.bn(self.conv2(x), use_running_average=not train))

  def head(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
    x = self.dropout(x, deterministic=not train, rngs=rngs)
    return self.out(x).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    return self.head(self.features(x, train=train, rngs=rngs), train=train, rngs=rngs)

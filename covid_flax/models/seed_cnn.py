"""The study's Keras CNN, layer for layer (Keras defaults: 3x3 'valid' convolutions, 2x2 pooling).

Keras: Conv32-Conv64-Pool-Drop(.25)-Conv64-Pool-Drop(.25)-Conv128-Pool-Drop(.25)-Flatten-Dense64-
Drop(.5)-Dense. The study's last layer is Dense(1, sigmoid); ours is Dense(2) with softmax, the same
model family with one more bias. Inputs are grayscale (1 channel) instead of the study's RGB copies.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from covid_flax.models.dropout import Dropout
from covid_flax.models.pooling import max_pool


def _max_pool(x: jax.Array) -> jax.Array:
  return max_pool(x, window=2, stride=2)


class SeedCNN(nnx.Module):
  HEAD_MODULES = ("dense", "out")  # Used only by `head`: not transferred from pretraining.

  def __init__(
    self,
    *,
    image_size: int,
    num_classes: int = 2,
    dropout_rate: float = 0.25,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    conv = lambda i, o: nnx.Conv(i, o, (3, 3), padding="VALID", dtype=dtype, rngs=rngs)  # noqa: E731
    self.convs = nnx.List([conv(1, 32), conv(32, 64), conv(64, 64), conv(64, 128)])
    self.dropout = Dropout(dropout_rate)
    self.head_dropout = Dropout(0.5 if dropout_rate > 0 else 0.0)
    size = image_size - 4  # two valid convolutions
    for _ in range(2):
      size = (size // 2) - 2  # pool, then valid convolution
    self.feature_size = size
    flat = (size // 2) ** 2 * 128
    self.dense = nnx.Linear(flat, 64, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(64, num_classes, dtype=dtype, rngs=rngs)

  def features(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """Activations of the last convolution (before its pooling): the Grad-CAM layer."""
    drop = lambda y: self.dropout(y, deterministic=not train, rngs=rngs)  # noqa: E731
    x = nnx.relu(self.convs[0](x))
    # ReLU after the pooling: the same values (both are monotone), a quarter of the elementwise work
    # and no full-size ReLU mask in the backward pass.
    x = drop(nnx.relu(_max_pool(self.convs[1](x))))
    x = drop(nnx.relu(_max_pool(self.convs[2](x))))
    return nnx.relu(self.convs[3](x))

  def head(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    x = self.dropout(_max_pool(x), deterministic=not train, rngs=rngs)
    x = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
    x = self.head_dropout(x, deterministic=not train, rngs=rngs)
    return self.out(x).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    return self.head(self.features(x, train=train, rngs=rngs), train=train, rngs=rngs)

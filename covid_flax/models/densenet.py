"""DenseNet-121 and DenseNet-169 (Huang et al. 2017): the CheXNet and torchxrayvision architecture.

Layer for layer torchvision's `densenet121`/`densenet169` (pre-activation BatchNorm-ReLU-Conv layers
whose outputs are concatenated, 1x1 bottlenecks of 4 x growth channels, transitions halving the
channels and the size with 2x2 average pooling; symmetric explicit padding; BatchNorm epsilon 1e-5,
momentum 0.9 = PyTorch's 0.1), so torchvision/timm weights load and compute PyTorch's function
(`covid_flax.torch_weights`). BatchNorm is synchronised over the `data` mesh axis.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from covid_flax.models import inputs
from covid_flax.models.dropout import Dropout
from covid_flax.models.pooling import max_pool

_he_normal = nnx.initializers.he_normal()  # torchvision's kaiming_normal_ (fan in, ReLU gain).


def _bn(channels, *, dtype, rngs):
  return nnx.BatchNorm(channels, momentum=0.9, axis_name="data", dtype=dtype, rngs=rngs)


def _conv(cin, cout, kernel, *, strides=1, dtype, rngs):
  pad = kernel // 2
  return nnx.Conv(
      cin, cout, (kernel, kernel), strides=strides, padding=[(pad, pad)] * 2, use_bias=False,
      kernel_init=_he_normal, dtype=dtype, rngs=rngs,
  )  # fmt: skip


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
  """PyTorch's AvgPool2d(2, 2): an odd last row/column is dropped. A reshape-mean, whose gradient
  is elementwise (XLA:CPU's reduce-window gradient is slow)."""
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class _DenseLayer(nnx.Module):
  def __init__(self, cin, growth, bn_size, *, dtype, rngs):
    self.norm1 = _bn(cin, dtype=dtype, rngs=rngs)
    self.conv1 = _conv(cin, bn_size * growth, 1, dtype=dtype, rngs=rngs)
    self.norm2 = _bn(bn_size * growth, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(bn_size * growth, growth, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x, use_running_average):
    y = self.conv1(nnx.relu(self.norm1(x, use_running_average=use_running_average)))
    return self.conv2(nnx.relu(self.norm2(y, use_running_average=use_running_average)))


class _Transition(nnx.Module):
  def __init__(self, cin, cout, *, dtype, rngs):
    self.norm = _bn(cin, dtype=dtype, rngs=rngs)
    self.conv = _conv(cin, cout, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x, use_running_average):
    x = self.conv(nnx.relu(self.norm(x, use_running_average=use_running_average)))
    return _avg_pool_2x2(x)


class DenseNet(nnx.Module):
  HEAD_MODULES = ("out",)  # Used only by `head`: not transferred from pretraining.

  def __init__(
    self,
    block_sizes,
    *,
    image_size: int,
    num_classes: int = 2,
    dropout_rate: float = 0.0,
    growth: int = 32,
    bn_size: int = 4,
    init_features: int = 64,
    input_norm: str = "default",
    frozen_bn: bool = False,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    del image_size  # Global average pooling: any size works.
    self.input_norm, self.frozen_bn = input_norm, frozen_bn
    conv, bn = partial(_conv, dtype=dtype, rngs=rngs), partial(_bn, dtype=dtype, rngs=rngs)
    self.conv0 = conv(inputs.CHANNELS[input_norm], init_features, 7, strides=2)
    self.norm0 = bn(init_features)
    blocks, transitions, c = [], [], init_features
    for i, num_layers in enumerate(block_sizes):
      layers = []
      for _ in range(num_layers):
        layers.append(_DenseLayer(c, growth, bn_size, dtype=dtype, rngs=rngs))
        c += growth
      blocks.append(nnx.List(layers))
      if i < len(block_sizes) - 1:
        transitions.append(_Transition(c, c // 2, dtype=dtype, rngs=rngs))
        c //= 2
    self.blocks, self.transitions = nnx.List(blocks), nnx.List(transitions)
    self.norm5 = bn(c)
    self.dropout = Dropout(dropout_rate)
    self.out = nnx.Linear(c, num_classes, bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)

  def features(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """The last block's activations after norm5 and ReLU: the Grad-CAM layer."""
    frozen = not train or self.frozen_bn
    x = self.norm0(self.conv0(inputs.adapt(x, self.input_norm)), use_running_average=frozen)
    x = jnp.pad(nnx.relu(x), ((0, 0), (1, 1), (1, 1), (0, 0)))  # After a ReLU 0 pads as -inf.
    x = max_pool(x, window=3, stride=2)
    for i, block in enumerate(self.blocks):
      for layer in block:
        x = jnp.concatenate([x, layer(x, frozen)], axis=-1)
      if i < len(self.transitions):
        x = self.transitions[i](x, frozen)
    return nnx.relu(self.norm5(x, use_running_average=frozen))

  def head(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    x = self.dropout(x.mean(axis=(1, 2)), deterministic=not train, rngs=rngs)
    return self.out(x).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    return self.head(self.features(x, train=train, rngs=rngs), train=train, rngs=rngs)

  def torch_name(self, path: tuple) -> str:
    """torchvision's name of the module at `path` (our state path without the variable name)."""
    if path[0] == "out":
      return "classifier"
    if path[0] == "blocks":  # ('blocks', i, j, 'norm1'|'conv1'|'norm2'|'conv2')
      return f"features.denseblock{path[1] + 1}.denselayer{path[2] + 1}.{path[3]}"
    if path[0] == "transitions":  # ('transitions', i, 'norm'|'conv')
      return f"features.transition{path[1] + 1}.{path[2]}"
    return f"features.{path[0]}"  # conv0, norm0, norm5


DenseNet121 = partial(DenseNet, (6, 12, 24, 16))
DenseNet169 = partial(DenseNet, (6, 12, 32, 32))

"""ResNet-18 and ResNet-50 (He et al. 2016), BatchNorm synchronised over the `data` mesh axis so
that a data-parallel step equals the single-device step on the global batch.

Layer for layer torchvision's (v1.5: a bottleneck's stride on its 3x3 convolution; symmetric
explicit padding, which Flax's 'SAME' is not on even sizes; BatchNorm epsilon 1e-5 and momentum 0.9,
PyTorch's 0.1), so torchvision and timm weights load and compute PyTorch's function
(`covid_flax.torch_weights`; `torch_name` gives each variable's name there)."""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from covid_flax.models import inputs
from covid_flax.models.dropout import Dropout
from covid_flax.models.mixstyle import MixStyle


class _ConvBN(nnx.Module):
  def __init__(self, cin, cout, kernel, strides, *, dtype, rngs, zero_scale=False, frozen=False):
    pad = kernel // 2
    self.conv = nnx.Conv(
        cin, cout, (kernel, kernel), strides=strides, padding=[(pad, pad)] * 2, use_bias=False,
        dtype=dtype, rngs=rngs,
    )  # fmt: skip
    scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
    self.bn = nnx.BatchNorm(
      cout, momentum=0.9, axis_name="data", scale_init=scale_init, dtype=dtype, rngs=rngs
    )
    self.frozen = frozen  # Normalise with the running statistics in training too (fine-tuning).

  def __call__(self, x, train):
    return self.bn(self.conv(x), use_running_average=not train or self.frozen)


class _Block(nnx.Module):
  """Basic (two 3x3) or bottleneck (1x1-3x3-1x1, 4x expansion) residual block."""

  def __init__(self, cin, width, strides, bottleneck, *, dtype, rngs, frozen_bn):
    cbr = partial(_ConvBN, dtype=dtype, rngs=rngs, frozen=frozen_bn)
    cout = width * 4 if bottleneck else width
    if bottleneck:
      self.layers = nnx.List(
        [
          cbr(cin, width, 1, 1),
          cbr(width, width, 3, strides),
          cbr(width, cout, 1, 1, zero_scale=True),
        ]
      )
    else:
      self.layers = nnx.List([cbr(cin, width, 3, strides), cbr(width, cout, 3, 1, zero_scale=True)])
    self.shortcut = cbr(cin, cout, 1, strides) if (strides != 1 or cin != cout) else None
    self.cout = cout

  def __call__(self, x, train):
    y = x
    for i, layer in enumerate(self.layers):
      y = layer(y, train)
      if i < len(self.layers) - 1:
        y = nnx.relu(y)
    residual = self.shortcut(x, train) if self.shortcut is not None else x
    return nnx.relu(y + residual)


class ResNet(nnx.Module):
  HEAD_MODULES = ("out",)  # Used only by `head`: not transferred from pretraining.

  def __init__(
    self,
    stage_sizes,
    bottleneck,
    *,
    image_size: int,
    num_classes: int = 2,
    dropout_rate: float = 0.0,
    width: int = 64,
    input_norm: str = "default",
    frozen_bn: bool = False,
    mixstyle_prob: float = 0.0,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    del image_size  # Global average pooling: any size works.
    self.input_norm = input_norm
    self.stem = _ConvBN(
      inputs.CHANNELS[input_norm], width, 7, 2, dtype=dtype, rngs=rngs, frozen=frozen_bn
    )
    blocks, cin, self.block_names = [], width, []
    for stage, num_blocks in enumerate(stage_sizes):
      for b in range(num_blocks):
        strides = 2 if (stage > 0 and b == 0) else 1
        block = _Block(
          cin, width * 2**stage, strides, bottleneck, dtype=dtype, rngs=rngs, frozen_bn=frozen_bn
        )
        blocks.append(block)
        self.block_names.append(f"layer{stage + 1}.{b}")
        cin = block.cout
    self.blocks = nnx.List(blocks)
    # MixStyle after the first two stages, the paper's choice for ResNets (style lives early).
    self.style_after = (stage_sizes[0] - 1, stage_sizes[0] + stage_sizes[1] - 1)
    self.mixstyle = MixStyle(mixstyle_prob)
    self.dropout = Dropout(dropout_rate)
    self.out = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

  def features(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    """The last stage's activations: the Grad-CAM layer."""
    x = nnx.relu(self.stem(inputs.adapt(x, self.input_norm), train))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, block in enumerate(self.blocks):
      x = block(x, train)
      if i in self.style_after:
        x = self.mixstyle(x, train=train, rngs=rngs)
    return x

  def head(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    x = self.dropout(x.mean(axis=(1, 2)), deterministic=not train, rngs=rngs)
    return self.out(x).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    return self.head(self.features(x, train=train, rngs=rngs), train=train, rngs=rngs)

  def torch_name(self, path: tuple) -> str:
    """torchvision's name of the module at `path` (our state path without the variable name)."""
    if path[0] == "out":
      return "fc"
    if path[0] == "stem":
      return {"conv": "conv1", "bn": "bn1"}[path[1]]
    block, part = self.block_names[path[1]], path[2]  # ('blocks', i, 'layers'|'shortcut', ...)
    if part == "shortcut":
      return f"{block}.downsample.{0 if path[3] == 'conv' else 1}"
    return f"{block}.{path[4]}{path[3] + 1}"  # ('blocks', i, 'layers', j, 'conv'|'bn')


ResNet18 = partial(ResNet, (2, 2, 2, 2), False)
# Half the channels of every layer: a quarter of the parameters and FLOPs, for ~400-image datasets.
ResNet18Narrow = partial(ResNet, (2, 2, 2, 2), False, width=32)
ResNet18Quarter = partial(ResNet, (2, 2, 2, 2), False, width=16)  # A sixteenth of the parameters.
ResNet50 = partial(ResNet, (3, 4, 6, 3), True)

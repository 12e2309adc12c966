"""The torchvision equivalence fixture, shared by `scripts/make_torch_fixture.py` (which runs
torchvision once, where torch is installed) and `tests/test_torch_weights.py` (which needs no torch).

The weights are not stored: both sides draw the same random state dict with numpy from each tensor's
name and shape, in PyTorch's layout (`random_state_dict`). The fixture holds the grey test images
and what torchvision computed from them: the pooled features and the logits.
"""

import zlib
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).parent / "data" / "torchvision_equivalence.npz"
# case: (config.model, config.input_norm); torchvision's model of the same name, its first
# convolution given one input channel for 'xrv' (as torchxrayvision's DenseNet).
CASES = {
  "resnet18": ("resnet18", "imagenet"),
  "resnet50": ("resnet50", "imagenet"),
  "densenet121": ("densenet121", "imagenet"),
  "densenet121_xrv": ("densenet121", "xrv"),
}
SIZES = (224, 97)  # An even size and an odd one: padding and pooling conventions both show.
BATCH = 2
NUM_CLASSES = 2


def images(size: int) -> np.ndarray:
  """(BATCH, size, size) uint8 grey images: smooth shapes plus noise, the full 0-255 range."""
  rng = np.random.default_rng(size)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = []
  for _ in range(BATCH):
    cy, cx, r = rng.uniform(0.3, 0.7, 3)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.1 * r))
    image = 0.6 * blob + 0.2 * np.sin(12 * xx * r) + 0.2 * rng.random((size, size))
    image = (image - image.min()) / (image.max() - image.min())
    out.append(np.round(255 * image).astype(np.uint8))
  return np.stack(out)


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
  """A float32 state dict for the PyTorch `shapes`, each tensor drawn from its name: He-scaled
  convolutions, 1/sqrt(fan in) linear layers, BatchNorm scales and variances near 1."""
  out = {}
  for name, shape in shapes.items():
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name.endswith("running_var"):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("running_mean") or name.endswith("bias"):
      value = 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:  # BatchNorm scale.
      value = rng.uniform(0.5, 1.5, shape)
    else:  # Convolution (O, I, kh, kw) or linear (out, in).
      fan_in = int(np.prod(shape[1:]))
      gain = 2.0 if len(shape) == 4 else 1.0
      value = np.sqrt(gain / fan_in) * rng.standard_normal(shape)
    out[name] = value.astype(np.float32)
  return out


def torch_shapes(model_name: str, input_norm: str) -> dict[str, tuple[int, ...]]:
  """{PyTorch name: shape} of our `model_name` with `input_norm`, from our name mapping."""
  from flax import nnx

  from covid_flax import models, torch_weights

  model = nnx.eval_shape(
    lambda: models.create_model(
      model_name,
      image_size=64,
      num_classes=NUM_CLASSES,
      input_norm=input_norm,
      rngs=nnx.Rngs(0),
    )  # fmt: skip
  )
  return {name: shape for name, (_, shape) in torch_weights.torch_layout(model).items()}

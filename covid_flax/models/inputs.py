"""What the first convolution sees: the grey image as normalised by `preprocess.normalize`
(config.input_norm='default'), or the input convention of pretrained weights.

'imagenet' (torchvision and timm ImageNet weights): three channels, each the grey image, normalised
with ImageNet's per-channel mean and std, exactly what those models see of a grey image loaded as
RGB. Repeating the channel (rather than summing the first convolution's RGB weights into one, as
timm's `in_chans=1` does) keeps the function exactly PyTorch's, zero padding included, for 3-5 %
more FLOPs (the stem's 7x7 convolution alone); summing is exact only away from the borders.
'xrv' (torchxrayvision's chest X-ray weights): one channel scaled to [-1024, 1024].
"""

import jax
import jax.numpy as jnp

from covid_flax.preprocess import PIXEL_MEAN, PIXEL_STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNELS = {"default": 1, "imagenet": 3, "xrv": 1}  # config.input_norm -> the stem's channels.


def adapt(x: jax.Array, input_norm: str) -> jax.Array:
  """(N, H, W, 1) images normalised by `preprocess.normalize` -> the stem's input."""
  if input_norm == "default":
    return x
  grey = x.astype(jnp.float32) * PIXEL_STD + PIXEL_MEAN  # Back to [0, 1].
  if input_norm == "imagenet":
    out = (grey - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)  # Broadcasts to 3.
  elif input_norm == "xrv":
    out = (2.0 * grey - 1.0) * 1024.0
  else:
    raise ValueError(f"input_norm={input_norm!r} is not one of {sorted(CHANNELS)}")
  return out.astype(x.dtype)

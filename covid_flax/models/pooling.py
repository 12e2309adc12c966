"""Max pooling written so that XLA:CPU differentiates it quickly.

Same forward values as `nnx.max_pool`; the difference is the backward pass. `nnx.max_pool`
differentiates to XLA's select-and-scatter, which XLA:CPU runs slowly (~0.35 s of the study CNN's
1.3 s train step at 128x128, batch 32). Overlapping windows (window > stride) are a maximum of
strided slices, whose gradient is elementwise. Tiling windows (window == stride, the study CNN's
2x2) are a reduction over a reshape: written as slices too, XLA fused the window's maximum into
the gradient and recomputed it for every input pixel (71 ms of a 640 ms seed-CNN step at 128²,
float32, AMD EPYC); a reduction's result is kept, so the gradient is one pass comparing each pixel
with it. Either way ties share the gradient (after a ReLU the usual ties are zeros, whose gradient
the ReLU zeroes either way).
"""

import jax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """'VALID' max pooling of NHWC `x` over square `window`s every `stride` pixels."""
  out_h = (x.shape[1] - window) // stride + 1
  out_w = (x.shape[2] - window) // stride + 1
  if window == stride:
    tiles = x[:, : out_h * window, : out_w * window]
    tiles = tiles.reshape(x.shape[0], out_h, window, out_w, window, x.shape[3])
    return jnp.max(tiles, axis=(2, 4))
  slices = [
    x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
    for i in range(window)
    for j in range(window)
  ]
  out = slices[0]
  for s in slices[1:]:
    out = jnp.maximum(out, s)
  return out

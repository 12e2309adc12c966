"""Max pooling written as a maximum of strided slices.

Same forward values as `nnx.max_pool`; the difference is the backward pass. `nnx.max_pool`
differentiates to XLA's select-and-scatter, which XLA:CPU runs slowly (~0.35 s of the study CNN's
1.3 s train step at 128x128, batch 32); the gradient of a maximum of slices is elementwise and fuses
with its neighbours. Ties share the gradient instead of giving it all to one maximum; after a ReLU
the usual ties are zeros, whose gradient the ReLU zeroes either way.
"""

import jax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """'VALID' max pooling of NHWC `x` over square `window`s every `stride` pixels."""
  out_h = (x.shape[1] - window) // stride + 1
  out_w = (x.shape[2] - window) // stride + 1
  slices = [
    x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
    for i in range(window)
    for j in range(window)
  ]
  out = slices[0]
  for s in slices[1:]:
    out = jnp.maximum(out, s)
  return out

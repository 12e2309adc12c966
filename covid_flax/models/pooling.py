"""Max pooling written so that XLA:CPU differentiates it quickly.

Same forward values as `nnx.max_pool`; the difference is the backward pass. `nnx.max_pool`
differentiates to XLA's select-and-scatter, which XLA:CPU runs slowly (~0.35 s of the study CNN's
1.3 s train step at 128x128, batch 32). Overlapping windows (window > stride) are a maximum of
strided slices, whose gradient is elementwise (ties share it; after a ReLU the usual ties are
zeros, whose gradient the ReLU zeroes either way). Tiling windows (window == stride, the study
CNN's 2x2) are a reduction over a reshape, whose result XLA keeps (written as slices, XLA fused the
window's maximum into the gradient and recomputed it for every input pixel), with a custom VJP:
JAX's own gradient of a maximum splits it among tied pixels, which costs a count of the ties per
window (two more passes over the layer's largest activation, 396 MB at 224², batch 32); this one
gives it to the first maximum in the window, as `nnx.max_pool` does, without them.
"""

import functools

import jax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """'VALID' max pooling of NHWC `x` over square `window`s every `stride` pixels."""
  out_h = (x.shape[1] - window) // stride + 1
  out_w = (x.shape[2] - window) // stride + 1
  if window == stride:
    return _tile_max(x, window)
  slices = [
    x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
    for i in range(window)
    for j in range(window)
  ]
  out = slices[0]
  for s in slices[1:]:
    out = jnp.maximum(out, s)
  return out


def _tiles(x: jax.Array, window: int) -> jax.Array:
  """(N, H, W, C) -> (N, H // window, window, W // window, window, C), the remainder cut."""
  n, h, w, c = x.shape
  oh, ow = h // window, w // window
  return x[:, : oh * window, : ow * window].reshape(n, oh, window, ow, window, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tile_max(x: jax.Array, window: int) -> jax.Array:
  return jnp.max(_tiles(x, window), axis=(2, 4))


def _tile_max_fwd(x, window):
  y = _tile_max(x, window)
  return y, (x, y)


def _tile_max_bwd(window, residuals, g):
  """The gradient at each window's first maximum (row-major), zero elsewhere: select-and-scatter's
  rule, elementwise from the input and the pooled maximum. One array per window position, then
  interleaved: XLA makes each a pass over its quarter of the input (2x2). Written instead as one
  map over the whole input (each pixel's position against the first maximum's), XLA recomputed
  that position for every pixel: the step ran at 0.89-0.96x JAX's own gradient."""
  x, y = residuals
  tiles = _tiles(x, window)
  taken = jnp.zeros(y.shape, bool)
  rows = []
  for i in range(window):
    row = []
    for j in range(window):
      hit = (tiles[:, :, i, :, j, :] == y) & ~taken
      taken = taken | hit
      row.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
    rows.append(jnp.stack(row, axis=3))  # (N, oh, ow, window, C)
  grad = jnp.stack(rows, axis=2).reshape(tiles.shape[0], -1, tiles.shape[3] * window, x.shape[3])
  pad = ((0, 0), (0, x.shape[1] - grad.shape[1]), (0, x.shape[2] - grad.shape[2]), (0, 0))
  return (jnp.pad(grad, pad).astype(x.dtype),)


_tile_max.defvjp(_tile_max_fwd, _tile_max_bwd)

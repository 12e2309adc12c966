"""MixStyle (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021), train only.

Early feature maps carry an image's style (contrast, texture, print look) in their per-example,
per-channel mean and standard deviation. With probability `prob` a step replaces each example's
statistics by a Beta(0.1, 0.1) mix of its own and those of a random partner, so the style of one
source (COVID-CT's paper figures: all of its COVID class) also appears under the other label and
stops being a shortcut. The statistics are held constant in the gradient, as in the paper.

Partners come from the whole global batch (all-gathered over the `data` axis, a permutation and
weights drawn from a key every device shares, indexed by global example position), so a
data-parallel step computes what one device does on the same global batch.
"""

import jax
import jax.numpy as jnp
from flax import nnx

ALPHA = 0.1  # The paper's Beta(alpha, alpha): most mixes stay close to one of the two styles.
EPS = 1e-6


def mix_styles(x: jax.Array, key: jax.Array, prob: float, axis_name: str = "data") -> jax.Array:
  """`x` (this device's (N, H, W, C) share of the global batch) with mixed instance statistics.
  `key` must be the same on every device."""
  k_apply, k_perm, k_lam = jax.random.split(key, 3)
  local_n = x.shape[0]
  total = local_n * jax.lax.axis_size(axis_name)
  ids = jax.lax.axis_index(axis_name) * local_n + jnp.arange(local_n)
  xf = x.astype(jnp.float32)
  mu = jax.lax.stop_gradient(xf.mean(axis=(1, 2), keepdims=True))
  sigma = jax.lax.stop_gradient(jnp.sqrt(xf.var(axis=(1, 2), keepdims=True) + EPS))
  stats = jax.lax.all_gather(jnp.concatenate([mu, sigma], -1), axis_name, tiled=True)
  partner_mu, partner_sigma = jnp.split(stats[jax.random.permutation(k_perm, total)[ids]], 2, -1)
  lam = jax.random.beta(k_lam, ALPHA, ALPHA, (total,))[ids].reshape(-1, 1, 1, 1)
  mixed_mu = lam * mu + (1 - lam) * partner_mu
  mixed_sigma = lam * sigma + (1 - lam) * partner_sigma
  mixed = (xf - mu) / sigma * mixed_sigma + mixed_mu
  return jnp.where(jax.random.bernoulli(k_apply, prob), mixed, xf).astype(x.dtype)


class MixStyle(nnx.Module):
  def __init__(self, prob: float):
    self.prob = prob

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    if not train or self.prob == 0:
      return x
    if rngs is None or "style" not in rngs:
      raise ValueError(
        f"config.mixstyle_prob={self.prob} needs the train step's 'style' key (one key shared by "
        "all devices); this caller gives none"
      )
    return mix_styles(x, rngs.style(), self.prob)

"""Grad-CAM (Selvaraju et al. 2017) for every registry model, through `model.features`/`head`."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from covid_flax.preprocess import normalize


def gradcam(model: nnx.Module, images: np.ndarray, dtype=jnp.float32) -> np.ndarray:
  """(N, H, W, 1) uint8 images -> (N, H, W) heat maps in [0, 1] for the COVID log-odds: the last
  conv features weighted by the spatial mean of their gradient, ReLU, upsampled, max-normalised."""
  x = normalize(jnp.asarray(images)).astype(dtype)
  features = model.features(x, train=False)

  def log_odds(f):
    logits = model.head(f, train=False)
    return (logits[:, 1] - logits[:, 0]).sum()

  grads = jax.grad(log_odds)(features.astype(jnp.float32))
  weights = grads.mean(axis=(1, 2), keepdims=True)
  cam = jax.nn.relu((features.astype(jnp.float32) * weights).sum(-1))
  cam = jax.image.resize(cam, (cam.shape[0], *images.shape[1:3]), "bilinear")
  cam = cam / jnp.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-8)
  return np.asarray(cam)

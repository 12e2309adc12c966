"""Model registry: `config.model` names one of MODELS."""

import inspect
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
from flax import nnx

from covid_flax import cpu_conv
from covid_flax.models.densenet import DenseNet121, DenseNet169
from covid_flax.models.resnet import ResNet18, ResNet18Narrow, ResNet18Quarter, ResNet50
from covid_flax.models.seed_cnn import SeedCNN
from covid_flax.models.tiny import TinyCNN

NUM_CLASSES = 2  # non-COVID, COVID.

# Every model maps (N, H, W, 1) images to (N, num_classes) logits and has `features` (the last
# convolutional feature map, for Grad-CAM and pretraining), `head` (features -> logits) and
# HEAD_MODULES (the attributes only `head` uses).
MODELS: dict[str, Callable[..., nnx.Module]] = {
  "seed_cnn": SeedCNN,
  "resnet18": ResNet18,
  "resnet18_w32": ResNet18Narrow,
  "resnet18_w16": ResNet18Quarter,
  "resnet50": ResNet50,
  "densenet121": DenseNet121,
  "densenet169": DenseNet169,
  "tiny_cnn": TinyCNN,
}


def _model_class(name: str) -> type[nnx.Module]:
  model = MODELS[name]
  return getattr(model, "func", model)  # The class behind a functools.partial.


# Models with torchvision counterparts (a `torch_name` method): they load PyTorch weights
# (`covid_flax.torch_weights`) and take config.input_norm and config.freeze_bn_stats.
TRANSFER_MODELS = tuple(n for n in MODELS if hasattr(_model_class(n), "torch_name"))


# Models that take config.mixstyle_prob (covid_flax/models/mixstyle.py).
STYLE_MODELS = tuple(
  n for n in MODELS if "mixstyle_prob" in inspect.signature(_model_class(n).__init__).parameters
)


def head_modules(name: str) -> tuple[str, ...]:
  """The attributes of model `name` that only its classifier head uses."""
  return _model_class(name).HEAD_MODULES


def create_model(name: str, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
  if name not in MODELS:
    raise ValueError(f"config.model={name!r} is not a known model; choose one of {sorted(MODELS)}")
  return MODELS[name](rngs=rngs, **kwargs)


def compute_dtype(config: ml_collections.ConfigDict):
  return jnp.bfloat16 if config.half_precision else jnp.float32


def from_config(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
  """The classifier `config` describes (model, image size, dropout, precision, input norm), its
  convolutions on oneDNN where config.cpu_conv says so and it can (`cpu_conv.use_onednn`)."""
  extra_kwargs = {}
  if config.get("input_norm", "default") != "default" or config.get("freeze_bn_stats", False):
    extra_kwargs = dict(input_norm=config.input_norm, frozen_bn=config.freeze_bn_stats)
  if config.get("mixstyle_prob", 0.0) > 0:
    extra_kwargs["mixstyle_prob"] = config.mixstyle_prob
  model = create_model(
    config.model,
    image_size=config.image_size,
    num_classes=NUM_CLASSES,
    dropout_rate=config.dropout_rate,
    dtype=compute_dtype(config),
    rngs=nnx.Rngs(seed),
    **extra_kwargs,
  )
  cpu_conv.use_onednn(model, config.get("cpu_conv", "xla"))
  return model

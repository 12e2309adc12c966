"""The optimizer and learning-rate schedule of a run (supervised training and SimCLR alike)."""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from covid_flax import config_lib


def create_optimizer(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  total_steps: int,
  head_modules: tuple[str, ...] | None = None,
) -> optax.GradientTransformation:
  """config.optimizer with a warm-up then config.lr_schedule, clipping and SAM where configured;
  with `head_modules` (a classifier's), the backbone's learning rate as configured."""
  warmup = min(int(config.warmup_epochs * steps_per_epoch), total_steps - 1)
  if config.lr_schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, warmup, max(total_steps, warmup + 1)
    )
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, warmup),
         optax.constant_schedule(config.learning_rate)], [warmup],
    )  # fmt: skip
  if config.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum, nesterov=True),
    )
  if config_lib.has_param_groups(config):
    tx = optax.chain(tx, _scale_backbone(config, steps_per_epoch, head_modules))
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.sam_rho > 0:
    # Sharpness-aware minimisation (Foret et al. 2021): step with the gradient taken at the worst
    # point within `sam_rho` of the weights (one normalised ascent step): twice the compute.
    ascent = optax.chain(optax.contrib.normalize(), optax.sgd(config.sam_rho))
    tx = optax.contrib.sam(tx, ascent, opaque_mode=True)
  return optax.with_extra_args_support(tx)


def _scale_backbone(
  config: ml_collections.ConfigDict, steps_per_epoch: int, head_modules: tuple[str, ...] | None
) -> optax.GradientTransformation:
  """Scales the updates of every parameter outside `head_modules` by config.backbone_lr_scale (0
  for the first config.frozen_backbone_epochs). Both optimizers end by multiplying with the
  learning rate, so this is the backbone's learning rate, weight decay included."""
  if head_modules is None:
    raise config_lib.ConfigError(
      f"config.backbone_lr_scale={config.backbone_lr_scale} and config.frozen_backbone_epochs="
      f"{config.frozen_backbone_epochs} are for fine-tuning a classifier (covid_flax.main); "
      "leave them at 1.0 and 0 here"
    )
  frozen_steps = int(config.frozen_backbone_epochs * steps_per_epoch)

  def factor(count):
    return jnp.where(count < frozen_steps, 0.0, config.backbone_lr_scale)

  def is_backbone(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: p[0].key not in head_modules, params)

  return optax.masked(optax.scale_by_schedule(factor), is_backbone)


def count_steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Full global batches per epoch of the training split (the last partial one is dropped)."""
  if num_examples < config.batch_size:
    raise config_lib.ConfigError(
      f"config.batch_size={config.batch_size} is larger than the {num_examples} training "
      f"examples of {config.dataset}:{config.train_split}; use a batch size <= {num_examples}"
    )
  return num_examples // config.batch_size

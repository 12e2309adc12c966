"""The optimizer and learning-rate schedule of a run (supervised training and SimCLR alike)."""

import ml_collections
import optax

from covid_flax import config_lib


def create_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.GradientTransformation:
  """config.optimizer with a warm-up then config.lr_schedule, clipping and SAM where configured."""
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
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.sam_rho > 0:
    # Sharpness-aware minimisation (Foret et al. 2021): step with the gradient taken at the worst
    # point within `sam_rho` of the weights (one normalised ascent step): twice the compute.
    ascent = optax.chain(optax.contrib.normalize(), optax.sgd(config.sam_rho))
    tx = optax.contrib.sam(tx, ascent, opaque_mode=True)
  return optax.with_extra_args_support(tx)


def count_steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Full global batches per epoch of the training split (the last partial one is dropped)."""
  if num_examples < config.batch_size:
    raise config_lib.ConfigError(
      f"config.batch_size={config.batch_size} is larger than the {num_examples} training "
      f"examples of {config.dataset}:{config.train_split}; use a batch size <= {num_examples}"
    )
  return num_examples // config.batch_size

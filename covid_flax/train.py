"""Training: state creation, per-device `train_step` / `eval_step`, and `train_and_evaluate`.

The steps are written per device, as under `pmap`: gradients, metrics and BatchNorm statistics are
averaged explicitly with `jax.lax.pmean` over the `data` axis. `jax.shard_map` runs them on a mesh
of every device of every process, under `jax.jit`, with the state donated; `loop.run_steps` drives
them (logging, checks, checkpoints, signals).
"""

import functools
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import PartitionSpec as P

from covid_flax import (
  checkpointing,
  config_lib,
  image_prep,
  input_pipeline,
  loop,
  metric_writers,
  models,
  optim,
  parallel,
  simclr,
  torch_weights,
)
from covid_flax.metrics import compute_metrics
from covid_flax.parallel import DATA_AXIS
from covid_flax.preprocess import augmented_batch, mixed_batch, normalize


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: nnx.State
  ema_params: nnx.State  # Exponential moving average of `params` (equal to them if disabled).
  model_state: nnx.State  # BatchNorm statistics: everything that is not a trained parameter.
  opt_state: optax.OptState
  rng: jax.Array  # Raw uint32 key data; per-step keys are folded in from it.


def create_train_state(
  config: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
  model = models.from_config(config, config.seed)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    model_state=model_state,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(config.seed)),
  )
  return graphdef, state


def init_from_pretrained(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
  """`state` with its weights taken from `config.init_from`: the encoder of a `covid_flax.pretrain`
  workdir, or every variable of a PyTorch checkpoint in safetensors (the head where it fits)."""
  load = simclr.load_encoder if os.path.isdir(config.init_from) else torch_weights.load
  params, model_state = load(config.init_from, config, state.params, state.model_state)
  logging.info("Initialised from %s", config.init_from)
  return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params),
                       model_state=model_state)  # fmt: skip


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy against integer labels (N,) or target distributions (N, classes)."""
  if targets.ndim == 1:
    targets = jax.nn.one_hot(targets, models.NUM_CLASSES)
  return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, label_smoothing))


_STYLE_TAG = 0x5717  # MixStyle's key: step_key folded with this, apart from its three split keys.


def _step_inputs(
  state: TrainState,
  images: jax.Array,
  batch: dict[str, jax.Array],
  config: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """This device's augmented (and, where configured, mixed) normalised images, their targets
  (labels, or label distributions after mixing) and the model's keys (`nnx.Rngs` streams), all
  from the step's key.
  `images` is the device cache that batch["index"] points into, or None when the batch carries
  its own images (stream mode): they are then indexed the same way, so both modes compute the
  same thing."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  aug_key, dropout_key, mix_key = jax.random.split(step_key, 3)
  local_batch = batch["label"].shape[0]
  # Keys by global example index: augmentation does not depend on the number of devices.
  example_ids = jax.lax.axis_index(DATA_AXIS) * local_batch + jnp.arange(local_batch)
  mixing = config.mixup_alpha > 0 or config.cutmix_alpha > 0
  if images is None:  # Mixing takes partners from the whole global batch, so gather it.
    images = jax.lax.all_gather(batch["image"], DATA_AXIS, tiled=True) if mixing else batch["image"]
    batch = {**batch, "index": example_ids if mixing else jnp.arange(local_batch)}
  if mixing:
    images, lam, partner_labels = mixed_batch(images, batch, example_ids, aug_key, mix_key, config)
    own, other = (jax.nn.one_hot(y, models.NUM_CLASSES) for y in (batch["label"], partner_labels))
    targets = lam[:, None] * own + (1.0 - lam[:, None]) * other
  else:
    images = augmented_batch(images, batch["index"], example_ids, aug_key, config)
    targets = batch["label"]
  images = normalize(images).astype(models.compute_dtype(config))
  # Dropout differs per device; MixStyle's key (its partners, over the global batch) may not.
  rngs = dict(dropout=jax.random.fold_in(dropout_key, jax.lax.axis_index(DATA_AXIS)))
  if config.mixstyle_prob > 0:
    rngs["style"] = jax.random.fold_in(step_key, _STYLE_TAG)
  return images, targets, rngs


def _ema_update(ema_params: nnx.State, params: nnx.State, step: jax.Array, decay: float):
  """The moving average with the usual warm-up, so that early averages are not dominated by the
  random initialisation."""
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def train_step(
  state: TrainState,
  images: jax.Array,
  batch: dict[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step, written for one device's share of the global batch. `images` is the
  device-resident uint8 training set and `batch` holds indices into it and labels; or (stream
  mode) `images` is None and `batch` holds the uint8 images and labels."""
  images, targets, model_keys = _step_inputs(state, images, batch, config)

  # NNX's own grad: with jax.grad inside shard_map, NNX refuses the BatchNorm statistics update.
  # Parameters enter as per-device (varying) values, so each device differentiates its own loss and
  # the explicit pmean below averages; left replicated, shard_map's autodiff would sum them.
  params = jax.lax.pcast(state.params, DATA_AXIS, to="varying")
  model = nnx.merge(graphdef, params, state.model_state)

  def loss_fn(model):
    logits = model(images, train=True, rngs=nnx.Rngs(**model_keys))
    return cross_entropy(logits, targets, config.label_smoothing).mean(), logits

  grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
  (loss, logits), grads = grad_fn(model)
  model_state = nnx.state(model, nnx.Not(nnx.Param))
  grads = jax.lax.pmean(grads, DATA_AXIS)

  def grads_at(params, _):  # SAM's second gradient: same batch, its BatchNorm update dropped.
    perturbed = nnx.merge(graphdef, jax.lax.pcast(params, DATA_AXIS, to="varying"),
                          state.model_state)  # fmt: skip
    return jax.lax.pmean(grad_fn(perturbed)[1], DATA_AXIS)

  updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grads_at)
  params = optax.apply_updates(state.params, updates)
  ema_params = _ema_update(state.ema_params, params, state.step, config.ema_decay)
  metrics = {
    "loss": loss,
    "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
    "grad_norm": optax.tree.norm(grads),
  }
  metrics = jax.lax.pmean(metrics, DATA_AXIS)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    ema_params=ema_params,
    model_state=model_state,
    opt_state=opt_state,
  )
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  metrics["finite"] = finite
  return loop.skip_if_not_finite(new_state, state, finite, config), metrics


def eval_params(state: TrainState, config: ml_collections.ConfigDict) -> nnx.State:
  """The parameters evaluation uses: the EMA when `config.ema_decay` > 0."""
  return state.ema_params if config.ema_decay > 0 else state.params


def eval_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  config: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array]:
  """P(covid) and the loss for each of this device's examples."""
  model = nnx.merge(graphdef, eval_params(state, config), state.model_state)
  images = normalize(batch["image"]).astype(models.compute_dtype(config))
  probs = jax.nn.softmax(model(images, train=False))
  if config.tta_hflip:  # Test-time augmentation: average with the mirror image.
    probs = (probs + jax.nn.softmax(model(images[:, :, ::-1], train=False))) / 2.0
  p_label = jnp.take_along_axis(probs, batch["label"][:, None], axis=1)[:, 0]
  return probs[:, 1], -jnp.log(jnp.maximum(p_label, 1e-12))


def make_parallel_steps(
  mesh: jax.sharding.Mesh,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  streamed: bool = False,
) -> tuple[Callable, Callable]:
  """(train_step, eval_step) jitted over the mesh: state and image cache replicated, batches split
  on `data`. The train step is (state, cache, batch), or (state, batch) when `streamed`."""
  train_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, config=config)
  if streamed:
    train_fn, cache_spec = lambda state, batch, fn=train_fn: fn(state, None, batch), ()
  else:
    cache_spec = (P(),)
  p_train = jax.shard_map(
    train_fn, mesh=mesh, in_specs=(P(), *cache_spec, P(DATA_AXIS)), out_specs=(P(), P())
  )
  p_eval = jax.shard_map(
    functools.partial(eval_step, graphdef=graphdef, config=config),
    mesh=mesh,
    in_specs=(P(), P(DATA_AXIS)),
    out_specs=P(DATA_AXIS),
  )
  return jax.jit(p_train, donate_argnums=0), jax.jit(p_eval)


def predict_split(
  p_eval: Callable, state: TrainState, data: input_pipeline.SplitData, mesh, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """(probabilities, losses) for every example of `data`, in order, on every process. Batches are
  dispatched without waiting; outputs come to the host once, at the end."""
  outputs, masks = [], []
  to_global = parallel.global_batch if data.streamed else parallel.global_batch_from_whole
  for batch, global_mask in input_pipeline.eval_batches(data, batch_size):
    outputs.append(p_eval(state, to_global(mesh, batch)))
    masks.append(global_mask)
  probs = np.concatenate([parallel.to_host(p)[m] for (p, _), m in zip(outputs, masks)])
  losses = np.concatenate([parallel.to_host(loss)[m] for (_, loss), m in zip(outputs, masks)])
  return probs, losses


def summarize(labels: np.ndarray, probs: np.ndarray, losses: np.ndarray) -> dict[str, float | None]:
  """Loss, and accuracy, sensitivity, specificity, ROC-AUC at threshold 0.5 (None if undefined,
  all None with a count if the model output non-finite probabilities)."""
  bad = int(np.sum(~np.isfinite(probs)))
  if bad:
    logging.warning("%d of %d validation probabilities are not finite", bad, len(probs))
    keys = ("loss", "auc", "accuracy", "sensitivity", "specificity")
    return {**dict.fromkeys(keys), "non_finite_outputs": bad}
  point = compute_metrics(labels, probs, 0.5)
  summary = {"loss": float(losses.mean()), "auc": point["roc_auc"]}
  summary.update({k: point[k] for k in ("accuracy", "sensitivity", "specificity")})
  return {k: None if np.isnan(v) else v for k, v in summary.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest usable checkpoint; returns the state."""
  config_lib.validate(config)
  checkpointing.check_workdir_compatible(workdir, config)
  fresh_start = not any(p.name.isdigit() for p in checkpointing.checkpoint_dir(workdir).glob("*"))
  if config.init_from and fresh_start:  # Before the data is read; a resume does not need it.
    config_lib.check_init_from(config.init_from)
  is_chief = jax.process_index() == 0
  if is_chief:  # For people: the checkpoints hold the config that resuming and evaluation read.
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  mesh = parallel.create_mesh()
  streamed = input_pipeline.resolve_input_mode(config) == "stream"
  train_data, val_data = input_pipeline.load_train_and_eval(config, stream=streamed)
  # A final fit on train+val: the val metrics are still logged, but no 'best' checkpoint is chosen
  # by them ('best' is then the latest).
  held_out = input_pipeline.eval_is_held_out(config)
  if not held_out:
    logging.warning("config.eval_split=%r is part of config.train_split=%r: its metrics are not "
                    "held out and choose no 'best' checkpoint", config.eval_split, config.train_split)  # fmt: skip
  steps_per_epoch = optim.count_steps_per_epoch(config, len(train_data))
  total_steps = steps_per_epoch * config.num_epochs
  tx = optim.create_optimizer(
    config, steps_per_epoch, total_steps, models.head_modules(config.model)
  )
  graphdef, state = create_train_state(config, tx)
  # Without a held-out split no best is tracked (Orbax would warn at every save that no metric
  # came), unless this workdir already holds one: tracking keeps it from being deleted.
  track_best = held_out or checkpointing.has_best(workdir)
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints, track_best=track_best)
  if config.init_from and not manager.all_steps():
    state = init_from_pretrained(state, config)
  state = jax.device_put(state, parallel.replicated(mesh))
  p_train, p_eval = make_parallel_steps(mesh, graphdef, tx, config, streamed)
  if streamed:
    step_fn = p_train
  else:
    train_images = input_pipeline.device_cache(mesh, train_data)
    step_fn = lambda state, batch: p_train(state, train_images, batch)  # noqa: E731
  data_iter = input_pipeline.train_iterator(
    input_pipeline.train_dataset(train_data, config.batch_size, config.seed), streamed
  )
  restored = checkpointing.restore_latest_usable(manager, checkpointing.abstract_like(state))
  if restored:
    step, state, iter_state = restored
    data_iter.set_state(iter_state)
    logging.info("Resumed from checkpoint step %d in %s", step, workdir)
  start_step = int(state.step)
  if is_chief:
    logging.info("%s: %d train / %d %s examples, %d devices, %d steps of %d, input %s",
                 config.dataset, len(train_data), len(val_data), input_pipeline.eval_name(config),
                 jax.device_count(), total_steps, config.batch_size,
                 "streamed" if streamed else "cached")  # fmt: skip

  def validate(state: TrainState, step: int, epoch: int):
    probs, losses = predict_split(p_eval, state, val_data, mesh, config.eval_batch_size)
    summary = summarize(val_data.labels, probs, losses)
    if not held_out:
      return summary, None
    auc = summary["auc"] if summary["auc"] is not None else summary["accuracy"]
    return summary, {checkpointing.VAL_METRIC: -1.0 if auc is None else auc}  # -1: never the best.

  t_start = time.perf_counter()
  state, val_summary = loop.run_steps(
    config, workdir, mesh, manager, state, step_fn, data_iter, steps_per_epoch,
    on_epoch_end=validate,
  )  # fmt: skip
  logging.info("Process %d decoded %d images (%s input)", jax.process_index(),
               image_prep.decode_count(), "streamed" if streamed else "cached")  # fmt: skip
  if is_chief and start_step < total_steps:
    metric_writers.write_train_summary(
      workdir, config, len(train_data), time.perf_counter() - t_start, val_summary,
      input_pipeline.eval_name(config),
    )  # fmt: skip
  elif is_chief:
    print(f"Training in {workdir} is already complete ({total_steps} steps); nothing to do.")
  if is_chief:
    print(f"Outputs in {workdir}: checkpoints/, metrics.jsonl, tensorboard/, train_summary.json.\n"
          f"Next: python -m covid_flax.evaluate --workdir={workdir}  (test metrics, plots, report)")  # fmt: skip
  return state


def abstract_train_state(config: ml_collections.ConfigDict, mesh) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, shape/dtype/sharding tree) of a TrainState for `config`, for restoring in
  evaluation: the optimizer state has the same structure whatever the schedule's length."""
  tx = optim.create_optimizer(config, 1, 2, models.head_modules(config.model))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.from_config(config)))
  state = jax.eval_shape(lambda: create_train_state(config, tx)[1])
  sharding = parallel.replicated(mesh)
  return graphdef, jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state
  )

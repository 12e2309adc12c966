"""Self-supervised pretraining (SimCLR, Chen et al. 2020) of a classifier's encoder on the training
images, labels unused; `covid_flax.pretrain` is its command line.

Two independently augmented views of each image (the config's aug_* fields, usually stronger than
for supervised training) go through the encoder and a projection head; the NT-Xent loss pulls the
two views of an image together and pushes all other images of the global batch away. The step is
written per device like `train.train_step` (embeddings all-gathered over `data`, gradients and
BatchNorm statistics averaged); checkpoints are Orbax (resume by running the same command again).
`load_encoder` puts the pretrained encoder into a classifier (`config.init_from`).
"""

import functools
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

from covid_flax import (
  checkpointing,
  config_lib,
  input_pipeline,
  loop,
  models,
  optim,
  parallel,
)
from covid_flax.parallel import DATA_AXIS
from covid_flax.preprocess import augmented_batch, normalize


class SimCLRModel(nnx.Module):
  """A classifier's encoder (its `features`, globally average-pooled) and a 2-layer projection
  head. The encoder keeps the classifier's parameter names, so they transfer one to one."""

  def __init__(self, encoder: nnx.Module, image_size: int, projection_dim: int, *, rngs: nnx.Rngs):
    self.encoder = encoder
    dummy = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
    width = encoder.features(dummy).shape[-1]
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.projection = nnx.Linear(width, projection_dim, rngs=rngs)

  def __call__(
    self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
  ) -> jax.Array:
    features = self.encoder.features(x, train=train, rngs=rngs).mean(axis=(1, 2))
    z = self.projection(nnx.relu(self.hidden(features.astype(jnp.float32))))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """NT-Xent over the *global* batch, for this device's anchors: both views of every example of
  every device are the candidates (all-gathered over `data`), the other view the positive.
  z1, z2: (n, d) unit vectors of the two views of this device's n examples. Returns the mean loss
  of this device's 2n anchors and the fraction whose positive scores highest."""
  n = z1.shape[0]
  all1 = jax.lax.all_gather(z1, DATA_AXIS, tiled=True)
  all2 = jax.lax.all_gather(z2, DATA_AXIS, tiled=True)
  big_n = all1.shape[0]
  candidates = jnp.concatenate([all1, all2])  # (2N, d)
  mine = jax.lax.axis_index(DATA_AXIS) * n + jnp.arange(n)
  self_idx = jnp.concatenate([mine, big_n + mine])
  positive = jnp.concatenate([big_n + mine, mine])
  logits = jnp.concatenate([z1, z2]) @ candidates.T / temperature
  logits = jnp.where(jax.nn.one_hot(self_idx, 2 * big_n, dtype=bool), -1e9, logits)
  pos_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
  loss = jax.nn.logsumexp(logits, axis=1) - pos_logit
  accuracy = jnp.argmax(logits, axis=1) == positive
  return loss.mean(), accuracy.mean()


def load_encoder(
  pretrain_workdir: str,
  config: ml_collections.ConfigDict,
  params: nnx.State,
  model_state: nnx.State,
) -> tuple[nnx.State, nnx.State]:
  """`params` and `model_state` of a fresh classifier with every encoder variable replaced by the
  latest checkpoint of a `covid_flax.pretrain` run in `pretrain_workdir`; the head stays fresh."""
  where = f"config.init_from={pretrain_workdir!r}"
  if not checkpointing.checkpoint_dir(pretrain_workdir).is_dir():
    weights = sorted(p.name for p in epath.Path(pretrain_workdir).glob("*.safetensors"))
    hint = f" or one of its weights files {weights}" if weights else ""
    raise config_lib.ConfigError(
      f"{where} has no checkpoints; give the --workdir of a python -m covid_flax.pretrain run{hint}"
    )
  saved = checkpointing.load_saved_config(pretrain_workdir)
  if saved.get("model") != config.model:
    raise config_lib.ConfigError(
      f"{where} pretrained a {saved.get('model')!r} encoder, but config.model={config.model!r}"
    )
  manager = checkpointing.create_manager(pretrain_workdir, read_only=True, track_best=False)
  step = manager.latest_step()
  abstract = abstract_pretrain_state(saved)
  try:
    state, _ = checkpointing.restore(manager, step, abstract)
  except Exception as e:
    raise checkpointing.CheckpointError(
      f"{where}: pretraining checkpoint step {step} does not restore ({e})"
    ) from e
  head = nnx.eval_shape(lambda: models.from_config(config)).HEAD_MODULES  # Not transferred.

  def transfer(fresh: nnx.State, pretrained: nnx.State) -> nnx.State:
    fresh_flat = dict(nnx.to_flat_state(fresh))
    for path, value in nnx.to_flat_state(pretrained["encoder"]):
      if path[0] not in head and path in fresh_flat:
        if fresh_flat[path].shape != value.shape:
          raise config_lib.ConfigError(
            f"{where}: encoder variable {'/'.join(map(str, path))} has shape {value.shape}, "
            f"the model needs {fresh_flat[path].shape}"
          )
        fresh_flat[path] = value
    return nnx.from_flat_state(fresh_flat)

  return transfer(params, state.params), transfer(model_state, state.model_state)


class PretrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: nnx.State  # {'encoder': the classifier's encoder and head, 'hidden', 'projection'}.
  model_state: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


def create_pretrain_state(
  config: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, PretrainState]:
  encoder = models.from_config(config, config.seed)
  model = SimCLRModel(
    encoder, config.image_size, config.ssl_projection_dim, rngs=nnx.Rngs(config.seed + 1)
  )
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  state = PretrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(config.seed)),
  )
  return graphdef, state


def abstract_pretrain_state(config: ml_collections.ConfigDict) -> PretrainState:
  """Shapes, dtypes and a single-device sharding of a PretrainState, for restoring its encoder."""
  tx = optim.create_optimizer(config, 1, 2)
  state = jax.eval_shape(lambda: create_pretrain_state(config, tx)[1])
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def pretrain_step(
  state: PretrainState,
  images: jax.Array,
  batch: dict[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
) -> tuple[PretrainState, dict[str, jax.Array]]:
  """One SimCLR step for this device's share of the global batch (indices into the device-resident
  uint8 `images`; labels unused)."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  key1, key2, dropout_key = jax.random.split(step_key, 3)
  n = batch["index"].shape[0]
  example_ids = jax.lax.axis_index(DATA_AXIS) * n + jnp.arange(n)
  view_config = ml_collections.ConfigDict({**config.to_dict(), "augment": True})
  views = [
    augmented_batch(images, batch["index"], example_ids, key, view_config) for key in (key1, key2)
  ]
  views = normalize(jnp.concatenate(views)).astype(models.compute_dtype(config))
  dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(DATA_AXIS))
  # Parameters enter as per-device (varying) values, so each device differentiates its own loss and
  # the explicit pmean below averages; left replicated, shard_map's autodiff would sum them.
  params = jax.lax.pcast(state.params, DATA_AXIS, to="varying")
  model = nnx.merge(graphdef, params, state.model_state)

  def loss_fn(model):
    z = model(views, train=True, rngs=nnx.Rngs(dropout=dropout_key))
    return nt_xent(z[:n], z[n:], config.ssl_temperature)

  grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
  (loss, accuracy), grads = grad_fn(model)
  grads = jax.lax.pmean(grads, DATA_AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics = jax.lax.pmean({"loss": loss, "accuracy": accuracy}, DATA_AXIS)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(grads))
  metrics["finite"] = finite
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    model_state=nnx.state(model, nnx.Not(nnx.Param)),
    opt_state=opt_state,
  )
  return loop.skip_if_not_finite(new_state, state, finite, config), metrics


def make_parallel_step(
  mesh: jax.sharding.Mesh,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
) -> Callable:
  """`pretrain_step` jitted over the mesh: state and image cache replicated, batches split."""
  step = jax.shard_map(
    functools.partial(pretrain_step, graphdef=graphdef, tx=tx, config=config),
    mesh=mesh,
    in_specs=(P(), P(), P(DATA_AXIS)),
    out_specs=(P(), P()),
  )
  return jax.jit(step, donate_argnums=0)


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> PretrainState:
  """Pretrains in `workdir`, resuming from its latest usable checkpoint; returns the state."""
  config_lib.validate(config)
  for field in ("sam_rho", "mixstyle_prob"):  # Sharpness-aware minimisation, MixStyle.
    if config[field] > 0:
      raise config_lib.ConfigError(
        f"config.{field}={config[field]} is for `covid_flax.main` only; pretrain with {field}=0"
      )
  checkpointing.check_workdir_compatible(workdir, config)
  if input_pipeline.resolve_input_mode(config) == "stream":
    raise config_lib.ConfigError(
      f"config.input_mode={config.input_mode!r} means streaming here, and pretraining reads from "
      "a device cache only: pretrain with input_mode=cache on a split that fits in memory"
    )
  mesh = parallel.create_mesh()
  data = input_pipeline.keep_sources(input_pipeline.load_split(config, config.train_split), config)
  steps_per_epoch = optim.count_steps_per_epoch(config, len(data))
  total_steps = steps_per_epoch * config.num_epochs
  tx = optim.create_optimizer(config, steps_per_epoch, total_steps)
  graphdef, state = create_pretrain_state(config, tx)
  state = jax.device_put(state, parallel.replicated(mesh))
  p_step = make_parallel_step(mesh, graphdef, tx, config)
  cache = input_pipeline.device_cache(mesh, data)
  data_iter = input_pipeline.train_iterator(
    input_pipeline.train_dataset(data, config.batch_size, config.seed)
  )
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints, track_best=False)
  restored = checkpointing.restore_latest_usable(manager, checkpointing.abstract_like(state))
  if restored:
    step, state, iter_state = restored
    data_iter.set_state(iter_state)
    logging.info("Resumed pretraining from checkpoint step %d in %s", step, workdir)
  state, _ = loop.run_steps(
    config, workdir, mesh, manager, state, lambda state, batch: p_step(state, cache, batch), data_iter,
    steps_per_epoch, log_split="pretrain",
  )  # fmt: skip
  if jax.process_index() == 0:
    print(f"Pretrained encoder in {workdir} (step {int(state.step)}). Fine-tune with: "
          f"python -m covid_flax.main --config=... --config.init_from={workdir} --workdir=...")  # fmt: skip
  return state

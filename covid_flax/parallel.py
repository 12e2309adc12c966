"""Devices, meshes and hosts: one `data` mesh axis over every device of every process."""

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from covid_flax import config_lib

DATA_AXIS = "data"

_CLUSTER_ENV_VARS = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Starts `jax.distributed` when the config or a cluster environment asks for it.

  Explicit `config.coordinator_address`/`num_processes`/`process_id` win; with only
  `config.distributed=True`, or on SLURM / Cloud TPU, JAX detects the cluster itself. CPU processes
  talk through gloo collectives.
  """
  explicit = bool(config.coordinator_address)
  in_cluster = any(os.environ.get(v) for v in _CLUSTER_ENV_VARS)
  if not (config.distributed or explicit or in_cluster):
    return
  if jax.distributed.is_initialized():
    return
  config_lib.validate_distributed(config)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(
    initialization_timeout=config.distributed_timeout_s,
    heartbeat_timeout_seconds=config.distributed_timeout_s,
  )
  if explicit:
    kwargs.update(
      coordinator_address=config.coordinator_address,
      num_processes=config.num_processes,
      process_id=config.process_id,
    )
  jax.distributed.initialize(**kwargs)
  logging.info(
      "jax.distributed: process %d of %d, %d local / %d global devices",
      jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
  )  # fmt: skip


def create_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all global devices. Auto axis types: Explicit sharding breaks some layers."""
  return jax.make_mesh(
    (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(
  mesh: jax.sharding.Mesh, local_batch: dict[str, np.ndarray]
) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded along `data`."""
  sharding = batch_sharded(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def global_batch_from_whole(
  mesh: jax.sharding.Mesh, batch: dict[str, np.ndarray]
) -> dict[str, jax.Array]:
  """Global arrays sharded along `data` from a whole global batch that every process holds: each
  device takes its own rows, in whatever order the mesh lists the devices of the processes."""
  sharding = batch_sharded(mesh)
  return {
    k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
    for k, v in batch.items()
  }


def to_host(x: jax.Array) -> np.ndarray:
  """A global array, whole, on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (nothing to do with one process): for work that
  process 0 does on shared files (preparing a dataset, moving checkpoints) before the others read."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)

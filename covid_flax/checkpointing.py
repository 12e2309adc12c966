"""Orbax checkpoints in `workdir/checkpoints`: train state, data-iterator state and config.

Keeps the last `config.keep_checkpoints` steps plus the best by validation AUC. Orbax writes each
step into a temporary directory and renames it when complete, so a run killed mid-save leaves no
step that looks complete. Nothing here uses pickle: arrays go to OCDBT/Zarr, the rest to JSON.
"""

import json
import os
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from covid_flax import config_lib

VAL_METRIC = "val_auc"


class CheckpointError(RuntimeError):
  pass


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[VAL_METRIC]


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def create_manager(
  workdir: str, keep: int = 3, *, read_only: bool = False
) -> ocp.CheckpointManager:
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
    best_fn=_best_metric,  # Needed again on every reopen for best_step().
    best_mode="max",
    preservation_policy=policies.AnyPreservationPolicy(
      [
        policies.LatestN(keep),
        policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
      ]
    ),
    create=not read_only,
    read_only=read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir).absolute(), options=options)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iter_state: dict,
  config: ml_collections.ConfigDict,
  metrics: dict[str, float] | None = None,
) -> None:
  """Starts an (asynchronous) save; call `manager.wait_until_finished()` before exiting."""
  try:
    manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=ocp.args.JsonSave(data_iter_state),
        config=ocp.args.JsonSave(config.to_dict()),
      ),
      metrics=metrics,
    )
  except OSError as e:
    raise CheckpointError(
      f"saving checkpoint step {step} in {checkpoint_dir('.')} failed ({e}); "
      "older checkpoints are intact"
    ) from e


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data_iter=ocp.args.JsonRestore()
    ),
  )
  return restored.state, restored.data_iter


def restore_latest_usable(
  manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[int, Any, dict] | None:
  """(step, state, data-iterator state) of the newest checkpoint that restores, or None if there are
  none. A corrupt checkpoint is reported and skipped; if every one is corrupt this raises, and
  nothing is deleted."""
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      state, data_iter = restore(manager, step, abstract_state)
      return step, state, data_iter
    except Exception as e:  # Orbax raises many types for damaged files.
      logging.error("Checkpoint step %d in %s is unusable (%s); trying an older one.", step,
                    manager.directory, e)  # fmt: skip
  if steps:
    raise CheckpointError(
      f"none of the checkpoints {steps} in {manager.directory} could be restored; they were "
      "left untouched. Move them away (or use another --workdir) to start over."
    )
  return None


def load_saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with checkpoint `step` (default: the latest)."""
  manager = create_manager(workdir, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
  path = epath.Path(manager.directory) / str(step) / "config" / "metadata"
  if not path.exists():
    raise CheckpointError(f"checkpoint step {step} has no saved config at {path}")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_workdir_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose saved config differs in shape-changing fields; with
  `config.overwrite` the old checkpoints are moved aside (never deleted) instead."""
  ckpt_dir = checkpoint_dir(workdir)
  if not ckpt_dir.exists() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    return
  try:
    saved = load_saved_config(workdir).to_dict()
  except CheckpointError:
    return  # Nothing complete to compare with; restore_latest_usable reports it.
  diff = config_lib.incompatible_fields(saved, config)
  if not diff:
    return
  listing = ", ".join(f"{f}: saved {a!r} vs now {b!r}" for f, (a, b) in diff.items())
  if not config.overwrite:
    raise config_lib.ConfigError(
      f"{workdir} holds a run with an incompatible config ({listing}). Use another --workdir, "
      "or pass --config.overwrite=True to move the old checkpoints aside and start over."
    )
  if jax.process_index() == 0:
    aside = ckpt_dir.parent / f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(ckpt_dir, aside)
    logging.warning("config.overwrite: moved the old run's checkpoints (%s) to %s", listing, aside)

"""Orbax checkpoints in `workdir/checkpoints`: train state, data-iterator state and config.

Keeps the last `config.keep_checkpoints` steps plus the best by validation AUC. Orbax writes each
step into a temporary directory and renames it when complete, so a run killed mid-save leaves no
step that looks complete. Nothing here uses pickle: arrays go to OCDBT/Zarr, the rest to JSON.
"""

import contextlib
import errno
import os
import time
import traceback
from typing import Any, Iterator, NoReturn

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from covid_flax import config_lib, errors, parallel

VAL_METRIC = "val_auc"


class CheckpointError(errors.UserError, RuntimeError):
  pass


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[VAL_METRIC]


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def create_manager(
  workdir: str, keep: int = 3, *, read_only: bool = False, track_best: bool = True
) -> ocp.CheckpointManager:
  """Keeps the last `keep` steps, and with `track_best` the best by val AUC too."""
  policies = [ocp.checkpoint_managers.LatestN(keep)]
  if track_best:
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False))  # fmt: skip
  options = ocp.CheckpointManagerOptions(
    best_fn=_best_metric if track_best else None,  # Needed again on every reopen for best_step().
    best_mode="max",
    preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
    create=not read_only,
    read_only=read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir).absolute(), options=options)


def has_best(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint chosen by val AUC (a best kept beside the last k)."""
  if not checkpoint_dir(workdir).exists():
    return False
  return create_manager(workdir, read_only=True).best_step() is not None


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iter_state: dict,
  config: ml_collections.ConfigDict,
  metrics: dict[str, float] | None = None,
) -> None:
  """Starts an (asynchronous) save; call `wait(manager)` before exiting. A failure of this save or
  of the previous one (disk full, ...) raises CheckpointError; older checkpoints stay intact."""
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
  except Exception as e:  # Orbax wraps I/O errors of the background thread in its own types.
    raise _save_error(manager, e) from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for pending saves; their failure raises CheckpointError."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _save_error(manager, e) from e


def _save_error(manager: ocp.CheckpointManager, error: Exception) -> CheckpointError:
  complete = sorted(manager.all_steps())
  return CheckpointError(
    f"saving a checkpoint in {manager.directory} failed ({type(error).__name__}: "
    f"{str(error)[:300]}). The complete checkpoints {complete} are intact; free disk space "
    "and run the same command again to resume."
  )


@contextlib.contextmanager
def disk_full_is_an_error(manager: ocp.CheckpointManager, workdir: str) -> Iterator[None]:
  """Turns 'no space left' while a training loop writes its logs into a CheckpointError that names
  the intact checkpoints (failed saves are mapped by `save` and `wait` themselves)."""
  try:
    yield
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise CheckpointError(
      f"disk full while writing to {workdir} ({e}); the complete checkpoints "
      f"{sorted(manager.all_steps())} are intact. Free space and run the same command to resume."
    ) from e


def exit_after_signal(manager: ocp.CheckpointManager, signum: int, step: int) -> NoReturn:
  """Ends a run stopped by `signum` once its checkpoint of `step` is on disk."""
  wait(manager)
  logging.warning("Signal %d: saved step %d. Run the same command again to resume.", signum, step)
  print(f"Stopped by signal {signum} at step {step}; checkpoint saved in {manager.directory}. "
        "Run the same command to resume.")  # fmt: skip
  raise SystemExit(128 + signum)


def describe_error(error: BaseException, limit: int = 300) -> str:
  """One line for a failed restore: Orbax and TensorStore errors carry pages of specs."""
  text = str(error).split(" See full TensorStore details")[0].strip().splitlines()
  line = f"{type(error).__name__}: {text[0] if text else ''}"
  return line if len(line) <= limit else line[: limit - 3] + "..."


def abstract_like(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`: the restore target for Orbax."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


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
  none. Unusable newer checkpoints are reported and moved to `corrupt_checkpoints/` beside the
  checkpoint directory (so the run can save those steps again); if none is usable this raises and
  moves nothing."""
  steps = sorted(manager.all_steps(), reverse=True)
  bad = {}
  for step in steps:
    try:
      state, data_iter = restore(manager, step, abstract_state)
    except Exception as e:  # Orbax raises many types for damaged files.
      logging.error("Checkpoint step %d in %s is unusable (%s); trying an older one.", step,
                    manager.directory, describe_error(e))  # fmt: skip
      bad[step] = "".join(traceback.format_exception(e))
      continue
    if bad and jax.process_index() == 0:
      aside = epath.Path(manager.directory).parent / "corrupt_checkpoints"
      aside.mkdir(parents=True, exist_ok=True)
      for b, details in bad.items():
        target = aside / f"{b}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(epath.Path(manager.directory) / str(b), target)
        (target / "restore_error.txt").write_text(details)  # The whole error, with the checkpoint.
        logging.warning("Moved unusable checkpoint step %d to %s (the error: restore_error.txt)",
                        b, target)  # fmt: skip
    if bad:
      parallel.sync_processes("moved unusable checkpoints")
      manager.reload()
    return step, state, data_iter
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
  try:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  except Exception as e:  # Missing or damaged item: Orbax raises several types.
    raise CheckpointError(
      f"checkpoint step {step} in {manager.directory} has no readable saved config ({e})"
    ) from e
  return ml_collections.ConfigDict(restored.config)


# What a run writes in its workdir; `config.overwrite` moves all of it aside together, so that no
# old evaluation (its operating point, say) or log is taken for the new run's.
RUN_OUTPUTS = ("checkpoints", "corrupt_checkpoints", "eval", "metrics.jsonl", "tensorboard",
               "train_summary.json", "config.json")  # fmt: skip


def check_workdir_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose saved config differs in fields that change the train state or
  data order; with `config.overwrite` the old run's outputs are moved to `workdir/old-<time>/`
  (never deleted) instead."""
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
      "or pass --config.overwrite=True to move the old run aside and start over."
    )
  if jax.process_index() == 0:
    aside = ckpt_dir.parent / f"old-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for name in RUN_OUTPUTS:
      if (ckpt_dir.parent / name).exists():
        os.rename(ckpt_dir.parent / name, aside / name)
    logging.warning("config.overwrite: moved the old run (%s) to %s", listing, aside)
  parallel.sync_processes("overwrite moved the old run")

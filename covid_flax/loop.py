"""The step loop shared by training and pretraining: logging, NaN checks, checkpoints, signals.

One place decides when metrics come to the host, when a checkpoint is saved and when a signal
stops the run, so that the guarantees in README ("Reliability") hold for both entry points:
every step is checked for non-finite values before any save; a signal to any process stops all
of them at one agreed step, saved; a full disk is a `CheckpointError` naming the intact steps.
"""

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from covid_flax import checkpointing, errors, interrupts, metric_writers, parallel


class NonFiniteLossError(errors.UserError, FloatingPointError):
  pass


# (state, global batch) -> (state, metrics with at least "loss", "accuracy", "finite").
StepFn = Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]
# (state, step, epoch) -> (val summary to log, {VAL_METRIC: value} for the best checkpoint, or
# None: this checkpoint is no candidate).
EpochEndFn = Callable[[Any, int, int], tuple[dict[str, Any], dict[str, float] | None]]


def skip_if_not_finite(
  new_state: Any, state: Any, finite: jax.Array, config: ml_collections.ConfigDict
) -> Any:
  """For steps (under jit): with `config.nan_policy='skip'`, a non-finite step keeps the old state
  but still advances the step count, so the next batch comes."""
  if config.nan_policy != "skip":
    return new_state
  skipped = state.replace(step=state.step + 1)
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_state, skipped)


def run_steps(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: jax.sharding.Mesh,
  manager: ocp.CheckpointManager,
  state: Any,
  step_fn: StepFn,
  data_iter: Any,
  steps_per_epoch: int,
  *,
  log_split: str = "train",
  on_epoch_end: EpochEndFn | None = None,
) -> tuple[Any, dict[str, Any] | None]:
  """Runs `step_fn` from `state.step` to `config.num_epochs` epochs; returns the final state and
  the last `on_epoch_end` summary. Saves at every epoch end (with the epoch-end metric for the
  best checkpoint), every `config.checkpoint_every_steps` and on a signal, then exits 128+signal.
  With `config.nan_policy='skip'` the step must leave the state unchanged on a bad step
  (`skip_if_not_finite`)."""
  total_steps = steps_per_epoch * config.num_epochs
  start_step = int(state.step)
  writer = metric_writers.MetricWriter(workdir)
  bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
             disable=not (jax.process_index() == 0 and config.progress_bar))  # fmt: skip
  pending, epoch_summary = [], None
  t_log, steps_since_log = time.perf_counter(), 0
  with checkpointing.disk_full_is_an_error(manager, workdir), interrupts.StopRequested() as stop:
    for step in range(start_step, total_steps):
      epoch = step // steps_per_epoch + 1
      state, metrics = step_fn(state, parallel.global_batch(mesh, next(data_iter)))
      pending.append(metrics)
      steps_since_log += 1
      done = step + 1
      end_of_epoch = done % steps_per_epoch == 0
      log_due = done % config.log_every_steps == 0 or end_of_epoch
      signum = stop.agreed(at_sync_point=log_due) if done < total_steps else None
      every = config.checkpoint_every_steps
      save_due = end_of_epoch or signum is not None or bool(every and done % every == 0)
      if log_due or save_due:  # Every step is checked for non-finite values before a save.
        fetched, pending = jax.device_get(pending), []  # The only host sync of step metrics.
        bad = [m for m in fetched if not m["finite"]]
        if bad and config.nan_policy == "stop":
          first = done - len(fetched) + 1
          where = f"at step {done}" if first == done else f"between steps {first} and {done}"
          raise NonFiniteLossError(
            f"non-finite loss or gradient (loss={bad[0]['loss']}) {where}; the last good "
            f"checkpoint is kept in {checkpointing.checkpoint_dir(workdir)}"
          )
        summary = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "accuracy")}
        elapsed, t_log = time.perf_counter() - t_log, time.perf_counter()
        img_s = steps_since_log * config.batch_size / max(elapsed, 1e-9)
        steps_since_log = 0
        logged = {**summary, "img_per_s": img_s, "peak_rss_mib": metric_writers.peak_rss_mib()}
        writer.write(done, log_split, {**logged, "skipped": len(bad)}, epoch=epoch)
        bar.set_description(f"epoch {epoch}/{config.num_epochs}")
        bar.set_postfix(loss=f"{summary['loss']:.4f}", img_s=f"{img_s:.0f}")
      bar.update(1)
      if save_due:
        best = None
        if end_of_epoch and on_epoch_end is not None:
          epoch_summary, best = on_epoch_end(state, done, epoch)
          writer.write(done, "val", epoch_summary, epoch=epoch)
        checkpointing.save(manager, done, state, data_iter.get_state(), config, best)
        if end_of_epoch:
          metric_writers.trim_host_memory()
      writer.flush()
      if signum is not None:
        bar.close()
        checkpointing.exit_after_signal(manager, signum, done)
    bar.close()
    checkpointing.wait(manager)
    writer.close()
  return state, epoch_summary

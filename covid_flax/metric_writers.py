"""Scalars to TensorBoard (tensorboardX) and to `workdir/metrics.jsonl`, from process 0 only."""

import ctypes
import ctypes.util
import functools
import inspect
import json
import logging as pylogging
import os
import resource
import sys
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging
from tensorboardX import SummaryWriter


class MetricWriter:
  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, split: str, scalars: dict[str, Any], **fields: Any) -> None:
    """One JSONL record {step, split, **fields, **scalars}; scalars also go to TensorBoard."""
    if not self._active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items() if v is not None}
    for name, value in scalars.items():
      self._tb.add_scalar(f"{split}/{name}", value, step)
    record = {"step": step, "split": split, **fields, **scalars}
    self._jsonl.write(json.dumps(record) + "\n")

  def flush(self) -> None:
    if self._active:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()


# Library warnings that say nothing a user can act on.
_NOISE = (
  "OpenCV is not installed",
  "Given directory is read only",
  "A polynomial schedule was set",
  "CheckpointManagerOptions.read_only=True",
  "has no dataset_info.json",
)


class _DropLibraryInfo(pylogging.Filter):
  """Keeps info from covid_flax only (Orbax logs every save step, TFDS every dataset info it
  reads), and warnings and errors except _NOISE."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.levelno >= pylogging.WARNING:
      return not any(text in record.getMessage() for text in _NOISE)
    return f"{os.sep}covid_flax{os.sep}" in record.pathname


def _drop_abandoned_coroutines(unraisable) -> None:
  """Orbax leaves the reads of a damaged checkpoint's other arrays as coroutines that fail when
  collected: pages of "Exception ignored in: <coroutine ...>" after the one-line error."""
  if not inspect.iscoroutine(unraisable.object):
    sys.__unraisablehook__(unraisable)


def quiet_library_logs() -> None:
  absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())
  sys.unraisablehook = _drop_abandoned_coroutines


def peak_rss_mib() -> float:
  """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def _libc_malloc_trim():
  libc = ctypes.util.find_library("c")
  return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def trim_host_memory() -> None:
  """Hands the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

  Each epoch's validation and checkpoint buffers are freed but stay in glibc's arenas, and later
  allocations do not always fit in them, so peak RSS crept up epoch by epoch; trimming once an
  epoch keeps it flat (measured: docs/performance.md)."""
  if (trim := _libc_malloc_trim()) is not None:
    trim(0)


def write_train_summary(
  workdir: str,
  config,
  num_train_examples: int,
  seconds: float,
  val_summary: dict | None,
  val_name: str,
) -> None:
  """workdir/train_summary.json (training time summed over resumptions, the final val metrics).

  `val_name` names the data behind `val_summary` in the printed line (e.g. a CV fold).
  """
  path = os.path.join(workdir, "train_summary.json")
  previous = {}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
  summary = {
    "dataset": config.dataset,
    "model": config.model,
    "num_train_examples": num_train_examples,
    "train_time_s": previous.get("train_time_s", 0.0) + seconds,
    "devices": jax.device_count(),
    "device_kind": jax.devices()[0].device_kind,
    "final_val": val_summary,
  }
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)
  if val_summary:
    shown = {k: "n/a" if v is None else f"{v:.4f}" for k, v in val_summary.items()}
    print(f"Final {val_name}: accuracy {shown['accuracy']}, sensitivity "
          f"{shown['sensitivity']}, specificity {shown['specificity']}, AUC {shown['auc']}")  # fmt: skip

"""Graceful stops: SIGTERM/SIGINT become a flag that training loops check between steps."""

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequested:
  """Turns SIGTERM/SIGINT into a flag checked at step boundaries (main thread only)."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def agreed(self, at_sync_point: bool) -> int | None:
    """The signal to stop on, or None to go on; the same answer on every process.

    One process stops at the first step boundary after a signal. With several, a signal that reached
    some processes only (a pre-empted VM) or at different steps must still stop all of them at the
    same step, or the stopped one's checkpoint save (a collective) and the others' next train step
    would wait on each other forever; so processes decide together, at `at_sync_point` steps only
    (log steps: the loops sync with the host there anyway).
    """
    if jax.process_count() == 1:
      return self.signum
    if not at_sync_point:
      return None
    signums = np.ravel(multihost_utils.process_allgather(np.int32(self.signum or 0)))
    return next((int(s) for s in signums if s), None)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

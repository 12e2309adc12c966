"""Graceful stops: SIGTERM/SIGINT become a flag that training loops check between steps."""

import signal


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

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

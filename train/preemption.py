"""Stopping a run cleanly on SIGTERM (a preemption) or SIGINT (Ctrl-C).

Cloud TPU VMs (spot, preemptible, maintenance) get SIGTERM some seconds
before they go; without a handler the run dies where it stands and loses
every step since its last checkpoint (the paper presets save every 500).
While a `StopRequest` is open, the first SIGTERM or SIGINT is recorded
and acknowledged in one line: the loop finishes its step (or an
evaluation its batch), checkpoints the step and stops, before any
evaluation still due. A second SIGINT interrupts at once, as Ctrl-C always
did.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """A run stopped by a signal, after checkpointing the step it reached."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step, self.directory = signum, step, directory
    super().__init__(
        f'interrupted by {signal.Signals(signum).name} at step {step}; '
        f'checkpoint {step} saved in {directory}: continue with --resume.')

  @property
  def exit_code(self) -> int:
    """128 + the signal's number, as a shell reports a process it stopped."""
    return 128 + self.signum


class StopRequest:
  """A context in which SIGTERM and SIGINT ask the run to stop.

  ``signum`` is the first signal received (0: none). Handlers are only set
  from the main thread (Python's rule); elsewhere nothing changes. The
  previous handlers come back on exit.

  Args:
    log: where the first signal's acknowledgement goes, ``[train] SIGTERM:
      `` followed by ``doing`` (which the loop sets to what it will do:
      finish the step, the evaluation's batch, the export). None: stderr.
  """

  def __init__(self, log: Callable[[str], object] | None = None):
    self.signum = 0
    self.doing = 'stopping after this step'
    self._log = log
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
      return  # said once
    self.signum = signum
    second = (' (Ctrl-C again stops at once)' if signum == signal.SIGINT
              else '')
    self._say(f'[train] {signal.Signals(signum).name}: {self.doing}{second}')

  def _say(self, line: str) -> None:
    """``log(line)``, or straight to stderr's file descriptor when that
    fails: a handler runs between two bytecodes of the loop, possibly inside
    a print to the same stream (a reentrant write raises RuntimeError)."""
    if self._log is not None:
      try:
        self._log(line)
        return
      except Exception:  # pylint: disable=broad-except
        pass
    try:
      os.write(sys.stderr.fileno(), (line + '\n').encode())
    except (OSError, ValueError, AttributeError):
      pass

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

"""``python -m train --config NAME [overrides]``: see `train.cli`."""

import logging
import os
import sys

from train.cli import main

if __name__ == '__main__':
  code = main()
  if code:
    # The one line that says why is written. What orbax's threads and
    # tasks report as the interpreter goes down after it repeats the cause
    # in dozens of lines: its writer thread failing on the executors shut
    # down (a second Ctrl-C during a save, exit 130), or the reads of a
    # damaged checkpoint collected unawaited ("Exception ignored in").
    logging.disable(logging.ERROR)
    sys.unraisablehook = lambda unraisable: None
  if code == 130:
    # Ctrl-C (a second one stops at once): XLA may still be compiling in
    # its own threads, and the interpreter going down under them aborted
    # (exit 134 or 139, after seconds of waiting, where 130 was said).
    # Everything the run wrote is closed by now; nothing else is owed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)

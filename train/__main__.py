"""``python -m train --config NAME [overrides]``: see `train.cli`."""

import logging
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
  sys.exit(code)

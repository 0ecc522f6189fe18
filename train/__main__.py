"""``python -m train --config NAME [overrides]``: see `train.cli`."""

import logging
import sys

from train.cli import main

if __name__ == '__main__':
  code = main()
  if code == 130:
    # Stopped at once by a second Ctrl-C during a save: orbax's writer
    # thread then fails as the interpreter shuts its executors down, and
    # had logged 45 lines after the one line that already says so.
    logging.disable(logging.ERROR)
  sys.exit(code)

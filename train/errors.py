"""The error a bad input raises, and what a one-line refusal quotes of an
error from a library.

A module of its own, importing nothing but sys: the CLI needs it before
anything heavy (train.data pulls in grain) is loaded.
"""

import sys


class ConfigError(ValueError):
  """A bad configuration value or input (reported as one line)."""


def first_line(e: BaseException) -> str:
  """An error's first line (its type's name when it has no message)."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def say(line: str) -> None:
  """``line`` on stderr in one write, its newline in it: print's separate
  write of the newline let orbax's threads (their tracebacks after a failed
  restore) write onto the end of the one error line."""
  sys.stderr.write(line + '\n')
  sys.stderr.flush()

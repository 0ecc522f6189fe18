"""The error a bad input raises, and what a one-line refusal quotes of an
error from a library.

A module of its own, importing nothing: the CLI needs it before anything
heavy (train.data pulls in grain) is loaded.
"""


class ConfigError(ValueError):
  """A bad configuration value or input (reported as one line)."""


def first_line(e: BaseException) -> str:
  """An error's first line (its type's name when it has no message)."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0]

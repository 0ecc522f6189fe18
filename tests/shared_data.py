"""The real datasets the tests read: $LRO_DATA_DIR, else ../shared/data.

One place decides where they are and how a test skips without them, so a
machine without the folder (a user's clone) skips the same tests everywhere.
"""

import pathlib

import pytest

from train import data

DATA_DIR = data.default_data_dir()

# For tests that read several datasets: skips unless the folder is there.
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(),
                                reason=f"no shared data at {DATA_DIR}")


def require(*folders: str) -> pathlib.Path:
  """Skips the calling test unless each folder is under DATA_DIR.

  Args:
    folders: dataset folder names, e.g. ``'boolq'``, ``'ARC-Challenge'``.

  Returns:
    DATA_DIR.
  """
  for folder in folders:
    if not (DATA_DIR / folder).is_dir():
      pytest.skip(f"no {folder} under {DATA_DIR}")
  return DATA_DIR

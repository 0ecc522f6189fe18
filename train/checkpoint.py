"""orbax glue: one checkpoint = {train state, data iterator, config}.

The train state is a plain pytree ``{'step', 'params', 'opt_state'}`` of
arrays (LoRA factors and optimizer state only; the frozen base is reloaded
from its own file, and a PiSSA / LoRA-GA run's initial factors, which move
part of it into the adapter, are saved once beside the checkpoints by
`train.loop`), saved with ``StandardSave`` and restored into the exact
shardings of a fresh run, so a resumed run continues bit for bit. The grain
iterator's position and the config (JSON) are saved beside it; nothing is
pickled.

A step folder is complete once orbax has written ``commit_success.txt`` in
it. Where a rename is not atomic (gcsfuse and other object-store mounts)
a crash mid-save can leave a numbered folder holding part of a
checkpoint; such folders newer than the newest complete one are moved
aside (``<step>.incomplete``, never deleted) before orbax lists the
steps, so a resume takes the newest complete checkpoint. Orbax's own
temporary folders (``<step>.orbax-checkpoint-tmp-*``, unfinished writes)
are removed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import jax

from train.errors import first_line

STATE = 'state'
DATA = 'data'
CONFIG = 'config'
# Written by orbax into a step folder as its last file (in the temporary
# folder, just before the rename, where renames are atomic).
COMMIT_FILE = 'commit_success.txt'
TMP_MARK = '.orbax-checkpoint-tmp'
# What a save writes beyond the state's arrays (orbax's metadata files,
# the config, the data iterator's position), with room to spare.
SAVE_OVERHEAD_BYTES = 1 << 20


class StateMismatch(ValueError):
  """A readable checkpoint whose state is not this run's: another shape,
  dtype or structure (another base model, other settings), not damage."""


class CheckpointDamaged(OSError):
  """A checkpoint whose files cannot be read back: deleted, truncated or
  corrupt since it was written."""


def _innermost(e: BaseException) -> BaseException:
  """The exception at the bottom of ``e``'s chain: orbax re-raises a
  failed read as a bare Exception ('Encountered error while reading array
  index: ...') whose cause is tensorstore's own account of it."""
  seen = {id(e)}
  while (nxt := e.__cause__ or e.__context__) is not None and (
      id(nxt) not in seen):
    seen.add(id(nxt))
    e = nxt
  return e


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


class _HeldErrors(logging.Filter):
  """Holds the ERROR records of orbax's threads (absl) and of its unread
  asyncio tasks during a save: shown after a save that went through,
  dropped after one that failed (its one line says what went wrong)."""

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
      self.held.append(record)
      return False
    return True


@contextlib.contextmanager
def _errors_held():
  held = _HeldErrors()
  loggers = [logging.getLogger(n) for n in ('absl', 'asyncio')]
  for logger in loggers:
    logger.addFilter(held)
  failed = True
  try:
    yield
    failed = False
  finally:
    if failed:
      gc.collect()  # an unread failed task reports when collected: now
    for logger in loggers:
      logger.removeFilter(held)
    if not failed:
      for record in held.held:
        logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def _stderr_dropped_on_failure(settle_s: float = 1.0):
  """Holds what is written to file descriptor 2 meanwhile: passed on if
  the block succeeds, dropped if it raises (after ``settle_s`` more for
  the threads still failing).

  A restore from a damaged checkpoint (or a save that fails part-way) fails
  in tensorstore's threads, whose callbacks into a closed asyncio loop
  print "Event loop is closed" tracebacks from C++ (not through logging or
  sys.stderr): hundreds of lines had buried the one error line the caller
  prints. Log records of absl and asyncio are held alike
  (:func:`_errors_held`).
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    failed = True
    try:
      with _errors_held():
        yield
      failed = False
    finally:
      if failed:
        gc.collect()
        time.sleep(settle_s)
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        held.seek(0)
        _pass_on(held.read())


def _pass_on(data: bytes) -> None:
  """Writes ``data`` (what file descriptor 2 received) to ``sys.stderr``.

  As bytes where it has a buffer; else as text: a Jupyter kernel's stderr
  (ipykernel's OutStream) and `contextlib.redirect_stderr`'s StringIO have
  none, and every save in a notebook had failed after writing, reported as
  'checkpoint 5 was not written' (a restore as an AttributeError). Never
  raises: the block it follows succeeded.
  """
  if not data:
    return
  try:
    out = getattr(sys.stderr, 'buffer', None)
    if out is not None:
      out.write(data)
    else:
      sys.stderr.write(data.decode('utf-8', 'replace'))
    sys.stderr.flush()
  except (AttributeError, OSError, TypeError, ValueError):
    pass  # no stderr to write to (None, closed): the lines are not errors


class Checkpointer:
  """A `CheckpointManager` over ``directory`` (created on first use).

  Args:
    directory: the checkpoint folder (run_dir/checkpoints).
    keep: how many checkpoints to keep.

  Attributes:
    set_aside: [(folder, new name)] of the incomplete step folders moved
      aside on opening (see the module's doc), for the caller to say so.
    removed_tmp: the names of orbax's temporary folders removed on opening.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 2):
    ocp = _ocp()
    self.directory = os.path.abspath(os.fspath(directory))
    self.set_aside: list[tuple[str, str]] = []
    self.removed_tmp: list[str] = []
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      self.removed_tmp = sorted(
          n for n in os.listdir(self.directory)
          if TMP_MARK in n and os.path.isdir(os.path.join(self.directory, n)))
      self.set_aside = set_aside_incomplete(self.directory)
    if jax.process_count() > 1:  # the others list the steps after that
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('lro_checkpoint_set_aside')
    # Synchronous saves: the LoRA state is small, and a save that has
    # returned is on disk, which is what a preempted run needs.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, keep), create=True,
        enable_async_checkpointing=False, cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator, config_json: str,
           *, force: bool = False) -> bool:
    """Saves one checkpoint; returns whether it was written.

    Raises:
      OSError: too little free space for it (one line, before anything is
        written; the checkpoints kept stay as they were).
    """
    self._check_space(step, state)
    ocp = _ocp()
    import grain  # pylint: disable=g-import-not-at-top
    items = {STATE: ocp.args.StandardSave(state),
             CONFIG: ocp.args.JsonSave(json.loads(config_json))}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    kept = self.all_steps()
    try:
      with _stderr_dropped_on_failure():
        saved = self._mngr.save(int(step), args=ocp.args.Composite(**items),
                                force=force)
        self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      # A write the free-space check could not foresee (a quota, a file-size
      # limit, another process filling the disk): one line saying what is
      # kept, where orbax's writer threads had printed hundreds of lines.
      cause = first_line(_innermost(e))
      # tensorstore ends its ~400-character message with the reason ('No
      # space left on device [os_error_code='28']'): cut to 200, the line
      # had named paths and never the full disk.
      code = re.search(r"os_error_code='(\d+)'", cause)
      if code:
        body = cause.split(' [os_error_code=')[0]
        cause = (body if len(body) <= 200 else
                 f'{os.strerror(int(code.group(1)))}: {body}')
      if len(cause) > 200:
        cause = cause[:197] + '...'
      raise OSError(
          f'{self.directory}: checkpoint {step} was not written ({cause}); '
          + (f'--resume continues from step {max(kept)} (kept).' if kept else
             'no checkpoint is kept.')) from None
    return bool(saved)

  def _check_space(self, step: int, state: Any) -> None:
    """Refuses a save the disk cannot hold. A full disk had failed orbax's
    writes part-way, printing hundreds of lines of tracebacks from its
    writer threads around the one error line."""
    from train import distributed  # pylint: disable=g-import-not-at-top
    need = sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(state))
    # Orbax's metadata, the config and the data position beside the arrays.
    need = int(need * 1.1) + SAVE_OVERHEAD_BYTES
    try:
      os.makedirs(self.directory, exist_ok=True)
      usage = shutil.disk_usage(self.directory)
      # A mount that reports no size at all (some object-store mounts)
      # tells nothing: orbax then says what goes wrong.
      free = usage.free if usage.total else need
    except OSError:
      free = need
    # Every process refuses together: a checkpoint is a collective.
    if distributed.on_any_process(int(free < need)):
      kept = self.all_steps()
      raise OSError(
          f'{self.directory}: about {need / 2**20:.1f} MiB needed for '
          f'checkpoint {step}, {free / 2**20:.1f} MiB free (on this or '
          'another host): free some space, then --resume' + (
              f' (from step {max(kept)}, kept)' if kept else '') + '.')

  def restore_config(self, step: int) -> dict:
    """The config dict saved with checkpoint ``step`` (read alone, so that a
    resume can name the settings it changed before the state's shapes are
    compared)."""
    ocp = _ocp()
    out = self._mngr.restore(
        int(step), args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    return dict(out[CONFIG])

  def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
    """The saved state; ``data_iterator`` is repositioned in place.

    Args:
      step: the checkpoint step.
      abstract_state: the state's ``jax.ShapeDtypeStruct`` tree with
        shardings (from a fresh run's initial state).
      data_iterator: a fresh iterator of the same dataset, or None.
    """
    ocp = _ocp()
    self._check_fits(step, abstract_state)
    try:
      with _stderr_dropped_on_failure():
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state)}))
    except Exception as e:  # pylint: disable=broad-except
      # A file of the checkpoint missing or cut short fails deep in
      # tensorstore, and orbax re-raises it as a bare Exception: it had
      # reached the user as a 145-line traceback. Anything else (out of
      # memory, say) is not damage, and goes on as it is.
      if type(e) is not Exception:  # pylint: disable=unidiomatic-typecheck
        raise
      raise CheckpointDamaged(first_line(_innermost(e))) from e
    if data_iterator is not None:
      self._restore_data(step, data_iterator)
    return out[STATE]

  def _restore_data(self, step: int, data_iterator) -> None:
    """Sets ``data_iterator`` to the position saved with ``step``.

    grain's own restore reads ``process_{i}-of-{n}.json`` for this run's
    process count n only, so a run resumed on another number of processes
    would find no file. Every process iterates the same global batches
    (`train.distributed.global_array`: no per-process shard), so each
    process's file holds the same position, and any of them will do: this
    process's when the count is unchanged, else process 0's of the run
    that saved it.
    """
    from etils import epath  # pylint: disable=g-import-not-at-top
    import grain  # pylint: disable=g-import-not-at-top
    folder = epath.Path(self.directory) / str(step) / DATA
    index, count = jax.process_index(), jax.process_count()
    path = folder / f'process_{index}-of-{count}.json'
    if not path.exists():
      saved = sorted(folder.glob('process_0-of-*.json')) if (
          folder.exists()) else []
      if not saved:
        raise ValueError(f'{folder} holds no data iterator position '
                         '(process_0-of-N.json).')
      path = saved[0]
    text = path.read_text(encoding='utf-8')
    if isinstance(data_iterator, grain.DatasetIterator):
      data_iterator.set_state(json.loads(text))
    else:  # A DataLoader iterator keeps its state as bytes.
      data_iterator.set_state(text.encode())
    if hasattr(data_iterator, 'start_prefetch'):
      data_iterator.start_prefetch()

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """Raises StateMismatch naming the first leaf the saved state lacks,
    has extra, or holds with another shape or dtype.

    Checked from the checkpoint's metadata before restoring: a restore that
    fails part-way leaves orbax's reads to finish on a closed event loop,
    and each then prints a traceback after the caller's one-line error.
    """
    ocp = _ocp()
    try:
      saved = ocp.StandardCheckpointHandler().metadata(
          ocp.path.step.epath.Path(self.directory) / str(step) / STATE)
      saved = _shapes(getattr(saved, 'item_metadata', saved))
    except Exception:  # pylint: disable=broad-except
      return  # no readable metadata: the restore itself says what is wrong
    wanted = _shapes(abstract_state)
    for path in sorted(set(saved) | set(wanted)):
      there, here = saved.get(path), wanted.get(path)
      if there != here:
        describe = lambda sd: (f'{sd[0]} {sd[1]}' if sd is not None
                               else 'nothing')
        raise StateMismatch(
            f'the saved state holds {describe(there)} at {path}, this '
            f'config {describe(here)}')

  def close(self) -> None:
    self._mngr.wait_until_finished()
    # The temporary folders' removal runs beside the run and is awaited by
    # the first save only: a run that saves nothing waits for it here.
    wait_cleanup = getattr(self._mngr, '_maybe_await_cleanup_tmp_directory',
                           None)
    if wait_cleanup is not None:
      wait_cleanup()
    self._mngr.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, 'sharding', None)),
      tree)


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'a/b/0/c': (shape, dtype name)} of a tree's array leaves, keyed by
  names alone (orbax's metadata has dicts and lists where the state has
  NamedTuples and tuples)."""
  def name(key):
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {'/'.join(name(k) for k in path): (tuple(leaf.shape),
                                            jax.numpy.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(leaf, 'shape')}


def incomplete_steps(directory: str | os.PathLike) -> list[str]:
  """The step folders of ``directory`` newer than its newest complete one
  (holding `COMMIT_FILE`), by name, oldest first.

  Empty when no step folder holds the file: an orbax that did not write it
  on local disks (older than this check) made them, and each is taken as
  complete, as orbax takes it.
  """
  directory = os.fspath(directory)
  steps = sorted((int(n), n) for n in os.listdir(directory)
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
  complete = [s for s, n in steps
              if os.path.isfile(os.path.join(directory, n, COMMIT_FILE))]
  if not complete:
    return []
  return [n for s, n in steps if s > max(complete)]


def set_aside_incomplete(directory: str | os.PathLike
                         ) -> list[tuple[str, str]]:
  """Renames each of `incomplete_steps` to ``<step>.incomplete`` (``.2``,
  ``.3``, ... after it when taken); returns [(old, new)] names."""
  directory = os.fspath(directory)
  moved = []
  for name in incomplete_steps(directory):
    new, n = f'{name}.incomplete', 1
    while os.path.lexists(os.path.join(directory, new)):
      n += 1
      new = f'{name}.incomplete.{n}'
    os.rename(os.path.join(directory, name), os.path.join(directory, new))
    moved.append((name, new))
  return moved


def has_checkpoints(directory: str | os.PathLike) -> bool:
  """Whether ``directory`` holds any step folder (without creating it)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return False
  return any(name.isdigit() for name in os.listdir(directory))

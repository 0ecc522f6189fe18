"""Removes the TensorBoard events a resumed run is about to log again.

A resumed run tells TensorBoard to hide the stopped run's events from the
step after its checkpoint on (a SessionLog START event at that step,
tensorboardX's ``purge_step``), but TensorBoard's default fast loader
(RustBoard) ignores that: it drops an old point only where a new one of the
same tag comes, so a tag the new run logs later or not at all (tokens/s is
not logged at a resumed run's first step) kept the stopped run's point. The
old event files are rewritten without those events instead, which every
loader reads the same.

An event file is a sequence of TFRecords (length, its masked CRC32C, an
``Event`` proto, the data's masked CRC32C); the records kept are copied
byte for byte, so their checksums stay valid.
"""

import os
import struct
import uuid

# TensorBoard reads every file with 'tfevents' in its name.
_EVENTS = 'tfevents'
_LENGTH = struct.Struct('<Q')
_CRC = struct.Struct('<I')
_HEADER = _LENGTH.size + _CRC.size


def _records(data: bytes, path: str):
  """(start, end, payload) of each whole record of ``data``.

  A last record cut short (the process was killed mid-write) is left out:
  no reader reads it. A length whose checksum is wrong is a damaged file,
  not a cut one: ValueError, and the file is left alone.
  """
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  pos = 0
  while pos + _HEADER <= len(data):
    header = data[pos:pos + _LENGTH.size]
    (crc,) = _CRC.unpack_from(data, pos + _LENGTH.size)
    if record_writer.masked_crc32c(header) != crc:
      raise ValueError(f'{path}: damaged record at byte {pos}')
    (length,) = _LENGTH.unpack(header)
    end = pos + _HEADER + length + _CRC.size
    if end > len(data):
      break
    yield pos, end, data[pos + _HEADER:pos + _HEADER + length]
    pos = end


def _write_replacing(path: str, chunks: list[bytes]) -> None:
  """Writes ``chunks`` to a temporary file, then renames it over ``path``.

  The temporary name has no 'tfevents' in it, so a TensorBoard watching the
  folder does not read it; it matches models.hf_io's pattern of unfinished
  writes, which a run's start-up removes.
  """
  folder = os.path.dirname(path)
  tmp = os.path.join(folder, f'.events.{os.getpid()}.{uuid.uuid4().hex[:8]}'
                     '.tmp')
  try:
    with open(tmp, 'xb') as f:
      for chunk in chunks:
        f.write(chunk)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _drop_from_file(path: str, step: int) -> bool:
  """`drop_events_from` for one file: whether it changed."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  kept, summaries, dropped, whole = [], 0, 0, 0
  for start, end, payload in _records(data, path):
    whole = end
    event = event_pb2.Event()
    try:
      event.ParseFromString(payload)
    except Exception:  # protobuf's DecodeError # pylint: disable=broad-except
      raise ValueError(f'{path}: damaged event at byte {start}') from None
    if event.HasField('summary'):
      if event.step >= step:
        dropped += 1
        continue
      summaries += 1
    kept.append(data[start:end])
  if not dropped and whole == len(data):
    return False
  if summaries:
    _write_replacing(path, kept)
  else:
    os.unlink(path)
  return True


def drop_events_from(folder: str | os.PathLike, step: int) -> list[str]:
  """Removes the summaries logged at ``step`` or later from the event files
  directly in ``folder`` (``step`` 0: all of them, for a run started over).

  A file that loses its last summary is removed; others are rewritten
  atomically without those events (the file-version and session events
  stay).

  Returns:
    The names of the files changed (rewritten or removed).

  Raises:
    OSError or ValueError: after every other file is done, for the first
      file that could not be read or rewritten (each is whole either way),
      or that is damaged (left as it is), naming how many failed: one such
      file had left every file after it unchanged.
  """
  try:
    names = sorted(os.listdir(folder))
  except (FileNotFoundError, NotADirectoryError):
    return []
  changed, errors = [], []
  for name in names:
    path = os.path.join(folder, name)
    if (_EVENTS not in name or name.startswith('.') or
        not os.path.isfile(path)):
      continue
    try:
      if _drop_from_file(path, step):
        changed.append(name)
    except (OSError, ValueError) as e:
      errors.append(e)
  if errors:
    first, others = errors[0], len(errors) - 1
    more = (f' (and {others} more file{"s" if others > 1 else ""})'
            if others else '')
    kind = ValueError if isinstance(first, ValueError) else OSError
    raise kind(f'{first}{more}')
  return changed

"""train/metrics.py's writer and progress lines, and train/event_files.py's
rewrite of TensorBoard files, on their own (no training run): what a
killed run, a full disk or a stray file in the folder leaves behind.

The loop-level behaviour (resume truncation, purge steps, tokens/s) is in
tests/test_train_loop.py.
"""

import csv
import errno
import io
import os
import struct
import sys

import pytest

from train import event_files
from train import metrics as metrics_lib


def _no_space(*args):
  raise OSError(errno.ENOSPC, 'No space left on device')


def test_each_row_is_in_the_file_once_written(tmp_path):
  """Not only at close: a killed run had lost its rows since the last
  flush, and a resume logs no row at or before its checkpoint again."""
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False)
  w.write(1, {'loss': 2.0})
  assert (tmp_path / metrics_lib.CSV_NAME).read_text().splitlines() == [
      'step,loss', '1,2.0']
  w.close()


def test_a_tensorboard_folder_that_cannot_be_made_is_one_line(tmp_path,
                                                              capsys):
  """A file where the folder should be turns TensorBoard off at the start;
  the CSV is written."""
  (tmp_path / metrics_lib.TB_DIR).write_text('not a folder')
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True)
  w.write(0, {'loss': 1.0})
  w.close()
  assert (tmp_path / metrics_lib.CSV_NAME).read_text().splitlines() == [
      'step,loss', '0,1.0']
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and 'TensorBoard logging is off' in err[0], err


def test_a_resumed_csv_drops_blank_lines_and_rows_longer_than_the_header(
    tmp_path):
  """A blank line (an editor's, a cut write) had been an IndexError; a row
  with more cells than its header had been kept (pandas then refuses the
  whole file)."""
  (tmp_path / metrics_lib.CSV_NAME).write_text(
      'step,loss\r\n\r\n1,2.0\r\n2,1.0,9.9\r\n')
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                                last_step=5)
  w.close()
  assert w.kept == [{'step': 1, 'loss': 2.0}]
  assert '9.9' not in (tmp_path / metrics_lib.CSV_NAME).read_text()


def test_a_row_that_cannot_be_written_names_the_file(tmp_path):
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False)
  w.write(0, {'loss': 1.0})
  name = w._csv.name  # pylint: disable=protected-access

  class Full(io.StringIO):
    write = _no_space

  w._csv.close()  # pylint: disable=protected-access
  w._csv = Full()  # pylint: disable=protected-access
  w._csv.name = name  # pylint: disable=protected-access,attribute-defined-outside-init
  w._writer = csv.DictWriter(w._csv, fieldnames=['step', 'loss'])  # pylint: disable=protected-access
  with pytest.raises(OSError, match=rf'^{name}: cannot write \(No space left '
                     r'on device\); its rows up to the last checkpoint are '
                     r'kept\.$'):
    w.write(1, {'loss': 0.5})


def test_a_tensorboard_close_that_fails_on_replace_is_not_reopened(
    tmp_path, capsys):
  """write(replace=True) closes and reopens the event file: a close that
  fails turns TensorBoard off in one line, and no new file is opened."""
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True)
  w.write(0, {'loss': 1.0})
  w._tb.close = _no_space  # pylint: disable=protected-access
  opened = []
  w._open_tensorboard = opened.append  # pylint: disable=protected-access
  w.write(0, {'loss': 0.5}, replace=True)
  w.close()
  assert opened == [] and w._tb is None  # pylint: disable=protected-access
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and 'TensorBoard logging is off' in err[0], err
  assert (tmp_path / metrics_lib.CSV_NAME).read_text().splitlines() == [
      'step,loss', '0,0.5']


def test_step_lines_are_printed_without_a_bar(capsys, monkeypatch):
  """With stderr a log file (no bar), the step lines still reach stdout."""
  monkeypatch.setattr(sys, 'stderr', io.StringIO())
  progress = metrics_lib.Progress(3, enabled=True)
  progress.write('[step 1] loss=1.0')
  progress.close()
  assert capsys.readouterr().out == '[step 1] loss=1.0\n'


# ---------------------------------------------------------------------------
# event_files.drop_events_from


def _event_file(tmp_path, steps=range(4)):
  """A TensorBoard folder holding one event file of ``steps``' losses."""
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True)
  for step in steps:
    w.write(step, {'loss': float(step)})
  w.close()
  tb = tmp_path / metrics_lib.TB_DIR
  (name,) = [n for n in os.listdir(tb) if 'tfevents' in n]
  return tb, tb / name


def test_a_rewrite_that_fails_leaves_the_file_and_no_temporary(
    tmp_path, monkeypatch):
  """The rewrite goes to a temporary file, synced, then renamed over the
  old one: a full disk at the sync leaves the old file whole and nothing
  else in the folder; the temporary's name is not one TensorBoard reads
  (no 'tfevents')."""
  tb, path = _event_file(tmp_path)
  before = path.read_bytes()
  synced, renamed = [], []

  def sync(fd):
    synced.append(fd)
    _no_space()

  monkeypatch.setattr(os, 'fsync', sync)
  with pytest.raises(OSError):
    event_files.drop_events_from(tb, 2)
  assert synced
  assert path.read_bytes() == before
  assert os.listdir(tb) == [path.name]
  monkeypatch.setattr(os, 'fsync', lambda fd: None)
  real_replace = os.replace

  def replace(src, dst):
    renamed.append(os.path.basename(src))
    real_replace(src, dst)

  monkeypatch.setattr(os, 'replace', replace)
  event_files.drop_events_from(tb, 2)
  assert renamed and not any('tfevents' in name for name in renamed)
  assert os.listdir(tb) == [path.name] and len(path.read_bytes()) < len(
      before)


def test_files_that_are_not_event_files_are_left_alone(tmp_path):
  """A small file of another name had been read as a cut event file with
  no summaries, and deleted."""
  tb, _ = _event_file(tmp_path)
  (tb / 'notes.txt').write_text('hi')
  event_files.drop_events_from(tb, 0)
  assert (tb / 'notes.txt').read_text() == 'hi'


def test_a_record_with_good_checksums_but_no_event_is_damage(tmp_path):
  """Both checksums right around a payload that is not an event: the file
  is damaged and kept as it is (not silently cut there)."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  tb, path = _event_file(tmp_path)
  payload = b'\xff\xff\xff'
  head = struct.pack('<Q', len(payload))
  with open(path, 'ab') as f:
    f.write(head + struct.pack('<I', record_writer.masked_crc32c(head)) +
            payload + struct.pack('<I', record_writer.masked_crc32c(payload)))
  before = path.read_bytes()
  with pytest.raises(ValueError, match='damaged event'):
    event_files.drop_events_from(tb, 2)
  assert path.read_bytes() == before


def test_a_file_with_nothing_to_drop_is_not_rewritten(tmp_path):
  tb, path = _event_file(tmp_path)
  inode = path.stat().st_ino
  assert event_files.drop_events_from(tb, 100) == []
  assert path.stat().st_ino == inode

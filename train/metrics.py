"""Metric sinks: a CSV file, TensorBoard event files, and a tqdm bar.

Only process 0 writes (every process computes the same global metrics).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from typing import Mapping

import jax

from models import hf_io
from train import event_files

CSV_NAME = 'metrics.csv'
EVAL_CSV_NAME = 'eval.csv'
TB_DIR = 'tensorboard'


def _keep_rows_up_to(path: str, last_step: int
                     ) -> tuple[list[str] | None, list[dict[str, float]]]:
  """Drops the rows after ``last_step`` from a metrics CSV.

  Returns the header the kept rows end under (None when no row is kept)
  and the rows kept, as ``{'step': int, name: float}`` (see `_read_rows`).
  The file is replaced whole (written aside, then renamed), so a failure
  leaves the old one, and an error names the file.
  """
  if not os.path.exists(path):
    return None, []
  kept, written, rows = _read_rows(path, last_step)
  out = io.StringIO(newline='')
  csv.writer(out).writerows(kept)
  # Aside, then renamed (as every file of a run is written), under a name
  # a later run's start-up removes if this process dies first; an error
  # names the file.
  hf_io.write_text(path, out.getvalue())
  return written, rows


def _read_rows(path: str, last_step: float
               ) -> tuple[list[list[str]], list[str] | None,
                          list[dict[str, float]]]:
  """The rows of metrics CSV ``path`` up to ``last_step``: as the file's
  lines to keep (each header block a kept row is under, then its rows),
  the header the last of them is under (None when none is kept), and as
  ``{'step': int, name: float}``. A row cut short (a run killed while
  writing it) is dropped, and so is a header no kept row follows (a fresh
  run, ``last_step`` -1, starts the file over)."""
  kept, rows, header, written = [], [], None, None
  with open(path, newline='', encoding='utf-8') as f:
    text = f.read()
  # A last line without its line break was cut by a full disk or a kill:
  # cut inside its last number ('16.0,1' for '16.0,16.0') it had parsed,
  # been kept, and stood for an evaluation that was then never redone.
  # (A row cut between its '\r' and '\n' is whole.)
  if not text.endswith(('\n', '\r')):
    text = text[:text.rfind('\n') + 1]
  for row in csv.reader(io.StringIO(text, newline='')):
    if not row:
      continue
    if row[0] == 'step':
      header = row
      continue
    if header is None or len(row) != len(header):
      continue
    try:
      # An empty cell is a key this row did not log (DictWriter's restval).
      values = [float(x) if x else math.nan for x in row]
    except ValueError:
      continue
    if not (math.isfinite(values[0]) and values[0] <= last_step):
      continue
    if written is not header:
      kept.append(header)
      written = header
    kept.append(row)
    rows.append({'step': int(values[0]),
                 **{k: v for k, v, cell in zip(header[1:], values[1:],
                                               row[1:]) if cell}})
  return kept, written, rows


class MetricsWriter:
  """Appends scalar metrics to run_dir/metrics.csv and TensorBoard.

  The CSV has one row per logging step under one header ('step' first); a
  key first seen later (an evaluation resumed with another method, say)
  rewrites the file under a header holding every key, empty where a row
  did not log it, so ``pandas.read_csv`` reads it (a second header block
  had made it raise 'Expected 3 fields in line 3, saw 4'). Files of
  earlier runs with several header blocks are read, and become one on
  their first new key.

  ``last_step``: the step the run starts from (its checkpoint's; -1 for a
  fresh run, which starts the file over). Rows of an existing file logged
  after it (by a run that stopped before its next checkpoint) are dropped,
  since they are about to be logged again, and the file goes on under its
  last header; ``kept`` holds the rows kept. The earlier TensorBoard files
  lose their events from ``last_step + 1`` on likewise (all of them for a
  fresh run; see `_open_tensorboard`).
  """

  def __init__(self, run_dir: str | os.PathLike, *, enabled: bool | None = None,
               tensorboard: bool = True, csv_name: str = CSV_NAME,
               tb_subdir: str = '', last_step: int = -1):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._fields: list[str] | None = None
    self._csv = None
    self._writer = None
    self._tb = None
    self._tb_on = True  # until a write TensorBoard cannot make
    self._tb_dir = os.path.join(run_dir, TB_DIR, tb_subdir)
    self.kept: list[dict[str, float]] = []
    if not self.enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, csv_name)
    self._fields, self.kept = _keep_rows_up_to(path, last_step)
    try:
      self._csv = open(path, 'a', newline='', encoding='utf-8')
    except OSError as e:  # the bare errno had been the whole message
      raise OSError(f'{path}: cannot write ({e.strerror or e}).') from None
    if self._fields is not None:
      self._writer = csv.DictWriter(self._csv, fieldnames=self._fields)
    if tensorboard:
      try:
        self._tb = self._open_tensorboard(purge_step=last_step + 1)
      except ImportError:  # Optional: the CSV has everything.
        self._tb = None
      except OSError as e:
        self._tb_failed(e)

  def _open_tensorboard(self, purge_step: int):
    """A new event file whose earlier ones hold no event from ``purge_step``
    on: they are rewritten without them (TensorBoard's fast loader ignores
    the purge event, which the slow one honours), where they can be; else
    the purge event alone hides them there.

    Written in this thread (tensorboardX's ``EventsWriter``), not through a
    ``SummaryWriter``: its writer thread flushed on a timer too, and an
    error there (a full disk) killed the thread unseen, whose queue of 10
    events then blocked the next row's 13 scalars, and the run, for good.
    """
    from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    try:
      event_files.drop_events_from(self._tb_dir, purge_step)
    except (OSError, ValueError) as e:
      print(f'[train] warning: {e}; TensorBoard\'s fast loader may show '
            f'its events from step {purge_step} on, which this run logs '
            'again (`tensorboard --load_fast=false` hides them).',
            file=sys.stderr, flush=True)
    os.makedirs(self._tb_dir, exist_ok=True)
    # The file is named by the second and opened with 'wb': a writer opened
    # in the same second as the last had emptied its file. The nanoseconds
    # keep the names in time order, as TensorBoard reads them; not read in
    # the last 10 ms of a second, lest tensorboardX's own clock reading (the
    # name's seconds) fall in the next one and the order break.
    if time.time_ns() % 10**9 > 990_000_000:
      time.sleep(0.011)
    writer = event_file_writer.EventsWriter(
        os.path.join(self._tb_dir, 'events'),
        filename_suffix=f'.{time.time_ns() % 10**9:09d}')
    try:
      writer.write_event(event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
      writer.flush()
    except OSError:
      self._close_quietly(writer)
      raise
    return writer

  def write(self, step: int, metrics: Mapping[str, float], *,
            replace: bool = False) -> None:
    """Appends one row; with ``replace``, rows already at ``step`` or later
    go first (a finished run's final evaluation, done again on resume: the
    old row stays until the new one is there; TensorBoard's files lose
    its old point as the writer reopens)."""
    if not self.enabled:
      return
    if replace:
      if self._tb is not None:
        self._tb_close()
        if self._tb_on:  # not turned off by a close that failed
          try:
            self._tb = self._open_tensorboard(purge_step=int(step))
          except OSError as e:
            self._tb_failed(e)
      self._csv.close()
      self._fields, _ = _keep_rows_up_to(self._csv.name, int(step) - 1)
      self._csv = open(self._csv.name, 'a', newline='', encoding='utf-8')
      self._writer = (None if self._fields is None else
                      csv.DictWriter(self._csv, fieldnames=self._fields))
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    fields = list(row)
    if self._fields is None:
      self._fields = fields
      self._writer = csv.DictWriter(self._csv, fieldnames=fields)
      self._writer.writeheader()
    elif not set(fields) <= set(self._fields):
      self._widen(self._fields + [k for k in fields if k not in self._fields])
    try:
      self._writer.writerow(row)
      self._csv.flush()
    except OSError as e:  # a full disk: the bare errno had named no file
      raise OSError(f'{self._csv.name}: cannot write ({e.strerror or e}); '
                    'its rows up to the last checkpoint are kept.') from None
    if self._tb is not None:
      from tensorboardX import summary  # pylint: disable=g-import-not-at-top
      from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
      values = [v for key, value in row.items()
                if key != 'step' and math.isfinite(value)
                for v in summary.scalar(key, value).value]
      try:
        if values:
          self._tb.write_event(event_pb2.Event(
              wall_time=time.time(), step=int(step),
              summary=summary_pb2.Summary(value=values)))
          self._tb.flush()
      except OSError as e:
        self._tb_failed(e)

  def _widen(self, fields: list[str]) -> None:
    """Rewrites the CSV under ``fields`` and every key of its rows so far
    (an earlier run's file may hold several header blocks), empty cells
    for the keys a row did not log, then appends under it. A failure
    leaves the file, and this writer, as they were."""
    path = self._csv.name
    self._csv.close()
    try:
      rows = _read_rows(path, math.inf)[2]  # one rewrite, below
      for row in rows:
        fields += [k for k in row if k not in fields]
      out = io.StringIO(newline='')
      writer = csv.DictWriter(out, fieldnames=fields)
      writer.writeheader()
      writer.writerows(rows)
      hf_io.write_text(path, out.getvalue())
      self._fields = fields
    finally:
      self._csv = open(path, 'a', newline='', encoding='utf-8')
      self._writer = csv.DictWriter(self._csv, fieldnames=self._fields)

  def _tb_close(self) -> None:
    try:
      self._tb.close()
    except OSError as e:
      self._tb_failed(e)
    self._tb = None

  @staticmethod
  def _close_quietly(writer) -> None:
    try:
      writer.close()
    except OSError:
      pass  # what it could not write is lost either way

  def _tb_failed(self, error: OSError) -> None:
    """TensorBoard is optional (the CSV has every row): a write it cannot
    make turns it off for the run, in one line."""
    tb, self._tb = self._tb, None
    self._tb_on = False
    if tb is not None:
      self._close_quietly(tb)
    print(f'[train] {self._tb_dir}: cannot write ({error.strerror or error}); '
          'TensorBoard logging is off for the rest of this run (metrics.csv '
          'has every row).', file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._csv is not None:
      self._csv.close()
      self._csv = None
    if self._tb is not None:
      self._tb_close()


def _shows_a_bar(stream) -> bool:
  """Whether ``stream`` shows a redrawn bar: a terminal, or a Jupyter or
  Colab kernel's (ipykernel's OutStream). A log file or a pipe (a Cloud TPU
  job's log, nohup, ``gcloud ... ssh --command``) does not: there the bar
  had been one newline-free line of ``\\r`` redraws, growing all run."""
  try:
    if stream.isatty():
      return True
  except (AttributeError, ValueError):  # no isatty, or closed
    return False
  return type(stream).__module__.startswith('ipykernel')


class Progress:
  """A tqdm bar over training steps showing loss and tokens/s, where
  stderr shows one (see `_shows_a_bar`); the step lines go above it."""

  def __init__(self, total: int, initial: int = 0, *, enabled: bool = True,
               desc: str = 'train'):
    self._bar = None
    if enabled and jax.process_index() == 0 and _shows_a_bar(sys.stderr):
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc,
                       dynamic_ncols=True, file=sys.stderr)

  def update(self, n: int = 1, **postfix) -> None:
    if self._bar is None:
      return
    if postfix:
      self._bar.set_postfix({k: (f'{v:.4g}' if isinstance(v, float) else v)
                             for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def write(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text, file=sys.stdout)
      # tqdm's write does not flush: with stdout a file, the step lines
      # (and the stop notice) had waited in its 8 KB buffer, hundreds of
      # steps, and a killed run lost them.
      sys.stdout.flush()
    elif jax.process_index() == 0:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

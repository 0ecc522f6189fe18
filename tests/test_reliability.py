"""Reliability (issue 9): kills, non-finite steps, bad input, no pickle.

* A `tiny` run killed with SIGKILL (once at a random step, once while orbax
  writes a checkpoint) and resumed with --resume ends bit-identical to an
  uninterrupted run; a half-written checkpoint is never loaded.
* Non-finite gradients are skipped by every optimizer: 20 poisoned steps
  leave the parameters equal to a run without them, and the skip is
  counted and logged.
* Every row of the README's "Bad input and what it says" table gives its
  one-line message and writes or changes nothing.
* No load path uses pickle; exports stay inside their directory.
* The same config and seed give the same loss curve twice.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

from train import configs
from train import loop
from train import optim as optim_lib
from train import step as step_lib
from train import trees as trees_lib
from tests import gguf_files
from tests import xla_flags

# One xdist worker: the module's fixtures (an uninterrupted run, the built
# tiny model, a saved Gemma) are then built once.
pytestmark = pytest.mark.xdist_group('reliability')

ROOT = Path(__file__).resolve().parents[1]
TMP_SUFFIX = '.orbax-checkpoint-tmp'
STEPS = 12
# The same shapes as tests/test_train_loop.py (so one pytest worker compiles
# the tiny step once); checkpoints every 2 steps give kills something to hit.
OVERRIDES = {'steps': STEPS, 'log_every': 1, 'checkpoint_every': 2,
             'data.seq_len': 96, 'progress': False}


def tiny(run_dir, **changes):
  return configs.replace(configs.get_config('tiny'), run_dir=str(run_dir),
                         **{**OVERRIDES, **changes})


def _cli_args(run_dir):
  args = ['--config', 'tiny', '--run_dir', str(run_dir)]
  for key, value in OVERRIDES.items():
    if isinstance(value, bool):
      # tyro booleans are flags: --progress / --no-progress.
      args.append(f'--{key}' if value else f'--no-{key}')
    else:
      args += [f'--{key}', str(value)]
  return args


def _load_state(run_dir, step):
  """A checkpoint's train state as host arrays (orbax, no target needed)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, 'checkpoints', str(step), 'state')
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(path)
  return jax.tree.map(np.asarray, state)


def _assert_trees_identical(got, want):
  got_flat = jax.tree_util.tree_leaves_with_path(got)
  want_flat = jax.tree_util.tree_leaves_with_path(want)
  assert [p for p, _ in got_flat] == [p for p, _ in want_flat]
  for (path, g), (_, w) in zip(got_flat, want_flat):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape, path
    # Bit for bit: compare the raw bytes (NaN == NaN, -0.0 != 0.0).
    assert g.tobytes() == w.tobytes(), jax.tree_util.keystr(path)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One uninterrupted tiny run in this process."""
  run_dir = tmp_path_factory.mktemp('reference') / 'run'
  return loop.run(tiny(run_dir), log=lambda s: None)


# ---------------------------------------------------------------------------
# Kill and resume.


class _Training:
  """`python -m train` in a subprocess whose stdout is read by a thread."""

  started: list[subprocess.Popen] = []

  def __init__(self, run_dir, resume: bool):
    args = _cli_args(run_dir) + (['--resume'] if resume else [])
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'train'] + args, cwd=ROOT,
        env=xla_flags.script_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    _Training.started.append(self.proc)
    self.lines: list[str] = []
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self._queue.put(line.rstrip('\n'))
    self._queue.put(None)

  def poll_lines(self) -> list[str]:
    new = []
    while True:
      try:
        line = self._queue.get_nowait()
      except queue.Empty:
        return new
      if line is not None:
        new.append(line)
        self.lines.append(line)

  def kill(self):
    os.kill(self.proc.pid, signal.SIGKILL)
    self.proc.wait(timeout=60)

  def last_step(self) -> int:
    steps = [int(m.group(1)) for l in self.lines
             if (m := re.match(r'\[step (\d+)\]', l))]
    return max(steps, default=0)


@pytest.fixture(autouse=True)
def _no_training_left_running():
  """A failed assert or deadline must not leave a `python -m train` child
  training into tmp_path after the test (and pytest) ended."""
  yield
  while _Training.started:
    proc = _Training.started.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=60)


def _tmp_dirs(ckpt_dir) -> list[str]:
  try:
    return [n for n in os.listdir(ckpt_dir) if TMP_SUFFIX in n]
  except FileNotFoundError:
    return []


def _finished_steps(ckpt_dir) -> list[int]:
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def test_sigkill_and_resume_is_bit_identical(reference, tmp_path):
  # Another kill point each run, for coverage over many runs; a failure
  # names its seed, and LRO_RELIABILITY_SEED=<seed> replays it.
  seed = int(os.environ.get('LRO_RELIABILITY_SEED', os.getpid()))
  rng = random.Random(seed)
  run_dir = tmp_path / 'run'
  ckpt_dir = run_dir / 'checkpoints'
  deadline = time.monotonic() + 600

  # 1. Killed right after a random step (between checkpoints or not).
  kill_at = rng.randint(3, 6)
  t = _Training(run_dir, resume=False)
  while t.last_step() < kill_at:
    assert t.proc.poll() is None or t.poll_lines(), '\n'.join(t.lines)
    assert time.monotonic() < deadline
    t.poll_lines()
    time.sleep(0.005)
  t.kill()
  first_kept = _finished_steps(ckpt_dir)
  assert first_kept, f'no checkpoint before the first kill (seed {seed})'

  # 2. Resumed, then killed while orbax writes a checkpoint: poll for its
  # temporary folder and kill the moment it appears. Not the first kill's
  # leftover (orbax removes it in the background), which this had caught
  # one step after the resume: a folder of a later step, or a new one.
  def inode(name):
    try:
      return os.stat(ckpt_dir / name).st_ino
    except FileNotFoundError:
      return None
  stale = {n: inode(n) for n in _tmp_dirs(ckpt_dir)}
  t = _Training(run_dir, resume=True)
  caught = []
  while t.proc.poll() is None and time.monotonic() < deadline:
    t.poll_lines()
    writing = [n for n in _tmp_dirs(ckpt_dir)
               if int(n.split('.')[0]) > max(first_kept) and
               (n not in stale or inode(n) not in (stale[n], None))]
    if writing:
      t.kill()
      caught = writing
      break
    time.sleep(0.001)
  t.poll_lines()
  # A run that saved faster than the polling (every save after the resume
  # missed) finished instead: allowed, and said in the last line.
  assert any(f'resumed from step {max(first_kept)}' in l for l in t.lines), (
      t.lines)
  finished = _finished_steps(ckpt_dir)

  # A leftover half-written checkpoint must be ignored even if it claims a
  # later step: plant one (the kill may not have left one behind).
  fake = ckpt_dir / f'{STEPS - 1}{TMP_SUFFIX}'
  fake.mkdir(exist_ok=True)
  (fake / 'state').mkdir(exist_ok=True)
  (fake / 'state' / 'garbage').write_bytes(b'\0half-written')

  # 3. Resumed to the end.
  t = _Training(run_dir, resume=True)
  t.proc.wait(timeout=max(1, deadline - time.monotonic()))
  t.poll_lines()
  time.sleep(0.1)
  t.poll_lines()
  assert t.proc.returncode == 0, f'seed {seed}:\n' + '\n'.join(t.lines)
  resumed_from = [int(m.group(1)) for l in t.lines
                  if (m := re.search(r'resumed from step (\d+)', l))]
  # The newest complete checkpoint, never the half-written one.
  assert resumed_from == [max(finished)], (seed, resumed_from, finished,
                                           caught)

  got = _load_state(run_dir, STEPS)
  want = _load_state(reference['run_dir'], STEPS)
  try:
    _assert_trees_identical(got, want)
  except AssertionError as e:
    raise AssertionError(f'seed {seed} (killed after step {kill_at}): '
                         f'{e}') from None
  print(f'killed after step {kill_at}; second kill caught tmp dirs {caught}')


# ---------------------------------------------------------------------------
# Stop signals (SIGTERM, Ctrl-C) and incomplete checkpoints.


def _signal_at(prefix, sig=signal.SIGTERM, times=1, lines=None):
  """A log that keeps its lines and sends ``sig`` (``times`` times) to this
  process when a line starting with ``prefix`` comes."""
  lines = [] if lines is None else lines

  def log(line):
    lines.append(line)
    if line.startswith(prefix):
      for _ in range(times):
        os.kill(os.getpid(), sig)
  return log, lines


def _eval_steps(run_dir) -> list[int]:
  try:
    with open(run_dir / 'eval.csv') as f:
      return [int(r['step']) for r in csv.DictReader(f)]
  except FileNotFoundError:
    return []


def test_a_stop_signal_checkpoints_before_the_periodic_evaluation(
    reference, tmp_path, monkeypatch):
  """SIGTERM at a periodic evaluation's step: the step is checkpointed and
  the run stops without that evaluation (a long one would outlast the
  preemption notice); the signal is acknowledged in one line, and the
  resume does the evaluation first."""
  every = {'eval.every': 3, 'eval.num_examples': 4, 'eval.batch_size': 4}
  calls = []
  real = loop.Evaluator.__call__

  def counted(self, state):
    calls.append(1)
    return real(self, state)

  monkeypatch.setattr(loop.Evaluator, '__call__', counted)
  run_dir = tmp_path / 'run'
  log, lines = _signal_at('[step 3]')
  with pytest.raises(loop.Interrupted) as e:
    loop.run(tiny(run_dir, **every), log=log)
  assert (e.value.step, e.value.exit_code) == (3, 128 + signal.SIGTERM)
  assert calls == [] and _eval_steps(run_dir) == []
  assert [l for l in lines if 'SIGTERM' in l] == [
      '[train] SIGTERM: stopping after this step']
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['2', '3']
  lines = []
  resumed = loop.run(tiny(run_dir, resume=True, **every), log=lines.append,
                     stop_at=4)
  assert '[train] no evaluation recorded at step 3: doing it now' in lines
  assert calls == [1] and _eval_steps(run_dir) == [3]
  assert ([h['loss'] for h in resumed['history']] ==
          [h['loss'] for h in reference['history'][:4]])


@pytest.mark.parametrize('when', ['last_step', 'final_eval'])
def test_a_stop_signal_at_the_end_leaves_evaluation_and_export_to_resume(
    tmp_path, monkeypatch, when):
  """SIGTERM on the last step, or during the final evaluation (which stops
  before its next batch): no final evaluation recorded, no adapter, exit
  128 + 15 with the checkpoint of the last step; --resume then evaluates
  and exports (the signal had been swallowed, rc 0, or had let both run and
  then asked for a resume)."""
  after = {'eval.after': True, 'eval.num_examples': 4, 'eval.batch_size': 2,
           'export_adapter': True}
  run_dir = tmp_path / 'run'
  log, lines = _signal_at(f'[step {STEPS}]')
  if when == 'final_eval':
    log, lines = lines.append, lines
    real = loop.Evaluator._generate  # pylint: disable=protected-access

    def preempted(self, state, prompts):
      os.kill(os.getpid(), signal.SIGTERM)
      return real(self, state, prompts)

    monkeypatch.setattr(loop.Evaluator, '_generate', preempted)
  with pytest.raises(loop.Interrupted) as e:
    loop.run(tiny(run_dir, **after), log=log)
  monkeypatch.undo()
  assert (e.value.step, e.value.exit_code) == (STEPS, 143)
  assert not [l for l in lines if l.startswith('[eval after')], lines
  assert _eval_steps(run_dir) == [] and not (run_dir / 'adapter').exists()
  doing = ('stopping after this step' if when == 'last_step' else
           f'stopping the final evaluation of step {STEPS} before its next '
           'batch')
  assert [l for l in lines if 'SIGTERM' in l] == [f'[train] SIGTERM: {doing}']
  assert str(STEPS) in os.listdir(run_dir / 'checkpoints')
  lines = []
  done = loop.run(tiny(run_dir, resume=True, **after), log=lines.append)
  assert (f'[train] already at step {STEPS}: no final evaluation recorded: '
          'doing it now') in lines
  assert _eval_steps(run_dir) == [STEPS] and done['eval_after']
  assert (run_dir / 'adapter' / 'adapter_config.json').is_file()


def test_a_stop_signal_during_the_initial_evaluation_is_a_clean_stop(
    tmp_path, monkeypatch):
  """SIGTERM during eval.before: the evaluation stops before its next batch
  and the run exits 128 + 15 with step 0 checkpointed (it had been a
  traceback that left a half-made run folder); --resume evaluates first."""
  before = {'eval.before': True, 'eval.num_examples': 4,
            'eval.batch_size': 2}
  real = loop.Evaluator._generate  # pylint: disable=protected-access

  def preempted(self, state, prompts):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(self, state, prompts)

  monkeypatch.setattr(loop.Evaluator, '_generate', preempted)
  run_dir = tmp_path / 'run'
  lines = []
  with pytest.raises(loop.Interrupted) as e:
    loop.run(tiny(run_dir, **before), log=lines.append)
  monkeypatch.undo()
  assert (e.value.step, e.value.exit_code) == (0, 143)
  assert [l for l in lines if 'SIGTERM' in l] == [
      '[train] SIGTERM: stopping the initial evaluation of step 0 before its '
      'next batch']
  assert not [l for l in lines if l.startswith(('[eval', '[step'))], lines
  assert _eval_steps(run_dir) == []
  assert os.listdir(run_dir / 'checkpoints') == ['0']
  lines = []
  done = loop.run(tiny(run_dir, resume=True, **before), log=lines.append,
                  stop_at=1)
  assert done['eval_before'] and _eval_steps(run_dir) == [0]
  assert [h['step'] for h in done['history']] == [1]


def test_a_save_that_fails_part_way_is_one_error_naming_the_step_kept(
    tmp_path, monkeypatch, caplog, capfd):
  """A write the free-space check cannot foresee (a quota, a file-size
  limit) had ended in orbax's own error after hundreds of lines from its
  writer threads, not saying what was kept."""
  import logging  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  save = ocp.CheckpointManager.save
  calls = []

  def failing_save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 1:
      return save(self, step, *args, **kwargs)
    logging.getLogger('absl').error('writer thread: File too large')
    # What tensorstore's threads print from C++, past logging and sys.stderr.
    os.write(2, b'RuntimeError: Event loop is closed\n')
    if len(calls) == 2:
      raise ValueError('OUT_OF_RANGE: Error writing local file "x": File '
                       "too large [os_error_code='27']\nmore detail")
    # tensorstore's real message: ~400 characters, the reason last (cut to
    # 200, the line had never said the disk was full).
    raise ValueError(f'OUT_OF_RANGE: Error writing "params.a/0.0" in OCDBT '
                     f'database at local file "{"/tmp/x" * 40}/": Failed '
                     "writing: No space left on device [os_error_code='28']")

  monkeypatch.setattr(ocp.CheckpointManager, 'save', failing_save)
  run_dir = tmp_path / 'run'
  with caplog.at_level(logging.ERROR), pytest.raises(OSError) as e:
    loop.run(tiny(run_dir, steps=6), log=lambda s: None)
  ckpt_dir = run_dir / 'checkpoints'
  assert str(e.value) == (
      f'{ckpt_dir}: checkpoint 4 was not written (OUT_OF_RANGE: Error '
      'writing local file "x": File too large); '
      '--resume continues from step 2 (kept).')
  assert 'writer thread' not in caplog.text
  assert 'Event loop is closed' not in capfd.readouterr().err
  with pytest.raises(OSError) as e:
    loop.run(tiny(run_dir, steps=6, resume=True), log=lambda s: None)
  assert str(e.value).startswith(
      f'{ckpt_dir}: checkpoint 4 was not written (No space left on device: '
      'OUT_OF_RANGE: Error writing "params.a/0.0"')
  assert str(e.value).endswith('...); --resume continues from step 2 (kept).')
  monkeypatch.undo()
  assert loop.run(tiny(run_dir, steps=6, resume=True),
                  log=lambda s: None)['steps'] == 6


def test_a_disk_too_full_for_a_checkpoint_is_one_error_before_writing(
    tmp_path, monkeypatch):
  """Too little free space for the next checkpoint: one OSError naming the
  folder, the space needed and free and the step kept, before orbax
  writes anything (a full disk had failed its writes part-way, with
  hundreds of lines of tracebacks from its writer threads)."""
  import collections  # pylint: disable=g-import-not-at-top
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  usage = collections.namedtuple('usage', 'total used free')
  saves = []

  def disk_usage(path):
    saves.append(path)
    free = 10**9 if len(saves) == 1 else 2**19  # full after the first save
    return usage(10**9, 10**9 - free, free)

  monkeypatch.setattr(checkpoint.shutil, 'disk_usage', disk_usage)
  run_dir = tmp_path / 'run'
  with pytest.raises(OSError) as e:
    loop.run(tiny(run_dir, steps=6), log=lambda s: None)
  monkeypatch.undo()
  ckpt_dir = run_dir / 'checkpoints'
  assert str(e.value) == (
      f'{ckpt_dir}: about 1.1 MiB needed for checkpoint 4, 0.5 MiB free (on '
      'this or another host): free some space, then --resume (from step 2, '
      'kept).')
  assert sorted(os.listdir(ckpt_dir)) == ['2']
  # A mount that reports no size (total 0) is not taken for a full one.
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage',
                      lambda path: usage(0, 0, 0))
  assert loop.run(tiny(run_dir, steps=6, resume=True),
                  log=lambda s: None)['steps'] == 6


def test_a_failed_export_says_that_resume_exports_again(tmp_path,
                                                       monkeypatch):
  """An export that cannot be written (a full disk) ends in one OSError
  that says the checkpoint is saved and --resume exports; it does."""
  from models import hf_io  # pylint: disable=g-import-not-at-top

  def full(path, *args, **kwargs):  # its message ends in '.', as real ones
    raise OSError(f'{path}: cannot write (No space left on device).')

  monkeypatch.setattr(hf_io, 'save_tensors', full)
  run_dir = tmp_path / 'run'
  with pytest.raises(OSError) as e:
    loop.run(tiny(run_dir, steps=2, export_adapter=True), log=lambda s: None)
  monkeypatch.undo()
  assert str(e.value) == (
      f'{run_dir}/adapter: cannot write (No space left on device); '
      'checkpoint 2 is saved: free the space (or fix the folder), then '
      '--resume exports the adapter.')
  assert not (run_dir / 'adapter' / 'adapter_model.safetensors').exists()
  done = loop.run(tiny(run_dir, steps=2, export_adapter=True, resume=True),
                  log=lambda s: None)
  assert (run_dir / 'adapter' / 'adapter_model.safetensors').is_file()
  assert done['adapter_dir'] == str(run_dir / 'adapter')


def test_a_stop_off_a_log_step_logs_that_step(reference, tmp_path,
                                              monkeypatch):
  """SIGTERM during step 3 with a log every 2 steps: step 3 is logged, and
  summary.json's final_loss is step 3's loss (it had been step 2's, the
  last logged row's, beside a checkpoint of step 3)."""
  family = loop.FAMILIES['gemma']
  drawn = []

  def prepare(raw, r):
    drawn.append(1)
    if len(drawn) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return family.prepare_batch(raw, r)

  monkeypatch.setitem(loop.FAMILIES, 'gemma', dataclasses.replace(
      family, prepare_batch=prepare))
  run_dir = tmp_path / 'run'
  lines = []
  with pytest.raises(loop.Interrupted) as e:
    loop.run(tiny(run_dir, log_every=2), log=lines.append)
  assert e.value.step == 3
  assert [l.split()[:2] for l in lines if l.startswith('[step ')] == [
      ['[step', '2]'], ['[step', '3]']]
  with open(run_dir / 'summary.json') as f:
    summary = json.load(f)
  assert [h['step'] for h in summary['history']] == [2, 3]
  assert summary['steps'] == 3
  assert summary['final_loss'] == reference['history'][2]['loss']
  assert summary['final_loss'] != reference['history'][1]['loss']


def test_a_second_ctrl_c_stops_at_once(tmp_path):
  log, lines = _signal_at('[step 2]', signal.SIGINT, times=2)
  previous = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    loop.run(tiny(tmp_path / 'run'), log=log)
  assert signal.getsignal(signal.SIGINT) is previous
  assert [l for l in lines if 'SIGINT' in l] == [
      '[train] SIGINT: stopping after this step (Ctrl-C again stops at once)']


def test_the_cli_says_one_line_for_a_ctrl_c_before_training(
    tmp_path, monkeypatch, capsys):
  """Ctrl-C while the run is built (no stop handler yet: a 70-line
  traceback, exit -2) is one line and exit 130, like the shell's."""
  from train import cli  # pylint: disable=g-import-not-at-top

  def build_interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(loop, 'build', build_interrupted)
  assert cli.main(['--config', 'tiny', '--run_dir',
                   str(tmp_path / 'run')]) == 130
  err = capsys.readouterr().err
  assert err == ('error: interrupted (Ctrl-C); --resume continues from the '
                 'last checkpoint, if one was written.\n')


def test_a_stop_at_once_is_not_followed_by_orbax_threads_errors(
    monkeypatch, caplog):
  """A second Ctrl-C during a save: orbax's writer thread, failing as the
  interpreter shuts its executors down, had logged 45 lines after the one
  line that says the run stopped; and a damaged checkpoint's unawaited
  reads, collected at exit, printed "Exception ignored in" tracebacks
  after its one error line."""
  import logging  # pylint: disable=g-import-not-at-top
  import runpy  # pylint: disable=g-import-not-at-top
  from train import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  # Exit 1 (a damaged checkpoint's): 130 leaves by os._exit, tested below.
  monkeypatch.setattr(cli, 'main', lambda: 1)
  try:
    with pytest.raises(SystemExit) as e:
      runpy.run_module('train', run_name='__main__')
    assert e.value.code == 1
    logging.getLogger('absl').error('writer thread: cannot schedule new '
                                    'futures after shutdown')
    assert 'writer thread' not in caplog.text
    assert sys.unraisablehook(object()) is None  # says nothing
    assert sys.unraisablehook is not sys.__unraisablehook__
  finally:
    logging.disable(logging.NOTSET)
  logging.getLogger('absl').error('after the test')
  assert 'after the test' in caplog.text


_EXIT_WHILE_COMPILING = """
import runpy, sys, threading, time
import jax, jax.numpy as jnp
from train import cli

def compile_long():
  def f(x):
    for i in range(400):
      x = jnp.sin(x @ x.T) + i
    return x
  jax.jit(f).lower(jnp.ones((64, 64))).compile()

def second_ctrl_c_while_compiling():
  threading.Thread(target=compile_long, daemon=True).start()
  time.sleep(1.0)
  print('error: interrupted (Ctrl-C)', file=sys.stderr)
  return 130

cli.main = second_ctrl_c_while_compiling
sys.argv = ['train']
runpy.run_module('train', run_name='__main__')
"""


def test_a_stop_at_once_during_a_compile_exits_130():
  """A second Ctrl-C during the first step's compile: the interpreter going
  down while XLA compiled in its threads aborted, exit 134 or 139 after
  seconds, where the one line had said 130."""
  done = subprocess.run([sys.executable, '-c', _EXIT_WHILE_COMPILING],
                        cwd=ROOT, env=xla_flags.script_env(),
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert (done.returncode, done.stderr) == (
      130, 'error: interrupted (Ctrl-C)\n')


def test_a_stop_acknowledgement_survives_a_failing_log(capfd):
  """The handler runs between two bytecodes, possibly inside a print to the
  same stream (a reentrant write raises): the line then goes to stderr."""
  from train import preemption  # pylint: disable=g-import-not-at-top

  def reentrant(line):
    raise RuntimeError(f'reentrant call ({line})')

  with preemption.StopRequest(reentrant) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # said once
  assert stop.signum == signal.SIGTERM
  assert capfd.readouterr().err == (
      '[train] SIGTERM: stopping after this step\n')


def test_a_save_and_a_restore_work_where_stderr_has_no_buffer(tmp_path):
  """A Jupyter kernel's stderr (ipykernel's OutStream) and redirect_stderr's
  StringIO have no `.buffer`: every save in a notebook had failed after
  writing its checkpoint ('checkpoint 1 was not written ... no checkpoint
  is kept'), and a restore with a raw AttributeError. What file descriptor
  2 received meanwhile still reaches that stderr, as text."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  state = {'w': jnp.arange(4.0)}
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
  text = io.StringIO()
  with contextlib.redirect_stderr(text):
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.save(1, state, None, json.dumps({'name': 'x'}))
    restored = ckpt.restore(1, abstract, None)
    with checkpoint._stderr_dropped_on_failure():  # pylint: disable=protected-access
      os.write(2, b'a C++ thread\'s line\n')
    ckpt.close()
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert "a C++ thread's line\n" in text.getvalue()
  assert checkpoint.Checkpointer(tmp_path).all_steps() == [1]


def test_the_checkpointer_declines_old_steps_and_keeps_the_newest(tmp_path):
  """save() says whether it wrote (orbax declines a step at or below the
  latest without a word: the loop stops on that), and keeps ``keep``
  checkpoints; tested only through monkeypatches of save before."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  state = {'step': jnp.asarray(5), 'x': jnp.ones(3)}
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  try:
    assert ckpt.save(5, state, None, '{}') is True
    assert ckpt.save(4, state, None, '{}') is False
    assert ckpt.save(5, state, None, '{}') is False
    for step in (6, 7, 8):
      assert ckpt.save(step, state, None, '{}')
    assert ckpt.all_steps() == [7, 8]
  finally:
    ckpt.close()


def test_orbax_temporary_folders_are_removed(tmp_path):
  """A save cut short leaves `<step>.orbax-checkpoint-tmp-*`: removed when
  the checkpoints are next opened (they had stayed for good)."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  tmp = tmp_path / f'6{TMP_SUFFIX}-1234'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'garbage').write_bytes(b'\0half-written')
  (tmp_path / '6.incomplete').mkdir()  # not orbax's
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ['6.incomplete']
  assert ckpt.removed_tmp == [tmp.name]


def test_resume_skips_an_incomplete_checkpoint_and_removes_orbax_tmp(
    reference, tmp_path):
  """A numbered folder without commit_success.txt (a save cut short where
  renames are not atomic, e.g. gcsfuse) is moved aside, said in one line,
  and the run resumes from the newest complete checkpoint (it had been
  taken, and 'does not fit this config'); orbax's temporary folders are
  removed."""
  run_dir = tmp_path / 'run'
  loop.run(tiny(run_dir), log=lambda s: None, stop_at=4)
  ckpt_dir = run_dir / 'checkpoints'
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(ckpt_dir / '4' / 'config', ckpt_dir / '14' / 'config')
  tmp = ckpt_dir / f'6{TMP_SUFFIX}-1234'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'garbage').write_bytes(b'\0half-written')
  lines = []
  resumed = loop.run(tiny(run_dir, resume=True), log=lines.append, stop_at=6)
  assert '[train] resumed from step 4' in lines, lines
  assert [l for l in lines if 'incomplete' in l] == [
      f'[train] warning: incomplete checkpoint folder(s) in {ckpt_dir} (no '
      'commit_success.txt: a save was cut short) moved aside, kept for '
      'inspection: 14 -> 14.incomplete']
  assert f'[train] removed unfinished checkpoint writes: {tmp.name}' in lines
  assert sorted(os.listdir(ckpt_dir)) == ['14.incomplete', '4', '6']
  assert os.listdir(ckpt_dir / '14.incomplete') == ['config']
  assert ([h['loss'] for h in resumed['history']] ==
          [h['loss'] for h in reference['history'][:6]])
  # Older folders without the file are orbax's to judge, as are all of
  # them when none has it (an orbax that did not write it).
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  (ckpt_dir / '3').mkdir()
  assert checkpoint.incomplete_steps(ckpt_dir) == []
  for step in ('4', '6'):
    (ckpt_dir / step / checkpoint.COMMIT_FILE).unlink()
  (ckpt_dir / '9').mkdir()
  assert checkpoint.incomplete_steps(ckpt_dir) == []


# ---------------------------------------------------------------------------
# Non-finite steps.


OPTIMIZERS = ('lora_rite', 'adam', 'loraplus', 'scaled_adam', 'shampoo',
              'lamb')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """tiny's model, three batches and a jitted gradient, built once.

  The gradient (the model's forward and backward) is compiled once and
  shared; each optimizer then compiles only its own update, which keeps six
  optimizers affordable on a CPU.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  r = loop.build(tiny(tmp_path_factory.mktemp('unused')))
  it = iter(loop.train_dataset(r))
  batches = [step_lib.prepare_batch(next(it), r.max_targets)[0]
             for _ in range(3)]

  def loss(params, batch):
    model = nnx.merge(r.graphdef, trees_lib.int_keys(params), r.rngs, r.base)
    lp = step_lib.target_logprobs(model, batch, r.config.data.pack)
    return -lp.sum() / jnp.maximum(batch['weights'].sum(), 1.0)

  return r, batches, jax.jit(jax.grad(loss))


def _poison(batch, value):
  # A NaN / Inf loss weight makes the loss and every gradient non-finite,
  # as a loss spike or a corrupted example would.
  w = np.array(batch['weights'])
  w[0, 0] = value
  return {**batch, 'weights': w}


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_twenty_nonfinite_steps_are_skipped_exactly(built, name):
  import optax  # pylint: disable=g-import-not-at-top
  r, batches, grad_fn = built
  cfg = configs.replace(configs.get_config('tiny'),
                        **{'optim.name': name}).optim
  # The loop's optimizer: scheduled, wrapped in apply_if_finite.
  tx, _ = optim_lib.make_optimizer(cfg, r.config.steps)

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def train(sequence):
    params = r.state['params']
    opt_state = tx.init(params)
    skipped = []
    for batch in sequence:
      params, opt_state = update(params, opt_state, grad_fn(params, batch))
      skipped.append(int(step_lib.nonfinite_counts(opt_state)[1]))
    return params, opt_state, skipped

  # 3 good batches, 20 poisoned ones between them (at most 7 in a row).
  bad = [_poison(batches[i % 3], np.nan if i % 2 else np.inf)
         for i in range(20)]
  poisoned_params, poisoned_state, skipped = train(
      [batches[0]] + bad[:7] + [batches[1]] + bad[7:14] + [batches[2]]
      + bad[14:])
  clean_params, clean_state, _ = train(batches)

  assert skipped == [0] + list(range(1, 8)) + [7] + list(range(8, 15)) + [
      14] + list(range(15, 21))
  for leaf in jax.tree.leaves(poisoned_params):
    assert np.isfinite(np.asarray(leaf)).all()
  # The skipped steps left no trace in the parameters or in the wrapped
  # optimizer's state (its count and schedule did not advance either).
  _assert_trees_identical(poisoned_params, clean_params)
  _assert_trees_identical(poisoned_state.inner_state, clean_state.inner_state)
  assert not np.array_equal(np.asarray(jax.tree.leaves(clean_params)[0]),
                            np.asarray(jax.tree.leaves(r.state['params'])[0]))


def _poisoned_at(monkeypatch, steps):
  """Makes the loop's batches at ``steps`` (1-based) non-finite."""
  calls = []
  real = step_lib.prepare_batch

  def prepare(raw, k):
    batch, dropped = real(raw, k)
    calls.append(1)
    if steps(len(calls)):
      batch = {**batch, 'weights': np.full_like(batch['weights'], np.nan)}
    return batch, dropped

  monkeypatch.setattr(loop, 'prepare_batch', prepare)


def test_nonfinite_steps_are_counted_and_logged(reference, tmp_path,
                                                monkeypatch):
  poison_at = {4, 5, 9}
  _poisoned_at(monkeypatch, poison_at.__contains__)
  lines = []
  summary = loop.run(tiny(tmp_path / 'run'), log=lines.append)
  assert summary['nonfinite_steps'] == len(poison_at)
  with open(tmp_path / 'run' / 'metrics.csv') as f:
    rows = list(csv.DictReader(f))
  counts = [int(float(r['nonfinite_steps'])) for r in rows]
  assert counts == [sum(s <= i for s in poison_at)
                    for i in range(1, STEPS + 1)]
  # The logged rate is the one applied: 0 on a skipped step, and the
  # schedule's count lags the step by the steps skipped before.
  cfg = tiny(tmp_path / 'run')
  schedule = optim_lib.make_schedule(cfg.optim, cfg.steps)
  want = [0.0 if i in poison_at else
          float(schedule(i - 1 - sum(s < i for s in poison_at)))
          for i in range(1, STEPS + 1)]
  np.testing.assert_allclose([float(r['lr']) for r in rows], want,
                             rtol=1e-6)
  skip_lines = [l for l in lines if 'non-finite' in l]
  assert len(skip_lines) == len(poison_at), lines
  for leaf in jax.tree.leaves(_load_state(tmp_path / 'run', STEPS)):
    assert np.isfinite(leaf).all()


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
  """--optim.max_consecutive_nonfinite 3 stops at the third non-finite step
  in a row, its checkpoints kept and no summary written; as many spread
  out (never two in a row, here at most 1 < 2) do not stop it. No test had
  run the stop."""
  with monkeypatch.context() as m:
    _poisoned_at(m, lambda step: step >= 3)
    with pytest.raises(FloatingPointError, match=r'^3 consecutive steps had '
                       r'non-finite gradients \(at step 5\); stopping\.$'):
      loop.run(tiny(tmp_path / 'run', **{
          'optim.max_consecutive_nonfinite': 3}), log=lambda s: None)
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['2', '4']
  assert not (tmp_path / 'run' / 'summary.json').exists()
  _poisoned_at(monkeypatch, lambda step: step in (2, 4, 6))
  summary = loop.run(tiny(tmp_path / 'spread', steps=6, **{
      'optim.max_consecutive_nonfinite': 2}), log=lambda s: None)
  assert summary['nonfinite_steps'] == 3 and summary['steps'] == 6


# ---------------------------------------------------------------------------
# Determinism.


def test_same_config_and_seed_give_the_same_loss_curve(reference, tmp_path):
  again = loop.run(tiny(tmp_path / 'run'), log=lambda s: None)
  want = [h['loss'] for h in reference['history']]
  got = [h['loss'] for h in again['history']]
  assert len(got) == STEPS and got == want
  _assert_trees_identical(_load_state(tmp_path / 'run', STEPS),
                          _load_state(reference['run_dir'], STEPS))


# ---------------------------------------------------------------------------
# Bad input: every row of the README table "Bad input and what it says".


def _snapshot(root) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of everything under ``root``."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      st = os.lstat(path)
      out[os.path.relpath(path, root)] = (
          st.st_size if name in filenames else -1, st.st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def gemma_dir(tmp_path_factory):
  """A random gemma-tiny saved in Hugging Face layout (read-only here)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('gemma') / 'hf'
  model = gemma.Gemma(gemma.get_config('gemma-tiny'), rngs=nnx.Rngs(0))
  gemma.save_pretrained(model, str(d))
  return d


def _lora_model(rank=4):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  from models import lora  # pylint: disable=g-import-not-at-top
  model = gemma.Gemma(gemma.get_config('gemma-tiny'), rngs=nnx.Rngs(0))
  lora.apply_lora(model, ('q',), rank=rank, rngs=nnx.Rngs(1))
  return model


def _copy_hf(src, dst, drop=None, reshape=None):
  """A copy of a Hugging Face dir, one tensor dropped or re-shaped."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  st = str(dst / 'model.safetensors')
  tensors = {k: np.array(v) for k, v in
             load_file(st).items() if k != drop}
  if reshape:
    tensors[reshape] = np.zeros((3, 5), np.float32)
  save_file(tensors, st)


def _write_peft(d, tensors, r=4):
  from models import hf_io  # pylint: disable=g-import-not-at-top
  d.mkdir()
  hf_io.save_tensors(d, tensors, filename='adapter_model.safetensors')
  # Targets exactly the modules the file holds (a list such as ['q_proj']
  # would target every layer's, and a file of layer 0 alone is refused).
  modules = sorted({k.split('base_model.model.')[1].rsplit('.lora_', 1)[0]
                    for k in tensors})
  hf_io.write_json(d / 'adapter_config.json',
                   {'peft_type': 'LORA', 'r': r, 'lora_alpha': 8,
                    'target_modules': '|'.join(map(re.escape, modules))})


Q0 = 'base_model.model.model.layers.0.self_attn.q_proj'


# Each row: (id, setup(tmp) run before the snapshot, the call that must
# fail, the exception type, a fragment of its message). CLI rows call
# `train.cli.main` and check its single 'error:' line on stderr.
def _cli(*args):
  return ('cli',) + args


BAD_INPUTS = [
    ('data file missing', None,
     _cli('--data.task', 'boolq', '--data.path', '{tmp}/missing.json'),
     None, '{tmp}/missing.json'),
    ('data file malformed JSON',
     lambda t: (t / 'bad.json').write_text('[{"question": "x", '),
     _cli('--data.task', 'boolq', '--data.path', '{tmp}/bad.json'),
     None, '{tmp}/bad.json'),
    ('unknown task', None, _cli('--data.task', 'nope'), None, "'nope'"),
    ('unknown config', None, ('cli', '--config', 'nope'), None,
     "unknown config 'nope'"),
    ('unknown optimizer', None, _cli('--optim.name', 'sgd'), None,
     "unknown optimizer 'sgd'; choose one of: lora_rite, adam"),
    ('unknown optimizer argument', None,
     _cli('--optim.extra', '{"nope": 1}'), None,
     'unknown argument(s) nope'),
    ('unknown override key', None, _cli('--nope', '1'), None,
     'Unrecognized options: --nope'),
    ('override of the wrong type', None, _cli('--steps', 'abc'), None,
     "Error parsing --steps: invalid literal for int() with base 10: 'abc'"),
    ('unknown LoRA target', None, _cli('--lora.targets', 'nope'), None,
     "'nope'"),
    ('model path missing', None, _cli('--model.path', '{tmp}/nope'), None,
     'model.path {tmp}/nope: no such file or directory'),
    ('checkpoints present without --resume',
     lambda t: (t / 'run' / 'checkpoints' / '4').mkdir(parents=True),
     _cli(), None, 'already holds checkpoints; pass --resume'),
    ('a run\'s logs without checkpoints, no --resume',
     lambda t: ((t / 'run').mkdir(),
                (t / 'run' / 'config.json').write_text('{}'),
                (t / 'run' / 'metrics.csv').write_text('step\n')),
     _cli(), None, "run_dir {tmp}/run holds a run's config.json, metrics.csv "
     'but no checkpoint; pass --resume to start that run over'),
    ('a run\'s results without checkpoints, no --resume',
     lambda t: ((t / 'run' / 'adapter').mkdir(parents=True),
                (t / 'run' / 'config.json').write_text('{}'),
                (t / 'run' / 'adapter' / 'adapter_config.json').write_text(
                    '{}')),
     _cli(), None, "run_dir {tmp}/run holds a run's adapter but no "
     'checkpoint to resume from; move them aside or choose another '
     '--run_dir.'),
    ('a run\'s results without checkpoints, --resume',
     lambda t: ((t / 'run').mkdir(),
                (t / 'run' / 'summary.json').write_text('{}')),
     _cli('--resume'), None, "holds a run's summary.json but no checkpoint "
     'to resume from'),
    ('batch not dividing the mesh', None,
     lambda t: loop.validate(tiny(t / 'run', batch_size=6), 4),
     ValueError, 'does not divide over the mesh\'s data x fsdp = 4 x 1 = 4'),
    ('config.json missing', lambda t: (t / 'hf').mkdir(),
     lambda t: _from_pretrained(t / 'hf'), FileNotFoundError,
     'config.json not found'),
    ('config.json malformed',
     lambda t: ((t / 'hf').mkdir(), (t / 'hf' / 'config.json').write_text(
         '{"model_type": ')),
     lambda t: _from_pretrained(t / 'hf'), ValueError, 'malformed JSON'),
    ('safetensors tensor missing', 'missing',
     lambda t: _from_pretrained(t / 'hf'), ValueError,
     "{tmp}/hf: missing tensor 'model.layers.1.mlp.up_proj.weight' (looked "
     'in model.safetensors; expected shape [128, 64])'),
    ('safetensors tensor mis-shaped', 'misshaped',
     lambda t: _from_pretrained(t / 'hf'), ValueError,
     "has shape [3, 5], expected [128, 64] for this config.json"),
    ('GGUF of another architecture',
     lambda t: gguf_files.write_minimal_gguf(t / 'llama.gguf', 'llama'),
     lambda t: _from_pretrained(t / 'llama.gguf'), ValueError,
     "GGUF architecture is 'llama'; expected a Gemma model"),
    ('pickle .bin checkpoint',
     lambda t: ((t / 'hf').mkdir(), (t / 'hf' / 'pytorch_model.bin')
                .write_bytes(b'\x80\x04not loaded')),
     lambda t: _load_tensors(t / 'hf'), FileNotFoundError,
     'pytorch_model.bin is a pickle checkpoint, which we do not load'),
    ('PEFT adapter with wrong shapes',
     lambda t: _write_peft(t / 'peft', {
         f'{Q0}.lora_A.weight': np.zeros((4, 3), np.float32),
         f'{Q0}.lora_B.weight': np.zeros((64, 4), np.float32)}),
     lambda t: _load_peft(t / 'peft'), ValueError,
     'lora_A.weight has shape (4, 3), expected (r, 64)'),
    ('PEFT adapter naming another model\'s module',
     lambda t: _write_peft(t / 'peft', {
         'base_model.model.encoder.block.0.q.lora_A.weight':
             np.zeros((4, 64), np.float32),
         'base_model.model.encoder.block.0.q.lora_B.weight':
             np.zeros((64, 4), np.float32)}),
     lambda t: _load_peft(t / 'peft'), ValueError,
     "module 'encoder.block.0.q' is not a projection of this model"),
    ('export adapter_name escaping the directory', None,
     lambda t: _export(t / 'out', adapter_name='../escape'), ValueError,
     'must be a single plain file-name component'),
    ('optimizer on a leaf that is not a LoRA factor', None,
     lambda t: _lro_init({'w': jnp.zeros((4, 4))}), ValueError,
     "leaf 'w' is not part of a LoRA pair"),
    ('LoRA factor without its partner', None,
     lambda t: _lro_init({'q': {'lora_a': jnp.zeros((4, 2))}}), ValueError,
     "has no partner 'lora_b'"),
    ('LoRA factors of different ranks', None,
     lambda t: _lro_init({'q': {'lora_a': jnp.zeros((4, 2)),
                                'lora_b': jnp.zeros((3, 5))}}), ValueError,
     "has rank 2 in lora_a (4, 2) but 3 in lora_b (3, 5)"),
    ('LoRA factor masked out', None,
     lambda t: _lro_init({'q': {'lora_a': optax.MaskedNode(),
                                'lora_b': jnp.zeros((2, 3))}}), ValueError,
     "factor 'q/lora_b' has its partner 'lora_a' masked out"),
    ('LoRA factors of an integer dtype', None,
     lambda t: _lro_init({'q': {'lora_a': jnp.zeros((4, 2), jnp.int32),
                                'lora_b': jnp.zeros((2, 3))}}), ValueError,
     "factor 'q/lora_a' has dtype int32; LoRA factors must be of a "
     'floating dtype'),
    ('gradients unlike the params', None, lambda t: _lro_grads_unlike(),
     ValueError, 'the updates (gradients) do not have the structure of the '
     'params: a tuple of 3 leaves, where the params are a dict of 2 leaves'),
    ('hyperparameter out of range', None, lambda t: _lro_shampoo_b2(),
     ValueError, 'shampoo: b2 must be in [0, 1), got 1.0.'),
    ('optimizer update without params', None, lambda t: _lro_update(),
     ValueError, 'update() needs params'),
    ('run_dir/adapter is a link out of the run folder',
     lambda t: ((t / 'outside').mkdir(), (t / 'run').mkdir(),
                os.symlink(t / 'outside', t / 'run' / 'adapter')),
     _cli(), None, 'refusing to export the adapter through it'),
]


def _from_pretrained(path):
  from models import gemma  # pylint: disable=g-import-not-at-top
  gemma.from_pretrained(str(path))


def _load_tensors(path):
  from models import hf_io  # pylint: disable=g-import-not-at-top
  hf_io.load_tensors(path)


_PEFT_MODEL = {}


def _load_peft(path):
  from models import lora  # pylint: disable=g-import-not-at-top
  model = _PEFT_MODEL.setdefault('m', _lora_model())
  before = jax.tree.map(np.asarray, lora.lora_params(model))
  try:
    lora.load_peft_adapter(model, path)
  finally:
    # A refused adapter leaves the model as it was.
    _assert_trees_identical(jax.tree.map(np.asarray, lora.lora_params(model)),
                            before)


def _export(path, **kw):
  from models import lora  # pylint: disable=g-import-not-at-top
  model = _PEFT_MODEL.setdefault('m', _lora_model())
  lora.save_peft_adapter(model, path, 'google/gemma-3-270m', **kw)


def _lro_init(params):
  import lora_rite_optax as lro  # pylint: disable=g-import-not-at-top
  lro.lora_rite(1e-3).init(params)


def _lro_grads_unlike():
  # (loss, grads) where grads were meant: a tuple of 3 leaves.
  import lora_rite_optax as lro  # pylint: disable=g-import-not-at-top
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}
  tx = lro.scaled_adam(1e-3)
  tx.update((jnp.zeros(()), params['q']['lora_a'], params['q']['lora_b']),
            tx.init(params), params)


def _lro_shampoo_b2():
  import lora_rite_optax as lro  # pylint: disable=g-import-not-at-top
  lro.shampoo(1e-3, b2=1.0)


def _lro_update():
  import lora_rite_optax as lro  # pylint: disable=g-import-not-at-top
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}
  tx = lro.lora_rite(1e-3)
  tx.update(params, tx.init(params))


@pytest.mark.parametrize('row', BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_says_one_line_and_changes_nothing(row, tmp_path, capsys,
                                                     gemma_dir):
  from train import cli  # pylint: disable=g-import-not-at-top
  _, setup, call, exc_type, message = row
  if setup in ('missing', 'misshaped'):
    name = 'model.layers.1.mlp.up_proj.weight'
    _copy_hf(gemma_dir, tmp_path / 'hf', drop=name,
             reshape=name if setup == 'misshaped' else None)
  elif setup is not None:
    setup(tmp_path)
  message = message.replace('{tmp}', str(tmp_path))
  before = _snapshot(tmp_path)
  time.sleep(0.01)  # So a rewrite of an unchanged file shows in its mtime.
  if isinstance(call, tuple):
    args = [a.replace('{tmp}', str(tmp_path)) for a in call[1:]]
    if '--config' not in args:
      args = ['--config', 'tiny', '--run_dir', str(tmp_path / 'run')] + args
    capsys.readouterr()
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith('error: '), err
    assert message in err, err
    text = err
  else:
    with pytest.raises(exc_type) as info:
      call(tmp_path)
    text = str(info.value)
    assert len(text.strip().splitlines()) == 1, text
    assert message in text, text
  assert _snapshot(tmp_path) == before, text
  print(f'\n{row[0]}: {text}')


# ---------------------------------------------------------------------------
# Safety: no pickle on any load path; exports stay inside their folder.


SOURCE_DIRS = ('lora_rite_optax', 'models', 'train', 'benchmarks')
# Calls that can run code from a file's contents.
UNSAFE = re.compile(
    r'\bimport\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b'
    r'|\bfrom\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\s+import'
    r'|allow_pickle\s*=\s*True|torch\.load\s*\(|pd\.read_pickle'
    r'|yaml\.(unsafe_)?load\s*\(|(?<![.\w])(eval|exec)\s*\(')


def test_no_load_path_uses_pickle_or_runs_code():
  hits = []
  for top in SOURCE_DIRS:
    for path in sorted((ROOT / top).rglob('*.py')):
      for no, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split('#', 1)[0]
        if UNSAFE.search(code):
          hits.append(f'{path.relative_to(ROOT)}:{no}: {line.strip()}')
  assert not hits, '\n'.join(hits)


class _Trap:
  """Unpickling this creates ``marker``: proof that a loader ran code."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def test_pickle_files_are_refused_without_being_run(tmp_path, gemma_dir):
  import pickle  # pylint: disable=g-import-not-at-top  (dumping only)
  import shutil  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  from models import hf_io  # pylint: disable=g-import-not-at-top
  from models import lora  # pylint: disable=g-import-not-at-top
  marker = tmp_path / 'code-ran'
  payload = pickle.dumps(_Trap(marker))
  # A Hugging Face folder whose weights are a pickle only.
  hf = tmp_path / 'hf'
  hf.mkdir()
  shutil.copy(gemma_dir / 'config.json', hf / 'config.json')
  (hf / 'pytorch_model.bin').write_bytes(payload)
  with pytest.raises(FileNotFoundError, match='no model.safetensors.*'
                     'pytorch_model.bin is a pickle checkpoint'):
    gemma.from_pretrained(str(hf))
  with pytest.raises(FileNotFoundError, match='pickle checkpoint'):
    hf_io.load_tensors(hf)
  # A pickle handed over as the model file itself.
  with pytest.raises(ValueError, match='not a Hugging Face directory or a '
                     'GGUF file'):
    gemma.from_pretrained(str(hf / 'pytorch_model.bin'))
  # A PEFT adapter saved as adapter_model.bin.
  peft = tmp_path / 'peft'
  peft.mkdir()
  (peft / 'adapter_model.bin').write_bytes(payload)
  hf_io.write_json(peft / 'adapter_config.json',
                   {'peft_type': 'LORA', 'r': 4, 'lora_alpha': 8})
  with pytest.raises(FileNotFoundError, match='pickle checkpoint'):
    lora.load_peft_adapter(_PEFT_MODEL.setdefault('m', _lora_model()), peft)
  assert not marker.exists()


@pytest.mark.parametrize('name', ['../escape', '..', '/abs', 'a/b', 'a\\b'])
def test_export_adapter_name_cannot_leave_the_folder(tmp_path, name):
  out = tmp_path / 'out'
  out.mkdir()
  before = _snapshot(tmp_path)
  with pytest.raises(ValueError, match='single plain file-name component'):
    _export(out, adapter_name=name)
  assert _snapshot(tmp_path) == before


def test_export_is_not_written_through_a_planted_link(tmp_path, capsys):
  """run_dir/adapter -> elsewhere: refused before training starts."""
  from train import cli  # pylint: disable=g-import-not-at-top
  outside = tmp_path / 'outside'
  outside.mkdir()
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  os.symlink(outside, run_dir / 'adapter')
  before = _snapshot(tmp_path)
  code = cli.main(['--config', 'tiny', '--run_dir', str(run_dir)])
  err = capsys.readouterr().err.strip()
  assert code != 0 and len(err.splitlines()) == 1, err
  assert 'refusing to export the adapter through it' in err, err
  assert _snapshot(tmp_path) == before
  # The export itself checks again (the link could appear mid-run).
  with pytest.raises(ValueError, match='refusing to export'):
    loop._check_export_dir(str(run_dir))  # pylint: disable=protected-access


def _damage(state, damage):
  """Damages a checkpoint's state folder in place."""
  import shutil  # pylint: disable=g-import-not-at-top
  if damage == 'state deleted':
    shutil.rmtree(state)
  elif damage == 'data truncated':
    for f in state.rglob('*'):
      if f.is_file() and f.stat().st_size > 1000:
        f.write_bytes(f.read_bytes()[:100])
  elif damage == 'data files deleted':  # the index kept
    for f in (state / 'ocdbt.process_0' / 'd').iterdir():
      f.unlink()
  else:  # part of the state gone, its commit file kept (a cut copy)
    assert damage == 'state partly gone'
    for name in ('d', 'manifest.ocdbt', 'ocdbt.process_0'):
      path = state / name
      shutil.rmtree(path) if path.is_dir() else path.unlink()


DAMAGES = ['state deleted', 'data truncated', 'data files deleted',
           'state partly gone']


@pytest.mark.parametrize('damage', DAMAGES)
def test_a_damaged_checkpoint_says_how_to_resume_from_the_one_before(
    reference, tmp_path, damage):
  """A checkpoint whose state is gone or truncated: one short line saying it
  is damaged and which step moving it aside resumes from (it had been
  'does not fit this config', advising --config, at up to 2.4 KB; its data
  files deleted had been orbax's bare Exception, a 145-line traceback);
  moved aside, the run resumes from there."""
  import shutil  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / 'run'
  shutil.copytree(reference['run_dir'], run_dir)
  _damage(run_dir / 'checkpoints' / str(STEPS) / 'state', damage)
  with pytest.raises(loop.ConfigError) as e:
    loop.run(tiny(run_dir, resume=True), log=lambda s: None)
  msg = str(e.value)
  assert '\n' not in msg and len(msg) < 500, msg
  assert msg.startswith(f'--resume: checkpoint {STEPS} in {run_dir}/'
                        'checkpoints cannot be restored ('), msg
  aside = run_dir / 'checkpoints' / str(STEPS)
  assert msg.endswith(f'it is damaged or incomplete; move {aside} aside to '
                      f'resume from step {STEPS - 2}.'), msg
  aside.rename(tmp_path / 'damaged')
  lines = []
  loop.run(tiny(run_dir, resume=True), log=lines.append, stop_at=STEPS - 1)
  assert f'[train] resumed from step {STEPS - 2}' in lines
  # With no earlier checkpoint, the way out is another folder (moving the
  # only step aside would leave a run's results without a checkpoint,
  # which is refused).
  (tmp_path / 'damaged').rename(aside)
  for step in os.listdir(run_dir / 'checkpoints'):
    if step != str(STEPS):
      shutil.rmtree(run_dir / 'checkpoints' / step)
  with pytest.raises(loop.ConfigError) as e:
    loop.run(tiny(run_dir, resume=True), log=lambda s: None)
  assert str(e.value).endswith(
      'it is damaged or incomplete, and no earlier checkpoint is kept; start '
      f'over with another --run_dir (or move {run_dir} aside).'), e.value


@pytest.mark.parametrize('damage', ['data files deleted', 'data truncated'])
def test_a_checkpoint_without_its_data_files_prints_one_line(
    reference, tmp_path, damage):
  """`python -m train --resume` on it: orbax's bare Exception had ended
  the run in a traceback through the loop, not the refusal; and orbax's
  other reads, failing on its closed event loop, had printed hundreds of
  lines of tracebacks around it from tensorstore's threads."""
  import shutil  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / 'run'
  shutil.copytree(reference['run_dir'], run_dir)
  _damage(run_dir / 'checkpoints' / str(STEPS) / 'state', damage)
  done = subprocess.run(
      [sys.executable, '-m', 'train'] + _cli_args(run_dir) + ['--resume'],
      cwd=ROOT, env=xla_flags.script_env(), capture_output=True, text=True,
      timeout=300)
  errors = done.stderr.splitlines()
  assert done.returncode == 1 and len(errors) == 1, done.stderr[:3000]
  assert errors[0].startswith(f'error: --resume: checkpoint {STEPS} in '), (
      errors)
  assert errors[0].endswith('it is damaged or incomplete; move '
                            f'{run_dir}/checkpoints/{STEPS} aside to resume '
                            f'from step {STEPS - 2}.'), errors
  assert 'train/loop.py' not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize('saved_config_says_rank_2', [False, True])
def test_resume_with_another_rank_says_so_and_changes_nothing(
    reference, tmp_path, saved_config_says_rank_2):
  """A checkpoint that does not fit the config is refused before config.json
  (the run's record of its settings) is overwritten, in one line: naming
  the setting that changed, or, where the saved settings agree but the
  state does not (here its config item edited to say rank 2), the first
  leaf that differs.

  In a subprocess, since what matters is all the process prints: a restore
  that failed part-way used to leave orbax's reads finishing on a closed
  event loop, each printing a traceback after the error line.
  """
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / 'run'
  shutil.copytree(reference['run_dir'], run_dir)
  if saved_config_says_rank_2:
    item = run_dir / 'checkpoints' / str(STEPS) / 'config' / 'metadata'
    saved = json.loads(item.read_text())
    saved['lora']['rank'] = 2
    item.write_text(json.dumps(saved))
  before = _snapshot(tmp_path)
  time.sleep(0.01)
  done = subprocess.run(
      [sys.executable, '-m', 'train'] + _cli_args(run_dir) + [
          '--resume', '--lora.rank', '2'],
      cwd=ROOT, env=xla_flags.script_env(), capture_output=True, text=True,
      timeout=300)
  err = done.stderr.strip()
  assert done.returncode == 1 and len(err.splitlines()) == 1, err
  assert f'error: --resume: checkpoint {STEPS} in ' in err, err
  if saved_config_says_rank_2:
    # The settings agree, the state does not: a damaged checkpoint, and
    # how to get past it (not a --config that cannot help).
    assert 'does not fit this model (the saved state holds (' in err, err
    assert re.search(r'float32 at \S+/lora_[ab], this config \(', err), err
    assert err.endswith(
        'it was trained on another base model (model.path) or with other '
        f'settings; resume with --config {run_dir}/config.json, on the '
        'model it was trained on.'), err
  else:
    assert ('was made with other settings (lora.rank: 4 there, 2 now)'
            in err), err
    assert 'config.json' in err, err
  assert _snapshot(tmp_path) == before


def test_a_stop_is_said_on_the_host_it_reached(monkeypatch, capsys):
  """The default log prints on process 0 only: a SIGTERM that reached
  another host had gone unsaid there."""
  import jax  # pylint: disable=g-import-not-at-top
  said = []
  ack = [lambda line: None]  # the default log on a process other than 0
  for index, custom, printed in ((1, None, True), (0, None, False),
                                 (1, said.append, False)):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    if custom is not None:
      ack = [custom]
    loop.stop_acknowledgement(custom, ack)('[train] SIGTERM: stopping')
    out = capsys.readouterr().out
    assert (out == '[train] SIGTERM: stopping\n') == printed, (index, out)
  assert said == ['[train] SIGTERM: stopping']


def test_a_stop_request_gives_back_both_handlers_and_says_once_to_its_log(
    capfd):
  """Both handlers (SIGTERM's too, not only SIGINT's) come back on exit, and
  an acknowledgement that its log took is not written to stderr too."""
  from train import preemption  # pylint: disable=g-import-not-at-top
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  lines = []
  with preemption.StopRequest(lines.append) as stop:
    assert all(signal.getsignal(s) == stop._handle  # pylint: disable=protected-access
               for s in before)
    os.kill(os.getpid(), signal.SIGTERM)
  assert {s: signal.getsignal(s) for s in before} == before
  assert lines == ['[train] SIGTERM: stopping after this step']
  assert capfd.readouterr().err == ''
  assert preemption.Interrupted(signal.SIGTERM, 3, 'd').exit_code == 143

"""The command line: ``python -m train --config NAME [overrides]``.

``--config`` picks a preset from `train.configs`; every other flag is a
tyro override of that preset's fields (``--steps 20``, ``--optim.name adam``,
``--data.path train.jsonl``, ``--resume``). ``python -m train --config tiny
--help`` lists them all with the preset's values as defaults.

Bad inputs end the process with one line on stderr, before anything is
written: status 2 for a bad command line (no or an unknown ``--config``, an
unknown flag or an unparsable value, as argparse does), status 1 for a bad
setting found while building the run (an unknown optimizer, missing or
malformed data, a batch that does not divide the mesh).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import os
import json
import re
import signal
import sys
import threading
from typing import Sequence

from train import configs
from train.errors import first_line, say


def parse(argv: Sequence[str]) -> tuple[configs.Config, int]:
  """(config, stop_at) from the command line.

  Raises:
    ValueError: no or an unknown --config.
  """
  # Exact names only (an abbreviation such as --con is tyro's to refuse),
  # and a bad value is one ValueError line, not argparse's usage and exit.
  pre = _PreParser(add_help=False, allow_abbrev=False, exit_on_error=False)
  pre.add_argument('--config', action='append')
  pre.add_argument('--stop_at', '--stop-at', type=int, default=0)
  try:
    known, rest = pre.parse_known_args(list(argv))
  except argparse.ArgumentError as e:
    raise ValueError(str(e)) from None
  if known.config and len(known.config) > 1:
    # Last-wins had started another preset than the one meant.
    raise ValueError(f'--config given {len(known.config)} times '
                     f'({", ".join(known.config)}); give one.')
  # --config=~/x.json: the shell expands only a separate word.
  known.config = os.path.expanduser(known.config[0]) if known.config else None
  if known.stop_at < 0:
    raise ValueError(f'--stop_at must be >= 0 (0: run to --steps), got '
                     f'{known.stop_at}.')
  if not known.config and any(a in ('-h', '--help') for a in rest):
    print(_presets_help())
    raise SystemExit(0)
  if not known.config:
    raise ValueError('--config NAME is required; choose one of: '
                     f'{", ".join(configs.config_names())}.')
  # A name, or a JSON file (the config.json a run saved: resuming a run
  # started with overrides needs no retyping of them).
  from_file = known.config.endswith('.json') or os.sep in known.config
  base = (configs.load_json(known.config) if from_file
          else configs.get_config(known.config))
  # Flag names with hyphens, as tyro suggests them: it takes both spellings,
  # but matched a misspelled '--seq_len' against none ('--seq-len' gets
  # '(perhaps --data.seq-len)').
  rest = [_hyphenated(a) for a in rest]
  import tyro  # pylint: disable=g-import-not-at-top
  # tyro reports a bad override (unknown flag, unparsable value) as a boxed
  # multi-line panel on stderr and exits; keep the promise of one line.
  err = io.StringIO()
  help_asked = any(a in ('-h', '--help') for a in rest)
  try:
    with contextlib.redirect_stderr(err), _panel_width(
        None if help_asked else 10_000):
      cfg = tyro.cli(configs.Config, default=base, args=rest,
                     prog=f'python -m train --config {known.config}',
                     description=(
                         f'The settings in {known.config}.' if from_file
                         else inspect.cleandoc(
                             configs.PRESETS[known.config].__doc__ or ''))
                     + _STOP_AT_HELP)
  except SystemExit as e:
    if not e.code:  # --help: printed to stdout, a normal exit.
      raise
    raise ValueError(_tyro_message(err.getvalue())) from None
  if from_file and cfg.resume:
    _check_resume_folder(known.config, cfg)
  return cfg, known.stop_at


@contextlib.contextmanager
def _panel_width(columns: int | None):
  """tyro's panels drawn ``columns`` wide (None: the terminal's width).

  An error panel wraps at the terminal's width (80 when piped), breaking a
  long value mid-word; joined into one line, a path read 'mode ls'. Drawn
  wide, nothing wraps.
  """
  if columns is None:
    yield
    return
  old = os.environ.get('COLUMNS')
  os.environ['COLUMNS'] = str(columns)
  try:
    yield
  finally:
    if old is None:
      del os.environ['COLUMNS']
    else:
      os.environ['COLUMNS'] = old


def _hyphenated(arg: str) -> str:
  """``--a_b.c_d=x_y`` -> ``--a-b.c-d=x_y``: the name only, not a value."""
  if not arg.startswith('--'):
    return arg
  name, sep, value = arg.partition('=')
  return name.replace('_', '-') + sep + value


def _check_resume_folder(config_path: str, cfg: configs.Config) -> None:
  """A run's config.json resumed where its checkpoints are not: the run was
  moved (its run_dir names the old folder) or --run_dir names another.
  That had started over at step 0 in the other folder, saying only that
  it found no checkpoint there."""
  from train import loop  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(os.path.abspath(config_path))
  run_dir = loop.default_run_dir(cfg)
  if (os.path.abspath(run_dir) != folder and loop.run_has_checkpoints(folder)
      and not loop.run_has_checkpoints(run_dir)):
    raise ValueError(
        f'--resume: --config {config_path} is the run in {folder}, whose '
        f'checkpoints are there, but run_dir is {run_dir}, which has none: '
        f'pass --run_dir {folder} to resume it.')


# --stop_at is read before tyro sees the command line, so its help is here.
_STOP_AT_HELP = ('\n\n--stop_at N (also --stop-at): stop after global step '
                 'N, checkpointing there as a preemption would (0, the '
                 'default: run to --steps); continue with --resume.')


class _PreParser(argparse.ArgumentParser):
  """An ArgumentParser whose every error is a ValueError: with
  ``exit_on_error=False`` some errors still go to `error`, which prints the
  usage and exits."""

  def error(self, message):
    raise ValueError(message)


def _presets_help() -> str:
  """Usage and the presets, each with its docstring's first line."""
  names = configs.config_names()
  width = max(map(len, names))
  lines = ['usage: python -m train --config NAME [overrides]', '',
           'NAME is a preset below, or a JSON file of the config (a run\'s '
           'RUN_DIR/config.json continues it with --resume).', '',
           'presets (python -m train --config NAME --help lists its fields):']
  for name in names:
    # The docstring's first paragraph, which may wrap.
    first = (configs.PRESETS[name].__doc__ or '').strip().split('\n\n')[0]
    lines.append(f'  {name:<{width}}  {" ".join(first.split())}'.rstrip())
  return '\n'.join(lines)


# tyro colours its panel when stdout is a terminal.
_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def _tyro_message(panel: str) -> str:
  """The message of tyro's error panel (its first section), on one line,
  with tyro's suggestions for a misspelt flag.

  The panel is drawn with box characters on a terminal and in plain ASCII
  otherwise (the title then is its own first section), coloured on a
  terminal, and wraps to the terminal's width, so a message may span
  several lines.
  """
  lines = [l.strip() for l in _ANSI.sub('', panel).splitlines() if l.strip()]
  boxed = bool(lines) and lines[0].startswith('\u256d')
  sections, current = [], []
  for line in lines:
    if line[0] in '\u256d\u2570':  # Top and bottom borders.
      continue
    text = line.strip('\u2502|').strip()
    if text and not text.strip('\u2500-'):  # A rule between sections.
      sections.append(current)
      current = []
    elif text:
      current.append(text)
  sections.append(current)
  index = 0 if boxed else 1
  body = sections[index] if len(sections) > index else []
  text = ' '.join(' '.join(body).split())
  if not text:
    return (lines or ['bad arguments'])[0]
  for section in sections:
    if section and section[0].startswith('Perhaps you meant'):
      # Every flag of a line: a boolean's reads '--x, --no-x' (keeping the
      # first word had left '--x,' and lost the --no- form).
      names = [t.rstrip(',') for l in section[1:] if l.startswith('--')
               for t in l.split() if t.startswith('--')]
      if names:
        text += f' (perhaps {", ".join(dict.fromkeys(names[:4]))})'
  if re.match(r'Unrecognized options:.*\b(true|false)\b', text, re.I):
    text += ('; a boolean is a flag: --NAME or --no-NAME (e.g. '
             '--eval.before, --eval.no-before)')
  return text


_INTERRUPTED = ('error: interrupted (Ctrl-C); --resume continues from the '
                'last checkpoint, if one was written.')


def _parse_and_import(argv: Sequence[str]):
  """(parse(argv), the train.loop module), with a Ctrl-C meanwhile held
  until both are done: raised inside the imports (jax's, ~3 s) it had been
  a 40-line traceback, or, landing in a callback of XLA's, printed as
  ignored and lost, and the run trained to the end. Returns None for the
  loop when a Ctrl-C came."""
  hold = threading.current_thread() is threading.main_thread()
  pressed = []
  if hold:
    previous = signal.signal(signal.SIGINT,
                             lambda *unused: pressed.append(True))
  try:
    parsed = parse(argv)
    from train import loop  # pylint: disable=g-import-not-at-top
  finally:
    if hold:
      signal.signal(signal.SIGINT, previous)
  return parsed, (None if pressed else loop)


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    (cfg, stop_at), loop = _parse_and_import(argv)
  except ValueError as e:
    say(f'error: {first_line(e)}')
    return 2
  except BrokenPipeError:
    # --help piped into `head`: the reader has what it wanted (this had
    # been a 29-line traceback).
    sys.stdout = open(os.devnull, 'w')  # pylint: disable=consider-using-with
    return 0
  if loop is None:
    say(_INTERRUPTED)
    return 130
  try:
    summary = loop.run(cfg, stop_at=stop_at)
  except loop.Interrupted as e:
    say(str(e))
    return e.exit_code
  except KeyboardInterrupt:
    # Ctrl-C while building (before the stop handler is in place), or a
    # second one that stops at once: one line, not a traceback (see
    # __main__ for what orbax's threads log after it).
    say(_INTERRUPTED)
    return 130
  except (ValueError, OSError, FloatingPointError, ImportError) as e:
    say(f'error: {first_line(e)}')
    return 1
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    # One summary per run, as the step lines are: every host had printed
    # its own, and only process 0's holds the evaluations read back from
    # eval.csv (the others' said null).
    return 0
  brief = {k: summary.get(k) for k in ('run_dir', 'steps', 'final_loss',
                                       'eval_before', 'eval_after',
                                       'adapter_dir')}
  brief['seconds'] = {k: round(v, 1) for k, v in summary['timing'].items()}
  # Standard JSON, as summary.json: a NaN loss is null (it had printed NaN).
  print(json.dumps(loop.finite_or_none(brief), indent=1, default=float,
                   allow_nan=False))
  for line in eval_lines(summary.get('eval_before'),
                         summary.get('eval_after')):
    print(line)
  return 0


def eval_lines(before: dict | None, after: dict | None) -> list[str]:
  """'accuracy: before X -> after Y (N held-out examples)' per score."""
  lines = []
  for key in ('accuracy', 'exact_match', 'rougeL'):
    if before and after and key in before and key in after:
      # The examples a score is over: those with a gold answer.
      n_before, n_after = (int(e.get('num_scored', e.get('num_examples', 0)))
                           for e in (before, after))
      # A finished run evaluated again may use another eval.num_examples.
      lines.append(f'{key}: before {before[key]:.3f} -> after '
                   f'{after[key]:.3f} ' + (
                       f'({n_after} held-out examples)'
                       if n_before == n_after else
                       f'(on {n_before} and {n_after} held-out examples)'))
  return lines

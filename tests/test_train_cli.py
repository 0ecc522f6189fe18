"""`python -m train`: presets, overrides, and one-line errors that write
nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import cli
from train import configs

from tests import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_builds_and_round_trips_json():
  names = configs.config_names()
  for task in configs.PAPER_TASKS:
    assert f'paper_gemma2b_{task}' in names
    assert f'paper_gemma7b_{task}' in names
  assert {'tiny', 'demo', 'paper_mt5xxl_superni'} <= set(names)
  for name in names:
    cfg = configs.get_config(name)
    assert configs.from_dict(__import__('json').loads(
        configs.to_json(cfg))) == cfg
    assert configs.PRESETS[name].__doc__


def test_paper_presets_use_the_documented_defaults():
  """Every paper preset (not one: a change to the shared factory had passed
  with only paper_gemma2b_gsm8k checked) has what its docstring states."""
  names = [n for n in configs.config_names() if n.startswith('paper_')]
  assert len(names) == 11
  for name in names:
    cfg = configs.get_config(name)
    model = name.split('_')[1]
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (
        16, 16.0, 0.05), name
    assert (cfg.batch_size, cfg.optim.warmup_steps, cfg.optim.schedule) == (
        64, 100, 'cosine'), name
    assert (cfg.optim.b1, cfg.optim.b2) == (0.9, 0.999), name
    assert cfg.optim.learning_rate == configs.PAPER_LR_SWEEP[0], name
    # The whole training set trained on, the whole test set reported.
    assert (cfg.data.validation_fraction, cfg.eval.num_examples) == (0.0, 0)
    assert (cfg.model.name, cfg.model.path) == {
        'gemma2b': ('gemma-2b', 'google/gemma-2b'),
        'gemma7b': ('gemma-7b', 'google/gemma-7b'),
        'mt5xxl': ('mt5-xxl', 'google/mt5-xxl')}[model], name
    assert 'not publish' in configs.PRESETS[name].__doc__


def test_overrides():
  cfg, stop_at = cli.parse(['--config', 'tiny', '--steps', '3',
                            '--optim.name', 'adam', '--data.seq_len', '32',
                            '--stop_at', '2'])
  assert (cfg.steps, cfg.optim.name, cfg.data.seq_len, stop_at) == (
      3, 'adam', 32, 2)
  assert cfg.lora == configs.get_config('tiny').lora


def _main(argv, capsys):
  code = cli.main(argv)
  err = capsys.readouterr().err.strip()
  return code, err


@pytest.mark.parametrize('extra, code, message', [
    (['--data.task', 'boolq', '--data.path', '{tmp}/missing.json'], 1,
     'missing.json'),
    (['--data.task', 'boolq', '--data.path', '{tmp}/bad.json'], 1,
     'bad.json'),
    (['--optim.name', 'sgd'], 1, "unknown optimizer 'sgd'"),
    (['--optim.extra', '{"nope": 1}'], 1, 'nope'),
    # A bad optim.extra value had failed at the first step, with a
    # traceback, config.json, metrics.csv and TensorBoard written. The
    # optimizer now names it when made; one that fails only inside the
    # update is caught by tracing it (test_an_optimizer_failing_to_update).
    (['--optim.extra', '{"update_capping": "x"}'], 1, "optim: lora_rite: "
     "update_capping must be a number, got 'x'."),
    # It had overridden --optim.b1 silently (config.json kept 0.9).
    (['--optim.extra', '{"b1": 0.5, "eps": 1e-3}'], 1, 'optim.extra: b1, eps '
     'have their own options (--optim.b1, --optim.eps), not optim.extra.'),
    # OverflowErrors' tracebacks of 37 and 47 lines, from inside jax.
    (['--seed', str(2**64)], 1, f'seed must be in [-2**63, 2**63 - 1), got '
     f'{2**64}.'),
    (['--optim.warmup_steps', str(10**20)], 1, 'optim.warmup_steps must be '
     f'< 2**31, got {10**20}.'),
    (['--steps', str(2**31), '--optim.schedule', 'linear'], 1, 'steps must '
     f'be < 2**31, got {2**31}.'),
    (['--data.task', ''], 1, "error: data.task: unknown task ''; expected "
     'one of'),
    # Which of the two options named the unknown task had not been said.
    (['--data.eval_task', 'nope'], 1, "error: data.eval_task: unknown task "
     "'nope'; expected one of"),
    # checkpoint_every's 0 is 'only at the end', not 'off'.
    (['--checkpoint_every', '-1'], 1, 'checkpoint_every must be >= 0 (0: '
     'only at the end), got -1.'),
    # It had said "optimizer() got multiple values for argument".
    (['--optim.extra', '{"learning_rate": 1}'], 1, 'optim.extra: '
     'learning_rate is set by --optim.learning_rate and --optim.schedule, '
     'not in optim.extra.'),
    (['--optim.end_lr_fraction', '2'], 1, 'optim.end_lr_fraction must be a '
     'finite number in [0, 1], got 2.0.'),
    # num_threads -1 had made run_dir/checkpoints.
    (['--data.num_threads', '-1'], 1, 'data.num_threads must be >= 0'),
    (['--stop_at', '-1'], 2, '--stop_at must be >= 0 (0: run to --steps), '
     'got -1.'),
    (['--stop_at', 'x'], 2, "argument --stop_at/--stop-at: invalid int "
     "value: 'x'"),
])
def test_bad_inputs_one_line_nothing_written(tmp_path, capsys, extra, code,
                                             message):
  """Refused before the run folder is made."""
  (tmp_path / 'bad.json').write_text('[{"instruction": "x", "output": ')
  run_dir = tmp_path / 'run'
  argv = ['--config', 'tiny', '--run_dir', str(run_dir)] + [
      a.replace('{tmp}', str(tmp_path)) for a in extra]
  got, err = _main(argv, capsys)
  assert got == code and len(err.splitlines()) == 1, err
  assert err.startswith('error: ') and message in err, err
  assert not run_dir.exists()


def test_an_optimizer_failing_to_update_is_one_line_before_any_file():
  """Traced, not run: a value only the update trips on (here a scale
  that is a string, which optax.scale takes without a check) is a
  ConfigError naming the settings."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from train import optim as optim_lib  # pylint: disable=g-import-not-at-top
  cfg = configs.get_config('tiny').optim
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}
  with pytest.raises(optim_lib.ConfigError, match='optim: lora_rite cannot update '
                     'the LoRA factors with these settings') as e:
    optim_lib.check_optimizer(optax.scale('x'), params, cfg)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('argv, message', [
    # Abbreviations are not --config and --stop_at (argparse had taken them
    # for those).
    (['--con', 'tiny'], '--config NAME is required'),
    (['--config', 'tiny', '--stop', '3'], 'Unrecognized options: --stop, 3'),
    # argparse's own errors: two lines (usage naming __main__.py) and exit.
    (['--config'], 'argument --config: expected one argument'),
    # Last-wins had started the 270M demo for '--config tiny --config demo'.
    (['--config', 'tiny', '--config', 'demo'],
     '--config given 2 times (tiny, demo); give one.'),
])
def test_command_line_errors_are_one_line(tmp_path, capsys, argv, message):
  run_dir = tmp_path / 'run'
  code, err = _main(argv + ['--run_dir', str(run_dir), '--steps', '1'],
                    capsys)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert err.startswith('error: ') and message in err, err
  assert 'usage' not in err and '__main__' not in err
  assert not run_dir.exists()


@pytest.mark.parametrize('argv, message', [
    (['--lora.rnk', '3'], 'Unrecognized options: --lora.rnk, 3 (perhaps '
     '--lora.rank)'),
    (['--steps', 'abc'], "Error parsing --steps: invalid literal for int() "
     "with base 10: 'abc'"),
    (['--eval.before', 'true'], 'Unrecognized options: true; a boolean is a '
     'flag: --NAME or --no-NAME (e.g. --eval.before, --eval.no-before)'),
    # A boolean's hint names both forms (it had ended '--eval.before,');
    # a flag misspelled with underscores, as the README writes flags, gets a
    # hint too (it had got none).
    (['--no-eval.before'], 'Unrecognized options: --no-eval.before (perhaps '
     '--eval.before, --eval.no-before)'),
    (['--seq_len', '96'], 'Unrecognized options: --seq-len, 96 (perhaps '
     '--data.seq-len)'),
    # tyro's panel wraps at the terminal's width (80 when piped): a long
    # value had come back with a space inside it ('mode ls').
    (['--model.pathh', '/x' * 60], 'Unrecognized options: --model.pathh, '
     + '/x' * 60 + ' (perhaps --model.path)'),
])
@pytest.mark.parametrize('terminal', [False, True])
def test_override_errors_on_a_terminal_too(monkeypatch, capsys, tmp_path,
                                           argv, message, terminal):
  """On a terminal tyro colours its panel: the message had been lost (only
  the panel's title bar was printed)."""
  if terminal:
    monkeypatch.setenv('TERM', 'xterm')
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
  code, err = _main(['--config', 'tiny', '--run_dir', str(tmp_path / 'run')]
                    + argv, capsys)
  assert code == 2 and err == f'error: {message}', err


def test_help_piped_into_a_closed_reader_exits_quietly(tmp_path):
  """`python -m train --config tiny --help | head -1` had ended in a
  29-line BrokenPipeError traceback."""
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen(
      [sys.executable, '-m', 'train', '--config', 'tiny', '--help'],
      cwd=str(tmp_path), env=xla_flags.script_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  proc.stdout.close()  # the reader is gone before the help is written
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=120) == 0 and err == '', err


def test_every_config_field_has_help():
  """tyro's --help describes a field from its class's `Attributes:` entry:
  rank, alpha, targets, b1, the mesh axes and rules had none."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  undocumented, todo = [], [configs.Config]
  while todo:
    cls = todo.pop()
    doc = (cls.__doc__ or '').partition('Attributes:')[2]
    named = set(re.findall(r'^    (\w+):', doc, re.MULTILINE))
    for field in dataclasses.fields(cls):
      if dataclasses.is_dataclass(field.type) or (
          isinstance(field.type, str) and hasattr(configs, field.type)
          and dataclasses.is_dataclass(getattr(configs, field.type))):
        todo.append(getattr(configs, field.type)
                    if isinstance(field.type, str) else field.type)
      elif field.name not in named:
        undocumented.append(f'{cls.__name__}.{field.name}')
  assert not undocumented, undocumented


def test_preset_help_documents_stop_at(capsys):
  # --stop_at is parsed before tyro, which had left it out of --help.
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--config', 'tiny', '--help'])
  assert exit_info.value.code == 0
  out = ' '.join(capsys.readouterr().out.split())
  assert '--stop_at N (also --stop-at): stop after global step N' in out


def test_summary_lines_name_both_evaluation_sizes_when_they_differ():
  # A finished run resumed with another eval.num_examples had printed the
  # new size alone beside a 'before' scored on the old one.
  before = {'accuracy': 0.0, 'num_examples': 16.0}
  assert cli.eval_lines(before, {'accuracy': 0.125, 'num_examples': 8.0}) == [
      'accuracy: before 0.000 -> after 0.125 (on 16 and 8 held-out examples)']
  assert cli.eval_lines(before, {'accuracy': 0.5, 'num_examples': 16.0}) == [
      'accuracy: before 0.000 -> after 0.500 (16 held-out examples)']
  assert cli.eval_lines(None, before) == []
  # Accuracy is over the examples with a gold answer: that count is named.
  scored = {'accuracy': 0.5, 'num_examples': 16.0, 'num_scored': 12.0}
  assert cli.eval_lines(scored, scored) == [
      'accuracy: before 0.500 -> after 0.500 (12 held-out examples)']


def test_an_interrupted_run_exits_as_the_signal_says(monkeypatch, capsys):
  """One line saying where the checkpoint is, and 128 + the signal's
  number (a shell's convention; it had been a traceback)."""
  import signal  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top

  def run(cfg, stop_at):
    raise loop.Interrupted(signal.SIGTERM, 25, f'{cfg.run_dir}/checkpoints')

  monkeypatch.setattr(loop, 'run', run)
  code, err = _main(['--config', 'tiny', '--run_dir', 'r'], capsys)
  assert code == 143 and err == (
      'interrupted by SIGTERM at step 25; checkpoint 25 saved in '
      'r/checkpoints: continue with --resume.')


def test_ctrl_c_while_the_command_line_is_read_is_one_line(monkeypatch,
                                                            capsys):
  """A Ctrl-C before train.loop had been imported (jax's import, ~3 s) was
  a 40-line traceback, or was lost in a callback of XLA's and the run
  trained to the end. It is held until parsing and the import are done."""
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top
  real_parse, ran = cli.parse, []

  def parse_then_ctrl_c(argv):
    parsed = real_parse(argv)
    os.kill(os.getpid(), signal.SIGINT)
    return parsed

  monkeypatch.setattr(cli, 'parse', parse_then_ctrl_c)
  monkeypatch.setattr(loop, 'run', lambda *a, **k: ran.append(True))
  handler = signal.getsignal(signal.SIGINT)
  code, err = _main(['--config', 'tiny', '--run_dir', 'r'], capsys)
  assert (code, err) == (130, 'error: interrupted (Ctrl-C); --resume '
                         'continues from the last checkpoint, if one was '
                         'written.')
  assert not ran and signal.getsignal(signal.SIGINT) is handler


def test_config_from_a_saved_json(tmp_path):
  """--config RUN_DIR/config.json: the settings a run saved, overrides and
  all, with more overrides on top (a run started with overrides had to
  have them all retyped to resume)."""
  cfg, _ = cli.parse(['--config', 'tiny', '--steps', '3', '--optim.name',
                      'adam', '--lora.targets', 'q', 'v'])
  path = tmp_path / 'config.json'
  path.write_text(configs.to_json(cfg))
  assert cli.parse(['--config', str(path)])[0] == cfg
  again, stop_at = cli.parse(['--config', str(path), '--steps', '5',
                              '--stop_at', '4'])
  assert again == configs.replace(cfg, steps=5) and stop_at == 4
  # Per-host settings are not taken from the file (process 0 wrote it: its
  # process_id on every host would start them all as process 0).
  hosts = configs.replace(cfg, **{'distributed.process_id': 0,
                                  'distributed.num_processes': 2})
  path.write_text(configs.to_json(hosts))
  assert cli.parse(['--config', str(path)])[0] == cfg
  assert cli.parse(['--config', str(path), '--distributed.process_id', '1',
                    '--distributed.num_processes', '2'])[0] == configs.replace(
                        cfg, **{'distributed.process_id': 1,
                                'distributed.num_processes': 2})
  # Nor is resume: a resumed run's file says true, and a new run started
  # from it in another folder had been refused as a resume of the old one.
  path.write_text(configs.to_json(configs.replace(cfg, resume=True)))
  assert cli.parse(['--config', str(path)])[0] == cfg
  assert cli.parse(['--config', str(path), '--resume'])[0].resume


def test_resuming_a_moved_runs_config_names_its_folder(tmp_path):
  """--config MOVED/config.json --resume, its run_dir the old folder: refused
  in one line naming the folder its checkpoints are in (it had started
  over at step 0 in the old folder); --run_dir MOVED resumes it."""
  moved = tmp_path / 'moved'
  (moved / 'checkpoints' / '4').mkdir(parents=True)
  cfg = configs.replace(configs.get_config('tiny'),
                        run_dir=str(tmp_path / 'orig'))
  path = moved / 'config.json'
  path.write_text(configs.to_json(cfg))
  with pytest.raises(ValueError) as e:
    cli.parse(['--config', str(path), '--resume'])
  assert str(e.value) == (
      f'--resume: --config {path} is the run in {moved}, whose checkpoints '
      f'are there, but run_dir is {tmp_path}/orig, which has none: pass '
      f'--run_dir {moved} to resume it.')
  assert cli.parse(['--config', str(path), '--resume', '--run_dir',
                    str(moved)])[0].run_dir == str(moved)
  # Without --resume it is a new run elsewhere from the same settings.
  assert cli.parse(['--config', str(path)])[0] == cfg


@pytest.mark.parametrize('text, message', [
    (None, 'config file not found: {path}'),
    ('{"steps": ', 'malformed JSON in {path} at line 1 column 11'),
    ('{"stepz": 3}', '{path}: unknown config field(s) stepz; the config has: '),
    ('{"optim": {"nme": "adam"}}', 'unknown config field(s) optim.nme; optim.'
     ' has: '),
    ('{"steps": "3"}', "{path}: config field steps must be int, got '3'."),
    ('{"lora": {"targets": "q"}}', 'config field lora.targets must be a list '
     "of strings, got 'q'."),
    ('[]', '{path}: the config must be a JSON object, got list.'),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, text, message):
  path = tmp_path / 'config.json'
  if text is not None:
    path.write_text(text)
  code, err = _main(['--config', str(path), '--run_dir',
                     str(tmp_path / 'run')], capsys)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert message.format(path=path) in err, err
  assert not (tmp_path / 'run').exists()


def test_unknown_config(capsys):
  code, err = _main(['--config', 'nope'], capsys)
  assert code != 0 and len(err.splitlines()) == 1
  assert "unknown config 'nope'" in err and 'tiny' in err


def test_cli_process_batch_not_dividing_the_mesh(tmp_path):
  """A real process on 4 fake devices: exit status and one stderr line."""
  run_dir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'train', '--config', 'tiny', '--batch_size', '6',
       '--run_dir', str(run_dir)], cwd=ROOT, capture_output=True, text=True,
      env=xla_flags.script_env(4), timeout=300)
  assert proc.returncode != 0
  err = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(err) == 1, proc.stderr
  assert 'does not divide' in err[0] and '4 devices' in err[0], err
  assert not run_dir.exists()


def test_help_without_a_config_lists_the_presets(capsys):
  # The first thing a user types; it had been the '--config is required'
  # error with status 2.
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: python -m train --config NAME')
  for name in configs.config_names():
    assert f'\n  {name} ' in out, name
  assert 'LoRA-RITE on the real Gemma 3 270M (Q4_K_M GGUF, dequantised to ' \
         'float32)' in out


def test_only_process_0_prints_the_summary(monkeypatch, capsys, tmp_path):
  """Every host had printed the run's summary (64 copies on a v5e-256),
  the others' with eval_before null: only process 0 reads eval.csv back."""
  import jax  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top
  summary = {'run_dir': 'r', 'steps': 2, 'final_loss': 1.5,
             'eval_before': None, 'eval_after': None, 'adapter_dir': None,
             'timing': {'train': 1.0}}
  monkeypatch.setattr(loop, 'run', lambda cfg, stop_at=0: summary)
  argv = ['--config', 'tiny', '--run_dir', str(tmp_path / 'run')]
  for index, printed in ((1, False), (0, True)):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert ('"final_loss": 1.5' in out) == printed, out


def test_the_printed_summary_is_standard_json(monkeypatch, capsys, tmp_path):
  """A NaN loss had printed as NaN, which JSON parsers refuse
  (summary.json has null)."""
  from train import loop  # pylint: disable=g-import-not-at-top
  summary = {'run_dir': 'r', 'steps': 2, 'final_loss': float('nan'),
             'eval_before': {'accuracy': float('inf')}, 'eval_after': None,
             'adapter_dir': None, 'timing': {'train': 1.0}}
  monkeypatch.setattr(loop, 'run', lambda cfg, stop_at=0: summary)
  assert cli.main(['--config', 'tiny', '--run_dir', str(tmp_path)]) == 0
  out = capsys.readouterr().out
  printed = json.loads(out[:out.rindex('}') + 1])
  assert printed['final_loss'] is None
  assert printed['eval_before'] == {'accuracy': None}


def test_the_error_line_is_one_write(tmp_path, monkeypatch):
  """The line and its newline in one write: print's separate newline let
  orbax's threads (tracebacks after a failed restore) land on the end of
  the line (a flaky test_reliability caught it)."""
  writes = []

  class Recorder(io.StringIO):
    def write(self, text):
      writes.append(text)
      return super().write(text)

  monkeypatch.setattr(sys, 'stderr', Recorder())
  assert cli.main(['--config', 'tiny', '--run_dir', str(tmp_path / 'run'),
                   '--steps', '-3']) in (1, 2)
  errors = [w for w in writes if w.startswith('error: ')]
  assert len(errors) == 1 and errors[0].endswith('.\n'), writes


def test_a_tilde_in_a_path_is_the_home_folder(tmp_path, monkeypatch):
  """``--run-dir=~/x`` (which the shell leaves as it is) had trained into a
  folder named '~' in the working directory; a config file's '~' too."""
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  home = str(tmp_path / 'home')
  cfg, _ = cli.parse(['--config', 'tiny', '--run-dir=~/run',
                      '--data.path=~/data.jsonl', '--data.eval-path=~/e',
                      '--data.data-dir=~/d', '--model.path=~/m.gguf',
                      '--model.tokenizer=~/t.model'])
  assert (cfg.run_dir, cfg.data.path, cfg.data.eval_path, cfg.data.data_dir,
          cfg.model.path, cfg.model.tokenizer) == (
              f'{home}/run', f'{home}/data.jsonl', f'{home}/e', f'{home}/d',
              f'{home}/m.gguf', f'{home}/t.model')
  # A saved config named with '~', holding one.
  os.makedirs(home)
  saved = json.loads(configs.to_json(cfg))
  saved['run_dir'] = '~/other'
  Path(home, 'c.json').write_text(json.dumps(saved))
  assert cli.parse(['--config=~/c.json'])[0].run_dir == f'{home}/other'
  # Only a leading '~' (a Hub id or 'byte' stays as given).
  assert configs.replace(cfg, **{'model.path': 'google/gemma-2b',
                                 'model.tokenizer': 'byte'}).model.path == (
                                     'google/gemma-2b')


@pytest.mark.parametrize('name', ['', '..', '../elsewhere', 'a/b'])
def test_a_name_that_is_no_folder_name_is_refused(tmp_path, capsys,
                                                   monkeypatch, name):
  """The default run_dir is runs/<name>: --name '' had written the run into
  runs/ itself, among the other runs, and '../x' outside it."""
  monkeypatch.chdir(tmp_path)
  got, err = _main(['--config', 'tiny', '--name', name], capsys)
  assert got == 1 and err == (
      f"error: name must be a plain folder name (the default run_dir is "
      f"runs/<name>), got {name!r}; or give --run-dir."), err
  assert os.listdir(tmp_path) == []


def test_a_run_saved_with_its_own_optimizer_args_in_extra_still_resumes(
    tmp_path):
  """Before 2026-12-06 optim.extra's b1/b2/eps/weight_decay overrode their
  options (now refused there): the run's config.json, and its checkpoints'
  record of it, read them as the options they were, or no command could
  resume the run."""
  from train import loop  # pylint: disable=g-import-not-at-top
  cfg = configs.get_config('tiny')
  saved = json.loads(configs.to_json(cfg))
  saved['optim']['extra'] = '{"b1": 0.95, "escape_mass": true}'
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(saved))
  loaded = configs.load_json(path)
  assert loaded.optim.b1 == 0.95
  assert json.loads(loaded.optim.extra) == {'escape_mass': True}
  assert loop.resume_changes(saved, json.loads(configs.to_json(loaded))) == {}
  # A real change is still one.
  other = configs.replace(loaded, **{'optim.b1': 0.9})
  assert loop.resume_changes(saved, json.loads(configs.to_json(other))) == {
      'optim.b1': (0.95, 0.9)}


def test_first_line_skips_leading_blank_lines_and_names_an_empty_error():
  from train.errors import first_line  # pylint: disable=g-import-not-at-top
  assert first_line(ValueError('\n  one\ntwo')) == 'one'
  assert first_line(KeyError()) == 'KeyError'
  assert first_line(OSError('  \n ')) == 'OSError'


def test_cli_values_keep_underscores_and_columns_is_restored(monkeypatch,
                                                            tmp_path):
  """Only a flag's name is hyphenated (a value such as a path keeps its
  underscores), and the COLUMNS set for tyro's panel does not outlive the
  parse (a notebook's later output had been drawn 10,000 wide)."""
  from train import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv('COLUMNS', raising=False)
  run_dir = str(tmp_path / 'my_run')
  cfg, _ = cli.parse(['--config', 'tiny', f'--run_dir={run_dir}',
                      '--optim.name=scaled_adam'])
  assert (cfg.run_dir, cfg.optim.name) == (run_dir, 'scaled_adam')
  assert 'COLUMNS' not in os.environ
  monkeypatch.setenv('COLUMNS', '77')
  cli.parse(['--config', 'tiny'])
  assert os.environ['COLUMNS'] == '77'


def test_a_config_file_is_any_path_and_resumes_where_its_checkpoints_are(
    tmp_path):
  """A path with a folder in it is a config file whatever its suffix; a
  copy of a run's config.json elsewhere resumes the run in its run_dir when
  that folder has the checkpoints (only a run_dir without them is
  refused)."""
  from train import cli, configs  # pylint: disable=g-import-not-at-top
  orig = tmp_path / 'orig'
  (orig / 'checkpoints' / '4').mkdir(parents=True)
  cfg = configs.replace(configs.get_config('tiny'), run_dir=str(orig),
                        steps=7)
  copy = tmp_path / 'copy'
  (copy / 'checkpoints' / '2').mkdir(parents=True)
  path = copy / 'settings'  # no .json suffix
  path.write_text(configs.to_json(cfg))
  assert cli.parse(['--config', str(path)])[0] == cfg
  resumed = cli.parse(['--config', str(path), '--resume'])[0]
  assert resumed.run_dir == str(orig) and resumed.resume

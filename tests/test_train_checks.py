"""What a run checks and keeps across a resume: the data position on another
process count, a periodic evaluation a preemption interrupted, the held-out
prompts with evaluation off, the tokenizer, the changed settings named by
field; and the values it refuses before anything is written (the command
line's one-line errors are in test_train_cli)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import numpy as np
import pytest

from train import configs
from train import loop
from train import sharding as sharding_lib

from tests import shared_data
from tests import xla_flags as test_xla_flags

# One step shape for every run here (steps is not step-neutral): one compile.
FAST = {'steps': 8, 'log_every': 1, 'checkpoint_every': 4,
        'data.seq_len': 96, 'progress': False, 'export_adapter': False}


def tiny(run_dir, **changes):
  return configs.replace(configs.get_config('tiny'), run_dir=str(run_dir),
                         **{**FAST, **changes})


def quiet(unused_line):
  pass


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted run."""
  run_dir = tmp_path_factory.mktemp('straight') / 'run'
  return loop.run(tiny(run_dir), log=quiet)


@pytest.fixture(scope='module')
def stopped(tmp_path_factory):
  """The same run stopped at its step-4 checkpoint (copy it to resume)."""
  run_dir = tmp_path_factory.mktemp('stopped') / 'run'
  loop.run(tiny(run_dir), log=quiet, stop_at=4)
  return run_dir


def _copy(run_dir, to):
  shutil.copytree(run_dir, to)
  return to


def _files(root):
  return {p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob('*') if p.is_file()}


def test_stop_at_before_the_checkpoint_is_refused_and_past_steps_said(
    straight, stopped, tmp_path):
  """--stop_at 2 on a checkpoint of step 4 had run nothing, rewritten
  config.json and the logs, and ended as if stopped; one past --steps ran
  to --steps without a word."""
  run_dir = _copy(stopped, tmp_path / 'run')
  before = _files(run_dir)
  with pytest.raises(loop.ConfigError, match=(
      r'^--stop_at 2: the run resumes at step 4 \(checkpoint 4 in .*'
      r'checkpoints\), past it; give a later step, or none to run to '
      r'--steps\.$')):
    loop.run(tiny(run_dir, resume=True), log=quiet, stop_at=2)
  assert _files(run_dir) == before
  lines = []
  out = loop.run(tiny(run_dir, resume=True), log=lines.append, stop_at=12)
  assert '[train] --stop_at 12 is past --steps 8: the run ends at step 8' in (
      lines)
  assert out['steps'] == 8 and ([h['loss'] for h in out['history']] ==
                                [h['loss'] for h in straight['history']])


def test_a_resume_where_auto_resolves_to_another_dtype_says_so(tmp_path):
  """model.dtype 'auto' is bfloat16 on TPU/GPU, float32 on CPU: a run
  resumed on another backend had changed its compute dtype silently. (Here
  the checkpoint's record is edited to say it was saved in bfloat16.)"""
  run_dir = tmp_path / 'run'
  auto = {'model.dtype': 'auto'}
  loop.run(tiny(run_dir, **auto), log=quiet, stop_at=4)
  meta = run_dir / 'checkpoints' / '4' / 'config' / 'metadata'
  saved = json.loads(meta.read_text())
  assert saved['resolved_dtypes'] == {'dtype': 'float32',
                                      'param_dtype': 'float32'}
  lines = []
  loop.run(tiny(run_dir, resume=True, **auto), log=lines.append, stop_at=4)
  assert not [l for l in lines if 'another backend' in l], lines
  saved['resolved_dtypes']['dtype'] = 'bfloat16'
  meta.write_text(json.dumps(saved))
  loop.run(tiny(run_dir, resume=True, **auto), log=lines.append, stop_at=4)
  assert ("[train] model.dtype 'auto' is float32 here, bfloat16 where "
          'checkpoint 4 was saved (another backend): the run goes on in '
          'float32') in lines, lines


@pytest.mark.parametrize('failing', ['config.json', 'summary.json'])
def test_a_failed_write_keeps_config_and_summary_whole(
    stopped, tmp_path, monkeypatch, failing):
  """config.json (which a refused resume names) and summary.json had been
  rewritten in place: a full disk during a resume left them cut short."""
  import errno  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  run_dir = _copy(stopped, tmp_path / 'run')
  before = (run_dir / failing).read_text()
  real = pathlib.Path.write_text

  def full_disk(self, text, *args, **kwargs):
    if self.name.startswith(f'.{failing}.'):
      real(self, text[:100], *args, **kwargs)
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(self, text, *args, **kwargs)

  monkeypatch.setattr(pathlib.Path, 'write_text', full_disk)
  # The file is named (the bare errno had named none).
  # summary.json's also says that only it is missing, and how to write it.
  then = (r'; checkpoint 4 is saved: free the space, then --resume writes '
          r'the summary\.' if failing == 'summary.json' else r'\.')
  with pytest.raises(OSError, match=rf'^{run_dir}/{failing}: cannot write '
                     r'\(No space left on device\); the file there before, '
                     rf'if any, is kept{then}$'):
    loop.run(tiny(run_dir, resume=True), log=quiet, stop_at=4)
  assert (run_dir / failing).read_text() == before
  assert not [p for p in run_dir.iterdir() if p.name.endswith('.tmp')]


def test_a_full_disk_for_the_initial_factors_is_one_line(tmp_path,
                                                          monkeypatch):
  """safetensors' own error had ended the run in a 20-line traceback."""
  from models import hf_io  # pylint: disable=g-import-not-at-top
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top

  def full(*unused_args, **unused_kwargs):
    raise SafetensorError('Error while serializing: I/O error: File too '
                          'large (os error 27)')

  monkeypatch.setattr(hf_io, 'save_file', full)
  run_dir = tmp_path / 'run'
  with pytest.raises(OSError, match=(
      r'^.*lora_initial_factors\.safetensors: cannot write \(Error while '
      r'serializing: I/O error: File too large \(os error 27\)\)\.$')):
    loop.run(tiny(run_dir, **{'lora.init': 'pissa'}), log=quiet, stop_at=1)
  assert not [p for p in run_dir.iterdir() if 'initial' in p.name]


def test_remat_trains_the_same_and_may_be_turned_on_at_a_resume(
    straight, stopped, tmp_path, monkeypatch):
  """model.remat recomputes each block in the backward pass: the same
  losses (to float32 rounding), and a resumed run may turn it on (to fit
  another mesh's memory) without the resume calling it another run."""
  build, remat = loop.build, []

  def recording_build(config):
    r = build(config)
    remat.append(r.model.remat)  # what the jitted step's graphdef holds
    return r

  monkeypatch.setattr(loop, 'build', recording_build)
  run_dir = _copy(stopped, tmp_path / 'run')
  resumed = loop.run(tiny(run_dir, resume=True, **{'model.remat': True}),
                     log=quiet)
  np.testing.assert_allclose([h['loss'] for h in resumed['history']],
                             [h['loss'] for h in straight['history']],
                             rtol=1e-5)
  assert json.loads((run_dir / 'config.json').read_text())['model']['remat']
  assert remat == [True]  # on CPU the losses alone cannot tell


def test_resume_on_another_process_count(straight, stopped, tmp_path):
  """A checkpoint of a 2-process run (grain writes one position file per
  process: process_0-of-2.json, process_1-of-2.json, the same position, as
  every process reads the same global batches) resumes on 1 process, where
  grain itself looks for process_0-of-1.json only, and continues exactly."""
  run_dir = _copy(stopped, tmp_path / 'run')
  data = run_dir / 'checkpoints' / '4' / 'data'
  shutil.copy(data / 'process_0-of-1.json', data / 'process_1-of-2.json')
  os.rename(data / 'process_0-of-1.json', data / 'process_0-of-2.json')
  lines = []
  resumed = loop.run(tiny(run_dir, resume=True), log=lines.append)
  assert ([h['loss'] for h in resumed['history']] ==
          [h['loss'] for h in straight['history']])
  # A caller's log gets the step lines too (they had gone to stdout).
  assert [l.split(']')[0] for l in lines if l.startswith('[step ')] == [
      f'[step {s}' for s in range(5, 9)], lines
  # At seq_len 96 (tiny's own is 128) most prompts are cut to make room:
  # said once, with the count from the tokenizer's own cut.
  from train import data  # pylint: disable=g-import-not-at-top
  examples = loop.load_examples(tiny(run_dir))[0][:1000]
  cut = [data.prompt_tokens_cut(e, data.ByteTokenizer(), 96, 8)
         for e in examples]
  assert 0 < sum(c > 0 for c in cut) < len(cut)
  assert [l for l in lines if 'lose prompt tokens' in l] == [
      f'[train] warning: {sum(c > 0 for c in cut)} of the first '
      f'{len(cut)} training examples lose prompt tokens to fit data.seq_len '
      f'96 (up to {max(cut)}, cut from the left; raise --data.seq_len or cap '
      'the targets with --data.max_target_tokens)']


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGINT'])
def test_a_signal_checkpoints_the_step_and_resume_continues(straight, tmp_path,
                                                           sig):
  """SIGTERM (a Cloud TPU preemption) or Ctrl-C: the step in flight ends,
  is checkpointed and the run stops (it had died where it stood, losing
  every step since the last checkpoint, with a traceback)."""
  import signal  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / 'run'

  def log(line):
    if line.startswith('[step 3]'):
      os.kill(os.getpid(), getattr(signal, sig))

  previous = signal.getsignal(signal.SIGINT)
  with pytest.raises(loop.Interrupted) as e:
    loop.run(tiny(run_dir), log=log)
  assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
  assert (e.value.step, e.value.exit_code) == (
      3, 128 + getattr(signal, sig))
  assert str(e.value) == (
      f'interrupted by {sig} at step 3; checkpoint 3 saved in '
      f'{run_dir}/checkpoints: continue with --resume.')
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['3']
  assert json.loads((run_dir / 'summary.json').read_text())[
      'interrupted'] == sig
  resumed = loop.run(tiny(run_dir, resume=True), log=quiet)
  # The history kept from before the stop, then the resumed steps.
  assert ([h['loss'] for h in resumed['history']] ==
          [h['loss'] for h in straight['history']])


def test_a_periodic_evaluation_cut_short_is_done_on_resume(tmp_path):
  """The checkpoint at a periodic evaluation's step is saved before the
  evaluation: a run that dies during it resumes past that step, and the
  evaluation is done first (once: the ones recorded are not redone)."""
  small = {'checkpoint_every': 2, 'eval.every': 2, 'eval.num_examples': 4,
           'eval.batch_size': 4}
  real = loop.Evaluator.__call__
  calls = []

  def preempted_at_the_second(self, state):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError('preempted during an evaluation')
    return real(self, state)

  run_dir = tmp_path / 'run'
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.Evaluator, '__call__', preempted_at_the_second)
    with pytest.raises(RuntimeError, match='preempted'):
      loop.run(tiny(run_dir, **small), log=quiet)
  assert sorted(int(s) for s in os.listdir(run_dir / 'checkpoints')) == [2, 4]
  lines = []
  resumed = loop.run(tiny(run_dir, resume=True, **small), log=lines.append)
  assert any('no evaluation recorded at step 4: doing it now' in l
             for l in lines), lines
  # Step 8's too: with no final evaluation (tiny's default), the last
  # multiple of eval.every is evaluated (it had been left out), and it is
  # the summary's eval_after, as a resume of the finished run reads it.
  with open(run_dir / 'eval.csv') as f:
    assert [int(r['step']) for r in csv.DictReader(f)] == [2, 4, 6, 8]
  done = loop.run(tiny(run_dir, resume=True, **small), log=quiet)
  assert resumed['eval_after'] is not None
  assert done['eval_after'] == pytest.approx(resumed['eval_after'])
  # Cut short at the last step's evaluation, the final model's: the resume
  # that does it records it as eval_after (it had been null in summary.json
  # beside eval.csv's row). The file is standard JSON: no NaN (B's update
  # ratio is NaN at step 1), which strict parsers refuse.
  calls.clear()
  run_dir = tmp_path / 'last'
  last = {**small, 'steps': 4}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.Evaluator, '__call__', preempted_at_the_second)
    with pytest.raises(RuntimeError, match='preempted'):
      loop.run(tiny(run_dir, **last), log=quiet)
  loop.run(tiny(run_dir, resume=True, **last), log=quiet)

  def strict(constant):
    raise ValueError(f'{constant} in summary.json')

  summary = json.loads((run_dir / 'summary.json').read_text(),
                       parse_constant=strict)
  with open(run_dir / 'eval.csv') as f:
    row = list(csv.DictReader(f))[-1]
  assert int(row['step']) == 4
  assert summary['eval_after']['target_loss'] == pytest.approx(
      float(row['eval/target_loss']))
  assert summary['history'][0]['update_ratio_b'] is None


def test_the_last_step_is_evaluated_once_with_a_final_evaluation(tmp_path):
  """With eval.after the last step's evaluation is the final one, not a
  periodic one as well."""
  calls = []
  real = loop.Evaluator.__call__

  def counted(self, state):
    calls.append(1)
    return real(self, state)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.Evaluator, '__call__', counted)
    out = loop.run(tiny(tmp_path / 'run', steps=4, checkpoint_every=0,
                        **{'eval.every': 2, 'eval.after': True,
                           'eval.num_examples': 4, 'eval.batch_size': 4}),
                   log=quiet)
  assert len(calls) == 2 and 'eval_after' in out
  with open(tmp_path / 'run' / 'eval.csv') as f:
    assert [int(r['step']) for r in csv.DictReader(f)] == [2, 4]


def _boolq_folder(root, train_questions, test_questions):
  """A boolq data folder in the LLM-Adapters format."""
  def records(questions):
    return [{'instruction': f'Please answer the following question with true '
                            f'or false, question: {q}?\n\nAnswer format: '
                            'true/false', 'input': '',
             'output': 'the correct answer is true', 'answer': 'true'}
            for q in questions]
  root.mkdir()
  (root / 'train.json').write_text(json.dumps(records(train_questions)))
  (root / 'test.json').write_text(json.dumps(records(test_questions)))
  return root


def _load_with_eval_off_and_on(off, warning):
  """(train, evals) of ``off`` (evaluation off), which warns ``warning``,
  then of the same config with evaluation after training on."""
  with pytest.warns(UserWarning, match=warning):
    train_off, evals_off = loop.load_examples(off)
  with pytest.warns(UserWarning, match='left out of training'):
    train_on, evals_on = loop.load_examples(
        configs.replace(off, **{'eval.after': True}))
  return train_off, evals_off, train_on, evals_on


def test_num_train_examples_counts_what_is_left_after_held_out_prompts(
    tmp_path):
  """The cap had been taken first: 1,000 math examples beside GSM8K's test
  set trained as 689. It counts the examples trained on."""
  questions = [f'is {i} an even number' for i in range(40)]
  folder = _boolq_folder(tmp_path / 'boolq', questions, questions[:5])
  cfg = tiny(tmp_path / 'run', **{
      'data.task': 'boolq', 'data.path': str(folder),
      'data.validation_fraction': 0.0, 'eval.num_examples': 0,
      'data.num_train_examples': 20, 'eval.after': True})
  with pytest.warns(UserWarning, match=r'^data: 5 of 40 training examples '
                    r'are boolq test prompts; left out of training \(20 kept, '
                    r'as data.num_train_examples asks\)\.$'):
    train, _ = loop.load_examples(cfg)
  with pytest.warns(UserWarning, match='5 of 40'):
    every, _ = loop.load_examples(configs.replace(
        cfg, **{'data.num_train_examples': 0}))
  assert len(train) == 20 and train == every[:20]


def test_a_resume_of_a_run_capped_before_the_held_out_prompts_says_so(
    tmp_path, monkeypatch):
  """Runs before 2026-12-06 took data.num_train_examples before leaving
  the held-out prompts out: their resume is refused (other examples), and
  the line says why rather than blaming the eval split or the paths."""
  questions = [f'is {i} an even number' for i in range(40)]
  folder = _boolq_folder(tmp_path / 'boolq', questions, questions[:5])
  cfg = tiny(tmp_path / 'run', **{
      'data.task': 'boolq', 'data.path': str(folder),
      'data.validation_fraction': 0.0, 'eval.num_examples': 0,
      'data.num_train_examples': 20})
  real = loop.load_examples
  with monkeypatch.context() as mp:  # the old count: one held-out prompt in
    mp.setattr(loop, 'load_examples',
               lambda cfg: (lambda t, e: (t[1:], e))(*real(cfg)))
    with pytest.warns(UserWarning, match='5 of 40 training examples'):
      loop.run(cfg, log=quiet, stop_at=1)
  with pytest.raises(loop.ConfigError, match=r'trained on other examples '
                     r'\(19 there, 20 now.*data.num_train_examples now counts '
                     r'the examples left once the held-out prompts are out'):
    loop.run(configs.replace(cfg, resume=True), log=quiet)


def test_eval_task_is_compared_by_task_not_spelling(tmp_path):
  """'Arithmetic' for 'arithmetic' had carved its validation set from
  another pool (200 of 2000, overlapping training) than training's."""
  cfg = tiny(tmp_path / 'run', **{
      'data.task': 'arithmetic', 'data.num_train_examples': 500,
      'eval.split': 'validation', 'eval.num_examples': 0, 'eval.after': True})
  plain = loop.load_examples(cfg)
  spelt = loop.load_examples(configs.replace(
      cfg, **{'data.eval_task': 'Arithmetic'}))
  assert (len(plain[0]), len(plain[1])) == (450, 50)
  assert spelt == plain


def test_test_prompts_are_held_out_with_evaluation_off(tmp_path):
  """Evaluation off still leaves the test prompts out of training (it had
  trained on them), so the training examples do not depend on it and a
  resume may turn evaluation on or off."""
  questions = [f'is {i} an even number' for i in range(40)]
  folder = _boolq_folder(tmp_path / 'boolq', questions, questions[:5])
  common = {'data.task': 'boolq', 'data.path': str(folder),
            'data.validation_fraction': 0.0, 'eval.num_examples': 0}
  off = tiny(tmp_path / 'run', **common)
  train_off, evals_off, train_on, evals_on = _load_with_eval_off_and_on(
      off, r'5 of 40 training examples are boolq test prompts; left out of '
      'training')
  assert evals_off == [] and len(evals_on) == 5
  assert train_off == train_on and len(train_off) == 35
  assert (loop.training_data_fingerprint(train_off) ==
          loop.training_data_fingerprint(train_on))
  # A run says so in a [train] line (Python's warning is two lines on
  # stderr, where a refusal is one).
  lines = []
  loop.run(off, log=lines.append, stop_at=1)
  assert ('[train] warning: data: 5 of 40 training examples are boolq test '
          'prompts; left out of training.') in lines
  # With evaluation off, a test split that is not there is no error.
  (folder / 'test.json').unlink()
  with pytest.warns(UserWarning, match='split could not be read'):
    train, _ = loop.load_examples(off)
  assert len(train) == 40


def test_validation_twins_are_held_out_with_evaluation_off(tmp_path):
  """A training file that repeats questions (OpenBookQA's does) can have a
  question's twin in the validation carve: it is left out of training with
  evaluation on or off (it had trained with evaluation off only, so the
  training set changed with it and a resume that turned it on was
  refused)."""
  questions = [f'is {i} an even number' for i in range(40)]
  folder = _boolq_folder(tmp_path / 'boolq', questions * 2, questions[:1])
  common = {'data.task': 'boolq', 'data.path': str(folder),
            'eval.split': 'validation', 'eval.num_examples': 0}
  off = tiny(tmp_path / 'run', **common)
  train_off, evals_off, train_on, evals_on = _load_with_eval_off_and_on(
      off, r'of 72 training examples are boolq validation prompts; left out '
      'of training')
  assert evals_off == [] and len(evals_on) == 8
  assert train_off == train_on
  held = {e.prompt for e in evals_on}
  assert not any(e.prompt in held for e in train_off)
  # Each held-out question had two copies, one or both carved.
  assert len(train_off) == 80 - 2 * len(held) < 72


def test_gsm8k_preset_without_evaluation_skips_gsm8k_test_prompts():
  shared_data.require('math', 'gsm8k')
  from train import data  # pylint: disable=g-import-not-at-top
  cfg = configs.replace(configs.get_config('paper_gemma2b_gsm8k'), **{
      'eval.before': False, 'eval.after': False, 'eval.every': 0})
  with pytest.warns(UserWarning, match='gsm8k test prompts'):
    train, evals = loop.load_examples(cfg)
  test = {data.prompt_key(e) for e in data.load_task('gsm8k', 'test')}
  assert train and evals == []
  assert not [e for e in train if data.prompt_key(e) in test]


def test_data_max_per_task_caps_superni_and_is_refused_for_other_tasks(
    tmp_path):
  """--data.max_per_task (the SuperNI presets' 100) reaches both splits'
  loads; for a run with no SuperNI task it is refused, not ignored."""
  folder = tmp_path / 'superni'
  folder.mkdir()
  for split in ('train', 'test'):
    (folder / f'{split}.jsonl').write_text(''.join(
        json.dumps({'task_name': t, 'definition': 'Copy.', 'inputs':
                    f'{split}-{t}-{i}', 'targets': 'x'}) + '\n'
        for t in ('t1', 't2') for i in range(5)))
  cfg = configs.replace(configs.get_config('tiny'), **{
      'data.task': 'superni', 'data.path': str(folder),
      'data.validation_fraction': 0.0, 'data.max_per_task': 2,
      'eval.split': 'test', 'eval.after': True})
  train, evals = loop.load_examples(cfg)
  assert [e.subtask for e in train] == ['t1', 't1', 't2', 't2']
  assert [e.prompt.split('### Input:\n')[1].split('\n')[0]
          for e in evals] == ['test-t1-0', 'test-t1-1', 'test-t2-0',
                              'test-t2-1']
  with pytest.raises(loop.ConfigError, match=r'^data\.max_per_task caps the '
                     r'instances of each SuperNI task; arithmetic is not '
                     r'SuperNI \(0: all\)\.$'):
    loop.load_examples(configs.replace(configs.get_config('tiny'), **{
        'data.max_per_task': 2}))
  with pytest.raises(loop.ConfigError, match='data.max_per_task must be >= 0'):
    loop.validate(configs.replace(cfg, **{'data.max_per_task': -1}), 1)
  for name in configs.config_names():
    assert configs.get_config(name).data.max_per_task == (
        100 if name.endswith('_superni') else 0), name


def test_resume_names_a_changed_rank_or_optimizer(stopped, tmp_path):
  """Named by field (as for any other setting), not as the first leaf of
  the saved state whose shape the change altered; config.json unchanged."""
  run_dir = _copy(stopped, tmp_path / 'run')
  saved = (run_dir / 'config.json').read_text()
  with pytest.raises(loop.ConfigError, match=r'checkpoint 4 in .* was made '
                     r'with other settings \(lora\.rank: 4 there, 2 now\); '
                     r'resume with --config .*config\.json'):
    loop.run(tiny(run_dir, resume=True, **{'lora.rank': 2}), log=quiet)
  with pytest.raises(loop.ConfigError, match=r"optim\.name: 'lora_rite' "
                     r"there, 'adam' now"):
    loop.run(tiny(run_dir, resume=True, **{'optim.name': 'adam'}), log=quiet)
  assert (run_dir / 'config.json').read_text() == saved
  # A folder holding only its checkpoints (copied): the advice had named
  # the config.json that is not there.
  (run_dir / 'config.json').unlink()
  with pytest.raises(loop.ConfigError, match=r"optim\.name: 'lora_rite' "
                     r"there, 'adam' now\); resume with the settings "
                     r'checkpoint 4 was made with \(as flags: .* has no '
                     r'config\.json\)\.$'):
    loop.run(tiny(run_dir, resume=True, **{'optim.name': 'adam'}), log=quiet)
  assert not (run_dir / 'config.json').exists()


def test_resume_refuses_a_metrics_csv_it_cannot_append_to(stopped, tmp_path):
  """Found before the build: it had failed with a bare errno once
  config.json was rewritten and the rows after the checkpoint dropped."""
  run_dir = _copy(stopped, tmp_path / 'run')
  saved = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
  rows = (run_dir / 'eval.csv').read_text()
  (run_dir / 'eval.csv').unlink()
  (run_dir / 'eval.csv').mkdir()
  with pytest.raises(loop.ConfigError, match=r'^run_dir .*: eval\.csv is not '
                     r'a writable file; make it one \(or move it aside\), '
                     r'then run again\.$'):
    loop.run(tiny(run_dir, resume=True), log=quiet)
  (run_dir / 'eval.csv').rmdir()
  (run_dir / 'eval.csv').write_text(rows)
  if os.geteuid() != 0:  # root writes a read-only file
    (run_dir / 'metrics.csv').chmod(0o444)
    with pytest.raises(loop.ConfigError, match=r': metrics\.csv is not a '
                       r'writable file'):
      loop.run(tiny(run_dir, resume=True), log=quiet)
    (run_dir / 'metrics.csv').chmod(0o644)
  assert {p.name: p.read_bytes() for p in run_dir.iterdir()
          if p.is_file()} == saved


@pytest.mark.parametrize('field, value, message', [
    ('optim.learning_rate', math.nan, 'optim.learning_rate must be a finite '
     'number > 0, got nan'),
    ('optim.learning_rate', 0.0, 'optim.learning_rate must be a finite '
     'number > 0, got 0.0'),
    ('optim.learning_rate', math.inf, 'finite number > 0, got inf'),
    ('optim.end_lr_fraction', -0.1, 'optim.end_lr_fraction must be a finite '
     r'number in \[0, 1\], got -0.1'),
    ('optim.end_lr_fraction', 2.0, r'end_lr_fraction must be a finite number '
     r'in \[0, 1\], got 2.0'),
    ('optim.end_lr_fraction', math.nan, 'end_lr_fraction must be a finite'),
    ('optim.clip_grad_norm', -1.0, 'optim.clip_grad_norm must be a finite '
     'number >= 0 (0: off), got -1.0'),
    ('optim.clip_grad_norm', math.inf, 'clip_grad_norm must be a finite'),
    ('lora.alpha', 0.0, 'lora.alpha must be a finite number > 0, got 0.0'),
    ('lora.alpha', math.nan, 'lora.alpha must be a finite number > 0'),
    ('optim.warmup_steps', -1, 'optim.warmup_steps must be >= 0, got -1'),
    ('keep_checkpoints', 0, 'keep_checkpoints must be >= 1, got 0'),
    ('data.num_train_examples', -5, 'data.num_train_examples must be >= 0 '
     r'\(0: all\), got -5'),
    ('data.num_threads', -1, 'data.num_threads must be >= 0'),
    ('data.style', 'bogus', "data.style must be one of alpaca, plain, tk, got "
     "'bogus'"),
    # NaN passes optax's adam and lamb: a NaN decay had trained to the end
    # and exported a NaN adapter.
    ('optim.weight_decay', math.nan, 'optim.weight_decay must be a finite '
     'number >= 0, got nan'),
    ('optim.b2', 1.0, r'optim.b2 must be a finite number in \[0, 1\), got '
     '1.0'),
    ('optim.b1', math.nan, 'optim.b1 must be a finite number in'),
    ('optim.eps', -1e-8, 'optim.eps must be a finite number >= 0'),
    ('optim.b1', 1.0, r'optim.b1 must be a finite number in \[0, 1\), got '
     '1.0'),
    # Sizes and counts validate alone refuses: grad_accum 0 had reached
    # batch_size % grad_accum (a ZeroDivisionError), batch_size 0 every
    # later divisibility check (0 divides by anything).
    ('steps', 0, 'steps must be >= 1, got 0'),
    ('batch_size', 0, 'batch_size and grad_accum must be >= 1, got 0 and 1'),
    ('grad_accum', 0, 'batch_size and grad_accum must be >= 1, got 8 and 0'),
    ('grad_accum', 3, 'batch_size 8 is not divisible by grad_accum 3'),
    ('optim.max_consecutive_nonfinite', 0,
     'optim.max_consecutive_nonfinite must be >= 1, got 0'),
    ('eval.every', -1, r'eval.every must be >= 0 \(0: only before and after '
     r'training\), got -1'),
    # jax takes 64-bit seeds and dropout's is seed + 1.
    ('seed', 2**63 - 1, r'seed must be in \[-2\*\*63, 2\*\*63 - 1\), got '
     f'{2**63 - 1}'),
    ('data.seq_len', 1, 'data.seq_len must be >= 2, got 1'),
    ('data.max_target_tokens', FAST['data.seq_len'],
     r'data.max_target_tokens must be in \[0, seq_len\), got 96'),
    ('eval.method', 'bogus', "eval.method must be 'auto', 'loglik' or "
     "'generation', got 'bogus'"),
])
def test_out_of_range_values_are_config_errors(tmp_path, field, value,
                                               message):
  with pytest.raises(loop.ConfigError, match=message.replace('(0: off)',
                                                             r'\(0: off\)')):
    loop.validate(tiny(tmp_path, **{field: value}), 1)


def test_zero_clip_and_warmup_stay_valid(tmp_path):
  loop.validate(tiny(tmp_path, **{'optim.clip_grad_norm': 0.0,
                                  'optim.warmup_steps': 0,
                                  'optim.end_lr_fraction': 0.0}), 1)
  # The closed ends of the ranges the refusals state.
  loop.validate(tiny(tmp_path, seed=-2**63, **{
      'optim.end_lr_fraction': 1.0, 'optim.b1': 0.0, 'optim.b2': 0.0,
      'optim.eps': 0.0, 'optim.weight_decay': 0.0,
      'data.max_target_tokens': FAST['data.seq_len'] - 1}), 1)
  # The name is a folder name only where it makes the default run_dir.
  for name in ('', '..', 'a/b'):
    loop.validate(tiny(tmp_path, name=name), 1)


@pytest.mark.parametrize('changes, devices, message', [
    # The mesh splits each micro-batch, not the whole batch.
    ({'grad_accum': 4}, 4, "batch size 8 (micro-batch 2 with grad_accum 4) "
     "does not divide over the mesh's data x fsdp = 4 x 1 = 4 devices."),
    # fsdp's devices take rows too.
    ({'batch_size': 4, 'mesh.fsdp': 4}, 8, "batch size 4 (micro-batch 4 "
     "with grad_accum 1) does not divide over the mesh's data x fsdp = "
     "2 x 4 = 8 devices."),
    ({'eval.batch_size': 6}, 4, "eval.batch_size 6 does not divide over the "
     "mesh's data x fsdp = 4 devices."),
])
def test_batches_that_do_not_divide_over_the_mesh_are_refused(
    tmp_path, changes, devices, message):
  with pytest.raises(loop.ConfigError) as e:
    loop.validate(tiny(tmp_path, **changes), devices)
  assert str(e.value) == message


def test_an_unwritable_run_dir_is_refused_before_the_build(tmp_path):
  """Found before the model loads, in one line naming run_dir (it had been
  a bare errno once the build was done)."""
  (tmp_path / 'file').write_text('x')
  run_dir = tmp_path / 'file' / 'run'
  with pytest.raises(loop.ConfigError) as e:
    loop.run(tiny(run_dir), log=quiet)
  assert str(e.value) == (f'run_dir {run_dir} cannot be written '
                          f'({tmp_path / "file"} is not a writable folder).')


@pytest.mark.parametrize('field', ['run_dir', 'data.path', 'data.data_dir',
                                   'data.eval_path', 'model.path',
                                   'model.tokenizer'])
def test_a_url_for_a_path_is_refused_in_one_line(tmp_path, monkeypatch, field):
  """A run_dir gs://bucket/x had trained into a local folder 'gs:' and
  failed at the first checkpoint, after tracebacks from tensorboardX."""
  monkeypatch.chdir(tmp_path)
  cfg = configs.replace(tiny(tmp_path / 'run'), **{field: 'gs://bucket/x'})
  with pytest.raises(loop.ConfigError) as e:
    loop.run(cfg, log=quiet)
  assert str(e.value) == (f'{field} gs://bucket/x is a URL; give a local path '
                          '(for a bucket, a mount of it every host sees: see '
                          "the README's Cloud TPU (pod slice) section).")
  assert os.listdir(tmp_path) == []


def test_a_url_of_any_scheme_is_refused_and_a_local_path_is_not():
  for url in ('S3://bucket/x', 'gcs+grpc://b/x', 'hf://datasets/x'):
    with pytest.raises(loop.ConfigError, match=' is a URL; give a local path'):
      loop.refuse_url('data.path', url)
  for path in ('', 'data/x.json', 'C:/data/x.json'):
    loop.refuse_url('data.path', path)


def test_a_run_dir_through_a_link_to_nothing_is_refused_before_the_build(
    tmp_path):
  """A dangling link as run_dir, or as its checkpoints folder, had passed
  the check (its parent was checked) and failed after the build with
  "[Errno 17] File exists", leaving a .lock behind."""
  (tmp_path / 'dangling').symlink_to(tmp_path / 'nowhere')
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'checkpoints').symlink_to(tmp_path / 'gone')
  for run_dir, link, target in (
      (tmp_path / 'dangling', tmp_path / 'dangling', tmp_path / 'nowhere'),
      (tmp_path / 'run', tmp_path / 'run' / 'checkpoints', tmp_path / 'gone')):
    with pytest.raises(loop.ConfigError) as e:
      loop.run(tiny(run_dir), log=quiet)
    assert str(e.value) == (f'run_dir {link} cannot be written ({link} is a '
                            f'link to {target}, which does not exist).')
  assert sorted(os.listdir(tmp_path)) == ['dangling', 'run']
  assert os.listdir(tmp_path / 'run') == ['checkpoints']


def test_a_model_file_of_another_format_is_named_before_the_tokenizer(
    tmp_path):
  """The tokenizer is read from model.path by default: a JSON file there
  had been reported as 'not a SentencePiece model'."""
  other = tmp_path / 'list.json'
  other.write_text('[1]')
  with pytest.raises(ValueError) as e:
    loop.run(tiny(tmp_path / 'run', **{'model.path': str(other),
                                       'model.tokenizer': ''}), log=quiet)
  assert str(e.value) == (f"{other}: not a Hugging Face directory or a GGUF "
                          "file (starts with b'[1]').")
  assert not (tmp_path / 'run').exists()


def test_a_resume_removes_the_temporary_files_of_a_killed_write(
    stopped, tmp_path):
  """kill -9 during the export had left a whole temporary copy of the
  adapter's weights in adapter/ for good (and one of TensorBoard's event
  files, during their rewrite); what is not such a file stays."""
  run_dir = _copy(stopped, tmp_path / 'run')
  (run_dir / 'adapter').mkdir()
  left = [run_dir / 'adapter' / '.adapter_model.safetensors.4242.0a1b2c3d.tmp',
          run_dir / '.summary.json.17.deadbeef.tmp',
          # Rewrites of the stopped run's TensorBoard events.
          run_dir / 'tensorboard' / '.events.98.0a1b2c3d.tmp',
          run_dir / 'tensorboard' / 'eval' / '.events.99.0a1b2c3d.tmp']
  kept = [run_dir / 'adapter' / 'notes.tmp', run_dir / '.x.1.nothex!.tmp']
  for path in left + kept:
    path.write_bytes(b'partial')
  lines = []
  loop.run(tiny(run_dir, resume=True, export_adapter=True), log=lines.append)
  assert [p for p in left + kept if p.exists()] == kept
  assert ('[train] removed unfinished file writes: '
          '.summary.json.17.deadbeef.tmp, '
          'adapter/.adapter_model.safetensors.4242.0a1b2c3d.tmp, '
          'tensorboard/.events.98.0a1b2c3d.tmp, '
          'tensorboard/eval/.events.99.0a1b2c3d.tmp') in lines
  assert sorted(p.name for p in (run_dir / 'adapter').iterdir()) == [
      'adapter_config.json', 'adapter_model.safetensors', 'notes.tmp']
  # Not through an adapter/ that links elsewhere (another run's folder,
  # whose writer may be at work): the resume leaves it alone.
  other = _copy(stopped, tmp_path / 'linked')
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  (elsewhere / left[0].name).write_bytes(b'partial')
  (other / 'adapter').symlink_to(elsewhere)
  loop.run(tiny(other, resume=True), log=quiet)
  assert (elsewhere / left[0].name).exists()


def test_an_unreadable_tokenizer_names_its_option(tmp_path):
  """A tokenizer's refusal had named only the file, not the option it came
  from (model.tokenizer, or model.path by default), for both families."""
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'not a model')
  empty = tmp_path / 'empty'
  empty.mkdir()
  for preset, spec, error, line in (
      ('tiny', garbage, ValueError, f'{garbage}: not a SentencePiece model '),
      ('tiny', tmp_path / 'none.model', FileNotFoundError,
       f'{tmp_path / "none.model"}: tokenizer not found '),
      ('tiny_t5', empty, FileNotFoundError,
       f'{empty}: no spiece.model in this directory ')):
    cfg = configs.replace(configs.get_config(preset),
                          run_dir=str(tmp_path / 'run'),
                          **{**FAST, 'model.tokenizer': str(spec)})
    with pytest.raises(error) as e:
      loop.run(cfg, log=quiet)
    assert str(e.value).startswith(f'model.tokenizer (the tokenizer): {line}')
  assert not (tmp_path / 'run').exists()


def test_unwritable_folders_in_run_dir_are_refused_before_the_build(
    tmp_path, monkeypatch):
  """A read-only checkpoints folder (a copied run) had been found at the
  first save, after training to it; an adapter folder at the export."""
  import os  # pylint: disable=g-import-not-at-top
  access = os.access
  for name in ('checkpoints', 'adapter'):
    folder = tmp_path / name / 'run' / name
    folder.mkdir(parents=True)
    monkeypatch.setattr(os, 'access', lambda p, mode, name=name: (
        not str(p).endswith(name) and access(p, mode)))
    with pytest.raises(loop.ConfigError) as e:
      loop.run(tiny(folder.parent, export_adapter=True), log=quiet)
    assert str(e.value) == (f'run_dir {folder} cannot be written ({folder} '
                            'is not a writable folder).')
    assert os.listdir(folder.parent) == [name]


def test_a_missing_model_path_is_named_before_the_tokenizer(tmp_path):
  cfg = configs.replace(configs.get_config('paper_gemma2b_arc_challenge'),
                        run_dir=str(tmp_path / 'run'),
                        **{'data.path': str(_boolq_folder(
                            tmp_path / 'arc', ['q'], ['t'])),
                           'data.task': 'boolq', 'data.eval_task': '',
                           'eval.every': 0})
  with pytest.raises(loop.ConfigError) as e:
    loop.run(cfg, log=quiet)
  assert str(e.value) == (
      'model.path google/gemma-2b: no such file or directory (a local '
      'Hugging Face folder or a .gguf; the Hub is not read: download it '
      'first, e.g. hf download google/gemma-2b --local-dir DIR, and pass '
      '--model.path DIR).')
  assert not (tmp_path / 'run').exists()


def test_mesh_rules_override_the_defaults_by_name(tmp_path):
  """A rule replaces its own axis's default (embed=fsdp had dropped the
  other seven), and a name no parameter has is refused (a typo had placed
  nothing, silently)."""
  cfg = tiny(tmp_path / 'run', **{'mesh.rules': ('embed=', 'mlp=fsdp')})
  rules = sharding_lib.mesh_rules(cfg)
  assert (rules['embed'], rules['mlp'], rules['heads'], rules['vocab']) == (
      None, 'fsdp', 'tensor', 'tensor')
  assert sharding_lib.mesh_rules(tiny(tmp_path / 'run')) == dict(
      r.split('=') if r.split('=')[1] else (r.split('=')[0], None)
      for r in configs.DEFAULT_RULES)
  with pytest.raises(loop.ConfigError) as e:
    loop.build(tiny(tmp_path / 'run', **{'mesh.rules': ('embd=fsdp',)}))
  assert str(e.value).startswith("mesh.rules: no parameter has the logical "
                                 "axis 'embd'; this model's are embed, ")
  # A default name of the other family (T5's relpos_buckets on Gemma) is
  # checked too, and a name given twice with other axes is refused (the
  # last had won).
  with pytest.raises(loop.ConfigError) as e:
    loop.build(tiny(tmp_path / 'run', **{
        'mesh.rules': ('relpos_buckets=fsdp',)}))
  assert "no parameter has the logical axis 'relpos_buckets'" in str(e.value)
  with pytest.raises(ValueError) as e:
    loop.validate(tiny(tmp_path / 'run', **{
        'mesh.rules': ('embed=fsdp', 'embed=tensor')}), 1)
  assert str(e.value) == ("mesh rule 'embed=tensor': 'embed' is already "
                          "given as 'fsdp'; give each name once.")
  assert not (tmp_path / 'run').exists()


def test_a_run_dir_in_use_is_refused(tmp_path):
  """Two runs in one folder had both trained and reported success, each
  replacing the other's metrics and checkpoints."""
  import fcntl  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  with open(run_dir / loop.LOCK_FILE, 'w') as held:
    fcntl.flock(held, fcntl.LOCK_EX)  # as a running run holds it
    with pytest.raises(loop.ConfigError) as e:
      loop.run(tiny(run_dir), log=quiet)
  assert str(e.value) == (f'run_dir {run_dir} is in use by another run (it '
                          f'holds {run_dir / loop.LOCK_FILE}); wait for it '
                          'or choose another --run_dir.')
  assert sorted(os.listdir(run_dir)) == [loop.LOCK_FILE]
  # Released (the holder ended): the run goes ahead.
  assert loop.run(tiny(run_dir), log=quiet, stop_at=1)['steps'] == 1


def test_a_run_dir_that_cannot_be_locked_is_said_in_one_line(monkeypatch,
                                                            tmp_path):
  """A file system without locks (Lustre without its flock option, NFS
  without lockd): the run went on unguarded without a word, and a second
  run's start-up cleanup removed this one's checkpoint as it was written."""
  import errno  # pylint: disable=g-import-not-at-top
  import fcntl  # pylint: disable=g-import-not-at-top

  def no_locks(f, op):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(fcntl, 'flock', no_locks)
  lines = []
  with loop._run_dir_lock(str(tmp_path), lines.append):  # pylint: disable=protected-access
    pass
  assert lines == [f'[train] warning: run_dir {tmp_path} cannot be locked '
                   'here (No locks available): a second run started in it '
                   'is not refused; start one run at a time.']


def test_a_run_dir_used_while_this_run_builds_is_refused(monkeypatch,
                                                        tmp_path):
  """The lock is taken after the build; another run that trained in the
  folder meanwhile (here: within the build) had left this one training with
  every save declined by orbax, reporting the other's checkpoints as its
  own and replacing its config and adapter."""
  run_dir = tmp_path / 'run'
  real_build = loop.build

  def build_while_another_runs(cfg):
    monkeypatch.setattr(loop, 'build', real_build)  # the other run's own
    loop.run(tiny(run_dir, **{'optim.learning_rate': 3e-3}), log=quiet,
             stop_at=4)
    return real_build(cfg)

  monkeypatch.setattr(loop, 'build', build_while_another_runs)
  with pytest.raises(loop.ConfigError) as e:
    loop.run(tiny(run_dir), log=quiet)
  assert str(e.value) == (f'run_dir {run_dir} changed while this run was '
                          'being built (another run wrote to it); run again.')
  # The other run's files are as it left them.
  saved = json.loads((run_dir / 'config.json').read_text())
  assert saved['optim']['learning_rate'] == 3e-3
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['4']


def test_a_declined_checkpoint_stops_the_run(monkeypatch, tmp_path):
  """orbax declines a step at or below its latest without a word; the run
  had gone on as if saved."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(checkpoint.Checkpointer, 'save',
                      lambda self, step, *a, **k: False)
  with pytest.raises(OSError, match=r'checkpoint 4 was not written: .* '
                     r'\(another run writing to this run_dir\?\)'):
    loop.run(tiny(tmp_path / 'run'), log=quiet)


def test_every_process_refuses_a_run_dir_in_use(monkeypatch, tmp_path):
  """Process 0 alone takes the lock; the others learn its outcome and
  refuse too (they had gone on into the checkpointer's collective start
  and hung the slice while process 0 waited to exit)."""
  from train import distributed  # pylint: disable=g-import-not-at-top
  told = []
  monkeypatch.setattr(loop.jax, 'process_index', lambda: 1)
  monkeypatch.setattr(distributed, 'from_process_0',
                      lambda value: told.append(value) or 1)  # busy
  with pytest.raises(loop.ConfigError, match='is in use by another run'):
    with loop._run_dir_lock(str(tmp_path), quiet):  # pylint: disable=protected-access
      pass
  assert told == [0] and not os.listdir(tmp_path)


def test_every_process_refuses_a_run_dir_process_0_cannot_write(
    monkeypatch, tmp_path):
  """Process 0 failing to write the lock or the shared-folder check (a full
  disk) is said on every process: the others had waited in the
  collective that follows."""
  from train import distributed  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(loop.jax, 'process_index', lambda: 0)
  monkeypatch.setattr(loop.jax, 'process_count', lambda: 2)
  sent = []
  monkeypatch.setattr(distributed, 'from_process_0',
                      lambda value: sent.append(value) or value)
  missing = tmp_path / 'gone'
  with pytest.raises(loop.ConfigError, match=rf'^run_dir {missing}: process 0 '
                     'cannot write .*No such file or directory'):
    with loop._run_dir_lock(str(missing), quiet):  # pylint: disable=protected-access
      pass
  with pytest.raises(loop.ConfigError, match=rf'^run_dir {missing}: process 0 '
                     'cannot write there .*No such file or directory'):
    loop._check_run_dir_shared(str(missing))  # pylint: disable=protected-access
  assert sent == [2, -1]


def test_resume_without_a_checkpoint_says_so(tmp_path):
  lines = []
  loop.run(tiny(tmp_path / 'run', resume=True), log=lines.append, stop_at=1)
  assert (f'[train] --resume: no checkpoint in {tmp_path / "run"}/'
          'checkpoints; starting at step 0') in lines


def test_negative_stop_at_is_refused_by_run(tmp_path):
  with pytest.raises(loop.ConfigError, match='stop_at must be >= 0'):
    loop.run(tiny(tmp_path / 'run'), log=quiet, stop_at=-1)
  assert not (tmp_path / 'run').exists()


def _sentencepiece(path, corpus, vocab_size=120):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  text = path.with_suffix('.txt')
  text.write_text('\n'.join(corpus))
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(path.with_suffix('')),
      vocab_size=vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      minloglevel=2)
  return path


def test_resume_refuses_another_tokenizer_but_not_a_moved_one(tmp_path):
  """The checkpoint records what the tokenizer does (its size, special ids
  and the ids of a probe text), not where its file is: another tokenizer is
  refused in one line naming model.tokenizer (it had resumed silently), the
  same file under another path resumes."""
  from train import data  # pylint: disable=g-import-not-at-top
  from models.gemma.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  prompts = [e.prompt + e.target
             for e in data.load_task('arithmetic', 'train')]
  first = _sentencepiece(tmp_path / 'first.model', prompts)
  # Same size, other pieces: told apart by the probe text's ids.
  other = _sentencepiece(tmp_path / 'other.model',
                         [p.upper() for p in prompts])
  a, b = (loop.tokenizer_fingerprint(load_tokenizer(str(p)))
          for p in (first, other))
  assert a['vocab_size'] == b['vocab_size'] and a != b
  assert 'a probe text encodes to other ids' in (
      loop._tokenizer_difference(a, b))  # pylint: disable=protected-access

  run_dir = tmp_path / 'run'
  loop.run(tiny(run_dir, **{'model.tokenizer': str(first)}), log=quiet,
           stop_at=4)
  with pytest.raises(loop.ConfigError, match=r"checkpoint 4 in .* was trained "
                     r"with another tokenizer than model\.tokenizer 'byte' "
                     r'\(120 ids there, 259 now\)'):
    loop.run(tiny(run_dir, resume=True), log=quiet)
  with pytest.raises(loop.ConfigError, match='probe text'):
    loop.run(tiny(run_dir, resume=True, **{'model.tokenizer': str(other)}),
             log=quiet)
  moved = tmp_path / 'elsewhere' / 'tokenizer.model'
  moved.parent.mkdir()
  shutil.move(first, moved)
  # stop_at 4: every check of the resume, no step to compile again.
  out = loop.run(tiny(run_dir, resume=True, **{'model.tokenizer': str(moved)}),
                 log=quiet, stop_at=4)
  assert out['steps'] == 4


def test_a_hub_task_without_a_test_split_trains_with_evaluation_off(
    tmp_path, monkeypatch):
  # The Hub's errors are ValueErrors: with evaluation off, a test split that
  # cannot be had is no reason to stop (the task's own test split cannot
  # be in its training split anyway: no warning either).
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  def load_dataset(hub_id, config, split):
    if split != 'train':
      raise KeyError(f'Unknown split "{split}"')
    return [{'question': f'is {i} even', 'answer': i % 2 == 0}
            for i in range(40)]

  monkeypatch.setitem(sys.modules, 'datasets',
                      types.SimpleNamespace(load_dataset=load_dataset))
  cfg = tiny(tmp_path / 'run', **{'data.task': 'boolq',
                                  'data.hub': 'me/boolq-trainonly',
                                  'data.validation_fraction': 0.0})
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    train, evals = loop.load_examples(cfg)
  assert len(train) == 40 and evals == []
  with pytest.raises(ValueError, match='Unknown split'):
    loop.load_examples(configs.replace(cfg, **{'eval.after': True}))


def test_hub_training_reads_a_local_eval_path_and_refuses_a_path_too(
    tmp_path, monkeypatch):
  """--data.hub with --data.eval_path: the local file is the evaluation
  set (the Hub's split had been read instead, the file ignored); --data.hub
  with --data.path is one error line, not the path silently ignored."""
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  def load_dataset(hub_id, config, split):
    return [{'question': f'is {i} even on the hub', 'answer': i % 2 == 0}
            for i in range(40)]

  monkeypatch.setitem(sys.modules, 'datasets',
                      types.SimpleNamespace(load_dataset=load_dataset))
  local = tmp_path / 'boolq_test.json'
  local.write_text(json.dumps([
      {'instruction': f'Please answer the following question with true or '
                      f'false, question: is {i} odd locally?\n\nAnswer '
                      'format: true/false', 'input': '',
       'output': 'the correct answer is true', 'answer': 'true'}
      for i in range(3)]))
  cfg = tiny(tmp_path / 'run', **{'data.task': 'boolq', 'data.hub': 'true',
                                  'data.eval_path': str(local),
                                  'eval.after': True})
  train, evals = loop.load_examples(cfg)
  assert len(train) == 36 and 'on the hub' in train[0].prompt
  assert len(evals) == 3 and all('locally' in e.prompt for e in evals)
  with pytest.raises(loop.ConfigError) as e:
    loop.load_examples(configs.replace(cfg, **{'data.path': str(local)}))
  assert str(e.value) == (f'data.path {local} and data.hub true both name the '
                          'training data: give one.')


def test_a_checkpoint_from_before_the_hold_out_rule_says_why(stopped,
                                                              tmp_path):
  # Such a checkpoint (no tokenizer record, evaluation off) trained on the
  # evaluation prompts this version leaves out: its examples differ, and the
  # refusal says that this is why.
  run_dir = _copy(stopped, tmp_path / 'run')
  item = run_dir / 'checkpoints' / '4' / 'config' / 'metadata'
  saved = json.loads(item.read_text())
  del saved[loop.TOKENIZER_KEY]
  saved[loop.TRAIN_DATA_KEY]['examples'] += 5
  item.write_text(json.dumps(saved))
  with pytest.raises(loop.ConfigError, match='predates leaving evaluation '
                     'prompts out of training with evaluation off'):
    loop.run(tiny(run_dir, resume=True), log=quiet)


def test_packing_with_a_per_row_target_cap_is_refused(tmp_path):
  # max_target_tokens caps a row's loss positions: a packed row's later
  # examples would lose their targets. 0 (every target scored) is allowed.
  with pytest.raises(loop.ConfigError, match='with --data.pack use '
                     '--data.max_target_tokens 0'):
    loop.validate(tiny(tmp_path / 'run', **{'data.pack': True}), 1)
  loop.validate(tiny(tmp_path / 'run', **{'data.pack': True,
                                          'data.max_target_tokens': 0}), 1)


def test_target_loss_scores_the_whole_target_the_row_holds(tmp_path,
                                                           monkeypatch):
  # Unlike training (targets cut to max_target_tokens), the evaluation
  # loss scores the target as far as the row holds it, the prompt cut from
  # its start: how every published loss was measured (docs/results).
  from train.data.example import Example  # pylint: disable=g-import-not-at-top
  cfg = tiny(tmp_path / 'run', **{'data.seq_len': 48,
                                  'data.max_target_tokens': 8})
  r = loop.build(cfg)
  prompt = 'What is 12 plus 30? Answer with the number.'
  seen = []
  evaluator = loop.Evaluator(r)
  monkeypatch.setattr(evaluator, '_score_pairs',
                      lambda state, pairs: seen.extend(pairs) or
                      [-2.0] * len(pairs))
  for target, scored, prompt_ids in (('x' * 10, 11, 1 + len(prompt)),
                                     ('x' * 100, 47, 1)):
    seen.clear()
    loss, = evaluator.target_losses(
        r.state, [Example(prompt=prompt, target=target, task='arithmetic')])
    (p, t), = seen
    assert (len(p), len(t)) == (min(prompt_ids, 48 - scored), scored)
    assert loss == pytest.approx(2.0 / scored)


def test_base_model_fingerprint_is_what_the_files_hold(tmp_path):
  """The same files anywhere give one fingerprint (a GGUF under any name);
  a fine-tune of the same shapes, or a random base, gives another."""
  from train import fingerprints  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  hf = tmp_path / 'hf'
  hf.mkdir()
  weights = rng.standard_normal(200_000).astype(np.float32).tobytes()
  (hf / 'model.safetensors').write_bytes(weights)
  (hf / 'config.json').write_text('{"hidden_size": 64}')
  (hf / 'README.md').write_text('not a weight')
  first = fingerprints.base_model_fingerprint(str(hf))
  assert set(first) == {'model.safetensors'}
  moved = shutil.copytree(hf, tmp_path / 'elsewhere' / 'hf')
  # What the loader does not read: a README, config.json's version stamp,
  # another GGUF, a run folder with its exported adapter inside.
  (moved / 'README.md').write_text('changed, and not a weight')
  (moved / 'config.json').write_text(
      '{"hidden_size": 64, "transformers_version": "5.0"}')
  (moved / 'other.gguf').write_bytes(b'GGUF')
  (moved / 'run' / 'adapter').mkdir(parents=True)
  (moved / 'run' / 'adapter' / 'adapter_model.safetensors').write_bytes(
      b'adapter')
  assert fingerprints.base_model_fingerprint(str(moved)) == first
  # A fine-tune of the same shapes: every weight moved a little.
  tuned = np.frombuffer(weights, np.float32) * np.float32(1.001)
  (moved / 'model.safetensors').write_bytes(tuned.tobytes())
  now = fingerprints.base_model_fingerprint(str(moved))
  assert now != first
  assert fingerprints.base_model_difference(first, now) == (
      'model.safetensors differ')
  gguf = tmp_path / 'a.gguf'
  gguf.write_bytes(weights)
  renamed = tmp_path / 'b.gguf'
  renamed.write_bytes(weights)
  assert (fingerprints.base_model_fingerprint(str(gguf)) ==
          fingerprints.base_model_fingerprint(str(renamed)))
  random = fingerprints.base_model_fingerprint('')
  assert random == fingerprints.RANDOM_BASE
  for saved in (None, random):  # None: a checkpoint from before 2026-12-06
    assert fingerprints.base_model_difference(saved, first) == (
        'a random base there, model files now')
  assert fingerprints.base_model_difference(first, random) == (
      'model files there, a random base now')


def _saving_no_base_record(monkeypatch):
  """Checkpoints saved as before 2026-12-05: no base model record."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  save = checkpoint.Checkpointer.save

  def without_base(self, step, state, data_iterator, config_json, **kw):
    saved = json.loads(config_json)
    del saved[loop.BASE_MODEL_KEY]
    return save(self, step, state, data_iterator, json.dumps(saved), **kw)

  monkeypatch.setattr(checkpoint.Checkpointer, 'save', without_base)


def test_resume_refuses_a_random_base_drawn_another_way(tmp_path,
                                                        monkeypatch):
  """A random base is the seed drawn one way: a checkpoint from before
  2026-12-06 (its base from the LoRA init's own stream, fingerprint None)
  had resumed on the base drawn the new way, its loss jumping (4.46 ->
  6.28); one drawn the same way resumes."""
  from train import fingerprints  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / 'old'
  with monkeypatch.context() as m:  # as a version before the change wrote
    m.setattr(fingerprints, 'base_model_fingerprint', lambda path: None)
    loop.run(tiny(run_dir, steps=4), log=quiet, stop_at=2)
  # Older still (before 2026-12-05): no base record at all. It had resumed
  # silently on the base drawn the new way.
  with monkeypatch.context() as m:
    _saving_no_base_record(m)
    loop.run(tiny(tmp_path / 'older', steps=4), log=quiet, stop_at=2)
  for old in (run_dir, tmp_path / 'older'):
    with pytest.raises(loop.ConfigError) as e:
      loop.run(tiny(old, steps=4, resume=True), log=quiet)
    assert str(e.value) == (
        f"--resume: checkpoint 2 in {old}/checkpoints was trained on "
        "another base model than model.path '' (a random base whose draw "
        "was not recorded there: until 2026-12-06 it came from the LoRA "
        "init's own random stream); this version cannot tell that base "
        'from its own: start the run again without --resume.')
  loop.run(tiny(tmp_path / 'new', steps=4), log=quiet, stop_at=2)
  lines = []
  loop.run(tiny(tmp_path / 'new', steps=4, resume=True), log=lines.append)
  assert any('resumed from step 2' in l for l in lines), lines


def test_resume_refuses_another_base_model_but_not_a_moved_one(
    tmp_path, monkeypatch):
  """Two Hugging Face folders of one architecture (a base and its
  fine-tune, say): a resume on the other had gone on silently, its loss
  jumping; the same files under another path resume."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  vocab = loop.load_tokenizer(configs.get_config('tiny').model, '').vocab_size
  config = gemma.get_config('gemma3-tiny').replace(vocab_size=vocab)
  for name, seed in (('hf_a', 0), ('hf_b', 1)):
    gemma.save_pretrained(gemma.Gemma(config, rngs=nnx.Rngs(seed)),
                          str(tmp_path / name))
  run_dir = tmp_path / 'run'
  path = lambda name: {'model.path': str(tmp_path / name)}
  loop.run(tiny(run_dir, **path('hf_a')), log=quiet, stop_at=4)
  with pytest.raises(loop.ConfigError, match=(
      r"checkpoint 4 in .* was trained on another base model than model\.path "
      r"'.*hf_b' \(model\.safetensors differ\); resume on the weights it was "
      r'trained on\.')):
    loop.run(tiny(run_dir, resume=True, **path('hf_b')), log=quiet)
  shutil.move(tmp_path / 'hf_a', tmp_path / 'moved')
  out = loop.run(tiny(run_dir, resume=True, **path('moved')), log=quiet,
                 stop_at=4)
  assert out['steps'] == 4
  # A checkpoint without a base record cannot be checked: said in a line.
  with monkeypatch.context() as m:
    _saving_no_base_record(m)
    loop.run(tiny(tmp_path / 'old', **path('moved')), log=quiet, stop_at=4)
  lines = []
  loop.run(tiny(tmp_path / 'old', resume=True, **path('hf_b')),
           log=lines.append, stop_at=6)
  assert (f'[train] warning: checkpoint 4 in {tmp_path}/old/checkpoints '
          'records no base model (saved before 2026-12-05): not checked '
          'that model.path holds the weights it was trained on.') in lines


def test_tokens_per_s_is_training_throughput(tmp_path, monkeypatch):
  """A periodic evaluation (here one that takes 3 s) had been counted in the
  next row's tokens/s window, making it a fraction of the others' (under
  0.15 of them for steps up to half a second)."""
  import time  # pylint: disable=g-import-not-at-top
  real_call = loop.Evaluator.__call__

  def slow(self, state):
    time.sleep(3.0)
    return real_call(self, state)

  monkeypatch.setattr(loop.Evaluator, '__call__', slow)
  out = loop.run(tiny(tmp_path / 'run', log_every=2, checkpoint_every=0,
                      **{'eval.every': 4, 'eval.before': False,
                         'eval.after': False, 'eval.num_examples': 4}),
                 log=quiet)
  rate = {row['step']: row['tokens_per_s'] for row in out['history']}
  assert sorted(rate) == [2, 4, 6, 8]
  # Row 6's window followed the evaluation at step 4: the same steps' pace
  # (a wide margin: two-step windows on a loaded machine vary).
  assert rate[6] > 0.2 * rate[8], rate


def test_tokens_per_s_counts_device_time_before_a_checkpoint(tmp_path,
                                                             monkeypatch):
  """Steps are dispatched ahead of the device; a checkpoint (or an
  evaluation) waits for them, and that wait, training time, had been
  counted as the pause and left out: tokens/s x2.8 with checkpoints between
  log rows. Here each step carries ~0.1 s of device work after it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  @jax.jit
  def device_work(state):
    m = jnp.full((384, 384), 1 / 384, jnp.float32)
    c = jax.lax.fori_loop(0, 80, lambda i, c: jnp.tanh(c @ m), m)
    return jax.tree.map(lambda a: a + (0 * c[0, 0]).astype(a.dtype), state)

  real_jitted_step = loop._jitted_step  # pylint: disable=protected-access

  def slow_step(r):
    step = real_jitted_step(r)
    def run(state, *args):
      state, metrics = step(state, *args)
      return device_work(state), metrics
    return run

  monkeypatch.setattr(loop, '_jitted_step', slow_step)
  # Row 8's window (steps 5-8) is the same work with or without a save
  # after every step. Two runs' one-second windows are compared: load
  # that slows only the first (the other xdist worker) had pushed the
  # ratio past 1.6 in about 1 pair in 50, so a pair is tried up to three
  # times; the bug (x2.8) fails each.
  tries = []
  for attempt in range(3):
    rates = {}
    for every in (0, 1):
      out = loop.run(tiny(tmp_path / f'run{attempt}-{every}', steps=8,
                          log_every=4, checkpoint_every=every), log=quiet)
      rates[every] = {row['step']: row['tokens_per_s']
                      for row in out['history']}
    tries.append(rates)
    if rates[1][8] < 1.6 * rates[0][8]:
      break
  else:
    raise AssertionError(f'tokens/s with a save after every step over '
                         f'without, three times: {tries}')


def test_a_row_of_the_compiling_step_alone_has_no_tokens_per_s(tmp_path):
  """At --log_every 1 the first row's window is the compile (145 tok/s
  against 15,000 after); the README says the compile is left out."""
  out = loop.run(tiny(tmp_path / 'run', steps=2, log_every=1), log=quiet)
  first, second = (row['tokens_per_s'] for row in out['history'])
  assert math.isnan(first) and second > 0
  with open(tmp_path / 'run' / 'metrics.csv') as f:
    assert [row['tokens_per_s'] for row in csv.DictReader(f)][0] == 'nan'


def _run_script(script: str, *args, xla_flags: str | None = None,
                timeout: int = 900) -> str:
  """Runs ``script`` in a fresh interpreter from the repository root (its
  own XLA_FLAGS: a script sets fake devices itself, before importing jax)
  with ``args``; its stdout, after it exited 0."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = test_xla_flags.script_env(
      XLA_FLAGS=f'{test_xla_flags.FLAGS} {xla_flags or ""}'.strip())
  proc = subprocess.run([sys.executable, '-c', script, *map(str, args)],
                        cwd=test_xla_flags.ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


_FSDP_ROWS_SCRIPT = r'''
import os, sys
os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'
from train import configs
from tests.step_memory import step_temp_bytes
for name in ('tiny', 'tiny_t5'):
  temp = {}
  for mesh in ('data', 'fsdp'):
    temp[mesh] = step_temp_bytes(configs.replace(
        configs.get_config(name), batch_size=32, **{
            'run_dir': sys.argv[1], 'mesh.data': 8 if mesh == 'data' else 1,
            'mesh.fsdp': 8 if mesh == 'fsdp' else 1}))
  print(name, temp['data'], temp['fsdp'], flush=True)
'''


def test_fsdp_keeps_each_devices_activations_to_its_rows(tmp_path):
  """FSDP splits the kernels along their contracted axis over the axis the
  batch is split over too; JAX's partitioner had then dropped the batch
  split after the embedding, and every device computed the whole global
  batch (Gemma-2B preset: 104 GiB per device on 16). A step's scratch
  memory on fsdp = 8 is now about data = 8's (it had been 1.8-1.9x)."""
  out = _run_script(_FSDP_ROWS_SCRIPT, tmp_path / 'run')
  rows = [line.split() for line in out.splitlines()]
  assert [r[0] for r in rows] == ['tiny', 'tiny_t5'], out
  for name, data_temp, fsdp_temp in rows:
    assert int(fsdp_temp) < 1.25 * int(data_temp), (name, data_temp,
                                                    fsdp_temp)


_REMAT_SCRIPT = r'''
import os, sys
os.environ['JAX_PLATFORMS'] = 'cpu'
from train import configs
from tests.step_memory import step_temp_bytes
for name in ('tiny', 'tiny_t5'):
  temp = {}
  for remat in (False, True):
    temp[remat] = step_temp_bytes(configs.replace(
        configs.get_config(name), **{
            'run_dir': f'{sys.argv[1]}/{name}{remat}', 'model.remat': remat}))
  print(name, temp[False], temp[True], flush=True)
'''


def test_remat_saves_activation_memory_where_xla_keeps_its_barriers(
    tmp_path):
  """--model.remat puts jax.checkpoint where it frees each block's
  activations: compiled with the optimization barriers that jax.checkpoint
  lowers to kept (XLA:CPU removes them before scheduling by default, and
  then shows no saving; XLA's GPU pipeline keeps them), the step's scratch
  memory falls (tiny Gemma 3: 80 MB to 15 MB; tiny T5: 18 to 11)."""
  out = _run_script(_REMAT_SCRIPT, tmp_path / 'run',
                    xla_flags='--xla_disable_hlo_passes=cse_barrier_expander')
  rows = {r[0]: (int(r[1]), int(r[2]))
          for r in (line.split() for line in out.splitlines())}
  assert set(rows) == {'tiny', 'tiny_t5'}, out
  assert rows['tiny'][1] < 0.25 * rows['tiny'][0], rows
  assert rows['tiny_t5'][1] < 0.8 * rows['tiny_t5'][0], rows


_PLACED_SCRIPT = r'''
import os, sys
os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from train import configs, distributed, loop, sharding as sharding_lib
from models import gemma, t5
out = sys.argv[1]
cfg = configs.replace(configs.get_config('tiny'),
                      **{'mesh.data': 1, 'mesh.fsdp': 4})
mesh, rules = distributed.make_mesh(cfg.mesh), sharding_lib.mesh_rules(cfg)
place = sharding_lib.mesh_placer(rules, mesh)
gemma.save_pretrained(gemma.Gemma(gemma.get_config('gemma-tiny'),
                                  rngs=nnx.Rngs(0)), out + '/gemma')
t5.save_pretrained(t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0)),
                   out + '/t5')
for name, load in (
    ('gemma', lambda p: loop.load_model(cfg.model, out + '/gemma', 0,
                                        place=p)),
    ('t5', lambda p: loop.load_t5_model(
        configs.get_config('tiny_t5').model, out + '/t5', 0, place=p))):
  placed, plain = nnx.state(load(place), nnx.Param), nnx.state(load(None),
                                                               nnx.Param)
  want = sharding_lib.state_shardings(placed, rules, mesh)
  split = 0
  for (path, var), (_, ref) in zip(nnx.to_flat_state(placed),
                                   nnx.to_flat_state(plain)):
    value = var.get_value()
    sharding = want
    for k in path:
      sharding = sharding[k]
    assert value.sharding == sharding, (name, path, value.sharding)
    np.testing.assert_array_equal(np.asarray(value), np.asarray(
        ref.get_value()))
    split += len({str(s.index) for s in value.addressable_shards}) > 1
  assert split > 0, name
  print(name, 'placed', split)
# A random base (no model.path) too: the run's model holds the placed
# arrays, not a whole copy on the first device beside them.
r = loop.build(configs.replace(cfg, run_dir=out + '/run'))
held = nnx.to_pure_dict(nnx.state(r.model, nnx.Param))
for path, placed in jax.tree_util.tree_leaves_with_path(r.base):
  kept = held
  for k in path:
    kept = kept[k.key]
  assert kept is placed, (path, kept.sharding, placed.sharding)
print('random base placed')
'''


def test_loaded_weights_go_straight_to_their_mesh_sharding(tmp_path):
  """The loop loads each base weight straight to its sharding (fsdp = 4
  here): it had loaded the whole model onto the first device and sharded
  it only afterwards, which a model larger than one device's memory (an
  mT5-XXL in bfloat16, 26 GB) cannot survive. Values equal the plain
  load's."""
  out = _run_script(_PLACED_SCRIPT, tmp_path, timeout=600)
  assert 'gemma placed' in out and 't5 placed' in out
  assert 'random base placed' in out


_SHAMPOO_BLOCKS_SCRIPT = r'''
import os, sys
os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import lora_rite_optax as lro
from train import configs, loop, step as step_lib
cfg = configs.replace(configs.get_config('tiny'), **{
    'mesh.data': 1, 'mesh.fsdp': 4, 'optim.name': 'shampoo',
    'optim.extra': '{"block_size": 16}', 'optim.skip_nonfinite': False,
    'run_dir': sys.argv[1]})
r = loop.build(cfg)
is_shampoo = lambda x: isinstance(x, lro.ShampooState)
find = lambda tree: next(x for x in jax.tree.leaves(tree, is_leaf=is_shampoo)
                         if is_shampoo(x))
params = jax.tree.leaves(r.state['params'])

def sharded_blocks(state):
  """Indices of the leaves whose blocks are split over the 4 devices, after
  checking that exactly those are the factors split along a long axis."""
  split = []
  for i, (p, st) in enumerate(zip(params, find(state).stats)):
    if st is None:
      continue
    if p.sharding.is_fully_replicated:
      assert st.left.sharding.is_fully_replicated, i
      continue
    assert st.left.sharding.spec == P('fsdp'), (i, st.left.sharding)
    assert st.right.sharding.spec == P('fsdp'), (i, st.right.sharding)
    blocks = st.left.sharding.shard_shape(st.left.shape)[0]
    assert blocks == st.left.shape[0] // 4, (i, blocks)
    split.append(i)
  return split

split = sharded_blocks(r.state['opt_state'])
assert split, 'no factor is split over fsdp'
raw = next(iter(loop.train_dataset(r)))
batch, _ = step_lib.prepare_batch(raw, r.max_targets)
batch = {k: v[None] for k, v in batch.items()}
copy = lambda t: jax.tree.map(lambda x: x.copy(), t)
# The same step with every statistic replicated, as before: same numbers.
replicated = NamedSharding(r.mesh, P())
whole = dict(r.state_shardings)
shampoo_sh = find(whole['opt_state'])
whole_shampoo = shampoo_sh._replace(**{
    f: tuple(None if s is None else lro.BlockStats(replicated, replicated)
             for s in getattr(shampoo_sh, f)) for f in ('stats', 'roots')})
whole['opt_state'] = jax.tree.map(
    lambda x: whole_shampoo if is_shampoo(x) else x, whole['opt_state'],
    is_leaf=is_shampoo)
state0 = copy(r.state)
ref_step = loop.jit_train_step(r, r.tx, r.schedule, whole)
ref, _ = ref_step(jax.device_put(copy(state0), whole), r.base, r.rngs, batch)
new, _ = loop._jitted_step(r)(state0, r.base, r.rngs, batch)
assert sharded_blocks(new['opt_state']) == split  # kept through the step
for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                             atol=1e-6)
print('blocks split', len(split))
'''


def test_shampoo_block_statistics_shard_with_their_factor(tmp_path):
  """Shampoo keeps a b x b statistic and root per block of b rows (2 b / r
  times a factor's size): on an fsdp = 4 mesh the blocks of a factor split
  along its long axis are split the same way, where every device had held
  all of them, and the step computes what it did with them replicated."""
  out = _run_script(_SHAMPOO_BLOCKS_SCRIPT, tmp_path / 'run', timeout=600)
  assert 'blocks split' in out


_GENERATE_SCRIPT = r'''
import json, os, sys
os.environ['XLA_FLAGS'] += (' --xla_force_host_platform_device_count=' +
                            sys.argv[3])
os.environ['JAX_PLATFORMS'] = 'cpu'
from train import configs, loop
from models.gemma import sampler
mesh = json.loads(sys.argv[1])
cfg = configs.replace(configs.get_config('tiny'), **{
    'data.seq_len': 64, 'run_dir': sys.argv[2], 'eval.batch_size': 8,
    **{'mesh.' + k: v for k, v in mesh.items()}})
r = loop.build(cfg)
seen = []
real = sampler.Sampler.__call__
def spy(self, prompts, *args, batch_sharding=None, **kwargs):
  seen.append((len(prompts), batch_sharding and batch_sharding.spec))
  return real(self, prompts, *args, batch_sharding=batch_sharding, **kwargs)
sampler.Sampler.__call__ = spy
prompts = [[2] + list(range(10, 13 + i % 5)) for i in range(11)]
texts = loop._gemma_generate(loop.Evaluator(r), r.state, prompts)
print('SEEN', json.dumps([[n, str(s)] for n, s in seen]))
print('TEXTS', json.dumps(texts))
'''


def test_gemma_generation_is_split_over_the_mesh_batch_axes(tmp_path):
  """Evaluation by generation splits its rows over data x fsdp, as
  training does (every device had generated the whole batch), each chunk
  padded to eval.batch_size rows; the texts equal one device's."""
  runs = {}
  for name, mesh, devices in (
      ('one', {'data': 1}, 1),
      ('mesh', {'data': 2, 'fsdp': 2, 'tensor': 2}, 8)):
    out = _run_script(_GENERATE_SCRIPT, json.dumps(mesh), tmp_path / name,
                      devices, timeout=600)
    lines = dict(l.split(' ', 1) for l in out.splitlines()
                 if l.startswith(('SEEN ', 'TEXTS ')))
    runs[name] = {k: json.loads(v) for k, v in lines.items()}
  assert runs['mesh']['SEEN'] == [
      [8, "P(('data', 'fsdp'), None)"]] * 2
  assert len(runs['mesh']['TEXTS']) == 11
  assert runs['mesh']['TEXTS'] == runs['one']['TEXTS']


def test_a_training_hub_id_is_not_read_for_another_eval_task(monkeypatch,
                                                             tmp_path):
  """--data.hub OWNER/NAME names the training data; the GSM8K evaluation of
  a math run had been read from the math copy's test split."""
  from train import data  # pylint: disable=g-import-not-at-top
  calls = []
  examples = {split: data.load_task('arithmetic', split, num_examples=40)
              for split in ('train', 'test')}

  def load_task(task, split, hub=False, **kwargs):
    del kwargs
    calls.append((task, split, hub))
    return list(examples[split])

  monkeypatch.setattr(data, 'load_task', load_task)
  loop.load_examples(tiny(tmp_path / 'run', **{
      'data.task': 'math', 'data.eval_task': 'gsm8k',
      'data.hub': 'someone/math-copy', 'eval.split': 'test',
      'eval.before': True}))
  assert calls == [('math', 'train', 'someone/math-copy'),
                   ('gsm8k', 'test', True)]


def test_a_data_seed_grain_refuses_is_refused_before_any_file(tmp_path):
  with pytest.raises(loop.ConfigError, match=r'data.seed must be in \[0, '
                     r'2\*\*32\), got 4294967296'):
    loop.run(tiny(tmp_path / 'run', **{'data.seed': 2**32}), log=quiet)
  assert not (tmp_path / 'run').exists()


def test_resume_compares_tasks_by_name_not_spelling():
  """'Math' for 'math', or eval_task '' for the training task itself, had
  refused a resume as made with other settings."""
  as_json = lambda cfg: json.loads(configs.to_json(cfg))
  a = configs.replace(configs.Config(), **{'data.task': 'math',
                                           'data.eval_task': 'gsm8k'})
  for change in ({'data.task': 'Math', 'data.eval_task': 'GSM8K'},):
    assert loop.resume_changes(as_json(a), as_json(
        configs.replace(a, **change))) == {}
  same = configs.replace(a, **{'data.eval_task': ''})
  assert loop.resume_changes(as_json(same), as_json(configs.replace(
      a, **{'data.eval_task': 'math'}))) == {}
  assert loop.resume_changes(as_json(a), as_json(configs.replace(
      a, **{'data.task': 'boolq'}))) == {'data.task': ('math', 'boolq')}


def test_base_model_fingerprint_reads_to_the_end_and_keeps_its_format(
    tmp_path):
  """A weight file whose last bytes alone changed is another base; a single
  file of any name is fingerprinted; digests keep their saved format (a
  change would refuse every resume of an older checkpoint)."""
  from train import fingerprints  # pylint: disable=g-import-not-at-top
  data = bytearray(np.random.default_rng(0).bytes(100_000))
  path = tmp_path / 'weights'  # no .gguf suffix: 'whatever its name'
  path.write_bytes(data)
  first = fingerprints.base_model_fingerprint(str(path))
  assert set(first) == {'file'}
  data[-1] ^= 1
  path.write_bytes(data)
  assert fingerprints.base_model_fingerprint(str(path)) != first
  # Golden digests (computed with the format as of this commit).
  path.write_bytes(bytes(range(256)) * 40)
  assert fingerprints.base_model_fingerprint(str(path)) == {
      'file': '0ca9356025b19c61'}
  path.write_bytes(b'abc')
  assert fingerprints.base_model_fingerprint(str(path)) == {
      'file': '7b0393befdc28ff2'}
  # A folder whose index the loader refuses: nothing to fingerprint (the
  # loader's own error names the problem).
  hf = tmp_path / 'hf'
  hf.mkdir()
  (hf / 'model.safetensors.index.json').write_text('{"weight_map": 3}')
  assert fingerprints.base_model_fingerprint(str(hf)) == {}


def test_base_model_difference_names_other_files_and_other_random_draws():
  from train import fingerprints  # pylint: disable=g-import-not-at-top
  one = {'model.safetensors': 'a'}
  two = {'model-00001-of-00002.safetensors': 'a',
         'model-00002-of-00002.safetensors': 'b'}
  assert fingerprints.base_model_difference(one, two) == (
      'files model.safetensors there, model-00001-of-00002.safetensors, '
      'model-00002-of-00002.safetensors now')
  assert fingerprints.base_model_difference(
      {'random base': 'another draw'}, fingerprints.RANDOM_BASE) == (
          'a random base drawn another way there')


def test_the_export_folder_is_refused_as_a_link_or_a_file(tmp_path):
  """run_dir/adapter is a folder inside run_dir or not there yet; a link
  (even one that stays inside run_dir) or a file is refused."""
  run_dir = tmp_path / 'run'
  (run_dir / 'inside').mkdir(parents=True)
  out = run_dir / 'adapter'
  assert loop._check_export_dir(str(run_dir)) == str(out)  # pylint: disable=protected-access
  out.mkdir()
  assert loop._check_export_dir(str(run_dir)) == str(out)  # pylint: disable=protected-access
  out.rmdir()
  for make in (lambda: out.symlink_to(run_dir / 'inside'),
               lambda: out.write_text('x')):
    make()
    with pytest.raises(loop.ConfigError) as e:
      loop._check_export_dir(str(run_dir))  # pylint: disable=protected-access
    assert str(e.value) == (f'{out} is a link or not a folder inside '
                            'run_dir; refusing to export the adapter through '
                            'it.')
    out.unlink()


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path):
  """Ids past the embedding table would be gathered out of range."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  vocab = loop.load_tokenizer(configs.get_config('tiny').model, '').vocab_size
  hf = tmp_path / 'hf'
  gemma.save_pretrained(gemma.Gemma(gemma.get_config('gemma3-tiny').replace(
      vocab_size=vocab - 1), rngs=nnx.Rngs(0)), str(hf))
  with pytest.raises(loop.ConfigError) as e:
    loop.build(tiny(tmp_path / 'run', **{'model.path': str(hf)}))
  assert str(e.value) == (f'the tokenizer has {vocab} ids but the model only '
                          f'{vocab - 1} embeddings.')
  # One as large as the tokenizer's is fine (the check is >, not >=).
  gemma.save_pretrained(gemma.Gemma(gemma.get_config('gemma3-tiny').replace(
      vocab_size=vocab), rngs=nnx.Rngs(0)), str(tmp_path / 'same'))
  loop.build(tiny(tmp_path / 'run', **{'model.path': str(tmp_path / 'same')}))

"""The training loop on the `tiny` config: it learns, checkpoints, resumes
exactly, exports a PEFT adapter, evaluates; and pieces of it in isolation."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

from train import configs
from train import loop
from train import optim as optim_lib
from train import sharding as sharding_lib
from train import step as step_lib
from train import trees as trees_lib

from tests import shared_data
from tests import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The same compiled shapes for every test here: short rows, few steps.
FAST = {'steps': 12, 'log_every': 1, 'checkpoint_every': 6,
        'data.seq_len': 96, 'progress': False}


def tiny(run_dir, **changes):
  return configs.replace(configs.get_config('tiny'), run_dir=str(run_dir),
                         **{**FAST, **changes})


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """One uninterrupted tiny run (shared by the tests that compare to it)."""
  run_dir = tmp_path_factory.mktemp('straight') / 'run'
  return loop.run(tiny(run_dir), log=lambda s: None)


def test_tiny_loss_falls_and_writes_outputs(straight):
  losses = [h['loss'] for h in straight['history']]
  assert len(losses) == FAST['steps']
  assert all(np.isfinite(losses))
  # ln(259) ~ 5.6 at the start; the answer format is learnt within a few steps.
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
  run_dir = straight['run_dir']
  assert straight['checkpoints'] == [6, 12]
  for name in ('config.json', 'metrics.csv', 'summary.json'):
    assert os.path.isfile(os.path.join(run_dir, name)), name
  assert os.listdir(os.path.join(run_dir, 'tensorboard'))
  with open(os.path.join(run_dir, 'metrics.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [int(r['step']) for r in rows] == list(range(1, FAST['steps'] + 1))
  for key in ('loss', 'lr', 'grad_norm', 'update_ratio_a', 'update_ratio_b',
              'tokens_per_s', 'nonfinite_steps'):
    assert key in rows[0], key
  # B starts at zero, so its ratio is only defined from step 2 on.
  assert float(rows[-1]['update_ratio_b']) > 0
  assert float(rows[-1]['nonfinite_steps']) == 0
  adapter = os.path.join(run_dir, 'adapter')
  cfg = json.load(open(os.path.join(adapter, 'adapter_config.json')))
  assert cfg['r'] == 4 and cfg['peft_type'] == 'LORA'
  assert cfg['base_model_name_or_path'] == 'gemma3-tiny'  # model.path ''
  # The trained factors: every B starts at zero, so an adapter of the
  # initial factors would hold only zeros there.
  weights = load_file(os.path.join(adapter, 'adapter_model.safetensors'))
  bs = [v for k, v in weights.items() if '.lora_B.' in k]
  assert bs and all(np.any(b != 0) for b in bs), sorted(weights)
  saved = configs.from_dict(json.load(open(os.path.join(run_dir,
                                                        'config.json'))))
  assert saved == tiny(run_dir)


def test_a_finished_run_leaves_no_model_behind(tmp_path, monkeypatch):
  """The compiled step kept for the next run (same shapes) had closed over
  the whole run: its base model (1.1 GB for demo) stayed alive."""
  import gc  # pylint: disable=g-import-not-at-top
  import weakref  # pylint: disable=g-import-not-at-top
  models = []
  build = loop.build

  def recording_build(config):
    r = build(config)
    models.append(weakref.ref(r.model))
    return r

  monkeypatch.setattr(loop, 'build', recording_build)
  loop.run(tiny(tmp_path / 'run', steps=2, checkpoint_every=0,
                export_adapter=False, **{'eval.before': False,
                                         'eval.after': False}),
           log=lambda s: None)
  gc.collect()
  assert len(models) == 1 and models[0]() is None


def test_a_resume_with_lora_dropout_continues_exactly(tmp_path):
  """The dropout keys continue too (the tiny preset has no dropout, so the
  test below cannot see them)."""
  changes = {'steps': 4, 'checkpoint_every': 2, 'lora.dropout': 0.3}
  straight_run = loop.run(tiny(tmp_path / 'straight', **changes),
                          log=lambda s: None)
  loop.run(tiny(tmp_path / 'run', **changes), log=lambda s: None, stop_at=2)
  resumed = loop.run(tiny(tmp_path / 'run', resume=True, **changes),
                     log=lambda s: None)
  assert ([h['loss'] for h in resumed['history']]
          == [h['loss'] for h in straight_run['history']])


def test_resume_continues_exactly(straight, tmp_path):
  run_dir = tmp_path / 'run'
  first = loop.run(tiny(run_dir), log=lambda s: None, stop_at=6)
  assert first['steps'] == 6 and first['checkpoints'] == [6]
  # A run stopped before its last step exports no adapter (unfinished).
  assert 'adapter_dir' not in first and not (run_dir / 'adapter').exists()
  # Resuming with another rate would continue another run: refused, in one
  # line naming the field, before config.json is overwritten.
  saved_json = (run_dir / 'config.json').read_text()
  lr = configs.get_config('tiny').optim.learning_rate
  with pytest.raises(loop.ConfigError,
                     match=rf"optim\.learning_rate: {lr!r} there, 0\.5 now"):
    loop.run(tiny(run_dir, resume=True, **{'optim.learning_rate': 0.5}),
             log=lambda s: None)
  assert (run_dir / 'config.json').read_text() == saved_json
  # Settings a resume may change (eval split and paths, which decide the
  # evaluation prompts held out of training; data.path) can change the
  # training examples: the checkpoint's fingerprint of them refuses that.
  real = loop.load_examples
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, 'load_examples',
               lambda cfg: (lambda t, e: (t[1:], e))(*real(cfg)))
    with pytest.raises(loop.ConfigError,
                       match=r'trained on other examples \((\d+) there, '):
      loop.run(tiny(run_dir, resume=True), log=lambda s: None)
  assert (run_dir / 'config.json').read_text() == saved_json
  # Rows a run logged after its last checkpoint (it died before the next)
  # are logged again on resume: the old ones go, the header is not repeated.
  with open(run_dir / 'metrics.csv', 'a') as f:
    f.write('7,9.9\n8,9.9\n')
  second = loop.run(tiny(run_dir, resume=True), log=lambda s: None)
  assert second['steps'] == FAST['steps']
  # Same batches, same dropout keys, same state: bit for bit; the summary's
  # history covers the whole run (steps 1-6 from metrics.csv).
  expected = [h['loss'] for h in straight['history']]
  assert [h['loss'] for h in second['history']] == expected
  assert second['final_loss'] == straight['final_loss']
  with open(run_dir / 'metrics.csv') as f:
    rows = list(csv.DictReader(f))
  assert [int(r['step']) for r in rows] == list(range(1, FAST['steps'] + 1))
  assert [float(r['loss']) for r in rows] == expected


def _tensorboard_events(events_dir):
  """Every event TensorBoard will read in an event folder, file by file in
  name order (read here, not by train.event_files), each record's
  checksums checked; a cut-short last record is not read."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  for name in sorted(os.listdir(events_dir)):
    if 'tfevents' not in name:
      continue
    data = (pathlib.Path(events_dir) / name).read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      head = data[pos:pos + 8]
      n = struct.unpack('<Q', head)[0]
      if pos + 16 + n > len(data):
        break
      assert struct.unpack('<I', data[pos + 8:pos + 12])[0] == (
          record_writer.masked_crc32c(head))
      payload = data[pos + 12:pos + 12 + n]
      assert struct.unpack('<I', data[pos + 12 + n:pos + 16 + n])[0] == (
          record_writer.masked_crc32c(payload))
      yield event_pb2.Event.FromString(payload)
      pos += 16 + n


def _tensorboard_points(events_dir) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in an event folder, by tag, as (step, value) in file
  order."""
  points = {}
  for event in _tensorboard_events(events_dir):
    for v in event.summary.value:
      points.setdefault(v.tag, []).append((event.step, v.simple_value))
  return points


def _tensorboard_purges(events_dir) -> list[int]:
  """The steps of the SessionLog START (purge) events in an event folder."""
  return [e.step for e in _tensorboard_events(events_dir)
          if e.HasField('session_log') and e.session_log.status == 1]


def test_resumed_and_finished_runs_keep_the_whole_record(tmp_path):
  """A resume continues the cumulative count of dropped target tokens (from
  the checkpoint: no row was logged at its step), and tells TensorBoard to
  drop events past the checkpoint; resuming a finished run evaluates it
  again in place of its old row, and its summary keeps the history, the
  final loss and both evaluations."""
  small = {'steps': 4, 'checkpoint_every': 2, 'data.max_target_tokens': 2,
           'log_every': 3,
           'eval.before': True, 'eval.after': True,
           'eval.num_examples': 8, 'eval.batch_size': 8}
  straight = loop.run(tiny(tmp_path / 'straight', **small),
                      log=lambda s: None)
  assert straight['dropped_target_tokens'] > 0
  run_dir = tmp_path / 'run'
  loop.run(tiny(run_dir, **small), log=lambda s: None, stop_at=2)
  # As a run killed after its checkpoint leaves them: points past it,
  # one of a tag the resumed run does not log at that step.
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  late = metrics_lib.MetricsWriter(run_dir, enabled=True, last_step=2)
  late.write(3, {'loss': 99.0, 'stale_tag': 1.0})
  late.close()
  # The count comes from the checkpoint, not only from a logged row: a
  # copy of the stopped run without its rows (killed before it logged
  # its checkpoint's step) resumes to the same count.
  import shutil  # pylint: disable=g-import-not-at-top
  unlogged = tmp_path / 'unlogged'
  shutil.copytree(run_dir, unlogged)
  with open(unlogged / 'metrics.csv') as f:
    header = f.readline()
  (unlogged / 'metrics.csv').write_text(header)
  assert loop.run(tiny(unlogged, resume=True, **small), log=lambda s: None)[
      'dropped_target_tokens'] == straight['dropped_target_tokens']
  second = loop.run(tiny(run_dir, resume=True, **small), log=lambda s: None)
  assert second['dropped_target_tokens'] == straight['dropped_target_tokens']
  # The stopped run logged its last step (2) too; steps 3 and 4 as
  # straight through.
  by_step = lambda run: {h['step']: h['dropped_target_tokens']
                         for h in run['history']}
  assert list(by_step(second)) == [2, 3, 4]
  assert {k: by_step(second)[k] for k in (3, 4)} == by_step(straight)
  # The event files hold each step once (the stopped run's past its
  # checkpoint are gone from them: TensorBoard's fast loader ignores
  # purge_step).
  with open(run_dir / 'metrics.csv') as f:
    logged = [(int(r['step']), float(r['loss'])) for r in csv.DictReader(f)]
  everything = _tensorboard_points(run_dir / 'tensorboard')
  assert 'stale_tag' not in everything
  points = everything['loss']
  assert [p[0] for p in points] == [p[0] for p in logged] == [2, 3, 4]
  assert [p[1] for p in points] == pytest.approx([p[1] for p in logged])
  with pytest.raises(loop.ConfigError, match=r'checkpoint 4 in .* is past '
                     r'--steps 3; resume with --steps 4 or more'):
    loop.run(tiny(run_dir, resume=True, **{**small, 'steps': 3}),
             log=lambda s: None)
  logs = []
  third = loop.run(tiny(run_dir, resume=True, **small), log=logs.append)
  assert any('already at step 4: evaluating it again' in line
             for line in logs), logs
  with open(run_dir / 'eval.csv') as f:
    assert [int(r['step']) for r in csv.DictReader(f)] == [0, 4]
  # TensorBoard too: the first evaluation at step 4 is gone from the
  # event files, the new one is there.
  evals = _tensorboard_points(run_dir / 'tensorboard' / 'eval')
  assert [p[0] for p in evals['eval/target_loss']] == [0, 4]
  assert [p[1] for p in evals['eval/target_loss']] == pytest.approx(
      [second['eval_before']['target_loss'],
       third['eval_after']['target_loss']])
  for key in ('final_loss', 'eval_before', 'dropped_target_tokens'):
    assert third[key] == second[key], key
  again = lambda res: {k: v for k, v in res.items() if k != 'seconds'}
  assert again(third['eval_after']) == again(second['eval_after'])
  assert third['eval_after']['target_loss'] == pytest.approx(
      straight['eval_after']['target_loss'])
  assert ([(h['step'], h['loss']) for h in third['history']] ==
          [(h['step'], h['loss']) for h in second['history']])
  with open(run_dir / 'summary.json') as f:
    assert json.load(f)['final_loss'] == straight['final_loss']
  # Resumed with no final evaluation asked: the recorded one stays, in
  # eval.csv and in the summary (which had lost it).
  fourth = loop.run(tiny(run_dir, resume=True, **{**small, 'eval.after': False}),
                    log=lambda s: None)
  assert fourth['eval_after'] == pytest.approx(third['eval_after'])
  with open(run_dir / 'summary.json') as f:
    assert json.load(f)['eval_after'] == pytest.approx(third['eval_after'])
  with open(run_dir / 'eval.csv') as f:
    assert [int(r['step']) for r in csv.DictReader(f)] == [0, 4]


def test_a_run_that_fails_closes_its_checkpointer_and_writers(
    tmp_path, monkeypatch):
  """A step that raises mid-run: the checkpoint manager and both metric
  writers are closed, and the step's own error is what comes out, even
  when a close fails too."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  closed = []
  real_close = metrics_lib.MetricsWriter.close

  def close_writer(self):
    closed.append('writer')
    real_close(self)

  def close_ckpt(self):
    closed.append('checkpointer')
    raise OSError('disk gone')

  monkeypatch.setattr(metrics_lib.MetricsWriter, 'close', close_writer)
  monkeypatch.setattr(checkpoint.Checkpointer, 'close', close_ckpt)
  calls = []
  real = step_lib.prepare_batch

  def prepare(raw, k):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('bad batch')
    return real(raw, k)

  monkeypatch.setattr(loop, 'prepare_batch', prepare)
  with pytest.raises(RuntimeError, match='bad batch'):
    loop.run(tiny(tmp_path / 'run'), log=lambda s: None)
  assert sorted(closed) == ['checkpointer', 'writer', 'writer']


def test_resume_changes_ignore_where_and_how_a_run_runs():
  saved = json.loads(configs.to_json(configs.get_config('tiny')))
  moved = configs.replace(configs.get_config('tiny'), steps=80,
                          run_dir='/elsewhere', log_every=3,
                          **{'data.num_threads': 8, 'mesh.data': 2,
                             'model.path': '/mnt/model'})
  assert loop.resume_changes(saved, json.loads(configs.to_json(moved))) == {}
  other = configs.replace(configs.get_config('tiny'),
                          **{'data.seed': 3, 'lora.rank': 8})
  assert set(loop.resume_changes(saved, json.loads(configs.to_json(other)))
             ) == {'data.seed', 'lora.rank'}
  # A checkpoint from before a field existed: the field counts as its
  # default (such a run had been refused whatever --config was given).
  older = json.loads(configs.to_json(configs.get_config('tiny')))
  del older['lora']['ga_batches'], older['lora']['ga_gamma']
  assert loop.resume_changes(older, saved) == {}
  assert loop.resume_changes(older, json.loads(configs.to_json(
      configs.replace(configs.get_config('tiny'), **{'lora.ga_batches': 3})))
                             ) == {'lora.ga_batches': (8, 3)}


def test_training_examples_that_are_evaluation_prompts_are_left_out(
    tmp_path):
  """The GSM8K presets train on LLM-Adapters' math set, which holds most of
  GSM8K's test questions: those are dropped from training, with a warning."""
  shared_data.require('math', 'gsm8k')
  cfg = tiny(tmp_path, **{'data.task': 'math', 'data.eval_task': 'gsm8k',
                          'data.num_train_examples': 0, 'eval.after': True,
                          'eval.num_examples': 10})
  with pytest.warns(UserWarning, match=r'training examples are gsm8k test '
                    r'prompts; left out of training'):
    train, evals = loop.load_examples(cfg)
  assert len(evals) == 10
  from train import data  # pylint: disable=g-import-not-at-top
  test = {' '.join(e.prompt.split()) for e in data.load_task('gsm8k', 'test')}
  assert train and not [e for e in train
                        if ' '.join(e.prompt.split()) in test]


def test_a_math_checkpoint_from_before_the_line_breaks_moved_resumes(
    tmp_path, monkeypatch):
  """Math targets' leading line breaks went to the prompt on 2026-12-07:
  a checkpoint recorded its training data as they were before, which had
  been refused as 'other examples', with advice that failed again. The same
  texts now resume, saying so."""
  shared_data.require('math')
  cfg = dict(FAST, **{'data.task': 'math', 'data.num_train_examples': 40,
                      'data.seq_len': 48, 'steps': 4, 'checkpoint_every': 2})
  real = loop.training_data_fingerprint
  with monkeypatch.context() as m:
    m.setattr(loop, 'training_data_fingerprint',
              lambda examples: real(examples, as_before_2026_12_07=True))
    loop.run(tiny(tmp_path, **cfg), log=lambda s: None, stop_at=2)
  lines = []
  out = loop.run(tiny(tmp_path, resume=True, **cfg), log=lines.append)
  assert [h['step'] for h in out['history']][-1] == 4
  assert any('was trained with its targets\' leading line breaks (or its '
             'prompts\' trailing spaces) encoded apart from the text they '
             'join (before 2026-12-07)' in line for line in lines), lines


def test_validation_fraction_zero_trains_on_everything(tmp_path):
  everything, _ = loop.load_examples(tiny(tmp_path, **{
      'data.validation_fraction': 0.0}))
  carved, _ = loop.load_examples(tiny(tmp_path))
  assert len(everything) > len(carved) and set(carved) <= set(everything)
  with pytest.raises(loop.ConfigError, match="eval.split 'validation' needs "
                     'data.validation_fraction > 0'):
    loop.load_examples(tiny(tmp_path, **{'data.validation_fraction': 0.0,
                                         'eval.split': 'validation'}))
  with pytest.raises(loop.ConfigError, match=r'must be in \[0, 1\), got 1.0'):
    loop.load_examples(tiny(tmp_path, **{'data.validation_fraction': 1.0}))


def test_bad_counts_are_config_errors(tmp_path):
  for field in ('log_every', 'eval.batch_size', 'eval.max_new_tokens'):
    with pytest.raises(loop.ConfigError, match=rf'{field} must be >= 1, got 0'):
      loop.validate(tiny(tmp_path, **{field: 0}), 1)
  with pytest.raises(loop.ConfigError, match=r'eval.num_examples must be >= 0 '
                     r'\(0: all\), got -1'):
    loop.validate(tiny(tmp_path, **{'eval.num_examples': -1}), 1)
  for field, value in (('dtype', 'float16'), ('param_dtype', 'int8')):
    with pytest.raises(loop.ConfigError, match=rf"model.{field} must be "
                       rf"'auto', 'float32' or 'bfloat16', got '{value}'"):
      loop.build(tiny(tmp_path / field, **{f'model.{field}': value}))
    assert not (tmp_path / field).exists()


def test_existing_checkpoints_need_resume(straight):
  with pytest.raises(ValueError, match='--resume'):
    loop.run(tiny(straight['run_dir']), log=lambda s: None)


def test_arithmetic_validation_is_carved_from_the_training_pool(tmp_path):
  """num_train_examples sizes the generated pool; the validation carve comes
  from that same pool, so no validation item is a training item."""
  for n in (0, 500):
    cfg = tiny(tmp_path / f'run{n}', **{'eval.split': 'validation',
                                        'eval.before': True,
                                        'data.num_train_examples': n})
    train, evals = loop.load_examples(cfg)
    assert evals
    seen = {(e.prompt, e.target) for e in train}
    assert not [e for e in evals if (e.prompt, e.target) in seen]


def test_the_test_set_is_the_same_for_every_seed(tmp_path):
  """Runs of several data seeds are scored on the same test items (the
  generated arithmetic test set had followed data.seed), and a generated
  test set has as many items as eval.num_examples asks."""
  def test_prompts(seed, n=50):
    cfg = tiny(tmp_path / f'run{seed}', **{
        'eval.before': True, 'data.seed': seed, 'eval.num_examples': n})
    train, evals = loop.load_examples(cfg)
    assert len(evals) == n
    return [e.prompt for e in evals], {e.prompt for e in train}
  first, train0 = test_prompts(0)
  second, train1 = test_prompts(1)
  assert first == second
  assert train0 != train1  # The seed still draws the training examples.
  assert test_prompts(0, 300)[0][:50] == first


def test_adapter_of_a_multimodal_checkpoint_uses_its_module_names(tmp_path):
  """Gemma 3 4B+ keep the decoder under model.language_model (in files of
  either layout): the exported adapter must name it so, or PEFT loads it
  as a no-op."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  from models.gemma import load as gemma_load  # pylint: disable=g-import-not-at-top
  hf = tmp_path / 'hf'
  vocab = loop.load_tokenizer(configs.get_config('tiny').model, '').vocab_size
  model = gemma.Gemma(gemma.get_config('gemma3-tiny').replace(
      vocab_size=vocab), rngs=nnx.Rngs(0))
  gemma.save_pretrained(model, str(hf))
  assert gemma_load.hf_module_prefix(str(hf)) == 'model'
  st = str(hf / 'model.safetensors')
  save_file({
      'model.language_model.' + k.removeprefix('model.'): np.array(v)
      for k, v in load_file(st).items()}, st)
  with open(hf / 'config.json') as f:
    text_config = json.load(f)
  with open(hf / 'config.json', 'w') as f:
    json.dump({'model_type': 'gemma3', 'text_config': text_config,
               'vision_config': {}}, f)
  assert gemma_load.hf_module_prefix(str(hf)) == 'model.language_model'
  # transformers before 4.52 saved these as language_model.model.layers;
  # its modules are model.language_model.layers now, and PEFT matches
  # module names (the file's prefix had matched nothing).
  save_file({
      'language_model.model.' + k.removeprefix('model.language_model.'):
          np.array(v) for k, v in load_file(st).items()}, st)
  assert gemma_load.hf_module_prefix(str(hf)) == 'model.language_model'
  out = loop.run(tiny(tmp_path / 'run', steps=1, checkpoint_every=0,
                      **{'model.path': str(hf)}), log=lambda s: None)
  names = load_file(
      os.path.join(out['adapter_dir'], 'adapter_model.safetensors'))
  assert names and all(n.startswith(
      'base_model.model.model.language_model.layers.') for n in names), names
  # PEFT loads it onto the base it names: model.path, not model.name.
  with open(os.path.join(out['adapter_dir'], 'adapter_config.json')) as f:
    assert json.load(f)['base_model_name_or_path'] == str(hf)
  # It loads back without a name_map (the default had looked for
  # model.layers and refused every module).
  from models import lora  # pylint: disable=g-import-not-at-top
  model = gemma.Gemma(gemma.get_config('gemma3-tiny').replace(
      vocab_size=vocab), rngs=nnx.Rngs(0))
  lora.load_peft_adapter(model, out['adapter_dir'])
  assert len(lora.lora_modules(model)) * 2 == len(names)


def test_prepare_batch_gathers_targets_in_order():
  tokens = np.array([[1, 5, 6, 7, 8, 0], [1, 9, 9, 3, 0, 0]], np.int32)
  mask = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]], np.float32)
  batch = {'tokens': tokens, 'loss_mask': mask,
           'positions': np.zeros_like(tokens),
           'segment_ids': (tokens > 0).astype(np.int32)}
  out, dropped = step_lib.prepare_batch(batch, 3)
  # Position t predicts token t + 1.
  np.testing.assert_array_equal(out['target_idx'][:, :2], [[2, 3], [1, 2]])
  np.testing.assert_array_equal(out['targets'][:, :2], [[7, 8], [9, 3]])
  np.testing.assert_array_equal(out['weights'], [[1, 1, 0], [1, 1, 0]])
  assert dropped == 0
  _, dropped = step_lib.prepare_batch(batch, 1)
  assert dropped == 2


def test_gathered_loss_equals_full_unembedding():
  """The gathered loss is the usual masked next-token loss."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  model = gemma.Gemma(gemma.get_config('gemma-tiny'), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 256, (2, 10)).astype(np.int32)
  mask = np.zeros((2, 10), np.float32)
  mask[0, 4:8] = 1
  mask[1, 6:10] = 1
  seg = np.ones((2, 10), np.int32)
  seg[0, 8:] = 0
  pos = np.tile(np.arange(10, dtype=np.int32), (2, 1))
  batch = {'tokens': tokens, 'loss_mask': mask, 'positions': pos,
           'segment_ids': seg}
  prepared, _ = step_lib.prepare_batch(batch, 9)
  got = step_lib.target_logprobs(model, prepared, pack=False).sum()
  logits = model(tokens, positions=pos, attention_mask=seg > 0)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  want = (jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
          * mask[:, 1:]).sum()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_opt_state_shardings_follow_params():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
              ('data', 'fsdp', 'tensor'))
  params = {'q': {'lora_a': jnp.zeros((8, 2)), 'lora_b': jnp.zeros((2, 4))}}
  sh = {'q': {'lora_a': NamedSharding(mesh, P('fsdp')),
              'lora_b': NamedSharding(mesh, P(None, 'tensor'))}}
  tx = optax.adam(1e-3)
  out = sharding_lib.opt_state_shardings(jax.eval_shape(tx.init, params), params, sh,
                                 mesh)
  assert out[0].mu['q']['lora_a'].spec == P('fsdp')
  assert out[0].nu['q']['lora_b'].spec == P(None, 'tensor')
  assert out[0].count.spec == P()


def test_nonfinite_steps_are_skipped_and_counted():
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}
  cfg = configs.OptimConfig(name='lora_rite', learning_rate=0.1,
                            warmup_steps=0, schedule='constant')
  tx, _ = optim_lib.make_optimizer(cfg, 10)
  state = tx.init(params)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  updates, state = tx.update(bad, state, params)
  assert all(float(jnp.abs(u).sum()) == 0 for u in jax.tree.leaves(updates))
  assert int(step_lib.nonfinite_counts(state)[1]) == 1


@pytest.mark.parametrize('name', ['adam', 'lora_rite', 'loraplus',
                                  'scaled_adam', 'shampoo', 'lamb'])
def test_every_optimizer_builds_with_the_guard(name):
  cfg = configs.OptimConfig(name=name, warmup_steps=2)
  tx, schedule = optim_lib.make_optimizer(cfg, 10)
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.zeros((2, 3))}}
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
  assert float(schedule(0)) == 0.0
  # The guard itself: a NaN gradient is a zero step, and counted.
  nan = jax.tree.map(lambda g: g.at[0, 0].set(jnp.nan), grads)
  updates, state = tx.update(nan, state, params)
  assert all(float(jnp.abs(u).sum()) == 0 for u in jax.tree.leaves(updates))
  assert int(step_lib.nonfinite_counts(state)[1]) == 1


def test_update_magnitudes_skip_zero_factors():
  params = {'x': {'lora_a': jnp.ones((2, 2)), 'lora_b': jnp.zeros((2, 2))}}
  updates = {'x': {'lora_a': jnp.ones((2, 2)), 'lora_b': jnp.ones((2, 2))}}
  m = step_lib.update_magnitudes(params, updates)
  assert float(m['update_ratio_a']) == pytest.approx(1.0)
  assert np.isnan(float(m['update_ratio_b']))


def test_update_magnitudes_average_each_pairs_relative_update():
  # ||A|| = 8 and 2 (c x ones(2, 2) has norm 2c), ||dA|| = 1 and 3: the
  # ratios 1/8 and 3/2 average to 13/16, which a ratio of means (4/10) or
  # inverted ratios would not give. B: one zero factor, left out.
  params = {'x': {'lora_a': 4 * jnp.ones((2, 2)), 'lora_b': jnp.ones((2, 2))},
            'y': {'lora_a': jnp.ones((2, 2)), 'lora_b': jnp.zeros((2, 2))}}
  updates = {'x': {'lora_a': 0.5 * jnp.ones((2, 2)),
                   'lora_b': 0.25 * jnp.ones((2, 2))},
             'y': {'lora_a': 1.5 * jnp.ones((2, 2)),
                   'lora_b': jnp.ones((2, 2))}}
  m = {k: float(v) for k, v in step_lib.update_magnitudes(params, updates).items()}
  assert m['update_ratio_a'] == pytest.approx((1 / 8 + 3 / 2) / 2)
  assert m['update_ratio_b'] == pytest.approx(0.25)
  assert m['update_norm_a'] == pytest.approx((1 + 3) / 2)
  assert m['param_norm_a'] == pytest.approx((8 + 2) / 2)
  assert m['update_norm_b'] == pytest.approx((0.5 + 2) / 2)
  assert m['param_norm_b'] == pytest.approx((2 + 0) / 2)


def test_schedules():
  for kind in ('cosine', 'linear', 'constant'):
    cfg = configs.OptimConfig(learning_rate=1.0, warmup_steps=10,
                              schedule=kind, end_lr_fraction=0.1)
    s = optim_lib.make_schedule(cfg, 100)
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(1.0)
    # The end fraction is reached at step 100, one past the last (99,
    # 0-based), which runs just above it: with an end of 0 the last step
    # still moves.
    end = 1.0 if kind == 'constant' else 0.1
    assert float(s(100)) == pytest.approx(end)
    assert float(s(99)) > end or kind == 'constant'
    assert float(s(99)) == pytest.approx(end, abs=0.02)
  with pytest.raises(ValueError, match='schedule'):
    optim_lib.make_schedule(configs.OptimConfig(schedule='step'), 100)


def test_a_run_that_is_all_warmup_says_so(tmp_path):
  """--steps 1 of a preset with 5 warmup steps had trained nothing (the
  first step runs at rate 0), and said nothing."""
  for steps in (1, 5):
    with pytest.warns(UserWarning) as caught:
      loop.validate(tiny(tmp_path / 'run', steps=steps), 1)
    assert [str(w.message) for w in caught] == [
        f'optim.warmup_steps 5 >= steps {steps}: the whole run is warmup (the '
        'rate climbs from 0 at the first step and never reaches '
        'learning_rate 0.01 or decays); lower --optim.warmup-steps.']
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    loop.validate(tiny(tmp_path / 'run', steps=6), 1)
    loop.validate(tiny(tmp_path / 'run', steps=1,
                       **{'optim.warmup_steps': 0}), 1)
  # In a run, one [train] line.
  lines = []
  loop.run(tiny(tmp_path / 'run', steps=1, export_adapter=False,
                checkpoint_every=0), log=lines.append)
  assert sum('whole run is warmup' in l for l in lines) == 1, lines
  assert [l for l in lines if 'whole run is warmup' in l][0].startswith(
      '[train] warning: optim.warmup_steps 5 >= steps 1')


def test_tiny_evaluates_before_and_after(tmp_path):
  # Only eval fields differ from FAST: the compiled step is reused.
  cfg = tiny(tmp_path / 'run', export_adapter=False,
             **{'eval.before': True, 'eval.after': True,
                'eval.num_examples': 8, 'eval.batch_size': 8})
  summary = loop.run(cfg, log=lambda s: None)
  for key in ('eval_before', 'eval_after'):
    res = summary[key]
    assert 0.0 <= res['accuracy'] <= 1.0 and res['num_examples'] == 8
  # The gold answers' loss per token moves with training even where exact
  # accuracy of a tiny model cannot.
  assert (summary['eval_after']['target_loss']
          < summary['eval_before']['target_loss'])
  with open(tmp_path / 'run' / 'eval.csv') as f:
    rows = list(csv.DictReader(f))
  assert [int(r['step']) for r in rows] == [0, FAST['steps']]
  assert 'eval/accuracy' in rows[0] and 'eval/target_loss' in rows[0]


def _tiny_lora_step_parts(dropout=0.0):
  """A gemma-tiny with q/v adapters, split for a train step, and adam."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma, lora  # pylint: disable=g-import-not-at-top
  model = gemma.Gemma(gemma.get_config('gemma-tiny'), rngs=nnx.Rngs(0))
  lora.apply_lora(model, ('q', 'v'), rank=2, init='gaussian', dropout=dropout,
                  rngs=nnx.Rngs(params=1, dropout=2))
  graphdef, lp, rngs, base = nnx.split(model, nnx.LoRAParam, nnx.RngState,
                                       ...)
  params = trees_lib.str_keys(nnx.to_pure_dict(lp))
  tx, schedule = optim_lib.make_optimizer(
      configs.OptimConfig(name='adam', warmup_steps=0, schedule='constant',
                          learning_rate=1e-2), 10)
  return graphdef, params, rngs, base, tx, schedule


def _tiny_batch(targets_per_row):
  """A prepared batch of 12-token rows, the last n tokens of row i its
  targets for n = targets_per_row[i]."""
  rows = len(targets_per_row)
  tokens = np.random.default_rng(0).integers(3, 256, (rows, 12))
  mask = np.zeros((rows, 12), np.float32)
  for i, n in enumerate(targets_per_row):
    mask[i, 12 - n:] = 1
  batch = {'tokens': tokens.astype(np.int32), 'loss_mask': mask,
           'positions': np.tile(np.arange(12, dtype=np.int32), (rows, 1)),
           'segment_ids': np.ones((rows, 12), np.int32)}
  return step_lib.prepare_batch(batch, 6)[0]


def _small_step_inputs(accum):
  """One adam step of `_tiny_lora_step_parts` on a 4-row batch in `accum`
  micro-batches, or (accum=0) the gradient of its mean loss per target."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, params, rngs, base, tx, schedule = _tiny_lora_step_parts()
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'opt_state': tx.init(params)}
  prepared = _tiny_batch((2, 3, 4, 5))  # Uneven target counts per row.
  if accum == 0:  # the gradient of the batch's mean loss per target token
    def mean_loss(lp):
      m = nnx.merge(graphdef, trees_lib.int_keys(lp), rngs, base)
      return (-step_lib.target_logprobs(m, prepared, pack=False).sum()
              / prepared['weights'].sum())
    return jax.grad(mean_loss)(params)
  prepared = {k: v.reshape((accum, 4 // accum) + v.shape[1:])
              for k, v in prepared.items()}
  step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, accum=accum,
                                      pack=False))
  return step(state, nnx.to_pure_dict(base), nnx.to_pure_dict(rngs), prepared)


def test_the_optimizer_takes_the_configs_clip_and_weight_decay():
  """optim.clip_grad_norm and optim.weight_decay reach the update (a fixed
  clip of 1 and no decay had passed every test)."""
  params = {'q': {'lora_a': jnp.ones((2, 2)), 'lora_b': jnp.ones((2, 2))}}
  base = dict(name='adam', learning_rate=1.0, warmup_steps=0,
              schedule='constant')

  def first_update(grad, **changes):
    tx, _ = optim_lib.make_optimizer(configs.OptimConfig(**base, **changes),
                                     10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, grad), params)
    return jax.tree.leaves(tx.update(grads, tx.init(params), params)[0])

  # Gradients of norm sqrt(8 * 16) clipped to 0.5; with eps 1 Adam's first
  # step is -g / (|g| + 1), so it shows the gradient's scale.
  g = 4.0 * 0.5 / np.sqrt(8 * 16.0)
  for u in first_update(4.0, eps=1.0, clip_grad_norm=0.5):
    np.testing.assert_allclose(u, -g / (g + 1.0), rtol=1e-5)
  for u in first_update(0.0, weight_decay=0.1):  # decoupled: lr * wd * p
    np.testing.assert_allclose(u, -0.1, rtol=1e-5)


def test_dropout_draws_new_masks_each_step_and_micro_batch():
  """LoRA dropout's keys fold in the step and the micro-batch: the same
  params and batch give another loss at another step, and two copies of a
  batch accumulated give another loss than one (same masks for both had
  passed every test, each run with dropout 0)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, params, rngs, base, tx, schedule = _tiny_lora_step_parts(0.5)
  # lora_b nonzero: at B = 0 dropout (on the adapter's input) changes
  # nothing.
  params = jax.tree.map(
      lambda x: x + 0.5 * np.random.default_rng(x.size).normal(size=x.shape),
      params)
  prepared = _tiny_batch((6, 6))

  def loss(accum, step_no):
    state = {'step': jnp.asarray(step_no, jnp.int32), 'params': params,
             'opt_state': tx.init(params)}
    step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule,
                                            accum=accum, pack=False))
    batch = {k: np.stack([v] * accum) for k, v in prepared.items()}
    return float(step(state, nnx.to_pure_dict(base), nnx.to_pure_dict(rngs),
                      batch)[1]['loss'])

  assert loss(1, 0) != loss(1, 1)
  assert loss(1, 3) != loss(2, 3)
  # Each micro-batch its own key (accum 2 at step 3 draws keys 6 and 7: one
  # mask for both is key 6's alone) ...
  assert loss(2, 3) != loss(1, 6)
  # ... and no key shared across steps: step 1's micro-batches draw keys 2
  # and 3, the two steps that draw them alone (with step + i, 1 and 2).
  assert loss(2, 1) == pytest.approx((loss(1, 2) + loss(1, 3)) / 2,
                                     rel=1e-6)


def test_gradient_accumulation_matches_one_batch():
  """Token-weighted: 2 micro-batches of 2 rows == one batch of 4 rows, and
  both step on the mean loss per target token's gradient (a sum over tokens
  had passed the comparison, Adam being blind to the gradient's scale)."""
  one, m1 = _small_step_inputs(1)
  two, m2 = _small_step_inputs(2)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-5)
  np.testing.assert_allclose(
      m1['grad_norm'], optax.tree.norm(_small_step_inputs(0)), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one['params']), jax.tree.leaves(two['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_packed_mask_equals_padded_mask_on_single_segments():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  model = gemma.Gemma(gemma.get_config('gemma2-tiny'), rngs=nnx.Rngs(0))
  tokens = np.arange(3, 27, dtype=np.int32).reshape(2, 12)
  seg = np.ones((2, 12), np.int32)
  seg[1, 9:] = 0
  mask = np.zeros((2, 12), np.float32)
  mask[:, 5:9] = 1
  batch = {'tokens': tokens, 'loss_mask': mask, 'segment_ids': seg,
           'positions': np.tile(np.arange(12, dtype=np.int32), (2, 1))}
  prepared, _ = step_lib.prepare_batch(batch, 4)
  np.testing.assert_allclose(
      step_lib.target_logprobs(model, prepared, pack=True),
      step_lib.target_logprobs(model, prepared, pack=False), rtol=1e-5, atol=1e-6)


def test_a_packed_row_scores_each_segment_as_if_alone():
  """Three segments in one row: each attends to itself only, so the row's
  log-probs are those of the segments scored in rows of their own (one
  segment per row could not tell a lost segment mask from a kept one)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  model = gemma.Gemma(gemma.get_config('gemma2-tiny'), rngs=nnx.Rngs(0))
  lengths, width = (5, 4, 3), 14
  rng = np.random.default_rng(0)
  segments = [rng.integers(3, 100, n).astype(np.int32) for n in lengths]

  def row(parts):
    tokens, seg, pos = (np.zeros(width, np.int32) for _ in range(3))
    mask = np.zeros(width, np.float32)
    start = 0
    for i, part in enumerate(parts):
      end = start + len(part)
      tokens[start:end], seg[start:end] = part, i + 1
      pos[start:end] = np.arange(len(part))
      mask[start + 2:end] = 1  # the first two tokens of each are its prompt
      start = end
    return tokens, seg, pos, mask

  def scores(rows):
    tokens, seg, pos, mask = (np.stack(x) for x in zip(*rows))
    batch = {'tokens': tokens, 'loss_mask': mask, 'segment_ids': seg,
             'positions': pos}
    prepared, dropped = step_lib.prepare_batch(batch, 8)
    assert dropped == 0
    return np.asarray(step_lib.target_logprobs(model, prepared, pack=True))

  packed = scores([row(segments)])[0]
  alone = scores([row([s]) for s in segments])
  # 3 + 2 + 1 targets, in order, segment by segment.
  np.testing.assert_allclose(packed[:6], np.concatenate(
      [alone[0, :3], alone[1, :2], alone[2, :1]]), rtol=1e-5, atol=1e-5)
  # Unpacked, later segments would see earlier ones: another score.
  tokens, seg, pos, mask = row(segments)
  batch, _ = step_lib.prepare_batch(
      {'tokens': tokens[None], 'loss_mask': mask[None],
       'segment_ids': seg[None], 'positions': pos[None]}, 8)
  unpacked = np.asarray(step_lib.target_logprobs(model, batch, pack=False))[0]
  assert np.abs(unpacked[3:6] - packed[3:6]).max() > 1e-3


def check_alternatives_match_pairs(r, stem: str, odd: tuple[str, ...]):
  """`Evaluator.multiple_choice` scores options that differ only in their
  last token in one row each (`step_lib.alternative_logprobs`); the scores must
  be those of scoring every option as its own row, and only the example
  whose options differ elsewhere may go to `_score_pairs`."""
  from train import evaluate  # pylint: disable=g-import-not-at-top
  from train.data import Example  # pylint: disable=g-import-not-at-top

  def item(prompt, options, gold):
    return Example(prompt, options[gold], options=tuple(options),
                   labels=tuple(options), gold_index=gold)

  # Each request its own last tokens, and more requests than a batch holds
  # (eval.batch_size 2): a batch given another batch's alternatives had
  # passed with one batch of the same options everywhere.
  examples = [item('Which one? ', [f'{stem}{k}' for k in '1234'], 2),
              item('And now? ', [f'{stem}{k}' for k in '56789'], 4),
              item('Odd one: ', list(odd), 0),
              item('Three. ', [f'{stem}{k}' for k in '012'], 0)]
  r = dataclasses.replace(r, config=configs.replace(
      r.config, **{'eval.batch_size': 2}))
  ev = loop.Evaluator(r)
  pairs_seen = []
  score_pairs = ev._score_pairs  # pylint: disable=protected-access

  def counting(state, pairs):
    pairs_seen.append(len(pairs))
    return score_pairs(state, pairs)

  ev._score_pairs = counting  # pylint: disable=protected-access
  fast = ev.multiple_choice(r.state, examples)
  assert pairs_seen == [len(odd)]
  slow = evaluate.multiple_choice_loglik(
      examples, r.tokenizer, lambda p: score_pairs(r.state, p),
      max_length=r.config.data.seq_len)
  assert fast.predictions == slow.predictions
  assert fast.option_lengths == slow.option_lengths
  assert [len(s) for s in fast.option_scores] == [4, 5, len(odd), 3]
  flat = lambda res: np.concatenate([np.asarray(s) for s in res.option_scores])
  assert np.all(flat(fast) < 0)
  np.testing.assert_allclose(flat(fast), flat(slow), rtol=1e-5, atol=1e-4)
  # The options really are scored apart (a constant would pass the rest).
  assert len(set(np.round(flat(fast), 4))) > 8


def test_multiple_choice_shares_one_row_across_last_token_options(tmp_path):
  check_alternatives_match_pairs(loop.build(tiny(tmp_path / 'run')),
                                 'the correct answer is answer',
                                 ('A', 'BBBBBB', 'CC'))


def test_multiple_choice_by_loglik_on_real_boolq_files(tmp_path):
  """The log-likelihood path of the evaluator (BoolQ from ../shared/data)."""
  folder = shared_data.require('boolq') / 'boolq'
  cfg = tiny(tmp_path / 'run', **{
      'data.task': 'boolq', 'data.path': str(folder), 'data.seq_len': 64,
      'eval.before': True, 'eval.num_examples': 6, 'eval.batch_size': 8})
  r = loop.build(cfg)
  evaluator = loop.Evaluator(r)
  assert evaluator.method == 'loglik'
  res = evaluator(r.state)
  assert res['num_examples'] == 6 and 0.0 <= res['accuracy'] <= 1.0
  # The score of a pair is the summed log-probability of its option tokens.
  scores = evaluator._score_pairs(r.state, [([1, 5, 6], [7, 8]), ([1], [9])])
  assert len(scores) == 2 and all(s < 0 for s in scores)
  assert not (tmp_path / 'run').exists()  # build writes nothing



def test_lora_rite_train_step_copies_no_input(tmp_path):
  """The loop's step gives LoRA-RITE's basis the old params' buffer.

  Without the non-finite guard: under its lax.cond the new basis is a
  branch output, and XLA copies it whichever buffer it gets.
  """
  r = loop.build(tiny(tmp_path / 'run', **{'optim.skip_nonfinite': False}))
  assert r.config.optim.name == 'lora_rite'
  raw = next(iter(loop.train_dataset(r)))
  batch, _ = step_lib.prepare_batch(raw, r.max_targets)
  batch = {k: v[None] for k, v in batch.items()}  # one micro-batch
  args = (r.state, r.base, r.rngs, batch)
  hlo = loop._jitted_step(r).lower(*args).compile().as_text()  # pylint: disable=protected-access
  from tests.test_donation import factor_copies  # pylint: disable=g-import-not-at-top
  params = r.state['params']
  copies = factor_copies(hlo, params, inputs_only=True)
  assert not copies, copies[:3]
  # Control: jax.jit's in-order buffer pairing copies every factor.
  step = step_lib.make_train_step(r.graphdef, r.tx, r.schedule, accum=1,
                              pack=False, logprobs=r.family.logprobs)
  plain = jax.jit(step, donate_argnums=(0,)).lower(*args).compile().as_text()
  assert (len(factor_copies(plain, params, inputs_only=True))
          >= len(jax.tree.leaves(params)))


_REBUILD_ON_TWO_DEVICES = r'''
import json, os, sys
os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
import numpy as np
from models import lora
from train import configs, loop
r = loop.build(configs.replace(configs.get_config('tiny'),
                               **json.loads(sys.argv[1])))
assert dict(r.mesh.shape)['data'] == 2, r.mesh.shape
np.savez(sys.argv[2], **{p: np.asarray(proj.kernel[...], np.float32)
                         for p, proj in lora.projections(r.model).items()})
'''


def test_initial_factors_with_a_foreign_key_are_one_line(tmp_path):
  """A key other than <module>/a or /b had ended in 'substring not
  found'."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = tmp_path / loop.INITIAL_FACTORS_FILE
  save_file({'layers.0.attn.q/a': np.ones((2, 2), np.float32),
             'layers.0.attn.q/c': np.ones((2, 2), np.float32)}, str(path))
  with pytest.raises(loop.ConfigError) as e:
    loop.load_initial_factors(str(tmp_path))
  assert str(e.value) == (
      f"{path}: unreadable (key 'layers.0.attn.q/c' is not <module>/a or "
      "<module>/b); it holds the run's initial adapter factors, which "
      '--resume needs.')


def test_lora_ga_resume_on_another_mesh_keeps_the_base(tmp_path):
  """The run keeps LoRA-GA's (A0, B0) in its folder; a resume rebuilds the
  base W0 - s A0 B0 from them instead of redoing the gradient and SVD,
  which on another mesh (here 2 devices, bfloat16 compute) can flip
  singular vectors and put another base under the restored factors."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  ga = {'lora.init': 'lora_ga', 'lora.ga_batches': 2, 'model.dtype': 'bfloat16'}
  run_dir = tmp_path / 'run'
  first = loop.run(tiny(run_dir, **ga), log=lambda s: None, stop_at=2)
  assert first['checkpoints'] == [2]
  saved = loop.load_initial_factors(str(run_dir))
  probe = loop.build(tiny(tmp_path / 'probe', **ga))  # the first run's base
  from models import lora  # pylint: disable=g-import-not-at-top
  for path, (a0, b0) in lora.initial_factors(probe.model).items():
    np.testing.assert_array_equal(saved[path][0], np.asarray(a0, np.float32))
    np.testing.assert_array_equal(saved[path][1], np.asarray(b0, np.float32))
  changes = {**FAST, **ga, 'run_dir': str(run_dir), 'resume': True}
  out = tmp_path / 'kernels.npz'
  proc = subprocess.run(
      [sys.executable, '-c', _REBUILD_ON_TWO_DEVICES, json.dumps(changes),
       str(out)], cwd=ROOT, env=xla_flags.script_env(), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rebuilt = np.load(out)
  for p, w in _kernels(probe.model).items():
    np.testing.assert_array_equal(rebuilt[p], w, err_msg=p)
  # Another rank than the run's: the saved factors do not fit, said as a
  # resume's mismatch, naming the field (from the run's config.json).
  with pytest.raises(loop.ConfigError, match=r'--resume: the run in .* was '
                     r'made with other settings \(lora\.rank: 4 there, 2 '
                     r'now\); resume with --config'):
    loop.run(tiny(run_dir, resume=True, **{**ga, 'lora.rank': 2}),
             log=lambda s: None)
  # And the resumed run trains on from there.
  second = loop.run(tiny(run_dir, resume=True, steps=4, **ga),
                    log=lambda s: None)
  # (its history is the whole run's: steps 1-2 from before the resume).
  assert [h['step'] for h in second['history']] == [1, 2, 3, 4]
  assert all(np.isfinite(h['loss']) for h in second['history'])


def _kernels(model):
  from models import lora  # pylint: disable=g-import-not-at-top
  return {p: np.asarray(proj.kernel[...], np.float32)
          for p, proj in lora.projections(model).items()}


def test_lora_ga_init_starts_where_the_base_was(straight, tmp_path):
  """--lora.init lora_ga: adapters from the SVD of the full gradient over
  the run's first batches (B != 0), the base kernel moved to W0 - s A0 B0
  so the model starts where it was, and it trains. (A second build makes
  the same factors: test_lora_ga_resume_on_another_mesh_keeps_the_base.)"""
  from models import lora  # pylint: disable=g-import-not-at-top
  ga = {'lora.init': 'lora_ga', 'lora.ga_batches': 2, 'grad_accum': 2}
  plain = loop.build(tiny(tmp_path / 'plain'))
  first = loop.build(tiny(tmp_path / 'ga', **ga))
  w0 = _kernels(plain.model)
  targets = lora.lora_modules(first.model)
  assert targets and set(targets) <= set(w0)
  moved = _kernels(first.model)
  assert any(not np.allclose(moved[p], w0[p]) for p in targets)
  params = jax.tree.leaves(first.state['params'])
  assert all(np.abs(np.asarray(x)).max() > 0 for x in params)  # B too
  # Adapter and base together: W0, to float32 rounding.
  merged = _kernels(lora.merge_lora(first.model))
  for p, w in w0.items():
    np.testing.assert_allclose(merged[p], w, atol=1e-5, err_msg=p)
  # Another number of batches averages another gradient.
  other = loop.build(tiny(tmp_path / 'ga1', **{**ga, 'lora.ga_batches': 1}))
  assert not np.allclose(np.asarray(params[0]),
                         np.asarray(jax.tree.leaves(
                             other.state['params'])[0]))
  # It trains; so does PiSSA, whose frozen initial factors also ride in the
  # base state beside the donated factors. Every init starts at W0, so the
  # first step's loss (taken before any update) is the standard init's (the
  # straight run's, on the same batches). A gamma other than LoRA-GA's
  # default is LoRA-GA's alone: PiSSA (and the shapes-only build) run
  # without it.
  for init in ('lora_ga', 'pissa'):
    out = loop.run(tiny(tmp_path / init, steps=3, **{
        'lora.init': init, 'lora.ga_batches': 2, 'lora.ga_gamma': 8.0}),
                   log=lambda s: None)
    assert len(out['history']) == 3, init
    assert all(np.isfinite(h['loss']) for h in out['history']), init
    assert out['history'][0]['loss'] == pytest.approx(
        straight['history'][0]['loss'], rel=1e-5), init
  with pytest.raises(loop.ConfigError, match='lora.ga_batches must be >= 1'):
    loop.build(tiny(tmp_path / 'bad', **{**ga, 'lora.ga_batches': 0}))
  for gamma in (0.0, -1.0, float('nan'), float('inf')):
    with pytest.raises(loop.ConfigError, match='lora.ga_gamma must be'):
      loop.validate(tiny(tmp_path / 'bad', **{**ga, 'lora.ga_gamma': gamma}),
                    1)


def test_lora_ga_gradient_is_the_training_losss_whatever_grad_accum(
    tmp_path, monkeypatch):
  """The gradient LoRA-GA takes the SVD of is the training loss's: the
  step's summed log-probs over its target tokens, however the step is cut
  into micro-batches (each had been divided by its own token count, so
  the factors changed with grad_accum). A rank too large for LoRA-GA is
  refused before the gradient passes, not after them."""
  from models import lora  # pylint: disable=g-import-not-at-top
  ga = {'lora.init': 'lora_ga', 'lora.ga_batches': 2}
  grads = {}
  real = lora.estimate_full_gradients

  def kept(*args, **kwargs):
    out = real(*args, **kwargs)
    grads[len(grads)] = {k: np.asarray(v) for k, v in out.items()}
    return out

  monkeypatch.setattr(lora, 'estimate_full_gradients', kept)
  for accum in (1, 4):
    loop.build(tiny(tmp_path / f'ga{accum}', grad_accum=accum, **ga))
  assert set(grads[0]) == set(grads[1])
  for name, g in grads[0].items():
    np.testing.assert_allclose(grads[1][name], g, rtol=1e-4,
                               atol=1e-6 * np.abs(g).max(), err_msg=name)

  def no_passes(*args, **kwargs):
    raise AssertionError('the gradient passes ran before the rank check')

  monkeypatch.setattr(lora, 'estimate_full_gradients', no_passes)
  with pytest.raises(loop.ConfigError,
                     match=r"lora: apply_lora: rank 20 is too large for "):
    loop.build(tiny(tmp_path / 'big', **{**ga, 'lora.rank': 20}))
  with pytest.raises(loop.ConfigError,
                     match=r"lora: apply_lora: target 'nope' matches no"):
    loop.build(tiny(tmp_path / 'nope', **{**ga, 'lora.targets': ('nope',)}))


def test_metrics_writer_keeps_rows_up_to_the_checkpoint(tmp_path):
  """Rows after the resumed-from step go; rows before stay, a row that did
  not log every key of its header block included (an empty cell), and are
  handed back; a row cut short by a kill goes."""
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False)
  w.write(0, {'acc': 0.5, 'loss': 2.0})
  w.write(4, {'acc': 0.75})  # No loss: an empty cell.
  w.write(8, {'acc': 0.8, 'loss': 1.0})
  w.close()
  with open(tmp_path / metrics_lib.CSV_NAME, 'a') as f:
    f.write('9,0.9\n')  # Killed mid-row.
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                                last_step=4)
  assert w.kept == [{'step': 0, 'acc': 0.5, 'loss': 2.0},
                    {'step': 4, 'acc': 0.75}]
  w.write(5, {'acc': 0.7, 'loss': 1.5})
  w.close()
  with open(tmp_path / metrics_lib.CSV_NAME) as f:
    rows = list(csv.DictReader(f))
  assert [(r['step'], r['loss']) for r in rows] == [
      ('0', '2.0'), ('4', ''), ('5', '1.5')]


def test_a_last_row_cut_inside_its_number_is_dropped(tmp_path, monkeypatch):
  """A full disk cut eval.csv's row for step 4 inside its last number
  ('16.0,1' for '16.0,16.0'): it had the header's cells, parsed, was kept
  as step 4's result, and the missed evaluation was never done again. A
  last line without its line break goes now, whatever its step. A rewrite
  that fails names the file, keeps it whole and leaves no temporary file
  (it had said only '[Errno 28] ...' and left 'eval.csv.tmp')."""
  import errno  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                                csv_name=metrics_lib.EVAL_CSV_NAME)
  w.write(2, {'acc': 0.5, 'n': 16.0})
  w.close()
  path = tmp_path / metrics_lib.EVAL_CSV_NAME
  whole = path.read_text()
  with open(path, 'a') as f:
    f.write('4,0.25,1')  # '4,0.25,16.0\r\n' cut by the full disk
  real = pathlib.Path.write_text

  def full_disk(self, text, *args, **kwargs):
    real(self, text[:5], *args, **kwargs)
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(pathlib.Path, 'write_text', full_disk)
  with pytest.raises(OSError) as e:
    metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                              csv_name=metrics_lib.EVAL_CSV_NAME, last_step=4)
  assert str(e.value) == (f'{path}: cannot write (No space left on device); '
                          'the file there before, if any, is kept.')
  assert path.read_text() == whole + '4,0.25,1'
  assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
  monkeypatch.undo()
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                                csv_name=metrics_lib.EVAL_CSV_NAME, last_step=4)
  assert w.kept == [{'step': 2, 'acc': 0.5, 'n': 16.0}]
  w.close()
  assert path.read_text() == whole
  # Cut between its '\r' and '\n', a row is whole: kept.
  with open(path, 'a', newline='') as f:
    f.write('4,0.25,16.0\r')
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                                csv_name=metrics_lib.EVAL_CSV_NAME, last_step=4)
  assert [r['step'] for r in w.kept] == [2, 4]
  w.close()


_BAR_THEN_KILLED = '''
import os
from train import metrics
metrics._shows_a_bar = lambda stream: True  # as in a terminal
p = metrics.Progress(10, enabled=True)
p.write('[step 5] loss=1.0')
os.kill(os.getpid(), 9)  # a host lost, the OOM killer
'''


def test_step_lines_above_the_bar_are_flushed(tmp_path):
  """tqdm's write does not flush: with stdout a file (a Cloud TPU job's
  log), the step lines had waited in its 8 KB buffer for hundreds of
  steps, and a killed run lost them."""
  with open(tmp_path / 'log.txt', 'w') as out:
    proc = subprocess.run(
        [sys.executable, '-c', _BAR_THEN_KILLED], stdout=out,
        stderr=subprocess.DEVNULL, timeout=120,
        env=xla_flags.script_env(drop=('PYTHONUNBUFFERED',)))
  assert proc.returncode == -9
  assert (tmp_path / 'log.txt').read_text() == '[step 5] loss=1.0\n'


def test_a_bar_only_where_it_is_redrawn(monkeypatch):
  """A log file or a pipe had got the bar as one newline-free line of
  redraws, growing all run; a terminal or a notebook kernel's stream
  shows it."""
  import io  # pylint: disable=g-import-not-at-top
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  class OutStream(io.StringIO):  # ipykernel's, by its module
    pass
  OutStream.__module__ = 'ipykernel.iostream'

  for stream, shown in ((io.StringIO(), False), (Terminal(), True),
                        (OutStream(), True)):
    monkeypatch.setattr(sys, 'stderr', stream)
    bar = metrics_lib.Progress(3, enabled=True)
    assert (bar._bar is not None) == shown, stream  # pylint: disable=protected-access
    bar.close()


def test_every_line_goes_above_the_bar(monkeypatch, tmp_path):
  """Evaluation lines (and the loop's warnings) had been printed plainly,
  glued to the bar's last redraw in a terminal; only the step lines went
  above it."""
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(metrics_lib, '_shows_a_bar', lambda stream: True)
  above = []
  write = metrics_lib.Progress.write
  monkeypatch.setattr(metrics_lib.Progress, 'write',
                      lambda self, text: above.append(text) or write(self,
                                                                     text))
  loop.run(tiny(tmp_path / 'run', steps=2, log_every=1, progress=True,
                **{'eval.every': 2}))
  assert [line.split(']')[0] for line in above] == [
      '[step 1', '[step 2', '[eval periodic step 2'], above


_TB_FULL_DISK = '''
import sys
import threading
from tensorboardX import event_file_writer
from train import metrics
real = event_file_writer.EventsWriter.flush
def flush(self):
  if getattr(sys, 'disk_full', False):
    raise OSError(28, 'No space left on device')
  return real(self)
event_file_writer.EventsWriter.flush = flush
threads = threading.active_count()
w = metrics.MetricsWriter(sys.argv[1], enabled=True)
w.write(0, {'loss': 2.0, **{f'key{i}': 1.0 for i in range(12)}})
# Written in this thread: tensorboardX's writer thread had died of a
# failed timed flush unseen, and its full queue then blocked the run.
assert threading.active_count() == threads, threading.enumerate()
sys.disk_full = True
for step in (1, 2, 3):
  w.write(step, {'loss': 1.0 / step})
w.write(3, {'loss': 0.5}, replace=True)  # reopens TensorBoard only if on
w.close()
'''


def test_a_tensorboard_that_cannot_write_is_turned_off_in_one_line(tmp_path):
  """TensorBoard is optional: a write it cannot make (a full disk) had
  ended the run, and tensorboardX's exit hook then printed tracebacks (about
  45 lines after the one-line error); one its writer thread met (its timed
  flush) killed the thread unseen, and the run then blocked for good on its
  full queue. Now one line, and metrics.csv goes on."""
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, '-c', _TB_FULL_DISK, str(tmp_path)], text=True,
      capture_output=True, timeout=300,
      env=xla_flags.script_env())
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.splitlines() == [
      f'[train] {tmp_path}/tensorboard/: cannot write (No space left on '
      'device); TensorBoard logging is off for the rest of this run '
      '(metrics.csv has every row).'], proc.stderr
  with open(tmp_path / metrics_lib.CSV_NAME) as f:
    assert [(r['step'], r['loss']) for r in csv.DictReader(f)] == [
        ('0', '2.0'), ('1', '1.0'), ('2', '0.5'), ('3', '0.5')]


def test_metrics_writer_starts_a_fresh_run_over(tmp_path):
  """A fresh run (last_step -1) in a folder with an old metrics file keeps
  none of it: its old headers had stayed, and the new rows went under the
  previous run's last one."""
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False)
  w.write(0, {'loss': 2.0})
  w.write(2, {'loss': 1.0, 'eval_acc': 0.5})  # a key first seen later
  w.close()
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                                last_step=-1)
  assert w.kept == []
  w.write(0, {'loss': 3.0})
  w.close()
  assert (tmp_path / metrics_lib.CSV_NAME).read_text().splitlines() == [
      'step,loss', '0,3.0']
  # A key first seen later widens the one header (a second header block
  # had made pandas.read_csv raise 'Expected 2 fields in line 3, saw 3').
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                                last_step=0)
  w.write(1, {'loss': 2.5, 'eval_acc': 0.25})
  w.write(2, {'loss': 2.0, 'grad_norm': 1.5})
  w.close()
  assert (tmp_path / metrics_lib.CSV_NAME).read_text().splitlines() == [
      'step,loss,eval_acc,grad_norm', '0,3.0,,', '1,2.5,0.25,', '2,2.0,,1.5']

  def resumed(old_file, last_step, *logged):
    """An earlier run's file, resumed at ``last_step``, then ``logged``:
    the writer's kept rows and the file's lines."""
    (tmp_path / metrics_lib.CSV_NAME).write_text(old_file)
    w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                                  last_step=last_step)
    for step, row in enumerate(logged, start=last_step + 1):
      w.write(step, row)
    w.close()
    return w.kept, (tmp_path / metrics_lib.CSV_NAME).read_text().splitlines()

  # A file of an earlier run with two header blocks still resumes, and
  # becomes one block at its first new key.
  assert resumed('step,loss\r\n0,3.0\r\nstep,loss,eval_acc\r\n1,2.5,0.25\r\n',
                 1, {'loss': 2.0, 'lr': 0.1}) == (
      [{'step': 0, 'loss': 3.0}, {'step': 1, 'loss': 2.5, 'eval_acc': 0.25}],
      ['step,loss,eval_acc,lr', '0,3.0,,', '1,2.5,0.25,', '2,2.0,,0.1'])
  # Blocks whose keys the last one lacks (each old block held only its
  # first row's keys): every key is kept (it had raised 'dict contains
  # fields not in fieldnames', at every resume).
  assert resumed('step,loss,lr\r\n1,2.0,0.1\r\nstep,acc\r\n2,0.3\r\n', 2,
                 {'acc': 0.4, 'em': 1.0}, {'loss': 1.0})[1] == [
      'step,acc,em,loss,lr', '1,,,2.0,0.1', '2,0.3,,,', '3,0.4,1.0,,',
      '4,,,1.0,']


def test_a_widening_that_fails_keeps_the_file_and_the_writer(tmp_path,
                                                              monkeypatch):
  """A full disk while the CSV is rewritten under a new key: one line naming
  the file, the file as it was, and the writer still writing (its handle
  had been left closed)."""
  from models import hf_io  # pylint: disable=g-import-not-at-top
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, tensorboard=False)
  w.write(0, {'loss': 2.0})
  path = tmp_path / metrics_lib.CSV_NAME

  def full(target, text):
    raise OSError(f'{target}: cannot write (No space left on device); the '
                  'file there before, if any, is kept.')

  monkeypatch.setattr(hf_io, 'write_text', full)
  with pytest.raises(OSError, match=rf'^{path}: cannot write'):
    w.write(1, {'loss': 1.0, 'acc': 0.5})
  monkeypatch.undo()
  assert path.read_text().splitlines() == ['step,loss', '0,2.0']
  w.write(1, {'loss': 1.0})
  w.close()
  assert path.read_text().splitlines() == ['step,loss', '0,2.0', '1,1.0']


def test_a_resume_removes_the_stopped_runs_later_events_from_tensorboard(
    tmp_path, capsys):
  """TensorBoard's default fast loader ignores purge_step: a tag the resumed
  run logged later (tokens/s, not logged at a resume's first step) had kept
  the stopped run's point there. The old files are rewritten without the
  events logged after the checkpoint; a file left with none is removed."""
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  tb = tmp_path / metrics_lib.TB_DIR
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True)
  for step in range(10):
    w.write(step, {'loss': float(step), 'tok_s': 1000.0 + step})
  w.close()
  (first,) = os.listdir(tb)
  # A killed writer's record cut short in its payload: no reader reads it.
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  head = struct.pack('<Q', 64)
  with open(tb / first, 'ab') as f:
    f.write(head + struct.pack('<I', record_writer.masked_crc32c(head)) +
            b'\x00' * 10)
  # In the same second as the first writer, by tensorboardX's clock (its
  # file name's): the second had emptied the first's file ('wb'). Both
  # clocks are pinned just after the first's: with only time.time pinned,
  # a real second boundary passed since the first writer put the new
  # file's nanoseconds (its name's suffix) before the first's, and the
  # name order the test reads in flipped (1 CI run in about 10).
  import time  # pylint: disable=g-import-not-at-top
  second = int((tb / first).name.split('.')[3])
  nanos = int(first.rsplit('.', 1)[1]) + 1000
  assert nanos < 10**9  # the writer names no file in a second's last 10 ms
  with pytest.MonkeyPatch.context() as m:
    m.setattr(time, 'time', lambda: second + nanos / 1e9)
    m.setattr(time, 'time_ns', lambda: second * 10**9 + nanos)
    w = metrics_lib.MetricsWriter(tmp_path, enabled=True, last_step=5)
    w.write(6, {'loss': 106.0})
    w.write(7, {'loss': 107.0, 'tok_s': 2007.0})
    w.close()
  # The rewritten file keeps its purge (0) and checksums; the new one
  # tells the slow loader to drop from step 6 too.
  assert _tensorboard_purges(tb) == [0, 6]
  points = _tensorboard_points(tb)
  assert points['loss'] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                            (5, 5.0), (6, 106.0), (7, 107.0)]
  assert points['tok_s'] == [(0, 1000.0), (1, 1001.0), (2, 1002.0),
                             (3, 1003.0), (4, 1004.0), (5, 1005.0),
                             (7, 2007.0)]
  assert capsys.readouterr().err == ''
  # A fresh run (last_step -1) keeps no old point, and no file of them.
  metrics_lib.MetricsWriter(tmp_path, enabled=True).close()
  assert _tensorboard_points(tb) == {}
  assert len(os.listdir(tb)) == 1  # the new run's own


def test_a_damaged_event_file_is_left_as_it_is_in_one_line(tmp_path, capsys):
  """A record whose length fails its checksum is damage, not a cut: the
  file is kept whole, the run goes on, and purge_step still hides the
  events from TensorBoard's slow loader."""
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  tb = tmp_path / metrics_lib.TB_DIR
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True)
  w.write(0, {'loss': 1.0})
  w.write(1, {'loss': 0.5})
  w.close()
  (name,) = os.listdir(tb)
  damaged = bytearray((tb / name).read_bytes())
  second = 8 + 4 + int.from_bytes(damaged[:8], 'little') + 4
  damaged[second] ^= 1  # the second record's length
  damaged = bytes(damaged)
  (tb / name).write_bytes(damaged)
  # A valid file after it still loses its events from step 1 on (the
  # damaged one had stopped the rewrite of every file after it).
  other = tmp_path / 'other'
  w = metrics_lib.MetricsWriter(other, enabled=True)
  w.write(0, {'acc': 1.0})
  w.write(1, {'acc': 0.5})
  w.close()
  (made,) = os.listdir(other / metrics_lib.TB_DIR)
  os.replace(other / metrics_lib.TB_DIR / made, tb / (name + 'z'))
  w = metrics_lib.MetricsWriter(tmp_path, enabled=True, last_step=0)
  w.write(1, {'loss': 0.25})
  w.close()
  assert (tb / name).read_bytes() == damaged
  (tb / name).unlink()  # unreadable here too
  # The new file's purge event still hides step 1 on from the slow loader.
  assert _tensorboard_purges(tb) == [0, 1]
  assert _tensorboard_points(tb)['acc'] == [(0, 1.0)]
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f'[train] warning: {tb / name}: damaged record at '
                         f'byte {second};'), line
  assert line.endswith("TensorBoard's fast loader may show its events from "
                       'step 1 on, which this run logs again (`tensorboard '
                       '--load_fast=false` hides them).'), line


def test_a_random_base_and_the_lora_init_draw_independent_numbers():
  """A random base (no model.path) drew from nnx.Rngs(seed), the stream the
  LoRA init then drew from again: each lora_a came out nearly a copy of a
  prefix of some base kernel (|corr| 0.98-0.99)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import lora  # pylint: disable=g-import-not-at-top
  from train.data import ByteTokenizer  # pylint: disable=g-import-not-at-top
  cfg = configs.get_config('tiny')
  model = loop.load_model(cfg.model, '', cfg.seed, ByteTokenizer().vocab_size)
  base = [np.asarray(v[...]).ravel() for _, v in
          nnx.to_flat_state(nnx.state(model, nnx.Param))]
  loop._apply_lora(model, cfg)  # pylint: disable=protected-access
  for a in jax.tree.leaves(lora.lora_params(model)):
    a = np.asarray(a).ravel()
    if not a.std():
      continue  # lora_b = 0
    worst = max(abs(np.corrcoef(a, w[:a.size])[0, 1]) for w in base
                if w.size >= a.size and w[:a.size].std())
    assert worst < 0.5, worst


def test_non_finite_metrics_stay_out_of_tensorboard(tmp_path):
  """A NaN or inf loss is a CSV cell ('nan'), not a TensorBoard point
  (which would spoil the plot's scale)."""
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  w = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
  w.write(1, {'loss': float('nan'), 'acc': 0.5})
  w.write(2, {'loss': float('inf')})
  w.close()
  assert _tensorboard_points(tmp_path / metrics_lib.TB_DIR) == {
      'acc': [(1, 0.5)]}
  assert 'nan' in (tmp_path / 'metrics.csv').read_text()


def test_a_resume_drops_a_row_shorter_than_its_header(tmp_path):
  """A row cut short (fewer cells than the header) is damaged, even at a
  step the checkpoint covers: left out, not kept with a missing value."""
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  (tmp_path / 'metrics.csv').write_text(
      'step,loss,acc\r\n1,2.0,0.5\r\n2,1.5\r\n')
  w = metrics_lib.MetricsWriter(str(tmp_path), enabled=True,
                                tensorboard=False, last_step=5)
  w.close()
  assert w.kept == [{'step': 1, 'loss': 2.0, 'acc': 0.5}]
  assert '2,1.5' not in (tmp_path / 'metrics.csv').read_text()


def test_opt_state_shardings_need_the_parameters_shape_and_longest_path():
  """A state leaf under a parameter's path with another shape (an r x r
  statistic) is replicated; where two parameter paths end a state path,
  the longer decides."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top
  from train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
              ('data', 'fsdp', 'tensor'))
  params = {'lora_a': jnp.zeros((8, 2)),
            'q': {'lora_a': jnp.zeros((8, 2))}}
  sh = {'lora_a': NamedSharding(mesh, P('tensor')),
        'q': {'lora_a': NamedSharding(mesh, P('fsdp'))}}
  state = {'mu': jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape,
                                                             x.dtype), params),
           'stats': {'q': {'lora_a': jax.ShapeDtypeStruct((2, 2),
                                                          jnp.float32)}}}
  out = sharding_lib.opt_state_shardings(state, params, sh, mesh)
  assert out['mu']['q']['lora_a'].spec == P('fsdp')
  assert out['mu']['lora_a'].spec == P('tensor')
  assert out['stats']['q']['lora_a'].spec == P()


def test_tree_keys_are_strings_for_orbax_and_path_names_are_plain():
  """Layer indices become strings (checkpoints, and the leaf order the
  optimizer state follows: '10' sorts before '2'), and back; a key path's
  sequence indices and attribute names are plain names too."""
  import collections  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from train import trees  # pylint: disable=g-import-not-at-top
  tree = {'layers': {0: {'w': 1}, 10: {'w': 2}, 2: {'w': 3}}, 'name': 'x'}
  keyed = trees.str_keys(tree)
  assert keyed == {'layers': {'0': {'w': 1}, '10': {'w': 2}, '2': {'w': 3}},
                   'name': 'x'}
  assert all(isinstance(k, str) for k in keyed['layers'])
  assert trees.int_keys(keyed) == tree
  State = collections.namedtuple('State', 'mu')  # pylint: disable=invalid-name
  paths = [trees.path_names(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(({'q': 1}, State(mu=[2])))]
  assert paths == [('0', 'q'), ('1', 'mu', '0')]


def test_shampoo_blocks_shard_only_along_a_factors_one_split_axis():
  """Blocks shard as their factor when the factor is split along one axis
  that the blocks cut exactly, in a count the mesh axis divides; a factor
  split along two axes, with a ragged last block or too few blocks keeps
  its statistics replicated. An abstract mesh: no devices needed."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import AbstractMesh, NamedSharding  # pylint: disable=g-import-not-at-top
  import lora_rite_optax as lro  # pylint: disable=g-import-not-at-top
  from train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  mesh = AbstractMesh((1, 4, 2), ('data', 'fsdp', 'tensor'))
  n = lambda *spec: NamedSharding(mesh, P(*spec))
  rows = {'a': 64, 'b': 64, 'c': 48, 'd': 56}  # blocks of 16: 4, 4, 3, 4
  a_spec = {'a': n('fsdp'), 'b': n('fsdp', 'tensor'), 'c': n('fsdp'),
            'd': n('fsdp')}
  params = {k: {'lora_a': jnp.zeros((r, 4)), 'lora_b': jnp.zeros((4, 8))}
            for k, r in rows.items()}
  sh = {k: {'lora_a': a_spec[k], 'lora_b': n()} for k in rows}
  tx = lro.shampoo(1e-3, block_size=16)
  is_shampoo = lambda x: isinstance(x, lro.ShampooState)
  out = sharding_lib.opt_state_shardings(jax.eval_shape(tx.init, params),
                                         params, sh, mesh)
  (state,) = [x for x in jax.tree.leaves(out, is_leaf=is_shampoo)
              if is_shampoo(x)]
  # Leaves in order: a/lora_a, a/lora_b, b/lora_a, ... d/lora_b.
  for field in (state.stats, state.roots):
    assert [s.left.spec for s in field[0::2]] == [P('fsdp'), P(), P(), P()]
    assert [s.right.spec for s in field[0::2]] == [P('fsdp'), P(), P(), P()]
    assert all(s.left.spec == P() for s in field[1::2])

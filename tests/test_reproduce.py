"""Smoke tests of benchmarks/reproduce.py: a tiny end-to-end run, and the
statistics and report on hand-made result files."""

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest

from tests import benchmark_scripts
from tests import shared_data


@pytest.fixture(scope='module')
def rp():
  return benchmark_scripts.load('reproduce')


def _fake_run(task, opt, lr, seed, correct, loss, val):
  hist = [{'loss': 1.0 - 0.1 * i, 'update_ratio_a': 0.1 * (i + 1),
           'update_ratio_b': 0.01 * (i + 1)} for i in range(4)]
  return {'task': task, 'optimizer': opt, 'lr': lr, 'seed': seed,
          'val_loss': [val, val], 'history': hist,
          'tests': {task: {'correct': correct, 'loss': loss,
                           'prediction': [0] * len(correct)}}}


def test_run_files_that_do_not_fit_together(rp):
  """A rate's run lacking a test set shows '-' in the by-rate table (a
  KeyError before); runs of unequal lengths are one line naming them (a
  numpy 'inhomogeneous shape' traceback before)."""
  budget = dataclasses.replace(rp.BUDGETS['smoke'], lrs=(1e-4, 1e-3))
  results = {}
  for opt in ('lora_rite', 'adam'):
    for seed in (0, 1):
      results[('arithmetic', opt, 1e-3, seed)] = _fake_run(
          'arithmetic', opt, 1e-3, seed, [1, 0, 1, 0], [0.5] * 4, 0.4)
  other = _fake_run('arithmetic', 'adam', 1e-4, 0, [1, 1, 1, 1], [0.1] * 4,
                    0.9)
  other['tests'] = {'renamed': other['tests']['arithmetic']}
  results[('arithmetic', 'adam', 1e-4, 0)] = other
  t = rp.summarize(results, 'smoke', budget)['tasks']['arithmetic']
  assert 'arithmetic' not in t['by_rate']['adam'][1e-4]
  md = rp.markdown(rp.summarize(results, 'smoke', budget), budget, 'cmd')
  assert '| adam | 0 | 0.0001 | 0.9000 | - | - |' in md
  results[('arithmetic', 'adam', 1e-3, 1)]['tests']['arithmetic']['loss'] = (
      [0.5] * 3)
  with pytest.raises(rp.loop.ConfigError, match=r'arithmetic/arithmetic: the '
                     r'adam runs hold \[3, 4\] test items'):
    rp.summarize(results, 'smoke', budget)


def test_shared_base_is_scoped_and_each_run_gets_its_own_variables(rp):
  """The once-per-process base model is installed by main only (importing
  the script left the loop's loader in place), and a run that rewrites a
  base kernel (PiSSA, LoRA-GA) leaves the next run's base as drawn."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from train import configs  # pylint: disable=g-import-not-at-top
  from train import loop  # pylint: disable=g-import-not-at-top
  original = loop.load_model
  assert original is rp._orig_load_model  # pylint: disable=protected-access
  mcfg = configs.get_config('tiny').model
  with rp.shared_base():
    first = loop.load_model(mcfg, '', 0, 259)
    kernel = first.layers[0].attn.q.kernel
    drawn = np.array(kernel[...])  # a copy: a view would hold the array
    kernel.set_value(jnp.zeros_like(kernel[...]))
    second = loop.load_model(mcfg, '', 0, 259)
    np.testing.assert_array_equal(
        np.asarray(second.layers[0].attn.q.kernel[...]), drawn)
    import gc  # pylint: disable=g-import-not-at-top
    import weakref  # pylint: disable=g-import-not-at-top
    cached = weakref.ref(second.layers[0].attn.q.kernel[...])
  assert loop.load_model is original
  # The cached base goes with the call (it had outlived it: 1.1 GB for
  # demo's dequantised model).
  del first, second, kernel
  gc.collect()
  assert cached() is None


def test_stats_and_report_on_fake_results(rp, tmp_path):
  out = str(tmp_path)
  rite = [1, 1, 1, 1, 0, 1, 1, 0]
  adam = [0, 0, 0, 1, 0, 1, 0, 0]
  for seed in (0, 1):
    rp.write_atomic(rp.run_path(out, 'smoke', 'arithmetic', 'lora_rite', 1e-3,
                                seed),
                    _fake_run('arithmetic', 'lora_rite', 1e-3, seed, rite,
                              [0.5] * 8, 0.4))
    rp.write_atomic(rp.run_path(out, 'smoke', 'arithmetic', 'adam', 1e-3,
                                seed),
                    _fake_run('arithmetic', 'adam', 1e-3, seed, adam,
                              [0.7] * 8, 0.6))
  # A worse learning rate for adam: must not be chosen.
  rp.write_atomic(rp.run_path(out, 'smoke', 'arithmetic', 'adam', 1e-4, 0),
                  _fake_run('arithmetic', 'adam', 1e-4, 0, rite, [0.1] * 8,
                            0.9))
  budget = dataclasses.replace(rp.BUDGETS['smoke'], lrs=(1e-4, 1e-3))
  results = rp.load_results(out, 'smoke')
  assert len(results) == 5
  s = rp.summarize(results, 'smoke', budget)
  t = s['tasks']['arithmetic']
  assert t['chosen']['adam']['lr'] == 1e-3  # By validation loss only.
  assert t['chosen']['lora_rite']['sweep_complete'] is False
  # Adam's best (1e-3) is the highest rate it tried; LoRA-RITE tried one.
  assert t['chosen']['adam']['bracketed'] == 'high edge'
  assert t['chosen']['lora_rite']['bracketed'] == 'one rate'
  row = t['tests']['arithmetic']['adam']
  v = row['vs_lora_rite']
  assert (v['mcnemar_rite_only'], v['mcnemar_other_only']) == (8, 0)
  assert v['mcnemar_p'] == pytest.approx(2 / 2**8)
  # Item level: 4 items where only LoRA-RITE is right (on both seeds), so a
  # resample misses all of them with probability 2^-8.
  assert v['acc_diff'] == pytest.approx(-0.5)
  assert v['acc_diff_ci'][1] <= 0 and 0.002 < v['acc_diff_p'] < 0.02
  assert v['loss_diff'] == pytest.approx(0.2)
  assert v['items_rite_lower_loss'] == 8
  assert row['n'] == 8 and row['seeds'] == [0, 1]
  assert row['accuracy'] == pytest.approx(np.mean(adam))
  # Every seed-0 rate with its test metrics, whichever was chosen: Adam's
  # unchosen 1e-4 was the better one on test.
  r = t['by_rate']['adam']
  assert sorted(r) == [1e-4, 1e-3]
  assert r[1e-4]['val_loss'] == pytest.approx(0.9)
  assert r[1e-4]['arithmetic']['accuracy'] == pytest.approx(np.mean(rite))
  assert r[1e-3]['arithmetic'] == pytest.approx(
      {'loss': 0.7, 'accuracy': np.mean(adam)})
  assert sorted(t['by_rate']['lora_rite']) == [1e-3]

  class Args:
    budget = 'smoke'
  Args.out = out
  rp.report(Args, budget, 'cmd', lambda s: None)
  for name in ('results_smoke.md', 'summary_smoke.json',
               'loss_curves_smoke_arithmetic.png',
               'update_imbalance_smoke_arithmetic.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  md = open(os.path.join(out, 'results_smoke.md')).read()
  assert '| adam | 8 x 2 |' in md and 'p=0.0078' in md
  # Each seed's difference, both of the mean's sign, the t-test over
  # seeds (equal seeds: 0), the items-only p.
  assert '| +0.2000, +0.2000 (2 of 2; t-test p 0); items p 0.0078 |' in md
  assert '| -50.0, -50.0 (2 of 2; t-test p 0); items p 0.0' in md
  assert '| adam | 0.001 (0.0001: 0.9000, 0.001: 0.6000) | high edge | yes |' in md
  assert '| adam | 0 | 0.0001 | 0.9000 | 75.0% | 0.1000 |' in md
  assert '| adam | 0 | 0.001 (chosen) | 0.6000 | 25.0% | 0.7000 |' in md
  json.load(open(os.path.join(out, 'summary_smoke.json')))

  # The one-table summary reads the same file: means at the chosen rate,
  # the item-level p against LoRA-RITE, '-' for optimizers not run.
  st = benchmark_scripts.load('summary_table')
  lines = st.table(out, rows=[('smoke', 'arithmetic', 'arithmetic', 'arith')],
                   seeds=2).splitlines()
  # acc_diff_p is in (0.002, 0.02) (above), printed to two digits.
  assert re.fullmatch(r'\| arith \| exact match \| 75\.0% \| 25\.0% '
                      r'\(p 0\.0\d+, 2/2; t-test p 0\) \| - \| - \| - \| - \|',
                      lines[2]), lines[2]
  # Every one of the 8 items favours LoRA-RITE: p = 2 / 2**8, no smaller.
  assert lines[3] == ('| arith | loss/token | 0.500 | 0.700 (p 0.0078, 2/2; '
                      't-test p 0) | - | - | - | - |')
  assert '[2 seeds]' in st.table(
      out, rows=[('smoke', 'arithmetic', 'arithmetic', 'arith')], seeds=3)
  with pytest.raises(FileNotFoundError, match='summary_nope.json'):
    st.table(out, rows=[('nope', 'arithmetic', 'arithmetic', 'x')])
  with pytest.raises(KeyError, match="no test set 'gsm8k'"):
    st.table(out, rows=[('smoke', 'arithmetic', 'gsm8k', 'x')])
  # A label's item count is the one the rows were scored on (the labels
  # had written 200 whatever the budget sampled); rows of unequal counts
  # are refused.
  assert st.table(out, rows=[('smoke', 'arithmetic', 'arithmetic',
                              'arith ({n} items)')]).splitlines()[2].startswith(
                                  '| arith (8 items) | exact match |')
  path = os.path.join(out, 'summary_smoke.json')
  summary = json.load(open(path))
  summary['tasks']['arithmetic']['tests']['arithmetic']['adam']['n'] = 7
  json.dump(summary, open(path, 'w'))
  with pytest.raises(ValueError, match=r'^summary_smoke.json: the arithmetic '
                     r'arithmetic rows were scored on \[7, 8\] test items'):
    st.table(out, rows=[('smoke', 'arithmetic', 'arithmetic', '({n})')])


def test_bracketed_says_where_the_best_rate_sits(rp):
  assert rp.bracketed(1e-3, [1e-4, 1e-3, 1e-2]) == 'yes'
  assert rp.bracketed(1e-4, [1e-4, 1e-3, 1e-2]) == 'low edge'
  assert rp.bracketed(1e-2, [1e-4, 1e-3, 1e-2]) == 'high edge'
  assert rp.bracketed(1e-3, [1e-3]) == 'one rate'
  assert rp.bracketed(None, []) == 'one rate'
  # A higher rate that diverged (no finite validation loss, so never the
  # best) still brackets the best from above.
  results = {('t', 'o', lr, 0): {'val_loss': [v]} for lr, v in
             ((1e-4, 0.9), (1e-3, 0.5), (1e-2, float('nan')))}
  lr, _ = rp.best_lr(results, 't', 'o', [1e-4, 1e-3, 1e-2], 0)
  assert lr == 1e-3
  assert rp.bracketed(lr, [1e-4, 1e-3, 1e-2]) == 'yes'
  # Wherever the diverged rate comes in the list (min() keeps a NaN it
  # starts from: every comparison with it is False).
  results[('t', 'o', 1e-5, 0)] = {'val_loss': [float('nan')]}
  assert rp.best_lr(results, 't', 'o', [1e-5, 1e-4, 1e-3, 1e-2], 0)[0] == 1e-3
  # Every rate diverged: the smallest, in any order (the first listed had
  # been taken), with every loss still reported.
  gone = {('t', 'o', lr, 0): {'val_loss': [float('nan')]}
          for lr in (1e-4, 1e-3, 1e-2)}
  lr, val = rp.best_lr(gone, 't', 'o', [1e-3, 1e-2, 1e-4], 0)
  assert lr == 1e-4 and sorted(val) == [1e-4, 1e-3, 1e-2]
  assert rp.best_lr({}, 't', 'o', [1e-3], 0) == (None, {})


def test_paired_bootstrap(rp):
  mean, (lo, hi), p = rp.paired_bootstrap(np.full(50, 0.1) +
                                          np.linspace(-0.01, 0.01, 50))
  assert mean == pytest.approx(0.1) and lo > 0 and p < 0.01
  _, (lo, hi), p = rp.paired_bootstrap(np.linspace(-1, 1, 51))
  assert lo < 0 < hi and p > 0.5
  # Seed-averaged correctness differences are k/3: a resample whose mean is
  # 0 is a tie in both tails, the same p as the integer differences give
  # (rounding had left such means at +-1e-17, in one tail only).
  d = np.random.default_rng(1).integers(-3, 4, 148) / 3
  assert rp.paired_bootstrap(d)[2] == rp.paired_bootstrap(d * 3)[2]
  # A diverged run's NaN loss gives no p-value.
  assert np.isnan(rp.paired_bootstrap([0.1, np.nan, -0.2])[2])
  # n items cannot show more than a sign-flip test of them (2 / 2**n): one
  # item, or two, had given p = 1e-4 ('p <2e-4' in the tables).
  assert rp.paired_bootstrap([0.3])[2] == 1.0
  assert rp.paired_bootstrap([1.0, 1.0])[2] == 0.5
  assert rp.paired_bootstrap(np.full(20, 0.1))[2] == 1e-4
  with pytest.raises(ValueError, match=r'non-empty vector of paired '
                     r'differences, got shape \(0,\)'):
    rp.paired_bootstrap([])


def test_seed_item_bootstrap_counts_the_seeds_spread(rp):
  # Two seeds favour LoRA-RITE, the third reverses: over items alone the
  # seed-averaged difference looks certain; over seeds and items it is not.
  rng = np.random.default_rng(0)
  d = np.stack([m + 0.3 * rng.standard_normal(200)
                for m in (0.07, 0.19, -0.02)])
  assert rp.paired_bootstrap(d.mean(axis=0))[2] < 1e-3
  mean, (lo, hi), p = rp.seed_item_bootstrap(d)
  assert mean == pytest.approx(d.mean()) and lo < 0 < hi and p > 0.05
  assert rp.seed_signs(d) == (2, 0)
  # The interval is that of resampling seeds and items by brute force.
  r = np.random.default_rng(1)
  brute = [d[r.integers(0, 3, 3)][:, r.integers(0, 200, 200)].mean()
           for _ in range(3000)]
  np.testing.assert_allclose((lo, hi), np.quantile(brute, [0.025, 0.975]),
                             atol=0.012)
  # Seeds that agree keep a small p; one seed is the items-only bootstrap.
  same = np.stack([0.1 + 0.3 * rng.standard_normal(200) for _ in range(3)])
  assert rp.seed_item_bootstrap(same)[2] < 1e-3
  assert rp.seed_signs(same) == (3, 0)
  # Seeds that cancel (-0.5, +3, -2.5 points of 200 items) have no sign,
  # whatever rounding leaves of their mean.
  cancel = np.zeros((3, 200))
  cancel[0, :1], cancel[1, :6], cancel[2, :5] = -1, 1, -1
  assert rp.seed_signs(cancel) == (0, 0)
  assert rp.seed_signs([[0.2, 0.0], [0.0, 0.0], [0.1, 0.1]]) == (2, 1)
  assert rp.seed_signs([[0.2, np.nan], [0.1, 0.1]]) is None
  assert rp.seed_item_bootstrap(d[:1]) == rp.paired_bootstrap(d[0])
  assert np.isnan(rp.seed_item_bootstrap([[0.1, np.nan], [0.1, 0.2]])[2])
  with pytest.raises(ValueError, match=r'seeds x items matrix .* \(3,\)'):
    rp.seed_item_bootstrap([0.1, 0.2, 0.3])


def test_seed_t_test_is_students(rp):
  scipy_stats = pytest.importorskip('scipy.stats')
  for dof in range(1, 8):
    for t in (0.0, 0.4, 1.7, 4.0, -9.0):
      assert rp.student_t_two_sided(t, dof) == pytest.approx(
          2 * scipy_stats.t.sf(abs(t), dof), abs=1e-12)
  # Arithmetic's exact match against Adam: -13, -26 and -3 points.
  d = np.array([[-0.13], [-0.26], [-0.03]])
  assert rp.seed_t_test(d) == pytest.approx(
      scipy_stats.ttest_1samp([-13, -26, -3], 0).pvalue)
  assert np.isnan(rp.seed_t_test(d[:1]))
  assert np.isnan(rp.student_t_two_sided(float('nan'), 2))
  assert np.isnan(rp.seed_t_test([[0.1], [np.nan]]))
  assert rp.seed_t_test([[0.1, 0.3], [0.2, 0.2]]) == 0.0  # no spread
  assert rp.seed_t_test([[0.0], [0.0]]) == 1.0


def test_summarize_counts_a_seed_that_reverses_the_difference(rp, tmp_path):
  # Two seeds where LoRA-RITE is right on 60 more items of 200 than Adam,
  # one where Adam is right on 30 more: over items alone the averaged
  # difference looks certain; with the seeds counted it is not.
  out = str(tmp_path)
  n = 200
  for seed, (rite_right, adam_right) in enumerate(((80, 20), (80, 20),
                                                   (20, 50))):
    for opt, k in (('lora_rite', rite_right), ('adam', adam_right)):
      correct = [1] * k + [0] * (n - k)
      if opt == 'adam':  # Adam's right items are others than RITE's.
        correct = correct[::-1]
      rp.write_atomic(
          rp.run_path(out, 'smoke', 'arithmetic', opt, 1e-3, seed),
          _fake_run('arithmetic', opt, 1e-3, seed, correct,
                    [0.5 + 0.01 * seed] * n, 0.5))
  budget = dataclasses.replace(rp.BUDGETS['smoke'], lrs=(1e-3,),
                               seeds=(0, 1, 2))
  s = rp.summarize(rp.load_results(out, 'smoke'), 'smoke', budget)
  v = s['tasks']['arithmetic']['tests']['arithmetic']['adam']['vs_lora_rite']
  assert v['acc_diff'] == pytest.approx(-0.15)
  assert v['acc_diff_p_items'] < 1e-3
  assert v['acc_diff_p'] > 0.05 and v['acc_diff_ci'][0] < 0 < v['acc_diff_ci'][1]
  assert v['acc_diff_per_seed'] == pytest.approx([-0.3, -0.3, 0.15])
  assert (v['acc_diff_seeds_agreeing'], v['acc_diff_seeds_at_zero']) == (2, 0)
  assert v['acc_diff_p_seeds_t'] > 0.3
  md = rp.markdown(s, budget, 'cmd')
  assert (f'| -15.0 [{100 * v["acc_diff_ci"][0]:+.1f}, '
          f'{100 * v["acc_diff_ci"][1]:+.1f}], p={rp._fmt_p(v["acc_diff_p"])} '
          '| -30.0, -30.0, +15.0 (2 of 3; t-test p 0.42); items p 1e-04 |') in md


def test_summary_table_refuses_a_summary_with_items_only_p(rp, tmp_path):
  # A summary written before the p counted the seeds: its p is the
  # items-only one, which the table must not print under the new label.
  summary = {'budget': 'small', 'tasks': {'arithmetic': {'tests': {
      'arithmetic': {
          'lora_rite': {'seeds': [0, 1, 2], 'loss': 0.7},
          'adam': {'seeds': [0, 1, 2], 'loss': 0.8, 'vs_lora_rite': {
              'loss_diff': 0.1, 'loss_diff_p': 8e-4}}}}}}}
  (tmp_path / 'summary_small.json').write_text(json.dumps(summary))
  st = benchmark_scripts.load('summary_table')
  with pytest.raises(ValueError, match=r'^summary_small.json was written '
                     r'before its p-values counted the seeds .*--report_only '
                     r"for budget 'small'\.$"):
    st.table(str(tmp_path), rows=[('small', 'arithmetic', 'arithmetic', 'a')])


def _record_runs(rp, monkeypatch, describe=None, val_loss=None) -> list:
  """Replaces training and the report: each run appends
  describe(args, budget, task, data, opt, lr, seed) to the returned list
  (default: budget name, its task budget, its test-set names) and reports
  validation loss val_loss(lr) (default 1.0)."""
  seen = []

  def fake_run(args, budget, task, data, opt, lr, seed, log):
    if describe is None:
      seen.append((args.budget, budget.tasks[task], sorted(data['tests'])))
    else:
      seen.append(describe(args, budget, task, data, opt, lr, seed))
    return {'val_loss': [1.0 if val_loss is None else val_loss(lr)]}

  monkeypatch.setattr(rp, 'do_run', fake_run)
  monkeypatch.setattr(rp, 'report', lambda *a: None)
  return seen


def test_more_seeds_go_to_the_best_rate_on_file(rp, tmp_path, monkeypatch):
  """A later call with one more rate picks among every seed-0 rate of the
  budget: a rate that loses to an earlier one gets no extra seeds."""
  out = str(tmp_path)
  for lr, val in ((2e-4, 0.5), (1e-3, 0.9)):
    rp.write_atomic(rp.run_path(out, 'smoke', 'arithmetic', 'adam', lr, 0),
                    {**_fake_run('arithmetic', 'adam', lr, 0, [1] * 8,
                                 [0.1] * 8, val), 'budget': 'smoke'})
  seen = _record_runs(rp, monkeypatch, describe=lambda *a: (a[5], a[6]),
                      val_loss=lambda lr: 0.7)
  rp.main(['--budget', 'smoke', '--tasks', 'arithmetic', '--optimizers',
           'adam', '--lrs', '5e-5', '--seeds', '0', '1', '--out', out])
  assert seen == [(5e-5, 0), (2e-4, 1)]


def test_compile_cache_only_from_the_command_line(rp, tmp_path, monkeypatch):
  """JAX sets its persistent cache up once per process, for good: main()
  called with argv (tests, notebooks) leaves it off unless asked; the
  command line defaults to ~/.cache."""
  import sys  # pylint: disable=g-import-not-at-top
  updates = []
  monkeypatch.setattr(rp.jax.config, 'update',
                      lambda name, value: updates.append((name, value)))
  _record_runs(rp, monkeypatch)
  argv = ['--budget', 'smoke', '--tasks', 'arithmetic', '--optimizers',
          'adam', '--seeds', '0', '--out', str(tmp_path)]
  rp.main(argv)
  assert not updates
  rp.main(argv + ['--compile_cache', str(tmp_path / 'c')])
  assert ('jax_compilation_cache_dir', str(tmp_path / 'c')) in updates
  updates.clear()
  monkeypatch.setattr(sys, 'argv', ['reproduce.py'] + argv)
  rp.main()
  cache = dict(updates)['jax_compilation_cache_dir']
  assert cache.endswith(os.path.join('.cache', 'lora-rite-optax',
                                     'jax-cache'))
  updates.clear()
  monkeypatch.setattr(sys, 'argv', ['reproduce.py'] + argv +
                      ['--compile_cache', ''])
  rp.main()
  # None at all: JAX_COMPILATION_CACHE_DIR (set for this test run) had
  # stayed on.
  assert updates == [('jax_enable_compilation_cache', False)]
  updates.clear()
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  rp.main(argv + ['--compile_cache', str(tmp_path / 'c')])
  assert updates == [('jax_compilation_cache_dir', str(tmp_path / 'c'))]


def test_resume_reuses_only_runs_of_the_same_model_data_and_settings(
    rp, tmp_path, monkeypatch):
  from train.data import Example  # pylint: disable=g-import-not-at-top
  data = {'train': [Example('a', 'b')], 'val': [Example('c', 'd')],
          'tests': {'arithmetic': [Example('e', 'f')]}}
  fp = rp.data_fingerprint(data)
  budget = rp.BUDGETS['smoke']
  cfg = json.loads(rp.configs.to_json(rp.make_config(
      budget, 'arithmetic', 'adam', 1e-3, 0, 'tiny')))
  assert rp.stale({'model': 'tiny', 'config': cfg, 'data_fingerprint': fp},
                  'tiny', cfg, fp) is None
  assert rp.stale({'model': 'tiny', 'config': cfg}, 'tiny', cfg, fp) is None
  assert 'model' in rp.stale({'model': 'gemma3-270m'}, 'tiny', cfg, fp)
  assert 'other data' in rp.stale({'data_fingerprint': 'x'}, 'tiny', cfg, fp)
  other = json.loads(json.dumps(cfg))
  other['steps'] += 1
  assert 'steps:' in rp.stale({'config': other}, 'tiny', cfg, fp)
  assert fp != rp.data_fingerprint(
      {**data, 'val': [Example('c', 'd'), Example('g', 'h')]})
  # The task settings (rows, test sets, decontamination) are compared where
  # the file has them; fields a file lacks are not.
  tb = rp.dataclasses.asdict(budget.tasks['math'])
  assert rp.stale({'task_budget': tb}, 'tiny', cfg, fp, tb) is None
  assert rp.stale({'task_budget': {'seq_len': tb['seq_len']}}, 'tiny', cfg,
                  fp, tb) is None
  assert 'decontaminate: False there, True now' in rp.stale(
      {'task_budget': tb}, 'tiny', cfg, fp, {**tb, 'decontaminate': True})
  # Runs from before 2026-12-07 recorded the math targets' leading line
  # breaks apart from the prompt: the same items, not 'other data' (the
  # 31 small-decontam files on file had been left out of every report).
  moved = {**data, 'train': [Example('P:\n', '\nA: 1')]}
  now, before = rp.data_fingerprints(moved)
  assert now != before and now == rp.data_fingerprint(
      {**data, 'train': [Example('P:\n\n', 'A: 1')]})
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for name, items in (('train', [('P:\n', '\nA: 1')]), ('val', [('c', 'd')]),
                      ('arithmetic', [('e', 'f')])):
    h.update(f'\x02{name}'.encode())
    for prompt, target in items:
      h.update(f'\x00{prompt}\x01{target}'.encode())
  assert before == h.hexdigest()[:16]
  assert rp.stale({'data_fingerprint': before}, 'tiny', cfg,
                  (now, before)) is None
  assert 'other data' in rp.stale({'data_fingerprint': before}, 'tiny', cfg,
                                  now)
  # do_run: a stale file is made again, a matching one reused.
  args = rp.argparse.Namespace(out=str(tmp_path), budget='smoke',
                               resume=True, model='tiny')
  path = rp.run_path(args.out, 'smoke', 'arithmetic', 'adam', 1e-3, 0)
  run = _fake_run('arithmetic', 'adam', 1e-3, 0, [1], [0.1], 0.5)
  rp.write_atomic(path, {**run, 'model': 'tiny', 'config': cfg,
                         'data_fingerprint': fp})
  assert rp.do_run(args, budget, 'arithmetic', dict(data), 'adam', 1e-3, 0,
                   print)['val_loss'] == [0.5, 0.5]
  def retrain(*a):
    raise RuntimeError('retrained')
  monkeypatch.setattr(rp, 'train_one', retrain)
  # A file recorded before the line breaks moved (2026-12-07) is reused by
  # do_run and kept by current_results, as made with the same data.
  moved_data = {**data, 'train': [Example('P:\n', '\nA: 1')]}
  rp.write_atomic(path, {**run, 'model': 'tiny', 'config': cfg,
                         'data_fingerprint': rp.data_fingerprints(
                             moved_data)[1]})
  assert rp.do_run(args, budget, 'arithmetic', dict(moved_data), 'adam',
                   1e-3, 0, print)['val_loss'] == [0.5, 0.5]
  kept = rp.current_results(args.out, 'smoke', budget, 'tiny', print,
                            data={'arithmetic': moved_data})
  assert list(kept) == [('arithmetic', 'adam', 1e-3, 0)]
  rp.write_atomic(path, {**run, 'model': 'gemma3-270m'})
  lines = []
  with pytest.raises(RuntimeError, match='retrained'):
    rp.do_run(args, budget, 'arithmetic', dict(data), 'adam', 1e-3, 0,
              lines.append)
  assert "was made with model 'gemma3-270m': running it again" in lines[0]


def _unit_budget(rp, monkeypatch, task, tb, steps):
  """Registers budget 'unit': one task, one rate and seed, rank 2 on q."""
  monkeypatch.setitem(rp.BUDGETS, 'unit', rp.Budget(
      steps=steps, batch_size=2, warmup=1, lrs=(1e-3,), seeds=(0,),
      default_tasks=(task,), tasks={task: tb}, rank=2, dropout=0.0,
      targets=('q',), eval_batch=4))


def test_end_to_end_tiny(rp, tmp_path, monkeypatch):
  """Two optimizers, 2 steps each on a random tiny Gemma: files, resume."""
  _unit_budget(rp, monkeypatch, 'arithmetic', rp.TaskBudget(48, 4, 4, 4, 2),
               steps=2)
  out = str(tmp_path)
  args = ['--budget', 'unit', '--model', 'tiny', '--optimizers', 'lora_rite',
          'adam', '--out', out, '--resume']
  rp.main(args)
  # Another model's runs live apart: budget 'unit-tiny'.
  assert os.listdir(os.path.join(out, 'runs')) == ['unit-tiny']
  files = sorted(os.listdir(os.path.join(out, 'runs', 'unit-tiny',
                                         'arithmetic')))
  assert files == ['adam_lr0.001_seed0.json', 'lora_rite_lr0.001_seed0.json']
  d = json.load(open(os.path.join(out, 'runs', 'unit-tiny', 'arithmetic',
                                  files[1])))
  assert len(d['history']) == 2 and len(d['val_loss']) == 4
  assert len(d['data_fingerprint']) == 16
  # The code that made it: this checkout's commit (None in an export, or
  # without git).
  if (os.path.exists(os.path.join(rp.REPO_ROOT, '.git'))
      and shutil.which('git')):
    assert re.fullmatch('[0-9a-f]{40}', d['code']['commit'])
    assert isinstance(d['code']['modified'], bool)
  else:
    assert d['code'] is None
  assert len(d['tests']['arithmetic']['correct']) == 4
  assert np.isfinite(d['history'][-1]['update_ratio_a'])
  assert os.path.exists(os.path.join(out, 'results_unit-tiny.md'))
  mtime = os.path.getmtime(os.path.join(out, 'runs', 'unit-tiny',
                                        'arithmetic', files[0]))
  rp.main(args)  # --resume: nothing retrained.
  assert os.path.getmtime(os.path.join(out, 'runs', 'unit-tiny',
                                       'arithmetic', files[0])) == mtime
  # One more rate for one optimizer: the report still judges every run
  # against the budget's grid (1e-3), not this invocation's --lrs.
  rp.main(args + ['--optimizers', 'adam', '--lrs', '1e-4'])
  s = json.load(open(os.path.join(out, 'summary_unit-tiny.json')))
  chosen = s['tasks']['arithmetic']['chosen']
  assert set(chosen['adam']['val_loss_by_lr']) == {'0.0001', '0.001'}
  assert chosen['lora_rite']['sweep_complete'] is True
  assert 'lr sweep [0.001]' in open(os.path.join(
      out, 'results_unit-tiny.md')).read()


def test_loss_only_test_sets(rp, tmp_path):
  """A generation task scored by loss only (math at `small`): no accuracy,
  no McNemar, but the paired loss comparison and the report still work."""
  out = str(tmp_path)
  for opt, loss in (('lora_rite', 0.5), ('adam', 0.6)):
    for seed in (0, 1):
      run = _fake_run('math', opt, 1e-3, seed, [0] * 6,
                      list(loss + np.linspace(0, 0.05, 6)), loss)
      del run['tests']['math']['correct'], run['tests']['math']['prediction']
      if opt == 'lora_rite' and seed == 0:  # A test set a budget dropped.
        run['tests']['gsm8k'] = run['tests']['math']
      rp.write_atomic(rp.run_path(out, 'smoke', 'math', opt, 1e-3, seed), run)
  budget = dataclasses.replace(rp.BUDGETS['smoke'], lrs=(1e-3,))
  s = rp.summarize(rp.load_results(out, 'smoke'), 'smoke', budget)
  assert list(s['tasks']['math']['tests']) == ['math']
  assert s['tasks']['math']['tests_left_out'] == ['gsm8k']
  row = s['tasks']['math']['tests']['math']['adam']
  assert 'accuracy' not in row and 'mcnemar_p' not in row['vs_lora_rite']
  assert row['vs_lora_rite']['loss_diff'] == pytest.approx(0.1)
  assert row['vs_lora_rite']['items_rite_lower_loss'] == 6
  md = rp.markdown(s, budget, 'cmd')
  assert '| adam | 6 x 2 | - (loss only) | - | - | - | 0.6250' in md
  assert 'only some runs have, not compared: gsm8k' in md


def test_small_math_budget_is_loss_only_with_its_own_batch(rp):
  tb = rp.BUDGETS['small'].tasks['math']
  cfg = rp.make_config(rp.BUDGETS['small'], 'math', 'adam', 1e-3, 0, 'tiny')
  assert tb.gen_tokens == 0 and cfg.batch_size == tb.batch_size == 4
  assert cfg.data.max_target_tokens == 96 and cfg.data.seq_len == 160
  assert not tb.gsm8k and rp.BUDGETS['full'].tasks['math'].gsm8k


def test_full_budget_plans_every_task_and_each_config_builds(
    rp, tmp_path, monkeypatch):
  """--budget full is for an accelerator and never runs here: its plan (every
  task, the three-rate sweep on seed 0 then two more seeds at the chosen
  rate, whole test sets but GSM8K's sample) and each task's loop config,
  built on the tiny model, are what can be checked on a CPU."""
  shared_data.require('math', 'gsm8k', 'ARC-Challenge', 'openbookqa', 'boolq')
  full = rp.BUDGETS['full']
  seen = _record_runs(
      rp, monkeypatch,
      describe=lambda args, budget, task, data, opt, lr, seed: (
          args.budget, task, opt, lr, seed,
          {k: len(v) for k, v in data['tests'].items()}),
      val_loss={2e-4: 2.0, 5e-4: 1.0, 1e-3: 3.0}.get)
  rp.main(['--budget', 'full', '--optimizers', 'lora_rite', 'adam',
           '--out', str(tmp_path)])
  assert {s[1] for s in seen} == set(rp.TASKS)
  for task in rp.TASKS:
    runs = [s for s in seen if s[1] == task]
    assert all(s[0] == 'full' for s in runs)
    for opt in ('lora_rite', 'adam'):
      mine = sorted((lr, seed) for _, _, o, lr, seed, _ in runs if o == opt)
      assert mine == [(2e-4, 0), (5e-4, 0), (5e-4, 1), (5e-4, 2), (1e-3, 0)]
    sizes = runs[0][5]
    if task == 'math':
      # GSM8K sampled to 300; the held-out math whole (those of its last
      # 300 records whose target ends in a number).
      assert sizes['gsm8k'] == 300 and 250 < sizes['math_heldout'] <= 300
    elif task == 'arithmetic':  # Generated: as many as the budget asks.
      assert sizes == {task: full.tasks[task].num_test}
    else:
      whole = len(rp.data_lib.load_task(task, 'test'))
      assert sizes == {task: whole} and whole >= 500
  for task in rp.TASKS:
    cfg = rp.make_config(full, task, 'lora_rite', 1e-3, 0, 'tiny')
    assert (cfg.steps, cfg.batch_size) == (1000, 32)
    assert cfg.data.seq_len == full.tasks[task].seq_len
    rp.loop.build(cfg)  # Raises on a config the loop would refuse.


def test_gsm8k_variant_scores_gsm8k_alone(rp, tmp_path, monkeypatch):
  """--gsm8k: the math task's own training (same batch, rows, steps), GSM8K
  as its only test set, and the runs kept under <budget>-gsm8k."""
  shared_data.require('math', 'gsm8k')
  seen = _record_runs(rp, monkeypatch)
  rp.main(['--budget', 'small', '--tasks', 'math', '--gsm8k', '--optimizers',
           'adam', '--lrs', '1e-3', '--seeds', '0', '--out', str(tmp_path)])
  (name, tb, tests), = seen
  plain = rp.BUDGETS['small'].tasks['math']
  assert name == 'small-gsm8k' and tests == ['gsm8k']
  assert dataclasses.replace(tb, gsm8k=False, heldout=True) == plain
  data = rp.task_data('math', tb)
  assert len(data['tests']['gsm8k']) == plain.num_test
  # The plain budget's test set is the held-out math alone.
  assert sorted(rp.task_data('math', plain)['tests']) == ['math_heldout']
  with pytest.raises(SystemExit):
    rp.main(['--budget', 'small', '--tasks', 'arithmetic', '--gsm8k',
             '--out', str(tmp_path)])
  assert len(seen) == 1


def test_test_items_seen_in_training_are_left_out_of_the_report(
    rp, monkeypatch):
  """The math training file holds most of GSM8K's test questions: those
  items (and any test item whose prompt is a training or validation prompt)
  are dropped from every run's per-item lists before the statistics."""
  from train.data import Example  # pylint: disable=g-import-not-at-top
  data = {'train': [Example('p  one', 't')], 'val': [Example('p two', 't')],
          'tests': {'x': [Example('p one', 'a'), Example('fresh', 'b'),
                          Example('p two', 'c')]}}
  assert rp.seen_in_training(data) == {'x': [True, False, True]}
  monkeypatch.setattr(rp, 'task_data', lambda task, tb: data)
  run = {'tests': {'x': {'loss': [1.0, 2.0, 3.0],
                         'correct': [True, False, True]}}}
  results = {('arithmetic', 'adam', 1e-3, 0): run}
  assert rp.drop_seen_items(results, rp.BUDGETS['small']) == {
      ('arithmetic', 'x'): 2}
  assert run['tests']['x'] == {'loss': [2.0], 'correct': [False]}
  with pytest.raises(ValueError, match='made with other settings'):
    rp.drop_seen_items({('arithmetic', 'adam', 1e-3, 0): {
        'tests': {'x': {'loss': [1.0]}}}}, rp.BUDGETS['small'])
  # On the real files: 99 of the 150 sampled GSM8K items, and 2 of the 150
  # held-out math records, are in the math training data.
  shared_data.require('math', 'gsm8k')
  monkeypatch.undo()
  tb = dataclasses.replace(rp.BUDGETS['small'].tasks['math'], gsm8k=True)
  seen = rp.seen_in_training(rp.task_data('math', tb))
  assert (sum(seen['gsm8k']), sum(seen['math_heldout'])) == (99, 2)


def test_gsm8k_consistent_counts_only_targets_ending_on_the_gold(
    rp, monkeypatch, tmp_path):
  """GSM8K's packaged targets often end on a wrong number: the derived test
  set `gsm8k_consistent` scores only the items whose target ends on the
  gold answer (and not the items seen in training); `gsm8k` keeps them all."""
  from train.data import Example  # pylint: disable=g-import-not-at-top

  def ex(prompt, target, gold):
    return Example(prompt, target, task='gsm8k', gold_number=gold)
  items = [ex('q1', 'So 2 + 2 = 4. The answer is 4.', '4'),
           ex('q2', 'So 2 + 3 = 5. The answer is 5.', '4'),
           ex('q3', 'The answer is $1,200.50.', '1200.5'),
           ex('q4', 'There are 7 apples.', '7'),  # No final answer.
           ex('seen', 'The answer is 3.', '3'),
           ex('q6', 'She has \u20ac77 left. The answer is \u20ac77.', '77'),
           ex('q7', 'The answer is -3.', '3'),
           ex('q8', 'The answer is 9 500.', '9500')]
  agrees = [True, False, True, False, True, True, False, True]
  assert [rp.target_agrees_with_gold(e) for e in items] == agrees
  data = {'train': [Example('seen', 'x')], 'val': [],
          'tests': {'gsm8k': items}}
  monkeypatch.setattr(rp, 'task_data', lambda task, tb: data)
  results = {}
  for opt, good, bad in (('lora_rite', 1.0, 100.0), ('adam', 0.5, -50.0)):
    for seed in (0, 1):
      results[('math', opt, 1e-3, seed)] = {
          'task': 'math', 'optimizer': opt, 'lr': 1e-3, 'seed': seed,
          'val_loss': [0.5], 'tests': {'gsm8k': {
              'loss': [good if a else bad for a in agrees]}}}
  budget = rp.BUDGETS['small']
  assert rp.drop_seen_items(results, budget) == {('math', 'gsm8k'): 1}
  assert rp.add_consistent_items(results, budget) == {
      ('math', 'gsm8k'): {'kept': 4, 'scored': 7}}
  s = rp.summarize(results, 'unit', budget)
  t = s['tasks']['math']['tests']
  # Any inconsistent item counted would pull these means far off.
  row, ref = t['gsm8k_consistent']['adam'], t['gsm8k_consistent']['lora_rite']
  assert (ref['n'], ref['loss'], row['loss']) == (4, 1.0, 0.5)
  assert row['vs_lora_rite']['loss_diff'] == pytest.approx(-0.5)
  assert t['gsm8k']['lora_rite']['n'] == 7  # All scored items, as before.
  s['tasks']['math']['target_consistency'] = {
      'gsm8k': {'kept': 4, 'scored': 7}}
  md = rp.markdown(s, budget, 'cmd')
  assert 'the targets of 3 of these 7 end on a number other than' in md
  assert '`gsm8k` on the 4 of its 7 scored items' in md
  # The one-table summary's GSM8K labels take these counts.
  out = os.path.join(str(tmp_path), 'summaries')
  os.makedirs(out)
  with open(os.path.join(out, 'summary_unit.json'), 'w') as f:
    json.dump(s, f)
  st = benchmark_scripts.load('summary_table')
  rows = [('unit', 'math', 'gsm8k_consistent', 'kept {kept} of {scored}'),
          ('unit', 'math', 'gsm8k', 'all {scored}, {disagree} wrong')]
  lines = st.table(out, rows=rows, seeds=2).splitlines()
  assert lines[2].startswith('| kept 4 of 7 | loss/token | 1.000 |'), lines
  assert lines[3].startswith('| all 7, 3 wrong | loss/token |'), lines
  # A summary from before the counts were kept says so, not '{kept}'.
  del s['tasks']['math']['target_consistency']
  with open(os.path.join(out, 'summary_old.json'), 'w') as f:
    json.dump(s, f)
  with pytest.raises(KeyError, match='no target_consistency counts'):
    st.table(out, rows=[('old',) + rows[0][1:]], seeds=2)
  # A damaged or foreign summary: one line naming the file (it had been a
  # JSONDecodeError traceback, or a bare key: 'summary_table: tasks').
  for name, text, message in (
      ('cut', '{', r'summary_cut\.json cannot be read \(Expecting '),
      ('empty', '{}', r'summary_empty\.json is not a summary reproduce\.py '
       r'writes \(no "tasks"\)'),
      # A task or a row that is not an object (each had been a traceback).
      ('list', '{"tasks": {"math": []}}', r"summary_list\.json: the math "
       r"gsm8k_consistent row is not one reproduce\.py writes \("
       r"AttributeError"),
      ('int', '{"tasks": {"math": {"tests": {"gsm8k_consistent": {"adam": '
       '5}}, "target_consistency": {"gsm8k": {"kept": 1, "scored": 2}}}}}',
       r"summary_int\.json: the math gsm8k_consistent row is not one "
       r"reproduce\.py writes \(TypeError")):
    with open(os.path.join(out, f'summary_{name}.json'), 'w') as f:
      f.write(text)
    with pytest.raises(ValueError, match=message):
      st.table(out, rows=[(name,) + rows[0][1:]], seeds=2)
  # A run scored on other items, and a test set with no wrong target.
  # A ConfigError (one line from main), not a bare ValueError traceback.
  with pytest.raises(rp.loop.ConfigError, match='made with other settings'):
    rp.add_consistent_items({('math', 'adam', 1e-3, 0): {
        'tests': {'gsm8k': {'loss': [1.0]}}}}, budget)
  data['tests']['gsm8k'] = [items[0]]
  assert rp.add_consistent_items({('math', 'adam', 1e-3, 0): {
      'tests': {'gsm8k': {'loss': [1.0]}}}}, budget) == {}
  # The real sample: 80 of the 150 GSM8K items agree, 25 of the 51 not in
  # the plain math training data.
  shared_data.require('math', 'gsm8k')
  monkeypatch.undo()
  tb = dataclasses.replace(budget.tasks['math'], gsm8k=True)
  real = rp.task_data('math', tb)
  agree = [rp.target_agrees_with_gold(e) for e in real['tests']['gsm8k']]
  seen = rp.seen_in_training(real)['gsm8k']
  # 80: one target ends 'The answer is 220 + 90 + 60 = 370.', its gold.
  assert (sum(agree), sum(a for a, h in zip(agree, seen) if not h)) == (
      80, 25)


def test_exact_match_variant_generates_with_training_unchanged(
    rp, tmp_path, monkeypatch):
  """--exact_match N: the math task's own training and test sets, N greedy
  tokens per test item added, runs under <budget>[-gsm8k]-em<N>; bad use
  is an argparse error before anything runs."""
  shared_data.require('math', 'gsm8k')
  seen = _record_runs(rp, monkeypatch)
  common = ['--budget', 'small', '--tasks', 'math', '--optimizers', 'adam',
            '--lrs', '1e-3', '--seeds', '0', '--out', str(tmp_path)]
  rp.main(common + ['--exact_match', '128'])
  rp.main(common + ['--exact_match', '64', '--gsm8k'])
  plain = rp.BUDGETS['small'].tasks['math']
  (name, tb, tests), (name_g, tb_g, tests_g) = seen
  assert name == 'small-em128' and tests == ['math_heldout']
  assert tb.gen_tokens == 128 and plain.gen_tokens == 0
  assert dataclasses.replace(tb, gen_tokens=0) == plain
  assert name_g == 'small-gsm8k-em64' and tests_g == ['gsm8k']
  assert dataclasses.replace(tb_g, gen_tokens=0, gsm8k=False,
                             heldout=True) == plain
  cfg = rp.make_config(rp.BUDGETS['small'], 'math', 'adam', 1e-3, 0, 'tiny')
  cfg_em = rp.make_config(dataclasses.replace(
      rp.BUDGETS['small'], tasks={'math': tb}), 'math', 'adam', 1e-3, 0,
                          'tiny')
  assert cfg_em.eval.max_new_tokens == 128
  assert dataclasses.replace(cfg_em, eval=cfg.eval) == cfg
  for bad in (['--tasks', 'arithmetic', '--exact_match', '8'],
              ['--tasks', 'math', '--exact_match', '0']):
    with pytest.raises(SystemExit):
      rp.main(['--budget', 'small', '--out', str(tmp_path)] + bad)
  assert len(seen) == 2


def test_end_to_end_tiny_math_exact_match(rp, tmp_path, monkeypatch):
  """A math run that generates: per-item correctness and predictions are
  saved beside the losses, and the report gives accuracy with McNemar."""
  shared_data.require('math')
  _unit_budget(rp, monkeypatch, 'math',
               rp.TaskBudget(64, 8, 4, 6, 0, gsm8k=False),
               steps=2)
  out = str(tmp_path)
  rp.main(['--budget', 'unit', '--model', 'tiny', '--tasks', 'math',
           '--optimizers', 'lora_rite', 'adam', '--exact_match', '4',
           '--out', out])
  d = json.load(open(rp.run_path(out, 'unit-em4-tiny', 'math', 'adam', 1e-3,
                                 0)))
  res = d['tests']['math_heldout']
  n = len(res['loss'])
  assert n > 0 and len(res['correct']) == len(res['generation']) == n
  assert set(res['correct']) <= {0, 1}
  md = open(os.path.join(out, 'results_unit-em4-tiny.md')).read()
  assert '(loss only)' not in md and 'McNemar' in md


def test_same_rate_comparison(rp, tmp_path):
  """Besides each optimizer at its best rate, LoRA-RITE against each other
  optimizer at a rate both ran on matched seeds (the issue's first look ran
  both at one rate); a rate with one common seed, or one only a single
  optimizer ran, is left out."""
  out = str(tmp_path)
  runs = [  # (optimizer, lr, seeds, test loss, validation loss)
      ('lora_rite', 5e-5, (0, 1), 0.60, 0.50),  # RITE's best
      ('lora_rite', 2e-4, (0, 1, 2), 0.55, 0.70),
      ('lora_rite', 1e-3, (0,), 0.90, 0.90),
      ('adam', 2e-4, (1, 2), 0.65, 0.80),
      ('adam', 1e-3, (0, 1), 0.50, 0.40),  # Adam's best
      ('adam', 1e-4, (0, 1), 0.70, 0.90),  # RITE never ran 1e-4
  ]
  for opt, lr, seeds, loss, val in runs:
    for seed in seeds:
      run = _fake_run('math', opt, lr, seed, [0] * 4,
                      list(loss + seed * 0.01 + np.linspace(0, .03, 4)), val)
      del run['tests']['math']['correct'], run['tests']['math']['prediction']
      rp.write_atomic(rp.run_path(out, 'smoke', 'math', opt, lr, seed), run)
  budget = dataclasses.replace(rp.BUDGETS['smoke'], lrs=(2e-4, 1e-3))
  s = rp.summarize(rp.load_results(out, 'smoke'), 'smoke', budget)
  t = s['tasks']['math']
  assert (t['chosen']['lora_rite']['lr'], t['chosen']['adam']['lr']) == (
      5e-5, 1e-3)
  # Main table: Adam at its best is lower than LoRA-RITE at its best.
  assert t['tests']['math']['adam']['vs_lora_rite']['loss_diff'] < 0
  # Only 2e-4 qualifies: 1e-3 has one common seed (0), 1e-4 and 5e-5 one
  # optimizer each.
  [c] = t['same_rate']
  assert (c['optimizer'], c['lr'], c['seeds']) == ('adam', 2e-4, [1, 2])
  v = c['tests']['math']
  assert v['lora_rite_loss'] == pytest.approx(0.55 + 0.015 + 0.015)
  assert v['other_loss'] == pytest.approx(0.65 + 0.015 + 0.015)
  assert v['loss_diff'] == pytest.approx(0.10)
  # All 4 items favour LoRA-RITE: no smaller p than a sign-flip test's.
  assert v['items_rite_lower_loss'] == 4 and v['loss_diff_p'] == 2 / 2**4
  md = rp.markdown(s, budget, 'cmd')
  assert '| adam | 0.0002 | [1, 2] | math | 0.5800 | 0.6800 | +0.1000' in md
  # Both at the same chosen rate: the main table covers it, no extra row.
  for seed in (0, 1):
    rp.write_atomic(rp.run_path(out, 'smoke', 'math', 'lora_rite', 1e-3,
                                seed), json.load(open(rp.run_path(
                                    out, 'smoke', 'math', 'adam', 1e-3,
                                    seed))) | {'optimizer': 'lora_rite',
                                               'val_loss': [0.1]})
  s = rp.summarize(rp.load_results(out, 'smoke'), 'smoke', budget)
  assert s['tasks']['math']['chosen']['lora_rite']['lr'] == 1e-3
  assert [c['lr'] for c in s['tasks']['math']['same_rate']] == [2e-4]


def test_end_to_end_tiny_multiple_choice(rp, tmp_path, monkeypatch):
  """A multiple-choice task (ARC-Challenge from ../shared/data): per-item
  correctness, the predicted option and the gold option's loss per token."""
  shared_data.require('ARC-Challenge')
  tb = rp.TaskBudget(96, 4, 4, 6, 0)
  _unit_budget(rp, monkeypatch, 'arc_challenge', tb, steps=1)
  out = str(tmp_path)
  rp.main(['--budget', 'unit', '--model', 'tiny', '--optimizers', 'adam',
           '--out', out])
  d = json.load(open(rp.run_path(out, 'unit-tiny', 'arc_challenge', 'adam',
                                 1e-3, 0)))
  res = d['tests']['arc_challenge']
  gold = [e.gold_index for e in
          rp.task_data('arc_challenge', tb)['tests']['arc_challenge']]
  assert len(gold) == len(res['correct']) == len(res['loss']) == 6
  assert res['correct'] == [int(p == g) for p, g in
                            zip(res['prediction'], gold)]
  # Bytes of a random tiny model: about log(256) nats each, never free.
  assert all(0.5 < x < 20 for x in res['loss'])


def test_decontaminate_retrains_without_gsm8k_test_questions(
    rp, tmp_path, monkeypatch):
  """--decontaminate: the math training and validation data lose every
  GSM8K test question and held-out record, GSM8K is scored whole, and the
  runs live under <budget>-decontam."""
  shared_data.require('math', 'gsm8k')
  seen = _record_runs(rp, monkeypatch)
  rp.main(['--budget', 'small', '--tasks', 'math', '--decontaminate',
           '--optimizers', 'adam', '--lrs', '1e-3', '--seeds', '0', '--out',
           str(tmp_path)])
  (name, tb, tests), = seen
  assert name == 'small-decontam' and tests == ['gsm8k']
  clean = rp.task_data('math', tb)
  dirty = rp.task_data('math', dataclasses.replace(tb, decontaminate=False))
  assert rp.seen_in_training(clean) == {'gsm8k': [False] * tb.num_test}
  assert sum(rp.seen_in_training(dirty)['gsm8k']) == 99
  assert clean['tests'] == dirty['tests']  # the same 150 items
  # The filter takes 961 GSM8K test questions and 3 held-out duplicates
  # out of the 2960 records before the 90/10 split, which is then drawn
  # anew: 2664 training records become 1796.
  assert (len(dirty['train']), len(clean['train'])) == (2664, 1796)
  for bad in (['--tasks', 'arithmetic', '--decontaminate'],
              ['--tasks', 'math', '--decontaminate', '--gsm8k']):
    with pytest.raises(SystemExit):
      rp.main(['--budget', 'small', *bad, '--out', str(tmp_path)])
  assert len(seen) == 1


def _stub_training(rp, monkeypatch, val_loss=lambda lr, seed: 1.0):
  """do_run itself (paths, --resume, files), training and scoring stubbed:
  each run gets 4 test items and validation loss val_loss(lr, seed); the
  returned list collects the (lr, seed) of every run trained."""
  trained = []

  def fake_train(cfg, train_examples, log):
    trained.append((cfg.optim.learning_rate, cfg.seed))
    # As long as `_fake_run`'s: the loss curves average runs step by step.
    return None, None, [{'loss': 1.0, 'update_ratio_a': 0.1,
                         'update_ratio_b': 0.1}] * 4

  def fake_eval(r, state, task, tb, val, tests):
    lr, seed = trained[-1]
    return {'val_loss': [val_loss(lr, seed)] * 2,
            'tests': {n: {'correct': [0] * len(v), 'loss': [1.0] * len(v),
                          'prediction': [None] * len(v)}
                      for n, v in tests.items()}}

  monkeypatch.setattr(rp, 'train_one', fake_train)
  monkeypatch.setattr(rp, 'evaluate_run', fake_eval)
  return trained


def test_another_models_runs_never_replace_the_real_ones(
    rp, tmp_path, monkeypatch):
  """A --model tiny check, with or without --resume, writes under
  <budget>-tiny: the default model's run files and report under <budget>
  (docs/results/runs/small/... stay where they are) are left as they were."""
  _unit_budget(rp, monkeypatch, 'arithmetic', rp.TaskBudget(48, 4, 4, 4, 2),
               steps=2)
  trained = _stub_training(rp, monkeypatch)
  out = str(tmp_path)
  real = rp.run_path(out, 'unit', 'arithmetic', 'adam', 1e-3, 0)
  rp.write_atomic(real, {**_fake_run('arithmetic', 'adam', 1e-3, 0, [1] * 4,
                                     [0.5] * 4, 0.25), 'model': 'gemma3-270m'})
  with open(os.path.join(out, 'results_unit.md'), 'w') as f:
    f.write('real report\n')
  before = open(real).read()
  common = ['--budget', 'unit', '--model', 'tiny', '--optimizers', 'adam',
            '--out', out]
  for extra in ([], ['--resume']):
    rp.main(common + extra)
    assert open(real).read() == before
    assert open(os.path.join(out, 'results_unit.md')).read() == 'real report\n'
  assert trained == [(1e-3, 0)]  # The second call resumed the tiny run.
  tiny = json.load(open(rp.run_path(out, 'unit-tiny', 'arithmetic', 'adam',
                                    1e-3, 0)))
  assert tiny['model'] == 'tiny' and tiny['budget'] == 'unit-tiny'
  s = json.load(open(os.path.join(out, 'summary_unit-tiny.json')))
  assert s['tasks']['arithmetic']['chosen']['adam']['seeds'] == [0]
  # The default model still reads its runs under the plain budget name, and
  # a tiny file left there by an older version is not one of them.
  rp.write_atomic(rp.run_path(out, 'unit', 'arithmetic', 'adam', 1e-4, 0),
                  {**_fake_run('arithmetic', 'adam', 1e-4, 0, [0] * 4,
                               [1.0] * 4, 0.1), 'model': 'tiny'})
  assert list(rp.load_results(out, 'unit', 'gemma3-270m')) == [
      ('arithmetic', 'adam', 1e-3, 0)]
  assert len(rp.load_results(out, 'unit')) == 2


def test_rate_is_chosen_on_the_smallest_seed_on_file(
    rp, tmp_path, monkeypatch, capsys):
  """--seeds 1 2 after a seed-0 sweep: no second sweep on seed 1; seeds 1 and
  2 run at the rate seed 0 chose, and the log and the report agree on it
  and list seeds 0, 1 and 2 at that rate."""
  out = str(tmp_path)
  for lr, val in ((2e-4, 0.5), (1e-3, 0.9)):
    rp.write_atomic(rp.run_path(out, 'smoke', 'arithmetic', 'adam', lr, 0),
                    _fake_run('arithmetic', 'adam', lr, 0, [0] * 8, [1.0] * 8,
                              val))
  # Seeds 1 and 2 would prefer 1e-3, had they been swept.
  trained = _stub_training(rp, monkeypatch, val_loss=lambda lr, seed: (
      {2e-4: 0.9, 1e-3: 0.1}[lr]))
  common = ['--budget', 'smoke', '--tasks', 'arithmetic', '--optimizers',
            'adam', '--lrs', '2e-4', '1e-3', '--out', out]
  rp.main(common + ['--seeds', '1', '2', '--resume'])
  assert trained == [(2e-4, 1), (2e-4, 2)]
  log = capsys.readouterr().out
  assert 'adam: lr 0.0002 chosen by val loss on seed 0' in log
  s = json.load(open(os.path.join(out, 'summary_smoke.json')))
  chosen = s['tasks']['arithmetic']['chosen']['adam']
  assert (chosen['lr'], chosen['seeds']) == (2e-4, [0, 1, 2])
  assert s['tasks']['arithmetic']['tests']['arithmetic']['adam'][
      'seeds'] == [0, 1, 2]
  # Without --resume too, the seed-0 sweep on file is not redone (seed 0
  # was not asked for); the seeds asked for are.
  trained.clear()
  rp.main(common + ['--seeds', '2'])
  assert trained == [(2e-4, 2)]
  # Nothing on file: the sweep is on the smallest seed asked for, whatever
  # the order, as the report chooses.
  trained.clear()
  rp.main(common[:-1] + [str(tmp_path / 'fresh'), '--seeds', '2', '1'])
  assert trained == [(2e-4, 1), (1e-3, 1), (1e-3, 2)]
  assert 'adam: lr 0.001 chosen by val loss on seed 1' in (
      capsys.readouterr().out)
  # The report names that seed too, not a seed 0 that was never run.
  fresh = str(tmp_path / 'fresh')
  summary = json.load(open(os.path.join(fresh, 'summary_smoke.json')))
  assert summary['tasks']['arithmetic']['chosen']['adam']['sweep_seed'] == 1
  md = open(os.path.join(fresh, 'results_smoke.md')).read()
  assert 'seed 0' not in md
  assert '| adam | 0.001 (0.0002: 0.9000, 0.001: 0.1000) | low edge' not in md
  row = next(l for l in md.splitlines() if l.startswith('| adam | 0.001 ('))
  assert row.split('|')[-3].strip() == '1', row  # the sweep seed column


def test_bad_rate_steps_or_warmup_is_one_error_line(rp, tmp_path, monkeypatch):
  """A rate <= 0, steps < 1 (0 included: not silently the budget's) or a
  negative warmup: one `error:` line and a nonzero exit before anything
  runs, not a traceback from the first run's build."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  seen = _record_runs(rp, monkeypatch)
  common = ['--budget', 'smoke', '--tasks', 'arithmetic', '--optimizers',
            'adam', '--out', str(tmp_path)]
  for bad, msg in ((['--lrs', '-1'], 'optim.learning_rate must be a finite '
                    'number > 0, got -1.0.'),
                   (['--steps', '-3'], 'steps must be >= 1, got -3.'),
                   (['--steps', '0'], 'steps must be >= 1, got 0.'),
                   (['--warmup', '-2'], 'optim.warmup_steps must be >= 0, '
                    'got -2.')):
    with pytest.raises(SystemExit) as e:
      rp.main(common + bad)
    assert e.value.code == f'error: {msg}', bad
  assert not seen and not os.listdir(tmp_path)
  # From the command line: exit status 1, stderr that one line.
  script = os.path.join(os.path.dirname(rp.__file__), 'reproduce.py')
  proc = subprocess.run(
      [sys.executable, script, *common, '--steps', '0', '--compile_cache',
       ''], capture_output=True, text=True, check=False, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1:] == [
      'error: steps must be >= 1, got 0.'], proc.stderr
  assert 'Traceback' not in proc.stderr


def test_bad_out_folder_or_result_files_are_one_error_line(
    rp, tmp_path, monkeypatch):
  """An --out that cannot be written is refused before the first run trains
  (it had failed only when that run's result was written, with a
  traceback); a damaged result file is one line naming it (a
  JSONDecodeError or KeyError traceback); --report_only finding nothing
  exits nonzero (a mistyped --out had looked like success)."""
  report = rp.report
  seen = _record_runs(rp, monkeypatch)
  monkeypatch.setattr(rp, 'report', report)  # training stubbed only
  common = ['--budget', 'smoke', '--tasks', 'arithmetic', '--optimizers',
            'adam']
  afile = tmp_path / 'afile'
  afile.write_text('mine')
  with pytest.raises(SystemExit) as e:
    rp.main(common + ['--out', str(afile / 'out')])
  assert e.value.code == (f'error: --out {afile}/out cannot be written '
                          f'({afile} is not a writable folder).')
  assert not seen and afile.read_text() == 'mine'

  out = tmp_path / 'out'
  path = rp.run_path(str(out), 'smoke', 'arithmetic', 'adam', 1e-3, 0)
  os.makedirs(os.path.dirname(path))
  for text, why in (('{"task": "arith', 'cannot be read (Unterminated '
                     'string starting at: line 1 column 10 (char 9))'),
                    ('{"foo": 1}', 'is not a run result (no task, optimizer, '
                     'lr, seed, val_loss, tests, history)'),
                    # Without history the report had written its summary and
                    # tables, then died in plots() with a KeyError.
                    ('{"task": "arithmetic", "optimizer": "adam", "lr": '
                     '0.001, "seed": 0, "val_loss": [1.0], "tests": {}}',
                     'is not a run result (no history)')):
    with open(path, 'w') as f:
      f.write(text)
    for extra in (['--report_only'], ['--resume', '--lrs', '1e-3']):
      with pytest.raises(SystemExit) as e:
        rp.main(common + ['--out', str(out)] + extra)
      assert e.value.code == (f'error: {path} {why}; move it aside (or '
                              'delete it) and run that run again.'), extra
  assert not seen
  with pytest.raises(SystemExit) as e:
    rp.main(common + ['--out', str(tmp_path / 'typo'), '--report_only'])
  assert e.value.code == (f'error: --report_only: no finished runs under '
                          f'{tmp_path}/typo/runs/smoke; nothing to report.')


def test_run_files_made_otherwise_are_never_chosen_or_reported(
    rp, tmp_path, monkeypatch, capsys):
  """A file in the budget's folder but outside a call's grid (an earlier
  --lrs, made with other data) had won the choice of rate and filled the
  report without a word: only `do_run`'s own runs were checked."""
  _unit_budget(rp, monkeypatch, 'arithmetic', rp.TaskBudget(48, 4, 4, 4, 2),
               steps=2)
  trained = _stub_training(rp, monkeypatch, val_loss=lambda lr, seed: 0.9)
  out = str(tmp_path)
  common = ['--budget', 'unit', '--optimizers', 'adam', '--out', out,
            '--resume']
  rp.main(common)
  assert trained == [(1e-3, 0)]
  made = json.load(open(rp.run_path(out, 'unit', 'arithmetic', 'adam', 1e-3,
                                    0)))
  stale_path = rp.run_path(out, 'unit', 'arithmetic', 'adam', 2e-3, 0)
  rp.write_atomic(stale_path, {
      **made, 'lr': 2e-3, 'val_loss': [0.1, 0.1],
      'data_fingerprint': '0' * 16})
  capsys.readouterr()
  rp.main(common)
  log = capsys.readouterr().out
  assert f'left out: {stale_path} was made with other data' in log
  assert 'adam: lr 0.001 chosen by val loss on seed 0 {\'0.001\': 0.9}' in log
  s = json.load(open(os.path.join(out, 'summary_unit.json')))
  assert s['tasks']['arithmetic']['chosen']['adam']['val_loss_by_lr'] == {
      '0.001': 0.9}
  assert trained == [(1e-3, 0)]


def test_report_scores_stored_generations_again(rp, tmp_path, monkeypatch):
  """A run file keeps the scores of the extractor it was made with; the
  report reads its generations with today's (the committed exact-match
  report had kept '1/3' read as 1)."""
  tb = rp.TaskBudget(48, 4, 4, 4, 2)
  _unit_budget(rp, monkeypatch, 'arithmetic', tb, steps=2)
  tests = rp.task_data('arithmetic', tb)['tests']['arithmetic']
  golds = [e.gold_number for e in tests]
  assert all(g is not None for g in golds)
  # Right, right, wrong, no number; stored as all right.
  texts = [f'The answer is {golds[0]}.', f'So: {golds[1]}',
           f'The answer is {float(golds[2]) + 1:g}.', 'I do not know.']
  run = _fake_run('arithmetic', 'adam', 1e-3, 0, [1] * 4, [0.5] * 4, 0.5)
  run['tests']['arithmetic']['generation'] = texts
  rp.write_atomic(rp.run_path(str(tmp_path), 'unit', 'arithmetic', 'adam',
                              1e-3, 0), run)
  lines = []
  budget = rp.BUDGETS['unit']
  rp.report(rp.argparse.Namespace(out=str(tmp_path), budget='unit',
                                  report_only=True, model=None),
            budget, 'cmd', lines.append)
  assert '[unit] 2 generation(s) scored otherwise' in '\n'.join(lines)
  s = json.load(open(os.path.join(tmp_path, 'summary_unit.json')))
  assert s['tasks']['arithmetic']['tests']['arithmetic']['adam'][
      'accuracy'] == 0.5


def test_rescoring_a_run_file_of_other_data_is_one_line(rp, tmp_path,
                                                        monkeypatch):
  """A file without a data fingerprint (older) passes `stale` where its
  scores count the test items: 3 generations for 4 test items had been a
  traceback from the scorer, and a test set the budget no longer has a
  KeyError."""
  tb = rp.TaskBudget(48, 4, 4, 4, 2)
  _unit_budget(rp, monkeypatch, 'arithmetic', tb, steps=2)
  run = _fake_run('arithmetic', 'adam', 1e-3, 0, [1] * 4, [0.5] * 4, 0.5)
  run['tests']['arithmetic']['generation'] = ['1', '2', '3']
  path = rp.run_path(str(tmp_path), 'unit', 'arithmetic', 'adam', 1e-3, 0)
  rp.write_atomic(path, run)
  with pytest.raises(SystemExit) as e:
    rp.main(['--budget', 'unit', '--out', str(tmp_path), '--report_only'])
  assert str(e.value) == (
      'error: arithmetic/arithmetic: the adam lr 0.001 seed 0 run has 3 '
      'generations for 4 test items; it was made with other data: move it '
      'aside and run it again.')
  run['tests'] = {'gone': run['tests']['arithmetic']}
  rp.write_atomic(path, run)
  assert rp.rescore_generations(
      {('arithmetic', 'adam', 1e-3, 0): run},
      {'arithmetic': rp.task_data('arithmetic', tb)}) == 0


def test_code_version_outside_a_checkout_is_none(rp, tmp_path):
  assert rp.code_version(str(tmp_path)) is None


def test_published_tables_are_what_the_stored_summaries_give(rp):
  # The summary table in README.md and docs/results/README.md is the one
  # summary_table.py prints from the committed summary files: a p-value
  # recomputed another way (2026-12-07) must reach both pages.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  st = benchmark_scripts.load('summary_table')
  table = st.table(os.path.join(root, 'docs', 'results'))
  for page in ('README.md', os.path.join('docs', 'results', 'README.md')):
    with open(os.path.join(root, page), encoding='utf-8') as f:
      assert table in f.read(), f'{page} has another summary table'


def test_a_p_just_below_the_rule_does_not_print_as_it(rp):
  """Two significant figures had printed the t-test's 0.04998 as 0.05, a
  cell that failed the tables' own 'below 0.05' rule on paper."""
  st = benchmark_scripts.load('summary_table')
  for fmt in (rp._fmt_p, st.p_text):
    assert fmt(0.04998) == '0.04998' and fmt(0.0505) == '0.051'
    assert fmt(0.17) == '0.17' and fmt(0.046) == '0.046'
  # The one-table summary's bootstrap p (multiples of 2e-4) had kept two
  # digits: 0.0498 printed as 0.05.
  assert st._p(0.0498) == '0.0498' and st._p(0.019) == '0.019'  # pylint: disable=protected-access
  assert st._p(1e-4) == '<2e-4'  # pylint: disable=protected-access


def test_seeds_with_no_mean_difference_agree_on_no_sign(rp):
  """'3/3 seeds agree' had been printed for three seeds of difference 0."""
  assert rp.seed_signs([[0.0], [0.0], [0.0]]) == (0, 3)
  assert rp.seed_signs([[0.1], [-0.1], [0.0]]) == (0, 1)


@pytest.mark.parametrize('adam_items', [3, 1])
def test_optimizers_scored_on_other_item_counts_are_one_line(rp, adam_items):
  """Runs of two optimizers holding different numbers of test items (a file
  older than the data fingerprint passes `stale`): a numpy broadcast
  traceback, or for a 1-item list a silent broadcast against every item."""
  budget = rp.BUDGETS['smoke']
  results = {}
  for opt, n in (('lora_rite', 4), ('adam', adam_items)):
    run = _fake_run('arithmetic', opt, 1e-3, 0, [1] * n, [0.5] * n, 0.4)
    del run['tests']['arithmetic']['correct']  # loss only: no McNemar check
    results[('arithmetic', opt, 1e-3, 0)] = run
  with pytest.raises(rp.loop.ConfigError, match=r'^arithmetic/arithmetic: '
                     r'the runs compared hold different numbers of test '
                     rf'items \(lora_rite 4, adam {adam_items}\)'):
    rp.summarize(results, 'smoke', budget)


def test_reported_loss_and_wilson_are_the_pooled_mean_and_counts(rp):
  """The loss column is the mean over seeds and items (not a median: the
  other tests' losses were constant or symmetric), and the pooled Wilson
  interval counts items x seeds."""
  budget = rp.BUDGETS['smoke']
  results = {}
  for seed, correct in ((0, [1, 0, 0, 0]), (1, [1, 1, 0, 0])):
    results[('arithmetic', 'adam', 1e-3, seed)] = _fake_run(
        'arithmetic', 'adam', 1e-3, seed, correct, [0.1, 0.1, 0.1, 1.3], 0.4)
  row = rp.summarize(results, 'smoke', budget)['tasks']['arithmetic'][
      'tests']['arithmetic']['adam']
  assert row['loss'] == pytest.approx(0.4)
  assert row['accuracy_per_seed'] == pytest.approx([0.25, 0.5])
  assert row['accuracy_wilson_pooled'] == pytest.approx(
      list(rp.evaluate.wilson_interval(3, 8)))


def test_step_and_warmup_overrides_live_apart_and_runs_share_batches(
    rp, tmp_path, monkeypatch):
  """--steps/--warmup runs go under their own budget name (in the plain
  folder, same file names, they would replace the budget's runs); a run's
  data order is its seed's, the same for every optimizer; the schedule is
  warmup then linear decay to 0, as the report's header says."""
  seen = _record_runs(rp, monkeypatch, describe=lambda *a: a[0].budget)
  rp.main(['--budget', 'smoke', '--tasks', 'arithmetic', '--optimizers',
           'adam', '--seeds', '0', '--steps', '3', '--warmup', '0',
           '--out', str(tmp_path)])
  assert set(seen) == {'smoke-steps3-warmup0'}
  budget = rp.BUDGETS['small']
  cfgs = {(opt, seed): rp.make_config(budget, 'arithmetic', opt, 1e-3, seed,
                                      'tiny')
          for opt in ('adam', 'lora_rite') for seed in (0, 1)}
  for (opt, seed), cfg in cfgs.items():
    assert cfg.data.seed == cfg.seed == seed, (opt, seed)
    assert (cfg.optim.schedule, cfg.optim.end_lr_fraction,
            cfg.optim.warmup_steps) == ('linear', 0.0, budget.warmup)


def test_summary_table_main_fails_with_one_line(tmp_path, capsys):
  st = benchmark_scripts.load('summary_table')
  assert st.main(['--out', str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('summary_table: ') and (
      'summary_small.json: no such summary' in err[0]), err


def test_resume_reruns_a_file_scored_on_other_test_items(rp, tmp_path,
                                                        monkeypatch):
  """A file without a data fingerprint (238 of the 269 in docs/results/runs)
  is checked against the loop config only, which does not hold num_test:
  one scored on 5 items was reused where the budget samples 4 now."""
  from train.data import Example  # pylint: disable=g-import-not-at-top
  data = {'train': [Example('a', 'b')], 'val': [Example('c', 'd')],
          'tests': {'arithmetic': [Example(str(i), 'f') for i in range(4)]}}
  budget = rp.BUDGETS['smoke']
  cfg = json.loads(rp.configs.to_json(rp.make_config(
      budget, 'arithmetic', 'adam', 1e-3, 0, 'tiny')))
  args = rp.argparse.Namespace(out=str(tmp_path), budget='smoke',
                               resume=True, model='tiny')
  path = rp.run_path(args.out, 'smoke', 'arithmetic', 'adam', 1e-3, 0)
  def retrain(*a):
    raise RuntimeError('retrained')
  monkeypatch.setattr(rp, 'train_one', retrain)
  for n in (4, 5):
    rp.write_atomic(path, {**_fake_run('arithmetic', 'adam', 1e-3, 0, [1] * n,
                                       [0.1] * n, 0.5),
                           'model': 'tiny', 'config': cfg})
    lines = []
    if n == 4:
      assert rp.do_run(args, budget, 'arithmetic', data, 'adam', 1e-3, 0,
                       lines.append)['val_loss'] == [0.5, 0.5]
      continue
    with pytest.raises(RuntimeError, match='retrained'):
      rp.do_run(args, budget, 'arithmetic', data, 'adam', 1e-3, 0,
                lines.append)
    assert 'other test items (arithmetic: 5 there, 4 now)' in lines[0]
  # The report's own check (current_results, through stale) leaves it out
  # too: a file outside a call's grid never passes through do_run.
  lines = []
  assert rp.current_results(args.out, 'smoke', budget, 'tiny', lines.append,
                            data={'arithmetic': data}) == {}
  assert lines == [f'[smoke] left out: {path} was made with other test '
                   'items (arithmetic: 5 there, 4 now).']
  rp.write_atomic(path, {**_fake_run('arithmetic', 'adam', 1e-3, 0, [1] * 4,
                                     [0.1] * 4, 0.5),
                         'model': 'tiny', 'config': cfg})
  assert list(rp.current_results(args.out, 'smoke', budget, 'tiny', print,
                                 data={'arithmetic': data})) == [
                                     ('arithmetic', 'adam', 1e-3, 0)]
  # A test set the budget no longer has is not counted.
  assert rp.stale(rp.read_result(path), 'tiny', cfg, 'fp', None,
                  {'arithmetic': 4, 'gsm8k': 3}) is None
  assert rp.stale(rp.read_result(path), 'tiny', cfg, 'fp', None,
                  {'arithmetic': 3}) == (
                      'other test items (arithmetic: 4 there, 3 now)')

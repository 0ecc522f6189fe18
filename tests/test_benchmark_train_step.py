"""benchmarks/train_step.py on the tiny model: both optimizers' steps run
and each compiles once; main() times them in a shuffled order."""

import argparse
import re

import jax
import numpy as np
import optax
import pytest

from tests import benchmark_scripts
from train import loop
from train import step as step_lib


def test_each_optimizers_step_compiles_once_and_trains():
  bench = benchmark_scripts.load('train_step')
  args = argparse.Namespace(model='tiny', dtype='float32', rank=4, batch=2,
                            seq_len=32, max_targets=4, steps=1)
  cfg = bench.make_config(args)
  r = loop.build(cfg)
  raw = next(iter(loop.train_dataset(r)))
  batch, _ = step_lib.prepare_batch(raw, r.max_targets)
  batch = {k: v[None] for k, v in batch.items()}
  steps, states = bench.jitted_steps(r, cfg)
  assert set(steps) == {'lora_rite', 'adam'}
  for name, step in steps.items():
    state = states[name]
    for _ in range(3):
      state, metrics = step(state, r.base, r.rngs, batch)
    # A state placed unlike the step's outputs made the second call compile
    # the step again (on an H200: 32 s more for lora_rite).
    assert step._cache_size() == 1, name  # pylint: disable=protected-access
    assert int(state['step']) == 3, name
    assert np.isfinite(float(metrics['loss'])), name
    # Each optimizer donated its own copy: the run's params are untouched.
    assert all(not x.is_deleted() for x in jax.tree.leaves(r.state['params']))


def test_main_interleaves_in_a_shuffled_order(monkeypatch, capsys):
  bench = benchmark_scripts.load('train_step')
  orders = []
  shuffled = bench.optimizer_step.interleaved_times

  def recording(fns, repeats):
    def tagged(i):
      return lambda: orders.append(i) or fns[i]()
    shuffled([tagged(i) for i in range(len(fns))], repeats)
    # Canned times with one slow lora_rite step: the ratio is of medians
    # (2.00), not of means (14.00).
    return [[0.002, 0.002, 0.050, 0.002], [0.001] * 4]

  monkeypatch.setattr(bench.optimizer_step, 'interleaved_times', recording)
  bench.main(['--model', 'tiny', '--rank', '4', '--batch', '2', '--seq_len',
              '32', '--max_targets', '4', '--steps', '4'])
  rounds = [tuple(orders[k:k + 2]) for k in range(0, 8, 2)]
  assert all(sorted(r) == [0, 1] for r in rounds)
  assert len(set(rounds)) == 2  # each optimizer first in some round
  out = capsys.readouterr().out
  # The loss positions the run has, in the dtype it computes in.
  assert '4 loss positions/row, float32 compute' in out
  last = out.strip().splitlines()[-1]
  assert last == 'lora_rite/adam train-step ratio: 2.00', last


def test_bad_arguments_are_one_line_before_any_work(capsys):
  """--steps 0 had failed after both compiles, a rank of 0 or a seq_len of
  1 in a ConfigError traceback, and --dtype float33 had been ignored."""
  bench = benchmark_scripts.load('train_step')
  small = ['--model', 'tiny', '--batch', '2', '--seq_len', '32']
  for argv, message in (
      (['--steps', '0'], "argument --steps: must be >= 1, got 0"),
      (['--dtype', 'float33'], "argument --dtype: invalid choice: 'float33'"),
      (['--rank', '0'], "argument --rank: must be >= 1, got 0"),
      (['--seq_len', '1'], 'error: data.seq_len must be >= 2, got 1.')):
    with pytest.raises(SystemExit) as e:
      bench.main(small + argv)
    text = str(e.value.code) + capsys.readouterr().err
    assert message in text, (argv, text)


def test_invariance_script_checks_out_before_training(tmp_path, capsys):
  """A bad --out had ended the run, after all its training, in a
  traceback."""
  invariance = benchmark_scripts.load('invariance')
  (tmp_path / 'afile').write_text('')
  with pytest.raises(SystemExit) as e:
    invariance.main(['--out', str(tmp_path / 'afile'), '--steps', '100000'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.endswith(f'--out {tmp_path / "afile"}: File exists'), err


def test_invariance_script_loss_is_that_of_its_h():
  """Each step's loss is that of the H recorded with it (it had been the
  loss before the step: the printed final loss was a step old)."""
  invariance = benchmark_scripts.load('invariance')
  x, y, a, b = invariance.make_problem()
  losses, hs = invariance.train(optax.adam(1e-2), {'lora_a': a, 'lora_b': b},
                                x, y, 3)
  for loss, h in zip(losses, hs):
    want = np.mean((np.asarray(x, np.float64) @ h - np.asarray(y)) ** 2)
    np.testing.assert_allclose(loss, want, rtol=1e-4)


def test_invariance_script_prints_each_scales_own_gap(tmp_path, capsys):
  """Each (optimizer, scale) row had printed the maximum over all scales:
  the scale-1 run, compared with itself, showed Adam's gap of ~8."""
  invariance = benchmark_scripts.load('invariance')
  invariance.main(['--out', str(tmp_path), '--steps', '20'])
  rows = [line.split() for line in capsys.readouterr().out.splitlines()
          if line.startswith(('adam ', 'lora_rite '))]
  gap = {(name, float(scale)): float(g) for name, scale, _, g in rows}
  assert gap[('adam', 1.0)] == 0 and gap[('lora_rite', 1.0)] == 0
  assert gap[('adam', 10.0)] > 1e-2 and gap[('adam', 0.1)] > 1e-2
  assert gap[('lora_rite', 10.0)] < 1e-3
  assert (tmp_path / 'invariance.png').is_file()

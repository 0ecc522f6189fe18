"""benchmarks/optimizer_step.py on a tiny tree: its comparisons run."""

import re

import jax
import numpy as np
import optax
import pytest

import lora_rite_optax as lro
from lora_rite_optax import linalg

from tests import benchmark_scripts


@pytest.fixture(scope='module')
def bench():
  return benchmark_scripts.load('optimizer_step')


def test_compare_times_every_variant(bench):
  params = bench.lora_tree(32, 32, 8, 64, 1, rank=4)
  rows = bench.timed_rows(params, 2, plain_jit=True, eigh=True, floor=True)
  assert tuple(rows) == bench.ROWS
  for ms, _, compile_s in rows.values():
    assert ms > 0 and compile_s > 0
  adam_bytes, rite_bytes = rows['adam'][1], rows['lora_rite'][1]
  # LoRA-RITE keeps two factor-sized arrays, as Adam does, plus per factor
  # two r x r matrices (nu, R^+) and the escaped mass, in float32.
  pairs, r = 7, 4
  assert rite_bytes - adam_bytes == 4 * 2 * pairs * (2 * r * r + 1)
  # The floor holds Adam's state; compare is the same rows as a tuple,
  # adam and lora_rite first (benchmarks/matmul_precision.py unpacks two).
  assert rows['floor'][1] == adam_bytes
  assert len(bench.compare(params, 1)) == 2


def test_floor_step_takes_every_input_and_returns_params_and_state(bench):
  params = bench.lora_tree(32, 32, 8, 64, 1, rank=4)
  grads = jax.tree.map(lambda x: x * 1e-2, params)
  state = optax.adam(1e-3).init(params)
  donated = len(jax.tree.leaves((params, state)))
  for jit in (lro.donating_jit, jax.jit):
    text = jit(bench.floor_step, donate_argnums=(0, 1), keep_unused=True
               ).lower(params, state, grads).as_text()
    main = next(line for line in text.splitlines() if '@main(' in line)
    # Every argument reaches the compiled call, as a real step's do, and
    # each donated one is its own output (nothing computed, nothing copied).
    assert main.count('%arg') == donated + len(jax.tree.leaves(grads))
    assert main.count('tf.aliasing_output') == donated
  out_params, out_state = jax.jit(bench.floor_step)(params, state, grads)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()),
                                   out_params, params))
  assert jax.tree.structure(out_state) == jax.tree.structure(state)
  assert bench.net_ratio(3.0, 2.0, 1.0) == 2.0
  assert np.isnan(bench.net_ratio(3.0, 1.0, 1.0))  # Adam not above it
  assert np.isnan(bench.net_ratio(0.9, 2.0, 1.0))  # nor LoRA-RITE (noise)


def test_interleaved_times_shuffles_the_order_each_round(bench):
  calls = []
  fns = [lambda i=i: calls.append(i) or float(i) for i in range(3)]
  times = bench.interleaved_times(fns, 6)
  assert times == [[0.0] * 6, [1.0] * 6, [2.0] * 6]
  rounds = [tuple(calls[k:k + 3]) for k in range(0, 18, 3)]
  assert all(sorted(r) == [0, 1, 2] for r in rounds)
  assert len(set(rounds)) > 1  # not one fixed order
  calls.clear()
  bench.interleaved_times(fns, 6)
  assert [tuple(calls[k:k + 3]) for k in range(0, 18, 3)] == rounds  # seeded


def test_eigh_qr_swaps_the_qr_while_tracing_and_restores_it(bench):
  params = bench.lora_tree(32, 32, 8, 64, 1, rank=4)
  grads = jax.tree.map(lambda x: x * 1e-2, params)

  def rinv_after_two_steps():
    tx = lro.lora_rite(1e-3)  # a new function, traced anew
    state = tx.init(params)
    p = params
    for _ in range(2):
      updates, state = jax.jit(tx.update)(grads, state, p)
      p = jax.tree.map(lambda x, u: x + u, p, updates)
    return np.asarray(state[0].rinv['rank4_float32'])

  upper = lambda m: np.all(np.tril(m, -1) == 0)
  assert all(upper(m) for m in rinv_after_two_steps().reshape(-1, 4, 4))
  with bench.eigh_qr():
    assert not all(upper(m)
                   for m in rinv_after_two_steps().reshape(-1, 4, 4))
  assert linalg.inverse_root is not linalg.eig_inverse_root


def test_breakdown_times_the_passes_alone_and_the_fixed_cost(bench):
  params = bench.lora_tree(32, 32, 8, 64, 1, rank=4)
  b = bench.breakdown(params, 1)
  for key in ('adam ms', 'lora_rite ms', 'passes only ms', 'floor ms',
              'tiny adam ms', 'tiny lora_rite ms', 'tiny passes only ms',
              'tiny floor ms'):
    assert b[key] > 0, key
  # LoRA-RITE's step compiles to several kernels per factor, Adam's fuse.
  assert b['tiny lora_rite ops'] > 2 * b['tiny adam ops'] > 0
  # The passes-only stand-in makes steps of the factors' shapes.
  tx = bench.passes_only()
  grads = jax.tree.map(lambda x: x * 1e-2, params)
  updates, (mu, basis) = tx.update(grads, tx.init(params), params)
  assert jax.tree.map(np.shape, updates) == jax.tree.map(np.shape, params)
  assert basis is params


@pytest.mark.parametrize('model, pairs, n', [('gemma-2b', 126, 19_611_648),
                                             ('gemma-7b', 196, 50_003_968)])
def test_model_trees_have_the_papers_sizes(bench, model, pairs, n):
  tree = jax.eval_shape(lambda: bench.lora_tree(*bench.MODELS[model],
                                                rank=16))
  assert len(jax.tree.leaves(tree)) == 2 * pairs
  assert sum(x.size for x in jax.tree.leaves(tree)) == n


LAST_LINE = re.compile(r'^lora_rite/adam step-time ratio: \d+\.\d\d$')


@pytest.fixture
def tiny_models(bench, monkeypatch):
  """main() on trees of a few small pairs, and a sweep of two widths, the
  second of the 1-layer, 1x-MLP shape."""
  monkeypatch.setattr(bench, 'MODELS', {'gemma-2b': (32, 32, 16, 64, 2),
                                        'gemma-7b': (48, 48, 16, 96, 2)})
  monkeypatch.setattr(bench, 'SWEEP_RANKS', (4,))
  monkeypatch.setattr(bench, 'SWEEP_WIDTHS', (32, 64))
  monkeypatch.setattr(bench, 'SWEEP_WIDE', 64)


def test_main_prints_floor_and_like_for_like_ratios(bench, tiny_models,
                                                     capsys):
  del tiny_models
  bench.main(['--repeats', '1', '--sweep_repeats', '1'])
  out = capsys.readouterr().out
  lines = out.strip().splitlines()
  assert LAST_LINE.match(lines[-1]), lines[-1]
  for row in bench.ROWS:  # every row of the 2B table, floors included
    assert any(line.startswith(f'{row:<20} ') for line in lines), row
  for label in ('lora_rite, both lro.donating_jit', 'lora_rite, both jax.jit',
                'lora_rite eigh R^+, both donating_jit'):
    line = next(line for line in lines if line.strip().startswith(label))
    assert re.search(r' \d+\.\d\d +(\d+\.\d\d|n/a)', line), line
  assert 'net of the floor' in out and 'state MiB' in out
  # The sweep labels its 1-layer, 1x-MLP column.
  assert '64 (1 layer, 1x MLP)' in out and '32 (4 layers, 4x MLP)' in out
  assert 'lora_rite step (update and apply, lro.donating_jit' in out
  # Compile times are of compiles: a persistent cache (jax's default once
  # JAX_COMPILATION_CACHE_DIR is set) had timed its loads on a second run.
  assert not bench.jax.config.jax_enable_compilation_cache


def test_breakdown_mode_ends_with_the_ratio_line(bench, tiny_models, capsys):
  del tiny_models
  bench.main(['--breakdown', '--repeats', '1'])
  out = capsys.readouterr().out
  assert out.startswith('devices: ')  # which backend it ran on
  assert 'floor ms' in out and 'net of the floor' in out
  assert LAST_LINE.match(out.strip().splitlines()[-1])


@pytest.mark.parametrize('argv', [['--repeats', '0'], ['--sweep_repeats', '-1'],
                                  ['--breakdown', '--precision', 'default']])
def test_bad_arguments_are_refused_before_any_work(bench, argv, capsys):
  """0 steps had failed in a median of nothing after every compile;
  --precision had been ignored by --breakdown."""
  with pytest.raises(SystemExit) as e:
    bench.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert ('must be >= 1' in err or 'not --breakdown' in err), err

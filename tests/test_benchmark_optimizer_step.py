"""benchmarks/optimizer_step.py on a tiny tree: its comparisons run."""

import jax
import numpy as np
import pytest

import lora_rite_optax as lro
from lora_rite_optax import linalg

from tests import benchmark_scripts


@pytest.fixture(scope='module')
def bench():
  return benchmark_scripts.load('optimizer_step')


def test_compare_times_every_variant(bench):
  params = bench.lora_tree(32, 32, 8, 64, 1, rank=4)
  rows = bench.compare(params, 2, plain_jit=True, eigh=True)
  assert len(rows) == 4  # adam, lora_rite, under jax.jit, eigh R^+
  (_, adam_bytes, _), (_, rite_bytes, _) = rows[:2]
  for ms, _, compile_s in rows:
    assert ms > 0 and compile_s > 0
  # LoRA-RITE keeps two factor-sized arrays, as Adam does, plus per factor
  # two r x r matrices (nu, R^+) and the escaped mass, in float32.
  pairs, r = 7, 4
  assert rite_bytes - adam_bytes == 4 * 2 * pairs * (2 * r * r + 1)


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
  for key in ('adam ms', 'lora_rite ms', 'passes only ms', 'tiny adam ms',
              'tiny lora_rite ms', 'tiny passes only ms'):
    assert b[key] > 0, key
  # LoRA-RITE's step compiles to several kernels per factor, Adam's fuse.
  assert b['tiny lora_rite ops'] > 2 * b['tiny adam ops'] > 0
  # The passes-only stand-in makes steps of the factors' shapes.
  tx = bench.passes_only()
  grads = jax.tree.map(lambda x: x * 1e-2, params)
  updates, (mu, basis) = tx.update(grads, tx.init(params), params)
  assert jax.tree.map(np.shape, updates) == jax.tree.map(np.shape, params)
  assert basis is params

"""Every matrix product of the optimizers, initialisations and adapter merging
is float32.

At ``Precision.DEFAULT`` a float32 product rounds its operands on
accelerators (bfloat16 passes on TPU, TF32 on NVIDIA GPUs). On an H200 that
took LoRA-RITE's invariance gap from 4e-5 to 9e-2
(``benchmarks/matmul_precision.py``). CPUs compute every precision alike, so
these tests read the precision off the traced programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex_core

import lora_rite_optax as lro

HIGHEST = jax.lax.Precision.HIGHEST


def dot_precisions(fn, *args) -> list:
  """The precision of every dot_general in ``fn``'s jaxpr, nested ones too."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        found.append(eqn.params['precision'])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jex_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def all_highest(precisions) -> bool:
  return bool(precisions) and all(
      p is not None and all(q == HIGHEST for q in p) for p in precisions)


def pairs(seed=0):
  rng = np.random.default_rng(seed)
  return {'q': {'lora_a': jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
                'lora_b': jnp.asarray(rng.normal(size=(4, 24)), jnp.float32)},
          'kv': {'lora_a': jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
                 'lora_b': jnp.asarray(rng.normal(size=(4, 2, 8)),
                                       jnp.float32)}}


def update_precisions(tx):
  params = pairs()
  grads = jax.tree.map(lambda x: 0.1 * x, pairs(1))
  state = tx.init(params)
  return dot_precisions(lambda g, s, p: tx.update(g, s, p), grads, state,
                        params)


@pytest.mark.parametrize('kw', [{}, dict(update_capping=0.1,
                                         escape_mass=True)],
                         ids=['defaults', 'capping_escape'])
def test_lora_rite_products_are_highest_and_can_be_lowered(kw):
  assert all_highest(update_precisions(lro.lora_rite(1e-2, **kw)))
  # Control: the walk sees the products, and the argument reaches them.
  lowered = update_precisions(lro.lora_rite(1e-2, precision='default', **kw))
  assert lowered and not any(p and HIGHEST in p for p in lowered)


@pytest.mark.parametrize('name', ['shampoo', 'scaled_adam'])
def test_matrix_baselines_statistics_are_highest(name):
  tx = {'shampoo': lambda: lro.shampoo(1e-2, block_size=16),
        'scaled_adam': lambda: lro.scaled_adam(1e-2)}[name]()
  assert all_highest(update_precisions(tx))


def test_initialisations_are_highest():
  rng = np.random.default_rng(0)
  w0 = jnp.asarray(rng.normal(size=(24, 16)), jnp.float32)
  grad = jnp.asarray(rng.normal(size=(24, 16)), jnp.float32)
  init = lro.init
  assert all_highest(dot_precisions(lambda w: init.pissa(w, 4, niter=2), w0))
  assert all_highest(dot_precisions(lambda w: init.pissa(w, 4), w0))
  assert all_highest(dot_precisions(
      lambda g, w: init.lora_ga(g, w, 4, scale=2.0), grad, w0))
  assert all_highest(dot_precisions(
      lambda g, w: init.lora_ga(g, w, 4, scale=2.0, randomized=True), grad,
      w0))


def test_matmul_precision_benchmark_measures_invariance():
  from tests import benchmark_scripts  # pylint: disable=g-import-not-at-top
  bench = benchmark_scripts.load('matmul_precision')
  params, targets = bench.problem(d_in=48, d_out=40, rank=4, pairs=2)
  rite, rite_loss = bench.invariance_gap(lro.lora_rite(1e-2, b2=0.9),
                                         params, targets)
  adam, _ = bench.invariance_gap(optax.adam(1e-2), params, targets)
  assert rite < 1e-3 < 1e-1 < adam
  start = float(bench.loss(jax.tree.map(jnp.asarray, params), targets))
  assert rite_loss < start


def test_adapter_merge_is_highest():
  """merge_lora's kernel is W + s A B to float32 accuracy (the merged
  forward pass and exported weights use it)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import lora  # pylint: disable=g-import-not-at-top
  from models.layers import Projection  # pylint: disable=g-import-not-at-top

  class Tiny(nnx.Module):
    def __init__(self):
      self.q = Projection((8,), (2, 4), axes=('embed', 'heads', 'kv'),
                          rngs=nnx.Rngs(0))

  model = Tiny()
  lora.apply_lora(model, targets='q', rank=2, alpha=4.0)
  assert all_highest(dot_precisions(lora._delta, model.q))  # pylint: disable=protected-access
  # merge_lora and unmerge_lora themselves, through that helper or not.
  graphdef, state = nnx.split(model)

  def kernel_after(fn):
    def kernel(state):
      m = nnx.merge(graphdef, state)
      fn(m)
      return m.q.kernel[...]
    return kernel

  assert all_highest(dot_precisions(kernel_after(lora.merge_lora), state))
  assert all_highest(dot_precisions(
      kernel_after(lambda m: lora.unmerge_lora(lora.merge_lora(m))), state))

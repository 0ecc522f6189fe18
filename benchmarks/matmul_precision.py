"""What LoRA-RITE's matmul precision costs and buys, on this backend.

A float32 matrix product at ``Precision.DEFAULT`` rounds its operands on
accelerators (to bfloat16 on TPU; on NVIDIA GPUs XLA may use TF32). LoRA-RITE
builds its bases from Gram matrices, which square the factors' condition
number, so rounded products eat into its transformation invariance. For each
precision this prints:

* the invariance gap: two equivalent starts ``(A, B)`` and ``(A R, R^-1 B)``
  (``R`` random with condition number 100) trained 25 steps on the same
  least-squares problem, and the largest relative difference of their
  ``H = A B`` over the trajectory (0 for an exactly invariant optimizer;
  gradients are taken at ``HIGHEST`` for both, so only the optimizer's
  products differ). Adam's gap on the same problem is the scale of "not
  invariant".
* the step time on the Gemma-2B LoRA tree of ``optimizer_step.py``, and its
  ratio to optax.adam measured in the same run.

On CPU all precisions compute the same thing, and the rows agree.

  python benchmarks/matmul_precision.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the package, run from a clone
# Before LAPACK loads, as optimizer_step.py says why.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

import lora_rite_optax as lro  # pylint: disable=g-import-not-at-top

# The sibling script by its path: benchmarks/ is not a package, and putting
# it on sys.path would let its script names shadow modules for the rest of
# the process (the tests import this file).
_spec = importlib.util.spec_from_file_location(
    'optimizer_step', os.path.join(_HERE, 'optimizer_step.py'))
optimizer_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(optimizer_step)

PRECISIONS = ('default', 'high', 'highest')


def problem(seed=0, d_in=1024, d_out=1024, rank=16, pairs=3):
  """Random pairs (B small, not zero) and low-rank-plus-noise targets."""
  rng = np.random.default_rng(seed)
  params, targets = {}, {}
  for i in range(pairs):
    a = rng.normal(size=(d_in, rank)) / np.sqrt(d_in)
    b = 0.1 * rng.normal(size=(rank, d_out))
    t = (rng.normal(size=(d_in, 2 * rank)) @ rng.normal(size=(2 * rank, d_out))
         / np.sqrt(d_in) + 0.01 * rng.normal(size=(d_in, d_out)))
    params[f'p{i}'] = {'lora_a': a.astype(np.float32),
                       'lora_b': b.astype(np.float32)}
    targets[f'p{i}'] = t.astype(np.float32)
  return params, targets


def equivalent(params, seed=1, cond=100.0):
  """(A R, R^-1 B) for a random R with the given condition number."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, p in params.items():
    r = p['lora_a'].shape[-1]
    q1, _ = np.linalg.qr(rng.normal(size=(r, r)))
    q2, _ = np.linalg.qr(rng.normal(size=(r, r)))
    m = q1 @ np.diag(np.geomspace(1.0, 1.0 / cond, r)) @ q2
    out[k] = {'lora_a': (p['lora_a'].astype(np.float64) @ m).astype(np.float32),
              'lora_b': (np.linalg.inv(m) @ p['lora_b'].astype(np.float64)
                         ).astype(np.float32)}
  return out


def _h(p):
  return jnp.matmul(p['lora_a'], p['lora_b'],
                    precision=jax.lax.Precision.HIGHEST)


def loss(params, targets):
  return sum(jnp.mean((_h(p) - targets[k])**2) for k, p in params.items())


def trajectory(tx, params, targets, steps=25):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params, targets), state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  out = []
  for _ in range(steps):
    params, state = step(params, state)
    out.append({k: np.asarray(_h(p), np.float64) for k, p in params.items()})
  return out, float(loss(params, targets))


def invariance_gap(tx, params, targets):
  (base, final), (moved, _) = (trajectory(tx, params, targets),
                               trajectory(tx, equivalent(params), targets))
  gap = max(np.linalg.norm(h1[k] - h2[k]) / np.linalg.norm(h1[k])
            for h1, h2 in zip(base, moved) for k in h1)
  return gap, final


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=optimizer_step.positive_int,
                      default=7,
                      help='timed steps of the Gemma-2B tree per optimizer')
  parser.add_argument('--skip_timing', action='store_true')
  args = parser.parse_args(argv)
  optimizer_step.no_persistent_cache()
  print(f'backend {jax.default_backend()}: {jax.devices()}')
  params, targets = problem()
  h0 = loss(jax.tree.map(jnp.asarray, params), targets)
  gap, final = invariance_gap(optax.adam(1e-2), params, targets)
  print(f'\ninvariance over 25 steps (3 pairs 1024x16 / 16x1024, R with cond '
        f'100; loss {float(h0):.4f} at start)')
  print(f'{"optimizer":<28} {"H gap":>9} {"final loss":>11}')
  print(f'{"adam (reference)":<28} {gap:>9.2e} {final:>11.4f}')
  gaps = {}
  for precision in PRECISIONS:
    tx = lro.lora_rite(1e-2, b2=0.9, escape_mass=True, precision=precision)
    gaps[precision], final = invariance_gap(tx, params, targets)
    print(f'{"lora_rite, " + precision:<28} {gaps[precision]:>9.2e} '
          f'{final:>11.4f}')
  if not args.skip_timing:
    tree = optimizer_step.lora_tree(*optimizer_step.MODELS['gemma-2b'],
                                    rank=16)
    print('\ngemma-2b LoRA tree, step time (each row its own run against '
          'adam)')
    print(f'{"precision":<10} {"adam ms":>9} {"rite ms":>9} {"ratio":>6}')
    for precision in PRECISIONS:
      (a_ms, _, _), (r_ms, _, _) = optimizer_step.compare(
          tree, args.repeats, precision=precision)
      print(f'{precision:<10} {a_ms:>9.2f} {r_ms:>9.2f} {r_ms / a_ms:>6.2f}')
  print(f'lora_rite default/highest invariance-gap ratio: '
        f'{gaps["default"] / gaps["highest"]:.2f}')


if __name__ == '__main__':
  main()

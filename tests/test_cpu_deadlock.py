"""Batched LAPACK calls on XLA:CPU must not run concurrently (they can hang).

jaxlib 0.10's CPU eigh/solve split a batch over the intra-op thread pool and
block a pool thread until the pieces finish; two at once on a 2-core host
can wait on each other forever (Shampoo's train step on the real Gemma 3
270M hung this way at 0% CPU). The optimizers chain such calls with
``linalg.one_at_a_time``/``linalg.after``. This runs their updates in a
fresh process with a time limit: before the fix it hung on every try.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lora_rite_optax import linalg

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r'''
import jax, jax.numpy as jnp, optax
import lora_rite_optax as lro

def run(tx, params, steps=6):
  state = tx.init(params)
  step = jax.jit(lambda p, s, i: tx.update(
      jax.tree.map(lambda x: jnp.cos(x * (i + 1.0)), p), s, p))
  for i in range(steps):
    updates, state = step(params, state, i)
    params = optax.apply_updates(params, updates)
  jax.block_until_ready(params)

key = iter(jax.random.split(jax.random.key(0), 64))
normal = lambda *shape: jax.random.normal(next(key), shape)
# Shampoo: many 128-blocks, inverse roots every step.
run(lro.shampoo(1e-3, precondition_every=1),
    {f'w{i}': normal(256, 256) for i in range(6)})
# LoRA-RITE: two rank groups, escaped mass; ScaledAdam: stacked layers.
scanned = {f'p{r}': {'lora_a': normal(8, 64, r), 'lora_b': normal(8, r, 64)}
           for r in (4, 8)}
run(lro.lora_rite(1e-3, escape_mass=True, layout=lro.NNX_LAYOUT.scanned(1)),
    scanned)
run(lro.scaled_adam(1e-3, layout=lro.NNX_LAYOUT.scanned(1)), scanned)
print('finished')
'''


def test_batched_lapack_updates_finish():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  try:
    proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
  except subprocess.TimeoutExpired:
    raise AssertionError('the optimizer updates hung (concurrent batched '
                         'LAPACK calls on XLA:CPU?)') from None
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'finished' in proc.stdout


def test_one_at_a_time_keeps_values():
  xs = [jnp.full((3, 4, 4), v) + jnp.eye(4) for v in (1.0, 2.0, 3.0)]
  eigh = lambda m: jnp.linalg.eigh(m)[0]
  fn = jax.jit(lambda xs: linalg.one_at_a_time(eigh, xs))
  for got, x in zip(fn(xs), xs):
    np.testing.assert_array_equal(got, eigh(x))


def test_after_is_exact_and_ignores_non_finite():
  x = {'a': jnp.array([-0.0, 1.5, -2.0]), 'b': jnp.arange(3.0)}
  for prev in (jnp.array([jnp.nan, 1.0]), jnp.array([[jnp.inf]]),
               jnp.array([3.0])):
    out = jax.jit(linalg.after)(x, prev)
    np.testing.assert_array_equal(out['a'], x['a'])
    np.testing.assert_array_equal(out['b'], x['b'])

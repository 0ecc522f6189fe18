"""Batched LAPACK calls on XLA:CPU must not run concurrently (they can hang).

jaxlib 0.10's CPU eigh/solve split a batch over the intra-op thread pool and
block a pool thread until the pieces finish; two at once on a 2-core host
can wait on each other forever (Shampoo's train step on the real Gemma 3
270M hung this way at 0% CPU). The optimizers chain such calls with
``linalg.one_at_a_time``/``linalg.after``. This runs their updates in a
fresh process with a time limit: before the fix it hung on every try.

Whether two such calls meet depends on the host and the thread pool's
timing (on some hosts the unfixed updates finish every time), so the run
alone cannot tell that the fix is gone. The structural test reads the
compiled XLA:CPU program instead: every pair of LAPACK calls in an update
must be ordered by data (one cannot start before the other finishes),
which is what ``linalg.after`` adds and what XLA must keep.
"""

from __future__ import annotations

import itertools
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_rite_optax as lro
from lora_rite_optax import linalg
from tests import xla_flags

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
  env = xla_flags.script_env()
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



# --- The order of LAPACK calls in the compiled program -----------------------
#
# Read from the optimised HLO, not the jaxpr: XLA drops an
# optimization_barrier before scheduling and may simplify, so only the
# dependencies left after compilation order the calls.


def _parse_hlo(text):
  """({computation: ([(name, opcode, operand names, attributes)], root)},
  entry computation), from ``Compiled.as_text()``."""
  comps, entry, body = {}, None, None
  for line in text.splitlines():
    head = re.match(r'(ENTRY )?%([\w.\-]+) \(.*\{$', line)
    if head:
      body = []
      comps[head.group(2)] = (body, None)
      entry = head.group(2) if head.group(1) else entry
      current = head.group(2)
      continue
    m = re.match(r'\s*(ROOT )?%([\w.\-]+) = ', line)
    if body is None or not m:
      body = None if line == '}' else body
      continue
    # The shape (maybe a tuple, with layouts) ends at the first space
    # outside brackets; then `opcode(operands), attributes`.
    i, depth = m.end(), 0
    while depth or line[i] != ' ':
      depth += (line[i] in '([{') - (line[i] in ')]}')
      i += 1
    op = re.match(r' ([\w\-]+)\(', line[i:])
    start = j = i + op.end()
    depth = 1
    while depth:
      depth += (line[j] == '(') - (line[j] == ')')
      j += 1
    operands = line[start:j - 1]
    body.append((m.group(2), op.group(1), re.findall(r'%([\w.\-]+)', operands),
                 operands if op.group(1) == 'parameter' else line[j:]))
    if m.group(1):
      comps[current] = (body, m.group(2))
  return comps, entry


def _lapack(attrs):
  m = re.search(r'custom_call_target="(lapack_\w+)"', attrs)
  return m and m.group(1)


def _called(attrs, key):
  return re.search(key + r'=%([\w.\-]+)', attrs).group(1)


def _branches(attrs):
  m = re.search(r'branch_computations=\{([^}]*)\}', attrs)
  if m:
    return re.findall(r'%([\w.\-]+)', m.group(1))
  return [_called(attrs, 'true_computation'),
          _called(attrs, 'false_computation')]


def _any(t):
  return any(map(_any, t)) if isinstance(t, tuple) else t


def _merge(ts):
  if all(isinstance(t, tuple) for t in ts) and len({len(t) for t in ts}) == 1:
    return tuple(map(_merge, zip(*ts)))
  return any(map(_any, ts))


def _after(comps, entry, source):
  """The LAPACK calls that cannot start before the call ``source`` is done.

  A value is "late" when computed from ``source``'s output, or by an
  instruction that XLA:CPU starts only once all its operands are ready,
  one of them late: a fusion (one kernel), a conditional or a while loop
  (then everything they run waits, for the predicate too). Tuples are
  followed element by element: packing values together links nothing.
  """
  late = set()

  def run(comp, params, ctx):
    body, root = comps[comp]
    vals = {}
    for name, opcode, operands, attrs in body:
      ops = tuple(vals[o] for o in operands)
      if opcode == 'parameter':
        v = params[int(attrs)]
      elif opcode == 'tuple':
        v = ops
      elif opcode == 'get-tuple-element':
        v = ops[0]
        if isinstance(v, tuple):
          v = v[int(re.search(r'index=(\d+)', attrs).group(1))]
      elif opcode == 'conditional':
        c = ctx or _any(ops)
        v = _merge([run(b, [arg], c)
                    for b, arg in zip(_branches(attrs), ops[1:])])
      elif opcode == 'while':
        c = ctx or _any(ops)
        v = ops[0]
        while True:  # Until late values have gone round the loop.
          run(_called(attrs, 'condition'), [v], c)
          nxt = _merge([v, run(_called(attrs, 'body'), [v], c)])
          if nxt == v:
            break
          v = nxt
      elif opcode == 'call':
        v = run(_called(attrs, 'to_apply'), ops, ctx)
      else:
        v = _any(ops)
        if opcode == 'custom-call' and _lapack(attrs):
          if name == source:
            v = True
          elif v or ctx:
            late.add(name)
      vals[name] = True if ctx else v
    return vals[root]

  body, _ = comps[entry]
  run(entry, [False] * sum(op == 'parameter' for _, op, _, _ in body), False)
  return late


def _branch_of(comps):
  """{LAPACK call: {(conditional, branch index) it runs under}}."""
  callers = {}
  for comp, (body, _) in comps.items():
    for name, opcode, _, attrs in body:
      if opcode == 'conditional':
        for k, b in enumerate(_branches(attrs)):
          callers.setdefault(b, []).append((comp, (name, k)))
      for key in ('calls', 'to_apply', 'body', 'condition'):
        if re.search(key + '=%', attrs):
          callers.setdefault(_called(attrs, key), []).append((comp, None))

  def under(comp, seen=()):
    out = set()
    for parent, branch in callers.get(comp, ()):
      if parent not in seen:
        out |= ({branch} - {None}) | under(parent, seen + (comp,))
    return out

  return {name: under(comp) for comp, (body, _) in comps.items()
          for name, opcode, _, attrs in body
          if opcode == 'custom-call' and _lapack(attrs)}


def _unordered_lapack_calls(hlo):
  """LAPACK calls of a compiled program, and the pairs of them that could
  run at the same time: neither waits for the other, and they are not in
  different branches of one conditional (only one branch runs)."""
  comps, entry = _parse_hlo(hlo)
  branch = _branch_of(comps)
  calls = sorted(branch)
  after = {a: _after(comps, entry, a) for a in calls}
  exclusive = lambda a, b: any(c == d and k != l for c, k in branch[a]
                               for d, l in branch[b])
  return calls, [(a, b) for a, b in itertools.combinations(calls, 2)
                 if b not in after[a] and a not in after[b]
                 and not exclusive(a, b)]


def _small_updates():
  key = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda *shape: jax.random.normal(next(key), shape)
  # Two rank groups, so two batches of LAPACK calls to order.
  scanned = {f'p{r}': {'lora_a': normal(2, 32, r), 'lora_b': normal(2, r, 32)}
             for r in (4, 8)}
  return {
      # Four statistic sizes (16, 8, 4, 12): four batched eighs.
      'shampoo': (lro.shampoo(1e-3, precondition_every=1),
                  {'w0': normal(16, 8), 'w1': normal(4, 12)}, 4),
      # Per group: Cholesky, eigh fallback, eigvalsh, eigh (and the
      # triangular solve, a lowering detail).
      'lora_rite': (lro.lora_rite(1e-3, escape_mass=True,
                                  layout=lro.NNX_LAYOUT.scanned(1)),
                    scanned, 8),
      # Per pair: two solves, each at least an LU.
      'scaled_adam': (lro.scaled_adam(1e-3, layout=lro.NNX_LAYOUT.scanned(1)),
                      scanned, 4),
  }


@pytest.mark.parametrize('name', ['shampoo', 'lora_rite', 'scaled_adam'])
def test_batched_lapack_calls_wait_for_each_other(name):
  try:
    cpu = jax.devices('cpu')[0]
  except RuntimeError:
    pytest.skip('no XLA:CPU backend (JAX_PLATFORMS)')
  tx, params, min_calls = _small_updates()[name]
  params = jax.device_put(params, cpu)
  state = jax.jit(tx.init)(params)
  hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  calls, unordered = _unordered_lapack_calls(hlo)
  # At least the calls the update writes: the parser saw them (a check of
  # no calls would pass).
  assert len(calls) >= min_calls, calls
  assert not unordered, (
      f'{name}: LAPACK calls that may run concurrently on XLA:CPU (and '
      f'deadlock its thread pool): {unordered}')

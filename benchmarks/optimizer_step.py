"""Step time, state memory and compile time of LoRA-RITE vs optax.adam.

On the Gemma-2B LoRA tree of the paper's setup (rank 16 on q, k, v, o, gate,
up, down of 18 layers: 126 pairs, 19.6M parameters) both optimizers run
jitted in the same process, warm, on the same params and gradients; the
median of several steps is reported. Also a sweep over rank and width, and
the compile time on the Gemma-7B-shaped tree.

  python benchmarks/optimizer_step.py            # all of it
  python benchmarks/optimizer_step.py --quick    # main table only
  python benchmarks/optimizer_step.py --breakdown  # where the time goes

The last line is `lora_rite/adam step-time ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time

# jaxlib's CPU eigh/solve already spread a batch over XLA's threads;
# OpenBLAS's own threads on top oversubscribe the cores (a rank-64
# LoRA-RITE step ran 5x slower). Must be set before LAPACK loads.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
# Runs from a clone without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

import lora_rite_optax as lro
from lora_rite_optax import linalg

# name: (d_model, q_heads * head_dim, kv_heads * head_dim, mlp, layers)
MODELS = {
    'gemma-2b': (2048, 2048, 256, 16384, 18),
    'gemma-7b': (3072, 4096, 4096, 24576, 28),
}


def lora_tree(d_model, q_dim, kv_dim, mlp, layers, rank, seed=0):
  """The LoRA pairs of a Gemma-shaped model: {layer_i: {proj: pair}}."""
  shapes = {'q': (d_model, q_dim), 'k': (d_model, kv_dim),
            'v': (d_model, kv_dim), 'o': (q_dim, d_model),
            'gate': (d_model, mlp), 'up': (d_model, mlp),
            'down': (mlp, d_model)}
  key = jax.random.key(seed)
  tree = {}
  for layer in range(layers):
    tree[f'layer_{layer}'] = {}
    for name, (d_in, d_out) in shapes.items():
      key, ka, kb = jax.random.split(key, 3)
      tree[f'layer_{layer}'][name] = {
          'lora_a': jax.random.normal(ka, (d_in, rank)) / np.sqrt(d_in),
          'lora_b': jax.random.normal(kb, (rank, d_out)) * 1e-3,
      }
  return tree


def scanned(tree):
  """The same pairs with layers stacked on a leading axis (as nnx.scan has)."""
  layers = sorted(tree, key=lambda k: int(k.split('_')[1]))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[k] for k in layers])


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def prepare(tx, params, grads, jit=lro.donating_jit):
  """(run, state bytes, compile seconds) of a jitted, donating step.

  ``lro.donating_jit`` by default: it gives LoRA-RITE's ``basis`` (the
  params as they were) the donated params' buffer, where ``jax.jit``'s
  in-order pairing makes XLA copy every factor three times per step. For
  Adam the two compile to the same buffer assignment.
  """

  state = tx.init(params)
  jitted = jit(_step(tx), donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = jitted.lower(params, state, grads).compile()
  compile_s = time.perf_counter() - start
  state_bytes = tree_bytes(state)
  carry = [jax.tree.map(jnp.copy, params), state]

  def run():
    """Seconds of one step."""
    start = time.perf_counter()
    carry[:] = compiled(*carry, grads)
    jax.block_until_ready(carry)
    return time.perf_counter() - start

  for _ in range(2):  # warm
    run()
  return run, state_bytes, compile_s


def _step(tx):
  """``(params, state, grads) -> (new params, state)`` of ``tx``."""
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _interleaved_medians(runs, repeats) -> list[float]:
  """ms/step of each of `prepare`'s ``runs``, the steps alternating so that
  load from other processes falls on all alike.

  The order is shuffled each round (seeded), so that no variant always
  runs first or right after the same other one. (On an H200, in two runs
  with a fixed order, LoRA-RITE under ``donating_jit``, second of four
  rows, ran 3-4 ms slower than under ``jax.jit``, third; on CPU, with tiny
  factors, the two ran within 0-3% of each other.)"""
  times = [[] for _ in runs]
  rng = np.random.default_rng(0)
  for _ in range(repeats):
    for i in rng.permutation(len(runs)):
      times[i].append(runs[i][0]())
  return [statistics.median(t) * 1e3 for t in times]


def passes_only() -> optax.GradientTransformation:
  """LoRA-RITE's passes over the ``N x r`` data and none of its ``r x r``
  algebra: per factor the three Grams (``X^T X``, ``X^T X_{t-1}``,
  ``grad^T grad``) and the two products ``grad K_a + S_{t-1} K_b``, the
  ``K`` made of the Grams by additions only; the same state arrays.

  For this script's trees (``lora_a`` rank last, ``lora_b`` rank first).
  Timed beside ``lora_rite`` (``--breakdown``), the gap between them is what
  the ``r x r`` algebra (Cholesky, eigh, the small products) and its place
  on the critical path cost; the gap to Adam is the passes' own.
  """
  hi = jax.lax.Precision.HIGHEST

  def init_fn(params):
    # Two trees, not one twice: a donated state must not hold a buffer twice.
    return tuple(jax.tree.map(jnp.zeros_like, params) for _ in range(2))

  def update_fn(updates, state, params):
    mu, basis = state

    def one(path, x, g, s, b):
      long = 0 if path[-1].key == 'lora_a' else 1  # the N axis
      gram = lambda u, v: jax.lax.dot_general(
          u, v, (((long,), (long,)), ((), ())), precision=hi)
      times = lambda u, k: (
          jax.lax.dot_general(u, k, (((1,), (0,)), ((), ())), precision=hi)
          if long == 0 else
          jax.lax.dot_general(k, u, (((1,), (0,)), ((), ())), precision=hi))
      k_a = gram(x, x) + 1e-3 * gram(g, g)
      k_b = 0.9 * gram(x, b)
      return times(g, k_a) + times(s, k_b)

    new = jax.tree_util.tree_map_with_path(one, params, updates, mu, basis)
    return new, (new, params)

  return optax.GradientTransformation(init_fn, update_fn)


def compiled_ops(tx, params) -> int:
  """Instructions of the compiled step's entry computation (each a kernel
  launch or library call on XLA:CPU; parameters, tuples, bitcasts and
  constants not counted)."""
  grads = jax.tree.map(jnp.zeros_like, params)
  text = lro.donating_jit(_step(tx), donate_argnums=(0, 1)).lower(
      params, tx.init(params), grads).compile().as_text()
  entry = text[text.index('ENTRY'):]
  # The opcode is the word before the operands' '(' after '= <shape> ',
  # whatever the shape (tuples of LAPACK custom-calls have spaces).
  ops = re.findall(r'^\s*(?:ROOT )?%\S+ = .*?([\w-]+)\(', entry,
                   re.MULTILINE)
  return sum(op not in ('parameter', 'bitcast', 'get-tuple-element', 'tuple',
                        'constant') for op in ops)


def breakdown(params, repeats, lr=1e-4) -> dict[str, float]:
  """ms/step of adam, lora_rite and `passes_only` on ``params``, and the
  same three on a tree of the same pairs with tiny factors (widths 32-128:
  the step's fixed cost), with the compiled instruction counts of adam and
  lora_rite there."""
  out = {}
  n_layers = len(params)
  tiny = lora_tree(64, 64, 32, 128, n_layers, rank=16)
  for name, tree in (('', params), ('tiny ', tiny)):
    grads = jax.tree.map(lambda x: x * 1e-3, tree)
    runs = {'adam': prepare(optax.adam(lr), tree, grads),
            'lora_rite': prepare(lro.lora_rite(lr), tree, grads),
            'passes only': prepare(optax.chain(
                passes_only(), optax.scale_by_learning_rate(lr)), tree,
                                   grads)}
    ms = _interleaved_medians(list(runs.values()), repeats)
    out.update({f'{name}{k} ms': v for k, v in zip(runs, ms)})
  out['tiny adam ops'] = compiled_ops(optax.adam(lr), tiny)
  out['tiny lora_rite ops'] = compiled_ops(lro.lora_rite(lr), tiny)
  return out


@contextlib.contextmanager
def eigh_qr():
  """LoRA-RITE traced with ``R^+`` by eigh for every group (the fallback
  of ``linalg.inverse_root``), to time what its Cholesky path saves."""
  cholesky_first = linalg.inverse_root
  linalg.inverse_root = linalg.eig_inverse_root
  try:
    yield
  finally:
    linalg.inverse_root = cholesky_first


def compare(params, repeats, lr=1e-4, layout=lro.NNX_LAYOUT,
            plain_jit=False, eigh=False, precision='highest'):
  """(ms/step, state bytes, compile s) of adam and lora_rite.

  The steps alternate, so that load from other processes falls on all
  alike; the ratio of the medians is what to compare across machines. With
  ``plain_jit``, one more entry: lora_rite under ``jax.jit``'s own buffer
  pairing; with ``eigh``, one more: lora_rite with ``R^+`` by eigh.
  """
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape)
                       * 1e-3, params)
  rite = lambda: lro.lora_rite(lr, layout=layout, precision=precision)
  runs = [prepare(optax.adam(lr), params, grads),
          prepare(rite(), params, grads)]
  if plain_jit:
    runs.append(prepare(rite(), params, grads, jit=jax.jit))
  if eigh:
    with eigh_qr():
      runs.append(prepare(rite(), params, grads))
  return tuple((ms, b, c) for ms, (_, b, c) in
               zip(_interleaved_medians(runs, repeats), runs))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='only the Gemma-2B table')
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--sweep_repeats', type=int, default=3,
                      help='steps per row of the rank/width sweep')
  parser.add_argument('--precision', default='highest',
                      choices=('highest', 'high', 'default'),
                      help="LoRA-RITE's matrix-product precision in the "
                      'Gemma-2B table (accelerators round float32 products '
                      'below highest: TF32 on NVIDIA GPUs, bfloat16 on TPU)')
  parser.add_argument('--breakdown', action='store_true',
                      help='only where LoRA-RITE\'s step time goes: its '
                      'N x r passes alone, and the fixed cost on tiny '
                      'factors')
  args = parser.parse_args(argv)
  if args.breakdown:
    params = lora_tree(*MODELS['gemma-2b'], rank=16)
    b = breakdown(params, args.repeats)
    print('gemma-2b LoRA tree (126 pairs), and the same pairs with factors '
          '32-128 wide ("tiny"), ms/step:')
    for key, value in b.items():
      print(f'  {key:<24} {value:>9.1f}')
    print(f'lora_rite/adam {b["lora_rite ms"] / b["adam ms"]:.2f}, its N x r '
          f'passes alone/adam {b["passes only ms"] / b["adam ms"]:.2f}; '
          f'tiny factors: lora_rite/adam '
          f'{b["tiny lora_rite ms"] / b["tiny adam ms"]:.2f}')
    return

  print(f'devices: {jax.devices()}')
  if not args.quick:
    print('\nsweep (q/k/v/o/gate/up/down shapes of each width: 4 layers '
          'with a 4x MLP below 16384, 1 layer with a 1x MLP at 16384; '
          f'median of {args.sweep_repeats} steps):')
    print(f'{"rank":>5} {"width":>6} {"params":>10} {"adam ms":>9} '
          f'{"rite ms":>9} {"ratio":>6}')
    for rank in (4, 16, 64):
      for width in (1024, 4096, 16384):
        mlp = 4 * width if width < 16384 else width
        params = lora_tree(width, width, width // 8, mlp, 4 if width < 16384
                           else 1, rank)
        (a_ms, _, _), (r_ms, _, _) = compare(params, args.sweep_repeats)
        n = sum(x.size for x in jax.tree.leaves(params))
        print(f'{rank:>5} {width:>6} {n:>10,} {a_ms:>9.1f} {r_ms:>9.1f} '
              f'{r_ms / a_ms:>6.2f}')

    params = lora_tree(*MODELS['gemma-7b'], rank=16)
    tx = lro.lora_rite(1e-4)
    state = jax.eval_shape(tx.init, params)
    grads = params
    start = time.perf_counter()
    jax.jit(lambda p, s, g: tx.update(g, s, p)).lower(
        params, state, grads).compile()
    print(f'\ngemma-7b tree ({sum(x.size for x in jax.tree.leaves(params)):,} '
          f'params, {len(jax.tree.leaves(params)) // 2} pairs): lora_rite '
          f'compile {time.perf_counter() - start:.1f} s')
    del params, grads

  params = lora_tree(*MODELS['gemma-2b'], rank=16)
  n = sum(x.size for x in jax.tree.leaves(params))
  pairs = len(jax.tree.leaves(params)) // 2
  ((a_ms, a_bytes, a_c), (r_ms, r_bytes, r_c), (j_ms, _, j_c),
   (e_ms, _, e_c)) = compare(params, args.repeats, plain_jit=True, eigh=True,
                             precision=args.precision)
  # Asked of donating_jit itself, for these arguments: where it reorders is
  # its decision, not this script's.
  reordered = lro.donating_jit(lambda p: p, donate_argnums=0
                               ).reorders_outputs(params)
  print(f'\ngemma-2b LoRA tree: {pairs} pairs, {n:,} params, rank 16 '
        '(steps jitted with lro.donating_jit: outputs '
        f'{"reordered" if reordered else "in jax.jit pairing"} on this '
        f'backend; products at Precision.{args.precision.upper()})')
  print(f'{"":<20} {"ms/step":>9} {"state MB":>9} {"compile s":>10}')
  print(f'{"adam":<20} {a_ms:>9.1f} {a_bytes / 2**20:>9.1f} {a_c:>10.1f}')
  print(f'{"lora_rite":<20} {r_ms:>9.1f} {r_bytes / 2**20:>9.1f} '
        f'{r_c:>10.1f}')
  print(f'{"lora_rite, jax.jit":<20} {j_ms:>9.1f} {"":>9} {j_c:>10.1f}   '
        f'(ratio {j_ms / a_ms:.2f}; '
        + ('jax.jit\'s pairing: XLA:CPU copies each factor 3 times)'
           if reordered else 'the same pairing as donating_jit here)'))
  print(f'{"lora_rite, eigh R^+":<20} {e_ms:>9.1f} {"":>9} {e_c:>10.1f}   '
        f'(ratio {e_ms / a_ms:.2f}; R^+ by eigh, not Cholesky)')
  (sa_ms, _, sa_c), (sr_ms, _, sr_c) = compare(
      scanned(params), args.repeats, layout=lro.NNX_LAYOUT.scanned(1),
      precision=args.precision)
  print(f'same pairs, layers stacked (layout=NNX_LAYOUT.scanned(1)): adam '
        f'{sa_ms:.1f} ms, lora_rite {sr_ms:.1f} ms (ratio '
        f'{sr_ms / sa_ms:.2f}), compile {sa_c:.1f} s / {sr_c:.1f} s')
  print(f'lora_rite/adam state-bytes ratio: {r_bytes / a_bytes:.3f}')
  print(f'lora_rite/adam step-time ratio: {r_ms / a_ms:.2f}')


if __name__ == '__main__':
  main()

"""Step time, state memory and compile time of LoRA-RITE vs optax.adam.

On the Gemma-2B LoRA tree of the paper's setup (rank 16 on q, k, v, o, gate,
up, down of 18 layers: 126 pairs, 19.6M parameters) both optimizers run
jitted in the same process, warm, on the same params and gradients; the
median of several steps is reported. Also a sweep over rank and width, and
the compile time of the same step on the Gemma-7B-shaped tree.

Each ratio compares the two optimizers under the same wrapper
(``lro.donating_jit`` or ``jax.jit``). Beside it is the ratio net of the
"floor": a step that does nothing (it returns the params and Adam's state
unchanged) with the same inputs, outputs and wrapper, timed in the same
rounds. A call of a jitted step over a dict of ~250 factors costs time
whatever it computes (flattening ~1000 arguments, dispatch, rebuilding the
outputs, waiting for them); that cost is common to both optimizers and
pulls the plain ratio toward 1, most where the steps themselves are short
(a launch-bound GPU). The net ratio is ``(rite - floor) / (adam - floor)``.

  python benchmarks/optimizer_step.py            # all of it
  python benchmarks/optimizer_step.py --quick    # main table only
  python benchmarks/optimizer_step.py --breakdown  # where the time goes

In every mode the last line is `lora_rite/adam step-time ratio: X.XX`: the
plain ratio (no floor subtracted) of the two under ``lro.donating_jit`` on
the Gemma-2B dict.
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


def positive_int(text: str) -> int:
  """An argparse type: an int >= 1 (0 steps had failed after every compile,
  in a median of nothing)."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
  return value


def no_persistent_cache() -> None:
  """Compile for real: with a persistent compilation cache (on by default
  in jax 0.10 once JAX_COMPILATION_CACHE_DIR names a folder) a second run
  timed the cache's load, 0.7 s for a step that compiles in 5."""
  jax.config.update('jax_enable_compilation_cache', False)


def compile_step(tx, params, state, grads, jit=lro.donating_jit, step=None,
                 **jit_kwargs):
  """(jitted step, seconds to trace, lower and compile it).

  The step is ``step`` (by default `_step` of ``tx``: update and apply)
  under ``jit`` with params and state donated; the arguments may be
  arrays or ``jax.ShapeDtypeStruct``s (the same program either way). The
  executable compiled here is the one a call of the jitted step runs.
  """
  jitted = jit(step or _step(tx), donate_argnums=(0, 1), **jit_kwargs)
  start = time.perf_counter()
  jitted.lower(params, state, grads).compile()
  return jitted, time.perf_counter() - start


def prepare(tx, params, grads, jit=lro.donating_jit, step=None,
            **jit_kwargs):
  """(run, state bytes, compile seconds) of a jitted, donating step.

  ``lro.donating_jit`` by default: it gives LoRA-RITE's ``basis`` (the
  params as they were) the donated params' buffer, where ``jax.jit``'s
  in-order pairing makes XLA copy every factor three times per step. For
  Adam the two compile to the same buffer assignment. ``step`` replaces
  the step of ``tx`` (`floor_step`; ``tx`` then only makes the state).
  """

  state = tx.init(params)
  jitted, compile_s = compile_step(tx, params, state, grads, jit, step,
                                   **jit_kwargs)
  state_bytes = tree_bytes(state)
  carry = [jax.tree.map(jnp.copy, params), state]

  def run():
    """Seconds of one step, called as a training loop calls it: through
    the wrapper (its own per-call work included), not the executable."""
    start = time.perf_counter()
    carry[:] = jitted(*carry, grads)
    jax.block_until_ready(carry)
    return time.perf_counter() - start

  for _ in range(2):  # warm (the first call traces again; XLA's compile
    run()             # from above is reused)
  return run, state_bytes, compile_s


def _step(tx):
  """``(params, state, grads) -> (new params, state)`` of ``tx``."""
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def floor_step(params, state, grads):
  """The floor: a step's inputs and outputs, and no work.

  Under the same wrapper and with the same trees as a real step (the
  caller passes ``keep_unused=True`` so that ``grads`` reach the compiled
  call as they do a real step's), it times what every call costs whatever
  it computes: flattening the arguments, dispatch, rebuilding the outputs,
  waiting for them.
  """
  del grads
  return params, state


def prepare_floor(params, grads, lr=1e-4, jit=lro.donating_jit):
  """`prepare` of `floor_step` with Adam's state (505 leaves on the
  Gemma-2B dict; LoRA-RITE's has 508)."""
  return prepare(optax.adam(lr), params, grads, jit, step=floor_step,
                 keep_unused=True)


def net_ratio(rite_ms, adam_ms, floor_ms) -> float:
  """``(rite - floor) / (adam - floor)``: the ratio of what each step costs
  above the floor (nan when either is not above it: the floor's noise
  then decides the sign, as on the tests' tiny trees)."""
  if adam_ms - floor_ms <= 0 or rite_ms - floor_ms <= 0:
    return float('nan')
  return (rite_ms - floor_ms) / (adam_ms - floor_ms)


def interleaved_times(fns, repeats, seed=0) -> list[list[float]]:
  """What each of ``fns`` returns (seconds of one step), ``repeats`` times,
  the calls alternating so that load from other processes falls on all
  alike.

  The order is shuffled each round (seeded), so that no variant always
  runs first or right after the same other one. (On an H200, in two runs
  with a fixed order, LoRA-RITE under ``donating_jit``, second of four
  rows, ran 3-4 ms slower than under ``jax.jit``, third; on CPU, with tiny
  factors, the two ran within 0-3% of each other.)"""
  times = [[] for _ in fns]
  rng = np.random.default_rng(seed)
  for _ in range(repeats):
    for i in rng.permutation(len(fns)):
      times[i].append(fns[i]())
  return times


def _interleaved_medians(runs, repeats) -> list[float]:
  """ms/step of each of `prepare`'s ``runs``, by `interleaved_times`."""
  return [statistics.median(t) * 1e3 for t in
          interleaved_times([r[0] for r in runs], repeats)]


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


def gradients(params):
  """Random gradients of 1e-3 the params' shapes, for every timing.

  Not proportional to the params: those drove some factors toward rank
  deficiency within three steps, so that LoRA-RITE took its eigh fallback
  (``linalg.inverse_root``) where the main table's steps take Cholesky.
  """
  return jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape)
                      * 1e-3, params)


def breakdown(params, repeats, lr=1e-4) -> dict[str, float]:
  """ms/step of adam, lora_rite, `passes_only` and the floor
  (`floor_step`) on ``params``, and the same four on a tree of the same
  pairs with tiny factors (widths 32-128: the step's fixed cost), with the
  compiled instruction counts of adam and lora_rite there."""
  out = {}
  n_layers = len(params)
  tiny = lora_tree(64, 64, 32, 128, n_layers, rank=16)
  for name, tree in (('', params), ('tiny ', tiny)):
    grads = gradients(tree)
    runs = {'adam': prepare(optax.adam(lr), tree, grads),
            'lora_rite': prepare(lro.lora_rite(lr), tree, grads),
            'passes only': prepare(optax.chain(
                passes_only(), optax.scale_by_learning_rate(lr)), tree,
                                   grads),
            'floor': prepare_floor(tree, grads, lr)}
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


ROWS = ('adam', 'lora_rite', 'floor', 'adam, jax.jit', 'lora_rite, jax.jit',
        'floor, jax.jit', 'lora_rite, eigh R^+')


def timed_rows(params, repeats, lr=1e-4, layout=lro.NNX_LAYOUT,
               plain_jit=False, eigh=False, precision='highest',
               floor=False) -> dict[str, tuple[float, int, float]]:
  """{row: (ms/step, state bytes, compile s)}, rows in `ROWS`' order.

  Always 'adam' and 'lora_rite', under ``lro.donating_jit``. With
  ``floor``, 'floor' (`floor_step`, the same wrapper); with ``plain_jit``,
  'adam, jax.jit' and 'lora_rite, jax.jit' (and 'floor, jax.jit' with
  ``floor``): the same steps under ``jax.jit``'s own buffer pairing; with
  ``eigh``, 'lora_rite, eigh R^+' (``donating_jit``). All rows' steps
  alternate (`interleaved_times`), so that load from other processes falls
  on all alike; the ratio of the medians of two rows under the same
  wrapper is what to compare across machines.
  """
  grads = gradients(params)
  rite = lambda: lro.lora_rite(lr, layout=layout, precision=precision)
  runs = {'adam': prepare(optax.adam(lr), params, grads),
          'lora_rite': prepare(rite(), params, grads)}
  if floor:
    runs['floor'] = prepare_floor(params, grads, lr)
  if plain_jit:
    runs['adam, jax.jit'] = prepare(optax.adam(lr), params, grads,
                                    jit=jax.jit)
    runs['lora_rite, jax.jit'] = prepare(rite(), params, grads, jit=jax.jit)
    if floor:
      runs['floor, jax.jit'] = prepare_floor(params, grads, lr, jit=jax.jit)
  if eigh:
    with eigh_qr():
      runs['lora_rite, eigh R^+'] = prepare(rite(), params, grads)
  ms = _interleaved_medians(list(runs.values()), repeats)
  return {name: (m, b, c) for (name, (_, b, c)), m in zip(runs.items(), ms)}


def compare(params, repeats, lr=1e-4, layout=lro.NNX_LAYOUT,
            plain_jit=False, eigh=False, precision='highest', floor=False):
  """The rows of `timed_rows` as a tuple, (adam, lora_rite, ...) first:
  each (ms/step, state bytes, compile s)."""
  return tuple(timed_rows(params, repeats, lr, layout, plain_jit, eigh,
                          precision, floor).values())


# The rank/width sweep (module-level so that a test can shrink it). Below
# SWEEP_WIDE a width gets 4 layers with a 4x MLP (28 pairs); from SWEEP_WIDE
# on 1 layer with a 1x MLP (7 pairs): the column is not a pure width trend.
SWEEP_RANKS = (4, 16, 64)
SWEEP_WIDTHS = (1024, 4096, 16384)
SWEEP_WIDE = 16384


def sweep_model(width) -> tuple[tuple[int, int, int, int, int], str]:
  """(`lora_tree`'s shape arguments, column label) of a sweep width."""
  if width < SWEEP_WIDE:
    return (width, width, width // 8, 4 * width, 4), \
        f'{width} (4 layers, 4x MLP)'
  return (width, width, width // 8, width, 1), f'{width} (1 layer, 1x MLP)'


def _fmt(x: float) -> str:
  return 'n/a' if x != x else f'{x:.2f}'  # nan: a step not above the floor


def _sweep(repeats):
  print(f'\nsweep (q/k/v/o/gate/up/down shapes of each width: 4 layers '
        f'with a 4x MLP below {SWEEP_WIDE}, 1 layer with a 1x MLP from '
        f'{SWEEP_WIDE}; lro.donating_jit; median of {repeats} steps; net: '
        'net of the floor):')
  print(f'{"rank":>5} {"width":>24} {"params":>11} {"adam ms":>9} '
        f'{"rite ms":>9} {"floor ms":>9} {"ratio":>6} {"net":>6}')
  cells = {}
  for rank in SWEEP_RANKS:
    for width in SWEEP_WIDTHS:
      shape, label = sweep_model(width)
      params = lora_tree(*shape, rank)
      rows = timed_rows(params, repeats, floor=True)
      a_ms, r_ms, f_ms = (rows[k][0] for k in ('adam', 'lora_rite', 'floor'))
      n = sum(x.size for x in jax.tree.leaves(params))
      cells[rank, width] = (r_ms / a_ms, net_ratio(r_ms, a_ms, f_ms))
      print(f'{rank:>5} {label:>24} {n:>11,} {a_ms:>9.1f} {r_ms:>9.1f} '
            f'{f_ms:>9.1f} {r_ms / a_ms:>6.2f} '
            f'{_fmt(cells[rank, width][1]):>6}')
  labels = [sweep_model(w)[1] for w in SWEEP_WIDTHS]
  print('ratio lora_rite/adam (net of the floor), rank \\ width:')
  print(f'{"rank":>5} ' + ' '.join(f'{label:>24}' for label in labels))
  for rank in SWEEP_RANKS:
    print(f'{rank:>5} ' + ' '.join(
        f'{f"{cells[rank, w][0]:.2f} ({_fmt(cells[rank, w][1])})":>24}'
        for w in SWEEP_WIDTHS))


def _compile_7b():
  """Compile time of the Gemma-2B table's lora_rite program (the whole
  step under ``lro.donating_jit``) on the Gemma-7B-shaped dict, from
  abstract arguments (nothing allocated)."""
  tx = lro.lora_rite(1e-4)
  params = jax.eval_shape(lambda: lora_tree(*MODELS['gemma-7b'], rank=16))
  state = jax.eval_shape(tx.init, params)
  _, compile_s = compile_step(tx, params, state, params)
  print(f'\ngemma-7b tree ({sum(x.size for x in jax.tree.leaves(params)):,} '
        f'params, {len(jax.tree.leaves(params)) // 2} pairs): lora_rite step '
        f'(update and apply, lro.donating_jit, as the gemma-2b rows) compile '
        f'{compile_s:.1f} s')


def _print_breakdown(repeats):
  params = lora_tree(*MODELS['gemma-2b'], rank=16)
  b = breakdown(params, repeats)
  print(f'gemma-2b LoRA tree ({len(jax.tree.leaves(params)) // 2} pairs), '
        'and the same pairs with factors 32-128 wide ("tiny"), '
        'lro.donating_jit, ms/step (floor: a step that does nothing, same '
        'inputs, outputs and wrapper):')
  for key, value in b.items():
    print(f'  {key:<24} {value:>9.1f}')
  net = lambda k, p='': _fmt(net_ratio(b[f'{p}{k} ms'], b[f'{p}adam ms'],
                                       b[f'{p}floor ms']))
  print(f'lora_rite/adam {b["lora_rite ms"] / b["adam ms"]:.2f} (net of '
        f'the floor {net("lora_rite")}), its N x r passes alone/adam '
        f'{b["passes only ms"] / b["adam ms"]:.2f} (net '
        f'{net("passes only")}); tiny factors: lora_rite/adam '
        f'{b["tiny lora_rite ms"] / b["tiny adam ms"]:.2f} (net '
        f'{net("lora_rite", "tiny ")})')
  print(f'lora_rite/adam step-time ratio: '
        f'{b["lora_rite ms"] / b["adam ms"]:.2f}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='only the Gemma-2B table')
  parser.add_argument('--repeats', type=positive_int, default=7)
  parser.add_argument('--sweep_repeats', type=positive_int, default=3,
                      help='steps per row of the rank/width sweep')
  parser.add_argument('--precision', default='highest',
                      choices=('highest', 'high', 'default'),
                      help="LoRA-RITE's matrix-product precision in the "
                      'Gemma-2B table (accelerators round float32 products '
                      'below highest: TF32 on NVIDIA GPUs, bfloat16 on TPU)')
  parser.add_argument('--breakdown', action='store_true',
                      help='only where LoRA-RITE\'s step time goes: its '
                      'N x r passes alone, the fixed cost on tiny factors, '
                      'and the floor')
  no_persistent_cache()
  args = parser.parse_args(argv)
  if args.breakdown and args.precision != 'highest':
    # It had been ignored: the breakdown's steps are the default's.
    parser.error('--precision is for the Gemma-2B table, not --breakdown')
  print(f'devices: {jax.devices()}')
  if args.breakdown:
    _print_breakdown(args.repeats)
    return

  if not args.quick:
    _sweep(args.sweep_repeats)
    _compile_7b()

  params = lora_tree(*MODELS['gemma-2b'], rank=16)
  n = sum(x.size for x in jax.tree.leaves(params))
  pairs = len(jax.tree.leaves(params)) // 2
  rows = timed_rows(params, args.repeats, plain_jit=True, eigh=True,
                    precision=args.precision, floor=True)
  # Asked of donating_jit itself, for these arguments: where it reorders is
  # its decision, not this script's.
  reordered = lro.donating_jit(lambda p: p, donate_argnums=0
                               ).reorders_outputs(params)
  print(f'\ngemma-2b LoRA tree: {pairs} pairs, {n:,} params, rank 16 '
        '(lro.donating_jit: outputs '
        f'{"reordered" if reordered else "in jax.jit pairing"} on this '
        f'backend; products at Precision.{args.precision.upper()})')
  print(f'{"":<20} {"ms/step":>9} {"state MiB":>10} {"compile s":>10}')
  for name, (row_ms, state_bytes, compile_s) in rows.items():
    mib = f'{state_bytes / 2**20:.1f}' if name in ('adam',
                                                    'lora_rite') else ''
    print(f'{name:<20} {row_ms:>9.1f} {mib:>10} {compile_s:>10.1f}')
  print("floor: a step that returns the params and Adam's state unchanged, "
        'with the same inputs, outputs and wrapper (what any call costs: '
        'flattening, dispatch, output rebuilding, blocking); net of the '
        'floor: (rite - floor) / (adam - floor), n/a where either is not '
        'above the floor')
  ms = {name: row[0] for name, row in rows.items()}
  print(f'{"lora_rite/adam, same wrapper on both sides":<44} {"ratio":>6} '
        f'{"net of the floor":>17}')
  for label, rite, adam, floor, note in (
      ('lora_rite, both lro.donating_jit', 'lora_rite', 'adam', 'floor', ''),
      ('lora_rite, both jax.jit', 'lora_rite, jax.jit', 'adam, jax.jit',
       'floor, jax.jit',
       '   (jax.jit\'s pairing: XLA:CPU copies each lora_rite factor 3 times)'
       if reordered else '   (the same pairing as donating_jit here)'),
      ('lora_rite eigh R^+, both donating_jit', 'lora_rite, eigh R^+', 'adam',
       'floor', '   (R^+ by eigh, not Cholesky)')):
    print(f'  {label:<42} {ms[rite] / ms[adam]:>6.2f} '
          f'{_fmt(net_ratio(ms[rite], ms[adam], ms[floor])):>17}{note}')
  stacked = timed_rows(scanned(params), args.repeats,
                       layout=lro.NNX_LAYOUT.scanned(1),
                       precision=args.precision, floor=True)
  (sa_ms, _, sa_c), (sr_ms, _, sr_c), (sf_ms, _, _) = stacked.values()
  print(f'same pairs, layers stacked (layout=NNX_LAYOUT.scanned(1)): adam '
        f'{sa_ms:.1f} ms, lora_rite {sr_ms:.1f} ms, floor {sf_ms:.1f} ms '
        f'(ratio {sr_ms / sa_ms:.2f}, net of the floor '
        f'{_fmt(net_ratio(sr_ms, sa_ms, sf_ms))}), compile {sa_c:.1f} s / '
        f'{sr_c:.1f} s')
  a_bytes, r_bytes = rows['adam'][1], rows['lora_rite'][1]
  print(f'lora_rite/adam state-bytes ratio: {r_bytes / a_bytes:.3f}')
  print(f'lora_rite/adam step-time ratio: {ms["lora_rite"] / ms["adam"]:.2f}')


if __name__ == '__main__':
  main()

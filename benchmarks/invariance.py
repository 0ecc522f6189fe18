"""Adam vs LoRA-RITE on equivalent LoRA pairs: whose update of H = A B depends on scale?

A LoRA regression y = x A B is trained from the same H = A B written
three ways, (A s, B / s) for s in 0.1, 1, 10. An invariant optimizer follows
one H trajectory for all three; Adam follows three. Prints the spread of the
trajectories and the final losses, and saves a plot.

  python benchmarks/invariance.py --out demo_out
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

# Before LAPACK loads: jaxlib's batched CPU eigh already uses every core,
# and OpenBLAS threads on top oversubscribe them (see optimizer_step.py).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
# Runs from a clone without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

import lora_rite_optax as lro

SCALES = (0.1, 1.0, 10.0)
# The loss and the measured H at full float32 precision, as in
# matmul_precision.py: at the default precision a GPU computes float32
# products in TF32 (a TPU in bfloat16), and that rounding would leak into
# the measured gap; only the optimizers' own products should differ.
HIGHEST = jax.lax.Precision.HIGHEST


def product(a, b):
  """H = A B at ``Precision.HIGHEST``."""
  return jnp.matmul(a, b, precision=HIGHEST)


def make_problem(seed: int = 0, d_in: int = 32, d_out: int = 24, rank: int = 4,
                 n: int = 256):
  """A regression whose residual is exactly a rank-`rank` update."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in)).astype(np.float32)
  delta = (rng.normal(size=(d_in, rank)) @ rng.normal(size=(rank, d_out)) /
           np.sqrt(d_in)).astype(np.float32)
  y = x @ delta + 0.01 * rng.normal(size=(n, d_out)).astype(np.float32)
  a = (rng.uniform(-1, 1, (d_in, rank)) / np.sqrt(d_in)).astype(np.float32)
  # B starts small but nonzero so that the scaled copies differ from step 0.
  b = (0.01 * rng.normal(size=(rank, d_out))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y), jnp.asarray(a), jnp.asarray(b)


def loss_fn(params, x, y):
  return jnp.mean(
      (product(product(x, params['lora_a']), params['lora_b']) - y)**2)


def train(tx, params, x, y, steps):
  """Returns the loss and H after every step (of the same params: the
  loss had been the one before the step, a step behind H)."""

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return params, state, loss_fn(params, x, y)

  state = tx.init(params)
  losses, hs = [], []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
    hs.append(np.asarray(product(params['lora_a'], params['lora_b'])))
  return np.array(losses), np.stack(hs)


def run(steps: int = 200, lr: float = 1e-2):
  """For each optimizer: the loss curves and the H spread over the scales."""
  x, y, a, b = make_problem()
  results = {}
  for name, make in (('adam', lambda: optax.adam(lr)),
                     ('lora_rite', lambda: lro.lora_rite(lr))):
    curves, trajectories = [], []
    for s in SCALES:
      losses, hs = train(make(), {'lora_a': a * s, 'lora_b': b / s}, x, y,
                         steps)
      curves.append(losses)
      trajectories.append(hs)
    trajectories = np.stack(trajectories)  # (scale, step, d_in, d_out)
    # Per scale and step: the relative gap of H from the scale-1 run's.
    gaps = (np.linalg.norm(trajectories - trajectories[1:2], axis=(2, 3)) /
            np.linalg.norm(trajectories[1:2], axis=(2, 3)))
    results[name] = dict(curves=np.stack(curves), gaps=gaps,
                         spread=gaps.max(axis=0))
  return results


def plot(results, path: pathlib.Path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, style in (('adam', '--'), ('lora_rite', '-')):
    for s, curve in zip(SCALES, results[name]['curves']):
      axes[0].semilogy(curve, style, label=f'{name}, (A*{s:g}, B/{s:g})')
    axes[1].semilogy(results[name]['spread'] + 1e-12, style, label=name)
  axes[0].set(title='training loss', xlabel='step')
  axes[1].set(title='max relative gap of H from the (A, B) run',
              xlabel='step')
  for ax in axes:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='demo_out', help='folder for the plot')
  parser.add_argument('--steps', type=int, default=200,
                      help='optimizer steps per run (default 200)')
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f'--steps must be >= 1, got {args.steps}')
  try:  # Before the training: only the train extra installs it.
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    parser.error('the plot needs matplotlib: pip install -e ".[train]"')
  # Before the training: a bad --out had ended it in a traceback.
  out = pathlib.Path(args.out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    parser.error(f'--out {args.out}: {e.strerror or e}')
  path = out / 'invariance.png'
  if path.exists() and not path.is_file():
    parser.error(f'--out {args.out}: invariance.png there is not a file')
  results = run(args.steps)
  print(f'{"optimizer":<10} {"scale":>6} {"final loss":>11}  '
        'max gap of H vs scale 1')
  for name, r in results.items():
    for s, curve, gap in zip(SCALES, r['curves'], r['gaps']):
      print(f'{name:<10} {s:>6g} {curve[-1]:>11.5f}  {gap.max():.2e}')
  plot(results, path)
  print(f'plot: {path}')
  return results


if __name__ == '__main__':
  main()

"""End-to-end train-step time of LoRA-RITE vs Adam on the real Gemma 3 270M.

Both optimizers run through the training loop's own step
(`train.step.make_train_step`: forward, backward with respect to the LoRA
factors only, optimizer update, update-size metrics), jitted, on the same
model, adapters (rank 16 on q, k, v, o, gate, up, down), batch and initial
LoRA parameters, in one process. Timed steps alternate between the two
optimizers so that load changes on a shared machine hit both alike, in an
order shuffled each round (seeded: `interleaved_times` of
benchmarks/optimizer_step.py), so that neither always runs first; the
median is reported.

  python benchmarks/train_step.py                  # real 270M (GGUF package)
  python benchmarks/train_step.py --model gemma3-270m-random
                                # the 270M architecture, random weights: for a
                                # machine the 253 MB checkpoint cannot reach
                                # (step time does not depend on the values)
  python benchmarks/train_step.py --model tiny     # random tiny model (tests)

The last line is `lora_rite/adam train-step ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Sets OPENBLAS_NUM_THREADS=1 before jax loads LAPACK (see train/__init__.py).
import train  # pylint: disable=unused-import,g-import-not-at-top

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from train import configs
from train import loop
from train import optim as optim_lib
from train import step as step_lib

# The sibling script by its path, for its seeded interleaving (benchmarks/
# is not a package; see matmul_precision.py).
_spec = importlib.util.spec_from_file_location(
    'optimizer_step',
    os.path.join(os.path.dirname(os.path.abspath(__file__)),
                 'optimizer_step.py'))
optimizer_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(optimizer_step)


def make_config(args) -> configs.Config:
  """The benchmark's configuration (the loop's own Config)."""
  if args.model == 'tiny':
    model = configs.ModelConfig(name='gemma3-tiny', tokenizer='byte',
                                dtype=args.dtype)
  elif args.model == 'gemma3-270m-random':
    # Byte tokens are ids below 256 of the real 262k vocabulary: the
    # embedding and the unembedding at the loss positions cost what they do
    # with the real tokenizer.
    model = configs.ModelConfig(name='gemma3-270m', tokenizer='byte',
                                dtype=args.dtype)
  else:
    model = configs.ModelConfig(path=loop.GGUF_PACKAGE, dtype=args.dtype)
  return configs.Config(
      name='train_step_benchmark', model=model,
      lora=configs.LoraConfig(rank=args.rank, alpha=float(args.rank),
                              dropout=0.0, targets=configs.GEMMA_TARGETS),
      optim=configs.OptimConfig(name='lora_rite', learning_rate=1e-4,
                                warmup_steps=0, schedule='constant'),
      data=configs.DataConfig(task='arithmetic', seq_len=args.seq_len,
                              max_target_tokens=args.max_targets,
                              num_train_examples=200, num_threads=0),
      eval=configs.EvalConfig(before=False, after=False),
      steps=1000, batch_size=args.batch, progress=False,
      export_adapter=False)


def jitted_steps(r: loop.Run, cfg: configs.Config) -> tuple[dict, dict]:
  """({optimizer: jitted train step}, {optimizer: its initial state}) for
  lora_rite and adam, each as the loop compiles and places its own.

  The state is created in the shardings the step is jitted with: a state
  placed otherwise (uncommitted, as a plain ``jax.jit(tx.init)`` returns
  it) made the first call compile a step that the second, fed the first's
  sharded outputs, compiled again (seen on an H200: 32 s more for
  lora_rite, 20 s for adam).
  """
  steps, states = {}, {}
  for name in ('lora_rite', 'adam'):
    tx, schedule = optim_lib.make_optimizer(
        configs.replace(cfg.optim, name=name), cfg.steps)
    param_sh = r.state_shardings['params']
    # Copies: each optimizer's step donates its own params.
    params = jax.device_put(jax.tree.map(jnp.copy, r.state['params']),
                            param_sh)
    states[name], state_sh = loop.fresh_state(params, param_sh, tx, r.mesh)
    steps[name] = loop.jit_train_step(r, tx, schedule, state_sh)
  return steps, states


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model',
                 choices=('gemma3-270m', 'gemma3-270m-random', 'tiny'),
                 default='gemma3-270m')
  p.add_argument('--dtype', default='float32',
                 choices=('float32', 'bfloat16', 'auto'),
                 help='compute dtype (the loop\'s model.dtype)')
  p.add_argument('--rank', type=optimizer_step.positive_int, default=16)
  p.add_argument('--batch', type=optimizer_step.positive_int, default=8)
  p.add_argument('--seq_len', type=int, default=64)
  p.add_argument('--max_targets', type=int, default=8,
                 help='loss positions per row (unembedded positions; 0: '
                 'all)')
  p.add_argument('--steps', type=optimizer_step.positive_int, default=7,
                 help='timed steps per optimizer (after 2 warm-up steps)')
  args = p.parse_args(argv)
  optimizer_step.no_persistent_cache()  # it prints compile times

  cfg = make_config(args)
  t0 = time.perf_counter()
  try:
    r = loop.build(cfg)
  except loop.ConfigError as e:  # e.g. a --seq_len of 1: one line
    raise SystemExit(f'error: {e}') from None
  print(f'built (model load, adapters) in {time.perf_counter() - t0:.1f}s; '
        f'backend {jax.default_backend()}, {jax.device_count()} device(s)',
        flush=True)
  raw = next(iter(loop.train_dataset(r)))
  batch, _ = step_lib.prepare_batch(raw, r.max_targets)
  tokens = int((np.asarray(raw['segment_ids']) > 0).sum())
  batch = {k: v[None] for k, v in batch.items()}  # accum = 1 micro-batch.

  steps, states = jitted_steps(r, cfg)

  def one(name):
    t = time.perf_counter()
    states[name], m = steps[name](states[name], r.base, r.rngs, batch)
    jax.block_until_ready((states[name], m))
    return time.perf_counter() - t

  for name in steps:
    c = one(name)
    print(f'{name}: compile + first step {c:.1f}s', flush=True)
    one(name)  # Second warm-up step (B is non-zero from here on).
  # Interleaved, in a seeded order shuffled each round: shared-machine load
  # hits both, and neither always runs first or after the other.
  names = list(steps)
  times = dict(zip(names, optimizer_step.interleaved_times(
      [lambda n=n: one(n) for n in names], args.steps)))

  print(f'model {args.model}, LoRA r{args.rank} on '
        f'{len(configs.GEMMA_TARGETS)} projections, batch {args.batch} x '
        f'seq {args.seq_len} ({tokens} non-pad tokens), '
        f'{r.max_targets} loss positions/row, '
        f'{loop.resolved_dtypes(cfg)["dtype"]} compute, '
        f'median of {args.steps} '
        'interleaved warm jitted steps (order shuffled each round)')
  med = {}
  for name, ts in times.items():
    med[name] = statistics.median(ts)
    print(f'{name:>10}: {1e3 * med[name]:9.1f} ms/step  '
          f'(min {1e3 * min(ts):.1f}, max {1e3 * max(ts):.1f})  '
          f'{tokens / med[name]:8.1f} tokens/s')
  print(f'lora_rite/adam train-step ratio: '
        f'{med["lora_rite"] / med["adam"]:.2f}')


if __name__ == '__main__':
  main()

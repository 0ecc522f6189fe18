"""benchmarks/train_step.py on the tiny model: both optimizers' steps run
and each compiles once."""

import argparse

import jax
import numpy as np

from tests import benchmark_scripts
from train import loop


def test_each_optimizers_step_compiles_once_and_trains():
  bench = benchmark_scripts.load('train_step')
  args = argparse.Namespace(model='tiny', dtype='float32', rank=4, batch=2,
                            seq_len=32, max_targets=4, steps=1)
  cfg = bench.make_config(args)
  r = loop.build(cfg)
  raw = next(iter(loop.train_dataset(r)))
  batch, _ = loop.prepare_batch(raw, r.max_targets)
  batch = {k: v[None] for k, v in batch.items()}
  steps, states = bench.jitted_steps(r, cfg)
  assert set(steps) == {'lora_rite', 'adam'}
  for name, step in steps.items():
    state = states[name]
    for _ in range(3):
      state, metrics = step(state, r.base, r.rngs, batch)
    # A state placed unlike the step's outputs made the second call compile
    # the step again (on an H200: 32 s more for lora_rite).
    assert step._cache_size() == 1, name  # pylint: disable=protected-access
    assert int(state['step']) == 3, name
    assert np.isfinite(float(metrics['loss'])), name
    # Each optimizer donated its own copy: the run's params are untouched.
    assert all(not x.is_deleted() for x in jax.tree.leaves(r.state['params']))

"""The scratch memory XLA assigns one train step of a config.

For scripts the tests run in a subprocess, whose XLA_FLAGS (fake devices,
a pass turned off) must be set before jax is imported.
"""

from train import distributed
from train import loop


def step_temp_bytes(cfg) -> int:
  """Builds ``cfg``'s run and compiles its step on one batch of its data:
  the compiled step's temporary (scratch) bytes."""
  r = loop.build(cfg)
  batch = r.family.prepare_batch(next(iter(loop.train_dataset(r))), r)[0]
  batch = {k: distributed.global_array(v[None], distributed.batch_sharding(
      r.mesh, v.ndim + 1, leading=1)) for k, v in batch.items()}
  compiled = loop._jitted_step(r).lower(  # pylint: disable=protected-access
      r.state, r.base, r.rngs, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes

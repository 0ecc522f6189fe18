"""Where an optimizer's initial state lives: as the params it is made for.

``jnp.zeros(shape)`` lands on the default device whatever the params'
sharding. ``optax.adam``'s ``init`` (``zeros_like``) keeps each moment on its
param's devices, and a user who calls ``tx.init`` on params sharded over a
mesh (``nnx.Optimizer`` does) expects the same of every optimizer here, not
a whole copy of the state on device 0 until the first jitted update. A
trainer that derives state shardings with ``jax.eval_shape`` is unaffected:
traced leaves are not placed.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def _mesh_sharding(leaf: Any) -> NamedSharding | None:
  """``leaf``'s sharding where it is a concrete array placed on a mesh.

  Only those: zeros committed to a single device, where the params were
  not, made a jitted step compile again at its second call (its outputs
  are uncommitted).
  """
  if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
      return sharding
  return None


def zeros_like(leaf: Any, dtype) -> jax.Array:
  """Zeros of ``leaf``'s shape in ``dtype``, on ``leaf``'s mesh sharding."""
  return jnp.zeros(leaf.shape, dtype, device=_mesh_sharding(leaf))


def replicated_zeros(shape, dtype, like: Iterable[Any]) -> jax.Array:
  """Zeros of ``shape``, replicated over the mesh of the first of ``like``
  placed on one (else where ``jnp.zeros`` puts them): the small statistics
  of factors sharded over a mesh."""
  for leaf in like:
    sharding = _mesh_sharding(leaf)
    if sharding is not None:
      return jnp.zeros(shape, dtype,
                       device=NamedSharding(sharding.mesh, PartitionSpec()))
  return jnp.zeros(shape, dtype)

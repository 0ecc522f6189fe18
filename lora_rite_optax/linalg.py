"""The QR of a tall factor from its Gram matrix, so that it shards well.

A factor ``X`` is ``N x r`` with ``N`` large and possibly sharded across
devices. A Householder QR would gather it onto one device; its Gram matrix
``X^T X = R^T R`` is an all-reduce of ``r x r`` blocks, and any ``R`` with
that Gram serves LoRA-RITE (its update is invariant to rotating the basis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inverse_root(g: jax.Array) -> jax.Array:
  """``R^+ = W diag(lambda^-1/2)`` for a Gram ``g = W diag(lambda) W^T``.

  ``X R^+`` is then an orthonormal basis of ``X``.

  Eigenvalues below ``r * eps`` of the largest (so singular values below
  ``sqrt(r * eps)`` of the largest) count as zero and get a zero column, the
  pseudo-inverse convention: an all-zero factor maps to all zeros.
  """
  lam, w = jnp.linalg.eigh(g)
  r = g.shape[-1]
  tol = r * jnp.finfo(g.dtype).eps
  keep = (lam > tol * lam[..., -1:]) & (lam > jnp.finfo(g.dtype).tiny)
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
  return w * inv_sqrt[..., None, :]

"""Small dense linear algebra for rank-r factors, written to shard well.

A factor is a stack of tall matrices ``(slices, N, r)`` with ``N`` large and
possibly sharded across devices, and ``r`` small. Everything here touches the
long axis only through matmuls with ``r x r`` matrices and Gram matrices
``X^T X``, so under SPMD the only cross-device traffic is an all-reduce of
``r x r`` blocks; no ``N x r`` array is ever gathered (a Householder QR would
gather it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gram(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x^T y`` over the long axis: ``(..., N, r), (..., N, s) -> (..., r, s)``."""
  return jnp.einsum('...ni,...nj->...ij', x, y)


def _inverse_root(g: jax.Array) -> jax.Array:
  """``W diag(lambda^-1/2) `` for ``g = W diag(lambda) W^T``, null-safe.

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


def orthonormal_basis(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Reduced QR ``x = U R`` from Gram matrices: returns ``(R^+, U)``.

  ``R^+`` is ``r x r`` and ``U = x R^+`` has orthonormal columns spanning
  ``x`` (zero columns for null directions). ``R`` itself is any square root
  of ``x^T x``; the LoRA-RITE update does not depend on which one (it is
  invariant to a rotation of the basis). One Gram pass squares the condition
  number, so a second pass re-orthonormalises ``U`` (as in CholeskyQR2):
  float32 then keeps ``U`` orthonormal to rounding for condition numbers up
  to about ``1 / sqrt(r * eps)``.

  Args:
    x: factors, ``(..., N, r)``.

  Returns:
    ``(rinv, u)`` with shapes ``(..., r, r)`` and ``(..., N, r)``.
  """
  rinv1 = _inverse_root(gram(x, x))
  u1 = x @ rinv1
  rinv2 = _inverse_root(gram(u1, u1))
  return rinv1 @ rinv2, u1 @ rinv2

"""Small dense linear algebra shared by the optimizers.

The QR of a tall factor from its Gram matrix, so that it shards well: a
factor ``X`` is ``N x r`` with ``N`` large and possibly sharded across
devices. A Householder QR would gather it onto one device; its Gram matrix
``X^T X = R^T R`` is an all-reduce of ``r x r`` blocks, and any ``R`` with
that Gram serves LoRA-RITE (its update is invariant to rotating the basis).

And :func:`one_at_a_time`, which keeps batched LAPACK calls from running
concurrently on XLA:CPU, where that can deadlock; and :func:`matmul`, a
float32 product that stays float32 on accelerators.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from lora_rite_optax import placement


def divide_or_zero(x: jax.Array, denom: jax.Array) -> jax.Array:
  """``x / denom``, and 0 where ``denom`` is 0.

  An Adam-style ``m / (sqrt(v) + eps)`` has a zero denominator where there
  is no second moment (an exactly zero gradient entry, e.g. all of
  ``lora_a``'s while ``lora_b`` is 0) and eps is 0, or rounds to 0 in
  float16 (``optax.inject_hyperparams`` casts it to the params' dtype):
  a null direction, with no step, not the 0/0 whose NaN would spread.
  Only an exact 0: a NaN denominator (a NaN gradient's second moment) gives
  NaN, as optax's Adam does, where a 0 would have frozen that entry for
  good without a sign.
  """
  zero = denom == 0
  return jnp.where(zero, 0.0, x / jnp.where(zero, 1.0, denom))


def matmul(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x @ y`` at ``Precision.HIGHEST``.

  The default precision of a float32 product rounds its operands on
  accelerators (to bfloat16 on TPU): fine for a forward pass, not for the
  statistics and factorisations of an optimizer's preconditioner, or for an
  initialisation's ``W0`` offset that must cancel ``A B`` to float32
  rounding. On CPU the precision changes nothing.
  """
  return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def one_at_a_time(fn: Callable[[Any], Any], inputs: Sequence[Any]) -> list:
  """``[fn(x) for x in inputs]``, each call made to wait for the one before.

  On XLA:CPU (jaxlib 0.10) a batched ``eigh``/``svd``/``solve`` splits its
  batch over the intra-op thread pool and blocks a pool thread until the
  pieces are done. Two such calls scheduled at once can each take one of the
  pool's threads (a 2-core host has two) and wait forever for pieces that no
  free thread will run: the step hangs at 0% CPU. Here each input gets an
  exact zero computed from one element of the previous output, a data
  dependency that XLA keeps (an ``optimization_barrier`` is dropped before
  scheduling), so at most one call runs at a time. On GPU and TPU it only
  fixes an order the compiler was free to choose.

  Args:
    fn: the computation, e.g. a batched ``jnp.linalg.eigh``.
    inputs: its arguments, one pytree of floating arrays per call.

  Returns:
    The outputs, in the order of ``inputs``.
  """
  outputs = []
  for x in inputs:
    outputs.append(fn(after(x, outputs[-1]) if outputs else x))
  return outputs


def _matrix_by_matrix(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
  """``fn`` of a batch of matrices, one matrix at a time where needed.

  With several CPU devices in one process (the
  ``--xla_force_host_platform_device_count`` meshes that tests and
  development use), each device's program runs its batched LAPACK call at
  once and they deadlock the shared intra-op pool (see `one_at_a_time`,
  which orders calls within one program only): a ``lax.map`` of single
  matrices never splits work over the pool. Elsewhere the batched call.
  """
  if x.ndim > 2 and jax.default_backend() == 'cpu' and jax.device_count() > 1:
    batch = x.shape[:-2]
    out = jax.lax.map(fn, x.reshape((-1,) + x.shape[-2:]))
    return jax.tree.map(lambda y: y.reshape(batch + y.shape[1:]), out)
  return fn(x)


def eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``jnp.linalg.eigh`` of a batch (see `_matrix_by_matrix`)."""
  lam, q = _matrix_by_matrix(jnp.linalg.eigh, x)
  return lam, q


def eigvalsh(x: jax.Array) -> jax.Array:
  """``jnp.linalg.eigvalsh`` of a batch (see `_matrix_by_matrix`)."""
  return _matrix_by_matrix(jnp.linalg.eigvalsh, x)


def after(x: Any, previous: Any) -> Any:
  """``x`` unchanged, but computed only once ``previous`` is.

  Adds an exact zero made from one element of ``previous`` (non-finite
  values count as zero), so the dependency survives XLA's simplifier; see
  :func:`one_at_a_time`.
  """
  leaf = jax.tree.leaves(previous)[0]
  if not leaf.size:  # nothing to wait for (a factor with a zero-size axis)
    return x
  if placement.explicitly_sharded(leaf):
    # Over Explicit mesh axes a slice of a sharded axis is refused; a
    # reduction to one scalar is not (a max: a sum could overflow to inf).
    first = jnp.max(jnp.where(jnp.isfinite(leaf), leaf, 0)).astype(jnp.float32)
  else:
    # An index, not a ravel: a reshape of a sharded array can gather it.
    first = leaf[(0,) * leaf.ndim].astype(jnp.float32)
  zero = jnp.where(jnp.isfinite(first), first, 0.0) * 0.0
  return jax.tree.map(lambda a: a + zero.astype(a.dtype), x)


def eye_like(x: jax.Array) -> jax.Array:
  """Identity matrices shaped (``..., r, r``), typed and sharded like ``x``.

  Sharded like ``x``: a broadcast eye is replicated (and over Explicit mesh
  axes a triangular solve refuses operands of two batch shardings, and a
  stacked axis would lose its sharding). Of ``x``'s rank: under
  ``jax_numpy_rank_promotion='raise'`` a 2-D eye added to a batch had been
  refused.
  """
  r = x.shape[-1]
  eye = jnp.eye(r, dtype=x.dtype).reshape((1,) * (x.ndim - 2) + (r, r))
  return jnp.zeros_like(x) + eye


def inverse_root(g: jax.Array) -> jax.Array:
  """An ``R^+`` with ``R^+T g R^+`` a projector, for a batch of Grams ``g``.

  ``X R^+`` is then an orthonormal basis of ``X`` when ``g = X^T X``.

  Where every Gram in the batch is well conditioned, ``R^+ = L^-T`` from
  the Cholesky factor ``g = L L^T``: one ``r x r`` factorisation and a
  triangular solve, far cheaper than an eigendecomposition (on CPU, and on
  TPU, where ``eigh`` iterates). Otherwise the whole batch takes
  :func:`eig_inverse_root`, whose pseudo-inverse drops the directions with
  eigenvalues below ``r * eps`` of the largest. The test for "well
  conditioned" is conservative, so that it never takes the Cholesky path
  where the eigendecomposition would have dropped a direction: every
  eigenvalue lies in ``[1 / ||L^-1||_F^2, tr(g)]``, so when
  ``tr(g) ||L^-1||_F^2 < 1 / (r * eps)`` none is dropped and both paths give
  an ``R^+`` of the same span (they differ by a rotation of the basis, which
  LoRA-RITE is invariant to).
  """
  r = g.shape[-1]
  # The Cholesky's NaN for a Gram that is not positive definite (an all-zero
  # lora_b's at the start) is how the fallback is chosen: an eager update
  # under jax_debug_nans had stopped on it. The result is finite. (Not a
  # nested jax.jit, which would put a call in every step's program.)
  with jax.debug_nans(False):
    chol = jnp.linalg.cholesky(g)  # NaN where g is not positive definite
    l_inv = jax.lax.linalg.triangular_solve(chol, eye_like(g), left_side=True,
                                            lower=True)
    bound = (jnp.trace(g, axis1=-2, axis2=-1) *
             jnp.sum(l_inv**2, axis=(-2, -1)))  # >= lambda_max / lambda_min
    tol = r * jnp.finfo(g.dtype).eps
    well = jnp.all(jnp.isfinite(bound) & (bound * tol < 1.0))
    return jax.lax.cond(well, lambda: jnp.swapaxes(l_inv, -1, -2),
                        lambda: eig_inverse_root(g))


def eig_inverse_root(g: jax.Array) -> jax.Array:
  """``R^+ = W diag(lambda^-1/2)`` for a Gram ``g = W diag(lambda) W^T``.

  ``X R^+`` is then an orthonormal basis of ``X``.

  Eigenvalues below ``r * eps`` of the largest (so singular values below
  ``sqrt(r * eps)`` of the largest) count as zero and get a zero column, the
  pseudo-inverse convention: an all-zero factor maps to all zeros.
  """
  lam, w = eigh(g)
  r = g.shape[-1]
  tol = r * jnp.finfo(g.dtype).eps
  keep = (lam > tol * lam[..., -1:]) & (lam > jnp.finfo(g.dtype).tiny)
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
  return w * inv_sqrt[..., None, :]

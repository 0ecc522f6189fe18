"""`lora_rite_optax.linalg.inverse_root`: Cholesky where safe, else eigh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_rite_optax import linalg


def _grams(rng, batch, n, r, dtype=np.float32):
  x = rng.normal(size=(batch, n, r)).astype(dtype)
  return x, np.einsum('bni,bnj->bij', x, x)


def _is_upper_triangular(m):
  return bool(np.all(np.tril(np.asarray(m), -1) == 0))


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_well_conditioned_batch_takes_cholesky_and_orthonormalises(dtype):
  with jax.enable_x64(dtype == np.float64):
    _check_cholesky_path(dtype)


def _check_cholesky_path(dtype):
  x, g = _grams(np.random.default_rng(0), 5, 40, 4, dtype)
  rinv = jax.jit(linalg.inverse_root)(jnp.asarray(g))
  assert rinv.dtype == dtype
  # L^-T is upper triangular; W diag(lambda^-1/2) is not.
  assert all(_is_upper_triangular(m) for m in rinv)
  u = np.einsum('bni,bij->bnj', x, rinv)
  tol = 1e-5 if dtype == np.float32 else 1e-12
  np.testing.assert_allclose(np.einsum('bni,bnj->bij', u, u),
                             np.broadcast_to(np.eye(4), (5, 4, 4)), atol=tol)
  # The same span as the eigendecomposition's R^+: R^+ R^+T = g^-1 for both.
  eig = linalg.eig_inverse_root(jnp.asarray(g))
  np.testing.assert_allclose(rinv @ np.swapaxes(rinv, -1, -2),
                             eig @ np.swapaxes(eig, -1, -2), rtol=1e-4)


def test_one_rank_deficient_gram_sends_the_batch_to_eigh():
  _, g = _grams(np.random.default_rng(1), 3, 40, 4)
  g[1] = 0.0  # an all-zero lora_b, as at the first step
  rinv = jax.jit(linalg.inverse_root)(jnp.asarray(g))
  # Jitted against eager: equal to rounding (Cholesky's triangular L^-T is
  # nowhere near eigh's symmetric root, so this still tells the two apart).
  np.testing.assert_allclose(rinv, linalg.eig_inverse_root(jnp.asarray(g)),
                             rtol=1e-5, atol=1e-6)
  assert np.all(rinv[1] == 0) and np.all(np.isfinite(rinv))


@pytest.mark.parametrize('diag', [
    (1.0, 1e-7),
    # Between eps and r * eps of the largest (r = 2, then 4): a tolerance
    # of eps alone, not r * eps, would invert these.
    (1.0, 1.5e-7),
    (1.0, 1.0, 1.0, 4.2e-7)])
def test_positive_definite_but_below_tolerance_is_not_inverted(diag):
  """Cholesky succeeds on these in float32, but the smallest is below
  r * eps (2.4e-7 for r = 2) of the largest eigenvalue: the
  eigendecomposition drops that direction, so inverse_root must not invert
  it either."""
  g = jnp.asarray(np.diag(diag).astype(np.float32))[None]
  assert np.all(np.isfinite(jnp.linalg.cholesky(g)))
  want = np.diag([1.0] * (len(diag) - 1) + [0.0])
  for rinv in (linalg.inverse_root(g), linalg.eig_inverse_root(g)):
    np.testing.assert_allclose(rinv[0] @ rinv[0].T, want, atol=1e-6)


def test_just_above_tolerance_is_inverted_by_both_paths():
  g = np.diag([1.0, 1e-4]).astype(np.float32)[None]
  for rinv in (linalg.inverse_root(jnp.asarray(g)),
               linalg.eig_inverse_root(jnp.asarray(g))):
    np.testing.assert_allclose(rinv[0] @ rinv[0].T, np.diag([1.0, 1e4]),
                               rtol=1e-5)


def test_after_a_zero_size_output_returns_x():
  x = jnp.ones((2, 2))
  for prev in (jnp.zeros((0, 3)), jnp.zeros((2, 0, 3))):
    np.testing.assert_array_equal(linalg.after(x, prev), x)
    np.testing.assert_array_equal(jax.jit(linalg.after)(x, prev), x)

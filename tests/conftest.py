"""Shared test setup."""

# Sets OPENBLAS_NUM_THREADS=1 before jax loads LAPACK (see train/__init__.py).
import train  # pylint: disable=unused-import


import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-order


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache():
  """Fails a test that sets JAX's persistent compilation cache: JAX
  sets it up once per process and for good, so every later test in the
  worker would compile through it (benchmarks/reproduce.py's main did)."""
  before = jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR
  yield
  assert jax.config.jax_compilation_cache_dir == before, (
      'a test set the persistent compilation cache: '
      f'{jax.config.jax_compilation_cache_dir}')

"""Shared test setup."""

import os
import shutil
import tempfile

# One persistent XLA compilation cache for the whole run, shared by the
# xdist workers and the subprocesses tests start (they inherit this
# environment): many tests build the same tiny models, and each loop.run
# jits its step afresh. In a folder made for this run alone, so nothing
# compiled by another checkout or jax version is read back. jax caches only
# compiles of a second or more (its default): caching every small compile
# too, under jax's file lock, made the suite a third slower. Without that
# lock a process could read an entry another is still writing; jax then
# warns and compiles it itself. Set before jax is imported, which reads
# these variables once.
_RUN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _RUN_CACHE = tempfile.mkdtemp(prefix='lro-tests-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _RUN_CACHE

# Sets OPENBLAS_NUM_THREADS=1 before jax loads LAPACK (see train/__init__.py).
import train  # pylint: disable=unused-import,g-import-not-at-top,wrong-import-position


import jax  # pylint: disable=g-import-not-at-top,wrong-import-order,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-order,wrong-import-position


def pytest_unconfigure(config):
  del config
  # Only the process that made the folder (the controller under xdist)
  # removes it; the workers found it in their environment.
  if _RUN_CACHE is not None:
    shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _same_compilation_cache_for_every_test():
  """Fails a test that moves JAX's persistent compilation cache: JAX sets
  it up once per process and for good, so every later test in the worker
  would compile through it (benchmarks/reproduce.py's main did). A test
  that switches the cache off (the benchmarks time real compiles) has it
  switched back on after it."""
  before = jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR
  enabled = jax.config.jax_enable_compilation_cache
  yield
  jax.config.update('jax_enable_compilation_cache', enabled)
  assert jax.config.jax_compilation_cache_dir == before, (
      'a test set the persistent compilation cache: '
      f'{jax.config.jax_compilation_cache_dir}')

"""Shared test setup."""

import atexit
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
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _RUN_CACHE = tempfile.mkdtemp(prefix='lro-tests-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _RUN_CACHE
  # Removed by the process that made it (the controller under xdist; the
  # workers find it in their environment), at exit: also after a usage
  # error, when pytest_unconfigure never runs.
  atexit.register(shutil.rmtree, _RUN_CACHE, ignore_errors=True)

# Compiles at LLVM's level 0, here and in the tests' subprocesses
# (tests/xla_flags.py says why); before jax is imported, which reads
# XLA_FLAGS once.
from tests import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags.FLAGS).strip()

# Sets OPENBLAS_NUM_THREADS=1 before jax loads LAPACK (see train/__init__.py).
import train  # pylint: disable=unused-import,g-import-not-at-top,wrong-import-position


import jax  # pylint: disable=g-import-not-at-top,wrong-import-order,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-order,wrong-import-position

# jax before 0.7 (the library admits 0.6; `make test-oldest` runs its tests
# there) has the x64 context manager only as jax.experimental.enable_x64.
if not hasattr(jax, 'enable_x64'):
  from jax.experimental import enable_x64 as _enable_x64  # pylint: disable=g-import-not-at-top
  jax.enable_x64 = _enable_x64


@pytest.fixture(autouse=True)
def _same_compilation_cache_for_every_test():
  """Fails a test that moves JAX's persistent compilation cache: JAX sets
  it up once per process and for good, so every later test in the worker
  would compile through it (benchmarks/reproduce.py's main did). A test
  that switches the cache off (the benchmark scripts, which time real
  compiles) has the flag set back after it. (jax decides once per process,
  at its first compile, whether to use the cache, so in a test the flag
  changes nothing: the benchmarks' smoke tests time cache loads, and their
  timings are not what they check.)"""
  before = jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR
  enabled = jax.config.jax_enable_compilation_cache
  yield
  jax.config.update('jax_enable_compilation_cache', enabled)
  assert jax.config.jax_compilation_cache_dir == before, (
      'a test set the persistent compilation cache: '
      f'{jax.config.jax_compilation_cache_dir}')

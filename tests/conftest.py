"""Shared test setup."""

# Sets OPENBLAS_NUM_THREADS=1 before jax loads LAPACK (see train/__init__.py).
import train  # pylint: disable=unused-import

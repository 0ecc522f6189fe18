"""Shared test setup."""

import os

# jaxlib's CPU eigh/solve already spread a batch over XLA's threads;
# OpenBLAS's own threads on top oversubscribe the cores (a rank-64
# LoRA-RITE step ran 5x slower). Must be set before LAPACK loads.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

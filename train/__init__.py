"""Fine-tuning with LoRA-RITE: data, training loop, evaluation, CLI.

Runs from a clone; not part of the `lora_rite_optax` wheel.
"""

import os

# jaxlib's CPU eigh/solve already spread a batch over XLA's threads;
# OpenBLAS's own threads on top oversubscribe the cores (a rank-64
# LoRA-RITE step ran 5x slower). Must be set before LAPACK loads.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

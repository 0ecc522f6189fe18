"""LoRA-RITE on 8 fake CPU devices (data=8 and fsdp=4 x tensor=2 meshes).

The checks live in tests/sharding_check.py and run in a fresh process, since
the fake device count must be set before jax is imported: state shardings
derived with eval_shape + tree_map_params, sharding kept through update,
sharded == unsharded, and no all-gather of a factor in the compiled HLO (with
a Householder QR as the control that the detector does fire).
"""

import os
import pathlib
import subprocess
import sys

from tests import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lora_rite_shards_without_gathering_factors():
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags.FLAGS)
  proc = subprocess.run([sys.executable, str(ROOT / 'tests/sharding_check.py')],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  import jax  # pylint: disable=g-import-not-at-top
  from lora_rite_optax import placement  # pylint: disable=g-import-not-at-top
  if placement._jax_version() >= placement._EXPLICIT_AXES_JAX:  # pylint: disable=protected-access
    explicit = ['ok explicit axes', 'ok explicit donated']
  else:  # make test-oldest: the refusals instead (sharding_check.py)
    explicit = [
        'ok explicit axes: refused by LoRA-RITE, ScaledAdam and Shampoo on '
        f'jax {jax.__version__}', 'ok explicit donated: not on this jax']
  assert proc.stdout.splitlines() == [
      'ok detector', 'ok init placed', 'ok stacked layers', *explicit,
      'ok data=8', 'ok fsdp=4 x tensor=2'], proc.stdout


_EIGH_ON_TWO_DEVICES = '''
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import lora_rite_optax as lro
mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
key = jax.random.key(0)
params = {f'p{i}': {'lora_a': jax.random.normal(jax.random.fold_in(key, i),
                                                (256, 16)) / 16,
                    'lora_b': jnp.full((16, 256), 0.01)} for i in range(16)}
params = jax.device_put(params, NamedSharding(mesh, P()))
for tx in (lro.lora_rite(1e-2), lro.lora_rite(1e-2, escape_mass=True),
           lro.shampoo(1e-2)):
  state = tx.init(params)
  u, _ = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.cos, p), s, p))(
      params, state)
  jax.block_until_ready(u)
  print('ok', flush=True)
'''


def test_batched_eigh_does_not_deadlock_two_cpu_devices():
  """With two CPU devices in one process, each device's batched eigh ran at
  once and they deadlocked the shared thread pool: LoRA-RITE at rank 16 and
  Shampoo hung in their first step on any fake-device mesh (and the escaped
  mass's eigvalsh, after eigh was mended)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
             XLA_FLAGS=xla_flags.with_devices(2))
  proc = subprocess.run([sys.executable, '-c', _EIGH_ON_TWO_DEVICES],
                        capture_output=True, text=True, env=env, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.split() == ['ok', 'ok', 'ok']

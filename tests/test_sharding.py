"""LoRA-RITE on 8 fake CPU devices (data=8 and fsdp=4 x tensor=2 meshes).

The checks live in tests/sharding_check.py and run in a fresh process, since
the fake device count must be set before jax is imported: state shardings
derived with eval_shape + tree_map_params, sharding kept through update,
sharded == unsharded, and no all-gather of a factor in the compiled HLO (with
a Householder QR as the control that the detector does fire).
"""

import pathlib
import subprocess
import sys

import jax
import pytest

from lora_rite_optax import placement
from tests import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lora_rite_shards_without_gathering_factors():
  env = xla_flags.script_env()
  proc = subprocess.run([sys.executable, str(ROOT / 'tests/sharding_check.py')],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
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
  env = xla_flags.script_env(2)
  proc = subprocess.run([sys.executable, '-c', _EIGH_ON_TWO_DEVICES],
                        capture_output=True, text=True, env=env, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.split() == ['ok', 'ok', 'ok']


_PLACEMENT_HELPERS = '''
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from lora_rite_optax import placement as pl
E, A = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
auto = jax.make_mesh((4, 2), ('f', 't'), axis_types=(A, A))
explicit = jax.make_mesh((4, 2), ('f', 't'), axis_types=(E, E))
mixed = jax.make_mesh((4, 2), ('f', 't'), axis_types=(E, A))
put = lambda mesh, spec, shape: jax.device_put(jnp.ones(shape),
                                               NamedSharding(mesh, spec))

# stacked_axis_sharding: the layers' mesh axes only where every factor's
# first stacked axis, and only it, is split alike and the layers divide.
sas = pl.stacked_axis_sharding
a = put(auto, P('f'), (8, 16, 4))
assert sas([a, a], [1, 1], 8) == 'f'
assert sas([a, a], [0, 0], 8) is None            # not stacked
assert sas([a], [1], 6) is None                   # 6 layers over 4 devices
assert sas([put(auto, P(), (8, 16, 4)), a], [1, 1], 8) is None  # one whole
assert sas([a, put(auto, P('t'), (8, 16, 4))], [1, 1], 8) is None
assert sas([put(auto, P('f', 't'), (4, 2, 4))], [2], 8) is None  # 2nd split
assert sas([put(explicit, P('f'), (8, 16, 4))], [1], 8) is None

# zeros_beside: replicated spelt as a step writes it (P() on Auto axes,
# also when split_axis names no mesh axes), split along the layers if asked.
zb = lambda split: pl.zeros_beside((2, 8, 3, 3), jnp.float32, [a],
                                   split_axis=split).sharding.spec
assert zb(None) == P() and zb((1, None)) == P(), (zb(None), zb((1, None)))
assert zb((1, 'f')) == P(None, 'f'), zb((1, 'f'))

# stacks_split_apart: one factor's layers split and the other's whole is
# fine; any split after the first stacked axis is not, in either factor.
e = lambda spec: put(explicit, spec, (8, 4))
ssa = pl.stacks_split_apart
assert not ssa(e(P('f')), e(P()), 1) and not ssa(e(P()), e(P('f')), 1)
assert ssa(e(P('f')), e(P('t')), 1) and not ssa(e(P('f')), e(P('f')), 1)
assert ssa(e(P(None, 't')), e(P()), 2) and ssa(e(P()), e(P(None, 't')), 2)

# reduced_sharding keeps the stacked axes' mesh axes.
assert pl.reduced_sharding(put(explicit, P('f', 't'), (8, 4, 6)), (0,)
                           ).spec == P('f', None, None)

# reshape_sharding: the last merged axis split is refused as the middle one
# is; splitting an axis back needs its first part to divide.
rs = lambda spec, shape, new: pl.reshape_sharding(put(explicit, spec, shape),
                                                  new)
for spec, shape, new, words in (
    (P(None, 't'), (4, 6, 8), (24, 8), "merge an axis split over 't'"),
    (P(None, None, 't'), (2, 3, 4, 8), (24, 8), "merge an axis split over 't'"),
    (P('f'), (24, 8), (6, 4, 8), "split 4 ways over 'f' 6 long"),
    (P('f'), (24, 8), (2, 12, 8), "split 4 ways over 'f' 2 long")):
  try:
    rs(spec, shape, new)
  except pl.UnplacedReshape as err:
    assert words in str(err), str(err)
  else:
    raise AssertionError(f'placed: {spec} {shape} -> {new}')
assert rs(P('f'), (24, 8), (4, 6, 8)).spec == P('f', None, None)
assert rs(P(None, 'f'), (1, 48, 4), (8, 6, 4)).spec == P('f', None, None)

# constrain on a mesh mixing Explicit and Auto axes: every axis placed, an
# entry naming both (Explicit first) kept whole, Auto before Explicit refused.
def placed(mesh, spec, x):
  return jax.jit(lambda y: pl.constrain(y, NamedSharding(mesh, spec), 'w'))(
      x).sharding
m0 = put(mixed, P(), (8, 4))
assert placed(mixed, P('f', 't'), m0).is_equivalent_to(
    NamedSharding(mixed, P('f', 't')), 2)
assert placed(mixed, P(None, 't'), m0).is_equivalent_to(
    NamedSharding(mixed, P(None, 't')), 2)
assert placed(mixed, P(('f', 't')), m0).is_equivalent_to(
    NamedSharding(mixed, P(('f', 't'))), 2)
assert placed(explicit, P(('f', 't')), put(explicit, P(), (8, 4))
              ).is_equivalent_to(NamedSharding(explicit, P(('f', 't'))), 2)
try:
  placed(mixed, P(('t', 'f')), m0)
except ValueError as err:
  assert 'names an Auto mesh axis before an Explicit one' in str(err)
else:
  raise AssertionError('an Auto axis before an Explicit one was placed')
print('ok', flush=True)
'''


@pytest.mark.skipif(
    placement._jax_version() < placement._EXPLICIT_AXES_JAX,  # pylint: disable=protected-access
    reason='Explicit mesh axes need jax 0.10 (make test-oldest runs 0.6)')
def test_placement_helpers_on_eight_devices():
  """placement's helpers at the edges sharding_check.py's training runs do
  not reach: uneven or partly split stacked layers, the spelling of
  replicated statistics, reshapes the Explicit axes cannot hold, and
  out_shardings over a mesh that mixes Explicit and Auto axes."""
  env = xla_flags.script_env(8)
  proc = subprocess.run([sys.executable, '-c', _PLACEMENT_HELPERS],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.split() == ['ok']

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

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lora_rite_shards_without_gathering_factors():
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, str(ROOT / 'tests/sharding_check.py')],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  for line in ('ok detector', 'ok data=8', 'ok fsdp=4 x tensor=2'):
    assert line in proc.stdout

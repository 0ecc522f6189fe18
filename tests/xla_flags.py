"""The XLA flags every test process compiles with, subprocesses included,
and the environment a test gives a script it starts (`script_env`).

The tests compile hundreds of small programs and run each a few times. On
CPU most of such a compile is LLVM optimising the generated code, which
buys nothing at these sizes: at level 0 two of the slowest test files
(test_lora_rite.py, test_train_t5.py) took a fifth less CPU time (282 s
against 353 s, run side by side). Tests only: benchmarks, `make demo` and
training compile at XLA's default level.

tests/conftest.py adds FLAGS to the pytest process's XLA_FLAGS; a test that
starts a script gives it FLAGS as its XLA_FLAGS (not the caller's, whose
device count would clash with the script's own), and the script appends
its fake device count.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = '--xla_backend_optimization_level=0'


def with_devices(count: int) -> str:
  """FLAGS and ``count`` fake CPU devices: a script's whole XLA_FLAGS."""
  return f'{FLAGS} --xla_force_host_platform_device_count={count}'


def script_env(devices: int | None = None, *, drop: tuple[str, ...] = (),
               **extra: str) -> dict[str, str]:
  """The environment of a script a test starts from the clone: this one's
  less the variables named (or prefixed) in ``drop``, with the clone first
  on PYTHONPATH, XLA_FLAGS set to FLAGS (with ``devices`` fake CPU devices,
  where given; else the script sets its own count), JAX on CPU, and
  ``extra`` on top."""
  env = {k: v for k, v in os.environ.items()
         if not (drop and k.startswith(drop))}
  env['PYTHONPATH'] = os.pathsep.join(
      [ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
  env['XLA_FLAGS'] = FLAGS if devices is None else with_devices(devices)
  env['JAX_PLATFORMS'] = 'cpu'
  env.update(extra)
  return env

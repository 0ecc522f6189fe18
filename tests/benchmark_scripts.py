"""The scripts under benchmarks/, imported as modules for their smoke tests.

benchmarks/ is not a package (each script runs as `python benchmarks/x.py`),
so the tests load them by path.
"""

import importlib.util
import os
import sys
import types

_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks')


def load(name: str) -> types.ModuleType:
  """benchmarks/<name>.py as module ``name``, registered in sys.modules
  (dataclasses resolve their annotations through it)."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(_DIR, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module

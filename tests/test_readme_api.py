"""The README's code runs, and its signatures are the library's."""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_rite_optax as lro

README = (pathlib.Path(__file__).parent.parent / 'README.md').read_text()
PYTHON_BLOCKS = re.findall(r'^```python\n(.*?)^```', README, re.S | re.M)


def _block(first_line: str) -> str:
  (block,) = [b for b in PYTHON_BLOCKS if b.startswith(first_line)]
  return block


def test_usage_examples_run():
  """Usage's two blocks, with a loss of the LoRA params (the README leaves
  `loss_fn` and `batch` to the user): the jitted step matches an eager
  update and moves B from 0 (the first step's warmup rate is 0)."""
  target = jax.random.normal(jax.random.key(1), (512, 512)) / 512

  def loss_fn(params, batch=None):
    delta = params['q']['lora_a'] @ params['q']['lora_b']
    return jnp.mean((delta - target) ** 2) * (1.0 if batch is None else batch)

  namespace = {'loss_fn': loss_fn, 'batch': 1.0}
  exec(_block('import jax'), namespace)  # pylint: disable=exec-used
  first = namespace['params']
  tx, state = namespace['tx'], namespace['state']
  updates, _ = tx.update(jax.grad(loss_fn)(first), state, first)
  want = optax.apply_updates(first, updates)
  exec(_block('def step'), namespace)  # pylint: disable=exec-used
  got = namespace['params']
  for key in ('lora_a', 'lora_b'):
    np.testing.assert_allclose(got['q'][key], want['q'][key], atol=1e-7)
  assert float(jnp.abs(got['q']['lora_b']).min()) > 0
  counts = optax.tree_utils.tree_get_all_with_path(namespace['state'], 'count')
  assert counts and all(int(count) == 2 for _, count in counts)


def _signature_mentions():
  """(name, [argument texts]) of every `name(arg, kw=default, ...)` in the
  README whose arguments are all names (a signature, not a call such as
  `lro.shampoo(1e-3, b2=1.0)`), for names the library exports."""
  api = re.sub(r'#[^\n]*', '', _block('lro.lora_rite('))
  mentions = re.findall(r'lro\.(\w+)\((.*?)\)\s*(?=lro\.|$)', api, re.S)
  mentions += re.findall(r'`(?:lro\.)?(?:init\.)?(\w+)\(([^`]*)\)`', README)
  for name, args in mentions:
    fn = getattr(lro, name, None) or getattr(lro.init, name, None)
    if not inspect.isfunction(fn):
      continue
    depth, parts, current = 0, [], ''
    for ch in args:
      depth += (ch in '([{') - (ch in ')]}')
      if ch == ',' and not depth:
        parts.append(current)
        current = ''
      else:
        current += ch
    parts = [' '.join(p.split()) for p in parts + [current]]
    parts = [p for p in parts if p not in ('', '...', '*')
             and not p.startswith('**')]
    if all(re.fullmatch(r'\w+(=.+)?', p) for p in parts):
      yield name, fn, parts


def test_signatures_in_the_readme_are_the_librarys():
  """Each argument a README signature names exists, with the default it
  gives (a default changed in the code had left the README behind)."""
  seen = set()
  for name, fn, parts in _signature_mentions():
    seen.add(name)
    parameters = inspect.signature(fn).parameters
    # In the signature's order (a swapped b1, b2 had passed).
    order = [list(parameters).index(p.partition('=')[0]) for p in parts
             if p.partition('=')[0] in parameters]
    assert order == sorted(order), (name, parts)
    for part in parts:
      key, _, default = part.partition('=')
      assert key in parameters, (name, key, list(parameters))
      if default and default != '...':
        want = eval(default, {'lro': lro})  # pylint: disable=eval-used
        got = parameters[key].default
        if isinstance(got, jax.lax.Precision):
          got = str(got).lower()  # 'highest' is Precision.HIGHEST.
        assert got == want and type(got) is type(want), (name, key, got)
  assert {'lora_rite', 'scale_by_lora_rite', 'donating_jit', 'loraplus',
          'scaled_adam', 'shampoo', 'pissa', 'lora_ga'} <= seen


def test_optimizer_names_in_the_readme_are_the_librarys():
  names = re.search(r'name in lro\.OPTIMIZER_NAMES: (.*)',
                    _block('tx = lro.optimizer(')).group(1)
  assert tuple(names.split(', ')) == tuple(lro.OPTIMIZER_NAMES)



def _imports(path: pathlib.Path) -> set[str]:
  """Every module a file imports ('from a import b' gives a and a.b)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return names


def _needs_more_than_the_library(path: pathlib.Path, seen=()) -> bool:
  """Whether a test file imports, itself or through a tests/ helper, what
  the oldest venv lacks: the models, the trainer's modules, their extras."""
  for name in _imports(path):
    # benchmarks/ runs from a clone with the full venv, as train/ does.
    if name.split('.')[0] in ('flax', 'models', 'orbax', 'grain', 'gguf') or (
        name.startswith('train.')) or name == 'tests.benchmark_scripts':
      return True
    helper = path.parent / (name.split('.')[1] + '.py') if name.startswith(
        'tests.') else None
    if helper and helper.is_file() and helper not in seen and (
        _needs_more_than_the_library(helper, (*seen, path))):
      return True
  return False


def test_the_oldest_versions_run_every_library_only_test_file():
  """`make test-oldest` lists the test files that need the library alone:
  one added without being listed (this file had been) never ran on the
  oldest versions pyproject.toml admits, which the README says they do."""
  root = pathlib.Path(__file__).parent.parent
  makefile = (root / 'Makefile').read_text()
  listed = set(re.findall(
      r'tests/(test_\w+\.py)',
      re.search(r'^LIBRARY_TESTS :=(.*?)^\S', makefile, re.S | re.M)[1]))
  library_only = {p.name for p in (root / 'tests').glob('test_*.py')
                  if not _needs_more_than_the_library(p)}
  assert len(listed) >= 10 and library_only == listed


def test_the_version_is_pyproject_s():
  # Written twice (pyproject.toml for pip, __version__ for users).
  pyproject = (pathlib.Path(__file__).parent.parent / 'pyproject.toml'
               ).read_text()
  assert re.findall(r'^version = "(.*)"$', pyproject, re.M) == [
      lro.__version__]

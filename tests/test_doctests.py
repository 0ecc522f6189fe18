"""The docstring examples of the library run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import lora_rite_optax

MODULES = sorted(
    f'lora_rite_optax.{m.name}'
    for m in pkgutil.iter_modules(lora_rite_optax.__path__))


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS |
                           doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f'{result.failed} doctest failures in {name}'


def test_every_public_optimizer_has_an_example():
  for name in ('lora_rite', 'scale_by_lora_rite', 'balance_lora_factors',
               'loraplus', 'scaled_adam', 'shampoo'):
    doc = getattr(lora_rite_optax, name).__doc__
    assert '>>>' in doc and 'Args:' in doc and 'Returns:' in doc, name

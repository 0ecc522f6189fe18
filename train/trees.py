"""Pytree keys as orbax and JSON want them, and as NNX gives them back."""

from __future__ import annotations


def str_keys(tree):
  """Nested dict with every key a string (orbax and JSON friendly)."""
  if isinstance(tree, dict):
    return {str(k): str_keys(v) for k, v in tree.items()}
  return tree


def int_keys(tree):
  """Inverse of `str_keys` for NNX pure dicts (list indices are ints)."""
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): int_keys(v)
            for k, v in tree.items()}
  return tree


def _key_name(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_names(path) -> tuple[str, ...]:
  """A key path (jax.tree_util's) as plain names: dict keys, attribute
  names and sequence indices alike, as strings."""
  return tuple(_key_name(k) for k in path)

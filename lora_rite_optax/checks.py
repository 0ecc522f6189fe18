"""Checks of optimizer hyperparameters, made where their values are known.

A hyperparameter is a Python number, a concrete array (what
``optax.inject_hyperparams`` hands an ``init`` outside jit) or a tracer
(inside jit: unknown, so not checked). A bad value gets one ``ValueError``
line naming the optimizer, the argument and the allowed range.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_ADVICE = 'pass hyperparam_dtype=jnp.float32 to optax.inject_hyperparams'


def _narrow(value: Any) -> bool:
  """Whether ``value`` is an array of a float type under 32 bits."""
  dtype = getattr(value, 'dtype', None)
  return (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
          and jnp.finfo(dtype).bits < 32)


def _rounds_to_one_above(dtype) -> float:
  """The value above which ``dtype`` rounds a number below 1 to 1."""
  return 1 - float(jnp.finfo(dtype).epsneg) / 2


def shown(value: Any, limit: int = 80) -> str:
  """``repr(value)`` on one line and at most ``limit`` characters: an
  array's repr spans lines, and an error must stay one line."""
  text = ' '.join(repr(value).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def is_integer(value: Any) -> bool:
  """Whether ``value`` is an integer (``operator.index`` takes it: numpy's
  too, not 2.0 and not True)."""
  return not isinstance(value, bool) and hasattr(type(value), '__index__')


def floating_dtype(who: str, name: str, value: Any,
                   allowed: str = 'a floating dtype') -> None:
  """``value`` must name a floating dtype; else one error naming ``name``.

  An integer dtype had truncated silently (a first moment, a LoRA factor's
  init, a model's activations), a bool one made everything True.
  """
  try:
    dtype = None if value is None else jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    got = shown(value) if dtype is None else dtype.name
    raise ValueError(f'{who}: {name} must be {allowed}, got {got}.')


def concrete(value: Any) -> float | None:
  """``value`` as a float, or None while it is traced (or not a number)."""
  if isinstance(value, (jax.core.Tracer, str, bytes)) or callable(value):
    return None
  if np.iscomplexobj(value):
    # float() keeps a numpy complex's real part (with only a warning).
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _known(who: str, name: str, value: Any,
           schedule_ok: bool = False) -> float | None:
  """``value`` as a float; None while traced (or a schedule, where
  ``schedule_ok``); else one error.

  None, a string or a list had passed every check as if traced, and failed
  later with a traceback (or, for an optimizer, at the first update); so had
  a schedule given for a hyperparameter optax does not schedule (b1, eps).
  A bool is not a number here, though Python's float() takes it.
  """
  if isinstance(value, (bool, np.bool_)) or (
      getattr(value, 'dtype', None) == np.bool_):
    # float(True) is 1.0: lora_rite(True) had trained at a rate of 1.
    raise ValueError(f'{who}: {name} must be a number, got {shown(value)}.')
  v = concrete(value)
  if v is None and not (isinstance(value, jax.core.Tracer) or
                        (schedule_ok and callable(value))):
    if callable(value):
      raise ValueError(
          f'{who}: {name} must be a number, got {shown(value)} (only the '
          'learning rate and weight decay take a schedule; wrap the '
          'optimizer in optax.inject_hyperparams to schedule others).')
    raise ValueError(f'{who}: {name} must be a number, got {shown(value)}.')
  return v


def beta(who: str, name: str, value: Any) -> None:
  """A moment decay must be in [0, 1).

  At 1 the bias correction is 0/0 at the first step (a NaN state), and
  ``optax.inject_hyperparams`` makes betas arrays of the params' dtype by
  default, in which bfloat16 rounds any beta above 0.998 to 1.
  """
  if isinstance(value, jax.core.Tracer):
    # Unknown while tracing: warn where the usual b2 = 0.999 would round to
    # 1 (bfloat16; float16 keeps it).
    if (name == 'b2' and _narrow(value) and
        _rounds_to_one_above(value.dtype) < 0.999):
      warnings.warn(f'{who}: {name} is a {jnp.dtype(value.dtype).name} '
                    'array, in which values above '
                    f'{_rounds_to_one_above(value.dtype):.4g} round to 1 (NaN '
                    f'steps); {_ADVICE}.', stacklevel=3)
    return
  v = _known(who, name, value)
  if v is not None and not 0 <= v < 1:
    raise ValueError(
        f'{who}: {name} must be in [0, 1), got {v}' +
        (f' ({jnp.dtype(value.dtype).name} rounds it; {_ADVICE})'
         if _narrow(value) else '') + '.')


def positive(who: str, name: str, value: Any) -> None:
  """``value`` > 0 and finite where it is known (an infinite scale, ratio or
  regulariser makes every step NaN or inf)."""
  v = _known(who, name, value)
  if v is not None and not 0 < v < float('inf'):
    raise ValueError(f'{who}: {name} must be > 0 and finite, got {v}.')


def non_negative(who: str, name: str, value: Any,
                 finite: bool = False, schedule_ok: bool = False) -> None:
  """``value`` >= 0 where it is known; with ``finite``, not inf either (an
  infinite eps freezes every factor, an infinite decay makes it inf);
  ``schedule_ok``: a schedule passes (weight decay, which
  ``optax.add_decayed_weights`` schedules)."""
  v = _known(who, name, value, schedule_ok)
  if v is not None and not (v >= 0 and (not finite or v < float('inf'))):
    raise ValueError(f'{who}: {name} must be >= 0' +
                     (' and finite' if finite else '') + f', got {v}.')


def learning_rate(who: str, value: Any, name: str = 'learning_rate') -> None:
  """A schedule (any callable), or a rate >= 0 and finite where it is
  known. None had been optax's identity: a step of rate 1 up the
  gradient."""
  non_negative(who, name, value, finite=True, schedule_ok=True)


def _why_not_the_state(state: Any) -> str:
  """The likely cause of a state that is not the one init() makes."""
  if isinstance(state, (list, dict)):
    # What a checkpointer gives for tuples and NamedTuples without a target.
    return ('restored without a target? restore into '
            'jax.eval_shape(tx.init, params)')
  return "another optimizer's state, or the wrong part of a chain's?"


def _a_kind_of(value: Any) -> str:
  """``value``'s type with its article, as a message names it: 'an
  EmptyState' (not 'a EmptyState'), 'None' (not 'a NoneType')."""
  if value is None:
    return 'None'
  name = type(value).__name__
  return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def state_of(who: str, state: Any, cls: type) -> None:
  """``state`` must be what this transform's ``init`` made: another
  optimizer's state (or None) had failed with an AttributeError."""
  if not isinstance(state, cls):
    raise ValueError(
        f'{who}: the state is {_a_kind_of(state)}, not the '
        f'{cls.__name__} this optimizer\'s init() makes '
        f'({_why_not_the_state(state)}).')


def chain_state_of(who: str, state: Any, length: int) -> None:
  """``state`` must be the tuple of ``length`` states that this optimizer's
  chain (``optax.chain``) makes: None had failed in a TypeError on its
  len(), another optimizer's state in optax's "The number of updates and
  states has to be the same in chain!", naming neither."""
  if (type(state) is tuple and  # pylint: disable=unidiomatic-typecheck
      len(state) == length):
    return
  got = (f'a tuple of {len(state)} states'
         if type(state) is tuple else _a_kind_of(state))  # pylint: disable=unidiomatic-typecheck
  raise ValueError(
      f"{who}: the state is {got}, not the tuple of {length} that this "
      f"optimizer's init() makes ({_why_not_the_state(state)}).")


def flag(who: str, name: str, value: Any) -> None:
  """A switch: a bool, or 0/1 as ``optax.inject_hyperparams`` makes it (an
  array of the hyperparameter dtype), or traced. A string had been taken
  for True where Python tests it (``'no'`` switched it on) and failed at
  the first update where JAX does."""
  if isinstance(value, jax.core.Tracer):
    return
  v = concrete(value)
  if v is None or v not in (0.0, 1.0):
    raise ValueError(f'{who}: {name} must be True or False, got '
                     f'{shown(value)}.')


def state_fits(who: str, state: Any, expected: Any) -> None:
  """``state`` must have the structure and leaf shapes of ``expected``
  (what init() gives the params at hand, or the updates themselves for
  per-leaf moments): a state that init() made for other params had failed
  inside a tree map (ten lines on the structure) or a broadcast (naming no
  leaf)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(state)
  leaves, other = jax.tree_util.tree_flatten(expected)
  if treedef != other:
    raise ValueError(f'{who}: the state does not have the structure of the '
                     'updates (it was made by init() for other params).')
  for (path, m), u in zip(paths, leaves):
    if jnp.shape(m) != jnp.shape(u):
      raise ValueError(
          f"{who}: the state's {jax.tree_util.keystr(path)} has shape "
          f'{jnp.shape(m)}, where these updates need {jnp.shape(u)} (the '
          'state was made by init() for other params).')

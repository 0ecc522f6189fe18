"""Pick any of the paper's optimizers by name: ``optimizer(name, lr, **kw)``."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lora_rite_optax import nan_free_adam
from lora_rite_optax import casting
from lora_rite_optax import checks
from lora_rite_optax import pairs as pairs_lib

__all__ = ['optimizer', 'OPTIMIZER_NAMES']

OPTIMIZER_NAMES = ('lora_rite', 'adam', 'loraplus', 'scaled_adam', 'shampoo',
                   'lamb')


def _check_adam_family(who: str, learning_rate, weight_decay,
                       kwargs) -> None:
  """optax's adamw and lamb check none of these: b2 = 1 had given NaN
  updates at the first step, and a negative eps or decay trained on."""
  checks.learning_rate(who, learning_rate)
  for name in ('b1', 'b2'):
    if name in kwargs:
      checks.beta(who, name, kwargs[name])
  for name in ('eps', 'eps_root'):
    if name in kwargs:
      checks.non_negative(who, name, kwargs[name], finite=True)
  checks.non_negative(who, 'weight_decay', weight_decay,
                      finite=True, schedule_ok=True)
  if 'nesterov' in kwargs:  # 'no' had switched it on
    checks.flag(who, 'nesterov', kwargs['nesterov'])
  if kwargs.get('mu_dtype') is not None:
    checks.floating_dtype(who, 'mu_dtype', kwargs['mu_dtype'],
                          'None or a floating dtype')


def _state_checked(tx: optax.GradientTransformationExtraArgs, who: str,
                   length: int) -> optax.GradientTransformationExtraArgs:
  """``tx`` (a chain of ``length`` steps, Adam's first) whose init refuses
  params it cannot train, and whose update first checks that its state is
  such a chain's and that the Adam moments in it fit the updates: a state
  made for other params had failed in optax's tree map (ten lines on the
  structure) or a broadcast (naming no leaf)."""
  def init_fn(params):
    pairs_lib.check_trainable(who, params)
    return tx.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    pairs_lib.refuse_no_params(who, params)
    # Wrong gradients had been blamed on the state.
    pairs_lib.check_updates_fit(who, updates, params)
    checks.chain_state_of(who, state, length)
    checks.state_of(who, state[0], optax.ScaleByAdamState)
    checks.state_fits(who, state[0].mu, updates)
    # Python numbers too: optax's trust ratio (Lamb) reads their dtype.
    as_arrays = lambda tree: jax.tree.map(jnp.asarray, tree)
    return tx.update(as_arrays(updates), state,
                     None if params is None else as_arrays(params),
                     **extra_args)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _adam(learning_rate, weight_decay=0.0, **kwargs):
  _check_adam_family('adam', learning_rate, weight_decay, kwargs)
  # In float32 on 16-bit params, as the other optimizers keep their state
  # (optax's own Adam gave NaN at float16's first step, and a bfloat16
  # second moment that never decays).
  return _state_checked(casting.with_stable_dtypes(
      nan_free_adam.adamw(learning_rate, weight_decay=weight_decay,
                          **kwargs)), 'adam', 3)


def _lamb(learning_rate, weight_decay=0.0, **kwargs):
  _check_adam_family('lamb', learning_rate, weight_decay, kwargs)
  return _state_checked(casting.with_stable_dtypes(
      nan_free_adam.lamb(learning_rate, weight_decay=weight_decay,
                         **kwargs)), 'lamb', 4)


def _factory(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """(the function called, the function whose signature lists the kwargs)."""
  if name == 'lora_rite':
    # Imported here: lora_rite.py is developed separately.
    from lora_rite_optax.lora_rite import lora_rite  # pylint: disable=g-import-not-at-top
    return lora_rite, lora_rite
  if name == 'adam':
    return _adam, optax.adamw
  if name == 'lamb':
    return _lamb, optax.lamb
  if name == 'loraplus':
    from lora_rite_optax.loraplus import loraplus  # pylint: disable=g-import-not-at-top
    return loraplus, loraplus
  if name == 'scaled_adam':
    from lora_rite_optax.scaled_adam import scaled_adam  # pylint: disable=g-import-not-at-top
    return scaled_adam, scaled_adam
  from lora_rite_optax.shampoo import shampoo  # pylint: disable=g-import-not-at-top
  return shampoo, shampoo


def optimizer(name: str, learning_rate: optax.ScalarOrSchedule,
              **kwargs) -> optax.GradientTransformationExtraArgs:
  """Builds one of the compared optimizers by name.

  ``'adam'`` and ``'lamb'`` are ``optax.adamw`` and ``optax.lamb`` with
  ``weight_decay`` defaulting to 0 (optax's adamw defaults to 1e-4), run
  in float32 on 16-bit float params (the state float32, the updates in the
  gradients' dtype) as the other optimizers are, and with no step, not 0/0,
  where a gradient entry has always been 0 and eps is 0 (``lora_a``'s at a
  standard init);
  ``'lora_rite'``, ``'loraplus'``, ``'scaled_adam'`` and ``'shampoo'`` are this
  library's. ``kwargs`` are the chosen optimizer's keyword arguments.

  Args:
    name: one of ``OPTIMIZER_NAMES``: lora_rite, adam, loraplus, scaled_adam,
      shampoo, lamb.
    learning_rate: a float or an optax schedule.
    **kwargs: passed to the optimizer (for example ``weight_decay``, ``b2``,
      ``lr_ratio`` for loraplus, ``block_size`` for shampoo).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Under
    ``optax.inject_hyperparams(optimizer)(name, learning_rate, **kwargs)``
    the learning rate is injected and ``kwargs`` stay fixed; to inject those
    too, wrap the named optimizer (``optax.inject_hyperparams(lro.lora_rite)``).

  Raises:
    ValueError: for an unknown name or a keyword the optimizer does not take.

  Example:
    >>> import lora_rite_optax as lro
    >>> tx = lro.optimizer('loraplus', 1e-4, lr_ratio=8.0)
    >>> lro.optimizer('sgd', 1e-4)
    Traceback (most recent call last):
    ...
    ValueError: unknown optimizer 'sgd'; choose one of: lora_rite, adam, loraplus, scaled_adam, shampoo, lamb.
  """
  if name not in OPTIMIZER_NAMES:
    raise ValueError(f'unknown optimizer {name!r}; choose one of: '
                     f'{", ".join(OPTIMIZER_NAMES)}.')
  if set(kwargs) == {'kwargs'} and isinstance(kwargs['kwargs'], dict):
    # optax.inject_hyperparams binds this signature and hands **kwargs on
    # as one argument named 'kwargs' (no optimizer takes such a keyword).
    kwargs = dict(kwargs['kwargs'])
  build, documented = _factory(name)
  accepted = [p for p in inspect.signature(documented).parameters
              if p != 'learning_rate']
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ValueError(f'{name}: unknown argument(s) {", ".join(unknown)}; it '
                     f'accepts: {", ".join(accepted)}.')
  return build(learning_rate, **kwargs)

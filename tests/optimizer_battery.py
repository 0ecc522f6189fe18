"""A reusable optax battery for the LoRA optimizers (helpers, not tests).

Modelled on optax's ``contrib/_common_test.py``. Every check takes a factory
``make(learning_rate) -> GradientTransformation`` (it must accept
``learning_rate`` as a keyword, for ``optax.inject_hyperparams``) and raises
``AssertionError`` on failure, so a test file parametrises over optimizers:

  from tests import optimizer_battery as battery

  MAKE = lro.lora_rite  # one object: the checks then share compiled steps

  @pytest.mark.parametrize('check', battery.CHECKS)
  def test_battery(check):
    options = {'bfloat16': dict(min_state_dtype=jnp.float32)}
    battery.run(check, MAKE, 1e-2, **options.get(check, {}))

Per-check options: ``converges(steps, rtol)``, ``inject_hyperparams(steps,
zero_rate_is_no_op, static_args, rtol)``, ``bfloat16(steps,
min_state_dtype)``, ``schedule(zero_rate_is_no_op, rtol)``,
``multisteps(rtol)``, ``scan(steps, rtol)``; ``float16`` and ``extra_args``
take none. Pass ``zero_rate_is_no_op=False`` for an update with a
learning-rate-free part (e.g. a factor-balancing rescale).

The problem is a LoRA least-squares fit: two pairs (one with a 3-D
``lora_b`` as Gemma's einsum factors) with ``lora_b = 0`` at the start, as
standard LoRA init, and rank-2 targets ``H* = A* B*``; the loss is
``sum_pairs mean((A B - H*)^2)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

Make = Callable[..., optax.GradientTransformation]

# (lora_a shape, lora_b shape) of the battery's pairs.
SHAPES = {'q': ((6, 2), (2, 2, 3)), 'v': ((5, 2), (2, 4))}


def _contract(a, b):
  return jnp.tensordot(a, b, axes=([-1], [0]))


@functools.lru_cache(maxsize=None)
def _targets_and_loss(seed: int):
  rng = np.random.default_rng(seed)
  targets = {}
  for name, (sa, sb) in SHAPES.items():
    a_star, b_star = rng.normal(size=sa), rng.normal(size=sb)
    targets[name] = jnp.asarray(np.tensordot(a_star, b_star, axes=(-1, 0)),
                                jnp.float32)

  def loss(params):
    return sum(
        jnp.mean((_contract(p['lora_a'].astype(jnp.float32),
                            p['lora_b'].astype(jnp.float32))
                  - targets[k]) ** 2)
        for k, p in params.items())

  return targets, loss


def lora_problem(dtype=jnp.float32, seed: int = 0, zero_b: bool = True):
  """(params, targets, loss) for the LoRA least-squares battery problem.

  The loss (and targets) depend only on ``seed``, so every check shares one
  loss function and, through :func:`cached_step`, one compiled step.
  ``zero_b=False`` starts from a random ``lora_b`` instead of zeros: checks
  that compare two runs use it, since from ``lora_b = 0`` Adam-like first
  steps are sign-like and can ill-condition the factors' Gram matrices, which
  amplifies float32 rounding differences between two compiled programs.
  """
  targets, loss = _targets_and_loss(seed)
  rng = np.random.default_rng(seed + 1000)
  params = {}
  for name, (sa, sb) in SHAPES.items():
    a = rng.normal(size=sa)
    b = np.zeros(sb) if zero_b else rng.normal(size=sb)
    params[name] = {'lora_a': jnp.asarray(a, dtype),
                    'lora_b': jnp.asarray(b, dtype)}
  return params, targets, loss


def _random_grads(params, seed: int):
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree.map(
      lambda p: jax.random.normal(next(keys), p.shape, jnp.float32).astype(
          p.dtype), params)


def assert_close(actual, expected, rtol: float = 1e-4) -> None:
  """Per leaf, ``max |actual - expected| <= rtol * max |expected|`` (+1e-12).

  Scale-aware rather than elementwise: adaptive steps have entries near zero
  whose float32 rounding differs between two compiled programs.
  """
  chex.assert_trees_all_equal_structs(actual, expected)
  flat_e = jax.tree.leaves(expected)
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), flat_e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    err, scale = np.max(np.abs(a - e)), np.max(np.abs(e))
    assert err <= rtol * scale + 1e-12, (
        f'{jax.tree_util.keystr(path)}: max error {err:.3g} > {rtol} x '
        f'max |expected| {scale:.3g}')


def make_step(tx: optax.GradientTransformation, loss: Callable[[Any], Any]):
  """A jitted ``(params, state) -> (params, state, updates, loss)`` step."""

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates, value

  return step


_CACHE: dict[Any, Any] = {}


def cached_tx(make: Make, learning_rate) -> optax.GradientTransformation:
  """``make(learning_rate=...)``, built once per (make, learning_rate)."""
  key = ('tx', make, learning_rate)
  if key not in _CACHE:
    _CACHE[key] = make(learning_rate=learning_rate)
  return _CACHE[key]


def cached_step(make: Make, learning_rate, dtype=jnp.float32):
  """The battery's jitted step for (make, learning_rate, dtype), built once.

  Checks share it so that each optimizer compiles its train step once per
  dtype; a jitted function is never reused across dtypes, so
  ``_cache_size()`` still counts recompilations of the same signature.
  """
  key = ('step', make, learning_rate, jnp.dtype(dtype).name)
  if key not in _CACHE:
    _CACHE[key] = make_step(cached_tx(make, learning_rate),
                            _targets_and_loss(0)[1])
  return _CACHE[key]


def check_converges(make: Make, learning_rate: float, steps: int = 300,
                    rtol: float = 1e-2) -> None:
  """The loss falls below ``rtol`` times its initial value in ``steps``."""
  params, _, loss = lora_problem()
  state = cached_tx(make, learning_rate).init(params)
  step = cached_step(make, learning_rate)
  initial = float(loss(params))
  for _ in range(steps):
    params, state, _, _ = step(params, state)
  final = float(loss(params))
  assert np.isfinite(final), f'loss is {final} after {steps} steps'
  assert final < rtol * initial, (
      f'loss {initial:.4g} -> {final:.4g} after {steps} steps; expected < '
      f'{rtol} x initial')


def check_no_recompilation(make: Make, learning_rate: float) -> None:
  """A jitted train step compiles once: the state's types are stable."""
  params, _, _ = lora_problem()
  state = cached_tx(make, learning_rate).init(params)
  step = cached_step(make, learning_rate)
  for _ in range(3):
    params, state, _, _ = step(params, state)
  size = step._cache_size()  # pylint: disable=protected-access
  assert size == 1, f'train step compiled {size} times in 3 calls'


def check_inject_hyperparams(make: Make, learning_rate: float,
                             steps: int = 3,
                             zero_rate_is_no_op: bool = True,
                             static_args: tuple[str, ...] = (),
                             rtol: float = 1e-4,
                             state_rtol: Optional[float] = None) -> None:
  """``optax.inject_hyperparams(make)`` gives the same steps as ``make``.

  Then, with the injected learning rate set to 0, the update is zero (skipped
  when ``zero_rate_is_no_op`` is False, for optimizers whose update has a
  learning-rate-free part). ``static_args`` go to ``inject_hyperparams``
  (arguments that fix shapes, such as Shampoo's ``block_size``); ``rtol`` is
  the tolerance of :func:`assert_close`; ``state_rtol`` (default ``rtol``)
  that of the inner states, or -1 where injecting changes the state's
  structure (LoRA+'s traced weight decay cannot merge its no-decay group).
  """
  params, _, loss = lora_problem(zero_b=False)
  tx_inject = optax.inject_hyperparams(make, static_args=static_args)(
      learning_rate=learning_rate)
  state = cached_tx(make, learning_rate).init(params)
  state_inject = tx_inject.init(params)
  step = cached_step(make, learning_rate)
  step_inject = make_step(tx_inject, loss)
  p, p_inject = params, params
  for _ in range(steps):
    p, state, updates, _ = step(p, state)
    p_inject, state_inject, updates_inject, _ = step_inject(p_inject,
                                                            state_inject)
    assert_close(updates_inject, updates, rtol)
  assert_close(p_inject, p, rtol)
  # The inner state too: the injected optimizer is the same optimizer.
  if state_rtol != -1:
    assert_close(state_inject.inner_state, state, state_rtol or rtol)
  if zero_rate_is_no_op:
    state_inject.hyperparams['learning_rate'] = jnp.zeros_like(
        state_inject.hyperparams['learning_rate'])
    _, _, updates, _ = step_inject(p_inject, state_inject)
    chex.assert_trees_all_close(
        updates, jax.tree.map(jnp.zeros_like, updates), atol=0.0)


def check_bfloat16(make: Make, learning_rate: float, steps: int = 3,
                   min_state_dtype: Optional[Any] = None,
                   dtype: Any = jnp.bfloat16) -> None:
  """bfloat16 params stay bfloat16 (updates too) and finite.

  With ``min_state_dtype`` (e.g. ``jnp.float32``), every floating leaf of the
  optimizer state must be at least that precise. ``dtype``: another
  parameter dtype (:func:`check_float16`).
  """
  params, _, _ = lora_problem(dtype)
  state = cached_tx(make, learning_rate).init(params)
  step = cached_step(make, learning_rate, dtype)
  for _ in range(steps):
    params, state, updates, _ = step(params, state)
  for tree, what in ((params, 'param'), (updates, 'update')):
    for leaf in jax.tree.leaves(tree):
      assert leaf.dtype == dtype, f'{what} dtype {leaf.dtype}'
      assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32)))), (
          f'non-finite {what}')
  if min_state_dtype is not None:
    for leaf in jax.tree.leaves(state):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert jnp.promote_types(leaf.dtype, min_state_dtype) == leaf.dtype, (
            f'state leaf of dtype {leaf.dtype} < {min_state_dtype}')


def check_float16(make: Make, learning_rate: float, steps: int = 3) -> None:
  """float16 params stay float16, finite (eps 1e-8 rounds to 0 in float16,
  which had made Adam's first step 0/0), with a float32 or wider state."""
  check_bfloat16(make, learning_rate, steps, min_state_dtype=jnp.float32,
                 dtype=jnp.float16)


def check_scan(make: Make, learning_rate: float, steps: int = 3,
               rtol: float = 1e-4) -> None:
  """Steps in a ``jax.lax.scan`` (the state carried) equal a Python loop's."""
  params, _, loss = lora_problem(zero_b=False)
  tx = cached_tx(make, learning_rate)
  step = cached_step(make, learning_rate)
  p, state = params, tx.init(params)
  for _ in range(steps):
    p, state, _, _ = step(p, state)

  def body(carry, _):
    q, s = carry
    grads = jax.grad(loss)(q)
    updates, s = tx.update(grads, s, q)
    return (optax.apply_updates(q, updates), s), None

  (p_scan, state_scan), _ = jax.jit(lambda q, s: jax.lax.scan(
      body, (q, s), None, length=steps))(params, tx.init(params))
  assert_close(p_scan, p, rtol)
  assert_close(state_scan, state, rtol)


def check_extra_args(make: Make, learning_rate: float) -> None:
  """Under ``optax.with_extra_args_support``, an ``update`` given keyword
  arguments it does not use (as a chain hands every member the extra
  arguments of one) works and gives the plain update."""
  params, _, _ = lora_problem(zero_b=False)
  grads = _random_grads(params, 3)
  tx = cached_tx(make, learning_rate)
  extra = optax.with_extra_args_support(tx)
  plain, _ = tx.update(grads, tx.init(params), params)
  with_args, _ = extra.update(grads, extra.init(params), params,
                              unused_loss=jnp.float32(1.0), key='ignored')
  assert_close(with_args, plain, 1e-6)


def check_schedule(make: Make, learning_rate: float,
                   zero_rate_is_no_op: bool = True,
                   rtol: float = 1e-4) -> None:
  """Schedules are followed: ``linear_schedule(lr, 0, 2)`` gives lr, lr/2, 0.

  Its first update must equal the float ``lr``'s and its third must be zero
  (unless ``zero_rate_is_no_op`` is False).
  """
  params, _, loss = lora_problem(zero_b=False)
  _, _, first, _ = cached_step(make, learning_rate)(
      params, cached_tx(make, learning_rate).init(params))
  tx_decay = make(learning_rate=optax.linear_schedule(learning_rate, 0.0, 2))
  state = tx_decay.init(params)
  step = make_step(tx_decay, loss)
  p = params
  for i in range(3):
    p, state, updates, _ = step(p, state)
    if i == 0:
      assert_close(updates, first, rtol)
  for leaf in jax.tree.leaves(p):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  if zero_rate_is_no_op:
    chex.assert_trees_all_close(
        updates, jax.tree.map(jnp.zeros_like, updates), atol=0.0)


def check_multisteps(make: Make, learning_rate: float,
                     rtol: float = 1e-4, dtype=jnp.float32) -> None:
  """``optax.MultiSteps(k=3)``, two cycles: no step twice, then the step on
  the mean gradient, from the inner state the first cycle left (params and
  gradients in ``dtype``)."""
  params, _, _ = lora_problem(dtype, zero_b=False)
  tx = cached_tx(make, learning_rate)
  multi = optax.MultiSteps(tx, every_k_schedule=3)
  state = multi.init(params)
  update = jax.jit(multi.update)
  inner_update = jax.jit(tx.update)
  inner = tx.init(params)
  for cycle in range(2):
    grads = [_random_grads(params, 3 * cycle + i) for i in range(3)]
    for g in grads[:2]:
      skipped, state = update(g, state, params)
      chex.assert_trees_all_close(
          skipped, jax.tree.map(jnp.zeros_like, skipped), atol=0.0)
    last, state = update(grads[2], state, params)
    mean = jax.tree.map(lambda *gs: sum(gs) / 3, *grads)
    expected, inner = inner_update(mean, inner, params)
    assert_close(last, expected, rtol)
    params = optax.apply_updates(params, last)


CHECKS = ('converges', 'no_recompilation', 'inject_hyperparams', 'bfloat16',
          'float16', 'scan', 'extra_args', 'schedule', 'multisteps')

_FUNCTIONS = {
    'converges': check_converges,
    'no_recompilation': check_no_recompilation,
    'inject_hyperparams': check_inject_hyperparams,
    'bfloat16': check_bfloat16,
    'float16': check_float16,
    'scan': check_scan,
    'extra_args': check_extra_args,
    'schedule': check_schedule,
    'multisteps': check_multisteps,
}


def run(check: str, make: Make, learning_rate: float, **kwargs) -> None:
  """Runs one named check; ``kwargs`` go to it (e.g. ``steps``, ``rtol``)."""
  _FUNCTIONS[check](make, learning_rate, **kwargs)


def run_all(make: Make, learning_rate: float,
            options: Optional[dict[str, dict[str, Any]]] = None) -> None:
  """Runs every check; ``options[check]`` are that check's kwargs."""
  options = options or {}
  for check in CHECKS:
    run(check, make, learning_rate, **options.get(check, {}))

"""lro.optimizer(name, learning_rate, **kwargs): every compared optimizer."""

from __future__ import annotations

import functools
import typing

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_rite_optax as lro
from tests import optimizer_battery as battery

# Learning rates at which each optimizer fits the battery's LoRA problem.
RATES = {'lora_rite': 1e-2, 'adam': 1e-2, 'loraplus': 1e-2,
         'scaled_adam': 3e-2, 'shampoo': 1e-2, 'lamb': 3e-2}


def _make(name):
  # A named `learning_rate` argument, as optax.inject_hyperparams needs.
  def make(learning_rate):
    return lro.optimizer(name, learning_rate)
  return make


# One factory object per name, so the battery's compiled steps are shared.
MAKES = {name: _make(name) for name in RATES}


def test_names():
  assert set(lro.OPTIMIZER_NAMES) == set(RATES)


@pytest.mark.parametrize('name', sorted(RATES))
def test_every_name_builds(name):
  params, _, _ = battery.lora_problem()
  tx = lro.optimizer(name, RATES[name])
  assert isinstance(tx, optax.GradientTransformation)
  state = jax.eval_shape(tx.init, params)
  updates, _ = jax.eval_shape(tx.update, params, state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


# adam and lamb are optax's own, reached through the factory; loraplus,
# scaled_adam and shampoo have their battery in test_baselines.py, lora_rite
# in test_lora_rite.py (its convergence through the factory is checked here).
@pytest.mark.parametrize('check', battery.CHECKS)
@pytest.mark.parametrize('name', ['adam', 'lamb'])
def test_battery_of_optax_optimizers(name, check):
  battery.run(check, MAKES[name], RATES[name])


def test_lora_rite_converges_through_the_factory():
  battery.check_converges(MAKES['lora_rite'], RATES['lora_rite'])


def _steps_alike(tx, ref, grads, params, steps):
  """``tx`` and ``ref`` give the same updates, and states of one structure
  and dtypes, over ``steps`` steps from their inits."""
  state, ref_state = tx.init(params), ref.init(params)
  for _ in range(steps):
    got, state = tx.update(grads, state, params)
    want, ref_state = ref.update(grads, ref_state, params)
    chex.assert_trees_all_close(got, want)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    chex.assert_trees_all_equal_dtypes(state, ref_state)


@pytest.mark.parametrize('name,direct', [
    ('lora_rite', lro.lora_rite), ('loraplus', lro.loraplus),
    ('scaled_adam', lro.scaled_adam), ('shampoo', lro.shampoo)])
def test_each_name_is_its_optimizer(name, direct):
  """lro.optimizer(name, ...) steps as the optimizer of that name, with the
  keyword arguments passed on."""
  rng = np.random.default_rng(0)
  params = {'q': {'lora_a': jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
                  'lora_b': jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)}}
  grads = jax.tree.map(lambda p: jnp.cos(p) * p, params)
  kwargs = {'weight_decay': 0.1}
  _steps_alike(lro.optimizer(name, 1e-2, **kwargs), direct(1e-2, **kwargs),
               grads, params, steps=2)


@pytest.mark.parametrize('name,reference', [
    ('adam', functools.partial(optax.adamw, weight_decay=0.0)),
    ('lamb', functools.partial(optax.lamb, weight_decay=0.0)),
])
def test_adam_and_lamb_are_optax_with_zero_decay_by_default(name, reference):
  params = {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.full((2, 4), 0.5)}
  grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype)
                                         ).reshape(p.shape), params)
  tx, ref = lro.optimizer(name, 1e-2), reference(1e-2)
  got, _ = tx.update(grads, tx.init(params), params)
  want, _ = ref.update(grads, ref.init(params), params)
  chex.assert_trees_all_close(got, want)
  # Keyword arguments reach optax: each off its default, over steps (a
  # dropped mask or nesterov had passed the one step with b2 alone).
  kwargs = dict(weight_decay=0.5, b2=0.99, eps_root=1e-8,
                mask={'lora_a': False, 'lora_b': True})
  if name == 'adam':
    kwargs.update(nesterov=True, mu_dtype=jnp.bfloat16)
  tx = lro.optimizer(name, 1e-2, **kwargs)
  _steps_alike(tx, reference(1e-2, **kwargs), grads, params, steps=3)
  # The mask changes the step (so the match above is not vacuous).
  plain = lro.optimizer(name, 1e-2, **{**kwargs, 'mask': None})
  other, _ = plain.update(grads, plain.init(params), params)
  first, _ = tx.update(grads, tx.init(params), params)
  assert not np.allclose(other['lora_a'], first['lora_a'])


def test_kwargs_reach_the_optimizer():
  params = {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.ones((2, 4))}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = lro.optimizer('loraplus', 1.0, lr_ratio=3.0, base=optax.sgd)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates['lora_a'][0, 0]) == -1.0
  assert float(updates['lora_b'][0, 0]) == -3.0


def test_unknown_name_and_kwarg():
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'; choose one "
                     'of: lora_rite, adam, loraplus, scaled_adam, shampoo, '
                     'lamb'):
    lro.optimizer('sgd', 1e-3)
  with pytest.raises(ValueError, match='shampoo: unknown argument\\(s\\) '
                     'lr_ratio; it accepts: b1, b2'):
    lro.optimizer('shampoo', 1e-3, lr_ratio=2.0)
  with pytest.raises(ValueError, match='adam: unknown argument'):
    lro.optimizer('adam', 1e-3, block_size=4)


@pytest.mark.parametrize('name', sorted(RATES))
def test_state_maps_with_tree_map_params(name):
  """A trainer derives state shardings this way before allocating it."""
  params, _, _ = battery.lora_problem()
  tx = lro.optimizer(name, RATES[name])
  state = tx.init(params)
  marked = optax.tree_utils.tree_map_params(
      tx, lambda p: jnp.full(p.shape, 7.0, p.dtype), state,
      transform_non_params=lambda x: x)
  assert jax.tree.structure(marked) == jax.tree.structure(state)
  changed = sum(not bool(jnp.array_equal(a, b)) for a, b in
                zip(jax.tree.leaves(marked), jax.tree.leaves(state)))
  assert changed >= len(jax.tree.leaves(params))  # a moment per param


@pytest.mark.parametrize('name', sorted(RATES))
def test_float32_state_stays_float32_under_x64(name):
  """With jax_enable_x64 a float64 count must not promote the state (each
  step would retrace, and a lax.scan carry would change type)."""
  with jax.enable_x64(True):
    params, _, _ = battery.lora_problem()
    # A float64 b2 (from a numpy sweep) too, and float64 pairs beside
    # float32 ones: Shampoo's had failed in a cond of two dtypes, and
    # ScaledAdam's state had become float64.
    mixed = {'x': params, 'y': jax.tree.map(
        lambda p: jnp.asarray(p, jnp.float64), params)}
    for tree, kw in ((params, {}), (params, {'b2': np.float64(0.99)}),
                     (mixed, {})):
      tx = lro.optimizer(name, RATES[name], **kw)
      state = tx.init(tree)
      update = jax.jit(tx.update)
      for _ in range(2):
        updates, new_state = update(tree, state, tree)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, tree)
        state = new_state


def test_inject_hyperparams_of_the_factory_injects_the_learning_rate():
  params, _, _ = battery.lora_problem()
  tx = optax.inject_hyperparams(lro.optimizer)('loraplus', learning_rate=0.1,
                                               lr_ratio=4.0)
  state = tx.init(params)
  assert set(state.hyperparams) == {'learning_rate'}
  direct = lro.optimizer('loraplus', 0.1, lr_ratio=4.0)
  got, _ = tx.update(params, state, params)
  want, _ = direct.update(params, direct.init(params), params)
  chex.assert_trees_all_close(got, want)
  wrong = optax.inject_hyperparams(lro.optimizer)('adam', learning_rate=0.1,
                                                  lr_ratio=4.0)
  with pytest.raises(ValueError, match='adam: unknown argument'):
    wrong.init(params)  # where inject_hyperparams builds the optimizer


@pytest.mark.parametrize('name', sorted(RATES))
def test_an_empty_tree_updates(name):
  """No params at all (a model with every adapter frozen): init and update
  still work, and the count moves."""
  tx = lro.optimizer(name, RATES[name])
  state = tx.init({})
  updates, state = jax.jit(tx.update)({}, state, {})
  assert updates == {}
  counts = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32]
  assert any(int(c) == 1 for c in counts), counts


def test_star_import_gives_the_public_api_only():
  """``__all__`` names what the README documents; the helper modules
  (casting, checks, linalg, ...) stay out of a star import."""
  namespace = {}
  exec('from lora_rite_optax import *', namespace)  # pylint: disable=exec-used
  names = set(namespace) - {'__builtins__'}
  assert names == set(lro.__all__)
  assert {'optimizer', 'lora_rite', 'shampoo', 'init', 'donating_jit'} <= names
  assert not {'casting', 'checks', 'linalg', 'pairs', 'factory'} & names


def test_annotations_admit_what_the_functions_take_and_return():
  """A user's type checker reads these (the package ships py.typed): a
  weight decay that takes a schedule, hyperparameters that take arrays,
  the GradientTransformationExtraArgs returned, donating_jit's methods."""
  hints = typing.get_type_hints
  decay = optax.linear_schedule(1e-2, 0.0, 10)
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}
  for fn in (lro.lora_rite, lro.scaled_adam, lro.shampoo, lro.loraplus):
    assert hints(fn)['weight_decay'] == optax.ScalarOrSchedule, fn
    assert hints(fn)['return'] is optax.GradientTransformationExtraArgs, fn
    tx = fn(1e-3, weight_decay=decay)
    assert isinstance(tx, optax.GradientTransformationExtraArgs), fn
    tx.update(params, tx.init(params), params)
  assert hints(lro.optimizer)['return'] is (
      optax.GradientTransformationExtraArgs)
  for fn, names in ((lro.scaled_adam, ('b1', 'b2', 'eps', 'delta')),
                    (lro.shampoo, ('b1', 'b2', 'eps', 'matrix_eps')),
                    (lro.loraplus, ('lr_ratio', 'b1', 'b2', 'eps')),
                    (lro.scale_by_adam_authors, ('b1', 'b2', 'eps')),
                    (lro.scale_by_riemannian_precond, ('delta',)),
                    (lro.lora_rite, ('b1', 'b2', 'eps'))):
    for name in names:
      assert hints(fn)[name] == chex.Numeric, (fn, name)
  lro.scaled_adam(jnp.asarray(1e-3), b1=jnp.asarray(0.9)).init(params)
  assert hints(lro.donating_jit)['return'] is lro.DonatingJitted
  step = lro.donating_jit(lambda x: x + 1, donate_argnums=0)
  for method in ('lower', 'eval_shape', 'clear_cache', 'reorders_outputs'):
    assert callable(getattr(lro.DonatingJitted, method))
    assert callable(getattr(step, method)), method
  # The types in the public signatures are exported with them.
  assert hints(lro.find_lora_pairs)['return'] is lro.PairedTree
  assert hints(lro.lora_rite)['layout'] == lro.LayoutSpec


@pytest.mark.parametrize('name,reference', [('adam', optax.adamw),
                                            ('lamb', optax.lamb)])
def test_adam_and_lamb_take_a_weight_decay_schedule(name, reference):
  """optax's adamw and lamb take a decay schedule; the factory's checks
  must let one through (and a decay of inf is refused, not trained on)."""
  params = {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.full((2, 4), 0.5)}
  grads = jax.tree.map(lambda p: jnp.cos(p) * 0.1, params)
  decay = optax.linear_schedule(0.5, 0.0, 4)
  tx = lro.optimizer(name, 1e-2, weight_decay=decay)
  ref = reference(1e-2, weight_decay=decay)
  state, ref_state = tx.init(params), ref.init(params)
  for _ in range(3):
    got, state = tx.update(grads, state, params)
    want, ref_state = ref.update(grads, ref_state, params)
    chex.assert_trees_all_close(got, want)
  with pytest.raises(ValueError, match=rf'^{name}: weight_decay must be >= 0 '
                     r'and finite, got inf\.$'):
    lro.optimizer(name, 1e-2, weight_decay=float('inf'))


def test_keywords_are_checked_against_the_named_optimizers_own():
  """Each name takes its own optimizer's keywords only: Lamb has no
  nesterov or mu_dtype (Adam's), named in one line, not a TypeError from
  inside optax; several unknown ones are listed sorted; a keyword called
  'kwargs' that is not inject_hyperparams' dict is an unknown argument."""
  for kw in ('nesterov', 'mu_dtype'):
    with pytest.raises(ValueError, match=rf'^lamb: unknown argument\(s\) '
                       rf'{kw}; it accepts: b1, b2, eps, eps_root, '
                       r'weight_decay, mask\.$'):
      lro.optimizer('lamb', 1e-3, **{kw: None})
  with pytest.raises(ValueError, match=r'^adam: unknown argument\(s\) aa, bb, kk, mm, zz; '
                     r'it accepts'):
    lro.optimizer('adam', 1e-3, zz=1, mm=2, aa=3, kk=4, bb=5)
  with pytest.raises(ValueError, match=r'^adam: unknown argument\(s\) '
                     r'kwargs; it accepts'):
    lro.optimizer('adam', 1e-3, kwargs=5)
  # inject_hyperparams' dict is unwrapped only when it comes alone: beside
  # other keywords they are not dropped.
  with pytest.raises(ValueError, match=r'^adam: unknown argument\(s\) '
                     r'kwargs; it accepts'):
    lro.optimizer('adam', 1e-3, kwargs={}, b2=1.0)


@pytest.mark.parametrize('name,other,kind', [
    ('adam', 'lora_rite', 'a ScaleByLoraRiteState'),
    ('adam', 'shampoo', 'a ShampooState'),
    ('lamb', 'scaled_adam', 'an EmptyState')])
def test_a_state_of_a_chain_as_long_is_named_as_anothers(name, other, kind):
  """Another optimizer's state whose chain is as long as this one's (Adam's
  3 steps: LoRA-RITE's, Shampoo's; Lamb's 4: ScaledAdam's) passes the
  length check; its first part is named (it had been an AttributeError on
  ``.mu`` in state_fits), with its article ('a EmptyState' had been
  written)."""
  params = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.ones((2, 8))}}
  state = lro.optimizer(other, 1e-3).init(params)
  tx = lro.optimizer(name, 1e-3)
  with pytest.raises(ValueError, match=rf'^{name}: the state is {kind}, not '
                     r"the ScaleByAdamState this optimizer's init\(\) makes"):
    tx.update(params, state, params)

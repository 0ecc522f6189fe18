"""Bad input to the optimizers and initialisations: one clear ValueError,
and the inputs that look alike but are fine still work."""

import functools
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import lora_rite_optax as lro
from lora_rite_optax import placement
from lora_rite_optax import init


def _pair(n_a, r, n_b, scale=1.0):
  key_a, key_b = jax.random.split(jax.random.key(0))
  return {'lora_a': scale * jax.random.normal(key_a, (n_a, r)),
          'lora_b': scale * jax.random.normal(key_b, (r, n_b))}


def test_factors_of_the_other_orientation_are_refused_on_a_square_layer():
  # PEFT's lora_A (r, in), lora_B (out, r) under NNX_LAYOUT: on a square
  # layer both read as rank 64, and ScaledAdam's steps came out ~1e8 large.
  peft = {'q': {'lora_a': jnp.ones((4, 64)), 'lora_b': jnp.ones((64, 4))}}
  with pytest.raises(ValueError) as e:
    lro.find_lora_pairs(peft)
  assert str(e.value) == (
      "find_lora_pairs: pair 'q' (lora_a (4, 64), lora_b (64, 4)) reads as "
      "rank 64, above both factors' other sizes (4, 4): wrong layout? read "
      'the other way round (lora_a (4, 64) with its rank first, lora_b (64, '
      '4) with its last), they pair at rank 4: pass '
      'layout=lro.LoraLayout(a_rank_axis=0, b_rank_axis=-1).')
  right = lro.LoraLayout(a_rank_axis=0, b_rank_axis=-1)
  assert len(lro.find_lora_pairs(peft, right).pairs) == 1
  # A rank above one side only (a narrow k/v projection) is a real pair,
  # warned about: LoRA-RITE is invariant only up to the smaller size there.
  with pytest.warns(UserWarning, match=r"has rank 8, above one factor's other "
                    r'size \(4\): a rank of 4 spans as much, and LoRA-RITE is '
                    'transformation invariant only up to it'):
    lro.lora_rite(1e-3).init({'k': _pair(64, 8, 4)})
  with pytest.warns(UserWarning, match=r"^find_lora_pairs: pair 'k' .* has "
                    r'rank 8, .* a rank of 4 spans as much\.$'):
    assert len(lro.find_lora_pairs({'k': _pair(64, 8, 4)}).pairs) == 1


@pytest.mark.parametrize('tree, layout, advice', [
    # Equinox's eqx.nn.Linear weights (out, in) under lora_a/lora_b keys:
    # PEFT_LAYOUT, which the message had named, wants lora_A/lora_B.
    ({'q': {'lora_a': jnp.ones((4, 16)), 'lora_b': jnp.ones((8, 4))}},
     lro.NNX_LAYOUT, 'lro.LoraLayout(a_rank_axis=0, b_rank_axis=-1)'),
    ({'q': {'lora_A': jnp.ones((4, 16)), 'lora_B': jnp.ones((8, 4))}},
     lro.LoraLayout(a_key='lora_A', b_key='lora_B'), 'lro.PEFT_LAYOUT'),
    ({'q': {'lora_A': jnp.ones((16, 4)), 'lora_B': jnp.ones((4, 8))}},
     lro.PEFT_LAYOUT, "lro.LoraLayout(a_key='lora_A', b_key='lora_B')"),
    ({'q': {'lora_a': jnp.ones((3, 4, 16)), 'lora_b': jnp.ones((3, 8, 4))}},
     lro.NNX_LAYOUT.scanned(1),
     'lro.LoraLayout(a_rank_axis=0, b_rank_axis=-1).scanned(1)'),
])
def test_factors_of_the_other_orientation_name_the_layout_that_reads_them(
    tree, layout, advice):
  """On a non-square layer the error had said only 'both factors need the
  same rank' (their ranks are equal, read the other way round)."""
  with pytest.raises(ValueError, match=r'both factors need the same rank\. '
                     r'Read the other way round .* they pair at rank 4: pass '
                     rf'layout={re.escape(advice)}\.$'):
    lro.lora_rite(1e-3, layout=layout).init(tree)
  fixed = eval(advice, {'lro': lro})  # pylint: disable=eval-used
  assert len(lro.find_lora_pairs(tree, fixed).pairs) == 1
  # Sizes that pair no way round get no advice.
  bad = {'q': {'lora_a': jnp.ones((4, 16)), 'lora_b': jnp.ones((5, 8))}}
  with pytest.raises(ValueError, match=r'need the same rank\.$'):
    lro.lora_rite(1e-3).init(bad)


def test_a_rank_above_both_sides_of_a_non_square_layer_is_only_warned():
  # Redundant (rank 4 spans every 4 x 6 matrix) but a valid pair, as PEFT
  # allows.
  with pytest.warns(UserWarning, match=r'reads as rank 8, above both '
                    r"factors' other sizes \(4, 6\); a rank of 4 spans"):
    paired = lro.find_lora_pairs(
        {'q': {'lora_a': jnp.ones((4, 8)), 'lora_b': jnp.ones((8, 2, 3))}})
  assert len(paired.pairs) == 1


@pytest.mark.parametrize('tree, layout', [
    ({'model.q.lora_A.weight': jnp.ones((2, 4)),
      'model.q.lora_B.weight': jnp.zeros((3, 2))}, lro.PEFT_LAYOUT),
    ({'q': {'lora_A': jnp.ones((4, 2)), 'lora_B': jnp.zeros((2, 3))}},
     lro.NNX_LAYOUT),
])
def test_loraplus_refuses_a_tree_whose_factors_it_cannot_pair(tree, layout):
  # It had trained every leaf as an 'a' leaf: plain AdamW, no ratio.
  with pytest.raises(ValueError, match='no lora_[aA]/lora_[bB] pair found'):
    lro.loraplus(1e-3, layout=layout).init(tree)


def test_loraplus_takes_leaves_named_lora_but_not_factors():
  tree = {'q': _pair(2, 1, 2), 'w': jnp.ones((2, 2)),
          'lora_alpha': jnp.ones(()), 'bias': jnp.ones(3)}
  assert lro.loraplus_labels(tree) == {
      'q': {'lora_a': 'a', 'lora_b': 'b'}, 'w': 'a', 'lora_alpha': 'a',
      'bias': 'b_no_decay'}


def test_a_factor_whose_partner_is_masked_keeps_its_role():
  """LoRA-FA: A frozen by optax.masked, B trained."""
  params = {'q': _pair(6, 2, 3)}
  mask = {'q': {'lora_a': False, 'lora_b': True}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.masked(lro.loraplus(1e-3, lr_ratio=16.0), mask)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is the rate times the gradient's sign: B's is 16x.
  np.testing.assert_allclose(updates['q']['lora_b'], -16e-3, rtol=1e-4)
  np.testing.assert_array_equal(updates['q']['lora_a'], 1.0)  # untouched
  # Shampoo preconditions the lone B in its rank-last view, (3*4) x 2 for
  # an einsum B (2, 3, 4); read as an A it would be (2*3) x 4.
  einsum = {'q': {'lora_a': jnp.ones((5, 2)),
                  'lora_b': jax.random.normal(jax.random.key(2), (2, 3, 4))}}
  tx = optax.masked(lro.shampoo(1e-3), mask)
  updates, state = tx.update(einsum, tx.init(einsum), einsum)
  stats = [s for s in state.inner_state[0].stats if s is not None]
  assert [(s.left.shape, s.right.shape) for s in stats] == [
      ((1, 12, 12), (1, 2, 2))]
  assert np.all(np.isfinite(updates['q']['lora_b']))
  assert lro.lora_b_mask({'q': {'lora_a': optax.MaskedNode(),
                                'lora_b': jnp.ones((2, 3))}}) == {
                                    'q': {'lora_a': False, 'lora_b': True}}
  # A mask that is a prefix of the tree (PEFT's nested .weight leaves) hides
  # the partner's whole subtree.
  peft = {'q': {'lora_A': {'weight': jnp.ones((2, 6))},
                'lora_B': {'weight': jnp.ones((3, 2))}}}
  tx = optax.masked(lro.loraplus(1e-3, lr_ratio=16.0, layout=lro.PEFT_LAYOUT),
                    {'q': {'lora_A': False, 'lora_B': True}})
  updates, _ = tx.update(peft, tx.init(peft), peft)
  np.testing.assert_allclose(updates['q']['lora_B']['weight'], -16e-3,
                             rtol=1e-4)
  # A partner that is missing, not masked, is still an error.
  with pytest.raises(ValueError, match="has no partner 'lora_a'"):
    lro.loraplus_labels({'q': {'lora_b': jnp.ones((2, 3))}})


@pytest.mark.parametrize('make', [lro.lora_rite, lro.scaled_adam])
def test_a_masked_partner_is_named_as_masked_not_missing(make):
  """LoRA-FA's frozen lora_a under optax.masked: 'has no partner' had sent
  users looking for a leaf that is there."""
  params = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.zeros((2, 6))}}
  tx = optax.masked(make(1e-3), {'q': {'lora_a': False, 'lora_b': True}})
  with pytest.raises(ValueError) as e:
    tx.init(params)
  who = make.__name__
  assert str(e.value) == (
      f"{who}: factor 'q/lora_b' has its partner 'lora_a' masked out (a "
      'MaskedNode or None, as optax.masked and partition leave); '
      f'{who} preconditions each factor by the other, so it needs both '
      '(train one factor alone with loraplus, shampoo or adam).')
  # Callers that do not precondition are not said to.
  with pytest.raises(ValueError, match=r'leave\); pass allow_unpaired=True '
                     r'to have it as a LoneFactor\.$'):
    lro.find_lora_pairs({'q': {'lora_a': optax.MaskedNode(),
                               'lora_b': params['q']['lora_b']}})
  balance = optax.masked(lro.balance_lora_factors(),
                         {'q': {'lora_a': False, 'lora_b': True}})
  with pytest.raises(ValueError, match=r'leave\); balance_lora_factors needs '
                     r'both\.$'):
    balance.update(params, balance.init(params), params)


def test_scaled_adam_refuses_params_unlike_the_gradients():
  lora = {'q': _pair(4, 2, 3), 'v': _pair(4, 2, 3, scale=2.0)}
  tx = lro.scale_by_riemannian_precond()
  state = tx.init(lora)
  # The full model's params beside the LoRA gradients: it had read the
  # factors by leaf index, so q was preconditioned with k's factors.
  with pytest.raises(ValueError, match='do not have the structure of the '
                     r"params: Dict key mismatch; expected keys: \['k', 'q', "):
    tx.update(lora, state, {'k': _pair(4, 2, 3), **lora})
  with pytest.raises(ValueError, match=r'gradient of q/lora_a has shape '
                     r'\(4, 2\) but the param has \(6, 2\)'):
    tx.update(lora, state, {**lora, 'q': _pair(6, 2, 3)})


@pytest.mark.parametrize('name', lro.OPTIMIZER_NAMES)
def test_wrong_gradients_are_named_not_the_state(name):
  """value_and_grad's (loss, grads) or a transposed factor, with the state
  init() made for these params: Adam, Lamb and LoRA+ had said the state was
  made for other params, Shampoo failed in an AttributeError."""
  params = {'q': _pair(8, 2, 8)}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = lro.optimizer(name, 1e-3)
  state = tx.init(params)
  with pytest.raises(ValueError, match=f'^{name}: the updates \\(gradients\\) '
                     'do not have the structure of the params: a tuple of 3 '
                     'leaves, where the params are a dict of 2 leaves.$'):
    tx.update((1.0, grads), state, params)
  # NumPy's loss beside NumPy gradients: jax's own message had printed the
  # tuple, cut off at its first line.
  with pytest.raises(ValueError, match='a tuple of 3 leaves, where the '
                     'params are a dict of 2 leaves.$'):
    tx.update((np.float32(0.5), jax.tree.map(np.asarray, grads)), state,
              params)
  transposed = {'q': {'lora_a': jnp.ones((2, 8)), 'lora_b': jnp.ones((8, 2))}}
  with pytest.raises(ValueError, match=f'^{name}: the gradient of q/lora_a has '
                     r'shape \(2, 8\) but the param has \(8, 2\).$'):
    tx.update(transposed, state, params)


def test_riemannian_precond_keeps_the_gradients_dtype_but_float16():
  # bfloat16 stays bfloat16, so an optax chain after it keeps its state's
  # dtype (scan, apply_if_finite); float16 would overflow, so float32.
  for dtype, out in ((jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32),
                     (jnp.float16, jnp.float32)):
    params = jax.tree.map(lambda x: x.astype(dtype), {'q': _pair(8, 2, 6)})
    tx = lro.scale_by_riemannian_precond()
    updates, _ = tx.update(params, tx.init(params), params)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(out)}


def test_shampoo_keeps_a_float16_step_finite_without_a_graft():
  """Without a graft a step before the rate can pass float16's 65504: cast
  to float16 before the rate, it had become inf."""
  params = {'w': jnp.zeros((2, 2), jnp.float16)}
  tx = lro.shampoo(1e-4, graft='none', b1=0.0)
  state = tx.init(params)
  for scale in (1e-4, 1.0):  # stale roots from the small gradient
    updates, state = tx.update(
        {'w': scale * jnp.eye(2, dtype=jnp.float16)}, state, params)
  assert updates['w'].dtype == jnp.float16
  np.testing.assert_allclose(np.diag(np.asarray(updates['w'], np.float32)),
                             -31.62, rtol=1e-3)


def test_scaled_adam_keeps_a_float16_step_finite():
  # A small B makes A's preconditioned gradient overflow float16; cast
  # before Adam it had become inf, and the update NaN.
  params = {'lora_a': jnp.full((64, 4), 0.1, jnp.float16),
            'lora_b': jnp.full((4, 32), 1e-4, jnp.float16)}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = lro.scaled_adam(1e-3)
  updates, state = tx.update(grads, tx.init(params), params)
  for name, u in updates.items():
    assert u.dtype == jnp.float16, name
    np.testing.assert_allclose(np.asarray(u, np.float32), -1e-3 * 10 ** 0.5,
                               rtol=1e-2)
  moments = jax.tree.leaves((state[1].mu, state[1].nu))
  assert all(x.dtype == jnp.float32 for x in moments)


@pytest.mark.parametrize('make, kwargs, message', [
    (lro.shampoo, {'b2': 1.0}, r'shampoo: b2 must be in \[0, 1\), got 1.0'),
    (lro.shampoo, {'b1': np.float32(-0.1)}, r'shampoo: b1 must be in'),
    (lro.shampoo, {'matrix_eps': -1.0}, r'shampoo: matrix_eps must be > 0'),
    (lro.scaled_adam, {'b2': 1.0}, r'scaled_adam: b2 must be in'),
    (lro.scaled_adam, {'eps': -1e-8}, r'scaled_adam: eps must be >= 0'),
    (lro.scaled_adam, {'delta': -1.0}, r'scaled_adam: delta must be >= 0'),
    # An infinite ridge made every solve non-finite, so the raw gradient
    # was used: plain AdamW, without a word.
    (lro.scaled_adam, {'delta': float('inf')},
     r'scaled_adam: delta must be >= 0 and finite, got inf'),
    (lro.loraplus, {'lr_ratio': -16.0}, r'loraplus: lr_ratio must be > 0'),
    (lro.loraplus, {'lr_ratio': float('inf')},
     r'loraplus: lr_ratio must be > 0 and finite, got inf'),
    (lro.loraplus, {'b2': jnp.array(1.5)}, r'loraplus: b2 must be in'),
    (lro.loraplus, {'lr_embedding': 1e-5}, r'pass is_embedding too'),
    # The embedding's own rate had not been checked: a negative one climbed
    # the loss, inf and NaN went into the adapters silently.
    (lro.loraplus, {'lr_embedding': -1e-3, 'is_embedding': bool},
     r'loraplus: lr_embedding must be >= 0 and finite, got -0.001'),
    (lro.loraplus, {'lr_embedding': float('nan'), 'is_embedding': bool},
     r'loraplus: lr_embedding must be >= 0 and finite, got nan'),
    (lro.loraplus, {'lr_embedding': 'x', 'is_embedding': bool},
     r"loraplus: lr_embedding must be a number, got 'x'"),
    # A name where a function goes had failed at init, inside the labels.
    (lro.loraplus, {'is_embedding': 'embed'},
     r"loraplus: is_embedding must be a function of a pair's name .*, got "
     r"'embed'"),
    # A negative decay had grown the factors; None and strings had passed
    # every check as if traced and failed at the first update.
    (lro.loraplus, {'weight_decay': -1.0},
     r'loraplus: weight_decay must be >= 0 and finite, got -1.0'),
    (lro.loraplus, {'weight_decay': None},
     r'loraplus: weight_decay must be a number, got None'),
    (lro.loraplus, {'b1': '0.9'}, r"loraplus: b1 must be a number, got '0.9'"),
    # An array's repr had made a message of several lines.
    (lro.lora_rite, {'eps': np.full((2, 2), 1e-6)},
     r'eps must be a number, got array\(\[\[1.e-06, 1.e-06\], \[1.e-06, '
     r'1.e-06\]\]\)\.$'),
    (lro.shampoo, {'matrix_eps': [1e-6]},
     r'shampoo: matrix_eps must be a number, got \[1e-06\]'),
    (lro.lora_rite, {'eps': -1e-6}, r'^lora_rite: eps must be >= 0'),
    (lro.lora_rite, {'update_skipping': -1.0},
     r'^lora_rite: update_skipping must be >= 0'),
    # None had been optax's identity: a step of rate 1 up the gradient.
    (lro.lora_rite, {}, r'lora_rite: learning_rate must be a number, got None'),
    (lro.scaled_adam, {}, r'scaled_adam: learning_rate must be a number'),
    (lro.shampoo, {}, r'shampoo: learning_rate must be a number'),
    (lro.loraplus, {}, r'loraplus: learning_rate must be a number'),
    (functools.partial(lro.optimizer, 'adam'), {},
     r'adam: learning_rate must be a number'),
    # An infinite eps froze every factor, an infinite decay made them inf.
    (lro.lora_rite, {'eps': float('inf')},
     r'^lora_rite: eps must be >= 0 and finite, got inf'),
    (lro.shampoo, {'weight_decay': float('inf')},
     r'shampoo: weight_decay must be >= 0 and finite'),
    (lro.scaled_adam, {'weight_decay': -1.0},
     r'scaled_adam: weight_decay must be >= 0 and finite, got -1.0'),
    (lro.scaled_adam, {'bias_correction': 'no'},
     r"scaled_adam: bias_correction must be True or False, got 'no'"),
    # 'no' had switched balancing on; 'yes' failed at the first update.
    (lro.lora_rite, {'balance_factors': 'no'},
     r"lora_rite: balance_factors must be True or False, got 'no'"),
    (lro.lora_rite, {'escape_mass': 'yes'},
     r"^lora_rite: escape_mass must be True or False, got 'yes'"),
    (lro.lora_rite, {'weight_decay': -0.1},
     r'lora_rite: weight_decay must be >= 0 and finite, got -0.1'),
    # optax's adamw and lamb check none of these: b2 = 1 gave NaN updates.
    (functools.partial(lro.optimizer, 'adam'), {'b2': 1.0},
     r'adam: b2 must be in \[0, 1\), got 1.0'),
    (functools.partial(lro.optimizer, 'adam'), {'eps': -1.0},
     r'adam: eps must be >= 0'),
    (functools.partial(lro.optimizer, 'adam'), {'weight_decay': -0.1},
     r'adam: weight_decay must be >= 0'),
    (functools.partial(lro.optimizer, 'lamb'), {'b1': -0.5},
     r'lamb: b1 must be in'),
    (functools.partial(lro.optimizer, 'lamb'), {'eps_root': float('nan')},
     r'lamb: eps_root must be >= 0 and finite, got nan'),
    # A fraction had been cut to an integer (block_size 2.5 -> 2) or used
    # as one (roots every 5 steps for 2.5); True had been taken for 1.
    (lro.shampoo, {'block_size': 2.5},
     r'shampoo: block_size must be an integer >= 1, got 2.5'),
    (lro.shampoo, {'block_size': True}, r'block_size must be an integer'),
    # float(True) is 1.0: a bool b1 had been a decay of 0 or 1 (and see
    # test_a_bool_is_not_a_learning_rate).
    (lro.scaled_adam, {'weight_decay': True},
     r'^scaled_adam: weight_decay must be a number, got True\.$'),
    (functools.partial(lro.optimizer, 'adam'), {'b1': np.False_},
     rf'^adam: b1 must be a number, got {re.escape(repr(np.False_))}\.$'),
    (lro.shampoo, {'matrix_eps': jnp.array(True)},
     r'shampoo: matrix_eps must be a number, got Array\(True'),
    (lro.shampoo, {'precondition_every': np.True_},
     r'precondition_every must be an integer'),
    # float() keeps a numpy complex's real part: 0.5+0.5j had been a rate
    # of 0.5, with only a ComplexWarning pointing into the library.
    (lro.lora_rite, {'b1': np.complex128(0.9 + 5j)},
     'lora_rite: b1 must be a number, got '
     + re.escape(repr(np.complex128(0.9 + 5j)))),  # numpy 1 writes (0.9+5j)
    (lro.shampoo, {'matrix_eps': np.complex64(0.5)},
     r'shampoo: matrix_eps must be a number'),
    (lro.shampoo, {'precondition_every': 2.5},
     r'shampoo: precondition_every must be an integer >= 1, got 2.5'),
    (lro.shampoo, {'precondition_every': np.int64(0)},
     r'precondition_every must be an integer >= 1, got 0'),
    # Past the int32 step counter: an OverflowError at the first update.
    (lro.shampoo, {'precondition_every': 2**31},
     r'shampoo: precondition_every must be at most 2\*\*31 - 1, got '
     r'2147483648'),
    # A schedule where optax takes none had passed every check, then
    # failed at the first update (a 12-line TypeError).
    (lro.shampoo, {'b2': optax.constant_schedule(0.99)},
     r'shampoo: b2 must be a number, got <function .*> \(only the learning '
     r'rate and weight decay take a schedule; wrap the optimizer in '
     r'optax.inject_hyperparams to schedule others\)\.$'),
    (functools.partial(lro.optimizer, 'adam'),
     {'b1': optax.constant_schedule(0.9)}, r'adam: b1 must be a number'),
    (functools.partial(lro.optimizer, 'lamb'),
     {'eps': optax.constant_schedule(1e-6)}, r'lamb: eps must be a number'),
    (lro.lora_rite, {'eps': optax.constant_schedule(1e-6)},
     r'^lora_rite: eps must be a number'),
    # 'no' had switched Nesterov on; an integer first moment was truncated.
    (functools.partial(lro.optimizer, 'adam'), {'nesterov': 'no'},
     r"adam: nesterov must be True or False, got 'no'"),
    (functools.partial(lro.optimizer, 'adam'), {'mu_dtype': 'int32'},
     r"adam: mu_dtype must be None or a floating dtype, got int32"),
    (functools.partial(lro.optimizer, 'adam'), {'mu_dtype': 'foo'},
     r"adam: mu_dtype must be None or a floating dtype, got 'foo'"),
])
def test_baselines_check_their_hyperparameters(make, kwargs, message):
  with pytest.raises(ValueError, match=message):
    make(None if 'learning_rate must be' in message else 1e-3, **kwargs)


@pytest.mark.parametrize('name', lro.OPTIMIZER_NAMES)
def test_a_bool_is_not_a_learning_rate(name):
  # float(True) is 1.0: lora_rite(True) had trained at a rate of 1.
  with pytest.raises(ValueError, match=rf'^{name}: learning_rate must be a '
                     r'number, got True\.$'):
    lro.optimizer(name, True)


def test_balance_lora_factors_needs_a_positive_eps():
  """0 made a factor that ends at zero 0/0: B NaN and A zeroed."""
  with pytest.raises(ValueError, match='balance_lora_factors: eps must be > '
                     '0 and finite, got 0.0'):
    lro.balance_lora_factors(eps=0.0)


@pytest.mark.parametrize('make', [
    lambda: lro.scale_by_lora_rite(), lambda: lro.scale_by_shampoo(),
    lambda: lro.scale_by_adam_authors()])
def test_another_optimizers_state_is_refused_in_one_line(make):
  """It had failed with an AttributeError (or a TypeError) inside."""
  params = {'q': _pair(6, 2, 3)}
  tx = make()
  for state in (optax.adam(0.1).init(params), None):
    with pytest.raises(ValueError, match=r'the state is (a tuple|None), '
                       r"not the \w+ this optimizer's init\(\) makes"):
      tx.update(params, state, params)


def test_baselines_still_take_traced_hyperparameters():
  params = {'q': _pair(6, 2, 3)}
  for make, static in ((lro.shampoo, ('block_size',)), (lro.scaled_adam, ()),
                       (lro.loraplus, ())):
    tx = optax.inject_hyperparams(make, static_args=static)(
        learning_rate=1e-3, b2=0.99)
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_scaled_adam_takes_an_injected_bias_correction():
  """inject_hyperparams injects a flag given as 1 or an array (a Python
  bool stays static): the update's `if` had raised on the tracer."""
  params = {'q': _pair(6, 2, 3)}
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  def step(flag):
    tx = optax.inject_hyperparams(lro.scaled_adam)(
        learning_rate=1e-2, bias_correction=flag)
    return jax.jit(tx.update)(grads, tx.init(params), params)[0]
  for on, off in ((1, 0), (jnp.array(True), jnp.array(False))):
    for flag, plain in ((on, True), (off, False)):
      got, want = step(flag), lro.scaled_adam(
          1e-2, bias_correction=plain).update(
              grads, lro.scaled_adam(1e-2).init(params), params)[0]
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5)
  # Bias correction changes the first step (the control).
  assert not np.allclose(step(1)['q']['lora_a'], step(0)['q']['lora_a'])


def test_shampoo_under_inject_checks_a_concrete_precondition_every():
  make = optax.inject_hyperparams(lro.shampoo, static_args=('block_size',))
  with pytest.raises(ValueError, match='precondition_every must be an '
                     'integer >= 1, got 0'):
    make(1e-3, precondition_every=0).init({'q': _pair(6, 2, 3)})


def test_shampoo_passes_a_zero_size_leaf_through():
  """Its blocks would be 0 wide: init had divided by zero."""
  params = {'w': jnp.zeros((0, 5)), 'v': jnp.ones((3, 4))}
  tx = lro.shampoo(1e-2)
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert updates['w'].shape == (0, 5)
  assert bool(jnp.all(updates['v'] != 0))


@pytest.mark.parametrize('other', [
    {'q': _pair(4, 2, 3)},                      # other shapes
    {'k': _pair(6, 2, 3), 'q': _pair(6, 2, 3)},  # other leaves
    # The same leaf shapes under other names: one leaf's moments had been
    # applied to another.
    {'v': _pair(6, 2, 3)},
])
def test_shampoo_refuses_a_state_made_for_other_params(other):
  params = {'q': _pair(6, 2, 3)}
  tx = lro.shampoo(1e-3)
  with pytest.raises(ValueError, match='made by init\\(\\) for other params'):
    tx.update(params, tx.init(other), params)


_W = jax.random.normal(jax.random.key(1), (8, 6))


@pytest.mark.parametrize('call, message', [
    (lambda: init.lora_ga(0.1 * _W, _W, 2, 1.0, gamma=0),
     r'lora_ga: gamma must be > 0 and finite, got 0.0'),
    (lambda: init.lora_ga(0.1 * _W, _W, 2, -1.0), r'lora_ga: scale must be'),
    (lambda: init.pissa(_W, 2, scale=np.float32(0)),
     r'pissa: scale must be > 0'),
    (lambda: init.pissa(_W, 2, scale=jnp.array(-1.0)),
     r'pissa: scale must be > 0'),
    (lambda: init.pissa(_W, 2, scale=float('inf')),
     r'pissa: scale must be > 0 and finite, got inf'),
    (lambda: init.pissa(_W.astype(jnp.int8), 2),
     r'pissa: w0 must be a floating-point matrix, got int8'),
    (lambda: init.pissa(_W, 2.0), r'pissa: rank must be an integer, got 2.0'),
    (lambda: init.lora_ga(0.1 * _W, _W, 2.0, 1.0), r'lora_ga: rank must be'),
    (lambda: init.standard(jax.random.key(0), 8, 6, 2.0),
     r'standard: rank must be an integer'),
    # std 0 leaves A = B = 0: no factor ever gets a gradient.
    (lambda: init.gaussian(jax.random.key(0), 8, 6, 2, std=0.0),
     r'gaussian: std must be > 0 and finite, got 0.0'),
    (lambda: init.gaussian(jax.random.key(0), 8, 6, 2, std=float('nan')),
     r'gaussian: std must be > 0 and finite, got nan'),
    # The string 'False' had switched the sign initialisation on.
    (lambda: init.lora_ga(0.1 * _W, _W, 2, 1.0, use_sign='False'),
     r"lora_ga: use_sign must be True or False, got 'False'"),
    (lambda: init.lora_ga(0.1 * _W, _W, 2, 1.0, randomized='no'),
     r"lora_ga: randomized must be True or False, got 'no'"),
    (lambda: init.randomized_svd(_W, 2, niter=2.5),
     r'randomized_svd: niter must be an integer, got 2.5'),
    # LAPACK's SVD of a matrix holding inf never returned; NaN gave NaN
    # factors silently.
    (lambda: init.lora_ga(0.1 * _W.at[0, 0].set(jnp.inf), _W, 2, 1.0),
     r'lora_ga: grad holds inf or NaN; the SVD needs finite values'),
    (lambda: init.lora_ga(_W.at[1, 2].set(jnp.nan), _W, 2, 1.0,
                          randomized=True),
     r'lora_ga: grad holds inf or NaN'),
    (lambda: init.pissa(_W.at[3, 1].set(-jnp.inf), 2),
     r'pissa: w0 holds inf or NaN'),
    # A NaN in W0 had passed silently into LoRA-GA's new base.
    (lambda: init.lora_ga(0.1 * _W, _W.at[0, 0].set(jnp.nan), 2, 1.0),
     r'lora_ga: w0 holds inf or NaN; the new base W0 - s A B would carry '
     r'them'),
    (lambda: init.lora_ga((0.1 * _W).astype(jnp.complex64), _W, 2, 1.0),
     r'lora_ga: grad must be a floating-point matrix, got complex64'),
    # An integer A was all 0 (never trains), a bool one all True.
    (lambda: init.standard(jax.random.key(0), 8, 6, 2, dtype=jnp.int32),
     r'standard: dtype must be a floating dtype, got int32'),
    (lambda: init.gaussian(jax.random.key(0), 8, 6, 2, dtype=bool),
     r'gaussian: dtype must be a floating dtype, got bool'),
])
def test_initialisations_check_their_arguments(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_initialisations_take_numpy_ranks_and_traced_scales():
  a, b, _ = init.pissa(_W, np.int64(2))
  assert a.shape == (8, 2) and b.shape == (2, 6)
  a, _, _ = jax.jit(lambda s: init.pissa(_W, 2, scale=s))(2.0)
  assert np.all(np.isfinite(a))
  # A traced gamma had failed in math.sqrt.
  a, b, _ = jax.jit(lambda gm: init.lora_ga(0.1 * _W, _W, 2, 1.0,
                                            gamma=gm))(4.0)
  want_a, want_b, _ = init.lora_ga(0.1 * _W, _W, 2, 1.0, gamma=4.0)
  np.testing.assert_allclose(a, want_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b, want_b, rtol=1e-5, atol=1e-6)


def test_a_traced_matrix_holding_inf_reaches_the_svd_as_nan():
  """Under jit the values are unknown: inf becomes NaN, which the SVD
  passes through (NaN factors), where inf made it loop for ever."""
  x = _W.at[0, 0].set(jnp.inf).at[1, 1].set(-jnp.inf)
  out = jax.jit(lambda x: init._finite_for_svd('t', 'x', x))(x)  # pylint: disable=protected-access
  assert bool(jnp.isnan(out[0, 0])) and bool(jnp.isnan(out[1, 1]))
  np.testing.assert_array_equal(out[2:], _W[2:])


def test_traced_b2_warns_only_in_a_dtype_that_rounds_it_to_one():
  import warnings  # pylint: disable=g-import-not-at-top
  for dtype, warns in ((jnp.bfloat16, True), (jnp.float16, False)):
    params = jax.tree.map(lambda x: x.astype(dtype), {'q': _pair(6, 2, 3)})
    tx = optax.inject_hyperparams(lro.shampoo, static_args=('block_size',))(
        learning_rate=1e-3)
    state = tx.init(params) if not warns else None
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      if warns:  # bfloat16's 0.999 is 1.0 already at init: refused there
        with pytest.raises(ValueError, match=r'b2 must be in \[0, 1\), got '
                           r'1.0 \(bfloat16 rounds it'):
          tx.init(params)
        jax.eval_shape(tx.init, params)  # traced: warned instead
      else:
        jax.jit(tx.update)(params, state, params)
    said = [str(w.message) for w in caught if 'round to 1' in str(w.message)]
    assert bool(said) == warns, (dtype, said)
    if warns:
      assert 'values above 0.998 round to 1' in said[0]


def test_lora_rite_numpy_float64_params_without_x64_agree_with_jit():
  # Without x64, numpy float64 params are float32 arrays inside jit: the
  # state's group keys must say float32 in every init path, or a jitted
  # update (and the second eager step) finds no statistics for its group.
  rng = np.random.default_rng(0)
  params = {'lora_a': rng.normal(size=(6, 3)), 'lora_b': np.zeros((3, 5))}
  grads = {'lora_a': np.ones((6, 3)), 'lora_b': np.ones((3, 5))}
  tx = lro.lora_rite(0.1)
  state = tx.init(params)
  assert list(state[0].nu) == ['rank3_float32']
  shapes = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(shapes) == jax.tree.structure(state)
  updates, state = jax.jit(tx.update)(grads, state, params)
  params = optax.apply_updates(params, updates)
  updates, _ = tx.update(grads, state, params)
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('zero_b', [True, False])
def test_lora_rite_with_eps_zero_gives_no_step_along_null_directions(zero_b):
  # A rank-1 gradient of H leaves r - 1 directions of each second moment at
  # 0 (all of A's while B = 0): with eps = 0 those get no step, not the
  # NaN of 0 * inf.
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  b = (jnp.zeros((3, 5)) if zero_b else
       jnp.asarray(rng.normal(size=(3, 5)), jnp.float32))
  g = np.outer(rng.normal(size=6), rng.normal(size=5))
  params = {'lora_a': a, 'lora_b': b}
  grads = {'lora_a': jnp.asarray(g @ np.asarray(b).T, jnp.float32),
           'lora_b': jnp.asarray(np.asarray(a).T @ g, jnp.float32)}
  tx = lro.lora_rite(0.1, eps=0.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  for u in jax.tree.leaves(updates):
    assert np.isfinite(u).all()
  if zero_b:
    np.testing.assert_array_equal(updates['lora_a'], 0.0)
  # B's step lies in the gradient's column space: rank 1, like the gradient.
  assert np.linalg.matrix_rank(np.asarray(updates['lora_b']), tol=1e-5) == 1
  assert np.abs(updates['lora_b']).max() > 0


@pytest.mark.parametrize('name', ['lora_rite', 'scaled_adam', 'loraplus',
                                  'shampoo'])
def test_a_rank_0_pair_is_refused_in_one_line(name):
  """LoRA-RITE and ScaledAdam had failed on one with an IndexError."""
  params = {'q': {'lora_a': jnp.ones((4, 0)), 'lora_b': jnp.ones((0, 3))}}
  tx = lro.optimizer(name, 1e-2)
  with pytest.raises(ValueError, match=f"{name}: pair 'q' .* has rank 0; "
                     'give it a rank >= 1 or leave it out.'):
    tx.update(params, tx.init(params), params)


_TREE = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}


@pytest.mark.parametrize('call, message', [
    # Each had failed inside find_lora_pairs: an IndexError, a TypeError,
    # "differ in their first -1 axes", or a rank mismatch of x against x.
    (lambda: lro.LoraLayout(a_rank_axis=1.0),
     r'LoraLayout: a_rank_axis must be an integer, got 1.0'),
    (lambda: lro.NNX_LAYOUT.scanned(-1),
     r'LoraLayout: batch_axes must be >= 0, got -1'),
    (lambda: lro.LoraLayout(batch_axes=True),
     r'LoraLayout: batch_axes must be an integer, got True'),
    (lambda: lro.LoraLayout(a_key='x', b_key='x'),
     r"LoraLayout: a_key and b_key must differ, both are 'x'"),
    (lambda: lro.lora_rite(1e-3, layout=lro.LoraLayout(a_rank_axis=5)).init(
        _TREE), r"factor 'q/lora_a' has shape \(4, 2\), with no rank axis 5"),
    (lambda: lro.find_lora_pairs(_TREE, 'peft'),
     r"layout must be a LoraLayout .* got 'peft'"),
    (lambda: lro.find_lora_pairs(_TREE, lambda path: None),
     r"the layout function returned None for path 'q'"),
    # A table of the pair paths only: it had raised a bare KeyError from
    # inside find_lora_pairs (it is called with every prefix).
    (lambda: lro.lora_rite(1e-3, layout={'q': lro.PEFT_LAYOUT}.__getitem__
                           ).init({'q': {'lora_A': {'weight': jnp.ones((2, 4))},
                                         'lora_B': {'weight': jnp.ones((3, 2))}}}),
     r"the layout function raised KeyError \(\"'q/lora_A'\"\) for path "
     r"'q/lora_A'; it is called with every prefix of every leaf's path \('' "
     r"for the root\), so it must return a LoraLayout for any path, e\.g\. a "
     r"default\.$"),
    (lambda: lro.lora_rite(1e-3).init({'lora_a': 1.0, 'lora_b': 2.0}),
     r"lora_rite: factor 'lora_a' must be an array, got float"),
    # A pair at the root of the tree: named as such, not '' or '/lora_a'.
    (lambda: lro.lora_rite(1e-3).init({'lora_a': jnp.ones((4, 2)),
                                       'lora_b': jnp.ones((3, 3))}),
     r'lora_rite: the pair at the root has rank 2 in lora_a'),
    (lambda: lro.lora_rite(1e-3).init({'lora_a': jnp.ones(3),
                                       'lora_b': jnp.ones(3)}),
     r"lora_rite: factor 'lora_a' has shape \(3,\); expected at least 2"),
    # A scanned layout on unstacked factors: too few axes (it had been told
    # that its stacked-layer axes differ).
    (lambda: lro.find_lora_pairs({'lora_a': jnp.ones((4, 2)),
                                  'lora_b': jnp.ones((2, 3))},
                                 lro.NNX_LAYOUT.scanned(1)),
     r"factor 'lora_a' has shape \(4, 2\); expected at least 3 axes \(1 "
     r"stacked \+ matrix\) \(a tree that also holds unstacked pairs or "
     r"other leaves needs a layout function of the path"),
])
def test_layouts_and_factors_are_checked_in_one_line(call, message):
  with pytest.raises(ValueError, match=message) as e:
    call()
  assert '\n' not in str(e.value)


def test_a_positive_last_rank_axis_pairs_as_its_negative_does():
  """The check for as many layers as the rank re-read the axis with one more
  stacked axis: a positive last one had been an IndexError."""
  tree = {'o': {'lora_a': jnp.ones((4, 16, 4)), 'lora_b': jnp.ones((4, 8, 8))}}
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    pairs = [lro.find_lora_pairs(tree, lro.LoraLayout(a_rank_axis=axis))
             for axis in (-1, 2)]
  assert [len(p.pairs) for p in pairs] == [1, 1]
  params = {'o': tree['o']}
  got = [lro.lora_rite(1e-2, layout=lro.LoraLayout(a_rank_axis=axis))
         for axis in (-1, 2)]
  ups = [tx.update(params, tx.init(params), params)[0] for tx in got]
  chex.assert_trees_all_equal(*ups)


_OTHER_SHAPES = {'q': {'lora_a': jnp.ones((5, 2)), 'lora_b': jnp.ones((2, 3))}}
_OTHER_TREE = {**_TREE, 'k': _TREE['q']}


@pytest.mark.parametrize('name', ['lora_rite', 'scaled_adam', 'loraplus',
                                  'shampoo', 'adam', 'lamb'])
def test_a_state_made_for_other_params_is_one_line(name):
  """ScaledAdam (and the factory's Adam and Lamb) had failed in a broadcast
  naming no leaf, or with ten lines on the tree structure; LoRA+ on another
  optimizer's state with an AttributeError."""
  tx = lro.optimizer(name, 1e-2)
  for params in (_OTHER_SHAPES, _OTHER_TREE):
    with pytest.raises(ValueError, match='init|state') as e:
      tx.update(params, tx.init(_TREE), params)
    assert '\n' not in str(e.value), str(e.value)
  # Another optimizer's state: optax's chain says so (the transforms that
  # are chains), or the optimizer's own check does.
  with pytest.raises(ValueError, match='the state is a|has to be the same '
                     'in chain! Make sure you have called init first') as e:
    tx.update(_TREE, optax.sgd(1e-2).init(_TREE), _TREE)
  assert '\n' not in str(e.value), str(e.value)


def test_loraplus_traces_its_expected_state_once_per_structure(monkeypatch):
  """The state check derives what init() gives the updates; eagerly, it had
  traced init at every step. Kept per structure and shapes, it still
  refuses a state made for other params after the right ones were seen."""
  calls = []
  eval_shape = jax.eval_shape
  monkeypatch.setattr(jax, 'eval_shape',
                      lambda *a, **k: calls.append(1) or eval_shape(*a, **k))
  tx = lro.loraplus(1e-2)
  state = tx.init(_TREE)
  for _ in range(3):
    _, state = tx.update(_TREE, state, _TREE)
  assert len(calls) == 1
  with pytest.raises(ValueError, match='init'):
    tx.update(_OTHER_SHAPES, state, _OTHER_SHAPES)
  assert len(calls) == 2


def test_a_traced_balance_factors_is_one_line():
  """It changes the chain: injected as an array (or a schedule), it had
  failed in jit with a TracerBoolConversionError."""
  params = {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}
  tx = optax.inject_hyperparams(lro.lora_rite)(
      learning_rate=1e-2, balance_factors=jnp.array(True))
  with pytest.raises(ValueError, match=r'^lora_rite: balance_factors must be '
                     r'a Python bool \(it changes the chain\); with '
                     r'optax.inject_hyperparams pass it in static_args\.'):
    jax.jit(tx.update)(params, tx.init(params), params)
  tx = optax.inject_hyperparams(lro.lora_rite, static_args=(
      'balance_factors',))(learning_rate=1e-2, balance_factors=True)
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('name', lro.OPTIMIZER_NAMES)
def test_every_optimizer_passes_a_zero_size_factor_through(name):
  """ScaledAdam had failed in linalg.after (an IndexError) on a pair whose
  lora_a has a zero-size axis; the others returned empty updates. The
  warning names LoRA-RITE only where LoRA-RITE gives it."""
  params = {'p0': {'lora_a': jnp.ones((0, 2)), 'lora_b': jnp.ones((2, 3))},
            'p1': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}
  tx = lro.optimizer(name, 1e-2)
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter('always')
    updates, _ = tx.update(params, tx.init(params), params)
  assert updates['p0']['lora_a'].shape == (0, 2)
  assert bool(jnp.isfinite(updates['p1']['lora_a']).all())
  said = [str(w.message) for w in seen if 'spans as much' in str(w.message)]
  # Adam and Lamb work per leaf and look for no pairs.
  assert bool(said) == (name not in ('adam', 'lamb')), said
  assert all(('LoRA-RITE' in m) == (name == 'lora_rite') for m in said), said


@pytest.mark.parametrize('name', ['lora_rite', 'scaled_adam', 'shampoo'])
def test_stacked_pairs_with_no_layers_beside_others_update(name):
  """A scanned pair with 0 layers has a zero-size batch of r x r
  statistics; the next group's linalg.after must not index into it."""
  params = {'p': {'lora_a': jnp.ones((0, 8, 2)), 'lora_b': jnp.ones((0, 2, 4))},
            'q': {'lora_a': jnp.ones((2, 8, 3)), 'lora_b': jnp.ones((2, 3, 4))},
            'r': {'lora_a': jnp.ones((0, 8, 4)), 'lora_b': jnp.ones((0, 4, 4))}}
  tx = lro.optimizer(name, 1e-2, layout=lro.NNX_LAYOUT.scanned(1))
  grads = jax.tree.map(lambda x: 0.1 * jnp.cos(x), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
  assert bool(jnp.isfinite(updates['q']['lora_a']).all())


def test_loraplus_refuses_a_tree_without_factors():
  """Under optax.flatten the one flat vector had been a 'b' leaf: every
  factor, lora_a too, trained at lr_ratio times the rate, without a word."""
  params = {'q': _pair(8, 2, 8)}
  message = ('loraplus: no lora_a/lora_b factor in the params, so no rate to '
             'raise')
  with pytest.raises(ValueError, match=message):
    optax.flatten(lro.loraplus(1e-2)).init(params)
  with pytest.raises(ValueError, match=message):
    lro.loraplus(1e-2).init({'w': jnp.ones((3, 3)), 'bias': jnp.ones(3)})
  # Every factor masked out (another transform trains them): nothing to do.
  masked = optax.masked(lro.loraplus(1e-2), {'q': {'lora_a': False,
                                                   'lora_b': False}})
  masked.update(params, masked.init(params), params)


@pytest.mark.parametrize('make', [lro.scale_by_adam_authors,
                                  lro.balance_lora_factors],
                         ids=['scale_by_adam_authors', 'balance_lora_factors'])
def test_building_blocks_name_wrong_gradients(make):
  """Given params, the exported transforms say the gradients are wrong:
  scale_by_adam_authors had blamed the state, balance_lora_factors failed
  in a 9-line ValueError or a broadcast naming no leaf."""
  params = {'q': _pair(8, 2, 8)}
  tx = make()
  state = tx.init(params)
  who = make.__name__
  with pytest.raises(ValueError, match=f'^{who}: the updates \\(gradients\\) '
                     'do not have the structure of the params: a tuple of 3 '
                     'leaves'):
    tx.update((1.0, params), state, params)
  transposed = {'q': {'lora_a': jnp.ones((2, 8)), 'lora_b': jnp.ones((8, 2))}}
  with pytest.raises(ValueError, match=f'^{who}: the gradient of q/lora_a has '
                     r'shape \(2, 8\) but the param has \(8, 2\).$'):
    tx.update(transposed, state, params)


@pytest.mark.parametrize('make, called', [
    (lambda **kw: lro.scaled_adam(1e-3, **kw), 'scaled_adam'),
    (lro.scale_by_riemannian_precond, 'scale_by_riemannian_precond'),
    (lambda **kw: lro.shampoo(1e-3, **kw), 'shampoo'),
    (lro.scale_by_shampoo, 'scale_by_shampoo'),
    (lambda **kw: lro.lora_rite(1e-3, **kw), 'lora_rite'),
    (lro.scale_by_lora_rite, 'scale_by_lora_rite'),
])
def test_errors_name_the_function_called(make, called):
  # The building blocks had said `scaled_adam:` or `shampoo:`, a function the
  # user never called, and lora_rite's errors `scale_by_lora_rite:`.
  name = 'delta' if called in ('scaled_adam', 'scale_by_riemannian_precond'
                                ) else 'eps'
  with pytest.raises(ValueError, match=rf'^{called}: {name} must be >= 0'):
    make(**{name: -1.0})
  # And at the update, given gradients that do not fit the params.
  params = {'q': _pair(8, 2, 8)}
  tx = make()
  with pytest.raises(ValueError, match=rf'^{called}: the updates '
                     r'\(gradients\) do not have the structure'):
    tx.update((1.0, params), tx.init(params), params)


def test_scale_by_adam_authors_names_itself():
  with pytest.raises(ValueError, match=r'^scale_by_adam_authors: b1 must be'):
    lro.scale_by_adam_authors(b1=2.0)
  with pytest.raises(ValueError, match=r'^scaled_adam: b1 must be'):
    lro.scaled_adam(1e-3, b1=2.0)


@pytest.mark.parametrize('dtype', ['int32', 'complex64'])
@pytest.mark.parametrize('name', lro.OPTIMIZER_NAMES)
def test_integer_and_complex_factors_are_refused_at_init(name, dtype):
  # LoRA-RITE, ScaledAdam and Shampoo had failed at the first update in
  # "data type int32 not inexact", naming nothing; LoRA+, Adam and Lamb had
  # returned steps of 0 for good. A LoRA factor must be real too (its Grams
  # and QR are); Adam and Lamb work per leaf and, as optax's, take complex
  # params.
  params = {'q': {'lora_a': jnp.ones((8, 2), dtype),
                  'lora_b': jnp.ones((2, 6), dtype)}}
  factor = name not in ('adam', 'lamb')
  if dtype == 'complex64' and not factor:
    lro.optimizer(name, 1e-3).init(params)
    return
  message = (rf"^{name}: factor 'q/lora_a' has dtype {dtype}; LoRA factors "
             r'must be of a floating dtype\.$' if factor else
             rf"^{name}: param 'q/lora_a' has dtype int32; it cannot be "
             r'trained \(steps need a floating dtype\)\.$')
  with pytest.raises(ValueError, match=message):
    lro.optimizer(name, 1e-3).init(params)
  if factor:
    with pytest.raises(ValueError, match='must be of a floating dtype'):
      lro.find_lora_pairs(params)


@pytest.mark.parametrize('make, called', [
    (lambda layout: lro.lora_rite(1e-3, layout=layout), 'lora_rite'),
    (lambda layout: lro.scale_by_lora_rite(layout=layout),
     'scale_by_lora_rite'),
    (lambda layout: lro.loraplus(1e-3, layout=layout), 'loraplus'),
    (lambda layout: lro.scaled_adam(1e-3, layout=layout), 'scaled_adam'),
    (lambda layout: lro.shampoo(1e-3, layout=layout), 'shampoo'),
    (lambda layout: lro.balance_lora_factors(layout=layout),
     'balance_lora_factors'),
])
def test_a_bad_layout_is_refused_when_made(make, called):
  # A string had been taken, and failed at init without the optimizer's
  # name.
  with pytest.raises(ValueError, match=rf"^{called}: layout must be a "
                     r"LoraLayout .* got 'peft'\.$"):
    make('peft')
  # A function's errors come at init, and name the optimizer too.
  tx = make(lambda path: None)
  params = {'q': _pair(8, 2, 8)}
  with pytest.raises(ValueError, match=rf'^{called}: the layout function '
                     r"returned None for path 'q'; it must return a "
                     r'LoraLayout\.$'):
    tx.init(params) if called != 'balance_lora_factors' else tx.update(
        params, tx.init(params), params)


@pytest.mark.parametrize('name', lro.OPTIMIZER_NAMES)
def test_another_optimizers_state_is_named_as_such(name):
  # None had failed in a TypeError on its len(), another chain's state in
  # optax's "The number of updates and states has to be the same in
  # chain!", naming neither the optimizer nor the state.
  params = {'q': _pair(8, 2, 8)}
  tx = lro.optimizer(name, 1e-3)
  for state in (None, optax.adam(1e-3).init(params),
                lro.optimizer('lamb' if name != 'lamb' else 'adam',
                              1e-3).init(params)):
    with pytest.raises(ValueError, match=rf'^{name}: the state is '
                       r'(None|an? \w+|a tuple of \d+ states), '
                       r"not the .* this optimizer's init\(\) makes \(another "
                       r"optimizer's state, or the wrong part of a "
                       r"chain's\?\)\.$"):
      tx.update(params, state, params)
  tx.update(params, tx.init(params), params)  # its own is taken


@pytest.mark.parametrize('name', lro.OPTIMIZER_NAMES)
def test_a_state_restored_without_a_target_is_named_as_such(name, tmp_path):
  # A checkpointer restores tuples as lists and NamedTuples as dicts: Adam
  # and Lamb had failed in "'dict' object has no attribute 'mu'".
  # Not among the library's own dependencies (make test-oldest has none).
  ocp = pytest.importorskip('orbax.checkpoint')
  params = {'q': _pair(8, 2, 8)}
  tx = lro.optimizer(name, 1e-3)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'state', tx.init(params))
    ckpt.wait_until_finished()
    raw = ckpt.restore(tmp_path / 'state')
  with pytest.raises(ValueError, match=rf'^{name}: the state is an? (list|dict|tuple of \d+ states), '
                     r"not .* \(restored without a target\? restore into "
                     r'jax.eval_shape\(tx.init, params\)\)\.$'):
    tx.update(params, raw, params)


@pytest.mark.parametrize('name', lro.OPTIMIZER_NAMES)
def test_a_state_with_no_pairs_is_saved_and_restored(name, tmp_path):
  # LoRA-RITE's and Shampoo's placeholders for no pairs (an empty tree, or an
  # optax.partition group this run's targets leave empty) had been arrays
  # of size 0, which orbax refuses to save: the whole checkpoint failed.
  # Not among the library's own dependencies (make test-oldest has none).
  ocp = pytest.importorskip('orbax.checkpoint')
  params = {'attn': _pair(8, 2, 8), 'embed': jnp.ones((10, 8))}
  labels = {'attn': {'lora_a': 'attn', 'lora_b': 'attn'}, 'embed': 'frozen'}
  tx = optax.partition({'attn': lro.optimizer(name, 1e-3),
                        'mlp': lro.optimizer(name, 1e-3),
                        'frozen': optax.set_to_zero()}, labels)
  for i, (tx, params) in enumerate(((tx, params),
                                    (lro.optimizer(name, 1e-3), {}))):
    state = tx.init(params)
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp_path / str(i), state)
      ckpt.wait_until_finished()
      back = ckpt.restore(tmp_path / str(i), jax.eval_shape(tx.init, params))
    jax.tree.map(np.testing.assert_array_equal, back, state)
    tx.update(params, back, params)


@pytest.mark.parametrize('name', ['adam', 'loraplus', 'shampoo', 'lamb'])
def test_a_python_number_beside_the_pairs_is_trained(name):
  # Shampoo's init had failed in "'float' object has no attribute 'shape'",
  # Lamb's update in optax's trust ratio on its dtype; Adam's and LoRA+'s
  # took it.
  params = {'q': _pair(8, 2, 8), 'scale': 1.0}
  tx = lro.optimizer(name, 1e-3)
  updates, _ = tx.update({'q': params['q'], 'scale': 1.0}, tx.init(params),
                         params)  # eager: under jit they are arrays
  assert float(updates['scale']) == pytest.approx(-1e-3, rel=1e-3)


@pytest.mark.parametrize('name', ['loraplus', 'shampoo'])
def test_an_integer_leaf_beside_the_pairs_is_refused_at_init(name):
  # Only the pairs' factors had been checked: Shampoo failed at the first
  # update naming nothing, LoRA+ stepped the leaf by 0 (or, a LoRA-FA
  # factor whose partner is masked, truncated its steps).
  params = {'q': _pair(8, 2, 6), 'w': jnp.ones((4, 4), jnp.int32)}
  with pytest.raises(ValueError, match=rf"^{name}: param 'w' has dtype int32; "
                     r'it cannot be trained \(steps need a floating '
                     r'dtype\)\.$'):
    lro.optimizer(name, 1e-3).init(params)
  lone = {'q': {'lora_a': jnp.ones((8, 2)),
                'lora_b': jnp.ones((2, 6), jnp.int32)}}
  masked = optax.masked(lro.optimizer(name, 1e-3),
                        {'q': {'lora_a': False, 'lora_b': True}})
  with pytest.raises(ValueError, match=rf"^{name}: .* 'q/lora_b' has dtype "
                     'int32'):
    masked.init(lone)


def test_loraplus_labels_names_itself():
  with pytest.raises(ValueError, match=r'^loraplus_labels: no lora_a/lora_b '
                     'factor in the params'):
    lro.loraplus_labels({'w': jnp.ones((3, 3))})
  with pytest.raises(ValueError, match=r'^loraplus_labels: layout must be'):
    lro.loraplus_labels({'q': _pair(4, 2, 3)}, layout='peft')
  with pytest.raises(ValueError, match=r'^loraplus: no lora_a/lora_b factor'):
    lro.loraplus(1e-3).init({'w': jnp.ones((3, 3))})


@pytest.mark.parametrize('name', ['adam', 'loraplus', 'lamb'])
def test_an_update_without_params_names_the_optimizer(name):
  # optax's "You are using a transformation that requires the current value
  # of parameters" had named no optimizer.
  params = {'q': _pair(4, 2, 5)}
  tx = lro.optimizer(name, 1e-2)
  with pytest.raises(ValueError, match=rf'^{name}: update\(\) needs params '
                     r'\(the weight decay reads them\): call '
                     r'tx.update\(grads, state, params\)\.$'):
    tx.update(params, tx.init(params))


def test_loraplus_with_a_base_of_its_own_may_update_without_params():
  params = {'q': _pair(4, 2, 5)}
  tx = lro.loraplus(1e-2, base=optax.sgd)
  updates, _ = tx.update(params, tx.init(params))
  assert float(jnp.abs(updates['q']['lora_b']).max()) > 0


def test_explicit_mesh_axes_before_jax_0_10_are_refused_where_needed(
    monkeypatch):
  """What needs jax 0.10's sharding API over Explicit mesh axes (LoRA-RITE,
  balance_lora_factors, ScaledAdam, Shampoo, donating_jit's out_shardings)
  is refused in one line on an older jax (here: a jax taken as older);
  Adam, LoRA+ and Lamb, which need none of it, are not."""
  monkeypatch.setattr(placement, '_EXPLICIT_AXES_JAX', (99, 0))
  mesh = jax.make_mesh((1,), ('d',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  where = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(_pair(8, 2, 6), where)
  need = (r'params on Explicit mesh axes need jax 0.10 or newer \(this is '
          rf'jax {re.escape(jax.__version__)}\); make the mesh with Auto axes')
  for name in ('lora_rite', 'scaled_adam', 'shampoo'):
    with pytest.raises(ValueError, match=rf'^{name}: {need}'):
      lro.optimizer(name, 1e-2).init(params)
  balance = lro.balance_lora_factors()
  with pytest.raises(ValueError, match=rf'^balance_lora_factors: {need}'):
    balance.update(params, balance.init(params), params)
  for name in ('adam', 'loraplus', 'lamb'):
    tx = lro.optimizer(name, 1e-2)
    tx.update(params, tx.init(params), params)
  step = lro.donating_jit(lambda x: x * 2, donate_argnums=0,
                          out_shardings=where)
  with pytest.raises(ValueError, match=r'^donating_jit: out_shardings on '
                     r'Explicit mesh axes need jax 0.10 or newer'):
    step(jax.device_put(jnp.ones(3), where))
  # One pair on the mesh beside a pair on none is refused too (the refusal
  # must not wait for every leaf to be on one).
  mixed = {'q': params, 'k': _pair(8, 2, 6)}
  for name in ('lora_rite', 'scaled_adam', 'shampoo'):
    with pytest.raises(ValueError, match=rf'^{name}: {need}'):
      lro.optimizer(name, 1e-2).init(mixed)


def test_lora_b_mask_marks_the_b_factor_of_each_pair_only():
  """True on each pair's lora_b and on a lora_b whose lora_a is masked
  out; False on lora_a, on other leaves and on masked-out leaves."""
  tree = {'q': {'lora_a': jnp.ones((6, 2)), 'lora_b': jnp.ones((2, 3))},
          'norm': jnp.ones(3),
          'k': {'lora_a': optax.MaskedNode(), 'lora_b': jnp.ones((2, 3))},
          'v': {'lora_a': jnp.ones((6, 2)), 'lora_b': optax.MaskedNode()}}
  assert lro.lora_b_mask(tree) == {
      'q': {'lora_a': False, 'lora_b': True}, 'norm': False,
      'k': {'lora_a': False, 'lora_b': True},
      'v': {'lora_a': False, 'lora_b': False}}
  peft = {'q': {'lora_A': {'weight': jnp.ones((2, 6))},
                'lora_B': {'weight': jnp.ones((3, 2))}}}
  assert lro.lora_b_mask(peft, lro.PEFT_LAYOUT) == {
      'q': {'lora_A': {'weight': False}, 'lora_B': {'weight': True}}}


@pytest.mark.skipif(
    tuple(int(p) for p in jax.__version__.split('.')[:2]) < (0, 10),
    reason='Explicit mesh axes need jax 0.10 (refused before, tested above)')
def test_explicit_mesh_axes_are_taken_on_jax_0_10_and_newer():
  """The version gate read independently of placement's own: on jax 0.10+
  LoRA-RITE, ScaledAdam and donating_jit's out_shardings take Explicit
  axes (a gate set too high, or a version misread, refused them; the
  sharding tests take their expectation from the gate itself)."""
  mesh = jax.make_mesh((1,), ('d',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  where = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put({'q': {'lora_a': jnp.ones((8, 2)),
                                 'lora_b': jnp.ones((2, 6))}}, where)
  for name in ('lora_rite', 'scaled_adam'):
    tx = lro.optimizer(name, 1e-2)
    tx.update(params, tx.init(params), params)
  step = lro.donating_jit(lambda x: x * 2, donate_argnums=0,
                          out_shardings=where)
  assert float(step(jax.device_put(jnp.ones(3), where))[0]) == 2.0
  # A bare spec names the mesh set around the call, as jax.jit takes it
  # (with_sharding_constraint had only asserted it there and failed).
  bare = lro.donating_jit(lambda x: x * 2, donate_argnums=0,
                          out_shardings=PartitionSpec('d'))
  with jax.set_mesh(mesh):
    got = bare(jax.device_put(jnp.ones((2, 3)), where))
  assert got.sharding.is_equivalent_to(
      NamedSharding(mesh, PartitionSpec('d')), 2), got.sharding

"""LoRA+, ScaledAdam and Shampoo: NumPy parity, convergence, the battery."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_rite_optax as lro
from tests import optimizer_battery as battery

# --------------------------------------------------------------------------
# The optax battery.

BASELINES = {
    'loraplus': (lro.loraplus, 1e-2),
    'scaled_adam': (lro.scaled_adam, 3e-2),
    'shampoo': (functools.partial(lro.shampoo, block_size=4,
                                  precondition_every=2), 1e-2),
}


@pytest.mark.parametrize('check', battery.CHECKS)
@pytest.mark.parametrize('name', sorted(BASELINES))
def test_battery(name, check):
  make, lr = BASELINES[name]
  options = {}
  if check == 'bfloat16' and name in ('scaled_adam', 'shampoo'):
    options = dict(min_state_dtype=jnp.float32)
  if name == 'loraplus' and check == 'inject_hyperparams':
    # A traced weight decay cannot be known to be 0: the injected LoRA+
    # keeps a no-decay group that the plain one merges (same updates).
    options = dict(state_rtol=-1)
  if name == 'shampoo' and check in ('inject_hyperparams', 'schedule'):
    # Two compiled programs differ by float32 rounding, which the inverse
    # roots of early, rank-deficient statistics amplify (the ridge is 1e-6 of
    # the largest eigenvalue): ~1e-3 relative in the updates, a few % in
    # those roots; injected and plain agree exactly in float64.
    options = dict(rtol=3e-3)
    if check == 'inject_hyperparams':
      options.update(static_args=('block_size',), state_rtol=5e-2)
  if name == 'shampoo' and check == 'multisteps':
    # MultiSteps' two cycles amplify that rounding further (0.6-1.4%, by how
    # XLA happens to compile each program): in float64, to the default rtol.
    with jax.enable_x64(True):
      battery.run(check, make, lr, dtype=jnp.float64)
    return
  battery.run(check, make, lr, **options)


def test_loraplus_wraps_any_base_optimizer():
  make = functools.partial(lro.loraplus, base=optax.lion, lr_ratio=4.0)
  battery.check_converges(make, 1e-2, rtol=2e-2)
  battery.check_inject_hyperparams(make, 1e-2, static_args=('base',))
  # The base's own step: Lion's at the rate on A, at 4 times it on B.
  params = {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.full((2, 4), 0.5)}
  grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype)
                                         ).reshape(p.shape) + 0.5, params)
  tx = make(1e-2)
  got, _ = tx.update(grads, tx.init(params), params)
  for name, rate in (('lora_a', 1e-2), ('lora_b', 4e-2)):
    ref = optax.lion(rate)
    want, _ = ref.update(grads, ref.init(params), params)
    chex.assert_trees_all_close(got[name], want[name])


# --------------------------------------------------------------------------
# LoRA+.


def _tree(rng, dtype=np.float32):
  return {
      'q': {'lora_a': rng.normal(size=(5, 2)).astype(dtype),
            'lora_b': rng.normal(size=(2, 3, 2)).astype(dtype)},
      'v': {'lora_a': rng.normal(size=(4, 2)).astype(dtype),
            'lora_b': rng.normal(size=(2, 4)).astype(dtype)},
  }


def test_loraplus_equals_two_adams_by_hand():
  rng = np.random.default_rng(0)
  params = _tree(rng)
  lr, ratio = 1e-2, 8.0
  schedule = optax.linear_schedule(lr, lr / 4, 5)
  # Not AdamW's defaults: loraplus must pass its own through (the train
  # loop gives it eps=1e-6).
  adam_kw = dict(b1=0.8, b2=0.95, eps=1e-3, weight_decay=0.1)
  tx = lro.loraplus(schedule, lr_ratio=ratio, **adam_kw)
  # By hand: one AdamW on the A leaves at lr, one on the B leaves at ratio*lr.
  split = lambda tree, want: {
      k: {kk: vv for kk, vv in v.items() if (kk == 'lora_b') == want}
      for k, v in tree.items()}
  adam_a = optax.adamw(schedule, **adam_kw)
  adam_b = optax.adamw(lambda c: ratio * schedule(c), **adam_kw)
  states = (tx.init(params), adam_a.init(split(params, False)),
            adam_b.init(split(params, True)))

  @jax.jit
  def both(grads, states, params):
    updates, state = tx.update(grads, states[0], params)
    ua, state_a = adam_a.update(split(grads, False), states[1],
                                split(params, False))
    ub, state_b = adam_b.update(split(grads, True), states[2],
                                split(params, True))
    expected = {k: {**ua[k], **ub[k]} for k in params}
    return updates, expected, (state, state_a, state_b)

  for _ in range(6):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype),
                         params)
    updates, expected, states = both(grads, states, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-7)
    params = optax.apply_updates(params, updates)


def test_loraplus_groups_follow_peft():
  params = {
      'embed': {'lora_a': jnp.zeros((10, 2)), 'lora_b': jnp.zeros((2, 4))},
      'mlp': {'lora_a': jnp.zeros((4, 2)), 'lora_b': jnp.zeros((2, 4)),
              'bias': jnp.zeros(4), 'kernel': jnp.zeros((4, 4))},
      'final_norm': {'scale': jnp.zeros(4)},
      'gate': jnp.zeros(4),
  }
  labels = lro.loraplus_labels(params)
  assert labels == {
      'embed': {'lora_a': 'a', 'lora_b': 'b'},
      'mlp': {'lora_a': 'a', 'lora_b': 'b', 'bias': 'b_no_decay',
              'kernel': 'a'},
      'final_norm': {'scale': 'b_no_decay'},
      'gate': 'b',
  }
  labels = lro.loraplus_labels(params, is_embedding=lambda p: 'embed' in p)
  assert labels['embed'] == {'lora_a': 'embedding', 'lora_b': 'embedding'}
  # With SGD as the base and unit gradients, each group's rate is visible.
  tx = lro.loraplus(1e-3, lr_ratio=4.0, base=optax.sgd,
                    is_embedding=lambda p: 'embed' in p, lr_embedding=1e-6)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  rate = lambda x: -float(x.reshape(-1)[0])
  assert rate(updates['mlp']['lora_a']) == pytest.approx(1e-3)
  assert rate(updates['mlp']['lora_b']) == pytest.approx(4e-3)
  assert rate(updates['mlp']['kernel']) == pytest.approx(1e-3)
  assert rate(updates['mlp']['bias']) == pytest.approx(4e-3)
  assert rate(updates['gate']) == pytest.approx(4e-3)
  assert rate(updates['embed']['lora_a']) == pytest.approx(1e-6)
  assert rate(updates['embed']['lora_b']) == pytest.approx(1e-6)


def test_loraplus_no_decay_group_and_base_errors():
  params = {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.ones((2, 3)),
            'bias': jnp.ones(3)}
  tx = lro.loraplus(1.0, lr_ratio=2.0, weight_decay=0.5)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradient: the AdamW step is only the decay, lr * ratio * wd * p.
  assert float(updates['lora_a'][0, 0]) == pytest.approx(-0.5)
  assert float(updates['lora_b'][0, 0]) == pytest.approx(-1.0)
  assert float(updates['bias'][0]) == 0.0
  with pytest.raises(ValueError, match='pass b1/b2/eps/weight_decay'):
    lro.loraplus(1e-3, base=optax.lion, weight_decay=0.1)
  # A decay schedule too (it had been dropped without a word).
  with pytest.raises(ValueError, match='pass b1/b2/eps/weight_decay'):
    lro.loraplus(1e-3, base=optax.lion,
                 weight_decay=optax.linear_schedule(1e-2, 0.0, 10))
  # The no-decay group (biases, norms: neither factor of a pair) takes the
  # B rate, and the embedding group the decay: with unit gradients AdamW's
  # first step is lr * (sign + wd * p) per group.
  params['embed'] = {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.ones((2, 3))}
  tx = lro.loraplus(1e-3, lr_ratio=4.0, weight_decay=0.5,
                    is_embedding=lambda path: 'embed' in path,
                    lr_embedding=0.1)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  np.testing.assert_allclose(updates['bias'], -4e-3, rtol=1e-4)
  np.testing.assert_allclose(updates['lora_a'], -1e-3 * 1.5, rtol=1e-4)
  np.testing.assert_allclose(updates['lora_b'], -4e-3 * 1.5, rtol=1e-4)
  np.testing.assert_allclose(updates['embed']['lora_a'], -0.1 * 1.5,
                             rtol=1e-4)
  # An optimizer instance is not a factory: one line, not "'...' object is
  # not callable" from inside the chain.
  with pytest.raises(ValueError) as e:
    lro.loraplus(1e-3, base=optax.sgd(1e-3))
  assert str(e.value) == (
      'loraplus: base must be a function of the learning rate that returns '
      'the optimizer (e.g. optax.lion), not an optimizer: one is built per '
      'group, each at its own rate; got GradientTransformationExtraArgs.')


# --------------------------------------------------------------------------
# ScaledAdam against a float64 NumPy implementation of its stated formulas.


def _np_scaled_adam(params, grads_seq, lr, b1, b2, eps, wd, delta, bc):
  """Per pair: g_A (X_B^T X_B + dI)^-1, g_B-view (X_A^T X_A + dI)^-1, AdamW."""
  params = {k: {kk: np.array(vv, np.float64) for kk, vv in v.items()}
            for k, v in params.items()}
  mom = {k: {kk: (np.zeros_like(vv), np.zeros_like(vv)) for kk, vv in v.items()}
         for k, v in params.items()}
  history = []
  for t, grads in enumerate(grads_seq, start=1):
    new = {}
    for name, pair in params.items():
      a, b = pair['lora_a'], pair['lora_b']
      r = a.shape[-1]
      xa = a.reshape(-1, r)
      xb = b.reshape(r, -1).T
      ga = grads[name]['lora_a'].reshape(-1, r)
      gb = grads[name]['lora_b'].reshape(r, -1).T
      ga = ga @ np.linalg.inv(xb.T @ xb + delta * np.eye(r))
      gb = gb @ np.linalg.inv(xa.T @ xa + delta * np.eye(r))
      scaled = {'lora_a': ga.reshape(a.shape),
                'lora_b': gb.T.reshape(b.shape)}
      new[name] = {}
      for key, g in scaled.items():
        m, v = mom[name][key]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mom[name][key] = (m, v)
        c = np.sqrt(1 - b2 ** t) / (1 - b1 ** t) if bc else 1.0
        step = c * m / (np.sqrt(v) + eps) + wd * pair[key]
        new[name][key] = pair[key] - lr * step
    params = new
    history.append(params)
  return history


@pytest.mark.parametrize('bias_correction', [False, True])
def test_scaled_adam_matches_numpy(bias_correction):
  rng = np.random.default_rng(1)
  params0 = _tree(rng, np.float64)
  params0['v']['lora_b'][:] = 0.0  # a standard-init pair: lora_b = 0
  grads_seq = [jax.tree.map(lambda p: rng.normal(size=p.shape), params0)
               for _ in range(6)]
  hyper = dict(lr=3e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, delta=1e-3)
  expected = _np_scaled_adam(params0, grads_seq, bc=bias_correction, **hyper)
  with jax.enable_x64(True):
    tx = lro.scaled_adam(hyper['lr'], b1=hyper['b1'], b2=hyper['b2'],
                         eps=hyper['eps'], weight_decay=hyper['wd'],
                         delta=hyper['delta'],
                         bias_correction=bias_correction)
    params = jax.tree.map(jnp.asarray, params0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads, want in zip(grads_seq, expected):
      updates, state = update(jax.tree.map(jnp.asarray, grads), state, params)
      params = optax.apply_updates(params, updates)
      chex.assert_trees_all_close(params, want, rtol=1e-10, atol=1e-12)


def test_scaled_adam_errors_and_zero_factor():
  params = {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.zeros((2, 4))}
  tx = lro.scaled_adam(1e-2)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r'^scaled_adam: update\(\) needs '
                     r'params \(the preconditioner is built from the LoRA '
                     r'factors\): call tx.update\(grads, state, params\)\.$'):
    tx.update(params, state)
  grads = {'lora_a': jnp.zeros((3, 2)), 'lora_b': jnp.ones((2, 4))}
  updates, _ = jax.jit(tx.update)(grads, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  with pytest.raises(ValueError, match='not part of a LoRA pair'):
    lro.scaled_adam(1e-2).init({**params, 'w': jnp.ones((2, 2))})


# --------------------------------------------------------------------------
# Shampoo against a float64 NumPy implementation with explicit blocks.


def _np_inverse_root(s, matrix_eps):
  w, q = np.linalg.eigh((s + s.T) / 2)
  if w.max() <= 0:
    return np.eye(len(s))
  w = np.maximum(w, 0) + matrix_eps * w.max()
  return (q * w ** -0.25) @ q.T


def _np_matrix(x, kind):
  """The rank-last / trailing-axis matrix view of a leaf, and its inverse."""
  if kind == 'lora_b':
    r = x.shape[0]
    return x.reshape(r, -1).T, lambda m: m.T.reshape(x.shape)
  return x.reshape(-1, x.shape[-1]), lambda m: m.reshape(x.shape)


class _NpShampoo:
  """Shampoo as stated in lro.shampoo's docstring, blocks by slicing."""

  def __init__(self, b1, b2, eps, matrix_eps, block_size, every, graft):
    self.h = (b1, b2, eps, matrix_eps, block_size, every, graft)
    self.t = 0
    self.state = {}

  def _blocks(self, n, m):
    bs = self.h[4]
    return [(slice(i, min(i + bs, n)), slice(j, min(j + bs, m)))
            for i in range(0, n, bs) for j in range(0, m, bs)]

  def update(self, grads):
    b1, b2, eps, matrix_eps, _, every, graft = self.h
    out = {}
    for path, g in grads.items():
      st = self.state.setdefault(path, {'mu': np.zeros_like(g),
                                        'nu': np.zeros_like(g)})
      st['nu'] = b2 * st['nu'] + (1 - b2) * g * g
      adam = g / (np.sqrt(st['nu'] / (1 - b2 ** (self.t + 1))) + eps)
      if g.ndim < 2:  # Distributed Shampoo: the graft's own direction.
        direction = g if graft == 'sgd' else adam
      else:
        gm, back = _np_matrix(g, path.split('/')[-1])
        pre = np.zeros_like(gm)
        for k, (rows, cols) in enumerate(self._blocks(*gm.shape)):
          gb = gm[rows, cols]
          left, right = st.setdefault(('stats', k), (0.0, 0.0))
          left = b2 * left + (1 - b2) * gb @ gb.T
          right = b2 * right + (1 - b2) * gb.T @ gb
          st[('stats', k)] = (left, right)
          if self.t % every == 0:
            st[('roots', k)] = (_np_inverse_root(left, matrix_eps),
                                _np_inverse_root(right, matrix_eps))
          pl, pr = st[('roots', k)]
          pre[rows, cols] = pl @ gb @ pr
        if graft != 'none':
          ref = adam if graft == 'adam' else g
          norm = np.linalg.norm(pre)
          pre = pre * (np.linalg.norm(ref) / norm if norm > 0 else 0.0)
        direction = back(pre)
      st['mu'] = b1 * st['mu'] + (1 - b1) * direction
      out[path] = st['mu'] / (1 - b1 ** (self.t + 1))
    self.t += 1
    return out


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('graft', ['adam', 'sgd', 'none'])
def test_shampoo_matches_numpy(graft):
  rng = np.random.default_rng(2)
  params = {
      'q': {'lora_a': rng.normal(size=(10, 3)),        # row blocks 4, 4, 2
            'lora_b': rng.normal(size=(3, 2, 5))},     # view (10, 3)
      'w': rng.normal(size=(5, 6)),                    # a non-LoRA matrix
      'bias': rng.normal(size=(6,)),                   # 1-D: the graft's
  }
  hyper = dict(b1=0.9, b2=0.95, eps=1e-8, matrix_eps=1e-6, block_size=4,
               every=3, graft=graft)
  ref = _NpShampoo(**hyper)
  with jax.enable_x64(True):
    tx = lro.scale_by_shampoo(
        b1=hyper['b1'], b2=hyper['b2'], eps=hyper['eps'],
        matrix_eps=hyper['matrix_eps'], block_size=hyper['block_size'],
        precondition_every=hyper['every'], graft=graft)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    update = jax.jit(tx.update)
    for _ in range(7):
      grads = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
      updates, state = update(jax.tree.map(jnp.asarray, grads), state)
      want = ref.update(_flat(grads))
      got = _flat(updates)
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-8,
                                   atol=1e-10, err_msg=key)
    assert state.count.dtype == jnp.int32


def test_shampoo_converges_on_ill_conditioned_quadratic():
  rng = np.random.default_rng(3)
  # f(W) = 0.5 tr((W - W*)^T H (W - W*) K) with condition numbers 1e3 each side.
  h = np.diag(np.logspace(0, 3, 8))
  k = np.diag(np.logspace(0, 3, 6))
  w_star = rng.normal(size=(8, 6))
  loss = lambda w: 0.5 * jnp.sum((w - w_star) * (h @ (w - w_star) @ k))
  tx = lro.shampoo(3e-2, precondition_every=5)
  w = jnp.zeros((8, 6))
  state = tx.init(w)

  @jax.jit
  def step(w, state):
    updates, state = tx.update(jax.grad(loss)(w), state, w)
    return optax.apply_updates(w, updates), state

  for _ in range(400):
    w, state = step(w, state)
  initial, final = float(loss(jnp.zeros((8, 6)))), float(loss(w))
  assert final < 1e-3 * initial, (initial, final)


def test_shampoo_zero_gradient_and_errors():
  params = {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.zeros((2, 4))}
  tx = lro.shampoo(1e-2)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  for leaf in jax.tree.leaves(updates):
    assert bool(jnp.all(leaf == 0))
  # With weight decay and no gradient, the update is the decay alone.
  params = {'lora_a': 2 * jnp.ones((3, 2)), 'lora_b': -jnp.ones((2, 4))}
  tx = lro.shampoo(1e-2, weight_decay=0.5)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  chex.assert_trees_all_close(
      updates, jax.tree.map(lambda p: -1e-2 * 0.5 * p, params), rtol=1e-6)
  with pytest.raises(ValueError, match='graft must be one of'):
    lro.shampoo(1e-2, graft='adagrad')


@pytest.mark.parametrize('make', [
    functools.partial(lro.scaled_adam, 1e-2),
    functools.partial(lro.shampoo, 1e-2, block_size=4),
], ids=['scaled_adam', 'shampoo'])
def test_scanned_layers_are_independent_pairs(make):
  """Stacked layers (leading axis) step exactly as separate pairs."""
  rng = np.random.default_rng(4)
  stacked = {'lora_a': rng.normal(size=(2, 6, 2)).astype(np.float32),
             'lora_b': rng.normal(size=(2, 2, 3)).astype(np.float32)}
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype),
                       stacked)
  tx = make(layout=lro.NNX_LAYOUT.scanned(1))
  updates, _ = jax.jit(tx.update)(grads, tx.init(stacked), stacked)
  split = lambda tree: {f'l{i}': jax.tree.map(lambda x, i=i: x[i], tree)
                        for i in range(2)}
  tx = make()
  per_layer, _ = jax.jit(tx.update)(split(grads), tx.init(split(stacked)),
                                    split(stacked))
  chex.assert_trees_all_close(split(updates), per_layer, rtol=1e-5,
                              atol=1e-6)


@pytest.mark.parametrize('make', [
    functools.partial(lro.loraplus, 1e-2, lr_ratio=4.0, weight_decay=0.1),
    functools.partial(lro.shampoo, 1e-2, block_size=4),
], ids=['loraplus', 'shampoo'])
def test_scanned_leaves_outside_pairs_step_per_layer(make):
  """A stacked bias or kernel outside the pairs steps as its layers would.

  Before, LoRA+ put a stacked bias (L, d) in A's group (rate and weight decay
  of a matrix) and Shampoo preconditioned a stacked kernel across layers.
  """
  rng = np.random.default_rng(5)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  # The kernel's rows (6) are not a multiple of Shampoo's block (4): blocks
  # over the flattened layers would cross from one layer into the next
  # (with 4 rows they had fallen on the layers' edges, and passed).
  stacked = {'lora_a': normal(2, 6, 2), 'lora_b': normal(2, 2, 3),
             'bias': normal(2, 3), 'kernel': normal(2, 6, 5),
             'final_norm': normal(3)}
  # Layer 1's gradients 100x layer 0's: preconditioning across layers would
  # shrink layer 0's step.
  grads = {k: normal(*v.shape) * (np.array([1.0, 100.0]).reshape(
      (2,) + (1,) * (v.ndim - 1)) if v.ndim > 1 else 1.0)
           for k, v in stacked.items()}
  grads = jax.tree.map(lambda g: g.astype(np.float32), grads)
  split = lambda tree: {f'l{i}': {k: v[i] for k, v in tree.items()
                                   if k != 'final_norm'} for i in range(2)}
  # Two steps: at the first each layer's preconditioned step has the same
  # norm whichever blocks it came from.
  tx, layered = make(layout=lro.NNX_LAYOUT.scanned(1)), make()
  state, layered_state = tx.init(stacked), layered.init(split(stacked))
  for _ in range(2):
    updates, state = jax.jit(tx.update)(grads, state, stacked)
    per_layer, layered_state = jax.jit(layered.update)(
        split(grads), layered_state, split(stacked))
    chex.assert_trees_all_close(split(updates), per_layer, rtol=1e-5,
                                atol=1e-6)
  if make.func is lro.loraplus:
    labels = lro.loraplus_labels(stacked, lro.NNX_LAYOUT.scanned(1))
    assert labels == {'lora_a': 'a', 'lora_b': 'b', 'bias': 'b_no_decay',
                      'kernel': 'a', 'final_norm': 'b_no_decay'}


def test_shampoo_checks_block_size_under_inject_hyperparams():
  params = {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.zeros((2, 4))}
  make = optax.inject_hyperparams(lro.shampoo, static_args=('block_size',))
  with pytest.raises(ValueError, match='block_size must be an integer >= 1, '
                     'got 0'):
    make(1e-3, block_size=0).init(params)
  with pytest.raises(ValueError, match='precondition_every must be an '
                     'integer >= 1'):
    lro.shampoo(1e-3, precondition_every=0)


@pytest.mark.parametrize('name', ['loraplus', 'scaled_adam', 'shampoo'])
def test_inside_optax_partition_with_frozen_leaves(name):
  """Masked-out leaves (optax.MaskedNode) are skipped, as in a real model."""
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.full((2, 3), 0.1)},
            'kernel': jnp.ones((4, 3)), 'norm': jnp.ones(3)}
  labels = {'q': {'lora_a': 'lora', 'lora_b': 'lora'}, 'kernel': 'frozen',
            'norm': 'frozen'}
  tx = optax.partition({'lora': lro.optimizer(name, 1e-2),
                        'frozen': optax.set_to_zero()}, labels)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert not bool(jnp.any(updates['kernel'])) and not bool(
      jnp.any(updates['norm']))
  assert bool(jnp.all(updates['q']['lora_a'] != 0))


def _float16_standard_pair():
  """A standard-init float16 pair and its gradient: lora_b = 0, so all of
  lora_a's gradient is exactly 0."""
  a, b = lro.init.standard(jax.random.key(0), 16, 12, 4, dtype=jnp.float16)
  params = {'lora_a': a, 'lora_b': b}
  x = jax.random.normal(jax.random.key(1), (5, 16))
  y = jax.random.normal(jax.random.key(2), (5, 12))
  loss = lambda p: jnp.mean(
      (x @ (p['lora_a'] @ p['lora_b']).astype(jnp.float32) - y) ** 2)
  grads = jax.grad(loss)(params)
  assert not bool(jnp.any(grads['lora_a']))
  return params, grads


@pytest.mark.parametrize('make', [
    lambda: lro.loraplus(1e-3),
    lambda: lro.loraplus(1e-3, base=optax.adam),
    # inject_hyperparams makes eps a float16 array: 1e-8 rounds to 0.
    lambda: optax.inject_hyperparams(lro.scaled_adam)(1e-3),
    lambda: optax.inject_hyperparams(
        lro.shampoo, static_args=('block_size',))(1e-3),
    lambda: lro.scaled_adam(1e-3, eps=0.0),
    lambda: lro.shampoo(1e-3, eps=0.0),
    # optax's Adam is 0/0 there: LoRA+, 'adam' and 'lamb' had made lora_a
    # NaN at the first step.
    lambda: lro.loraplus(1e-3, eps=0.0),
    lambda: optax.inject_hyperparams(lro.loraplus)(1e-3),
    lambda: lro.optimizer('adam', 1e-3, eps=0.0),
    lambda: lro.optimizer('lamb', 1e-3, eps=0.0),
], ids=['loraplus', 'loraplus_base', 'scaled_adam_injected',
        'shampoo_injected', 'scaled_adam_eps0', 'shampoo_eps0',
        'loraplus_eps0', 'loraplus_injected', 'adam_eps0', 'lamb_eps0'])
def test_a_zero_gradient_with_no_eps_left_is_no_step(make):
  """A zero second moment over an eps of 0 (or 1e-8 in float16) is a null
  direction: no step, where 0/0 had made lora_a (shampoo: all of it,
  through the graft's norm) NaN at the first step."""
  params, grads = _float16_standard_pair()
  tx = make()
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert not bool(jnp.any(updates['lora_a']))
  assert bool(jnp.any(updates['lora_b']))
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype('float16')}


@pytest.mark.parametrize('name, reference', [
    ('adam', lambda: optax.adamw(1e-3, weight_decay=0.0)),
    ('lamb', lambda: optax.lamb(1e-3))])
def test_adam_and_lamb_are_optax_bit_for_bit_but_for_0_over_0(name,
                                                             reference):
  """A gradient below ~1e-21 has a second moment that underflows to 0 and a
  first moment that does not: optax's step there (and lamb's trust ratio)
  is kept; only a true 0/0 becomes 0."""
  params = {'w': jnp.ones(4)}
  grads = {'w': jnp.array([1e-22, 1e-30, 1e-3, 0.0])}
  tx, ref = lro.optimizer(name, 1e-3), reference()
  ours, _ = tx.update(grads, tx.init(params), params)
  theirs, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_array_equal(ours['w'], theirs['w'])
  assert bool(jnp.all(ours['w'][:3] != 0))


@pytest.mark.parametrize('name', ['loraplus', 'adam', 'lamb'])
def test_adam_family_keeps_16_bit_moments_in_float32(name):
  """float16: optax's Adam (eps 1e-8 rounds to 0) made lora_a's first step
  0/0, NaN, through lro.optimizer('adam'). bfloat16: 0.999 * nu == nu in
  8 bits of mantissa, so the second moment never decayed, only grew."""
  params, grads = _float16_standard_pair()
  tx = lro.optimizer(name, 1e-2)
  state = tx.init(params)
  assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {
      jnp.dtype('float32')}
  updates, _ = jax.jit(tx.update)(grads, state, params)
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype('float16')}
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))

  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  half = jax.tree.map(lambda p: jnp.full_like(p, 0.5), bf16)
  zero = jax.tree.map(jnp.zeros_like, bf16)
  step = jax.jit(tx.update)
  state = tx.init(bf16)
  for grad, n in ((half, 50), (zero, 200)):
    for _ in range(n):
      updates, state = step(grad, state, bf16)
  assert {u.dtype for u in jax.tree.leaves(updates)} == {
      jnp.dtype('bfloat16')}
  nu = [x for x in jax.tree.leaves(optax.tree_utils.tree_get_all_with_path(
      state, 'nu')) if hasattr(x, 'ndim') and x.ndim]
  assert nu
  expected = 0.25 * (1 - 0.999**50) * 0.999**200
  for leaf in nu:
    np.testing.assert_allclose(np.asarray(leaf), expected, rtol=1e-4)


def test_loraplus_base_refuses_numpy_hyperparameters_it_would_drop():
  # A numpy or JAX scalar had passed the check (only Python floats were
  # compared), and the decay was silently dropped.
  for decay in (np.float32(0.1), jnp.float32(0.1), 0.1):
    with pytest.raises(ValueError, match='with base=..., pass b1/b2/eps/'
                       'weight_decay to base itself'):
      lro.loraplus(1e-3, base=optax.lion, weight_decay=decay)
  # Adam's other hyperparameters too (only weight_decay had been tested).
  for kw in (dict(b1=0.8), dict(b2=0.99), dict(eps=1e-6)):
    with pytest.raises(ValueError, match='with base=..., pass b1/b2/eps/'):
      lro.loraplus(1e-3, base=optax.lion, **kw)
  # The defaults, in any dtype (float64 had been compared with the default
  # rounded to float32, and refused).
  for b2 in (np.float32(0.999), np.float64(0.999), np.asarray(0.999)):
    lro.loraplus(1e-3, base=optax.lion, b2=b2)
  # inject_hyperparams hands the defaults back as arrays of the params'
  # dtype (bfloat16 rounds 0.999 to 1.0): still the defaults.
  tx = optax.inject_hyperparams(lro.loraplus, static_args=('base',))(
      1e-3, base=optax.lion)
  params, _ = _float16_standard_pair()
  tx.init(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))


def test_shampoo_updates_without_params_as_documented():
  # add_decayed_weights(0.0) required params: tx.update(g, state) raised.
  params, grads = _float16_standard_pair()
  tx = lro.shampoo(1e-3)
  updates, _ = tx.update(grads, tx.init(params))
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype('float16')}
  with pytest.raises(ValueError, match='requires'):
    decayed = lro.shampoo(1e-3, weight_decay=0.1)
    decayed.update(grads, decayed.init(params))


def test_shampoo_refuses_matrix_eps_0():
  # A factor's N x N statistic has rank r: its zero eigenvalues' inverse
  # roots were inf, and the first step NaN.
  with pytest.raises(ValueError, match='shampoo: matrix_eps must be > 0 and finite, '
                     'got 0.0.'):
    lro.shampoo(1e-3, matrix_eps=0.0)


@pytest.mark.parametrize('name', ['loraplus', 'shampoo', 'scaled_adam',
                                  'lora_rite'])
def test_float32_rates_keep_bfloat16_updates(name):
  """The bfloat16 advice (hyperparam_dtype=jnp.float32) made Shampoo's and
  LoRA+'s updates float32, and optax.apply_if_finite refused them (its
  rejected branch is zeros like the bfloat16 gradients)."""
  params = {'lora_a': jax.random.normal(jax.random.key(0), (8, 2)),
            'lora_b': jax.random.normal(jax.random.key(1), (2, 6))}
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  grads = jax.tree.map(lambda p: (p * 0.1).astype(jnp.bfloat16), params)
  make = {'loraplus': lro.loraplus, 'shampoo': lro.shampoo,
          'scaled_adam': lro.scaled_adam, 'lora_rite': lro.lora_rite}[name]
  statics = ('block_size',) if name == 'shampoo' else ()
  tx = optax.apply_if_finite(optax.inject_hyperparams(
      make, hyperparam_dtype=jnp.float32, static_args=statics)(
          learning_rate=1e-2), 3)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert {u.dtype for u in jax.tree.leaves(updates)} == {
      jnp.dtype('bfloat16')}


@pytest.mark.parametrize('wrap', [
    lambda tx: optax.apply_if_finite(tx, 3),
    lambda tx: optax.MultiSteps(tx, every_k_schedule=2)],
    ids=['apply_if_finite', 'MultiSteps'])
@pytest.mark.parametrize('param_dtype, grad_dtype', [
    (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)])
@pytest.mark.parametrize('name', lro.OPTIMIZER_NAMES)
def test_updates_take_the_gradients_dtype(name, param_dtype, grad_dtype,
                                          wrap):
  """Mixed precision (float32 gradients accumulated for bfloat16 factors,
  or bfloat16 gradients of float32 master factors): the wrappers' other
  branch is zeros like the gradients, and updates cast to the params'
  dtypes had failed there in an 11-line cond error."""
  params = {'lora_a': jax.random.normal(jax.random.key(0), (8, 2)),
            'lora_b': jax.random.normal(jax.random.key(1), (2, 6))}
  grads = jax.tree.map(lambda p: (p * 0.1).astype(grad_dtype), params)
  params = jax.tree.map(lambda p: p.astype(param_dtype), params)
  tx = wrap(lro.optimizer(name, 1e-2))
  state = tx.init(params)
  for _ in range(2):
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {
        jnp.dtype(grad_dtype)}
  new = optax.apply_updates(params, updates)
  assert {p.dtype for p in jax.tree.leaves(new)} == {jnp.dtype(param_dtype)}
  assert all(bool(jnp.any(n != p)) for n, p in zip(jax.tree.leaves(new),
                                                    jax.tree.leaves(params)))


@pytest.mark.parametrize('injected', [True, False])
def test_shampoo_graft_with_one_zero_gradient_entry(injected):
  """One zero entry with no eps left had made the graft's norm, and so the
  whole leaf, NaN (float16 eps under inject_hyperparams, or eps=0)."""
  p = {'lora_a': jnp.ones((4, 2), jnp.float16).at[0, 1].set(2),
       'lora_b': jnp.full((2, 3), .1, jnp.float16).at[1, 0].set(.3)}
  g = {'lora_a': jnp.zeros((4, 2), jnp.float16).at[0, 0].set(1),
       'lora_b': jnp.zeros((2, 3), jnp.float16).at[0, 0].set(1)}
  tx = (optax.inject_hyperparams(lro.shampoo, static_args=('block_size',))(
      learning_rate=1e-2) if injected else lro.shampoo(1e-2, eps=0.0))
  updates, _ = jax.jit(tx.update)(g, tx.init(p), p)
  for u in jax.tree.leaves(updates):
    assert bool(jnp.all(jnp.isfinite(u))) and bool(jnp.any(u != 0)), u


@pytest.mark.parametrize('make, leaf', [
    (lro.scale_by_adam_authors, 'w'),
    (lambda: lro.scaled_adam(1e-2), 'lora_a'),
    (lambda: lro.shampoo(1e-2), 'bias'),  # a 1-D leaf: Adam's direction
    (lambda: lro.loraplus(1e-2), 'lora_b'),
    (lambda: lro.optimizer('adam', 1e-2), 'w'),
    (lambda: lro.optimizer('lamb', 1e-2), 'w'),
], ids=['scale_by_adam_authors', 'scaled_adam', 'shampoo_1d', 'loraplus',
        'adam', 'lamb'])
def test_a_nan_gradient_shows_in_the_update(make, leaf):
  """A NaN gradient entry gives a NaN update, as optax's Adam does (and
  apply_if_finite sees it): the 0 it had become was a step of 0 for that
  entry at every later step, its moments NaN for good, without a sign."""
  params = {'w': jnp.zeros(3), 'bias': jnp.zeros(3),
            'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}
  grads = jax.tree.map(jnp.ones_like, params)
  grads[leaf] = grads[leaf].at[(0,) * grads[leaf].ndim].set(jnp.nan)
  tx = make()
  params = {k: v for k, v in params.items()
            if k == leaf or (leaf.startswith('lora') and k.startswith('lora'))}
  grads = {k: grads[k] for k in params}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert bool(jnp.isnan(updates[leaf].ravel()[0]))


@pytest.mark.parametrize('name', lro.OPTIMIZER_NAMES)
def test_a_state_cast_to_bfloat16_keeps_its_dtypes(name):
  """optax.tree_utils.tree_cast(state, bfloat16), to save memory: LoRA-RITE
  had returned its moment and basis in float32 (lax.scan refused the carry,
  jit compiled again), Shampoo failed in LAPACK's bfloat16 eigh."""
  params = {'lora_a': jax.random.normal(jax.random.key(0), (8, 2)),
            'lora_b': jax.random.normal(jax.random.key(1), (2, 6))}
  grads = jax.tree.map(lambda p: 0.1 * p, params)
  tx = lro.optimizer(name, 1e-2)
  state = optax.tree_utils.tree_cast(tx.init(params), jnp.bfloat16)
  dtypes = lambda tree: [x.dtype for x in jax.tree.leaves(tree)]

  def body(state, _):
    updates, state = tx.update(grads, state, params)
    return state, updates

  state, updates = jax.lax.scan(body, state, length=3)
  assert dtypes(state) == dtypes(
      optax.tree_utils.tree_cast(tx.init(params), jnp.bfloat16))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_shampoo_takes_python_number_gradients():
  """As optax's Adam does (the new gradient check lets them through, and
  Shampoo had then failed in an AttributeError on the float's shape)."""
  params = {'scale': jnp.float32(1.0), 'w': jnp.ones((2, 2))}
  tx = lro.shampoo(1e-2)
  updates, _ = tx.update({'scale': 0.5, 'w': jnp.ones((2, 2))},
                         tx.init(params), params)
  assert float(updates['scale']) < 0


def test_shampoo_roots_of_non_finite_statistics_are_nan():
  """A float16 state overflows on one large gradient: its roots had become
  the identity (as for a zero statistic), turning the preconditioning off
  for good with every update finite; now the NaN shows."""
  params = {'lora_a': jax.random.normal(jax.random.key(0), (64, 4)),
            'lora_b': jax.random.normal(jax.random.key(1), (4, 64))}
  tx = lro.shampoo(1e-2, precondition_every=1)
  state = optax.tree_utils.tree_cast(tx.init(params), jnp.float16)
  updates, state = tx.update(jax.tree.map(lambda p: 1000.0 * p, params),
                             state, params)
  assert not all(bool(jnp.all(jnp.isfinite(u)))
                 for u in jax.tree.leaves(updates))
  zero = {'lora_a': jnp.zeros((64, 4)), 'lora_b': jnp.zeros((4, 64))}
  updates, _ = tx.update(zero, tx.init(params), params)  # S = 0: identity
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


# 1e-15 to 1e-17 had failed; 1e-12 (a ridge still normal) and 1e-19 (a
# statistic already flushed to 0, so the identity root) bound them.
@pytest.mark.parametrize('scale', [1e-12, 1e-15, 1e-16, 1e-17, 1e-19])
def test_shampoo_steps_from_tiny_gradients_are_finite(scale):
  """Gradients ~1e-16 had given NaN updates: the ridge matrix_eps *
  lambda_max was subnormal, flushed to 0, and 0 ** (-1/4) inf."""
  params = {'w': jnp.ones((4, 6))}
  grads = {'w': scale * jax.random.normal(jax.random.key(1), (4, 6))}
  tx = lro.shampoo(1e-3)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert bool(jnp.all(jnp.isfinite(updates['w'])))
  # Grafted, the first step has the norm of Adam's, lr g / (|g| + eps): so
  # tiny (about 1e-11 at 1e-16, where eps dominates), yet not 0. (At 1e-19
  # the squares in the preconditioned step's norm are subnormal: 23% off.)
  g = np.asarray(grads['w'], np.float64)
  np.testing.assert_allclose(
      float(jnp.linalg.norm(updates['w'])),
      1e-3 * np.linalg.norm(g / (np.abs(g) + 1e-8)),
      rtol=1e-4 if scale >= 1e-17 else 0.5)


def test_scale_by_adam_authors_takes_python_number_gradients():
  params = {'s': jnp.float32(1.0)}
  tx = lro.scale_by_adam_authors()
  updates, _ = tx.update({'s': 0.5}, tx.init(params), params)
  assert float(updates['s']) > 0


@pytest.mark.parametrize('name', ['adam', 'lamb'])
def test_16_bit_params_reach_decay_and_trust_ratio_in_float32(name):
  """with_stable_dtypes widens the params too: the decay term and Lamb's
  trust ratio of bfloat16 params are those of their float32 values."""
  key = jax.random.key(0)
  p32 = {'w': jax.random.normal(key, (4096,)) * 3.0 + 1.0}
  g32 = {'w': jax.random.normal(jax.random.fold_in(key, 1), (4096,)) * 1e-3}
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  g16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g32)
  tx = lro.optimizer(name, 1e-2, weight_decay=0.3)
  u16, _ = tx.update(g16, tx.init(p16), p16)
  up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  u32, _ = tx.update(up(g16), tx.init(up(p16)), up(p16))
  np.testing.assert_array_equal(u16['w'], u32['w'].astype(jnp.bfloat16))

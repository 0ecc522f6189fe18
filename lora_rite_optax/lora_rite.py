"""LoRA-RITE: transformation-invariant adaptive matrix preconditioning for LoRA.

Yen et al., "LoRA Done RITE: Robust Invariant Transformation Equilibration for
LoRA Optimization", ICLR 2025, https://arxiv.org/abs/2410.20625.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from optax._src import base

from lora_rite_optax import linalg
from lora_rite_optax import pairs as pairs_lib


class ScaleByLoraRiteState(NamedTuple):
  """State of :func:`scale_by_lora_rite`.

  Attributes:
    count: number of updates so far (int32).
    mu: first moment ``M`` of every factor, in the factor's own layout (so it
      shards like the params).
    basis: ``U_t``, the orthonormal basis of every factor from its last QR, in
      the factor's own layout; zero before the first step.
    nu: per pair name, the ``r x r`` second moments ``V`` of both factors,
      shape ``(2, slices, r, r)`` (a then b).
    escaped: per pair name, the escaped mass ``rho`` of both factors, shape
      ``(2, slices)``.
  """
  count: chex.Array
  mu: base.Updates
  basis: base.Updates
  nu: dict[str, chex.Array]
  escaped: dict[str, chex.Array]


def _state_dtype(dtype) -> jnp.dtype:
  # Statistics live in float32 at least (float64 when the params are).
  return jnp.promote_types(dtype, jnp.float32)


def _decay(beta: chex.Numeric, count: chex.Array, dtype) -> chex.Array:
  """Bias-corrected decay beta (1 - beta^t) / (1 - beta^(t+1)), t 0-based."""
  beta = jnp.asarray(beta).astype(dtype)
  t = count.astype(dtype)
  return beta * (1 - beta**t) / (1 - beta**(t + 1))


def _rms(x: jax.Array) -> jax.Array:
  """RMS over the trailing (N, r) axes, one value per slice."""
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=(-2, -1)))


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.einsum('...ij,...jk->...ik', x, y)


_gram = linalg.gram


def _sym(x: jax.Array) -> jax.Array:
  return 0.5 * (x + jnp.swapaxes(x, -1, -2))


class _Factor(NamedTuple):
  """One factor of a group of equal-shaped pairs, stacked: (slices, N, r)."""
  x: jax.Array        # the factor
  grad: jax.Array     # its gradient
  mu: jax.Array       # first moment M
  basis: jax.Array    # U_{t-1}
  nu: jax.Array       # V, (slices, r, r)
  escaped: jax.Array  # rho, (slices,)


def _unmagnified(grad: jax.Array, partner_rinv: jax.Array,
                 update_skipping: chex.Numeric) -> jax.Array:
  """Steps 2-3: g = grad R_O^+, zeroed where non-finite or when skipped."""
  finite = jnp.all(jnp.isfinite(grad), axis=(-2, -1), keepdims=True)
  g = _mm(jnp.where(finite, grad, 0.0), partner_rinv)
  skip = (update_skipping > 0) & (_rms(g) > update_skipping)
  return jnp.where(skip[..., None, None], 0.0, g)


def _precondition(f: _Factor, g: jax.Array, partner: _Factor,
                  partner_basis: jax.Array, partner_rinv: jax.Array, d1, d2,
                  eps, update_capping, escape_mass) -> tuple[jax.Array, ...]:
  """Steps 6-12 for one stacked factor; returns (direction, M, V, rho)."""
  n = f.x.shape[-2]
  # P_F = U_{O,t}^T U_{O,t-1}: how the partner's basis turned since last step.
  transport = _gram(partner_basis, partner.basis)
  nu_moved = _sym(_mm(_mm(transport, f.nu),
                      jnp.swapaxes(transport, -1, -2)))   # sym(P V P^T)
  if escape_mass is False:
    escaped = jnp.zeros_like(f.escaped)
  else:
    lam_old = jnp.linalg.eigvalsh(f.nu)
    lam_new = jnp.linalg.eigvalsh(nu_moved)
    lost = jnp.minimum(
        jnp.maximum(0.0, jnp.max(lam_old - lam_new, axis=-1)),
        jnp.maximum(0.0, jnp.trace(f.nu, axis1=-2, axis2=-1) -
                    jnp.trace(nu_moved, axis1=-2, axis2=-1)))
    escaped = d2 * (lost + f.escaped)
    escaped = jnp.where(escape_mass, escaped, jnp.zeros_like(escaped))
  nu = _sym((1 - d2) * _gram(g, g) / n + d2 * nu_moved)
  lam, q = jnp.linalg.eigh(nu)
  inv_root = 1.0 / (jnp.sqrt(jnp.maximum(lam, 0.0) + escaped[..., None]) + eps)
  precond = _mm(q * inv_root[..., None, :], jnp.swapaxes(q, -1, -2))
  mu = (1 - d1) * _mm(g, precond) + d1 * _mm(
      f.mu, jnp.swapaxes(transport, -1, -2))
  capped = mu
  if not (isinstance(update_capping, (int, float)) and update_capping <= 0):
    shrink = jnp.maximum(1.0, _rms(mu) / jnp.where(update_capping > 0,
                                                   update_capping, 1.0))
    shrink = jnp.where(update_capping > 0, shrink, 1.0)
    capped = mu / shrink[..., None, None]
  direction = _mm(capped, jnp.swapaxes(partner_rinv, -1, -2))
  return direction, mu, nu, escaped


def scale_by_lora_rite(
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-6,
    clip_unmagnified_grad: chex.Numeric = 1.0,
    update_skipping: chex.Numeric = 1.0,
    update_capping: chex.Numeric = 0.0,
    escape_mass: bool = False,
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
) -> base.GradientTransformation:
  r"""Rescale updates of LoRA pairs by LoRA-RITE's invariant preconditioner.

  For each pair write the factors as rank-last matrices ``X_A = A`` and
  ``X_B = B^T``. For a factor :math:`F` with partner :math:`O` and QR
  decompositions :math:`X = U R`, at step :math:`t` (0-based):

  .. math::

    g_F &= \nabla_F R_O^{+} \\
    P_F &= U_{O,t}^\top U_{O,t-1} \\
    \bar V_F &= \beta_2' (P_F V_F P_F^\top) + (1 - \beta_2')\,
               g_F^\top g_F / N_F \\
    M_F &= \beta_1' M_F P_F^\top + (1 - \beta_1')\,
           g_F (\bar V_F + \rho_F I)^{-1/2} \\
    u_F &= M_F R_O^{+\top}

  with :math:`\beta' = \beta (1 - \beta^t) / (1 - \beta^{t+1})`, the inverse
  root taken as :math:`Q\,\mathrm{diag}(1 / (\sqrt{\lambda + \rho} +
  \epsilon))\,Q^\top` and :math:`\rho` the escaped mass (zero unless
  ``escape_mass``). The update of :math:`H = A B` is then the same for every
  equivalent pair :math:`(A R, R^{-1} B)`.

  Unmagnified gradients that are not finite, or whose RMS exceeds
  ``update_skipping``, are zeroed; all of them are clipped together to global
  norm ``clip_unmagnified_grad``. The QR is computed from the Gram matrix
  (twice, for float32 accuracy), so a factor sharded along its long axis needs
  only ``r x r`` reductions; directions with singular values below
  ``sqrt(r * eps)`` of the largest count as null (pseudo-inverse), so an
  all-zero ``lora_b`` gives a zero update of ``lora_a``, never NaN.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the square root of the second moment's eigenvalues.
    clip_unmagnified_grad: global-norm clip of all unmagnified gradients; 0
      turns it off.
    update_skipping: zero a factor's unmagnified gradient when its RMS exceeds
      this; 0 turns it off.
    update_capping: cap the RMS of the first moment before :math:`R^{+\top}`;
      0 turns it off.
    escape_mass: add the paper's escaped-mass term :math:`\rho`.
    layout: how pairs are found; see :class:`lora_rite_optax.LoraLayout`.

  Returns:
    A :class:`optax.GradientTransformation` whose ``update`` needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_rite_optax as lro
    >>> params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}
    >>> tx = optax.chain(lro.scale_by_lora_rite(), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> jax.tree.map(jnp.shape, updates)
    {'q': {'lora_a': (4, 2), 'lora_b': (2, 3)}}

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """

  def init_fn(params):
    paired = pairs_lib.find_lora_pairs(params, layout)
    leaves, _ = pairs_lib.flatten(params)

    def zeros(leaf):
      if pairs_lib._is_empty(leaf):  # pylint: disable=protected-access
        return leaf
      return jnp.zeros(leaf.shape, _state_dtype(leaf.dtype))

    mu = jax.tree_util.tree_unflatten(paired.treedef,
                                      [zeros(l) for _, l in leaves])
    basis = jax.tree_util.tree_unflatten(paired.treedef,
                                         [zeros(l) for _, l in leaves])
    nu, escaped = {}, {}
    for pair in paired.pairs:
      a = leaves[pair.a_index][1]
      slices, _, r = pairs_lib.matrix_shape(
          a.shape, pair.layout.a_rank_axis, pair.layout.batch_axes)
      dtype = _state_dtype(a.dtype)
      nu[pair.name] = jnp.zeros((2, slices, r, r), dtype)
      escaped[pair.name] = jnp.zeros((2, slices), dtype)
    return ScaleByLoraRiteState(count=jnp.zeros([], jnp.int32), mu=mu,
                                basis=basis, nu=nu, escaped=escaped)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          'scale_by_lora_rite: update() needs params (the current factors): '
          'call tx.update(grads, state, params).')
    paired = pairs_lib.find_lora_pairs(params, layout)
    param_leaves = [l for _, l in pairs_lib.flatten(params)[0]]
    grad_leaves = paired.treedef.flatten_up_to(updates)
    mu_leaves = paired.treedef.flatten_up_to(state.mu)
    basis_leaves = paired.treedef.flatten_up_to(state.basis)

    # Group pairs whose matrix views have equal shapes: each group is
    # processed as one stack, so the work is a few batched ops, not a Python
    # loop of small ones per pair.
    groups: dict[tuple, list] = {}
    for pair in paired.pairs:
      lay = pair.layout
      a = param_leaves[pair.a_index]
      b = param_leaves[pair.b_index]
      key = (pairs_lib.matrix_shape(a.shape, lay.a_rank_axis,
                                    lay.batch_axes)[1:],
             pairs_lib.matrix_shape(b.shape, lay.b_rank_axis,
                                    lay.batch_axes)[1:],
             _state_dtype(a.dtype))
      groups.setdefault(key, []).append(pair)

    def stacked(pairs, role):
      """The stacked _Factor of one role ('a' or 'b') of a group."""
      parts = {f: [] for f in _Factor._fields}
      for pair in pairs:
        lay = pair.layout
        index = pair.a_index if role == 'a' else pair.b_index
        axis = lay.a_rank_axis if role == 'a' else lay.b_rank_axis
        dtype = _state_dtype(param_leaves[index].dtype)
        view = lambda x: pairs_lib.to_matrix(x, axis, lay.batch_axes).astype(
            dtype)
        parts['x'].append(view(param_leaves[index]))
        parts['grad'].append(view(grad_leaves[index]))
        parts['mu'].append(view(mu_leaves[index]))
        parts['basis'].append(view(basis_leaves[index]))
        which = 0 if role == 'a' else 1
        parts['nu'].append(state.nu[pair.name][which])
        parts['escaped'].append(state.escaped[pair.name][which])
      return _Factor(**{k: jnp.concatenate(v, axis=0) if len(v) > 1 else v[0]
                        for k, v in parts.items()})

    count = state.count
    # Scalars in the widest state dtype (float64 when params are).
    dtype = functools.reduce(jnp.promote_types, [k[2] for k in groups],
                             jnp.float32)
    d1 = _decay(b1, count, dtype)
    d2 = _decay(b2, count, dtype)

    # Pass 1: bases, pseudo-inverses and unmagnified gradients of every group;
    # the clip needs the global norm of all of them before anything else.
    work = []
    total_sq = jnp.zeros([], dtype)
    for key, group in groups.items():
      fa, fb = stacked(group, 'a'), stacked(group, 'b')
      rinv_a, basis_a = linalg.orthonormal_basis(fa.x)
      rinv_b, basis_b = linalg.orthonormal_basis(fb.x)
      ga = _unmagnified(fa.grad, rinv_b, update_skipping)
      gb = _unmagnified(fb.grad, rinv_a, update_skipping)
      total_sq += jnp.sum(jnp.square(ga)) + jnp.sum(jnp.square(gb))
      work.append((group, fa, fb, rinv_a, rinv_b, basis_a, basis_b, ga, gb))

    clip = jnp.asarray(clip_unmagnified_grad).astype(dtype)
    norm = jnp.sqrt(total_sq)
    clip_scale = jnp.where((clip > 0) & (norm > clip),
                           clip / jnp.where(norm > 0, norm, 1.0), 1.0)

    out_leaves = list(grad_leaves)
    new_mu = list(mu_leaves)
    new_basis = list(basis_leaves)
    new_nu = dict(state.nu)
    new_escaped = dict(state.escaped)
    for group, fa, fb, rinv_a, rinv_b, basis_a, basis_b, ga, gb in work:
      eps_ = jnp.asarray(eps, fa.x.dtype)
      da, mua, nua, rhoa = _precondition(
          fa, ga * clip_scale, fb, basis_b, rinv_b, d1, d2, eps_, update_capping,
          escape_mass)
      db, mub, nub, rhob = _precondition(
          fb, gb * clip_scale, fa, basis_a, rinv_a, d1, d2, eps_, update_capping,
          escape_mass)
      start = 0
      for pair in group:
        lay = pair.layout
        slices = pairs_lib.matrix_shape(
            param_leaves[pair.a_index].shape, lay.a_rank_axis,
            lay.batch_axes)[0]
        part = slice(start, start + slices)
        start += slices
        for index, axis, d, m, u in (
            (pair.a_index, lay.a_rank_axis, da, mua, basis_a),
            (pair.b_index, lay.b_rank_axis, db, mub, basis_b)):
          shape = param_leaves[index].shape
          back = lambda v: pairs_lib.from_matrix(v[part], shape, axis,
                                                 lay.batch_axes)
          out_leaves[index] = back(d).astype(param_leaves[index].dtype)
          new_mu[index] = back(m)
          new_basis[index] = back(u)
        new_nu[pair.name] = jnp.stack([nua[part], nub[part]])
        new_escaped[pair.name] = jnp.stack([rhoa[part], rhob[part]])

    unflatten = lambda leaves: jax.tree_util.tree_unflatten(
        paired.treedef, leaves)
    new_state = ScaleByLoraRiteState(
        count=optax.safe_increment(count), mu=unflatten(new_mu),
        basis=unflatten(new_basis), nu=new_nu, escaped=new_escaped)
    return unflatten(out_leaves), new_state

  return base.GradientTransformation(init_fn, update_fn)


def balance_lora_factors(
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
    eps: float = 1e-6,
) -> base.GradientTransformation:
  r"""Rescale each pair after its step so both factors have equal norms.

  With :math:`A' = A + u_A` and :math:`B' = B + u_B`,
  :math:`n_A = \|A'\| + \epsilon`, :math:`n_B = \|B'\| + \epsilon` and
  :math:`b = \sqrt{n_A n_B}`, the returned updates move the factors to
  :math:`A' b / n_A` and :math:`B' b / n_B`: the product :math:`H` is
  unchanged and, since LoRA-RITE is transformation invariant, so is the rest
  of training in exact arithmetic; the factors just stay in a range that
  bfloat16 holds well. Must come last in a chain (it needs the final
  updates).

  Args:
    layout: how pairs are found.
    eps: added to each norm.

  Returns:
    A stateless :class:`optax.GradientTransformation` that needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import lora_rite_optax as lro
    >>> params = {'lora_a': jnp.full((2, 1), 10.0), 'lora_b': jnp.ones((1, 2))}
    >>> tx = lro.balance_lora_factors()
    >>> zero = {'lora_a': jnp.zeros((2, 1)), 'lora_b': jnp.zeros((1, 2))}
    >>> u, _ = tx.update(zero, tx.init(params), params)
    >>> new = optax.apply_updates(params, u)
    >>> [round(float(jnp.linalg.norm(new[k])), 2) for k in ('lora_a', 'lora_b')]
    [4.47, 4.47]
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          'balance_lora_factors: update() needs params: call '
          'tx.update(updates, state, params).')
    paired = pairs_lib.find_lora_pairs(params, layout,
                                       who='balance_lora_factors')
    param_leaves = [l for _, l in pairs_lib.flatten(params)[0]]
    out = paired.treedef.flatten_up_to(updates)
    for pair in paired.pairs:
      lay = pair.layout
      new = {}
      norms = {}
      for index in (pair.a_index, pair.b_index):
        p = param_leaves[index]
        dtype = _state_dtype(p.dtype)
        new[index] = p.astype(dtype) + out[index].astype(dtype)
        # One norm per stacked slice: each slice is its own pair.
        flat = new[index].reshape(
            new[index].shape[:lay.batch_axes] + (-1,))
        norms[index] = jnp.linalg.norm(flat, axis=-1) + eps
      both = jnp.sqrt(norms[pair.a_index] * norms[pair.b_index])
      for index in (pair.a_index, pair.b_index):
        p = param_leaves[index]
        factor = (both / norms[index]).reshape(
            norms[index].shape + (1,) * (p.ndim - lay.batch_axes))
        out[index] = (new[index] * factor - p.astype(new[index].dtype)
                     ).astype(out[index].dtype)
    return jax.tree_util.tree_unflatten(paired.treedef, out), state

  return base.GradientTransformation(base.init_empty_state, update_fn)


def lora_rite(
    learning_rate: base.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-6,
    weight_decay: chex.Numeric = 0.0,
    clip_unmagnified_grad: chex.Numeric = 1.0,
    update_skipping: chex.Numeric = 1.0,
    update_capping: chex.Numeric = 0.0,
    escape_mass: bool = False,
    balance_factors: bool = False,
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
) -> base.GradientTransformation:
  r"""The LoRA-RITE optimizer.

  :func:`scale_by_lora_rite`, then decoupled weight decay and the learning
  rate: for every factor :math:`F` of every pair,

  .. math::

    \Delta X_F = -\eta_t \left(M_F R_O^{+\top} + \lambda X_F\right),

  optionally followed by :func:`balance_lora_factors`. Equivalent pairs
  :math:`(A R, R^{-1} B)` get the same update of :math:`H = A B`.

  Every leaf of the params must belong to a LoRA pair; route the rest of a
  model elsewhere with :func:`optax.partition`.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the square root of the second moment's eigenvalues.
    weight_decay: decoupled weight decay :math:`\lambda`.
    clip_unmagnified_grad: global-norm clip of all unmagnified gradients; 0
      turns it off.
    update_skipping: zero a factor's unmagnified gradient when its RMS exceeds
      this; 0 turns it off.
    update_capping: RMS cap on the first moment before :math:`R^{+\top}`; 0
      turns it off.
    escape_mass: add the paper's escaped-mass term.
    balance_factors: after the step, rescale the new factors to equal norms
      (leaves :math:`H` unchanged).
    layout: how pairs are found; see :class:`lora_rite_optax.LoraLayout`.

  Returns:
    The corresponding :class:`optax.GradientTransformation`; ``update`` needs
    ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_rite_optax as lro
    >>> target = jnp.outer(jnp.arange(1.0, 5.0), jnp.arange(1.0, 4.0)) / 10
    >>> params = {'lora_a': jax.random.normal(jax.random.key(0), (4, 2)),
    ...           'lora_b': jnp.zeros((2, 3))}
    >>> loss = lambda p: jnp.mean((p['lora_a'] @ p['lora_b'] - target) ** 2)
    >>> tx = lro.lora_rite(learning_rate=0.05)
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 1e-3)
    True

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  steps = [
      scale_by_lora_rite(b1=b1, b2=b2, eps=eps,
                         clip_unmagnified_grad=clip_unmagnified_grad,
                         update_skipping=update_skipping,
                         update_capping=update_capping,
                         escape_mass=escape_mass, layout=layout),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  ]
  if balance_factors:
    steps.append(balance_lora_factors(layout))
  return optax.chain(*steps)

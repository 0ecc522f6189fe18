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

from lora_rite_optax import casting
from lora_rite_optax import checks
from lora_rite_optax import linalg
from lora_rite_optax import pairs as pairs_lib
from lora_rite_optax import placement


class ScaleByLoraRiteState(NamedTuple):
  """State of :func:`scale_by_lora_rite`.

  Attributes:
    count: number of updates so far (int32).
    mu: the first moment ``M`` of every factor, kept as ``S = M R_O^{+T}``
      (the factor's step before capping), in the factor's own layout (so it
      shards like the params). ``M`` has no component along the partner's
      null directions, so ``M = S (R_O^{+T})^+`` and it is never formed.
    basis: ``X_{t-1}``, every factor as it was at the last update (float32 at
      least), in the factor's own layout; zero before the first step. With
      ``rinv`` it gives the last basis ``U_{t-1} = X_{t-1} R_{t-1}^+``.
    nu: per group of pairs with the same rank and dtype (keys such as
      ``'rank16_float32'``, see :func:`pair_groups`), the ``r x r`` second
      moments ``V`` of both factors of every pair in it, shape
      ``(2, slices, r, r)`` (a then b; the group's pairs in tree order, each
      with its slices).
    escaped: per group, the escaped mass ``rho``, shape ``(2, slices)``.
    rinv: per group, ``R_{t-1}^+`` of both factors at the last update, shape
      ``(2, slices, r, r)``.

  The ``r x r`` statistics are kept per group, not per pair, because they
  are computed batched: a per-pair layout would cut the batch into one small
  output per pair, each its own compiled kernel (on XLA:CPU that tripled the
  compile time of a 196-pair tree).
  """
  count: chex.Array
  mu: base.Updates
  basis: base.Updates
  # Each a (1,) placeholder array in place of the dict for a tree of no
  # pairs (optax.tree_map_params' and an empty tree's).
  nu: dict[str, chex.Array] | chex.Array
  escaped: dict[str, chex.Array] | chex.Array
  rinv: dict[str, chex.Array] | chex.Array


def _decay(beta: chex.Numeric, count: chex.Array, dtype) -> chex.Array:
  """Bias-corrected decay beta (1 - beta^t) / (1 - beta^(t+1)), t 0-based."""
  beta = jnp.asarray(beta).astype(dtype)
  t = count.astype(dtype)
  return beta * (1 - beta**t) / (1 - beta**(t + 1))


def pair_groups(paired: pairs_lib.PairedTree, leaves: list
                ) -> dict[str, list[tuple[int, int]]]:
  """The pairs whose ``r x r`` algebra runs as one batch.

  Args:
    paired: the pairs of a tree (:func:`lora_rite_optax.find_lora_pairs`).
    leaves: that tree's leaves (arrays or shape-dtype structs), in order,
      as ``find_lora_pairs`` indexes them: masked-out leaves
      (``optax.MaskedNode``, ``None``) included, which ``jax.tree.leaves``
      drops (the same list for a tree without them).

  Returns:
    ``{'rank{r}_{dtype}': [(pair index, slices), ...]}``, pairs in tree order;
    the keys of :class:`ScaleByLoraRiteState`'s ``nu``, ``escaped``, ``rinv``,
    whose slice axis holds each pair's slices in that order.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_rite_optax as lro
    >>> params = {'k': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))},
    ...           'q': {'lora_a': jnp.ones((16, 8)), 'lora_b': jnp.ones((8, 20))},
    ...           'v': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}
    >>> lro.pair_groups(lro.find_lora_pairs(params), jax.tree.leaves(params))
    {'rank2_float32': [(0, 1), (2, 1)], 'rank8_float32': [(1, 1)]}
  """
  groups: dict[str, list[tuple[int, int]]] = {}
  for k, pair in enumerate(paired.pairs):
    a = leaves[pair.a_index]
    slices, _, r = pairs_lib.matrix_shape(
        a.shape, pair.layout.a_rank_axis, pair.layout.batch_axes)
    key = f'rank{r}_{jnp.dtype(casting.compute_dtype(a.dtype)).name}'
    groups.setdefault(key, []).append((k, slices))
  return groups


def _mm(x: jax.Array, y: jax.Array, precision=None) -> jax.Array:
  return jnp.einsum('...ij,...jk->...ik', x, y, precision=precision)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _sym(x: jax.Array) -> jax.Array:
  return 0.5 * (x + _t(x))


def _trace(x: jax.Array) -> jax.Array:
  return jnp.trace(x, axis1=-2, axis2=-1)


class _View(NamedTuple):
  """How a factor leaf is seen as a stack of matrices, by reshapes only.

  ``rank_first`` views are ``(slices, r, N)``, the others ``(slices, N, r)``:
  keeping the factor's own axis order means no ``N x r`` transpose is ever
  materialised; the einsums below contract the right axis instead.
  """
  shape: tuple[int, ...]
  rank_axis: int     # within the non-batch axes, normalised
  batch_axes: int
  rank_first: bool
  moved: bool        # rank axis neither first nor last: moved to last

  @classmethod
  def of(cls, shape, rank_axis, batch_axes):
    inner = len(shape) - batch_axes
    axis = rank_axis % inner
    rank_first = axis == 0 and inner > 1
    return cls(tuple(shape), axis, batch_axes, rank_first,
               not rank_first and axis != inner - 1)

  def to(self, x: jax.Array, dtype) -> jax.Array:
    slices, n, r = pairs_lib.matrix_shape(self.shape, self.rank_axis,
                                          self.batch_axes)
    if self.moved:
      x = jnp.moveaxis(x, self.batch_axes + self.rank_axis, -1)
    shape = (slices, r, n) if self.rank_first else (slices, n, r)
    return placement.reshape(x, shape).astype(dtype)

  def back(self, m: jax.Array, dtype) -> jax.Array:
    if not self.moved:
      return placement.reshape(m, self.shape).astype(dtype)
    axis = self.batch_axes + self.rank_axis
    moved = self.shape[:axis] + self.shape[axis + 1:] + (self.shape[axis],)
    return jnp.moveaxis(placement.reshape(m, moved), -1, axis).astype(dtype)

  # dot_general rather than einsum: these run once per factor (about 2000
  # calls for a 7B-shaped tree), and einsum's contraction-path search made
  # up most of the update's tracing time.

  def gram(self, x: jax.Array, y: jax.Array, precision) -> jax.Array:
    """x^T y over the long axis, (slices, r, r)."""
    long_axis = 2 if self.rank_first else 1
    # Split along the layers as x is, then gathered: asked for whole
    # straight away, XLA gathered the N x r factors instead.
    return placement.replicated(jax.lax.dot_general(
        x, y, (((long_axis,), (long_axis,)), ((0,), (0,))),
        precision=precision,
        out_sharding=placement.reduced_sharding(x, (0,))))

  def times(self, x: jax.Array, k: jax.Array, precision) -> jax.Array:
    """x k for an (slices, r, r) k, in the view's own layout."""
    k = placement.batch_like(k, x)
    if self.rank_first:  # (k^T x) is (slices, r, N)
      return jax.lax.dot_general(k, x, (((1,), (1,)), ((0,), (0,))),
                                 precision=precision)
    return jax.lax.dot_general(x, k, (((2,), (1,)), ((0,), (0,))),
                               precision=precision)


def scale_by_lora_rite(
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-6,
    clip_unmagnified_grad: chex.Numeric = 1.0,
    update_skipping: chex.Numeric = 1.0,
    update_capping: chex.Numeric = 0.0,
    escape_mass: bool = False,
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
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
  ``escape_mass``): :math:`\rho_t = \beta_2' (\rho_{t-1} + \min(\max(0,
  \max_i(\lambda_i(V) - \lambda_i(P V P^\top))), \max(0, \mathrm{tr}\,V -
  \mathrm{tr}\,P V P^\top)))`, :math:`V` the second moment before this
  step, :math:`\lambda_i` eigenvalues in order. The update of
  :math:`H = A B` is then the same for every equivalent pair
  :math:`(A R, R^{-1} B)` whose factors have full rank (or whose ``B`` is
  0): with a rank-deficient nonzero factor the pseudo-inverse does not
  commute with ``R`` (``pinv(R_B R^-T)`` is not ``R^T pinv(R_B)``), and
  equivalent pairs drift apart.

  Unmagnified gradients that are not finite, or whose RMS exceeds
  ``update_skipping``, are zeroed; all of them are clipped together to global
  norm ``clip_unmagnified_grad``. Everything is computed from Gram matrices
  (``X^T X``, ``X^T X_{t-1}``, ``grad^T grad``) and ``r x r`` algebra, then
  one pass of ``N x r`` by ``r x r`` products per factor,
  ``S = grad K_1 + S_{t-1} K_2`` with :math:`S = M R_O^{+\top}` the step
  (kept in the state in place of :math:`M`): five such products per factor
  in all (seven with ``update_capping``, which also needs the Grams
  ``grad^T S_{t-1}`` and ``S_{t-1}^T S_{t-1}``). A factor sharded along its long axis needs only ``r x r``
  reductions (an n-D factor along its leading non-rank axis: sharding a
  later one, such as ``head_dim`` of ``(r, heads, head_dim)``, or the rank
  axis, gathers the factor for the flattening), and the small algebra of
  all pairs runs batched. The QR is
  ``R^+ = L^-T`` from the Gram's Cholesky factor, or ``W diag(lambda^-1/2)``
  from its eigendecomposition where a factor is near rank-deficient (see
  :func:`lora_rite_optax.linalg.inverse_root`); either squares the condition
  number (float32 keeps ``U`` orthonormal to about ``eps * cond(X)^2``);
  directions with singular values below ``sqrt(r * eps)`` of the largest
  (``eps`` the compute dtype's machine epsilon, 1.2e-7 in float32, not the
  ``eps`` argument) count as null (pseudo-inverse), so an all-zero
  ``lora_b`` gives a zero
  update of ``lora_a``, never NaN. The step's own float32 error is a few
  times ``eps * cond^2`` of the partner factor (3e-3 at ``cond`` 100, 0.24
  at 500; the README has the figures): ill-conditioned factors want float64.
  Unlike the authors' PyTorch code, the second moment's eigenvalues are
  clamped at 0 (there a slightly negative one makes the factor's step NaN,
  then 0), the cutoff is the Gram's ``sqrt(r * eps)``, not
  ``torch.linalg.pinv``'s ``r * eps``, and for factors and gradients in the
  compute dtype (float32, float64) a direction of the second moment (plus
  escaped mass) below ``r * eps`` of its largest eigenvalue gets no step
  (whitening the gradient's rounding there grew directions the data never
  asked for when a step had fewer loss rows than ``r``; 16-bit factors or
  gradients keep the whitening, which conditions them better than the cut).

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the square root of the second moment's eigenvalues; with
      0, a direction whose eigenvalue (and escaped mass) is 0 gets no step.
    clip_unmagnified_grad: global-norm clip of all unmagnified gradients; 0
      turns it off.
    update_skipping: zero a factor's unmagnified gradient when its RMS exceeds
      this; 0 turns it off. The authors' default of 1 suits a mean loss; a
      summed loss (or one scaled up, as loss scaling does) can exceed it on
      every step, and then that factor never moves, silently.
    update_capping: cap the RMS of the first moment before :math:`R^{+\top}`;
      0 turns it off.
    escape_mass: add the paper's escaped-mass term :math:`\rho`.
    layout: how pairs are found; see :class:`lora_rite_optax.LoraLayout`.
    precision: of every matrix product (``jax.lax.Precision``). ``HIGHEST``
      by default because the default float32 product rounds its operands on
      accelerators (to bfloat16 on TPU, TF32 on recent NVIDIA GPUs), and the
      Gram matrices square the factors' condition number: rounded products
      cost the invariance most of its digits
      (``benchmarks/matmul_precision.py`` measures both). ``None`` follows
      ``jax_default_matmul_precision``. The products contract the long axis
      (Grams) or multiply by ``r x r`` matrices: ``10 r`` flops per
      parameter (``14 r`` with ``update_capping``), small beside the step's
      memory traffic.

  Returns:
    A :class:`optax.GradientTransformation` whose ``update`` needs ``params``.
    Updates have the gradients' dtype, except that float16 gradients get
    float32 updates: the step before the learning rate can exceed float16's
    range (under ``optax.apply_if_finite`` or ``optax.MultiSteps``, wrap the
    chain in :func:`with_gradients_dtypes`).

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
  return _scale_by_lora_rite(
      'scale_by_lora_rite', b1, b2, eps, clip_unmagnified_grad,
      update_skipping, update_capping, escape_mass, layout, precision)


def _scale_by_lora_rite(who: str, b1, b2, eps, clip_unmagnified_grad,
                        update_skipping, update_capping, escape_mass, layout,
                        precision) -> base.GradientTransformation:
  """:func:`scale_by_lora_rite`, its errors naming ``who`` (the function the
  user called)."""

  def init_fn(params):
    paired = pairs_lib.find_lora_pairs(params, layout, who=who)
    placement.require_explicit_api(who, jax.tree.leaves(params))
    leaves, _ = pairs_lib.flatten(params)

    def zeros(leaf):
      if pairs_lib._is_empty(leaf):  # pylint: disable=protected-access
        return leaf
      return placement.zeros_like(leaf, casting.compute_dtype(leaf.dtype))

    mu = jax.tree_util.tree_unflatten(paired.treedef,
                                      [zeros(l) for _, l in leaves])
    basis = jax.tree_util.tree_unflatten(paired.treedef,
                                         [zeros(l) for _, l in leaves])
    nu, escaped, rinv = {}, {}, {}
    for key, members in pair_groups(paired, [l for _, l in leaves]).items():
      first = paired.pairs[members[0][0]]
      a = leaves[first.a_index][1]
      r = pairs_lib.matrix_shape(a.shape, first.layout.a_rank_axis,
                                 first.layout.batch_axes)[2]
      slices = sum(n for _, n in members)
      dtype = casting.compute_dtype(a.dtype)
      # The r x r statistics replicated on the factors' mesh; those of
      # stacked layers split along the layers as the factors are, where
      # the update puts them (else its first call moved them, and the
      # second compiled again).
      layers_on = placement.stacked_axis_sharding(
          [leaves[paired.pairs[k].a_index][1] for k, _ in members],
          [paired.pairs[k].layout.batch_axes for k, _ in members], slices)
      # The escaped mass too where it is computed (without escape_mass the
      # update passes it through as it is).
      nu[key], escaped[key], rinv[key] = (
          placement.zeros_beside(shape, dtype, [a],
                                 split_axis=(1, layers_on if split
                                             else None))
          for shape, split in (((2, slices, r, r), True),
                               ((2, slices), escape_mass is not False),
                               ((2, slices, r, r), True)))
    if not paired.pairs:
      # No pairs (an empty tree, or optax.tree_utils.tree_map_params probing
      # init with a placeholder): one array stands for the whole per-pair
      # dict, so that it is a prefix (a leaf) of any real state's dict and
      # tree_map_params hands that dict to transform_non_params. Three
      # arrays, not one: a donated state must not hold a buffer twice. Of
      # one element, not none: orbax refuses to save a zero-size array.
      nu, escaped, rinv = (jnp.zeros((1,), jnp.float32) for _ in range(3))
    # The count beside them: uncommitted on device 0, it made the first
    # jitted update's outputs another placement, and the second compile.
    count = placement.zeros_beside((), jnp.int32, [l for _, l in leaves])
    return ScaleByLoraRiteState(count=count, mu=mu,
                                basis=basis, nu=nu, escaped=escaped,
                                rinv=rinv)

  for name, beta in (('b1', b1), ('b2', b2)):
    checks.beta(who, name, beta)
  # 0 turns the clipping and the skipping off; below 0 they mean nothing.
  for name, value in (('clip_unmagnified_grad', clip_unmagnified_grad),
                      ('update_skipping', update_skipping)):
    checks.non_negative(who, name, value)
  checks.non_negative(who, 'eps', eps, finite=True)
  checks.non_negative(who, 'update_capping', update_capping)
  checks.flag(who, 'escape_mass', escape_mass)
  pairs_lib.layout_fn(layout, who)
  try:  # refused here, not at the first update
    one = jax.ShapeDtypeStruct((1, 1), jnp.float32)
    jax.eval_shape(functools.partial(_mm, precision=precision), one, one)
  except (ValueError, TypeError):
    raise ValueError(f'{who}: precision must be None, a '
                     'jax.lax.Precision or its name (e.g. "highest"), got '
                     f'{precision!r}.') from None
  # Known to be 0 (a Python or numpy number, or inject_hyperparams' concrete
  # copy): the capping's two extra Grams per factor are left out. Traced,
  # it may be anything, so they are computed.
  capping_off = checks.concrete(update_capping) == 0

  def update_fn(updates, state, params=None):
    pairs_lib.refuse_no_params(who, params, 'the current factors')
    checks.state_of(who, state, ScaleByLoraRiteState)
    mm = functools.partial(_mm, precision=precision)
    paired = pairs_lib.find_lora_pairs(params, layout, who=who)
    placement.require_explicit_api(who, jax.tree.leaves(params))
    if not paired.pairs:
      return updates, state._replace(count=optax.safe_increment(state.count))
    param_paths = pairs_lib.flatten(params)[0]
    # A rank axis split over devices: the statistics come back replicated,
    # so the step compiled twice, and optax.MultiSteps/apply_if_finite
    # failed inside jax on the branches' differing shardings.
    placement.refuse_explicit(
        who,
        [param_paths[i][1] for pair in paired.pairs
         for i, axis in ((pair.a_index, pair.layout.a_rank_axis),
                         (pair.b_index, pair.layout.b_rank_axis))
         if placement.explicitly_sharded(
             param_paths[i][1], pairs_lib.leaf_axis(
                 jnp.ndim(param_paths[i][1]), axis, pair.layout.batch_axes))],
        'factors whose rank axis is')
    param_leaves = [l for _, l in param_paths]
    pairs_lib.check_updates_fit(who, updates, params)
    grad_leaves = paired.treedef.flatten_up_to(updates)
    try:
      mu_leaves = paired.treedef.flatten_up_to(state.mu)
      basis_leaves = paired.treedef.flatten_up_to(state.basis)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f'{who}: the state does not have the structure of the '
          'params (it was made by init() for other params): '
          f'{str(e).splitlines()[0]}') from None
    for (path, leaf), m in zip(param_paths, mu_leaves):
      if pairs_lib._is_empty(leaf):  # pylint: disable=protected-access
        continue
      if tuple(getattr(m, 'shape', ())) != tuple(leaf.shape):
        raise ValueError(
            f"{who}: the state's {'/'.join(path)} has shape "
            f'{tuple(m.shape)} but the param has {tuple(leaf.shape)} (the '
            'state was made by init() for other params).')

    # Pass 1 over the N x r data, factor by factor in its own layout (no
    # copies into stacks): the Gram matrices everything else needs. Under
    # SPMD these are the only cross-device reductions (r x r each).
    factors = []  # per pair: (a, b), each a dict
    for pair in paired.pairs:
      lay = pair.layout
      both = []
      for index, axis in ((pair.a_index, lay.a_rank_axis),
                          (pair.b_index, lay.b_rank_axis)):
        leaf = param_leaves[index]
        view = _View.of(leaf.shape, axis, lay.batch_axes)
        dtype = casting.compute_dtype(leaf.dtype)
        x, grad, s_prev, x_prev = (
            placement.as_matrices(
                who, what + '/'.join(param_paths[index][0]),
                functools.partial(view.to, dtype=dtype), y)
            for what, y in (('', leaf),
                            ('the gradient of ', grad_leaves[index]),
                            ('the state of ', mu_leaves[index]),
                            ('the state of ', basis_leaves[index])))
        grams = {'xx': view.gram(x, x, precision),
                 'xp': view.gram(x, x_prev, precision),
                 'gg': view.gram(grad, grad, precision)}
        if not capping_off:
          grams['gs'] = view.gram(grad, s_prev, precision)
          grams['ss'] = view.gram(s_prev, s_prev, precision)
        n = pairs_lib.matrix_shape(view.shape, view.rank_axis,
                                   view.batch_axes)[1]
        # Whether the factor and its gradient hold the compute dtype's
        # precision (the null cut below is for those).
        wide = all(jnp.finfo(d).eps <= jnp.finfo(dtype).eps for d in (
            leaf.dtype, jnp.result_type(grad_leaves[index])))
        both.append(dict(index=index, view=view, dtype=dtype, grad=grad,
                         s_prev=s_prev, grams=grams, n=n, wide=wide))
      factors.append(both)

    # The r x r algebra of every pair with the same rank and dtype runs as
    # one batch: a few factorisations in all, not several per pair.
    batches = {key: [k for k, _ in members] for key, members in
               pair_groups(paired, param_leaves).items()}
    for key, ks in batches.items():
      want = (2, sum(factors[k][0]['grams']['xx'].shape[0] for k in ks))
      got = getattr(state.nu, 'get', lambda _: None)(key)
      if got is None or tuple(got.shape[:2]) != want:
        raise ValueError(
            f'{who}: the state has no r x r statistics of shape '
            f'{want} for pair group {key!r} (it has '
            f'{ {k: tuple(v.shape) for k, v in dict(state.nu).items()} }; it '
            'was made by init() for other params).')
    dtype = functools.reduce(
        jnp.promote_types, [factors[ks[0]][0]['dtype']
                            for ks in batches.values()], jnp.float32)
    count = state.count
    d1 = _decay(b1, count, dtype)
    d2 = _decay(b2, count, dtype)

    def stack(ks, get):
      """(2, slices of all pairs ks, ...): a factors first, then b."""
      return jnp.stack([
          jnp.concatenate([get(k, role) for k in ks]) for role in (0, 1)])

    # First the unmagnified-gradient norms of every batch: the clip is global.
    prepared = []
    last_rinv = None
    total_sq = jnp.zeros([], dtype)
    for key, ks in batches.items():
      bdtype = factors[ks[0]][0]['dtype']
      gram = {name: stack(ks, lambda k, role, name=name:
                          factors[k][role]['grams'][name])
              for name in factors[ks[0]][0]['grams']}
      n_rows = stack(ks, lambda k, role: jnp.full(
          factors[k][role]['grams']['xx'].shape[:1], factors[k][role]['n'],
          bdtype))
      # Batches wait for each other: concurrent batched LAPACK calls can
      # deadlock XLA:CPU (linalg.one_at_a_time).
      rinv = linalg.inverse_root(
          linalg.after(gram['xx'], last_rinv) if last_rinv is not None
          else gram['xx'])
      last_rinv = rinv
      rinv_o = rinv[::-1]  # partner's R^+
      finite = jnp.all(jnp.isfinite(gram['gg']), axis=(-2, -1))
      clean = lambda g, finite=finite: jnp.where(finite[..., None, None], g,
                                                 0.0)
      # g^T g for g = grad R_O^+, without forming g.
      gtg = mm(mm(_t(rinv_o), clean(gram['gg'])), rinv_o)
      r = gtg.shape[-1]
      rms = jnp.sqrt(jnp.maximum(_trace(gtg), 0.0) / (n_rows * r))
      # A finite gradient can still overflow here (grad^T grad times the
      # partner's R^+ twice): skipped like a non-finite one, since 0 * inf
      # below would make the second moment NaN for good.
      keep = (finite & jnp.isfinite(_trace(gtg)) &
              ~((update_skipping > 0) & (rms > update_skipping)))
      total_sq += jnp.sum(jnp.where(keep, _trace(gtg), 0.0))
      wide = stack(ks, lambda k, role: jnp.full(
          factors[k][role]['grams']['xx'].shape[:1], factors[k][role]['wide']))
      prepared.append((key, ks, gram, n_rows, rinv, rinv_o, finite, clean,
                       gtg, keep, wide))

    clip = jnp.asarray(clip_unmagnified_grad).astype(dtype)
    norm = jnp.sqrt(total_sq)
    clip_scale = jnp.where((clip > 0) & (norm > clip),
                           clip / jnp.where(norm > 0, norm, 1.0), 1.0)

    out_leaves = list(grad_leaves)
    new_mu = list(mu_leaves)
    new_basis = list(basis_leaves)
    new_nu = dict(state.nu)
    new_escaped = dict(state.escaped)
    new_rinv = dict(state.rinv)
    last_q = last_rinv  # after every R^+
    for (key, ks, gram, n_rows, rinv, rinv_o, finite, clean, gtg,
         keep, wide) in prepared:
      nu_prev = state.nu[key]
      rho_prev = state.escaped[key]
      rinv_prev_o = state.rinv[key][::-1]
      scale = jnp.where(keep, clip_scale, 0.0)  # g = scale * grad R_O^+
      gtg = jnp.where(keep[..., None, None], scale[..., None, None]**2 * gtg,
                      0.0)
      # P_F = U_{O,t}^T U_{O,t-1} = R_O^+T X_O^T X_{O,t-1} R_{O,t-1}^+.
      xp_o = gram['xp'][::-1]
      transport = mm(mm(_t(rinv_o), xp_o), rinv_prev_o)
      nu_moved = _sym(mm(mm(transport, nu_prev), _t(transport)))
      if escape_mass is False:
        rho = jnp.zeros_like(rho_prev)
      else:
        # One eigvalsh call for both (concurrent calls can deadlock XLA:CPU).
        both = jnp.concatenate([nu_prev, nu_moved])
        lam_old, lam_new = jnp.split(linalg.eigvalsh(
            linalg.after(both, last_q) if last_q is not None else both), 2)
        last_q = lam_old
        lost = jnp.minimum(
            jnp.maximum(0.0, jnp.max(lam_old - lam_new, axis=-1)),
            jnp.maximum(0.0, _trace(nu_prev) - _trace(nu_moved)))
        rho = jnp.where(escape_mass, d2 * (lost + rho_prev), 0.0)
      nu = _sym((1 - d2) * gtg / n_rows[..., None, None] + d2 * nu_moved)
      lam, q = linalg.eigh(linalg.after(nu, last_q) if last_q is not None
                               else nu)
      last_q = q
      denom = (jnp.sqrt(jnp.maximum(lam, 0.0) + rho[..., None]) +
               jnp.asarray(eps).astype(nu.dtype))
      # 0, not inf, on a null direction: 0 * inf would make the whole
      # factor NaN.
      inv_root = linalg.divide_or_zero(jnp.ones_like(denom), denom)
      # A direction whose second moment (with the escaped mass) is at
      # eigh's rounding level counts as null: a gradient of rank below r
      # (fewer loss rows than r) has no part there in exact arithmetic, but
      # its rounding does, which the inverse root had whitened into a step.
      # A float32 lora_b grew spurious weak directions that R^+ then
      # magnified until the run diverged where float64 did not. Relative to
      # the largest eigenvalue, which a change of basis keeps. Not for
      # 16-bit factors or gradients: their rounding is far above this cut,
      # and whitening it all leaves lora_b better conditioned than cutting
      # part of it (measured on bfloat16 and float16).
      null_cut = lam.shape[-1] * jnp.finfo(nu.dtype).eps * jnp.max(
          lam, axis=-1, keepdims=True)
      inv_root = jnp.where(
          (jnp.maximum(lam, 0.0) + rho[..., None] > null_cut) |
          ~wide[..., None], inv_root, 0.0)
      precond = mm(q * inv_root[..., None, :], _t(q))
      # M = grad K1 + M_prev P^T, and the step S = M R_O^+T (before capping)
      # is what the state keeps. Since S_prev = M_prev R_{O,t-1}^+T,
      # M_prev P^T = M_prev R_{O,t-1}^+T X_{O,t-1}^T X_O R_O^+
      #            = S_prev xp_O^T R_O^+:
      # no inverse of R_{O,t-1}^+ is needed, whatever form it had.
      k1 = (1 - d1) * scale[..., None, None] * mm(rinv_o, precond)
      k2 = d1 * mm(_t(xp_o), rinv_o)
      ka = mm(k1, _t(rinv_o))
      kb = mm(k2, _t(rinv_o))
      shrink = None
      if not capping_off:
        # ||M||^2 from the Grams: no extra pass over M.
        sq = (_trace(mm(mm(_t(k1), clean(gram['gg'])), k1)) +
              2 * _trace(mm(mm(_t(k1), clean(gram['gs'])), k2)) +
              _trace(mm(mm(_t(k2), gram['ss']), k2)))
        rms_m = jnp.sqrt(jnp.maximum(sq, 0.0) / (n_rows * k1.shape[-1]))
        cap = jnp.asarray(update_capping).astype(dtype)
        shrink = jnp.where(cap > 0, jnp.maximum(
            1.0, rms_m / jnp.where(cap > 0, cap, 1.0)), 1.0)

      # Pass 2 over the N x r data, factor by factor.
      start = 0
      for k in ks:
        slices = factors[k][0]['grams']['xx'].shape[0]
        part = slice(start, start + slices)
        start += slices
        for role in (0, 1):
          f = factors[k][role]
          view, index = f['view'], f['index']
          fresh = view.times(f['grad'], ka[role, part], precision)
          fresh = jnp.where(finite[role, part][:, None, None], fresh, 0.0)
          s_new = fresh + view.times(f['s_prev'], kb[role, part], precision)
          step = s_new
          if shrink is not None:
            step = s_new / shrink[role, part][:, None, None]
          # The gradients' dtype (float16 kept wide): apply_if_finite's
          # other branch is zeros like them.
          out_leaves[index] = view.back(step, casting.step_dtype(
              jnp.result_type(grad_leaves[index]), f['dtype']))
          # The dtypes the state came in (init's, or a user's cast of it):
          # a state changing dtype in a step breaks lax.scan and compiles
          # a jitted step again.
          new_mu[index] = view.back(s_new, mu_leaves[index].dtype)
          new_basis[index] = param_leaves[index].astype(
              basis_leaves[index].dtype)
      # Each group keeps its own dtype (d1, d2 and the clip scale are
      # promoted over all groups when float32 and float64 pairs mix).
      new_nu[key] = nu.astype(nu_prev.dtype)
      # Without escape_mass the state's (zeros) passes through as it came:
      # a fresh zeros may be placed where the partitioner likes (split
      # along stacked layers, by jax 0.6), and the next call compiled again.
      new_escaped[key] = (rho_prev if escape_mass is False else
                          rho.astype(rho_prev.dtype))
      new_rinv[key] = rinv.astype(state.rinv[key].dtype)

    unflatten = lambda leaves: jax.tree_util.tree_unflatten(
        paired.treedef, leaves)
    new_state = ScaleByLoraRiteState(
        count=optax.safe_increment(count), mu=unflatten(new_mu),
        basis=unflatten(new_basis), nu=new_nu, escaped=new_escaped,
        rinv=new_rinv)
    return unflatten(out_leaves), new_state

  return base.GradientTransformation(init_fn, update_fn)


def balance_lora_factors(
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
    eps: float = 1e-6,
) -> base.GradientTransformation:
  r"""Rescale each pair after its step, toward equal norms of both factors.

  With :math:`A' = A + u_A` and :math:`B' = B + u_B`,
  :math:`n_A = \|A'\| + \epsilon`, :math:`n_B = \|B'\| + \epsilon` and
  :math:`s = \operatorname{clip}(\sqrt{n_B / n_A}, 1/2, 2)`, the returned
  updates move the factors to :math:`s A'` and :math:`B' / s`: the product
  :math:`H` is unchanged and, since LoRA-RITE is transformation invariant,
  so is the rest of training in exact arithmetic; the factors just stay in
  a range that bfloat16 holds well. A pair whose :math:`A'` or :math:`B'`
  is all zero (the usual start, :math:`B = 0`) is left as it is. Must come
  last in a chain (it needs the final updates).

  Each step moves at most a factor of 2: the rescale is an additive update,
  and a factor shrunk by :math:`s` in one step lands within about
  :math:`1/s` times its dtype's rounding of its target (a shrink of 1700 in
  one step had set a bfloat16 ``lora_a`` to exactly 0). Factors far apart
  come to equal norms over a few steps; in float32 the rounding that costs
  is the params' own.

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
    >>> for _ in range(2):
    ...   u, _ = tx.update(zero, tx.init(params), params)
    ...   params = optax.apply_updates(params, u)
    ...   print([round(float(jnp.linalg.norm(params[k])), 2)
    ...          for k in ('lora_a', 'lora_b')])
    [7.07, 2.83]
    [4.47, 4.47]
  """

  # 0 (or less) makes a factor that ends at zero 0/0: B NaN, A zeroed.
  checks.positive('balance_lora_factors', 'eps', eps)
  pairs_lib.layout_fn(layout, 'balance_lora_factors')

  def update_fn(updates, state, params=None):
    pairs_lib.refuse_no_params('balance_lora_factors', params,
                               'the factors it balances')
    paired = pairs_lib.find_lora_pairs(params, layout,
                                       who='balance_lora_factors')
    placement.require_explicit_api('balance_lora_factors',
                                   jax.tree.leaves(params))
    pairs_lib.check_updates_fit('balance_lora_factors', updates, params)
    param_leaves = [l for _, l in pairs_lib.flatten(params)[0]]
    out = paired.treedef.flatten_up_to(updates)
    for pair in paired.pairs:
      lay = pair.layout
      new = {}
      norms = {}
      for index in (pair.a_index, pair.b_index):
        p = param_leaves[index]
        dtype = casting.compute_dtype(p.dtype)
        new[index] = p.astype(dtype) + out[index].astype(dtype)
        # One norm per stacked slice: each slice is its own pair. Summed
        # over the axes, not over a flattened view: flattening a rank-first
        # (r, N) factor sharded along N had all-gathered it.
        axes = tuple(range(lay.batch_axes, new[index].ndim))
        norms[index] = jnp.sqrt(jnp.sum(jnp.square(new[index]),
                                        axis=axes)) + eps
      scale_a = jnp.clip(jnp.sqrt(norms[pair.b_index] / norms[pair.a_index]),
                         0.5, 2.0)
      # A zero factor: H = 0, nothing to balance (rescaling would only
      # shrink the other factor, toward zero).
      scale_a = jnp.where((norms[pair.a_index] > eps) &
                          (norms[pair.b_index] > eps), scale_a, 1.0)
      for index, scale in ((pair.a_index, scale_a),
                           (pair.b_index, 1.0 / scale_a)):
        p = param_leaves[index]
        factor = scale.reshape(scale.shape + (1,) * (p.ndim - lay.batch_axes))
        # Split along the layers as this factor is (its partner's norms
        # had moved their sharding onto it, over Explicit mesh axes).
        factor = placement.batch_like(factor, p, lay.batch_axes)
        out[index] = (new[index] * factor - p.astype(new[index].dtype)
                     ).astype(out[index].dtype)
    return jax.tree_util.tree_unflatten(paired.treedef, out), state

  return base.GradientTransformation(base.init_empty_state, update_fn)


def lora_rite(
    learning_rate: base.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-6,
    weight_decay: base.ScalarOrSchedule = 0.0,
    clip_unmagnified_grad: chex.Numeric = 1.0,
    update_skipping: chex.Numeric = 1.0,
    update_capping: chex.Numeric = 0.0,
    escape_mass: bool = False,
    balance_factors: bool = False,
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
) -> base.GradientTransformationExtraArgs:
  r"""The LoRA-RITE optimizer.

  :func:`scale_by_lora_rite`, then decoupled weight decay and the learning
  rate: for every factor :math:`F` of every pair,

  .. math::

    \Delta X_F = -\eta_t \left(M_F R_O^{+\top} + \lambda X_F\right),

  optionally followed by :func:`balance_lora_factors`. Equivalent pairs
  :math:`(A R, R^{-1} B)` of full-rank factors (or with ``B = 0``) get the
  same update of :math:`H = A B`.

  Every leaf of the params must belong to a LoRA pair; route the rest of a
  model elsewhere with :func:`optax.partition`.

  The Gram matrices are formed in at least float32: a factor whose columns
  reach a norm of ~1e19 (its partner ~1e-19, so that :math:`H` is finite)
  overflows them, and that pair's step and statistics become NaN for good.
  Pairs that drift that far apart are what ``balance_factors`` prevents.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the square root of the second moment's eigenvalues; with
      0, a direction whose eigenvalue (and escaped mass) is 0 gets no step.
    weight_decay: decoupled weight decay :math:`\lambda` (a number or a
      schedule of the step count).
    clip_unmagnified_grad: global-norm clip of all unmagnified gradients; 0
      turns it off.
    update_skipping: zero a factor's unmagnified gradient when its RMS exceeds
      this; 0 turns it off. The authors' default of 1 suits a mean loss; a
      summed loss (or one scaled up, as loss scaling does) can exceed it on
      every step, and then that factor never moves, silently.
    update_capping: RMS cap on the first moment before :math:`R^{+\top}`; 0
      turns it off.
    escape_mass: add the paper's escaped-mass term.
    balance_factors: (a Python bool; in ``static_args`` under
      ``optax.inject_hyperparams``) after the step, rescale the new factors
      toward equal norms, by at most a factor of 2 per step
      (:func:`balance_lora_factors`; leaves :math:`H` unchanged up to the
      params' rounding).
    layout: how pairs are found; see :class:`lora_rite_optax.LoraLayout`.
    precision: of the matrix products; see :func:`scale_by_lora_rite`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`;
    ``update`` needs ``params``. Updates have the gradients' dtypes, float16
    too (cast after the learning rate, where float16 holds them), so that
    wrappers which compare them with the gradients' dtype, such as
    ``optax.apply_if_finite`` and ``optax.MultiSteps``, work (float32
    gradients of bfloat16 factors too).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_rite_optax as lro
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> target = jax.random.normal(k1, (4, 2)) @ jax.random.normal(k2, (2, 3))
    >>> params = {'lora_a': jax.random.normal(k3, (4, 2)),
    ...           'lora_b': jnp.zeros((2, 3))}
    >>> loss = lambda p: jnp.mean((p['lora_a'] @ p['lora_b'] - target) ** 2)
    >>> tx = lro.lora_rite(learning_rate=0.05)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-3)
    True

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  checks.learning_rate('lora_rite', learning_rate)
  checks.non_negative('lora_rite', 'weight_decay', weight_decay,
                      finite=True, schedule_ok=True)
  checks.flag('lora_rite', 'balance_factors', balance_factors)
  if isinstance(balance_factors, jax.core.Tracer):
    # It changes the chain (and the state's tree): it cannot be traced.
    raise ValueError(
        'lora_rite: balance_factors must be a Python bool (it changes the '
        'chain); with optax.inject_hyperparams pass it in static_args.')
  steps = [
      _scale_by_lora_rite('lora_rite', b1, b2, eps, clip_unmagnified_grad,
                          update_skipping, update_capping, escape_mass,
                          layout, precision),
      optax.add_decayed_weights(weight_decay),
      placement.scale_by_learning_rate(learning_rate),
  ]
  if balance_factors:
    steps.append(balance_lora_factors(layout))
  # The cast wraps the chain: a step of its own would add a node to the
  # chain's state, and checkpoints of earlier versions would not restore.
  return casting.cast_to_gradients_dtypes(optax.chain(*steps), 'lora_rite',
                                       len(steps))

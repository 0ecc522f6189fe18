"""Shampoo with blocking, stale inverse roots and layer-wise Adam grafting."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_rite_optax import casting
from lora_rite_optax import checks
from lora_rite_optax import linalg
from lora_rite_optax import pairs as pairs_lib
from lora_rite_optax import placement

__all__ = ['shampoo', 'scale_by_shampoo', 'ShampooState', 'BlockStats']

GRAFTS = ('adam', 'sgd', 'none')


class BlockStats(NamedTuple):
  """Left and right Kronecker factors of one leaf, one pair per block."""
  left: jax.Array   # (blocks, bn, bn)
  right: jax.Array  # (blocks, bm, bm)


class ShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`.

  Attributes:
    count: number of updates so far (int32).
    mu: momentum of the grafted direction, a tree like the params.
    nu: Adam's second moment (the grafting norm), a tree like the params.
    stats: per leaf (flattened order) the statistics ``L, R`` of its blocks,
      or ``None`` for leaves with fewer than two axes.
    roots: per leaf the inverse 4th roots ``L^-1/4, R^-1/4`` of ``stats`` as
      of the last recomputation, or ``None``.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  # A (1,) placeholder array in place of the tuples for a tree of no leaves.
  stats: tuple[Optional[BlockStats], ...] | jax.Array
  roots: tuple[Optional[BlockStats], ...] | jax.Array


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How one leaf is viewed as a batch of matrix blocks (static)."""
  kind: str  # 'matrix', 'diag' or 'empty'
  rank_axis: Optional[int] = None  # set for LoRA factors
  batch_axes: int = 0
  slices: int = 1
  n: int = 1
  m: int = 1
  bn: int = 1
  bm: int = 1

  @property
  def nbn(self) -> int:
    return -(-self.n // self.bn)

  @property
  def nbm(self) -> int:
    return -(-self.m // self.bm)

  @property
  def blocks(self) -> int:
    return self.slices * self.nbn * self.nbm


def _plans(who: str, tree, layout, block_size: int
           ) -> tuple[list[_Plan], Any]:
  paired = pairs_lib.find_lora_pairs(tree, layout, who=who,
                                     allow_unpaired=True)
  factor = {}
  for pair in paired.pairs:
    lay = pair.layout
    factor[pair.a_index] = (lay.a_rank_axis, lay.batch_axes)
    factor[pair.b_index] = (lay.b_rank_axis, lay.batch_axes)
  for lone in paired.lone:  # its partner masked out
    lay = lone.layout
    factor[lone.index] = (lay.a_rank_axis if lone.role == 'a'
                          else lay.b_rank_axis, lay.batch_axes)
  leaves, treedef = pairs_lib.flatten(tree)
  plans = []
  for index, (path, leaf) in enumerate(leaves):
    # A zero-size leaf has nothing to precondition (its blocks would be 0
    # wide).
    if pairs_lib._is_empty(leaf) or not math.prod(leaf.shape):  # pylint: disable=protected-access
      plans.append(_Plan('empty'))
      continue
    shape = tuple(leaf.shape)
    if index in factor:
      rank_axis, batch_axes = factor[index]
      slices, n, m = pairs_lib.matrix_shape(shape, rank_axis, batch_axes)
    else:
      # Stacked layers are preconditioned each on its own, like the pairs.
      rank_axis = None
      batch_axes = pairs_lib.stacked_axes(path, shape, layout, who)
      if len(shape) - batch_axes < 2:
        plans.append(_Plan('diag'))
        continue
      slices = math.prod(shape[:batch_axes])
      n, m = math.prod(shape[batch_axes:-1]), shape[-1]
    plans.append(_Plan('matrix', rank_axis, batch_axes, slices, n, m,
                       min(n, block_size), min(m, block_size)))
  return plans, treedef


def _to_view(x, plan: _Plan):
  if plan.rank_axis is not None:
    return pairs_lib.to_matrix(x, plan.rank_axis, plan.batch_axes)
  return x.reshape(plan.slices, plan.n, plan.m)


def _from_view(v, shape, plan: _Plan):
  if plan.rank_axis is not None:
    return pairs_lib.from_matrix(v, shape, plan.rank_axis, plan.batch_axes)
  return v.reshape(shape)


def _to_blocks(v, plan: _Plan):
  """(s, n, m) -> (blocks, bn, bm), zero-padding the last block of each dim."""
  pad_n, pad_m = plan.nbn * plan.bn - plan.n, plan.nbm * plan.bm - plan.m
  v = jnp.pad(v, ((0, 0), (0, pad_n), (0, pad_m)))
  v = v.reshape(plan.slices, plan.nbn, plan.bn, plan.nbm, plan.bm)
  return v.transpose(0, 1, 3, 2, 4).reshape(plan.blocks, plan.bn, plan.bm)


def _from_blocks(b, plan: _Plan):
  v = b.reshape(plan.slices, plan.nbn, plan.nbm, plan.bn, plan.bm)
  v = v.transpose(0, 1, 3, 2, 4).reshape(plan.slices, plan.nbn * plan.bn,
                                         plan.nbm * plan.bm)
  return v[:, :plan.n, :plan.m]


def _inverse_root(stat, matrix_eps: float, p: int = 4):
  """(S + matrix_eps * lambda_max(S) I)^(-1/p), batched; identity if S = 0.

  NaN if S is not finite: an identity there (as for S = 0) had turned the
  preconditioning off for good without a sign (a float16 state overflows).
  Computed as ``lambda_max^(-1/p) (S / lambda_max + matrix_eps I)^(-1/p)``:
  for ``lambda_max`` below ~1e-32 (gradients ~1e-16) the ridge itself was
  subnormal, flushed to 0, and the root of a zero eigenvalue inf (NaN
  updates from a finite gradient).
  """
  stat = 0.5 * (stat + jnp.swapaxes(stat, -1, -2))
  w, q = linalg.eigh(stat)
  w_max = jnp.max(w, axis=-1, keepdims=True)
  safe = (w_max > 0) | ~jnp.isfinite(w_max)
  scale = jnp.where(safe, w_max, 1.0)
  w = jnp.maximum(w, 0.0) / scale + matrix_eps
  root = linalg.matmul(q * w[..., None, :] ** (-1.0 / p),
                       jnp.swapaxes(q, -1, -2)) * scale[..., None] ** (-1.0 / p)
  eye = jnp.eye(stat.shape[-1], dtype=stat.dtype)
  return jnp.where(safe[..., None], root, eye)


_INT32_MAX = 2**31 - 1


def _whole_number(who: str, name: str, value: Any) -> Any:
  """``value`` if it is a whole number >= 1 (or traced); else one error.

  2.5 had been cut to 2 (``block_size``) or recomputed the roots every 5
  steps (``precondition_every``), and True taken for 1.
  """
  v = checks.concrete(value)
  if isinstance(value, (bool, np.bool_, str)) or (v is None and not isinstance(
      value, jax.core.Tracer)):
    raise ValueError(f'{who}: {name} must be an integer >= 1, got '
                     f'{value!r}.')
  if v is not None and not (math.isfinite(v) and v == int(v) and v >= 1):
    raise ValueError(f'{who}: {name} must be an integer >= 1, got {v:g}.')
  if v is not None and v > _INT32_MAX:  # the step counter's dtype
    raise ValueError(f'{who}: {name} must be at most 2**31 - 1, got '
                     f'{int(v)}.')
  return value


def _dtype(x):
  return casting.compute_dtype(x.dtype)


def scale_by_shampoo(
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    matrix_eps: chex.Numeric = 1e-6,
    block_size: int = 128,
    precondition_every: int = 10,
    graft: str = 'adam',
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
) -> optax.GradientTransformation:
  r"""Shampoo's scaling (no learning rate); see :func:`shampoo`.

  Steps come in the gradients' dtype, except float16's, which stay in
  float32 (without a graft they can exceed float16's range; :func:`shampoo`
  casts after the learning rate, and a chain of one's own under
  ``optax.apply_if_finite`` or ``optax.MultiSteps`` wants
  :func:`with_gradients_dtypes`).

  Args:
    b1: momentum of the grafted direction.
    b2: decay of the Kronecker statistics and of Adam's second moment.
    eps: Adam's epsilon in the grafting direction.
    matrix_eps: ridge added to each statistic before its inverse root,
      relative to the statistic's largest eigenvalue.
    block_size: largest side of a preconditioned block.
    precondition_every: recompute the inverse roots when ``count %
      precondition_every == 0`` (so at the first step, then every k steps).
    graft: ``'adam'`` (layer-wise norm of Adam's step), ``'sgd'`` (norm of
      the gradient) or ``'none'`` (raw Shampoo direction). Leaves with fewer
      than two axes take the graft's direction itself: the gradient with
      ``'sgd'``, Adam's normalised gradient otherwise.
    layout: how LoRA pairs are recognised (for their rank-last views).

  Returns:
    An ``optax.GradientTransformation`` with :class:`ShampooState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import lora_rite_optax as lro
    >>> tx = lro.scale_by_shampoo(b1=0.0, graft='none')
    >>> g = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    >>> updates, _ = tx.update(g, tx.init(g))
    >>> [[round(v, 2) for v in row] for row in updates.tolist()]
    [[31.62, 0.0], [0.0, 31.62]]

  References:
    Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor
    Optimization <https://arxiv.org/abs/1802.09568>`_, ICML 2018.
    Anil et al., `Scalable Second Order Optimization for Deep Learning
    <https://arxiv.org/abs/2002.09018>`_, 2020.
  """
  return _shampoo('scale_by_shampoo', b1, b2, eps, matrix_eps, block_size,
                  precondition_every, graft, layout)


def _shampoo(who: str, b1, b2, eps, matrix_eps, block_size, precondition_every,
             graft, layout) -> optax.GradientTransformation:
  """:func:`scale_by_shampoo`, its errors naming ``who`` (the function the
  user called)."""
  if graft not in GRAFTS:
    raise ValueError(f'{who}: graft must be one of {GRAFTS}, got {graft!r}.')
  for name, value in (('b1', b1), ('b2', b2)):
    checks.beta(who, name, value)
  checks.non_negative(who, 'eps', eps, finite=True)
  # > 0: a LoRA factor's N x N statistic has rank r at most, and its zero
  # eigenvalues would have infinite inverse roots.
  checks.positive(who, 'matrix_eps', matrix_eps)
  pairs_lib.layout_fn(layout, who)
  if isinstance(block_size, jax.core.Tracer):
    raise ValueError(
        f'{who}: block_size fixes the state shapes and must be static; '
        "with optax.inject_hyperparams pass static_args=('block_size',).")
  # Concrete here (a number, or the array inject_hyperparams' init gives);
  # precondition_every may be traced, and then cannot be checked.
  block_size = int(_whole_number(who, 'block_size', block_size))
  precondition_every = _whole_number(who, 'precondition_every',
                                     precondition_every)

  def init_fn(params):
    params = jax.tree.map(jnp.asarray, params)  # Python numbers too
    plans, _ = _plans(who, params, layout, block_size)  # factors named first
    pairs_lib.check_trainable(who, params)  # the leaves beside the pairs too
    placement.require_explicit_api(who, jax.tree.leaves(params))
    # Here, not only in the update: a trainer allocates (or derives the
    # shardings of) the whole state before its first step.
    placement.refuse_explicit(who, jax.tree.leaves(params), 'params')
    leaves, _ = pairs_lib.flatten(params)
    stats, roots = [], []
    for plan, (_, leaf) in zip(plans, leaves):
      if plan.kind != 'matrix':
        stats.append(None)
        roots.append(None)
        continue
      dtype = _dtype(leaf)
      # Replicated on the factor's mesh (the train loop shards the blocks
      # of a factor cut along its sharded axis from jax.eval_shape).
      zeros = lambda k, leaf=leaf: placement.zeros_beside(
          (plan.blocks, k, k), dtype, [leaf])
      eye = lambda k, leaf=leaf: linalg.eye_like(zeros(k, leaf))
      stats.append(BlockStats(zeros(plan.bn), zeros(plan.bm)))
      roots.append(BlockStats(eye(plan.bn), eye(plan.bm)))
    zeros_like = lambda p: placement.zeros_like(p, _dtype(p))
    stats, roots = tuple(stats), tuple(roots)
    if not leaves:
      # No leaves (an empty tree, or optax.tree_utils.tree_map_params probing
      # init with a placeholder): one array stands for the per-leaf tuple,
      # so that it is a prefix (a leaf) of any real state's tuple. Two
      # arrays, not one: a donated state must not hold a buffer twice. Of
      # one element, not none: orbax refuses to save a zero-size array.
      stats, roots = (jnp.zeros((1,), jnp.float32) for _ in range(2))
    return ShampooState(
        count=placement.zeros_beside((), jnp.int32,
                                     [leaf for _, leaf in leaves]),
        mu=jax.tree.map(zeros_like, params),
        nu=jax.tree.map(zeros_like, params),
        stats=stats, roots=roots)

  def update_fn(updates, state, params=None):
    checks.state_of(who, state, ShampooState)
    pairs_lib.check_updates_fit(who, updates, params)
    updates = jax.tree.map(jnp.asarray, updates)  # Python numbers too
    plans, treedef = _plans(who, updates, layout, block_size)
    grads = [leaf for _, leaf in pairs_lib.flatten(updates)[0]]
    placement.refuse_explicit(who, grads, 'gradients')
    if not grads:  # An empty tree: its state keeps init's placeholders.
      return updates, state._replace(count=optax.safe_increment(state.count))
    mus = [leaf for _, leaf in pairs_lib.flatten(state.mu)[0]]
    nus = [leaf for _, leaf in pairs_lib.flatten(state.nu)[0]]
    shape = lambda x: getattr(x, 'shape', None)
    stats_fit = (isinstance(state.stats, tuple) and
                 len(state.stats) == len(plans) and all(
                     (st is None) == (plan.kind != 'matrix') and (
                         st is None or shape(st.left) ==
                         (plan.blocks, plan.bn, plan.bn))
                     for plan, st in zip(plans, state.stats)))
    structure = lambda tree: jax.tree.structure(
        tree, is_leaf=pairs_lib._is_empty)  # pylint: disable=protected-access
    # The structure too: a state of other params with the same leaf shapes
    # had applied one leaf's moments to another.
    if (not stats_fit or structure(state.mu) != structure(updates) or
        [shape(x) for x in mus] != [shape(g) for g in grads]):
      raise ValueError(f'{who}: the state was made by init() for other '
                       'params (other leaves, shapes or block_size); call '
                       'init with the params these updates are for.')
    # In the statistics' dtype: a float64 count (jax_enable_x64) would
    # promote the float32 state, retracing every step and breaking scans.
    t = state.count.astype(functools.reduce(
        jnp.promote_types, [x.dtype for x in nus if hasattr(x, 'dtype')],
        jnp.float32))
    bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)

    # Statistics, from the current gradient.
    new_stats, g_blocks = [], []
    for plan, g, st in zip(plans, grads, state.stats):
      if plan.kind != 'matrix':
        new_stats.append(None)
        g_blocks.append(None)
        continue
      gb = _to_blocks(_to_view(g.astype(st.left.dtype), plan), plan)
      left = b2 * st.left + (1 - b2) * linalg.matmul(
          gb, jnp.swapaxes(gb, -1, -2))
      right = b2 * st.right + (1 - b2) * linalg.matmul(
          jnp.swapaxes(gb, -1, -2), gb)
      # Kept in the state's dtype: a float64 b2 (jax_enable_x64) had
      # promoted them, and the cond below failed on branches of two dtypes.
      new_stats.append(BlockStats(left.astype(st.left.dtype),
                                  right.astype(st.right.dtype)))
      g_blocks.append(gb)

    # Inverse roots, recomputed every `precondition_every` steps.
    def recompute(stats):
      # All statistics of one size go through one batched eigh, and the
      # sizes one after another: concurrent batched eighs can deadlock
      # XLA:CPU's thread pool (see linalg.one_at_a_time).
      mats = [m for s in stats if s is not None for m in (s.left, s.right)]
      groups: dict[tuple, list[int]] = {}
      for i, m in enumerate(mats):
        groups.setdefault((m.shape[-1], m.dtype), []).append(i)
      stacked = [jnp.concatenate([mats[i] for i in ids])
                 for ids in groups.values()]
      # In float32 at least: LAPACK has no 16-bit eigh (a state cast to
      # bfloat16 had failed there).
      rooted = linalg.one_at_a_time(
          lambda m: _inverse_root(m.astype(casting.compute_dtype(m.dtype)),
                                  matrix_eps).astype(m.dtype), stacked)
      roots = [None] * len(mats)
      for ids, out in zip(groups.values(), rooted):
        offsets = np.cumsum([mats[i].shape[0] for i in ids])[:-1]
        for i, part in zip(ids, jnp.split(out, offsets)):
          roots[i] = part
      it = iter(roots)
      return tuple(None if s is None else BlockStats(next(it), next(it))
                   for s in stats)
    new_stats = tuple(new_stats)
    roots = jax.lax.cond(state.count % precondition_every == 0, recompute,
                         lambda _: state.roots, new_stats)

    out, new_mus, new_nus = [], [], []
    for plan, g, mu, nu, gb, root in zip(plans, grads, mus, nus, g_blocks,
                                         roots):
      if plan.kind == 'empty':
        out.append(g)
        new_mus.append(mu)
        new_nus.append(nu)
        continue
      g32 = g.astype(nu.dtype)
      mu_dtype, nu_dtype = mu.dtype, nu.dtype
      nu = (b2 * nu + (1 - b2) * jnp.square(g32)).astype(nu_dtype)
      adam = linalg.divide_or_zero(g32, jnp.sqrt(nu / bc2) + eps)
      if plan.kind == 'diag':
        # Unpreconditioned: the graft's own direction, as Distributed
        # Shampoo gives such leaves (with 'sgd' they had taken Adam's).
        direction = g32 if graft == 'sgd' else adam
      else:
        pre = _from_blocks(
            linalg.matmul(linalg.matmul(root.left, gb), root.right), plan)
        if graft != 'none':
          ref = _to_view(adam if graft == 'adam' else g32, plan)
          ref_norm = jnp.sqrt(jnp.sum(jnp.square(ref), axis=(1, 2),
                                      keepdims=True))
          pre_norm = jnp.sqrt(jnp.sum(jnp.square(pre), axis=(1, 2),
                                      keepdims=True))
          ratio = jnp.where(pre_norm > 0, ref_norm / jnp.where(
              pre_norm > 0, pre_norm, 1.0), 0.0)
          pre = pre * ratio
        direction = _from_view(pre, g.shape, plan)
      mu = (b1 * mu + (1 - b1) * direction).astype(mu_dtype)
      # float16 keeps float32 until after the rate: with graft='none' a
      # step before it can pass float16's 65504 (inf).
      out.append((mu / bc1).astype(casting.step_dtype(g.dtype, mu.dtype)))
      new_mus.append(mu)
      new_nus.append(nu)

    unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
    new_state = ShampooState(
        count=optax.safe_increment(state.count),
        mu=jax.tree_util.tree_unflatten(
            jax.tree.structure(state.mu, is_leaf=pairs_lib._is_empty),  # pylint: disable=protected-access
            new_mus),
        nu=jax.tree_util.tree_unflatten(
            jax.tree.structure(state.nu, is_leaf=pairs_lib._is_empty),  # pylint: disable=protected-access
            new_nus),
        stats=new_stats, roots=roots)
    return unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    matrix_eps: chex.Numeric = 1e-6,
    block_size: int = 128,
    precondition_every: int = 10,
    graft: str = 'adam',
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
) -> optax.GradientTransformationExtraArgs:
  r"""Shampoo (Gupta et al. 2018) with Anil et al.'s blocking and grafting.

  Every leaf with two or more axes is viewed as a matrix (LoRA factors in
  their rank-last view ``(N, r)``; other leaves as ``(prod(shape[:-1]),
  shape[-1])``; under a scanned layout each stacked slice on its own, see
  :func:`lora_rite_optax.pairs.stacked_axes`) and cut into blocks of at most
  ``block_size`` x ``block_size`` (the last block of a dim zero-padded, which
  changes nothing). For each block ``G`` of the gradient, at step ``t``
  (0-based):

  .. math::
    L_t = b_2 L_{t-1} + (1-b_2) G G^\top, \quad
    R_t = b_2 R_{t-1} + (1-b_2) G^\top G, \quad
    P = \tilde L^{-1/4}\, G\, \tilde R^{-1/4},

  with :math:`\tilde X^{-1/4} = (X + \epsilon_m \lambda_{max}(X) I)^{-1/4}`
  from an eigendecomposition, recomputed when
  ``t % precondition_every == 0`` and kept in the state in between. Grafting
  (layer-wise, per leaf or per scanned slice): ``P`` is rescaled to the
  Frobenius norm of Adam's step :math:`g / (\sqrt{v_t / (1-b_2^{t+1})} +
  \epsilon)`, :math:`v_t = b_2 v_{t-1} + (1-b_2) g^2`. Leaves with fewer than
  two axes (per slice) take that normalised gradient itself as their
  direction (RMSProp's, so with the momentum below they differ from Adam,
  which averages the raw gradient; the gradient itself with
  ``graft='sgd'``, as in Distributed Shampoo). The grafted direction ``u`` goes through
  momentum :math:`m_t = b_1 m_{t-1} + (1-b_1) u_t` and the step is
  :math:`-\eta_t (m_t / (1 - b_1^{t+1}) + wd\, \theta_t)`. State is kept in
  at least float32; updates are cast to the gradients' dtype.

  Defaults (used for the paper comparison): ``b1=0.9, b2=0.999, eps=1e-8``
  (Adam's, so the grafted step has Adam's scale and learning rates transfer),
  ``matrix_eps=1e-6`` relative to the largest eigenvalue, ``block_size=128``,
  ``precondition_every=10``, Adam grafting. We did not find the paper's own
  Shampoo settings. Relation to Distributed Shampoo (Anil et al.'s code):
  same ``beta1``, ``beta2``, ``matrix_epsilon`` (relative), blocking, and
  momentum after grafting as a moving average (its language-modelling config,
  ``moving_average_for_momentum=True``, no Nesterov); our ``'adam'`` graft is
  its RMSProp graft with Adam's bias correction; it recomputes roots every
  step by default (50 in that config) and runs the graft alone for the first
  ``start_preconditioning_step=5`` steps, where we precondition from step 0.
  The bias correction of the momentum is ours (it makes the first steps the
  size of Adam's). The inverse roots are computed in the compute dtype,
  float32 unless x64 is on (Distributed Shampoo takes float64), where the
  default ``matrix_eps`` is about 8 machine epsilons: a root reused for
  ``precondition_every`` steps can be off by ~1% on a gradient outside the
  statistic's span (~1e-4 with ``matrix_eps=1e-4``).

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum of the grafted direction.
    b2: decay of the Kronecker statistics and of Adam's second moment.
    eps: Adam's epsilon in the grafting direction.
    weight_decay: decoupled weight decay (a number or a schedule).
    matrix_eps: ridge relative to each statistic's largest eigenvalue.
    block_size: largest side of a preconditioned block.
    precondition_every: steps between inverse-root recomputations.
    graft: ``'adam'``, ``'sgd'`` or ``'none'``.
    layout: how LoRA pairs are recognised (for their rank-last views).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. With
    ``optax.inject_hyperparams`` pass ``static_args=('block_size',)``: block
    sizes fix the state's shapes (and ``'layout'`` too for a ``layout``
    function, which it would treat as a schedule).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_rite_optax as lro
    >>> key = jax.random.key(0)
    >>> params = {'lora_a': jax.random.normal(key, (4, 2)),
    ...           'lora_b': jnp.zeros((2, 3))}
    >>> target = jnp.arange(12.0).reshape(4, 3) / 10
    >>> loss = lambda p: jnp.sum((p['lora_a'] @ p['lora_b'] - target) ** 2)
    >>> tx = lro.shampoo(1e-2)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> state = tx.init(params)
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-2)
    True

  References:
    Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor
    Optimization <https://arxiv.org/abs/1802.09568>`_, ICML 2018.
    Anil et al., `Scalable Second Order Optimization for Deep Learning
    <https://arxiv.org/abs/2002.09018>`_, 2020.
  """
  checks.learning_rate('shampoo', learning_rate)
  checks.non_negative('shampoo', 'weight_decay', weight_decay,
                      finite=True, schedule_ok=True)
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  # The cast wraps the whole chain: float16's step is float32 until the rate.
  return casting.cast_to_gradients_dtypes(optax.chain(
      _shampoo('shampoo', b1, b2, eps, matrix_eps, block_size,
               precondition_every, graft, layout),
      # add_decayed_weights needs params even at 0, and an update without
      # params is documented to work; identity has the same (empty) state.
      optax.identity() if no_decay else optax.add_decayed_weights(
          weight_decay),
      placement.scale_by_learning_rate(learning_rate),
  ), 'shampoo', 3)

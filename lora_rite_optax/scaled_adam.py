"""ScaledAdam: Riemannian-preconditioned LoRA (Zhang and Pilanci, 2024)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from lora_rite_optax import casting
from lora_rite_optax import checks
from lora_rite_optax import linalg
from lora_rite_optax import pairs as pairs_lib
from lora_rite_optax import placement

__all__ = ['scale_by_riemannian_precond', 'scale_by_adam_authors',
           'scaled_adam', 'ScaleByAdamAuthorsState']


def _precondition(grad, partner, delta, wait_for=None):
  """grad (s, N, r) @ (partner^T partner + delta I)^-1, partner (s, M, r).

  Returns the scaled gradient and the ``(s, r, r)`` inverse. With
  ``wait_for`` (the previous pair's inverse), the inversion starts only once
  that is computed: concurrent batched solves can deadlock XLA:CPU
  (``linalg.one_at_a_time``).
  """
  # Over Explicit mesh axes the contraction of a sharded long axis needs its
  # output's sharding named: replicated r x r, stacked axes kept.
  gram = jax.lax.dot_general(
      partner, partner, (((1,), (1,)), ((0,), (0,))),
      precision=jax.lax.Precision.HIGHEST,
      out_sharding=placement.reduced_sharding(partner, (0,)))
  eye = linalg.eye_like(gram)
  gram = gram + delta * eye
  if wait_for is not None:
    gram = linalg.after(gram, wait_for)
  # The r x r inverse, then one product, as the authors' code does: the
  # chain between pairs then waits on r x r arrays, never on a (possibly
  # sharded) N x r one.
  inverse = jnp.linalg.solve(gram, eye)
  # The authors fall back to the identity when the inverse fails.
  ok = jnp.all(jnp.isfinite(inverse), axis=(-2, -1), keepdims=True)
  inverse = jnp.where(ok, inverse, eye)
  return jax.lax.dot_general(grad, inverse, (((2,), (1,)), ((0,), (0,))),
                             precision=jax.lax.Precision.HIGHEST), inverse


def scale_by_riemannian_precond(
    delta: chex.Numeric = 1e-6,
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
) -> optax.GradientTransformation:
  r"""Scales each LoRA factor's gradient by its partner's r x r Gram inverse.

  With the rank-last views :math:`X_A = A` (:math:`N_A \times r`) and
  :math:`X_B = B^\top` (:math:`N_B \times r`) of a pair
  ``delta W = A @ B``:

  .. math::
    g_A \leftarrow g_A (X_B^\top X_B + \delta I)^{-1}, \qquad
    g_B \leftarrow g_B (X_A^\top X_A + \delta I)^{-1}

  (:math:`g_B` in the same rank-last view), both from the parameters passed
  to ``update``. The Gram matrices are formed and solved in at least float32,
  and the scaled gradients are returned in the gradients' dtype, except that
  float16 ones stay in float32 (they can exceed float16's range;
  :func:`scaled_adam` casts its final updates back to the gradients' dtype,
  as ``lora_rite`` does; a chain of one's own wants
  :func:`with_gradients_dtypes` under ``optax.apply_if_finite`` or
  ``optax.MultiSteps``). If the solve is not finite the gradient is left
  unscaled, as the authors' ``try: inverse ... except: identity``. Every leaf
  must belong to a pair.

  Args:
    delta: the ridge :math:`\delta` (the authors' ``optimizer_reg``).
    layout: how pairs are recognised, see :func:`find_lora_pairs`.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import lora_rite_optax as lro
    >>> params = {'lora_a': jnp.ones((3, 1)), 'lora_b': 2 * jnp.ones((1, 2))}
    >>> grads = {'lora_a': jnp.ones((3, 1)), 'lora_b': jnp.ones((1, 2))}
    >>> tx = lro.scale_by_riemannian_precond(delta=0.0)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates['lora_a'][0, 0].item(), updates['lora_b'][0, 0].item()
    (0.125, 0.3333333432674408)

  References:
    Zhang and Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  return _riemannian_precond('scale_by_riemannian_precond', delta, layout)


def _riemannian_precond(who: str, delta, layout
                        ) -> optax.GradientTransformation:
  """:func:`scale_by_riemannian_precond`, its errors naming ``who`` (the
  function the user called)."""
  checks.non_negative(who, 'delta', delta, finite=True)
  pairs_lib.layout_fn(layout, who)

  def init_fn(params):
    pairs_lib.find_lora_pairs(params, layout, who=who)
    placement.require_explicit_api(who, jax.tree.leaves(params))
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    pairs_lib.refuse_no_params(
        who, params, 'the preconditioner is built from the LoRA factors')
    # The factors are read by leaf index: other params would precondition
    # each gradient with another pair's factors.
    pairs_lib.check_updates_fit(who, updates, params)
    paired = pairs_lib.find_lora_pairs(updates, layout, who=who)
    placement.require_explicit_api(who, jax.tree.leaves(params))
    grads, treedef = pairs_lib.flatten(updates)
    values, _ = pairs_lib.flatten(params)
    # Each factor's gradient is batched over the layers with its partner's
    # Gram: their layer axes must be split alike (a ShardingTypeError from
    # inside the product, else).
    for pair in paired.pairs:
      a, b = values[pair.a_index][1], values[pair.b_index][1]
      if pair.layout.batch_axes and placement.stacks_split_apart(
          a, b, pair.layout.batch_axes):
        raise ValueError(
            f"{who}: pair {pair.name!r} splits the stacked layers of "
            f"{pair.layout.a_key} and {pair.layout.b_key} over different "
            "Explicit mesh axes, or splits a stacked axis after the first; "
            "split only the first, alike, or make the mesh with Auto axes.")
    out = [leaf for _, leaf in grads]
    last = None
    for pair in paired.pairs:
      lay = pair.layout
      ga, gb = grads[pair.a_index][1], grads[pair.b_index][1]
      dtype = casting.compute_dtype(jnp.result_type(ga, gb))
      def view(x, index, axis, what=''):
        return placement.as_matrices(
            who, what + '/'.join(values[index][0]),
            lambda y: pairs_lib.to_matrix(y.astype(dtype), axis,
                                          lay.batch_axes), x)
      xa = view(values[pair.a_index][1], pair.a_index, lay.a_rank_axis)
      xb = view(values[pair.b_index][1], pair.b_index, lay.b_rank_axis)
      # Each solve waits for the one before.
      new_a, inv_a = _precondition(
          view(ga, pair.a_index, lay.a_rank_axis, 'the gradient of '), xb,
          delta, last)
      new_b, last = _precondition(
          view(gb, pair.b_index, lay.b_rank_axis, 'the gradient of '), xa,
          delta, inv_a)
      out[pair.a_index] = pairs_lib.from_matrix(
          new_a, ga.shape, lay.a_rank_axis, lay.batch_axes
      ).astype(casting.step_dtype(ga.dtype, dtype))
      out[pair.b_index] = pairs_lib.from_matrix(
          new_b, gb.shape, lay.b_rank_axis, lay.batch_axes
      ).astype(casting.step_dtype(gb.dtype, dtype))
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamAuthorsState(NamedTuple):
  """State of :func:`scale_by_adam_authors`."""
  count: jax.Array  # int32
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_authors(b1: chex.Numeric = 0.9, b2: chex.Numeric = 0.999,
                          eps: chex.Numeric = 1e-8,
                          bias_correction: bool = False
                          ) -> optax.GradientTransformation:
  r"""Adam's scaling exactly as the ScaledAdam authors' ``AdamWr`` computes it.

  .. math::
    m_t = b_1 m_{t-1} + (1 - b_1) g_t, \quad
    v_t = b_2 v_{t-1} + (1 - b_2) g_t^2, \quad
    u_t = c_t\, m_t / (\sqrt{v_t} + \epsilon)

  with :math:`c_t = \sqrt{1 - b_2^t} / (1 - b_1^t)` if ``bias_correction``
  else 1 (``correct_bias=False`` in the authors' Mistral/GLUE code). Unlike
  ``optax.scale_by_adam``, epsilon is added to the uncorrected
  :math:`\sqrt{v_t}`, as in that code. Moments are kept in at least float32.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to :math:`\sqrt{v_t}`.
    bias_correction: apply the step-size bias correction :math:`c_t`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> import lora_rite_optax as lro
    >>> tx = lro.scale_by_adam_authors(eps=0.0)
    >>> updates, _ = tx.update(jnp.array([4.0]), tx.init(jnp.zeros(1)))
    >>> round(updates[0].item(), 4)  # 0.1 * 4 / sqrt(0.001 * 16)
    3.1623
  """
  return _adam_authors('scale_by_adam_authors', b1, b2, eps, bias_correction)


def _adam_authors(who: str, b1, b2, eps, bias_correction
                  ) -> optax.GradientTransformation:
  """:func:`scale_by_adam_authors`, its errors naming ``who`` (the function
  the user called)."""
  for name, value in (('b1', b1), ('b2', b2)):
    checks.beta(who, name, value)
  checks.non_negative(who, 'eps', eps, finite=True)
  checks.flag(who, 'bias_correction', bias_correction)

  def init_fn(params):
    zeros = lambda p: placement.zeros_like(p, casting.compute_dtype(p.dtype))
    return ScaleByAdamAuthorsState(
        count=placement.zeros_beside((), jnp.int32,
                                     jax.tree.leaves(params)),
        mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    checks.state_of(who, state, ScaleByAdamAuthorsState)
    # Wrong gradients had been blamed on the state.
    pairs_lib.check_updates_fit(who, updates, params)
    updates = jax.tree.map(jnp.asarray, updates)  # Python numbers too
    checks.state_fits(who, state.mu, updates)
    count = optax.safe_increment(state.count)
    # Cast back: a float64 b1 or b2 (jax_enable_x64) had promoted the
    # state, retracing every step and breaking scans.
    mu = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g.astype(m.dtype)
                                    ).astype(m.dtype), state.mu, updates)
    nu = jax.tree.map(
        lambda v, g: (b2 * v + (1 - b2) * jnp.square(g.astype(v.dtype))
                      ).astype(v.dtype), state.nu, updates)
    on = checks.concrete(bias_correction)
    if on == 0:
      factor = 1.0
    else:
      t = count.astype(jnp.result_type(float))
      factor = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
      if on is None:
        # Traced: inject_hyperparams injects a flag given as 1 or an array
        # (only a Python bool stays static); `if` had raised on the tracer.
        factor = jnp.where(bias_correction, factor, 1.0)
    new_updates = jax.tree.map(
        lambda m, v, g: linalg.divide_or_zero(
            factor * m, jnp.sqrt(v) + eps).astype(g.dtype),
        mu, nu, updates)
    return new_updates, ScaleByAdamAuthorsState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scaled_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    delta: chex.Numeric = 1e-6,
    bias_correction: bool = False,
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
) -> optax.GradientTransformationExtraArgs:
  r"""ScaledAdam: AdamW on Riemannian-preconditioned LoRA gradients.

  For each pair (rank-last views :math:`X_A = A`, :math:`X_B = B^\top`):

  .. math::
    \tilde g_A = g_A (X_B^\top X_B + \delta I)^{-1}, \quad
    \tilde g_B = g_B (X_A^\top X_A + \delta I)^{-1},

  then per factor :math:`m_t = b_1 m_{t-1} + (1-b_1)\tilde g_t`,
  :math:`v_t = b_2 v_{t-1} + (1-b_2)\tilde g_t^2` and the step
  :math:`-\eta_t\,(c_t m_t / (\sqrt{v_t} + \epsilon) + wd\,\theta_t)`,
  :math:`c_t = 1` without bias correction. A chain of
  :func:`scale_by_riemannian_precond`, :func:`scale_by_adam_authors`,
  ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``.

  What we follow from the authors' code (``AdamWr`` in
  ``Mistral-7B/mistral/custom_optimizer.py`` of
  pilancilab/Riemannian_Preconditioned_LoRA): delta is added to the r x r
  Gram matrix before inverting (``inverse(c.T @ c + reg * I)``, reg 1e-6
  there), the identity is used if the inverse fails, no bias correction
  (``correct_bias=False``; the GPT-2 code uses ``True``, hence the flag), and
  epsilon is added to the uncorrected :math:`\sqrt{v}`. Where we differ:

  * The authors update ``lora_A`` in place before preconditioning
    ``lora_B``'s gradient, so B's preconditioner uses the already-updated A (a
    Gauss-Seidel sweep). Here both preconditioners use the parameters passed
    to ``update`` (the paper's update rule, and the authors' ``SGDr``).
  * Weight decay is optax's decoupled ``theta - lr * wd * theta_t`` on the
    pre-step parameters (as the authors' GPT-2 ``AdamWr``); their Mistral code
    decays the post-step parameters, an O(lr^2 wd) difference.
  * Default ``eps`` is 1e-8 (the authors' class default is 1e-6).

  Args:
    learning_rate: a float or an optax schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to :math:`\sqrt{v}`.
    weight_decay: decoupled weight decay (a number or a schedule).
    delta: ridge added to the r x r Gram matrices.
    bias_correction: Adam's step-size bias correction (off, as the authors).
    layout: how pairs are recognised, see :func:`find_lora_pairs`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``. With ``optax.inject_hyperparams`` and a ``layout`` function,
    pass ``static_args=('layout',)``: it would treat any callable as a schedule.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_rite_optax as lro
    >>> key = jax.random.key(0)
    >>> params = {'lora_a': jax.random.normal(key, (4, 2)),
    ...           'lora_b': jnp.zeros((2, 3))}
    >>> target = jnp.arange(12.0).reshape(4, 3) / 10
    >>> loss = lambda p: jnp.sum((p['lora_a'] @ p['lora_b'] - target) ** 2)
    >>> tx = lro.scaled_adam(3e-2)
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
    Zhang and Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  checks.learning_rate('scaled_adam', learning_rate)
  checks.non_negative('scaled_adam', 'weight_decay', weight_decay,
                      finite=True, schedule_ok=True)
  return casting.cast_to_gradients_dtypes(optax.chain(
      _riemannian_precond('scaled_adam', delta, layout),
      _adam_authors('scaled_adam', b1, b2, eps, bias_correction),
      optax.add_decayed_weights(weight_decay),
      placement.scale_by_learning_rate(learning_rate),
  ), 'scaled_adam', 4)

"""The dtypes optimizers compute and return their steps in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from optax._src import base

from lora_rite_optax import checks


def compute_dtype(dtype) -> jnp.dtype:
  """float32 at least (float64 for float64 params with x64 on), canonical.

  Canonical as jit sees it: without x64, numpy float64 params are float32
  arrays inside jit, and a state built eagerly must match the one
  ``jax.eval_shape`` or a jitted update sees (LoRA-RITE's group keys name
  this dtype).
  """
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def step_dtype(param_dtype, wide_dtype) -> jnp.dtype:
  """The dtype a preconditioned step is returned in before the rate.

  ``param_dtype``, except for a dtype with float16's narrow range (max
  65504): a step before the learning rate can be far larger than the factor
  (LoRA-RITE's A step scales with 1/||B||, ScaledAdam's with the inverse of
  the partner's Gram matrix), so there it stays in ``wide_dtype`` (float32)
  and `cast_to_gradients_dtypes` casts it after the rate.
  """
  if jnp.finfo(param_dtype).maxexp < jnp.finfo(jnp.float32).maxexp:
    return jnp.dtype(wide_dtype)
  return jnp.dtype(param_dtype)


def cast_to_gradients_dtypes(tx: base.GradientTransformation,
                             who: str | None = None, length: int | None = None
                             ) -> base.GradientTransformationExtraArgs:
  """``tx`` (a whole chain), its updates cast to the gradients' dtypes
  (same state).

  LoRA-RITE's and ScaledAdam's preconditioned steps of float16 params are
  kept in float32 (before the learning rate they can exceed float16's
  range); after the rate they fit. A float32 learning rate
  (``optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32)``, the
  advice for bfloat16 params) makes any step float32. And the branches of
  ``optax.apply_if_finite`` and ``optax.MultiSteps`` (zeros like the
  gradients) need the updates in the gradients' dtypes, which may not be
  the params' (float32 gradients of bfloat16 params: casting to the
  params' had failed there in an 11-line cond error). Wrapping the chain,
  rather than adding a step to it, keeps the state's tree (and so the
  checkpoints made before). Where ``tx`` is ``who``'s ``optax.chain`` of
  ``length`` steps, a state that is not such a chain's is refused in one
  line naming ``who``.
  """

  def update_fn(updates, state, params=None, **extra_args):
    if who is not None:
      checks.chain_state_of(who, state, length)
    new_updates, state = base.with_extra_args_support(tx).update(
        updates, state, params, **extra_args)
    return jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)),
                        new_updates, updates), state

  return base.GradientTransformationExtraArgs(tx.init, update_fn)


def with_gradients_dtypes(inner: base.GradientTransformation
                          ) -> base.GradientTransformationExtraArgs:
  r"""Casts a transformation's updates to the gradients' dtypes.

  :math:`u_t \leftarrow \mathrm{cast}(u_t, \mathrm{dtype}(g_t))` for each leaf,
  after ``inner``; the state is ``inner``'s, unchanged.

  :func:`scale_by_lora_rite`, :func:`scale_by_riemannian_precond` and
  :func:`scale_by_shampoo` return float32 steps for float16 gradients (before
  the learning rate a step can pass float16's 65504), and a float32 learning
  rate (``optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32)``)
  makes any step float32. ``optax.apply_if_finite`` and ``optax.MultiSteps``
  need updates in the gradients' dtypes (their other branch is zeros like the
  gradients): wrap a chain of one's own in this, after its learning rate, as
  :func:`lora_rite` does its own.

  Args:
    inner: the transformation (a whole chain, learning rate included).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` with ``inner``'s state.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import lora_rite_optax as lro
    >>> params = {'lora_a': jnp.full((6, 2), 0.5, jnp.float16),
    ...           'lora_b': jnp.full((2, 4), 0.5, jnp.float16)}
    >>> tx = optax.apply_if_finite(lro.with_gradients_dtypes(optax.chain(
    ...     lro.scale_by_lora_rite(), optax.scale(-1e-3))), 3)
    >>> grads = {k: 0.1 * jnp.ones_like(v) for k, v in params.items()}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates['lora_a'].dtype
    dtype('float16')
  """
  return cast_to_gradients_dtypes(inner)


def _widened_leaf(x):
  if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(compute_dtype(x.dtype))
  return x


def with_stable_dtypes(tx: base.GradientTransformation
                       ) -> base.GradientTransformationExtraArgs:
  """``tx`` run in float32 on 16-bit float leaves, its state in float32.

  For an optax optimizer over LoRA factors (a LoRA+ group, ``'adam'`` and
  ``'lamb'`` of :func:`lora_rite_optax.optimizer`), so that its state is
  kept like LoRA-RITE's, ScaledAdam's and Shampoo's. optax's Adam keeps its
  moments in the params' dtype: in float16 its eps = 1e-8 rounds to 0, and
  an exactly zero gradient entry (all of ``lora_a``'s while ``lora_b`` is
  0) made its step 0/0; in bfloat16 ``0.999 * nu == nu`` (8 bits of
  mantissa), so the second moment never decayed, only grew. Here every
  float leaf under 32 bits runs in float32 and the updates are cast back to
  the gradients' dtypes. And a float32 hyperparameter
  (``inject_hyperparams(..., hyperparam_dtype=jnp.float32)``, the advice
  for bfloat16) turned bfloat16 moments and updates float32, which
  ``optax.apply_if_finite`` refuses: the state keeps the dtypes ``init``
  gave it, the updates take the gradients'.
  """
  widen = lambda tree: jax.tree.map(_widened_leaf, tree)
  inner = base.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_state = inner.update(
        widen(updates), state, None if params is None else widen(params),
        **extra_args)
    return new_updates, jax.tree.map(
        lambda new, old: jnp.asarray(new).astype(jnp.asarray(old).dtype),
        new_state, state)

  return cast_to_gradients_dtypes(
      base.GradientTransformationExtraArgs(
          lambda params: tx.init(widen(params)), update_fn))

"""The dtypes optimizers compute and return their steps in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from optax._src import base


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
  and `then_cast_to_params_dtype` casts it after the rate.
  """
  if jnp.finfo(param_dtype).maxexp < jnp.finfo(jnp.float32).maxexp:
    return jnp.dtype(wide_dtype)
  return jnp.dtype(param_dtype)


def then_cast_to_params_dtype(tx: base.GradientTransformation,
                              who: str) -> base.GradientTransformation:
  """``tx``, its updates cast to the params' dtypes (same state).

  LoRA-RITE's and ScaledAdam's preconditioned steps of float16 params are
  kept in float32 (before the learning rate they can exceed float16's
  range); after the rate they fit, and ``optax.apply_if_finite``'s rejected
  branch (zeros like the gradients) needs the two to agree. Wrapping the
  chain's last step, rather than adding one, keeps the state's tree (and
  so the checkpoints made before).
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(f'{who}: update() needs params (the current '
                       'factors): call tx.update(grads, state, params).')
    updates, state = tx.update(updates, state, params)
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates,
                        params), state

  return base.GradientTransformation(tx.init, update_fn)

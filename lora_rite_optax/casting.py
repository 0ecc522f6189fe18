"""The last step of an optimizer whose updates leave the params' dtype."""

from __future__ import annotations

import jax
from optax._src import base


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

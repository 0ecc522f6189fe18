"""optax's AdamW and Lamb, with no step (not 0/0) where a gradient was always 0.

A LoRA pair starts with ``lora_b = 0``, so ``lora_a``'s gradient is exactly 0
until ``lora_b`` moves. Adam's ``m / (sqrt(v) + eps)`` is then 0/0 where eps
is 0, or rounds to 0 in float16 (``optax.inject_hyperparams`` casts it to
the params' dtype), and the NaN stays in the factor for good. Everything else
is optax's own transform, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lora_rite_optax import placement


def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None,
                  *, nesterov=False) -> optax.GradientTransformation:
  """``optax.scale_by_adam``, and 0 where it computed 0/0.

  That is where the second moment is 0 and so is the first (every gradient
  of that entry so far was 0): no step, as with any eps > 0. Everything
  else is optax's own result, bit for bit: a gradient below ~1e-21 has a
  second moment that underflows to 0 but a first moment that does not,
  and its step stays as optax computes it. A NaN gradient makes the second
  moment NaN, not 0, and stays NaN (``apply_if_finite`` still sees it).
  """
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                              mu_dtype=mu_dtype, nesterov=nesterov)

  def update_fn(updates, state, params=None):
    new_updates, new_state = inner.update(updates, state, params)
    new_updates = jax.tree.map(
        lambda u, v: jnp.where((v == 0) & jnp.isnan(u), jnp.zeros_like(u), u),
        new_updates, new_state.nu)
    return new_updates, new_state

  # The count beside the params (a jitted step on a mesh had compiled twice).
  return optax.GradientTransformation(
      placement.count_beside_params(inner).init, update_fn)


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
          mu_dtype=None, weight_decay=1e-4, mask=None, *, nesterov=False
          ) -> optax.GradientTransformation:
  """``optax.adamw`` (the same chain and state) with :func:`scale_by_adam`."""
  return optax.chain(
      scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                    mu_dtype=mu_dtype, nesterov=nesterov),
      optax.add_decayed_weights(weight_decay, mask),
      placement.scale_by_learning_rate(learning_rate))


def lamb(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0,
         weight_decay=0.0, mask=None) -> optax.GradientTransformation:
  """``optax.lamb`` (the same chain and state) with :func:`scale_by_adam`."""
  return optax.chain(
      scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
      optax.add_decayed_weights(weight_decay=weight_decay, mask=mask),
      optax.scale_by_trust_ratio(),
      placement.scale_by_learning_rate(learning_rate))

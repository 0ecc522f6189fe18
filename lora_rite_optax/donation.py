"""Donating ``jax.jit`` whose outputs reuse the buffer of the input they return.

LoRA-RITE's state keeps each factor as it was at the last update
(``X_{t-1}``): a train step returns its input params unchanged as the new
``state.basis`` and writes the new params. ``jax.jit`` pairs donated inputs
with outputs of the same shape and dtype in order (the k-th such output gets
the k-th such input's buffer), so a step ``(params, state) -> (params,
state)`` gets ``params -> params`` and ``basis -> basis``: XLA then has to
copy the params into the old basis buffer before overwriting them, and its
copy insertion, which orders only by data dependencies, adds two more
copies per factor (three in all, measured on XLA:CPU). Giving the returned
params' buffer to ``basis`` and the old basis buffer to the new params costs
nothing: :func:`donating_jit` reorders the outputs so that ``jax.jit``'s
in-order pairing makes exactly that assignment, and puts them back in order
after the call. Optimizers whose state returns no input (Adam) keep the
usual pairing, which is already copy-free for them (reversing it is not:
XLA then copies every buffer). The pairing described holds from jax 0.7
on (checked on 0.7 to 0.10); on jax 0.6, over a mesh, a copy of each factor
shard stays (results are the same).

That is XLA:CPU. On an H200 the reordered LoRA-RITE step ran twice as long
as under ``jax.jit``'s pairing, copies and all, so the reordering is applied
on CPU only unless asked for (``reorder_outputs``).
"""

from __future__ import annotations

import functools
import operator
import threading
import typing
from typing import Any, Callable, Protocol, Sequence

import jax

from lora_rite_optax import checks
from lora_rite_optax import placement

_JIT_ARGS_NOT_SUPPORTED = ('static_argnums', 'static_argnames',
                           'donate_argnames')


def _key(x) -> tuple:
  """What ``jax.jit`` pairs donated buffers with outputs by."""
  aval = jax.typeof(x)  # also for a constant output such as 0.0
  return (tuple(aval.shape), aval.dtype)


def _plan(donated: Sequence[Any], outs: Sequence[Any]) -> list[int]:
  """The order to emit ``outs`` in (``order[e]`` = output index).

  Per shape and dtype, output ``j`` would get donated input ``j``; an output
  that *is* a donated input (the same traced value) swaps with the output
  holding that input instead, so it gets its own buffer back.
  """
  by_key: dict[tuple, list[int]] = {}
  for j, x in enumerate(outs):
    by_key.setdefault(_key(x), []).append(j)
  inputs_by_key: dict[tuple, list[int]] = {}
  for i, x in enumerate(donated):
    inputs_by_key.setdefault(_key(x), []).append(i)
  order = list(range(len(outs)))
  for key, js in by_key.items():
    ins = inputs_by_key.get(key, [])
    rank_of_input = {id(donated[i]): r for r, i in enumerate(ins)}
    # assign[t]: the rank (in `ins`) of the buffer output js[t] gets; ranks
    # past len(ins) mean no buffer.
    assign = list(range(len(js)))
    holder = {r: t for t, r in enumerate(assign)}
    forced = set()
    for t, j in enumerate(js):
      r = rank_of_input.get(id(outs[j]))
      if r is None or r in forced or assign[t] == r:
        if r is not None:
          forced.add(r)
        continue
      u = holder.get(r)
      if u is None:  # an input past the outputs' count: in-order pairing
        continue     # cannot give it to this output
      assign[t], assign[u] = assign[u], assign[t]
      holder[assign[t]], holder[assign[u]] = t, u
      forced.add(r)
    emitted = [js[t] for t in sorted(range(len(js)), key=assign.__getitem__)]
    for slot, j in zip(js, emitted):
      order[slot] = j
  return order


class _Lowered:
  """``jax.stages.Lowered`` of the reordered function; ``compile()`` gives a
  callable with the original output structure."""

  def __init__(self, lowered, restore):
    self._lowered, self._restore = lowered, restore

  def as_text(self, *a, **kw):
    return self._lowered.as_text(*a, **kw)

  # Those that do not describe the outputs, whose order here is reordered.
  def compiler_ir(self, *a, **kw):
    return self._lowered.compiler_ir(*a, **kw)

  def cost_analysis(self):
    return self._lowered.cost_analysis()

  def compile(self, *a, **kw):
    compiled = self._lowered.compile(*a, **kw)

    @functools.wraps(compiled)
    def call(*args):
      return self._restore(compiled(*args))

    # What a user inspects a compiled step by (HLO, buffer sizes, flops).
    call.as_text = compiled.as_text
    call.memory_analysis = compiled.memory_analysis
    call.cost_analysis = compiled.cost_analysis
    return call


def _aval_key(x) -> tuple:
  """(shape, dtype, weak_type) of an argument, as jit sees it.

  An array's or tracer's own ``aval`` where it has one: ``jax.typeof`` on
  each of a step's ~1000 leaves had cost 1.3 ms a call. Others (numpy
  arrays, Python numbers) go through ``jax.typeof``: 2.0 -> weak f32.
  """
  a = getattr(x, 'aval', None)
  if a is None:
    a = jax.typeof(x)
  return a.shape, a.dtype, a.weak_type


def _platform(leaves, jit_kwargs: dict) -> str:
  """The platform a call with these argument leaves runs on, as jit places
  it.

  That of the first committed array among ``leaves``; else of the concrete
  ``in_shardings`` or ``out_shardings`` passed; else of
  ``jax_default_device`` when set; else the default backend. Under an
  outer jit the arguments are tracers and the default backend decides.
  Only speed depends on the answer, never the results.
  """
  def platform_of(sharding):
    try:
      return next(iter(sharding.device_set)).platform
    except (AttributeError, ValueError, StopIteration):  # abstract mesh, spec
      return None

  for leaf in leaves:
    if isinstance(leaf, jax.core.Tracer) or not getattr(leaf, 'committed',
                                                        False):
      continue
    found = platform_of(getattr(leaf, 'sharding', None))
    if found:
      return found
  for name in ('in_shardings', 'out_shardings'):
    for sharding in jax.tree.leaves(jit_kwargs.get(name)):
      found = platform_of(sharding)
      if found:
        return found
  device = _default_device()  # a Device or a platform name
  if device is not None:
    return getattr(device, 'platform', device)
  return jax.default_backend()


def _default_device():
  """``jax_default_device`` (a Device, a platform name, or None)."""
  return jax.config.jax_default_device


class DonatingJitted(Protocol):
  """What :func:`donating_jit` returns: the jitted function, with the
  methods of ``jax.jit``'s result that a training loop uses."""

  def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

  def lower(self, *args: Any, **kwargs: Any) -> Any:
    """``jax.jit(...).lower``: its ``.compile()`` runs as the call."""

  def eval_shape(self, *args: Any) -> Any:
    """``jax.eval_shape`` of the function."""

  def clear_cache(self) -> None:
    """Drops the compiled executables (and the output orders chosen)."""

  def reorders_outputs(self, *args: Any) -> bool:
    """Whether a call with these arguments reorders the outputs."""


def donating_jit(fun: Callable[..., Any], *,
                 donate_argnums: int | Sequence[int],
                 out_shardings: Any = None,
                 reorder_outputs: bool | None = None,
                 **jit_kwargs) -> DonatingJitted:
  """``jax.jit(fun, donate_argnums=...)``, with returned inputs kept in place.

  Outputs that return a donated input unchanged (LoRA-RITE's ``basis``, the
  params as they were) are given that input's buffer, and the outputs whose
  buffer that was get the freed one, so XLA copies nothing. Results are
  exactly those of ``jax.jit``; only which donated buffer holds which output
  changes (with ``out_shardings``, applied as sharding constraints, XLA
  may round differently). Unused arguments are kept (``keep_unused``):
  an argument must not share a buffer with a donated one even where
  ``fun`` does not read it. On XLA:CPU this removed three copies of every
  factor from each LoRA-RITE step on the Gemma-2B LoRA tree (79 ms instead
  of 105 ms, see
  ``benchmarks/optimizer_step.py``). On an H200 (jax 0.11.2) the same
  reordering made the step slower, 20.5 ms against 9.6 ms under
  ``jax.jit``, so by default it is applied on CPU only; elsewhere the step
  keeps ``jax.jit``'s in-order pairing (the buffer aliasing of
  ``jax.jit(..., keep_unused=True)``, tested on CPU). In a later run on
  the H200 that step still timed 3-4 ms slower than plain ``jax.jit``
  (16.9 against 13.4 ms), in a benchmark whose fixed row order may account
  for it; unsettled (README, "On a GPU"). TPUs are not measured: they get
  ``jax.jit``'s pairing too, by extrapolation from the GPU.

  Args:
    fun: the step, e.g. ``(params, opt_state, batch) -> (params, opt_state)``;
      positional arguments only.
    donate_argnums: as in ``jax.jit``.
    out_shardings: as in ``jax.jit`` (a prefix of the output tree); applied
      with ``jax.lax.with_sharding_constraint`` over Auto mesh axes and
      ``jax.sharding.reshard`` over Explicit ones (each refuses the
      other's; Explicit ones need jax 0.10, and an older jax refuses them in
      one line). On a mesh that mixes both, outputs placed over its Auto
      axes come back spelt without trailing ``None``s, another jit cache
      key for the next call: one more compile than ``jax.jit``.
    reorder_outputs: give returned inputs their own buffers (True), keep
      ``jax.jit``'s in-order pairing (False), or decide at each call by the
      platform the call runs on (None: reorder on CPU only).
    **jit_kwargs: other ``jax.jit`` arguments (``in_shardings``, ...); static
      arguments are not supported.

  Returns:
    A function with ``fun``'s signature and outputs, a ``lower(*args)``
    (``as_text``, ``compiler_ir``, ``cost_analysis``) whose ``compile()``
    is callable the same way (``as_text``, ``memory_analysis``,
    ``cost_analysis``), ``eval_shape(*args)``, ``clear_cache()``, and
    ``reorders_outputs(*args)``: whether a call with ``args`` reorders (so
    that a benchmark or log can say which buffer pairing it ran). Other
    attributes of ``jax.jit``'s stages are not there; it pickles only by
    name (bound to ``fun``'s own module-level name), and ``jax.export``
    takes ``jax.jit(fun)`` instead.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_rite_optax as lro
    >>> params = {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.ones((2, 4))}
    >>> tx = lro.lora_rite(1e-2)
    >>> def step(params, state):
    ...   grads = jax.tree.map(jnp.ones_like, params)
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> step = lro.donating_jit(step, donate_argnums=(0, 1))
    >>> params, state = step(params, tx.init(params))
    >>> params['lora_a'].shape
    (8, 2)
  """
  if not callable(fun):  # else it failed at the first call, inside here
    raise TypeError(f'donating_jit: fun must be callable, got '
                    f'{type(fun).__name__}.')
  for name in _JIT_ARGS_NOT_SUPPORTED:
    if jit_kwargs.get(name) is not None:
      raise TypeError(f'donating_jit: {name} is not supported.')
  # jax pairs donated leaves in argument order, whatever order these are in.
  # Any integer, numpy's too, as jax.jit takes.
  many = donate_argnums if isinstance(donate_argnums, (tuple, list)) else (
      donate_argnums,)
  if not all(checks.is_integer(n) for n in many):
    raise TypeError(f'donating_jit: donate_argnums must be an int or a '
                    f'sequence of ints, got {donate_argnums!r}.')
  donate = tuple(sorted({operator.index(n) for n in many}))
  if not (reorder_outputs is None or isinstance(reorder_outputs, bool)):
    # 'yes' had been a KeyError at the first call.
    raise TypeError(f'donating_jit: reorder_outputs must be True, False or '
                    f'None, got {reorder_outputs!r}.')
  if any(n < 0 for n in donate):
    # The jitted wrapper takes *args: jax.jit would ignore negative indices
    # and donate nothing, silently.
    raise TypeError(f'donating_jit: donate_argnums must be >= 0, got '
                    f'{donate}.')
  # Unused inputs would otherwise be pruned from the compiled computation,
  # shifting the in-order pairing the plan relies on.
  jit_kwargs.setdefault('keep_unused', True)
  # The emitted order and output structure of each call signature, read
  # after each call to put the outputs back. A trace stores under the key
  # its call computed (`tracing.key`): one computed inside the trace had
  # missed for a pytree whose aux data compares by identity, a KeyError
  # after the inputs were donated. The first order stored for a key stays:
  # jax.jit retraces a signature under another mesh or config, and a second
  # order had been applied to the first trace's executable, swapping outputs.
  plans: dict[Any, tuple[list[int], Any]] = {}
  tracing = threading.local()

  def signature(leaves, treedef) -> tuple:
    """What a trace is made for, as its call sees it."""
    return treedef, tuple(map(_aval_key, leaves))

  def traced(reorder: bool):
    def reordered(*args):
      outs = fun(*args)
      leaves, treedef = jax.tree.flatten(outs)
      key = tracing.key
      for j, x in enumerate(leaves):
        try:
          jax.typeof(x)
        except TypeError:  # jax's own words had called it an argument
          raise TypeError(
              f'donating_jit: output {j} of {getattr(fun, "__name__", fun)} '
              f'is of type {type(x).__name__}, not a JAX type.') from None
      if key in plans:
        order, first = plans[key]
        if first != treedef:
          raise ValueError(
              f'donating_jit: {getattr(fun, "__name__", fun)} returned '
              'another output structure for arguments of the same shapes '
              '(under another mesh or config?); use jax.jit for it.')
      elif reorder:
        donated = [x for n in donate for x in jax.tree.leaves(args[n])]
        order = _plan(donated, leaves)
      else:
        order = list(range(len(leaves)))
      if out_shardings is not None:
        shardings = jax.tree.leaves(
            jax.tree.map(lambda s, sub: [s] * len(jax.tree.leaves(sub)),
                         out_shardings, outs, is_leaf=lambda x: x is None),
            is_leaf=lambda x: x is None)
        leaves = [x if s is None
                  else placement.constrain(x, s, 'donating_jit')
                  for x, s in zip(leaves, shardings)]
      plans.setdefault(key, (order, treedef))
      return [leaves[j] for j in order]
    # Named as the step: compile logs, cache-miss explanations, profiles
    # and the persistent cache's files had called every step 'reordered'.
    reordered.__name__ = reordered.__qualname__ = getattr(
        fun, '__name__', 'step')
    return jax.jit(reordered, donate_argnums=donate, **jit_kwargs)

  jitted = {True: traced(True), False: traced(False)}

  def choose(leaves) -> bool:
    if reorder_outputs is not None:
      return reorder_outputs
    return _platform(leaves, {**jit_kwargs, 'out_shardings': out_shardings}
                     ) == 'cpu'

  def restorer(key, plan=None):
    def restore(flat):
      order, treedef = plans[key] if plan is None else plan
      leaves = [None] * len(flat)
      for e, j in enumerate(order):
        leaves[j] = flat[e]
      return jax.tree.unflatten(treedef, leaves)
    return restore

  def check(args, kwargs):
    if kwargs:
      raise TypeError('donating_jit: positional arguments only; got '
                      f'keyword(s) {", ".join(sorted(kwargs))}.')
    if donate and donate[-1] >= len(args):  # sorted, none negative
      raise TypeError(f'donating_jit: donate_argnums={donate}, but the call '
                      f'has only {len(args)} positional argument(s).')

  def prepare(args, kwargs) -> tuple[bool, tuple]:
    """(whether to reorder, the plan's key), from one flattening of the
    arguments: this runs at every call, over ~1000 leaves for a model's
    LoRA factors and state."""
    check(args, kwargs)
    leaves, treedef = jax.tree.flatten(args)
    reorder = choose(leaves)
    return reorder, (reorder, signature(leaves, treedef))

  def run(method, key, args):
    """``method(*args)`` with ``key`` where a trace it makes reads it."""
    outer = getattr(tracing, 'key', None)
    tracing.key = key
    try:
      return method(*args)
    finally:
      tracing.key = outer

  @functools.wraps(fun)
  def call(*args, **kwargs):
    # The signature is taken before the call: donation deletes the inputs.
    reorder, key = prepare(args, kwargs)
    return restorer(key)(run(jitted[reorder], key, args))

  def lower(*args, **kwargs):
    reorder, key = prepare(args, kwargs)
    lowered = run(jitted[reorder].lower, key, args)
    # Its plan now: a clear_cache() between lower and a call of the compiled
    # step had been a KeyError after the inputs were donated.
    plan = plans[key]
    return _Lowered(lowered, restorer(key, plan))

  def clear_cache():
    for j in jitted.values():
      j.clear_cache()
    plans.clear()

  call.lower = lower
  call.eval_shape = lambda *args: jax.eval_shape(fun, *args)
  call.clear_cache = clear_cache
  call.reorders_outputs = lambda *args: choose(jax.tree.leaves(args))
  # As jax.jit's private counter, for tests that a step does not recompile.
  call._cache_size = lambda: sum(  # pylint: disable=protected-access
      j._cache_size() for j in jitted.values())
  return typing.cast(DonatingJitted, call)

"""Where an optimizer's initial state lives: as the params it is made for.

``jnp.zeros(shape)`` lands on the default device whatever the params'
sharding. ``optax.adam``'s ``init`` (``zeros_like``) keeps each moment on its
param's devices, and a user who calls ``tx.init`` on params sharded over a
mesh (``nnx.Optimizer`` does) expects the same of every optimizer here, not
a whole copy of the state on device 0 until the first jitted update.
Traced leaves (``jax.eval_shape``, ``jax.jit(tx.init)``) are placed only
over Explicit mesh axes, where their type carries their sharding; on Auto
axes a trainer derives the state's shardings itself.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec


def _placed(leaf: Any) -> jax.sharding.Sharding | None:
  """``leaf``'s sharding where it is a concrete array placed on a mesh, or
  committed to a device (``jax.device_put`` to a device: the state had gone
  to the default device, and the first jitted update moved it).

  Only those: zeros committed to a single device, where the params were
  not, made a jitted step compile again at its second call (its outputs
  are uncommitted).
  """
  if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
    sharding = leaf.sharding
    # The spec as given (('fsdp', None) stays so): a jitted step writes the
    # state that follows its params with their spec, and another spelling
    # of the same placement is another jit cache key.
    if isinstance(sharding, NamedSharding) or leaf.committed:
      return sharding
  return None


def zeros_like(leaf: Any, dtype) -> jax.Array:
  """Zeros of ``leaf``'s shape in ``dtype``, placed as ``leaf`` is.

  A traced leaf over Explicit mesh axes carries its sharding in its type
  (``jax.eval_shape``, ``jax.jit(tx.init)``): ``jnp.zeros_like`` keeps it,
  where plain zeros had come out replicated (or on device 0 with no mesh
  set): every device then held each factor-sized moment whole, and a step
  fed them compiled again.
  """
  if _explicit(leaf) is not None and isinstance(leaf, jax.core.Tracer):
    return jnp.zeros_like(leaf, dtype=dtype)
  return jnp.zeros(leaf.shape, dtype, device=_placed(leaf))


def stacked_axis_sharding(factors: Sequence[Any], batch_axes: Sequence[int],
                          slices: int):
  """The mesh axes that split the layers of every one of ``factors``
  (stacked along their first ``batch_axes``, only the first of them split,
  as the update's merged slice axis then is), where the ``slices`` layers
  of them all divide evenly over those axes; else None (XLA chooses).
  None over Explicit mesh axes too: there the update keeps the ``r x r``
  statistics replicated (`replicated`)."""
  found = None
  for factor, axes in zip(factors, batch_axes):
    sharding = _placed(factor)
    if axes < 1 or not isinstance(sharding, NamedSharding) or (
        _has_explicit_axes(sharding.mesh)):
      return None
    spec = tuple(sharding.spec) + (None,) * (axes - len(sharding.spec))
    entry = spec[0]
    if (entry is None or any(a is not None for a in spec[1:axes]) or
        (found is not None and entry != found)):
      return None
    found = entry
  if found is None:
    return None
  names = found if isinstance(found, tuple) else (found,)
  mesh = _placed(factors[0]).mesh
  size = int(np.prod([mesh.shape[n] for n in names]))
  return found if slices % size == 0 else None


def zeros_beside(shape, dtype, like: Iterable[Any],
                 split_axis: tuple[int, Any] | None = None) -> jax.Array:
  """Zeros of ``shape`` beside ``like``: replicated over the mesh of the
  first of ``like`` placed on one, or on the device it is committed to
  (else where ``jnp.zeros`` puts them): the small statistics of factors
  sharded over a mesh, and the step count. ``split_axis`` ``(axis, mesh
  axes)``: split that axis over those mesh axes instead (None mesh axes:
  replicated), as stacked layers' statistics are."""
  for leaf in like:
    sharding = _placed(leaf)
    if isinstance(sharding, NamedSharding) and split_axis is not None and (
        split_axis[1] is not None):
      # Spelt as a step writes it on Auto axes: no trailing Nones.
      spec = [None] * split_axis[0] + [split_axis[1]]
      return jnp.zeros(shape, dtype, device=NamedSharding(
          sharding.mesh, PartitionSpec(*spec)))
    if isinstance(sharding, NamedSharding):
      # Spelt as a jitted step writes a replicated output: P() on Auto
      # axes, one None per axis on Explicit ones (P() there had been
      # another cache key, and the second call compiled again).
      spec = (PartitionSpec(*(None,) * len(shape))
              if _has_explicit_axes(sharding.mesh) else PartitionSpec())
      return jnp.zeros(shape, dtype,
                       device=NamedSharding(sharding.mesh, spec))
    if sharding is not None:
      return jnp.zeros(shape, dtype, device=sharding)
  return jnp.zeros(shape, dtype)


def _explicit(leaf: Any):
  """``leaf``'s sharding where its mesh has Explicit axes (``jax.make_mesh``'s
  default since jax 0.9); else None (Auto axes: the partitioner chooses)."""
  if not isinstance(leaf, (jax.Array, jax.core.Tracer)):
    return None  # None, optax.MaskedNode, a NumPy array: on no mesh
  sharding = getattr(jax.typeof(leaf), 'sharding', None)
  mesh = getattr(sharding, 'mesh', None)
  if mesh is None or mesh.empty or not _has_explicit_axes(mesh):
    return None
  return sharding


def _has_explicit_axes(mesh) -> bool:
  return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


# What LoRA-RITE, ScaledAdam and Shampoo do over Explicit mesh axes, and
# donating_jit's out_shardings there, takes jax 0.10's sharding API
# (jax.sharding.reshard, reshape's out_sharding, is_equivalent_to under an
# AbstractMesh): jax 0.6 has none of the first two, and 0.7-0.9 failed
# inside a jitted update with 'internal_device_list is not implemented for
# AbstractMesh'. Adam, LoRA+ and Lamb need none of it.
_EXPLICIT_AXES_JAX = (0, 10)


def _jax_version() -> tuple[int, ...]:
  return tuple(int(p) for p in jax.__version__.split('.')[:2])


def _older_jax_refuses(who: str, what: str) -> ValueError:
  return ValueError(
      f'{who}: {what} on Explicit mesh axes need jax 0.10 or newer (this is '
      f'jax {jax.__version__}); make the mesh with Auto axes '
      '(axis_types=(jax.sharding.AxisType.Auto,) * n), or upgrade jax.')


def require_explicit_api(who: str, leaves: Iterable[Any]) -> None:
  """One line where ``leaves`` are over Explicit mesh axes and this jax is
  older than 0.10 (see ``_EXPLICIT_AXES_JAX``)."""
  if _jax_version() >= _EXPLICIT_AXES_JAX:
    return
  if any(_explicit(leaf) is not None for leaf in leaves):
    raise _older_jax_refuses(who, 'params')


def explicitly_sharded(leaf: Any, axis: int | None = None) -> bool:
  """Whether ``leaf`` is split over an Explicit mesh: along ``axis``, or
  along any axis (None)."""
  sharding = _explicit(leaf)
  if sharding is None:
    return False
  spec = tuple(sharding.spec) + (None,) * (jnp.ndim(leaf) - len(sharding.spec))
  if axis is not None:
    return spec[axis] is not None
  return any(a is not None for a in spec)


def stacks_split_apart(x: Any, y: Any, axes: int) -> bool:
  """Whether the ``axes`` stacked axes of factors ``x`` and ``y`` are split
  over an Explicit mesh in a way a batched product over their merged
  stacked axes cannot take: the first over different mesh axes (one split
  and the other whole is fine), or any after the first (merging them into
  one is refused)."""
  specs = []
  for leaf in (x, y):
    sharding = _explicit(leaf)
    spec = tuple(sharding.spec) if sharding is not None else ()
    specs.append((spec + (None,) * axes)[:axes])
  (a, *a_rest), (b, *b_rest) = specs
  return (any(s is not None for s in a_rest + b_rest) or
          (a is not None and b is not None and a != b))


def reduced_sharding(x: Any, kept: Sequence[int]) -> NamedSharding | None:
  """The ``out_sharding`` of a product contracting ``x``'s long axis into
  ``r x r`` results: the axes ``kept`` (stacked layers) as in ``x``, the
  rest replicated. None under Auto axes; Explicit ones refuse to guess (a
  ShardingTypeError at the first update)."""
  sharding = _explicit(x)
  if sharding is None:
    return None
  spec = tuple(sharding.spec) + (None,) * (jnp.ndim(x) - len(sharding.spec))
  # On the factor's mesh: a bare spec needs jax.set_mesh around the call.
  return NamedSharding(sharding.mesh,
                       PartitionSpec(*(spec[d] for d in kept), None, None))


class UnplacedReshape(ValueError):
  """A reshape whose result Explicit mesh axes cannot hold
  (`reshape_sharding`)."""


def reshape_sharding(x: Any, shape: Sequence[int]) -> NamedSharding | None:
  """The ``out_sharding`` of ``x.reshape(shape)`` over Explicit mesh axes
  (which refuse to guess it); None elsewhere.

  Axes only merge (``(heads, head_dim, r) -> (1, heads * head_dim, r)``) or
  split (back again): each group keeps its first axis's mesh axes, which
  needs every other axis of the group whole. Raises `UnplacedReshape`
  (without the optimizer's name: the caller adds it) where that is not so.
  """
  sharding = _explicit(x)
  if sharding is None:
    return None
  old = list(x.shape)
  spec = list(sharding.spec) + [None] * (len(old) - len(sharding.spec))
  new_spec = [None] * len(shape)
  if 0 in old or 0 in shape:  # nothing to place, and no sizes to match
    return NamedSharding(sharding.mesh, PartitionSpec(*new_spec))
  i = j = 0
  while i < len(old) or j < len(shape):
    # Axes of size 1 hold nothing (a size-1 axis split over a mesh axis of
    # size > 1 cannot be placed anyway).
    if i < len(old) and old[i] == 1 and (j == len(shape) or shape[j] != 1):
      i += 1
      continue
    if j < len(shape) and shape[j] == 1 and (i == len(old) or old[i] != 1):
      j += 1
      continue
    i0, j0 = i, j
    n_old, n_new = old[i], shape[j]
    i, j = i + 1, j + 1
    while n_old != n_new:
      if n_old < n_new:
        n_old *= old[i]
        i += 1
      else:
        n_new *= shape[j]
        j += 1
    inner = [k for k in range(i0 + 1, i) if spec[k] is not None]
    if inner:
      raise UnplacedReshape(
          f'would merge an axis split over {spec[inner[0]]!r} into the axis '
          'before it')
    entry = spec[i0]
    if entry is not None:
      names = entry if isinstance(entry, tuple) else (entry,)
      size = int(np.prod([sharding.mesh.shape[n] for n in names]))
      if shape[j0] % size:
        raise UnplacedReshape(
            f'would make an axis split {size} ways over {entry!r} '
            f'{shape[j0]} long')
    new_spec[j0] = entry
  return NamedSharding(sharding.mesh, PartitionSpec(*new_spec))


def reshape(x: jax.Array, shape: Sequence[int]) -> jax.Array:
  """``x.reshape(shape)``, naming its sharding where Explicit mesh axes need
  it (`reshape_sharding`). A NumPy array (a user's float64 params) stays
  one: its reshape takes no sharding."""
  sharding = reshape_sharding(x, shape)
  if sharding is None:
    return x.reshape(shape)
  return x.reshape(shape, out_sharding=sharding)


def as_matrices(who: str, name: str, to_matrices: Callable[[Any], Any],
                x: Any) -> Any:
  """``to_matrices(x)`` (a factor's view as a stack of matrices), or one
  line naming ``x`` (as ``name``) where its Explicit mesh axes cannot hold
  that view (`UnplacedReshape`)."""
  try:
    return to_matrices(x)
  except UnplacedReshape as e:
    spec = tuple(_explicit(x).spec)
    spec += (None,) * (x.ndim - len(spec))
    raise ValueError(
        f'{who}: {name} {tuple(x.shape)}, split as {PartitionSpec(*spec)}: '
        f'its view as matrices {e}; put those mesh axes on the first of the '
        'merged axes, or make the mesh with Auto axes.') from None


def batch_like(k: jax.Array, x: Any, axes: int = 1) -> jax.Array:
  """``k`` split along its first ``axes`` axes as ``x`` is, the rest whole,
  where ``x`` is over Explicit mesh axes (a batched product refuses batch
  axes sharded two ways, and an elementwise one takes the sharding of
  either operand); else ``k``. From a replicated ``k`` this is a local
  slice."""
  sharding = _explicit(x)
  if sharding is None:
    return k
  spec = (tuple(sharding.spec) + (None,) * axes)[:axes]
  want = NamedSharding(sharding.mesh, PartitionSpec(
      *spec, *(None,) * (k.ndim - axes)))
  have = _explicit(k)
  if have is not None and have.is_equivalent_to(want, k.ndim):
    return k
  return jax.sharding.reshard(k, want)


def replicated(x: jax.Array) -> jax.Array:
  """``x`` whole on every device of its Explicit mesh (a small result, such
  as an ``r x r`` Gram kept split along stacked layers); else ``x``."""
  sharding = _explicit(x)
  if sharding is None:
    return x
  return jax.sharding.reshard(x, NamedSharding(
      sharding.mesh, PartitionSpec(*(None,) * x.ndim)))


def constrain(x: jax.Array, sharding: jax.sharding.Sharding,
              who: str) -> jax.Array:
  """``x`` placed as ``sharding`` inside a jitted function, as ``jax.jit``'s
  ``out_shardings`` would: the spec's Explicit mesh axes by
  `jax.sharding.reshard`, its Auto ones by ``with_sharding_constraint``
  (each refuses the other's axes; a mesh may mix both)."""
  if isinstance(sharding, PartitionSpec):
    # A bare spec names the axes of the mesh set around the call, as
    # jax.jit's out_shardings take it; on an all-Explicit mesh
    # with_sharding_constraint would only assert the spec, not place it.
    mesh = getattr(jax.sharding, 'get_abstract_mesh', lambda: None)()
    if mesh is not None and not mesh.empty and _has_explicit_axes(mesh):
      sharding = NamedSharding(mesh, sharding)
  if not (isinstance(sharding, NamedSharding) and
          _has_explicit_axes(sharding.mesh)):
    return jax.lax.with_sharding_constraint(x, sharding)
  if _jax_version() < _EXPLICIT_AXES_JAX:
    raise _older_jax_refuses(who, 'out_shardings')
  mesh = sharding.mesh
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
              if t == jax.sharding.AxisType.Explicit}
  for entry in sharding.spec:
    kinds = [n in explicit for n in
             (entry if isinstance(entry, tuple) else (entry,))]
    if False in kinds and True in kinds[kinds.index(False):]:
      # Placed in two steps, the Explicit axes first, the devices would
      # come out in another order than asked.
      raise ValueError(
          f'{who}: out_shardings entry {entry!r} names an Auto mesh axis '
          'before an Explicit one, which cannot be placed here; name the '
          'Explicit axes first, or use jax.jit.')

  def only(keep_explicit: bool) -> PartitionSpec:
    spec = []
    for entry in sharding.spec:
      names = (entry if isinstance(entry, tuple)
               else () if entry is None else (entry,))
      names = tuple(n for n in names if (n in explicit) == keep_explicit)
      spec.append(names if len(names) > 1 else names[0] if names else None)
    return PartitionSpec(*spec)

  x = jax.sharding.reshard(x, NamedSharding(mesh, only(True)))
  auto = only(False)
  if any(entry is not None for entry in auto):
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, auto))
  return x


def refuse_explicit(who: str, leaves: Iterable[Any], what: str) -> None:
  """One line for ``leaves`` sharded over Explicit mesh axes, which the
  update cannot take yet (its products contract sharded axes without
  naming their output's sharding): it had been a ShardingTypeError from
  inside it."""
  for leaf in leaves:
    if explicitly_sharded(leaf):
      raise ValueError(
          f'{who}: {what} sharded over Explicit mesh axes are not supported; '
          'make the mesh with Auto axes (jax.make_mesh(..., axis_types=(jax.'
          'sharding.AxisType.Auto,) * n), or jax.sharding.Mesh).')


def count_beside_params(
    inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` with its state's ``count`` (if it has one) beside the params.

  optax's counts land on the default device, uncommitted: on a mesh a
  jitted step then compiled again at its second call.
  """

  def init_fn(params):
    state = inner.init(params)
    # A NamedTuple's field (every tuple has a count method).
    if 'count' not in getattr(state, '_fields', ()):
      return state  # no count (a constant rate's EmptyState)
    return state._replace(count=zeros_beside(
        (), state.count.dtype, jax.tree.leaves(params)))

  return optax.GradientTransformation(init_fn, inner.update)


def scale_by_learning_rate(learning_rate, *, flip_sign: bool = True):
  """``optax.scale_by_learning_rate``, a schedule's count beside the params
  (`count_beside_params`)."""
  return count_beside_params(
      optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign))

"""Finding the (lora_a, lora_b) pairs of a pytree, and their matrix views.

Every LoRA optimizer here works on pairs of factors whose product is the
adapter's weight delta. A :class:`LoraLayout` says how to recognise a pair and
where its rank axis is; :func:`find_lora_pairs` returns the pairs of a tree;
:func:`to_matrix` / :func:`from_matrix` convert a factor to and from the
rank-last matrix view ``(slices, N, r)`` the algorithms use.

The default layout is the Flax NNX ``nnx.LoRA`` convention: a pair is any node
holding both keys ``lora_a`` and ``lora_b``, ``lora_a`` has the rank on its
last axis, ``lora_b`` on its first, and ``delta W = lora_a @ lora_b``
contracted over the rank. Factors may have more than two dimensions (Gemma's
einsum factors ``lora_a (D, r)`` with ``lora_b (r, N, H)``): the non-rank axes
are flattened into ``N``. Leading ``batch_axes`` (scanned layers) make each
slice an independent pair.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from lora_rite_optax import checks
from lora_rite_optax import placement


@dataclasses.dataclass(frozen=True)
class LoraLayout:
  """How the two factors of a LoRA pair are named and laid out.

  Attributes:
    a_key: key of the input-side factor (``delta W = a @ b``).
    b_key: key of the output-side factor (zero at standard LoRA init).
    a_rank_axis: rank axis of ``a``, counted after the batch axes.
    b_rank_axis: rank axis of ``b``, counted after the batch axes.
    batch_axes: number of leading axes that index independent pairs (for
      example 1 for layers stacked by ``nnx.scan``).
  """
  a_key: str = 'lora_a'
  b_key: str = 'lora_b'
  a_rank_axis: int = -1
  b_rank_axis: int = 0
  batch_axes: int = 0

  def __post_init__(self) -> None:
    # Checked here, where the layout is made: a bad one had failed inside
    # find_lora_pairs with an IndexError, or (a_key == b_key) with a
    # misleading rank mismatch.
    for name in ('a_key', 'b_key'):
      value = getattr(self, name)
      if not isinstance(value, str) or not value:
        raise ValueError(f'LoraLayout: {name} must be a non-empty string, got '
                         f'{checks.shown(value)}.')
    if self.a_key == self.b_key:
      raise ValueError(f'LoraLayout: a_key and b_key must differ, both are '
                       f'{self.a_key!r}.')
    for name in ('a_rank_axis', 'b_rank_axis', 'batch_axes'):
      value = getattr(self, name)
      if not checks.is_integer(value):
        raise ValueError(f'LoraLayout: {name} must be an integer, got '
                         f'{checks.shown(value)}.')
    if self.batch_axes < 0:
      raise ValueError(f'LoraLayout: batch_axes must be >= 0, got '
                       f'{self.batch_axes}.')

  def scanned(self, batch_axes: int = 1) -> 'LoraLayout':
    """This layout with ``batch_axes`` leading axes of stacked layers."""
    return dataclasses.replace(self, batch_axes=batch_axes)


# Flax NNX (nnx.LoRA): lora_a (in..., r), lora_b (r, out...).
NNX_LAYOUT = LoraLayout()
# Hugging Face PEFT's factors: lora_A (r, in), lora_B (out, r). Keys are
# matched per path component, so a flat state dict ('model.q.lora_A.weight')
# must first be nested by splitting its keys on '.'.
PEFT_LAYOUT = LoraLayout(a_key='lora_A', b_key='lora_B', a_rank_axis=0,
                         b_rank_axis=-1)

LayoutSpec = Union[LoraLayout, Callable[[str], LoraLayout]]


class LoraPair(NamedTuple):
  """One pair found in a tree: leaf indices of its factors and their layout."""
  name: str
  a_index: int
  b_index: int
  layout: LoraLayout


class LoneFactor(NamedTuple):
  """A factor whose partner is masked out (``optax.masked``, a partition):
  its role (``'a'`` or ``'b'``), leaf index and layout."""
  name: str
  role: str
  index: int
  layout: LoraLayout


class PairedTree(NamedTuple):
  """The pairs of a tree, with what is needed to rebuild trees like it."""
  pairs: tuple[LoraPair, ...]
  treedef: Any
  num_leaves: int
  # Only with allow_unpaired: factors trained without their partner (LoRA-FA
  # freezes A), which LoRA+ and Shampoo can still treat by their role.
  lone: tuple[LoneFactor, ...] = ()


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_empty(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def flatten(tree) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
  """Leaves with their key paths (as strings); masked-out leaves are kept."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree,
                                                         is_leaf=_is_empty)
  return [(tuple(_key_name(k) for k in path), leaf)
          for path, leaf in leaves], treedef


def refuse_untrainable(who: str, path: Sequence[str], leaf,
                       factor: bool = False) -> None:
  """One error where ``leaf`` has a dtype no step can train.

  Integer leaves had failed at the first update in "data type int32 not
  inexact", naming nothing, or been stepped by 0 for good (LoRA+, Adam,
  Lamb, as optax's own). A LoRA factor must be real (its Grams and QR are);
  another param may be complex, as optax's Adam allows.
  """
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None or jnp.issubdtype(dtype,
                                     jnp.floating if factor else jnp.inexact):
    return
  name, dtype = '/'.join(path), jnp.dtype(dtype).name
  raise ValueError(
      f'{who}: factor {name!r} has dtype {dtype}; LoRA factors must be of a '
      'floating dtype.' if factor else
      f'{who}: param {name!r} has dtype {dtype}; it cannot be trained (steps '
      'need a floating dtype).')


def check_trainable(who: str, tree) -> None:
  """:func:`refuse_untrainable` for every leaf of ``tree`` (masked-out
  leaves aside)."""
  for path, leaf in flatten(tree)[0]:
    if not _is_empty(leaf):
      refuse_untrainable(who, path, leaf)


def refuse_no_params(who: str, params,
                     why: str = 'the weight decay reads them') -> None:
  """One error naming ``who`` and ``why`` where ``update`` was given no
  params (optax's weight decay reads them, even at 0, and its message named
  no optimizer)."""
  if params is None:
    raise ValueError(f'{who}: update() needs params ({why}): call '
                     'tx.update(grads, state, params).')


def check_updates_fit(who: str, updates, params) -> None:
  """``updates`` (gradients) must have the structure and leaf shapes of
  ``params``, where update() was given params: wrong gradients (a
  ``value_and_grad``'s ``(loss, grads)``, a transposed factor) had been
  blamed on the state, or had failed deep inside an optimizer."""
  if params is None:
    return
  leaves, treedef = flatten(params)
  try:
    grads = treedef.flatten_up_to(updates)
  except (ValueError, TypeError) as e:
    detail = str(e).splitlines()[0].rstrip('.')
    if not detail.startswith('Dict key mismatch'):
      # jax's other messages print the values (cut off at the first line).
      kind = lambda tree: (
          'an array' if hasattr(tree, 'shape') else
          f'a {type(tree).__name__} of {len(jax.tree.leaves(tree))} leaves')
      detail = f'{kind(updates)}, where the params are {kind(params)}'
    raise ValueError(
        f'{who}: the updates (gradients) do not have the structure of the '
        f'params: {detail}.') from None
  for (path, leaf), g in zip(leaves, grads):
    if _is_empty(leaf):
      continue
    name = '/'.join(path)
    if not hasattr(g, 'shape') and not isinstance(g, (int, float)):
      raise ValueError(f'{who}: the gradient of {name} is a '
                       f'{type(g).__name__}, not an array.')
    if tuple(jnp.shape(g)) != tuple(jnp.shape(leaf)):
      raise ValueError(
          f'{who}: the gradient of {name} has shape {tuple(jnp.shape(g))} '
          f'but the param has {tuple(jnp.shape(leaf))}.')


def layout_fn(layout: LayoutSpec, who: str | None = None
              ) -> Callable[[str], LoraLayout]:
  """A :data:`LayoutSpec` as a function from a path to its layout; errors
  start with ``who`` (the function the user called), where given.

  The optimizers call it when made: a string had passed, and failed at
  ``init`` without the optimizer's name.
  """
  prefix = f'{who}: ' if who else ''
  if isinstance(layout, LoraLayout):
    return lambda _: layout
  if not callable(layout):
    raise ValueError(f'{prefix}layout must be a LoraLayout (e.g. '
                     'lro.PEFT_LAYOUT) or a function from a path to one, got '
                     f'{checks.shown(layout)}.')

  def checked(path: str) -> LoraLayout:
    try:
      lay = layout(path)
    except Exception as e:  # pylint: disable=broad-except
      # The user's function, called on every prefix of every leaf's path
      # (the factor keys to look for come from the layout): a table of
      # pair paths had raised a bare KeyError from inside find_lora_pairs.
      raise ValueError(
          f'{prefix}the layout function raised {type(e).__name__} '
          f'({checks.shown(str(e))}) for path {path!r}; it is called with '
          "every prefix of every leaf's path ('' for the root), so it must "
          'return a LoraLayout for any path, e.g. a default.') from None
    if not isinstance(lay, LoraLayout):
      raise ValueError(f'{prefix}the layout function returned '
                       f'{checks.shown(lay)} '
                       f'for path {path!r}; it must return a LoraLayout.')
    return lay

  return checked


def stacked_axes(path: Sequence[str], shape: Sequence[int],
                 layout: LayoutSpec, who: str | None = None) -> int:
  """Leading stacked-layer axes of a leaf that belongs to no pair.

  The layout of the leaf's parent path says how many (its ``batch_axes``),
  as it does for the pairs beside it: under ``NNX_LAYOUT.scanned(1)`` a
  per-layer bias ``(L, d)`` is ``L`` vectors, not one matrix. A leaf with no
  more axes than that (a final norm ``(d,)`` beside the stacked layers) is
  not stacked. A tree that mixes stacked and unstacked leaves of more axes
  needs a layout function that tells them apart by path.
  """
  batch_axes = layout_fn(layout, who)('/'.join(path[:-1])).batch_axes
  return batch_axes if len(shape) > batch_axes else 0


# The optimizers whose step for one factor is computed from the other.
_PRECONDITIONERS = ('lora_rite', 'scale_by_lora_rite', 'scaled_adam',
                    'scale_by_riemannian_precond')


def _flipped(lay: LoraLayout, a_shape, b_shape) -> str | None:
  """Advice naming the layout that reads 2-D factors the other way round,
  when it pairs them at a rank no larger than their other sizes: an
  Equinox ``eqx.nn.Linear`` or PEFT weight is (out, in), so its lora_a is
  (r, in) and its lora_b (out, r). The error had said only 'both factors
  need the same rank', or sent users with lowercase keys to PEFT_LAYOUT,
  whose keys are lora_A/lora_B."""
  a, b = a_shape[lay.batch_axes:], b_shape[lay.batch_axes:]
  if len(a) != 2 or len(b) != 2:
    return None
  # The rank axes of the other reading: 0 where this layout's is 1 (-1).
  new_a, new_b = 1 - lay.a_rank_axis % 2, 1 - lay.b_rank_axis % 2
  r = a[new_a]
  if r != b[new_b] or r > min(a[1 - new_a], b[1 - new_b]):
    return None
  layout = dataclasses.replace(lay, a_rank_axis=-new_a, b_rank_axis=-new_b)
  unstacked = dataclasses.replace(layout, batch_axes=0)
  # Only the fields that differ from the defaults: the repr had them all.
  fields = ', '.join(
      f'{f.name}={getattr(unstacked, f.name)!r}'
      for f in dataclasses.fields(unstacked)
      if getattr(unstacked, f.name) != getattr(NNX_LAYOUT, f.name))
  named = ('lro.PEFT_LAYOUT' if unstacked == PEFT_LAYOUT else
           'lro.NNX_LAYOUT' if unstacked == NNX_LAYOUT else
           f'lro.LoraLayout({fields})')
  if layout.batch_axes:
    named += f'.scanned({layout.batch_axes})'
  where = lambda axis: 'last' if axis else 'first'
  return (f'read the other way round ({lay.a_key} {a_shape} with its rank '
          f'{where(new_a)}, {lay.b_key} {b_shape} with its {where(new_b)}), '
          f'they pair at rank {r}: pass layout={named}.')


def _rank(shape: Sequence[int], axis: int, batch_axes: int) -> int | None:
  """The size of the rank axis under ``batch_axes`` stacked axes; None where
  that reading has no such axis (a positive last axis read with one more
  stacked axis had been an IndexError)."""
  inner = shape[batch_axes:]
  return inner[axis] if -len(inner) <= axis < len(inner) else None


def find_lora_pairs(tree, layout: LayoutSpec = NNX_LAYOUT,
                    who: str = 'find_lora_pairs',
                    allow_unpaired: bool = False) -> PairedTree:
  """Finds every LoRA pair of ``tree`` and checks that nothing is left over.

  Args:
    tree: a pytree of arrays (or ``jax.ShapeDtypeStruct``); ``None`` and
      ``optax.MaskedNode`` leaves (from ``optax.masked``) are ignored.
    layout: a :class:`LoraLayout`, or a function from a path
      (``'layers/0/attn/q'``) to its layout, for trees that mix layouts;
      it is called with every prefix of every leaf's path (the factor keys
      it names are what marks a pair), so it returns a layout for any path
      (``optax.inject_hyperparams`` takes a function for a schedule: pass
      ``static_args=('layout',)`` to an optimizer given one).
    who: the caller's name (an optimizer's), used in error messages.
    allow_unpaired: skip leaves that belong to no pair instead of raising,
      and return a factor whose partner is masked out (``None`` or
      ``optax.MaskedNode``) as a :class:`LoneFactor`.

  Returns:
    A :class:`PairedTree`.

  Raises:
    ValueError: for a factor without its partner, a factor with too few
      axes, stacked-layer axes that differ between the factors, a rank of
      0, ranks that differ, a rank
      larger than both factors' other sizes when those are equal (factors of
      the other layout on a square layer; a rank above unequal sizes, or
      above one factor's other size, is only warned about), or (unless
      ``allow_unpaired``) a leaf that belongs to no pair; with
      ``allow_unpaired``, for a tree with no pair but leaves named like
      factors (a wrong layout, or a flat dict that must be nested).
  """
  leaves, treedef = flatten(tree)
  layouts = layout_fn(layout, who)
  found: dict[tuple, dict[str, int]] = {}
  masked = {path for path, leaf in leaves if _is_empty(leaf)}
  unpaired = []
  for index, (path, leaf) in enumerate(leaves):
    if _is_empty(leaf):
      continue
    hit = None
    # The innermost key naming a factor marks the pair; keys after it (a
    # PEFT `.weight`, an NNX `.value`) are carried as the pair's suffix.
    for i in range(len(path) - 1, -1, -1):
      lay = layouts('/'.join(path[:i]))
      if path[i] in (lay.a_key, lay.b_key):
        hit = i
        break
    where = '/'.join(path)
    if hit is None:
      if allow_unpaired:
        unpaired.append(where)
        continue
      if _named_like_a_factor(where, layouts('')):
        # A flat PEFT dict, or the other layout's keys: "not part of a LoRA
        # pair" had sent the user to route a LoRA factor elsewhere.
        lay = layouts('')
        raise ValueError(
            f'{who}: leaf {where!r} is named like a LoRA factor, but no key '
            f'of its path is exactly {lay.a_key!r} or {lay.b_key!r}: wrong '
            "layout, or a flat dict whose keys must first be nested by "
            "splitting on '.'?")
      raise ValueError(
          f'{who}: leaf {where!r} is not part of a LoRA pair; apply {who} to '
          'the LoRA factors only and route other leaves elsewhere, e.g. '
          'optax.partition({"lora": tx, "frozen": optax.set_to_zero()}, '
          'labels).')
    slot = found.setdefault((path[:hit], path[hit + 1:]), {})
    slot[path[hit]] = index
  pairs, lone = [], []
  for (prefix, suffix), slot in found.items():
    name = '/'.join(prefix)
    # A pair at the root of the tree has no name of its own.
    pair = f'pair {name!r}' if name else 'the pair at the root'
    factor = lambda key: repr('/'.join(prefix + (key,) + suffix))
    lay = layouts(name)
    partnerless = False
    for mine, other in ((lay.a_key, lay.b_key), (lay.b_key, lay.a_key)):
      if mine in slot and other not in slot:
        partner = prefix + (other,) + suffix
        # optax.masked takes a mask that is a prefix of the tree: the
        # partner's MaskedNode may stand for its whole subtree.
        hidden = any(partner[:k] in masked
                     for k in range(len(prefix) + 1, len(partner) + 1))
        if allow_unpaired and hidden:
          refuse_untrainable(who, *leaves[slot[mine]], factor=True)
          lone.append(LoneFactor(name, 'a' if mine == lay.a_key else 'b',
                                 slot[mine], lay))
          partnerless = True
          continue
        where = '/'.join(prefix + (mine,) + suffix)
        if hidden:
          # It is there, masked out (LoRA-FA's frozen lora_a): 'has no
          # partner' had sent users looking for a missing leaf.
          why = (f'{who} preconditions each factor by the other, so it '
                 'needs both (train one factor alone with loraplus, shampoo '
                 'or adam)' if who in _PRECONDITIONERS else
                 'pass allow_unpaired=True to have it as a LoneFactor'
                 if who == 'find_lora_pairs' else f'{who} needs both')
          raise ValueError(
              f'{who}: factor {where!r} has its partner {other!r} masked '
              f'out (a MaskedNode or None, as optax.masked and partition '
              f'leave); {why}.')
        raise ValueError(
            f'{who}: factor {where!r} has no partner {other!r} under '
            f'{name or "the root"!r}; a LoRA pair needs both factors.')
    if partnerless:
      continue
    a_index, b_index = slot[lay.a_key], slot[lay.b_key]
    for index in (a_index, b_index):
      if not hasattr(leaves[index][1], 'shape'):
        raise ValueError(
            f"{who}: factor {'/'.join(leaves[index][0])!r} must be an array, "
            f'got {type(leaves[index][1]).__name__}.')
      refuse_untrainable(who, *leaves[index], factor=True)
    a_shape = leaves[a_index][1].shape
    b_shape = leaves[b_index][1].shape
    # Too few axes first: scanned(1) on 2-D factors had been told their
    # stacked-layer axes differ.
    for shape, key in ((a_shape, lay.a_key), (b_shape, lay.b_key)):
      if len(shape) < lay.batch_axes + 2:
        hint = (' (a tree that also holds unstacked pairs or other leaves '
                'needs a layout function of the path: stacked where the path '
                'is a scanned block, the plain layout elsewhere)'
                if lay.batch_axes else '')
        raise ValueError(
            f'{who}: factor {factor(key)} has shape {shape}; expected at least '
            f'{lay.batch_axes + 2} axes ({lay.batch_axes} stacked + matrix)'
            f'{hint}.')
    if lay.batch_axes and a_shape[:lay.batch_axes] != b_shape[:lay.batch_axes]:
      raise ValueError(
          f'{who}: {pair} has stacked-layer axes {a_shape} vs '
          f'{b_shape} that differ in their first {lay.batch_axes} axes.')
    for shape, key, axis in ((a_shape, lay.a_key, lay.a_rank_axis),
                             (b_shape, lay.b_key, lay.b_rank_axis)):
      inner = len(shape) - lay.batch_axes
      if not -inner <= axis < inner:
        raise ValueError(
            f'{who}: factor {factor(key)} has shape {shape}, with no rank axis '
            f'{axis} after its {lay.batch_axes} stacked axes.')
    r_a = _rank(a_shape, lay.a_rank_axis, lay.batch_axes)
    r_b = _rank(b_shape, lay.b_rank_axis, lay.batch_axes)
    # Layers stacked by nnx.scan without layout.scanned(): both factors have
    # a third axis and the same length on their first.
    maybe_stacked = (len(a_shape) >= lay.batch_axes + 3 and
                     len(b_shape) >= lay.batch_axes + 3 and
                     a_shape[lay.batch_axes] == b_shape[lay.batch_axes])
    hint = (f' If axis {lay.batch_axes} ({a_shape[lay.batch_axes]}) stacks '
            f'layers, pass layout=<layout>.scanned({lay.batch_axes + 1}).'
            if maybe_stacked else '')
    if r_a == 0 or r_b == 0:
      # Nothing to adapt; LoRA-RITE's and ScaledAdam's r x r algebra had
      # failed on it with an IndexError.
      raise ValueError(
          f'{who}: {pair} ({lay.a_key} {a_shape}, {lay.b_key} '
          f'{b_shape}) has rank 0; give it a rank >= 1 or leave it out.')
    flipped = _flipped(lay, a_shape, b_shape)
    if r_a != r_b:
      raise ValueError(
          f'{who}: {pair} has rank {r_a} in {lay.a_key} {a_shape} but '
          f'{r_b} in {lay.b_key} {b_shape}; both factors need the same rank.'
          + (hint or (f' {flipped[0].upper()}{flipped[1:]}' if flipped
                      else '')))
    n_a = matrix_shape(a_shape, lay.a_rank_axis, lay.batch_axes)[1]
    n_b = matrix_shape(b_shape, lay.b_rank_axis, lay.batch_axes)[1]
    if r_a > n_a and r_a > n_b:
      # Factors of the other orientation (PEFT's lora_A (r, in) under
      # NNX_LAYOUT) on a square layer read as a pair of rank in = out whose
      # other sizes are both the true rank: refused, since it would train
      # silently on wrong Gram matrices. Any other rank above both sides
      # is only redundant (a smaller one spans as much): warned.
      message = (
          f'{who}: {pair} ({lay.a_key} {a_shape}, {lay.b_key} '
          f'{b_shape}) reads as rank {r_a}, above both factors\' other sizes '
          f'({n_a}, {n_b})')
      advice = f'wrong layout? {flipped}' if flipped else (
          f'wrong layout? (NNX_LAYOUT has the rank last on {lay.a_key} '
          f'and first on {lay.b_key}; PEFT_LAYOUT the reverse.)')
      if n_a == n_b:
        raise ValueError(f'{message}: {advice}')
      warnings.warn(f'{message}; a rank of {min(n_a, n_b)} spans as '
                    f'much. If that is not meant: {advice}', stacklevel=2)
    elif r_a > min(n_a, n_b):
      # One factor is then wide (r x n, n < r): (R_F R)^+ is not R^-1 R_F^+
      # for a wide R_F, and LoRA-RITE's update is no longer the same for
      # every equivalent pair (measured: a 1e-1 gap in float64 over 30
      # steps, where full-rank pairs keep 1e-12).
      warnings.warn(
          f'{who}: {pair} ({lay.a_key} {a_shape}, {lay.b_key} '
          f'{b_shape}) has rank {r_a}, above one factor\'s other size '
          f'({min(n_a, n_b)}): a rank of {min(n_a, n_b)} spans as much' +
          (', and LoRA-RITE is transformation invariant only up to it.'
           if 'lora_rite' in who else '.'), stacklevel=2)
    stacked_rank = _rank(a_shape, lay.a_rank_axis, lay.batch_axes + 1)
    if maybe_stacked and stacked_rank is not None and stacked_rank == _rank(
        b_shape, lay.b_rank_axis, lay.batch_axes + 1):
      # As many layers as the rank: both readings fit, and the wrong one
      # trains on wrong Gram matrices without an error.
      warnings.warn(
          f'{who}: {pair} ({lay.a_key} {a_shape}, {lay.b_key} '
          f'{b_shape}) is read as one pair of rank {r_a}.' + hint,
          stacklevel=2)
    pairs.append(LoraPair(name, a_index, b_index, lay))
  if allow_unpaired and not pairs and not lone:
    lay = layouts('')
    factorish = [w for w in unpaired if _named_like_a_factor(w, lay)]
    if factorish:
      # Else every leaf would silently get the non-LoRA treatment.
      raise ValueError(
          f'{who}: no {lay.a_key}/{lay.b_key} pair found, yet leaf '
          f'{factorish[0]!r} is named like a factor: wrong layout (keys are '
          'matched exactly, per path component), or a flat dict whose keys '
          "must first be nested by splitting on '.'? (Not LoRA factors: pass "
          "a layout whose a_key/b_key name nothing in the tree.)")
  return PairedTree(tuple(pairs), treedef, len(leaves), tuple(lone))


def _named_like_a_factor(where: str, lay: LoraLayout) -> bool:
  """Whether a path component of ``where`` (split on '/' and '.') is, in
  any case, ``lay``'s factor key or ``lora_a``/``lora_b``."""
  keys = {lay.a_key.lower(), lay.b_key.lower(), 'lora_a', 'lora_b'}
  return bool(keys & set(where.lower().replace('.', '/').split('/')))


def matrix_shape(shape: Sequence[int], rank_axis: int,
                 batch_axes: int) -> tuple[int, int, int]:
  """The ``(slices, N, r)`` shape of a factor's matrix view."""
  batch = math.prod(shape[:batch_axes])
  inner = list(shape[batch_axes:])
  r = inner.pop(rank_axis)
  return batch, math.prod(inner), r


def leaf_axis(ndim: int, rank_axis: int, batch_axes: int) -> int:
  """The axis of a factor of ``ndim`` axes that its layout's ``rank_axis``
  (counted after the ``batch_axes`` stacked ones, negative from the end)
  names."""
  return rank_axis % (ndim - batch_axes) + batch_axes


def to_matrix(x: jax.Array, rank_axis: int, batch_axes: int) -> jax.Array:
  """Factor -> ``(slices, N, r)``: batch axes merged, rank last, rest flat."""
  slices, n, r = matrix_shape(x.shape, rank_axis, batch_axes)
  axis = leaf_axis(x.ndim, rank_axis, batch_axes)
  x = jnp.moveaxis(x, axis, -1)
  return placement.reshape(x, (slices, n, r))


def from_matrix(m: jax.Array, shape: Sequence[int], rank_axis: int,
                batch_axes: int) -> jax.Array:
  """Inverse of :func:`to_matrix` for a factor of ``shape``."""
  shape = tuple(shape)
  axis = leaf_axis(len(shape), rank_axis, batch_axes)
  moved = shape[:axis] + shape[axis + 1:] + (shape[axis],)
  return jnp.moveaxis(placement.reshape(m, moved), -1, axis)


def factor_roles(paired: PairedTree) -> list[str | None]:
  """For each leaf index: 'a', 'b', or None (masked out)."""
  roles: list[str | None] = [None] * paired.num_leaves
  for pair in paired.pairs:
    roles[pair.a_index] = 'a'
    roles[pair.b_index] = 'b'
  for factor in paired.lone:
    roles[factor.index] = factor.role
  return roles


def lora_b_mask(tree, layout: LayoutSpec = NNX_LAYOUT) -> Any:
  """A tree of bools like ``tree``: True on every ``b`` factor.

  That is the ``b`` factor of every pair, and also one whose partner is
  masked out (``optax.MaskedNode``); False elsewhere.

  Args:
    tree: params or updates holding LoRA pairs (other leaves allowed).
    layout: how pairs are recognised, see :func:`find_lora_pairs`.

  Returns:
    A tree with ``tree``'s structure and a bool at every leaf.
  """
  paired = find_lora_pairs(tree, layout, who='lora_b_mask',
                           allow_unpaired=True)
  roles = factor_roles(paired)
  return jax.tree_util.tree_unflatten(paired.treedef,
                                      [role == 'b' for role in roles])

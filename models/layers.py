"""Projection: the one dense layer every LoRA-targetable weight in our models uses.

A projection maps the trailing ``in_shape`` axes of its input to ``out_shape``
axes with a kernel of shape ``in_shape + out_shape`` (a plain Linear is
in=(D,), out=(F,); Gemma's query is in=(D,), out=(N, H); its output
projection is in=(N, H), out=(D,)). Keeping the kernel in this einsum shape
lets a LoRA adapter attach as the pair the optimizers consume:

  lora_a: in_shape + (r,)    (rank last)
  lora_b: (r,) + out_shape   (rank first)
  y = x @ kernel + scale * (x @ lora_a) @ lora_b

which is the Flax NNX ``nnx.LoRA`` convention, extended to n-D factors.
"""

from __future__ import annotations

import math
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_rite_optax import checks


# The mesh axes a batch's rows are split over (data parallelism and FSDP).
BATCH_AXES = ('data', 'fsdp')


def shard_batch(x: jax.Array) -> jax.Array:
  """``x`` with its rows split over the mesh's batch axes, where a mesh is
  set (``jax.set_mesh``, as the train loop's step is traced); else ``x``.

  FSDP splits the kernels along their contracted ``embed`` axis over
  ``fsdp``, the axis the batch is split over too. JAX 0.10's partitioner
  (Shardy) settled that clash by dropping the batch split after the
  embedding lookup: every device computed activations and logits for the
  whole global batch (a Gemma-2B preset step: 104 GiB per device on 16,
  45 GiB held to its rows). The model calls this after its embedding and
  after every block; the other axes are left to the partitioner.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.ndim == 0:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  rows = math.prod(mesh.shape[a] for a in axes)
  if rows <= 1 or x.shape[0] % rows:
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.PartitionSpec(
          axes, *[jax.sharding.PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)))


def call_block(block: nnx.Module, remat: bool, *args):
  """``block(*args)``; with ``remat``, its activations are recomputed in the
  backward pass (``nnx.remat``, jax.checkpoint) instead of kept from the
  forward: memory for about a third more compute, what a large model's long
  batches need on an accelerator."""
  if not remat:
    return block(*args)
  return nnx.remat(lambda module, *inputs: module(*inputs))(block, *args)


def _letters(n: int, offset: int) -> str:
  return string.ascii_letters[offset:offset + n]


class LoRAWeights(nnx.Module):
  """The (lora_a, lora_b) pair of one projection, as ``nnx.LoRAParam``s."""

  def __init__(self, lora_a: jax.Array, lora_b: jax.Array, *, scale: float,
               dropout: float = 0.0, a_axes: Sequence[str | None] | None = None,
               b_axes: Sequence[str | None] | None = None,
               rngs: nnx.Rngs | None = None):
    self.lora_a = nnx.LoRAParam(lora_a, out_sharding=tuple(a_axes) if a_axes else None,
                                eager_sharding=False)
    self.lora_b = nnx.LoRAParam(lora_b, out_sharding=tuple(b_axes) if b_axes else None,
                                eager_sharding=False)
    self.scale = scale
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    # True once models.lora.merge_lora has folded scale * a @ b into the
    # kernel; the projection then skips the adapter so it is not added twice.
    self.merged = False


class Projection(nnx.Module):
  """y[..., out] = x[..., in] . kernel[in, out] (+ bias), optionally + LoRA.

  Args:
    in_shape: trailing input axes contracted by the kernel.
    out_shape: output axes produced.
    axes: logical axis names of the kernel, one per kernel axis
      (``in_shape + out_shape``), used by the trainer to place it on a mesh.
    use_bias: add a bias of shape ``out_shape``.
    dtype: compute dtype; params are stored in ``param_dtype``.
    out_dtype: dtype the products accumulate into and ``y`` has (default
      ``dtype``): float32 for an output head, whose logits bfloat16 would
      round.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *,
               axes: Sequence[str | None], use_bias: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, out_dtype=None,
               kernel_init=nnx.initializers.lecun_normal(), rngs: nnx.Rngs):
    self.in_shape = tuple(in_shape)
    self.out_shape = tuple(out_shape)
    self.axes = tuple(axes)
    if len(self.axes) != len(self.in_shape) + len(self.out_shape):
      raise ValueError(
          f'Projection axes {self.axes} must name each of the '
          f'{len(self.in_shape) + len(self.out_shape)} kernel axes.')
    # math.prod, not jnp.prod: shapes must stay Python ints under
    # nnx.eval_shape / jit tracing (loaders build the module abstractly).
    init_shape = (math.prod(self.in_shape), math.prod(self.out_shape))
    kernel = kernel_init(rngs.params(), init_shape, param_dtype).reshape(
        self.in_shape + self.out_shape)
    self.kernel = nnx.Param(kernel, out_sharding=self.axes, eager_sharding=False)
    self.bias = (nnx.Param(jnp.zeros(self.out_shape, param_dtype),
                           out_sharding=self.axes[len(self.in_shape):],
                           eager_sharding=False)
                 if use_bias else None)
    self.dtype = dtype
    self.out_dtype = out_dtype
    # Set by models.lora.apply_lora; nnx.data so NNX treats it as a subtree.
    self.lora: LoRAWeights | None = nnx.data(None)

  def _contract(self, x: jax.Array, w: jax.Array, n_in: int,
                out_dtype=None) -> jax.Array:
    """x[..., i1..in] . w[i1..in, o...] with the trailing n_in axes of x."""
    batch = _letters(x.ndim - n_in, 0)
    ins = _letters(n_in, 26)
    outs = _letters(w.ndim - n_in, 26 + n_in)
    return jnp.einsum(f'{batch}{ins},{ins}{outs}->{batch}{outs}', x, w,
                      preferred_element_type=out_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    n_in = len(self.in_shape)
    out = self.out_dtype
    y = self._contract(x, self.kernel[...].astype(self.dtype), n_in, out)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    if self.lora is not None and not self.lora.merged:
      xa = self.lora.dropout(x) if self.lora.dropout is not None else x
      h = self._contract(xa, self.lora.lora_a[...].astype(self.dtype), n_in)
      y = y + self.lora.scale * self._contract(
          h, self.lora.lora_b[...].astype(self.dtype), 1, out)
    return y


def check_float_dtypes(who: str, **dtypes) -> None:
  """Refuses a ``dtype=`` / ``param_dtype=`` that is not floating, naming
  it: an int32 compute dtype had made every activation 0 (the embedding
  times sqrt(width) cast to int), and an int8 param dtype failed in the
  random initialiser's message."""
  for name, value in dtypes.items():
    checks.floating_dtype(who, name, value,
                          'a floating dtype (float32 or bfloat16)')


def check_positive_ints(who: str, **sizes) -> None:
  """Refuses a size or count that is not an int >= 1, naming it (a cache
  size of 0 had failed in an empty reduction at the first call, -3 or 2.5
  in jax's shape errors)."""
  for name, value in sizes.items():
    if not checks.is_integer(value) or value < 1:
      raise ValueError(f'{who}: {name} must be an int >= 1, got '
                       f'{checks.shown(value)}.')


def check_token_rows(tokens, who: str) -> None:
  """Tokens must be [batch, seq]: 1-D ones had been an IndexError (T5) or
  read as one row's worth of rows."""
  if jnp.ndim(tokens) != 2:
    raise ValueError(f'{who} tokens must be [batch, seq] ints, got shape '
                     f'{tuple(jnp.shape(tokens))}.')


def check_cache_room(size: int, index, t: int) -> None:
  """Refuses a KV-cache write of ``t`` tokens at ``index`` past ``size``.

  dynamic_update_slice clamps a write past the end onto the last slots: the
  cache would silently lose tokens. Shapes are static; the index is checked
  where it is concrete (eager calls).

  Raises:
    ValueError: naming the cache size, the write and the way out.
  """
  if t > size or (not isinstance(index, jax.core.Tracer) and
                  int(index) + t > size):
    raise ValueError(
        f'the KV cache holds {size} tokens; writing {t} at position {index} '
        'would overflow it (make it larger with init_cache).')


def first_outside(ids, low: int, high: int):
  """The first of ``ids`` outside ``[low, high)``, or None: none is, or
  ``ids`` is traced or spread over several processes (not read: reading
  the other processes' part fails, and a refusal by the one process holding
  a bad id would leave the others waiting in the next collective)."""
  if isinstance(ids, jax.core.Tracer) or not getattr(
      ids, 'is_fully_addressable', True):
    return None
  ids = np.asarray(ids)
  bad = ids[(ids < low) | (ids >= high)]
  return bad.flat[0] if bad.size else None


def check_token_ids(ids, vocab_size: int, who: str) -> None:
  """Refuses token ids outside ``[0, vocab_size)``, naming the first.

  The embedding lookup would fill NaN for them, and attention spread it to
  every position of the row. ``ids``: a list, NumPy array or JAX array. A
  traced array is not checked, nor one spread over several processes:
  reading the other processes' part fails, and a refusal by the one
  process holding a bad id would leave the others waiting in the next
  collective.

  Raises:
    ValueError: ``'{who} token id {id} is outside the model's vocabulary
      of {vocab_size} (another tokenizer?).'``
  """
  bad = first_outside(ids, 0, vocab_size)
  if bad is not None:
    raise ValueError(f'{who} token id {bad} is outside the '
                     f'model\'s vocabulary of {vocab_size} (another '
                     'tokenizer?).')

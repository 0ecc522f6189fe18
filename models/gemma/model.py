"""Gemma 1/2/3 text decoder in Flax NNX.

Every dense weight a LoRA adapter may target is a `models.layers.Projection`
with an einsum-shaped kernel, named as in the Gemma reference code:

  layers/i/attn/q  (D, N, H)     layers/i/mlp/gate  (D, F)
  layers/i/attn/k  (D, K, H)     layers/i/mlp/up    (D, F)
  layers/i/attn/v  (D, K, H)     layers/i/mlp/down  (F, D)
  layers/i/attn/o  (N, H, D)

Every parameter carries logical axis names ('vocab', 'embed', 'heads',
'kv_heads', 'head_dim', 'mlp', 'norm') as ``out_sharding`` metadata; the
trainer maps them to mesh axes with ``nnx.logical_axis_rules``.

The model is split into ``hidden`` (tokens -> final-normed hidden states) and
``logits`` (hidden -> float32 logits over the tied embedding) because the
262k-row unembedding dominates the cost of small Gemmas: a trainer gathers
the target positions first and unembeds only those.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.errors
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from models.gemma.config import GLOBAL, LOCAL, GemmaConfig
from models.layers import (Projection, call_block, check_cache_room,
                           check_float_dtypes, check_positive_ints,
                           check_token_ids, check_token_rows, first_outside,
                           shard_batch)

# Gemma's reference implementation masks with a large finite negative rather
# than -inf so fully masked rows (padding queries) give a uniform softmax
# instead of NaN.
_MASK_VALUE = -2.3819763e38


def _param(value, axes):
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
  """Gemma's RMSNorm: x / rms(x) * (1 + scale), computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    # Zero init: the (1 + scale) form starts as the identity gain.
    self.scale = _param(jnp.zeros((dim,), param_dtype), ('norm',))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    # The gain at y's rank (jax_numpy_rank_promotion='raise' refuses less).
    gain = 1.0 + self.scale[...].astype(jnp.float32)
    return (y * gain.reshape((1,) * (y.ndim - 1) + (-1,))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float,
               scale: float = 1.0) -> jax.Array:
  """Rotary embedding, half-split (NeoX) layout as in Gemma and HF.

  Args:
    x: [B, T, heads, H].
    positions: [B, T] integer positions.
    base: wavelength base (10k, or 1M for Gemma 3 global layers).
    scale: linear position scaling (positions are divided by it).
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  fraction = 2 * jnp.arange(half, dtype=jnp.float32) / head_dim
  timescale = base ** fraction
  angle = (positions[..., None].astype(jnp.float32) / scale /
           timescale.reshape((1,) * positions.ndim + (-1,)))
  sin = jnp.sin(angle)[:, :, None, :]
  cos = jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@flax.struct.dataclass
class Cache:
  """Key/value cache of all layers.

  Attributes:
    k, v: per layer [B, S, K, H] (RoPE already applied to k).
    positions: [B, S] token position held by each slot; -1 for an empty or
      padding slot, which no query attends to.
    index: scalar int32, the next slot to write (shared by the batch: rows of
      different lengths are left-padded, their padding slots hold -1).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  positions: jax.Array
  index: jax.Array

  @property
  def size(self) -> int:
    return self.positions.shape[1]


def _check_config(who: str, config) -> None:
  # A preset's name in its place had been an AttributeError deep inside.
  if not isinstance(config, GemmaConfig):
    hint = (f" (use models.gemma.get_config({config!r}))"
            if isinstance(config, str) else '')
    raise TypeError(f'{who}: config must be a GemmaConfig{hint}, got '
                    f'{type(config).__name__}.')


def init_cache(config: GemmaConfig, batch_size: int, cache_size: int,
               dtype=jnp.float32) -> Cache:
  """An empty cache for ``batch_size`` rows of up to ``cache_size`` tokens."""
  _check_config('init_cache', config)
  check_positive_ints('init_cache', batch_size=batch_size,
                      cache_size=cache_size)
  # An int cache had held truncated keys and values: wrong logits, silently.
  check_float_dtypes('init_cache', dtype=dtype)
  shape = (batch_size, cache_size, config.num_kv_heads, config.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return Cache(k=zeros, v=zeros,
               positions=jnp.full((batch_size, cache_size), -1, jnp.int32),
               index=jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
  """Multi-query / grouped-query attention with Gemma 2/3 options."""

  def __init__(self, config: GemmaConfig, layer_type: str, *, dtype,
               param_dtype, rngs: nnx.Rngs):
    c = config
    d, n, k, h = c.width, c.num_heads, c.num_kv_heads, c.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q_axes = ('embed', 'heads', 'head_dim')
    kv_axes = ('embed', 'kv_heads', 'head_dim')
    self.q = Projection((d,), (n, h), axes=q_axes, **kw)
    self.k = Projection((d,), (k, h), axes=kv_axes, **kw)
    self.v = Projection((d,), (k, h), axes=kv_axes, **kw)
    self.o = Projection((n, h), (d,), axes=('heads', 'head_dim', 'embed'),
                        **kw)
    if c.use_qk_norm:
      self.q_norm = RMSNorm(h, eps=c.norm_eps, param_dtype=param_dtype)
      self.k_norm = RMSNorm(h, eps=c.norm_eps, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None
    self.layer_type = layer_type
    if layer_type == LOCAL:
      self.rope_base, self.rope_scale = c.rope_base_local, c.rope_scale_local
    else:
      self.rope_base, self.rope_scale = c.rope_base_global, c.rope_scale_global
    self.query_scale = c.query_scale
    self.softcap = c.attn_logit_softcap
    self.num_kv_heads = k
    self.dtype = dtype

  def __call__(self, x, positions, mask, kv_cache=None, cache_index=None):
    """x [B, T, D], positions [B, T], mask [B, T, S] -> ([B, T, D], (k, v))."""
    q = self.q(x)
    k = self.k(x)
    v = self.v(x)
    if self.q_norm is not None:
      q = self.q_norm(q)
      k = self.k_norm(k)
    q = apply_rope(q, positions, base=self.rope_base, scale=self.rope_scale)
    k = apply_rope(k, positions, base=self.rope_base, scale=self.rope_scale)
    q = q * jnp.asarray(self.query_scale, q.dtype)
    if kv_cache is not None:
      ck, cv = kv_cache
      k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype),
                                              cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype),
                                              cache_index, axis=1)
    new_kv = (k, v)
    b, t, n, h = q.shape
    kh = self.num_kv_heads
    # Group query heads by the kv head they share: no repeat of k/v needed.
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum('btkgh,bskh->bkgts', qg, k.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    if self.softcap is not None:
      logits = jnp.tanh(logits / self.softcap) * self.softcap
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bkgts,bskh->btkgh', probs, v.astype(self.dtype))
    return self.o(out.reshape(b, t, n, h)), new_kv


class MLP(nnx.Module):
  """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

  def __init__(self, config: GemmaConfig, *, dtype, param_dtype, rngs):
    d, f = config.width, config.mlp_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Projection((d,), (f,), axes=('embed', 'mlp'), **kw)
    self.up = Projection((d,), (f,), axes=('embed', 'mlp'), **kw)
    self.down = Projection((f,), (d,), axes=('mlp', 'embed'), **kw)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.gate(x), approximate=True) * self.up(x))


class Block(nnx.Module):
  """Pre-norm residual block; Gemma 2/3 add norms after attention and MLP."""

  def __init__(self, config: GemmaConfig, layer_type: str, *, dtype,
               param_dtype, rngs):
    c = config
    norm = lambda: RMSNorm(c.width, eps=c.norm_eps, param_dtype=param_dtype)
    self.pre_attn_norm = norm()
    self.attn = Attention(c, layer_type, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
    self.post_attn_norm = norm() if c.use_post_norms else None
    self.pre_ffw_norm = norm()
    self.mlp = MLP(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_ffw_norm = norm() if c.use_post_norms else None
    self.layer_type = layer_type

  def __call__(self, x, positions, mask, kv_cache=None, cache_index=None):
    h, new_kv = self.attn(self.pre_attn_norm(x), positions, mask, kv_cache,
                          cache_index)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.pre_ffw_norm(x))
    if self.post_ffw_norm is not None:
      h = self.post_ffw_norm(h)
    return x + h, new_kv


def _attention_masks(q_pos, k_pos, q_slot, k_slot, window, extra=None):
  """[B, T, S] masks for global and local layers.

  A query at slot i may see a key at slot j when j <= i (causal in slot
  order, which also covers a prefill chunk written into a cache), the key is
  a real token (position >= 0) and, for local layers, the key lies within
  the sliding window: q_pos - k_pos < window.
  """
  allowed = (k_slot[None, None, :] <= q_slot[None, :, None]) & (
      k_pos[:, None, :] >= 0)
  if extra is not None:
    allowed = allowed & extra
  masks = {GLOBAL: allowed}
  if window is not None:
    masks[LOCAL] = allowed & (q_pos[:, :, None] - k_pos[:, None, :] < window)
  return masks


class Gemma(nnx.Module):
  """Gemma decoder-only language model with tied embeddings.

  Args:
    config: a `GemmaConfig` (see `models.gemma.config.get_config`).
    dtype: compute dtype (float32 or bfloat16).
    param_dtype: storage dtype of the parameters.
    rngs: initialisation randomness (use `nnx.eval_shape` to skip it when
      weights are loaded right after).
    remat: recompute each block's activations in the backward pass
      (`models.layers.call_block`); an attribute, settable after loading.
  """

  def __init__(self, config: GemmaConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None,
               remat: bool = False):
    _check_config('Gemma', config)
    check_float_dtypes('Gemma', dtype=dtype, param_dtype=param_dtype)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    c = config
    self.config = c
    self.dtype = dtype
    self.remat = remat
    embedding = jax.random.normal(rngs.params(), (c.vocab_size, c.width),
                                  param_dtype) * c.width ** -0.5
    self.embedding = _param(embedding, ('vocab', 'embed'))
    self.layers = nnx.List([
        Block(c, c.layer_type(i), dtype=dtype, param_dtype=param_dtype,
              rngs=rngs) for i in range(c.num_layers)])
    self.final_norm = RMSNorm(c.width, eps=c.norm_eps, param_dtype=param_dtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    # Eager calls only (a tracer is not read): an id outside the vocabulary
    # had wrapped round (-100, a label's ignore id) or filled NaN.
    check_token_ids(tokens, self.config.vocab_size, 'Gemma')
    x = jnp.take(self.embedding[...], tokens, axis=0)
    # Gemma multiplies by sqrt(width) rounded to the embedding's dtype, as
    # Hugging Face (`embed_scale.to(weight.dtype)`) and Google's code do: in
    # the compute dtype, bfloat16 weights computed in float32 had been scaled
    # by 25.298 where the checkpoint's model uses 25.25 (the 270M's width).
    return (x * jnp.sqrt(jnp.float32(self.config.width)).astype(x.dtype)
            ).astype(self.dtype)

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
             attention_mask: jax.Array | None = None,
             cache: Cache | None = None):
    """Final-normed hidden states [B, T, D] (and the new cache if given one).

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] int positions; by default counted over the real
        tokens (so left padding works), continuing after the cache contents.
      attention_mask: [B, T] (1 for real tokens, 0 for padding) or, without a
        cache, a full [B, T, T] boolean mask (e.g. for packed sequences),
        combined with causality and the sliding windows.
      cache: a `Cache` to read and extend, for incremental decoding.

    Returns:
      hidden [B, T, D] in the compute dtype, or ``(hidden, cache)`` when a
      cache was given.
    """
    c = self.config
    tokens = jnp.asarray(tokens)
    check_token_rows(tokens, 'Gemma')
    b, t = tokens.shape
    full_mask = None
    valid = jnp.ones((b, t), bool)
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
      if attention_mask.shape == (b, t):
        valid = attention_mask.astype(bool)
      elif attention_mask.shape == (b, t, t) and cache is None:
        full_mask = attention_mask.astype(bool)
      else:
        raise ValueError(
            f'Gemma attention_mask must be [batch, seq] = {[b, t]} (or [batch, '
            f'seq, seq] without a cache), got shape {attention_mask.shape}.')
    if positions is not None and jnp.shape(positions) != (b, t):
      # A [1, T+1] had failed in a broadcast deep in the attention.
      raise ValueError(f'Gemma positions must be [batch, seq] = {[b, t]}, got '
                       f'shape {jnp.shape(positions)}.')
    if positions is None:
      start = (jnp.zeros((b,), jnp.int32) if cache is None
               else jnp.max(cache.positions, axis=1) + 1)
      counted = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
      positions = start[:, None] + jnp.maximum(counted, 0)
    positions = jnp.asarray(positions, jnp.int32)
    new_pos = jnp.where(valid, positions, -1)

    if cache is None:
      index = jnp.zeros((), jnp.int32)
      k_pos = new_pos
      k_slot = jnp.arange(t)
    else:
      if cache.positions.shape[0] != b:
        # It would broadcast: the other rows' logits read another row's
        # keys, silently.
        raise ValueError(
            f'the KV cache holds {cache.positions.shape[0]} rows but the '
            f'tokens have {b}; make it with init_cache(config, batch_size={b}'
            ', ...).')
      want = (c.num_kv_heads, c.head_dim)
      if len(cache.k) != c.num_layers or cache.k[0].shape[2:] != want:
        # Another config's cache had failed as an IndexError or a shape
        # error inside a layer.
        raise ValueError(
            f'the KV cache holds {len(cache.k)} layers of {cache.k[0].shape[2:]}'
            f' (kv heads, head_dim) but the model has {c.num_layers} of {want}; '
            'make it with init_cache(model.config, ...).')
      index = cache.index
      check_cache_room(cache.size, index, t)
      k_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, new_pos,
                                                  index, axis=1)
      k_slot = jnp.arange(cache.size)
    q_slot = index + jnp.arange(t)
    masks = _attention_masks(positions, k_pos, q_slot, k_slot,
                             c.sliding_window, full_mask)

    x = shard_batch(self.embed(tokens))
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      # Not when decoding with a cache: there is no backward pass.
      x, (k, v) = call_block(layer, self.remat and cache is None, x,
                             positions, masks[layer.layer_type], kv, index)
      x = shard_batch(x)
      new_k.append(k)
      new_v.append(v)
    x = self.final_norm(x)
    if cache is None:
      return x
    return x, Cache(k=tuple(new_k), v=tuple(new_v), positions=k_pos,
                    index=index + t)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] of hidden states [..., D] (tied embedding)."""
    logits = jnp.einsum('...d,vd->...v', hidden.astype(self.dtype),
                        self.embedding[...].astype(self.dtype),
                        preferred_element_type=jnp.float32)
    cap = self.config.final_logit_softcap
    if cap is not None:
      logits = jnp.tanh(logits / cap) * cap
    return logits

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               cache: Cache | None = None,
               logits_positions: jax.Array | None = None) -> Any:
    """float32 logits [B, T, V] of int tokens [B, T].

    Args:
      tokens, positions, attention_mask, cache: as in `hidden`.
      logits_positions: optional indices into T, [P] or [B, P]: only those
        positions are unembedded and the result is [B, P, V].

    Returns:
      logits, or ``(logits, cache)`` when a cache was given.
    """
    out = self.hidden(tokens, positions, attention_mask, cache)
    h, new_cache = (out, None) if cache is None else out
    if logits_positions is not None:
      check_positions_in(logits_positions, h.shape[1])
      h = gather_positions(h, logits_positions)
    logits = self.logits(h)
    return logits if cache is None else (logits, new_cache)


def check_positions_in(idx, length: int) -> None:
  """Refuses ``logits_positions`` outside ``[-length, length)`` (eager calls
  only: a traced array is not read). A gather clamps or fills them: the
  logits of another position, or NaN, without an error."""
  bad = first_outside(idx, -length, length)
  if bad is not None:
    raise ValueError(f'Gemma logits_positions {bad} is outside the '
                     f'{length} tokens.')


def gather_positions(h: jax.Array, idx: jax.Array) -> jax.Array:
  """h[B, T, ...] at indices [P] (shared) or [B, P] -> [B, P, ...]."""
  idx = jnp.asarray(idx, jnp.int32)
  if idx.ndim == 1:
    return h[:, idx]
  return jnp.take_along_axis(h, idx.reshape(idx.shape + (1,) * (h.ndim - 2)),
                             axis=1)


def forward_fn(model: Gemma):
  """A jitted ``f(tokens, **kw)`` equal to ``model(tokens, **kw)``.

  Its Variables are shared with ``model``, so later value updates (loading,
  optimizer steps) are seen; a structural change (LoRA attached, merged by
  ``merge_lora`` or removed) splits the module again at the next call,
  since the old split would, for example, add a merged adapter twice (so
  each call splits the module, one walk: tens of ms for a 270M model; a
  loop over many small calls is faster jitted over ``nnx.split`` itself).
  Keyword arguments that are None are static; each new input shape or
  structure compiles once. In train mode the random streams (LoRA dropout)
  advance as ``model(...)`` advances them: the copy's had been dropped, so
  every call drew the same masks.
  """

  @functools.partial(jax.jit, static_argnums=0)
  def pure(graphdef, state, tokens, kwargs):
    copy = nnx.merge(graphdef, state)
    return copy(tokens, **kwargs), nnx.state(copy, nnx.RngCount)

  def f(tokens, **kwargs):
    graphdef, state = nnx.split(model)
    out, counts = pure(graphdef, state, tokens, kwargs)
    try:
      nnx.update(model, counts)
    except flax.errors.TraceContextError:
      # Under an outer jax transform (jit, grad, vmap) the model's
      # Variables take no values from it: the counts stay as they were, so
      # there, in train mode, calls repeat their masks (model(...) itself
      # is refused there); under nnx.jit they advance.
      pass
    return out

  return f

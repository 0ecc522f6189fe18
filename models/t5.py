"""T5 v1.1 / mT5 encoder-decoder in Flax NNX, with Hugging Face checkpoint I/O.

Matches ``transformers``' T5ForConditionalGeneration / MT5ForConditionalGeneration
numerically: T5's RMSNorm (``w * x / rms(x)``, no mean, no ``1 +``), no query
scaling (T5 folds it into the initialisation), relative position buckets
(bidirectional in the encoder, causal in the decoder) whose bias table lives in
the first layer of each stack and is shared by all its layers, gated-GELU FFN
(tanh GELU, HF's ``gelu_new``), and an untied ``lm_head`` without logit scaling
(v1.1 and mT5; the original T5's tied head, scaled by ``d_model ** -0.5``, is
supported too).

Every dense weight is a :class:`models.layers.Projection` so LoRA can target it
by name::

  encoder.layers[i].self_attn.{q,k,v,o}      q/k/v (D, N, H), o (N, H, D)
  decoder.layers[i].self_attn.{q,k,v,o}
  decoder.layers[i].cross_attn.{q,k,v,o}
  {encoder,decoder}.layers[i].mlp.{wi_0,wi_1,wo}   wi (D, F), wo (F, D)
  lm_head                                    (D, V)

Parameters carry the logical axis names the Gemma model uses ('vocab',
'embed', 'heads', 'head_dim', 'mlp', 'norm'; 'relpos_buckets' for the bias
table) as ``out_sharding`` metadata.

API: ``T5(config, rngs=...)`` / ``get_config(name)`` ('tiny',
't5-v1_1-{small,base,large,xl,xxl}', 'mt5-{...}'); ``model(encoder_tokens,
decoder_tokens)`` -> float32 logits; ``greedy_generate`` (KV cache);
``from_pretrained(dir)`` / ``save_pretrained(model, dir)`` for Hugging Face
layout directories (config.json + safetensors, single or sharded).
"""

from __future__ import annotations

import dataclasses
import math
import os
import operator
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import hf_io, lora
from models.layers import (Projection, call_block, check_cache_room,
                           check_float_dtypes, check_positive_ints,
                           check_token_ids, check_token_rows, shard_batch)

# HF adds the dtype's most negative number to masked logits; so do we, so
# masked rows behave the same (uniform, not NaN) when everything is masked.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': jax.nn.relu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'silu': jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters, named as in Hugging Face's ``T5Config``.

  Attributes:
    vocab_size: rows of the shared embedding and of ``lm_head``.
    d_model: width D.
    d_kv: per-head width H.
    d_ff: FFN hidden width F.
    num_layers: encoder blocks.
    num_decoder_layers: decoder blocks (``None``: same as the encoder).
    num_heads: attention heads N.
    relative_attention_num_buckets: rows of the relative position bias table.
    relative_attention_max_distance: distance beyond which buckets saturate.
    layer_norm_epsilon: RMSNorm epsilon.
    dropout_rate: dropout after embeddings, attention weights and sublayers.
    feed_forward_proj: 'gated-gelu' (v1.1, mT5), 'relu' (original T5), or
      '[gated-]relu|gelu|gelu_new|silu'.
    tie_word_embeddings: reuse the embedding as ``lm_head`` (original T5;
      then the decoder output is scaled by ``d_model ** -0.5``).
    pad_token_id: the encoder padding mask is ``tokens != pad_token_id``.
    eos_token_id: end of sequence, stops greedy decoding.
    decoder_start_token_id: first decoder input.
    model_type: 't5' or 'mt5' (written back to config.json).
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_layers: int = 8
  num_decoder_layers: int | None = None
  num_heads: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  feed_forward_proj: str = 'gated-gelu'
  tie_word_embeddings: bool = False
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  model_type: str = 't5'

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, 'num_decoder_layers', self.num_layers)
    self.activation  # Validates feed_forward_proj.  pylint: disable=pointless-statement
    for name in ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers',
                 'num_decoder_layers', 'num_heads',
                 'relative_attention_num_buckets',
                 'relative_attention_max_distance'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'T5Config.{name} must be a positive integer, got '
                         f'{value!r}.')
    buckets = self.relative_attention_num_buckets
    if buckets < 4 or self.relative_attention_max_distance <= buckets // 2:
      # The log-spaced buckets start at num_buckets // 4 (encoder) and
      # num_buckets // 2 (decoder) and end at max_distance: 2 buckets had
      # divided by zero at the first forward, and a max_distance at or below
      # the exact range had indexed the bias table with negative buckets.
      raise ValueError(
          'T5Config needs relative_attention_num_buckets >= 4 and '
          'relative_attention_max_distance > relative_attention_num_buckets '
          f'// 2, got {buckets} and {self.relative_attention_max_distance}.')
    rate = self.dropout_rate
    if (isinstance(rate, bool) or not isinstance(rate, (int, float)) or
        not 0 <= rate < 1):
      # 1.5 had zeroed every activation in training, -0.5 turned dropout
      # off, and a string failed at the first layer.
      raise ValueError(f'T5Config.dropout_rate must be a number in [0, 1), '
                       f'got {rate!r}.')
    # Indices into the embedding: -1 (a SentencePiece model without a pad
    # or EOS piece) had wrapped round to the last row, silently.
    for name in ('pad_token_id', 'eos_token_id', 'decoder_start_token_id'):
      value = getattr(self, name)
      if (not isinstance(value, int) or isinstance(value, bool) or
          not 0 <= value < self.vocab_size):
        raise ValueError(f'T5Config.{name} must be a token id in [0, '
                         f'{self.vocab_size}), got {value!r}.')

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith('gated-')

  @property
  def activation(self) -> Callable[[jax.Array], jax.Array]:
    name = self.feed_forward_proj.split('-')[-1]
    # HF maps 'gated-gelu' to the tanh approximation (``gelu_new``).
    if self.feed_forward_proj == 'gated-gelu':
      name = 'gelu_new'
    parts = self.feed_forward_proj.split('-')
    if name not in _ACTIVATIONS or len(parts) > 2 or (
        len(parts) == 2 and parts[0] != 'gated'):
      raise ValueError(
          f'T5Config.feed_forward_proj {self.feed_forward_proj!r} is not '
          f'supported; expected [gated-]{{{"|".join(_ACTIVATIONS)}}}.')
    return _ACTIVATIONS[name]


def _t5(vocab, d_model, d_ff, heads, layers, model_type):
  return T5Config(vocab_size=vocab, d_model=d_model, d_kv=64, d_ff=d_ff,
                  num_layers=layers, num_heads=heads, model_type=model_type)


_SIZES = {  # name: (d_model, d_ff, num_heads, num_layers), as released.
    'small': (512, 1024, 6, 8),
    'base': (768, 2048, 12, 12),
    'large': (1024, 2816, 16, 24),
    'xl': (2048, 5120, 32, 24),
    'xxl': (4096, 10240, 64, 24),
}

CONFIGS: dict[str, T5Config] = {
    'tiny': T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48,
                     num_layers=2, num_decoder_layers=2, num_heads=4,
                     relative_attention_num_buckets=8,
                     relative_attention_max_distance=16),
}
for _size, (_d, _f, _n, _l) in _SIZES.items():
  CONFIGS[f't5-v1_1-{_size}'] = _t5(32128, _d, _f, _n, _l, 't5')
  CONFIGS[f'mt5-{_size}'] = _t5(250112, _d, _f, _n, _l, 'mt5')


def get_config(name: str, **overrides) -> T5Config:
  """A named config ('tiny', 't5-v1_1-{small..xxl}', 'mt5-{small..xxl}')."""
  if name not in CONFIGS:
    raise ValueError(f'Unknown T5 config {name!r}; choose from '
                     f'{", ".join(CONFIGS)}.')
  return dataclasses.replace(CONFIGS[name], **overrides)


def _param(value, axes):
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


def relative_position_bucket(relative_position: jax.Array, *,
                             bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bucketing of ``key_position - query_position`` (as in HF/Mesh TF).

  Half the buckets (all, if causal) are exact for small distances; the rest
  grow logarithmically up to ``max_distance``, beyond which they saturate.
  """
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Clamp before the log so n = 0 (masked out by is_small) gives no -inf.
  large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
      / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  ).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, n, large)


class RMSNorm(nnx.Module):
  """T5's layer norm: ``scale * x / sqrt(mean(x^2) + eps)`` (float32 inside)."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.scale = _param(jnp.ones((dim,), param_dtype), ('norm',))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    # The gain at y's rank (jax_numpy_rank_promotion='raise' refuses less).
    gain = self.scale[...].astype(jnp.float32)
    return (gain.reshape((1,) * (y.ndim - 1) + (-1,)) * y).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention without query scaling; optional bias table."""

  def __init__(self, config: T5Config, *, has_relative_bias: bool,
               bidirectional: bool, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, h = config.d_model, config.num_heads, config.d_kv
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # HF's init: the 1/sqrt(H) query scale lives in q's init instead.
    self.q = Projection((d,), (n, h), axes=('embed', 'heads', 'head_dim'),
                        kernel_init=_normal((d * h) ** -0.5), **kw)
    self.k = Projection((d,), (n, h), axes=('embed', 'heads', 'head_dim'),
                        kernel_init=_normal(d ** -0.5), **kw)
    self.v = Projection((d,), (n, h), axes=('embed', 'heads', 'head_dim'),
                        kernel_init=_normal(d ** -0.5), **kw)
    self.o = Projection((n, h), (d,), axes=('heads', 'head_dim', 'embed'),
                        kernel_init=_normal((n * h) ** -0.5), **kw)
    self.relative_attention_bias = (
        _param(_normal(d ** -0.5)(
            rngs.params(), (config.relative_attention_num_buckets, n),
            param_dtype), ('relpos_buckets', 'heads'))
        if has_relative_bias else None)
    self.bidirectional = bidirectional
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    self.dropout = (nnx.Dropout(config.dropout_rate, rngs=rngs)
                    if config.dropout_rate > 0 else None)
    self.dtype = dtype

  def position_bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """[1, N, T, S] float32 bias for query positions [T], key positions [S]."""
    buckets = relative_position_bucket(
        k_pos[None, :] - q_pos[:, None], bidirectional=self.bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance)
    table = self.relative_attention_bias[...].astype(jnp.float32)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]

  def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.k(x), self.v(x)

  def __call__(self, x: jax.Array, k: jax.Array, v: jax.Array,
               bias: jax.Array) -> jax.Array:
    """x [B, T, D] attends to k, v [B, S, N, H]; bias [B|1, N|1, T, S]."""
    q = self.q(x)
    scores = jnp.einsum('btnh,bsnh->bnts', q, k).astype(jnp.float32) + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    if self.dropout is not None:
      weights = self.dropout(weights)
    return self.o(jnp.einsum('bnts,bsnh->btnh', weights, v))


class MLP(nnx.Module):
  """Gated (wi_0, wi_1, wo) or plain (wi, wo) feed-forward block."""

  def __init__(self, config: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = config.d_model, config.d_ff
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    wi = lambda: Projection((d,), (f,), axes=('embed', 'mlp'),
                            kernel_init=_normal(d ** -0.5), **kw)
    if config.is_gated:
      self.wi_0 = wi()
      self.wi_1 = wi()
    else:
      self.wi = wi()
    self.wo = Projection((f,), (d,), axes=('mlp', 'embed'),
                         kernel_init=_normal(f ** -0.5), **kw)
    self.act = config.activation
    self.gated = config.is_gated
    self.dropout = (nnx.Dropout(config.dropout_rate, rngs=rngs)
                    if config.dropout_rate > 0 else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.gated:
      h = self.act(self.wi_0(x)) * self.wi_1(x)
    else:
      h = self.act(self.wi(x))
    if self.dropout is not None:
      h = self.dropout(h)
    return self.wo(h)


class Block(nnx.Module):
  """Pre-norm residual block: self-attention, [cross-attention,] FFN."""

  def __init__(self, config: T5Config, *, decoder: bool, first: bool, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = lambda: RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                           param_dtype=param_dtype)
    self.self_attn_norm = norm()
    self.self_attn = Attention(config, has_relative_bias=first,
                               bidirectional=not decoder, **kw)
    if decoder:
      self.cross_attn_norm = norm()
      self.cross_attn = Attention(config, has_relative_bias=False,
                                  bidirectional=True, **kw)
    else:
      self.cross_attn_norm = self.cross_attn = None
    self.mlp_norm = norm()
    self.mlp = MLP(config, **kw)
    self.dropout = (nnx.Dropout(config.dropout_rate, rngs=rngs)
                    if config.dropout_rate > 0 else None)

  def _drop(self, x):
    return self.dropout(x) if self.dropout is not None else x

  def __call__(self, x, self_bias, cross=None, cross_bias=None, cache=None,
               index=None):
    """One block; returns (x, updated self-attention cache or None).

    Args:
      x: [B, T, D].
      self_bias: position bias + mask for self-attention, [B|1, N, T, S].
      cross: (k, v) of the encoder output for cross-attention, or None.
      cross_bias: mask for cross-attention, [B, 1, 1, S_enc].
      cache: (k, v) [B, S_max, N, H] of earlier decoder positions, or None.
      index: position of x's first token in the cache.
    """
    h = self.self_attn_norm(x)
    k, v = self.self_attn.project_kv(h)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype),
                                              index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype),
                                              index, axis=1)
      cache = (k, v)
    x = x + self._drop(self.self_attn(h, k, v, self_bias))
    if self.cross_attn is not None:
      h = self.cross_attn_norm(x)
      x = x + self._drop(self.cross_attn(h, cross[0], cross[1], cross_bias))
    x = x + self._drop(self.mlp(self.mlp_norm(x)))
    return x, cache


class Stack(nnx.Module):
  """The encoder or the decoder: blocks and a final RMSNorm."""

  def __init__(self, config: T5Config, *, decoder: bool, dtype, param_dtype,
               rngs: nnx.Rngs):
    n = config.num_decoder_layers if decoder else config.num_layers
    self.layers = nnx.List([
        Block(config, decoder=decoder, first=i == 0, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs) for i in range(n)])
    self.final_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                              param_dtype=param_dtype)
    self.dropout = (nnx.Dropout(config.dropout_rate, rngs=rngs)
                    if config.dropout_rate > 0 else None)

  def _drop(self, x):
    return self.dropout(x) if self.dropout is not None else x


def _key_mask(valid: jax.Array) -> jax.Array:
  """[B, S] bool -> additive [B, 1, 1, S] float32 mask."""
  return jnp.where(valid, 0.0, _MASK_VALUE)[:, None, None, :].astype(jnp.float32)


class T5(nnx.Module):
  """T5 / mT5 encoder-decoder: ``model(encoder_tokens, decoder_tokens)``."""

  # apply_lora's default targets for this model (``wi`` covers wi_0 and wi_1).
  default_lora_targets = ('q', 'k', 'v', 'o', 'wi', 'wo')

  def __init__(self, config: T5Config, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs, remat: bool = False):
    check_float_dtypes('T5', dtype=dtype, param_dtype=param_dtype)
    self.config = config
    self.dtype = dtype
    # Each block's activations recomputed in the backward pass
    # (`models.layers.call_block`); an attribute, settable after loading.
    self.remat = remat
    self.embedding = _param(
        _normal(1.0)(rngs.params(), (config.vocab_size, config.d_model),
                     param_dtype), ('vocab', 'embed'))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = Stack(config, decoder=False, **kw)
    self.decoder = Stack(config, decoder=True, **kw)
    # Logits accumulate in float32: bfloat16 had rounded them (steps of
    # 0.125-0.25 at 20-50), and with them the loss and every eval score.
    self.lm_head = (None if config.tie_word_embeddings else Projection(
        (config.d_model,), (config.vocab_size,), axes=('embed', 'vocab'),
        kernel_init=_normal(config.d_model ** -0.5), out_dtype=jnp.float32,
        **kw))

  def _embed(self, tokens: jax.Array, who: str) -> jax.Array:
    # Eager calls only (a tracer is not read): an id outside the vocabulary
    # had wrapped round (-100, a label's ignore id) or filled NaN.
    check_token_ids(tokens, self.config.vocab_size, who)
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def encode(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encoder states [B, S, D] and the padding mask [B, S] of ``tokens``."""
    check_token_rows(tokens, 'T5 encoder')
    valid = tokens != self.config.pad_token_id
    x = shard_batch(self.encoder._drop(self._embed(tokens, 'T5 encoder')))
    pos = jnp.arange(tokens.shape[1])
    bias = (self.encoder.layers[0].self_attn.position_bias(pos, pos)
            + _key_mask(valid))
    for layer in self.encoder.layers:
      x, _ = call_block(layer, self.remat, x, bias)
      x = shard_batch(x)
    return self.encoder._drop(self.encoder.final_norm(x)), valid

  def cross_kv(self, encoded: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Cross-attention keys/values of every decoder layer (computed once)."""
    return [layer.cross_attn.project_kv(encoded) for layer in self.decoder.layers]

  def decode(self, tokens: jax.Array, cross: list, valid: jax.Array,
             cache: list | None = None, index: jax.Array | int = 0):
    """Decoder logits [B, T, V] float32 (and the updated cache, if given).

    Without ``cache`` the T tokens are positions 0..T-1 under a causal mask;
    with ``cache`` (per layer (k, v) [B, S_max, N, H]) they are positions
    ``index .. index + T - 1`` and attend to the cached positions before them.
    """
    check_token_rows(tokens, 'T5 decoder')
    if jnp.shape(valid)[:1] != jnp.shape(tokens)[:1]:
      # It would broadcast one row over the other input's rows.
      raise ValueError(
          f'T5: the decoder tokens have {tokens.shape[0]} rows but the '
          f'encoder input had {jnp.shape(valid)[0]}; give both the same '
          'batch.')
    t = tokens.shape[1]
    if cache is not None:
      if cache[0][0].shape[0] != tokens.shape[0]:
        # It would broadcast: the other rows read another row's keys.
        raise ValueError(
            f'the KV cache holds {cache[0][0].shape[0]} rows but the tokens '
            f'have {tokens.shape[0]}; make it with init_cache(model, '
            f'{tokens.shape[0]}, ...).')
      check_cache_room(cache[0][0].shape[1], index, t)
    q_pos = index + jnp.arange(t)
    k_pos = jnp.arange(t if cache is None else cache[0][0].shape[1])
    causal = k_pos[None, :] <= q_pos[:, None]
    bias = (self.decoder.layers[0].self_attn.position_bias(q_pos, k_pos)
            + jnp.where(causal, 0.0, _MASK_VALUE)[None, None])
    cross_bias = _key_mask(valid)
    x = shard_batch(self.decoder._drop(self._embed(tokens, 'T5 decoder')))
    new_cache = []
    for i, layer in enumerate(self.decoder.layers):
      x, c = call_block(layer, self.remat and cache is None, x, bias,
                        cross[i], cross_bias,
                        None if cache is None else cache[i], index)
      x = shard_batch(x)
      new_cache.append(c)
    x = self.decoder._drop(self.decoder.final_norm(x))
    if self.lm_head is None:
      x = x * self.config.d_model ** -0.5
      logits = jnp.einsum('btd,vd->btv', x,
                          self.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(x)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)

  def __call__(self, encoder_tokens: jax.Array,
               decoder_tokens: jax.Array) -> jax.Array:
    """Teacher-forced decoder logits, float32 [B, T, V].

    Args:
      encoder_tokens: int [B, S]; ``pad_token_id`` marks padding.
      decoder_tokens: int [B, T], starting with ``decoder_start_token_id``
        (which is the pad id in T5, so the decoder is masked causally only).
    """
    encoded, valid = self.encode(encoder_tokens)
    return self.decode(decoder_tokens, self.cross_kv(encoded), valid)


def init_cache(model: T5, batch_size: int, max_length: int,
               like: jax.Array | None = None) -> list:
  """Zero self-attention KV cache of every decoder layer.

  With ``like`` (an array whose first axis is the batch, e.g. the encoder's
  valid mask) the cache is made sharded over the batch as it is: made
  plainly, all of it sat on the first device until the first step (an
  mT5-XXL evaluation batch's cache is gigabytes).
  """
  check_positive_ints('init_cache', batch_size=batch_size,
                    max_length=max_length)
  c = model.config
  shape = (batch_size, max_length, c.num_heads, c.d_kv)
  sharding = getattr(like, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding) and sharding.spec:
    out = jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(
            sharding.spec[0], *([None] * (len(shape) - 1))))
    zeros = jax.jit(lambda: jnp.zeros(shape, model.dtype), out_shardings=out)
  else:
    zeros = lambda: jnp.zeros(shape, model.dtype)
  return [(zeros(), zeros()) for _ in range(c.num_decoder_layers)]


@nnx.jit
def _encode_for_decoding(model: T5, tokens):
  encoded, valid = model.encode(tokens)
  return model.cross_kv(encoded), valid


@nnx.jit
def _decode_step(model: T5, token, cross, valid, cache, index):
  logits, cache = model.decode(token, cross, valid, cache, index)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), logits[:, -1], cache


def greedy_generate(model: T5, encoder_tokens: jax.Array, max_new_tokens: int,
                    *, use_cache: bool = True,
                    return_logits: bool = False):
  """Greedy decoding; int32 [B, max_new_tokens] (pad after each row's EOS).

  With ``use_cache`` the encoder runs once and each step feeds one token
  through the decoder's KV cache; without it every step reruns the full
  forward (the reference the cache is tested against). The model runs in
  eval mode (no dropout) whatever mode it is in.

  With ``return_logits``, ``(tokens, logits)``: logits [B, steps, vocab] of
  the steps run, where decoding stops once every row has ended, so
  ``steps`` can be fewer than ``max_new_tokens`` (the tokens are padded to
  it; the logits are not, as no step computed them).
  """
  check_positive_ints('greedy_generate', max_new_tokens=max_new_tokens)
  max_new_tokens = operator.index(max_new_tokens)
  encoder_tokens = jnp.asarray(encoder_tokens)
  if encoder_tokens.ndim != 2 or not jnp.issubdtype(encoder_tokens.dtype,
                                                    jnp.integer):
    raise ValueError('greedy_generate: encoder_tokens must be [batch, seq] '
                     f'ints, got {encoder_tokens.dtype} of shape '
                     f'{encoder_tokens.shape}.')
  check_token_ids(encoder_tokens, model.config.vocab_size,
                  'greedy_generate: encoder')
  # Generation is inference: an eval-mode copy sharing the weights (no
  # dropout, a LoRA adapter's included); the caller's model keeps its mode.
  model = nnx.merge(*nnx.split(model))
  model.eval()
  c = model.config
  b = encoder_tokens.shape[0]
  start = jnp.full((b, 1), c.decoder_start_token_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  out, step_logits = [], []
  if use_cache:
    cross, valid = _encode_for_decoding(model, encoder_tokens)
    cache = init_cache(model, b, max_new_tokens, like=valid)
    token = start
  else:
    seq = start
  for i in range(max_new_tokens):
    if use_cache:
      nxt, logits, cache = _decode_step(model, token, cross, valid, cache,
                                        jnp.int32(i))
    else:
      logits = _full_forward(model, encoder_tokens, seq)[:, -1]
      nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, c.pad_token_id, nxt)
    done = done | (nxt == c.eos_token_id)
    out.append(nxt)
    step_logits.append(logits)
    if use_cache:
      token = nxt[:, None]
    else:
      seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    if bool(done.all()):
      # The rest is padding, as many rows as max_new_tokens always: a
      # stack and pad of as many as this batch took compiled again for each
      # new length, evaluation after evaluation. (A row like nxt keeps its
      # sharding, over several hosts too.)
      out += [jnp.where(done, c.pad_token_id, nxt)] * (
          max_new_tokens - len(out))
      break
  tokens = jnp.stack(out, axis=1)
  return (tokens, jnp.stack(step_logits, axis=1)) if return_logits else tokens


@nnx.jit
def _full_forward(model: T5, encoder_tokens, decoder_tokens):
  return model(encoder_tokens, decoder_tokens)


# ---------------------------------------------------------------------------
# Hugging Face checkpoints.

_CONFIG_FIELDS = {  # HF name: (type, required)
    'vocab_size': (int, True), 'd_model': (int, True), 'd_kv': (int, True),
    'd_ff': (int, True), 'num_layers': (int, True), 'num_heads': (int, True),
    'num_decoder_layers': (int, False),
    'relative_attention_num_buckets': (int, False),
    'relative_attention_max_distance': (int, False),
    'layer_norm_epsilon': (float, False), 'dropout_rate': (float, False),
    'feed_forward_proj': (str, False), 'tie_word_embeddings': (bool, False),
    'pad_token_id': (int, False), 'eos_token_id': (int, False),
    'decoder_start_token_id': (int, False), 'model_type': (str, False),
}


def config_from_hf(data: dict[str, Any], where: str = 'config.json') -> T5Config:
  """A :class:`T5Config` from the fields of a Hugging Face config.json."""
  model_type = data.get('model_type', 't5')
  if model_type not in ('t5', 'mt5'):
    raise ValueError(f'{where}: model_type {model_type!r} is not a T5/mT5 '
                     'model (expected "t5" or "mt5").')
  kwargs = {}
  for name, (kind, required) in _CONFIG_FIELDS.items():
    if name not in data or data[name] is None:
      if required:
        raise ValueError(f'{where}: missing required field {name!r}.')
      continue
    value = data[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if name == 'eos_token_id' and isinstance(value, list) and value:
      value = value[0]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise ValueError(f'{where}: field {name!r} must be {kind.__name__}, got '
                       f'{data[name]!r}.')
    kwargs[name] = value
  # An absent field takes its HF class's default: T5Config ties the head
  # and uses 'relu' (the original T5 configs omit both; v1.1 configs say
  # false and 'gated-gelu'), MT5Config unties it and uses 'gated-gelu'.
  mt5 = model_type == 'mt5'
  if not mt5 and isinstance(data.get('scale_decoder_outputs'), bool):
    # transformers 5 writes tie_word_embeddings true for every T5 and keeps
    # the real setting (the tied, rescaled head of the original T5, or v1.1's
    # own head) here.
    kwargs['tie_word_embeddings'] = data['scale_decoder_outputs']
  kwargs.setdefault('tie_word_embeddings', not mt5)
  kwargs.setdefault('feed_forward_proj', 'gated-gelu' if mt5 else 'relu')
  try:
    return T5Config(**kwargs)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


def config_to_hf(config: T5Config, dtype) -> dict[str, Any]:
  """The config.json fields Hugging Face needs to load the checkpoint."""
  arch = 'MT5ForConditionalGeneration' if config.model_type == 'mt5' else (
      'T5ForConditionalGeneration')
  data = {name: getattr(config, name) for name in _CONFIG_FIELDS}
  data.update(architectures=[arch], is_encoder_decoder=True,
              is_gated_act=config.is_gated,
              dense_act_fn=('gelu_new' if config.feed_forward_proj == 'gated-gelu'
                            else config.feed_forward_proj.split('-')[-1]),
              torch_dtype=np.dtype(dtype).name, use_cache=True,
              initializer_factor=1.0)
  return data


def _hf_params(model: T5) -> Iterator[tuple[str, nnx.Variable, str]]:
  """(HF tensor name, our variable, kind) for every parameter of ``model``.

  kind: None for tensors stored alike on both sides; for linear weights the
  number of leading kernel axes that are inputs (HF stores [out, in], our
  kernel is in_shape + out_shape).
  """
  linear = lambda proj: (proj.kernel, len(proj.in_shape))
  yield 'shared.weight', model.embedding, None
  if model.lm_head is not None:
    yield ('lm_head.weight', *linear(model.lm_head))
  for stack_name in ('encoder', 'decoder'):
    stack = getattr(model, stack_name)
    yield f'{stack_name}.final_layer_norm.weight', stack.final_norm.scale, None
    for i, layer in enumerate(stack.layers):
      pre = f'{stack_name}.block.{i}.layer'
      yield f'{pre}.0.layer_norm.weight', layer.self_attn_norm.scale, None
      attns = [('0.SelfAttention', layer.self_attn)]
      if layer.cross_attn is not None:
        attns.append(('1.EncDecAttention', layer.cross_attn))
        yield f'{pre}.1.layer_norm.weight', layer.cross_attn_norm.scale, None
      for name, attn in attns:
        for p in 'qkvo':
          yield (f'{pre}.{name}.{p}.weight', *linear(getattr(attn, p)))
        if attn.relative_attention_bias is not None:
          yield (f'{pre}.{name}.relative_attention_bias.weight',
                 attn.relative_attention_bias, None)
      ff = 2 if layer.cross_attn is not None else 1
      yield f'{pre}.{ff}.layer_norm.weight', layer.mlp_norm.scale, None
      for p in (('wi_0', 'wi_1') if layer.mlp.gated else ('wi',)) + ('wo',):
        yield (f'{pre}.{ff}.DenseReluDense.{p}.weight',
               *linear(getattr(layer.mlp, p)))


# Tied copies of shared.weight that HF may or may not write.
_TIED_ALIASES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
_UNUSED_CROSS_BIAS = (
    'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight')


def _materialize_rng_state(model: T5, seed: int) -> None:
  """Gives dropout's RNG streams, left abstract by eval_shape, real state."""
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.iter_graph(model)):
    if not isinstance(var, nnx.Variable):
      continue
    value = var.get_value()
    if not isinstance(value, jax.ShapeDtypeStruct):
      continue
    if isinstance(var, nnx.RngKey):
      var.set_value(jax.random.fold_in(key, i))
    elif isinstance(var, nnx.RngCount):
      var.set_value(jnp.zeros(value.shape, value.dtype))
    else:  # A parameter _hf_params does not cover: a bug, not bad input.
      raise RuntimeError(f'from_pretrained left {_path(path)} unset.')


def _path(path) -> str:
  return '.'.join(str(p) for p in path)


# A T5 / mT5 folder's SentencePiece model, by the names it goes by.
TOKENIZER_FILES = ('spiece.model', 'tokenizer.model')


def tokenizer_mismatch(tokenizer, config: T5Config) -> str | None:
  """Why ``tokenizer`` does not fit a model of ``config``, or None.

  Its pad and EOS ids must be the model's: T5 masks encoder padding by the
  pad id, starts the decoder with it and stops on EOS, and a prompt ends
  in EOS.
  """
  if (tokenizer.pad_id, tokenizer.eos_id) == (config.pad_token_id,
                                              config.eos_token_id):
    return None
  return (f'the tokenizer\'s pad / EOS ids ({tokenizer.pad_id}, '
          f'{tokenizer.eos_id}) are not the model\'s ({config.pad_token_id}, '
          f'{config.eos_token_id}); use the checkpoint\'s spiece.model.')


def tokenizer_file(folder: str | os.PathLike) -> str | None:
  """The SentencePiece model in a Hugging Face T5 / mT5 folder, or None."""
  return next((os.path.join(folder, n) for n in TOKENIZER_FILES
               if os.path.isfile(os.path.join(folder, n))), None)


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32,
                    param_dtype=jnp.float32,
                    dropout_rate: float | None = 0.0, seed: int = 0,
                    place: Callable[[nnx.Variable, np.ndarray], jax.Array]
                    | None = None) -> T5:
  """Loads a Hugging Face T5 v1.1 / mT5 checkpoint directory.

  The head is read as the transformers version that wrote config.json reads
  it: a file without ``lm_head.weight`` whose head transformers 5 takes
  unscaled from the embedding (T5 with ``scale_decoder_outputs`` false, an
  mT5 it wrote) gets a head copied from the embedding (untied: the
  embedding's memory twice).

  Args:
    path: directory with config.json and model.safetensors (or shards with
      model.safetensors.index.json), PyTorch names and [out, in] weights.
    dtype: compute dtype.
    param_dtype: dtype the parameters are stored in.
    dropout_rate: overrides config.json's dropout (default 0: a
      deterministic model; ``None`` keeps the checkpoint's rate). The
      model keeps the checkpoint's rate too, which `save_pretrained`
      writes.
    seed: seeds the dropout streams (when the rate is not 0).
    place: ``place(variable, host array) -> jax.Array`` puts each weight
      where it goes, e.g. straight to its sharding over a mesh (the train
      loop does: an mT5-XXL never lands whole on the first device);
      default the default device.

  Raises:
    FileNotFoundError: no directory, config.json or weights.
    ValueError: a malformed config, or missing / mis-shaped / unexpected
      tensors (the message names the file and the tensor).
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'{path}: not a directory (expected a Hugging '
                            'Face checkpoint with config.json).')
  config_path = path / hf_io.CONFIG
  data = hf_io.read_json(config_path, 'config.json')
  config = config_from_hf(data, str(config_path))
  checkpoint_rate = config.dropout_rate
  if dropout_rate is not None:
    config = dataclasses.replace(config, dropout_rate=dropout_rate)
  tensors = hf_io.open_tensors(path)
  if (config.model_type == 'mt5' and config.tie_word_embeddings and
      'lm_head.weight' in tensors):
    # transformers 5 writes tie_word_embeddings true for every mT5 and
    # saves its head (mT5's own, untied), which it loads as it is, unscaled.
    config = dataclasses.replace(config, tie_word_embeddings=False)
  head_from_embedding = ('lm_head.weight' not in tensors and
                         _tied_unscaled_head(data))
  if head_from_embedding:
    # The head is the embedding, unscaled: a head of its own made from it.
    config = dataclasses.replace(config, tie_word_embeddings=False)
  # HF may write the embedding only under a tied alias.
  embed_name = next((n for n in ('shared.weight',) + _TIED_ALIASES
                     if n in tensors), 'shared.weight')
  # Build without random init (a large model would not fit twice), then fill;
  # the dtypes checked first, as eval_shape would add its traceback note.
  check_float_dtypes('T5', dtype=dtype, param_dtype=param_dtype)
  model = nnx.eval_shape(lambda: T5(config, dtype=dtype, param_dtype=param_dtype,
                                    rngs=nnx.Rngs(0)))
  # The original T5 checkpoints hold a cross-attention position bias no
  # layer uses (transformers ignores it too).
  used = set(_TIED_ALIASES) | {_UNUSED_CROSS_BIAS}
  for name, var, kind in _hf_params(model):
    stored = embed_name if name == 'shared.weight' or (
        head_from_embedding and name == 'lm_head.weight') else name
    if stored not in tensors:
      raise ValueError(f'{path}: missing tensor {name!r} (looked in '
                       f'{_weights_files(path)}).')
    where = tensors.file(stored)
    value = hf_io.floating_tensor(tensors[stored], stored, where)
    shape = tuple(var.shape)
    if kind is not None:
      expected = _hf_linear_shape(shape, kind)
      if tuple(value.shape) != expected:
        raise ValueError(f'{where}: tensor {name!r} has shape '
                         f'{tuple(value.shape)}, expected {expected}.')
      value = np.ascontiguousarray(value.T).reshape(shape)
    elif tuple(value.shape) != shape:
      raise ValueError(f'{where}: tensor {name!r} has shape '
                       f'{tuple(value.shape)}, expected {shape}.')
    value = np.asarray(value, dtype=param_dtype)
    var.set_value(place(var, value) if place else jnp.asarray(value))
    used.add(stored)
  if config.tie_word_embeddings and 'lm_head.weight' in tensors:
    # A copy of the tied head is allowed; a head of its own would be
    # dropped for the embedding, silently.
    if not np.array_equal(tensors['lm_head.weight'], tensors[embed_name]):
      raise ValueError(
          f'{tensors.file("lm_head.weight")}: tensor \'lm_head.weight\' is '
          f'not the embedding {embed_name!r}, but config.json ties them '
          '(tie_word_embeddings true or absent); an untied head needs '
          'tie_word_embeddings false.')
    used.add('lm_head.weight')
  unexpected = sorted(set(tensors) - used)
  if unexpected:
    raise ValueError(f'{tensors.file(unexpected[0])}: unexpected tensor '
                     f'{unexpected[0]!r}{hf_io.and_more(unexpected)} for '
                     'this config.json.')
  _materialize_rng_state(model, seed)
  # save_pretrained writes it back: the default override (0, for a
  # deterministic model) had become the saved checkpoint's training rate.
  model.checkpoint_dropout_rate = checkpoint_rate
  return model


def _tied_unscaled_head(data: dict[str, Any]) -> bool:
  """Whether a config.json written without `lm_head.weight` means the
  embedding as the head, unscaled (the one combination `T5Config` lacks).

  transformers 5 takes the head from `lm_head.weight` when the file has it,
  else from the embedding, and scales the decoder's output by d_model^-0.5
  only where `scale_decoder_outputs` says so (T5; never for mT5). A model it
  built from a config (pretrained from scratch) saves the embedding alone:
  such a T5 v1.1 had been refused for a missing lm_head, and such an mT5
  loaded as the original T5's tied, rescaled head (logits off by
  sqrt(d_model)). transformers 4 read a tied head as rescaled.
  """
  if data.get('model_type', 't5') == 'mt5':
    version = str(data.get('transformers_version', ''))
    major = version.split('.')[0]
    return major.isdigit() and int(major) >= 5
  return data.get('scale_decoder_outputs') is False


def _weights_files(path: Path) -> str:
  single = path / hf_io.SAFETENSORS
  return single.name if single.is_file() else hf_io.SAFETENSORS_INDEX + ' shards'


def _hf_linear_shape(shape, n_in: int) -> tuple[int, int]:
  """HF's [out, in] shape of a kernel of ``shape`` with ``n_in`` input axes."""
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def save_pretrained(model: T5, directory: str | os.PathLike, *,
                    max_shard_bytes: int | None = None,
                    allow_residual_base: bool = False) -> Path:
  """Writes ``model`` as a Hugging Face checkpoint directory.

  Writes config.json and model.safetensors (or shards and an index when the
  weights need more than one shard of ``max_shard_bytes``) in the
  parameters' dtype; config.json's ``dropout_rate`` is that of the
  checkpoint the model was loaded from (not `from_pretrained`'s override),
  else its config's. Kernels are
  written as they are: LoRA adapters are not included unless merged
  (``models.lora.merge_lora``; or export them with
  ``models.lora.save_peft_adapter``), and after a PiSSA / LoRA-GA init the
  kernels hold the residual ``W0 - s A0 B0``, not the original weights,
  so such a model is refused unless ``allow_residual_base``. The other
  layout's files of an earlier save in ``directory`` (single file or
  shards) are removed.

  Raises:
    ValueError: an unmerged PiSSA / LoRA-GA adapter (merge_lora or
      remove_lora first, or allow_residual_base), or a config value JSON
      cannot hold; nothing is written then.
  """
  directory = hf_io.check_directory(directory, 't5.save_pretrained')
  hf_io.check_shard_bytes(max_shard_bytes, 't5.save_pretrained')
  lora.check_no_residual_base(model, 't5.save_pretrained',
                              allowed=allow_residual_base)
  config = model.config
  rate = getattr(model, 'checkpoint_dropout_rate', None)
  if rate is not None:  # loaded by from_pretrained, with its rate overridden
    config = dataclasses.replace(config, dropout_rate=rate)
  config = hf_io.dumps_json(
      config_to_hf(config, model.embedding[...].dtype),
      directory / hf_io.CONFIG)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for name, var, kind in _hf_params(model):
    value = np.asarray(jax.device_get(var[...]))
    if kind is not None:
      rows, cols = _hf_linear_shape(value.shape, kind)
      value = value.reshape(cols, rows).T
    tensors[name] = value
  hf_io.save_tensors(directory, tensors, max_shard_bytes,
                     texts={hf_io.CONFIG: config})
  return directory

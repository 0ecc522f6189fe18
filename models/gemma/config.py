"""Gemma 1, 2 and 3 (text) hyper-parameters and the named configurations.

One frozen dataclass describes every family; the family-specific features
(soft-capping, post norms, QK-norm, local/global layers, two RoPE bases) are
plain fields so a loader can fill them from a checkpoint's metadata and the
model never branches on a family number.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

LOCAL = 'local'    # sliding-window attention layer
GLOBAL = 'global'  # full causal attention layer


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Hyper-parameters of a Gemma decoder.

  Attributes:
    family: 1, 2 or 3 (the Hugging Face `model_type` on export).
    vocab_size: rows of the (tied) embedding.
    width: model dimension D.
    num_layers: transformer blocks.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (1: multi-query; N: multi-head).
    head_dim: H.
    mlp_dim: GeGLU hidden size F.
    norm_eps: RMSNorm epsilon.
    query_pre_attn_scalar: queries are scaled by this ** -0.5 (default
      head_dim; Gemma 2 27B and Gemma 3 27B use width / num_heads).
    attn_logit_softcap: Gemma 2: tanh soft-cap of attention logits.
    final_logit_softcap: Gemma 2: tanh soft-cap of the output logits.
    attention_pattern: layer kinds, repeated cyclically over the layers
      (layer i is ``attention_pattern[i % len(attention_pattern)]``).
    sliding_window: window of the local layers (a query sees itself and the
      ``sliding_window - 1`` previous tokens).
    rope_base_global / rope_base_local: RoPE wavelength bases per layer kind.
    rope_scale_global / rope_scale_local: linear RoPE position scaling
      (Gemma 3 4B+ stretch the global layers by 8).
    use_post_norms: Gemma 2/3: RMSNorm after attention and after the MLP.
    use_qk_norm: Gemma 3: RMSNorm of queries and keys per head.
    max_seq_len: context length the checkpoint was trained for.
  """

  family: int
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float = 1e-6
  query_pre_attn_scalar: float | None = None  # None: head_dim
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  attention_pattern: tuple[str, ...] = (GLOBAL,)
  sliding_window: int | None = None
  rope_base_global: float = 10_000.0
  rope_base_local: float = 10_000.0
  rope_scale_global: float = 1.0
  rope_scale_local: float = 1.0
  use_post_norms: bool = False
  use_qk_norm: bool = False
  max_seq_len: int = 8192

  def __post_init__(self):
    if self.family not in (1, 2, 3):
      raise ValueError(f'GemmaConfig.family must be 1, 2 or 3, got {self.family}.')
    # Sizes first: a zero or negative one would build an empty or broken
    # model (or divide by zero below) instead of being refused.
    for name in ('vocab_size', 'width', 'num_layers', 'num_heads',
                 'num_kv_heads', 'head_dim', 'mlp_dim', 'max_seq_len'):
      _check_positive_int(name, getattr(self, name))
    if self.sliding_window is not None:
      # A window below 1 masks every key of the local layers.
      _check_positive_int('sliding_window', self.sliding_window)
    for name in ('query_pre_attn_scalar', 'attn_logit_softcap',
                 'final_logit_softcap'):
      if getattr(self, name) is not None:
        _check_positive_number(name, getattr(self, name))
    for name in ('rope_base_global', 'rope_base_local', 'rope_scale_global',
                 'rope_scale_local'):
      _check_positive_number(name, getattr(self, name))
    # Finite: an infinite one makes every RMSNorm output 0.
    if not _is_number(self.norm_eps) or not 0 <= self.norm_eps < math.inf:
      raise ValueError('GemmaConfig.norm_eps must be a finite number >= 0, '
                       f'got {self.norm_eps!r}.')
    if self.head_dim % 2:
      # RoPE rotates pairs of features; an odd head_dim had failed in the
      # forward pass as "array split does not result in an equal division".
      raise ValueError(f'GemmaConfig.head_dim must be even (RoPE rotates '
                       f'pairs), got {self.head_dim}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'GemmaConfig.num_heads ({self.num_heads}) must be a multiple of '
          f'num_kv_heads ({self.num_kv_heads}).')
    bad = [k for k in self.attention_pattern if k not in (LOCAL, GLOBAL)]
    if bad or not self.attention_pattern:
      raise ValueError(
          f'GemmaConfig.attention_pattern must be a non-empty tuple of '
          f'{LOCAL!r}/{GLOBAL!r}, got {self.attention_pattern!r}.')
    if LOCAL in self.attention_pattern and not self.sliding_window:
      raise ValueError('GemmaConfig has local layers but no sliding_window.')
    # Tuples keep the dataclass hashable (jit static args) and comparable.
    object.__setattr__(self, 'attention_pattern', tuple(self.attention_pattern))
    # Explicit, so configs compare equal whether the scalar came from a
    # checkpoint or defaulted to head_dim.
    object.__setattr__(self, 'query_pre_attn_scalar',
                       float(self.query_pre_attn_scalar or self.head_dim))

  @property
  def query_scale(self) -> float:
    return float(self.query_pre_attn_scalar) ** -0.5

  def layer_type(self, i: int) -> str:
    return self.attention_pattern[i % len(self.attention_pattern)]

  @property
  def layer_types(self) -> tuple[str, ...]:
    return tuple(self.layer_type(i) for i in range(self.num_layers))

  def replace(self, **kw) -> 'GemmaConfig':
    return dataclasses.replace(self, **kw)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_positive_int(name: str, v) -> None:
  if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
    raise ValueError(f'GemmaConfig.{name} must be a positive integer, got '
                     f'{v!r}.')


def _check_positive_number(name: str, v) -> None:
  if not _is_number(v) or not (v > 0 and math.isfinite(v)):
    raise ValueError(f'GemmaConfig.{name} must be a positive number, got '
                     f'{v!r}.')


def compress_pattern(layer_types: Sequence[str]) -> tuple[str, ...]:
  """The shortest prefix whose cyclic repetition reproduces ``layer_types``."""
  types = tuple(layer_types)
  for p in range(1, len(types) + 1):
    if all(types[i] == types[i % p] for i in range(len(types))):
      return types[:p]
  return types


_GEMMA3_PATTERN = (LOCAL,) * 5 + (GLOBAL,)


def _gemma1(**kw) -> GemmaConfig:
  return GemmaConfig(family=1, vocab_size=256_000, max_seq_len=8192, **kw)


def _gemma2(**kw) -> GemmaConfig:
  return GemmaConfig(family=2, vocab_size=256_000, attn_logit_softcap=50.0,
                     final_logit_softcap=30.0, attention_pattern=(LOCAL, GLOBAL),
                     sliding_window=kw.pop('sliding_window', 4096),
                     use_post_norms=True, max_seq_len=8192, **kw)


def _gemma3(**kw) -> GemmaConfig:
  kw.setdefault('vocab_size', 262_144)
  return GemmaConfig(family=3, attention_pattern=_GEMMA3_PATTERN,
                     rope_base_global=1_000_000.0, rope_base_local=10_000.0,
                     use_post_norms=True, use_qk_norm=True, **kw)


CONFIGS: dict[str, GemmaConfig] = {
    # Gemma 1 (the paper's models).
    'gemma-2b': _gemma1(width=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                        head_dim=256, mlp_dim=16_384),
    'gemma-7b': _gemma1(width=3072, num_layers=28, num_heads=16,
                        num_kv_heads=16, head_dim=256, mlp_dim=24_576),
    # Gemma 2.
    'gemma2-2b': _gemma2(width=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                         head_dim=256, mlp_dim=9216, query_pre_attn_scalar=256),
    'gemma2-9b': _gemma2(width=3584, num_layers=42, num_heads=16,
                         num_kv_heads=8, head_dim=256, mlp_dim=14_336,
                         query_pre_attn_scalar=256),
    'gemma2-27b': _gemma2(width=4608, num_layers=46, num_heads=32,
                          num_kv_heads=16, head_dim=128, mlp_dim=36_864,
                          query_pre_attn_scalar=144),
    # Gemma 3 (text).
    'gemma3-270m': _gemma3(width=640, num_layers=18, num_heads=4,
                           num_kv_heads=1, head_dim=256, mlp_dim=2048,
                           query_pre_attn_scalar=256, sliding_window=512,
                           max_seq_len=32_768),
    'gemma3-1b': _gemma3(width=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                         head_dim=256, mlp_dim=6912, query_pre_attn_scalar=256,
                         sliding_window=512, max_seq_len=32_768),
    'gemma3-4b': _gemma3(vocab_size=262_208, width=2560, num_layers=34,
                         num_heads=8, num_kv_heads=4, head_dim=256,
                         mlp_dim=10_240, query_pre_attn_scalar=256,
                         sliding_window=1024, rope_scale_global=8.0,
                         max_seq_len=131_072),
    'gemma3-12b': _gemma3(vocab_size=262_208, width=3840, num_layers=48,
                          num_heads=16, num_kv_heads=8, head_dim=256,
                          mlp_dim=15_360, query_pre_attn_scalar=256,
                          sliding_window=1024, rope_scale_global=8.0,
                          max_seq_len=131_072),
    'gemma3-27b': _gemma3(vocab_size=262_208, width=5376, num_layers=62,
                          num_heads=32, num_kv_heads=16, head_dim=128,
                          mlp_dim=21_504, query_pre_attn_scalar=168,
                          sliding_window=1024, rope_scale_global=8.0,
                          max_seq_len=131_072),
    # Tiny random configs for tests: every family feature is exercised
    # (MQA, GQA, windows shorter than the test sequences, a global layer in
    # Gemma 3's 5:1 pattern, soft-caps small enough to bite).
    'gemma-tiny': _gemma1(width=64, num_layers=2, num_heads=4, num_kv_heads=1,
                          head_dim=16, mlp_dim=128).replace(vocab_size=256),
    'gemma2-tiny': _gemma2(width=64, num_layers=3, num_heads=4, num_kv_heads=2,
                           head_dim=16, mlp_dim=128, query_pre_attn_scalar=24,
                           sliding_window=4).replace(
                               vocab_size=256, attn_logit_softcap=5.0,
                               final_logit_softcap=3.0),
    'gemma3-tiny': _gemma3(vocab_size=256, width=64, num_layers=7, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_dim=128,
                           sliding_window=4, rope_scale_global=2.0,
                           max_seq_len=1024),
}


def get_config(name: str) -> GemmaConfig:
  """The named configuration, e.g. ``get_config('gemma3-270m')``."""
  try:
    return CONFIGS[name]
  except KeyError:
    raise ValueError(
        f'Unknown Gemma config {name!r}; expected one of '
        f'{", ".join(sorted(CONFIGS))}.') from None

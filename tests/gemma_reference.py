"""An independent float64 numpy Gemma (1, 2, 3) forward, for tests.

Written from Hugging Face's `modeling_gemma.py`, `modeling_gemma2.py` and
`modeling_gemma3.py` (text model), not from `models.gemma`: it reads only
the HF-named weights (`models.gemma.load.iter_named_params`) and the
config's numbers, and decides the architecture itself (which layers slide,
where the norms sit, how heads share keys). Any layer-pattern, norm,
RoPE, soft-cap or head-mapping slip in `models.gemma` then shows as a
logit difference. One sequence, no padding, no cache.
"""

from __future__ import annotations

import numpy as np


def _rms_norm(x, weight, eps):
  """Gemma's RMSNorm: the gain is ``1 + weight``."""
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (
      1.0 + weight)


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) *
                                  (x + 0.044715 * x ** 3)))


def _rope(x, positions, base, scale):
  """HF's rotate_half RoPE of x [T, heads, H]; linear scaling divides the
  frequencies by ``scale``."""
  h = x.shape[-1]
  freqs = 1.0 / base ** (np.arange(0, h, 2, dtype=np.float64) / h) / scale
  angles = np.concatenate([positions[:, None] * freqs] * 2, axis=-1)
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
  rotated = np.concatenate([-x[..., h // 2:], x[..., :h // 2]], axis=-1)
  return x * cos + rotated * sin


def _sliding(family: int, layer: int) -> bool:
  """Which layers attend within the window: none in Gemma 1; the even ones
  in Gemma 2; all but every sixth in Gemma 3 (5 local : 1 global)."""
  if family == 1:
    return False
  if family == 2:
    return layer % 2 == 0
  return (layer + 1) % 6 != 0


def logits(cfg, weights: dict[str, np.ndarray], tokens) -> np.ndarray:
  """[T, vocab] float64 logits of ``tokens`` [T] under HF-named ``weights``."""
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  tokens = np.asarray(tokens)
  t = len(tokens)
  positions = np.arange(t, dtype=np.float64)
  idx = np.arange(t)
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  embed = w['model.embed_tokens.weight']
  x = embed[tokens] * np.sqrt(cfg.width)
  for layer in range(cfg.num_layers):
    p = f'model.layers.{layer}.'
    sliding = _sliding(cfg.family, layer)
    y = _rms_norm(x, w[p + 'input_layernorm.weight'], cfg.norm_eps)
    q = (y @ w[p + 'self_attn.q_proj.weight'].T).reshape(t, n, h)
    key = (y @ w[p + 'self_attn.k_proj.weight'].T).reshape(t, k, h)
    value = (y @ w[p + 'self_attn.v_proj.weight'].T).reshape(t, k, h)
    if cfg.family == 3:  # q/k norms, before RoPE
      q = _rms_norm(q, w[p + 'self_attn.q_norm.weight'], cfg.norm_eps)
      key = _rms_norm(key, w[p + 'self_attn.k_norm.weight'], cfg.norm_eps)
    if cfg.family == 3 and sliding:
      base, scale = cfg.rope_base_local, 1.0
    elif cfg.family == 3:
      base, scale = cfg.rope_base_global, cfg.rope_scale_global
    else:
      base, scale = 10000.0, 1.0
    q, key = _rope(q, positions, base, scale), _rope(key, positions, base,
                                                     scale)
    # repeat_kv: query head j reads key/value head j // (n / k).
    key, value = np.repeat(key, n // k, axis=1), np.repeat(value, n // k,
                                                           axis=1)
    scores = np.einsum('tnh,snh->nts', q, key) * (
        cfg.query_pre_attn_scalar ** -0.5)
    if cfg.family == 2 and cfg.attn_logit_softcap:
      scores = np.tanh(scores / cfg.attn_logit_softcap) * (
          cfg.attn_logit_softcap)
    visible = idx[None, :] <= idx[:, None]
    if sliding:
      visible &= idx[:, None] - idx[None, :] < cfg.sliding_window
    scores = np.where(visible[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum('nts,snh->tnh', probs, value).reshape(t, n * h)
    attn = attn @ w[p + 'self_attn.o_proj.weight'].T
    if cfg.family == 1:
      x = x + attn
      y = _rms_norm(x, w[p + 'post_attention_layernorm.weight'], cfg.norm_eps)
    else:
      x = x + _rms_norm(attn, w[p + 'post_attention_layernorm.weight'],
                        cfg.norm_eps)
      y = _rms_norm(x, w[p + 'pre_feedforward_layernorm.weight'],
                    cfg.norm_eps)
    mlp = (_gelu_tanh(y @ w[p + 'mlp.gate_proj.weight'].T) *
           (y @ w[p + 'mlp.up_proj.weight'].T)) @ w[p + 'mlp.down_proj.weight'].T
    if cfg.family >= 2:
      mlp = _rms_norm(mlp, w[p + 'post_feedforward_layernorm.weight'],
                      cfg.norm_eps)
    x = x + mlp
  out = _rms_norm(x, w['model.norm.weight'], cfg.norm_eps) @ embed.T
  if cfg.family == 2 and cfg.final_logit_softcap:
    out = np.tanh(out / cfg.final_logit_softcap) * cfg.final_logit_softcap
  return out

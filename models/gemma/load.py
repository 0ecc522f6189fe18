"""Loading Gemma weights: Hugging Face layout directories and GGUF files.

`from_pretrained(path)` returns a ready `Gemma` module from
  * a directory with ``config.json`` and ``model.safetensors`` (or shards
    listed in ``model.safetensors.index.json``), PyTorch names and [out, in]
    orientation, as published on the Hugging Face hub; or
  * a llama.cpp ``.gguf`` file (architectures gemma, gemma2, gemma3), any
    quantization `gguf.quants.dequantize` understands.
`save_pretrained(model, directory)` writes the Hugging Face layout back.

Safetensors are read and written by the `safetensors` package, through
`models.hf_io` (shared with T5 and the PEFT adapters): lazily, one tensor at
a time, so a large checkpoint never sits in host memory whole.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from models import hf_io, lora
from models.gemma.gguf_io import GGUFFile, read_gguf
from models.gemma.config import GLOBAL, LOCAL, GemmaConfig, compress_pattern
from models.gemma.model import Gemma
from models.layers import check_float_dtypes

# ----------------------------------------------------------------------------
# Hugging Face config.json
# ----------------------------------------------------------------------------

_GELU_TANH = ('gelu_pytorch_tanh', 'gelu_new')
_MODEL_TYPES = {'gemma': 1, 'gemma2': 2, 'gemma3_text': 3, 'gemma3': 3}
# transformers' Gemma3TextConfig defaults (filled in for nested text_config).
_GEMMA3_TEXT_DEFAULTS = {
    'vocab_size': 262_208, 'hidden_size': 2304, 'intermediate_size': 9216,
    'num_hidden_layers': 26, 'num_attention_heads': 8,
    'num_key_value_heads': 4, 'head_dim': 256, 'rms_norm_eps': 1e-6,
    'rope_theta': 1_000_000.0, 'rope_local_base_freq': 10_000.0,
    'query_pre_attn_scalar': 256, 'sliding_window': 4096,
    'max_position_embeddings': 131_072,
}
# What transformers' Gemma2Config / Gemma3TextConfig give a key that a
# config.json leaves out (one that says null keeps null: no soft-cap).
_HF_FAMILY_DEFAULTS = {
    2: {'attn_logit_softcapping': 50.0, 'final_logit_softcapping': 30.0,
        'query_pre_attn_scalar': 256, 'sliding_window': 4096},
    3: {'query_pre_attn_scalar': 256, 'rope_local_base_freq': 10_000.0,
        'sliding_window': 4096},
}
_HF_LAYER_TYPES = {'sliding_attention': LOCAL, 'full_attention': GLOBAL}


class _ConfigError(ValueError):
  """A refusal whose message already names the file (not re-wrapped)."""


def _short(v) -> str:
  """A one-line, bounded repr of a config value for an error message."""
  r = ' '.join(repr(v).split())
  return r if len(r) <= 80 else r[:77] + '...'


def _as_int(v, what: str, source: str) -> int:
  """``v`` as an int: integers (or integral floats) only, not strings."""
  if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer,
                                                np.floating))
      or (isinstance(v, (float, np.floating)) and not float(v).is_integer())):
    raise _ConfigError(f'{source}: {what} must be an integer, got '
                       f'{_short(v)}.')
  return int(v)


def _as_float(v, what: str, source: str) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float, np.integer,
                                               np.floating)):
    raise _ConfigError(f'{source}: {what} must be a number, got {_short(v)}.')
  return float(v)


def _in_one_line(build: Callable[[], GemmaConfig], what: str) -> GemmaConfig:
  """``build()``, any error it raises as one ValueError line: a refusal that
  names its file as it is, anything else as ``what (Type: message).``"""
  try:
    return build()
  except _ConfigError as e:
    raise ValueError(str(e)) from None
  except ValueError as e:  # GemmaConfig's own checks: a message for users
    raise ValueError(f'{what} ({e}).') from None
  except (TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError,
          OverflowError) as e:
    raise ValueError(f'{what} ({type(e).__name__}: {e}).') from None


def config_from_hf(d: dict, source: str = 'config.json') -> GemmaConfig:
  """A `GemmaConfig` from a Hugging Face config dict (Gemma 1/2/3).

  Raises:
    ValueError: one line naming ``source`` and what is wrong with it.
  """
  return _in_one_line(lambda: _config_from_hf(d, source),
                      f'{source}: invalid Gemma config')


def _config_from_hf(d: dict, source: str) -> GemmaConfig:
  if not isinstance(d, dict):
    raise _ConfigError(f'{source}: expected a JSON object, got '
                       f'{type(d).__name__}.')
  if isinstance(d.get('text_config'), dict):  # Gemma 3 4B+ multimodal configs
    inner = d['text_config'].get('model_type', 'gemma3_text')
    if d.get('model_type') != 'gemma3' or inner != 'gemma3_text':
      # A PaliGemma (a prefix LM, its text model Gemma 1 or 2) had loaded
      # with Gemma 3's defaults: rope_theta 1e6 where its own is 1e4.
      raise _ConfigError(
          f'{source}: model_type {_short(d.get("model_type"))} with a '
          f'text_config of {_short(inner)} is not a Gemma text model (of '
          "the multimodal checkpoints, only Gemma 3's, model_type 'gemma3', "
          'are read here, as their text model).')
    # transformers writes only the non-default values of a nested config.
    d = {**_GEMMA3_TEXT_DEFAULTS, **d['text_config'],
         'model_type': inner}
  model_type = d.get('model_type')
  if not isinstance(model_type, str) or model_type not in _MODEL_TYPES:
    raise _ConfigError(
        f'{source}: model_type {_short(model_type)} is not a Gemma text model '
        f'(expected one of {", ".join(_MODEL_TYPES)}).')
  family = _MODEL_TYPES[model_type]
  d = {**_HF_FAMILY_DEFAULTS.get(family, {}), **d}
  if d.get('tie_word_embeddings') is False:
    # Gemma ties the output head to the embedding; a checkpoint with its own
    # lm_head would load with the embedding in its place, silently.
    raise _ConfigError(f'{source}: tie_word_embeddings is false (an untied '
                       'output head); Gemma models here tie it to the '
                       'embedding.')
  activation, key = d.get('hidden_activation'), 'hidden_activation'
  if activation is None and family == 1:
    # Gemma 1 files written by transformers 5 hold only hidden_act, which
    # its GemmaMLP runs ('gelu' read as the tanh approximation, what Gemma
    # 1 checkpoints meant by it); another had loaded as GELU here.
    activation, key = d.get('hidden_act'), 'hidden_act'
    if activation == 'gelu':
      activation = None
  if activation is not None and activation not in _GELU_TANH:
    # The MLP here is GELU's tanh approximation, what every Gemma uses.
    raise _ConfigError(
        f'{source}: {key} {_short(activation)} is not supported; '
        f'the Gemma MLP here uses GELU\'s tanh approximation '
        f'({" or ".join(_GELU_TANH)}).')
  if d.get('use_bidirectional_attention'):
    raise _ConfigError(f'{source}: bidirectional attention (EmbeddingGemma) '
                       'is not supported; expected a causal Gemma.')

  def req(key):
    if key not in d:
      raise _ConfigError(
          f'{source}: missing required key {key!r} for {model_type}.')
    return d[key]

  def size(key, default=None):
    """A positive integer; an optional key (``default`` given) may be
    missing or null."""
    v = req(key) if default is None else d.get(key)
    if v is None and default is not None:
      v = default
    if v is None:
      raise _ConfigError(f'{source}: {key} must be a positive integer, got '
                         'null.')
    v = _as_int(v, key, source)
    if v < 1:
      raise _ConfigError(f'{source}: {key} must be a positive integer, got '
                         f'{v}.')
    return v

  def number(v, key):
    return _as_float(v, key, source)

  width = size('hidden_size')
  num_heads = size('num_attention_heads')
  num_layers = size('num_hidden_layers')
  if d.get('layer_types') is not None:  # null: from the sliding pattern
    layer_types = d['layer_types']
    if not isinstance(layer_types, list):
      raise _ConfigError(f'{source}: layer_types must be a list, got '
                         f'{_short(layer_types)}.')
    if len(layer_types) != num_layers:
      raise _ConfigError(f'{source}: layer_types lists {len(layer_types)} '
                         f'layers but num_hidden_layers is {num_layers}.')
    bad = [t for t in layer_types if not isinstance(t, str)
           or t not in _HF_LAYER_TYPES]
    if bad:
      raise _ConfigError(f'{source}: unknown layer type {_short(bad[0])} in '
                         'layer_types.')
    pattern = compress_pattern([_HF_LAYER_TYPES[t] for t in layer_types])
  elif family == 2:
    pattern = (LOCAL, GLOBAL)
  elif family == 3:
    key = ('sliding_window_pattern' if 'sliding_window_pattern' in d
           else '_sliding_window_pattern')
    p = size(key, 6)
    pattern = (LOCAL,) * (p - 1) + (GLOBAL,)
  else:
    pattern = (GLOBAL,)

  def linear_factor(scaling, key):
    if not scaling:
      return 1.0
    if not isinstance(scaling, dict):
      raise _ConfigError(f'{source}: {key} must be an object or null, got '
                         f'{_short(scaling)}.')
    kind = scaling.get('rope_type', scaling.get('type', 'default'))
    if kind not in ('linear', 'default'):
      raise _ConfigError(f'{source}: {key} type {_short(kind)} is not '
                         'supported (expected linear or default).')
    return (number(scaling.get('factor', 1.0), f'{key}.factor')
            if kind == 'linear' else 1.0)

  rope_theta = number(d.get('rope_theta', 1e6 if family == 3 else 1e4),
                      'rope_theta')
  local_theta = number(d.get('rope_local_base_freq', rope_theta),
                       'rope_local_base_freq')
  scale_global = linear_factor(d.get('rope_scaling'), 'rope_scaling')
  # Gemma 1 and 2 have one rotary embedding, rope_scaling included, for
  # every layer (transformers' Gemma2RotaryEmbedding; llama.cpp too); Gemma
  # 3's sliding layers have their own, unscaled.
  scale_local = number(d.get('rope_local_scaling_factor',
                             1.0 if family == 3 else scale_global),
                       'rope_local_scaling_factor')
  # Newer transformers: one RoPE dict per attention kind.
  params = d.get('rope_parameters')
  if isinstance(params, dict) and 'full_attention' in params:
    full = params['full_attention'] or {}
    local = params.get('sliding_attention') or {}
    for key, sub in (('full_attention', full), ('sliding_attention', local)):
      if not isinstance(sub, dict):
        raise _ConfigError(f'{source}: rope_parameters.{key} must be an '
                           f'object, got {_short(sub)}.')
    rope_theta = number(full.get('rope_theta', rope_theta),
                        'rope_parameters.full_attention.rope_theta')
    scale_global = linear_factor(full, 'rope_parameters.full_attention')
    local_theta = number(local.get('rope_theta', local_theta),
                         'rope_parameters.sliding_attention.rope_theta')
    scale_local = linear_factor(local, 'rope_parameters.sliding_attention')
  elif isinstance(params, dict) and 'rope_theta' in params:
    rope_theta = local_theta = number(params['rope_theta'],
                                      'rope_parameters.rope_theta')
    scale_global = scale_local = linear_factor(params, 'rope_parameters')
  elif params is not None and not isinstance(params, dict):
    raise _ConfigError(f'{source}: rope_parameters must be an object, got '
                       f'{_short(params)}.')
  # A window below 1 is refused (not replaced): it would mask whole layers.
  window = (size('sliding_window', 0) if LOCAL in pattern
            and d.get('sliding_window') is not None else None)
  softcaps = {}
  for ours, key in (('attn_logit_softcap', 'attn_logit_softcapping'),
                    ('final_logit_softcap', 'final_logit_softcapping')):
    v = d.get(key)
    softcaps[ours] = None if v is None else number(v, key)
  if family == 3:
    # transformers' Gemma 3 keeps the key but never caps attention with it
    # (nor does llama.cpp): a config that sets it had run capped here.
    softcaps['attn_logit_softcap'] = None
  qpas = d.get('query_pre_attn_scalar')
  return GemmaConfig(
      family=family,
      vocab_size=size('vocab_size'),
      width=width,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=size('num_key_value_heads', num_heads),
      head_dim=size('head_dim', 256),  # transformers' default, every family
      mlp_dim=size('intermediate_size'),
      norm_eps=number(d.get('rms_norm_eps', 1e-6), 'rms_norm_eps'),
      # 0 is refused by GemmaConfig (it had become head_dim); null is
      # head_dim.
      query_pre_attn_scalar=(number(qpas, 'query_pre_attn_scalar')
                             if qpas is not None else None),
      attention_pattern=pattern,
      sliding_window=window,
      rope_base_global=rope_theta,
      rope_base_local=local_theta,
      rope_scale_global=scale_global,
      rope_scale_local=scale_local,
      use_post_norms=family >= 2,
      use_qk_norm=family == 3,
      # Gemma3TextConfig's own default (as a nested text_config gets it);
      # GemmaConfig's and Gemma2Config's 8192.
      max_seq_len=size('max_position_embeddings',
                       131_072 if family == 3 else 8192),
      **softcaps,
  )


def config_to_hf(c: GemmaConfig, torch_dtype: str = 'float32') -> dict:
  """The Hugging Face config dict of a `GemmaConfig` (inverse of
  config_from_hf).

  Raises:
    ValueError: a setting the family's Hugging Face model does not have:
      ``use_post_norms`` or ``use_qk_norm`` not the family's (derived from
      the model type); on Gemma 1 soft-capping, sliding-window layers or a
      ``query_pre_attn_scalar`` other than ``head_dim``; a local RoPE base
      of its own before Gemma 3; a local RoPE scale other than the family's
      (Gemma 3: 1, else the global one). transformers would load such a
      file as another model (ignoring the key), or not at all.
  """
  for name, want in (('use_post_norms', c.family >= 2),
                     ('use_qk_norm', c.family == 3)):
    if getattr(c, name) != want:
      raise ValueError(
          f'a Gemma {c.family} config with {name}={getattr(c, name)} has no '
          f'Hugging Face form (Gemma {c.family} has {name}={want}).')
  if c.family == 1:
    for name in ('attn_logit_softcap', 'final_logit_softcap'):
      if getattr(c, name) is not None:
        raise ValueError(
            f'a Gemma 1 config with {name}={getattr(c, name)} has no Hugging '
            'Face form (Gemma 1 has no soft-capping).')
  if c.family == 3 and c.attn_logit_softcap is not None:
    raise ValueError(
        f'a Gemma 3 config with attn_logit_softcap={c.attn_logit_softcap} has '
        'no Hugging Face form (transformers\' Gemma 3 does not cap attention '
        'logits).')
  if c.family == 1 and LOCAL in c.layer_types:
    raise ValueError('a Gemma 1 config with sliding-window layers has no '
                     'Hugging Face form (every Gemma 1 layer is global).')
  if c.family == 1 and c.query_pre_attn_scalar != c.head_dim:
    raise ValueError(
        f'a Gemma 1 config with query_pre_attn_scalar='
        f'{c.query_pre_attn_scalar} has no Hugging Face form (Gemma 1 '
        f'scales queries by head_dim, {c.head_dim}).')
  local_scale = 1.0 if c.family == 3 else c.rope_scale_global
  if c.rope_scale_local != local_scale:
    raise ValueError(
        f'a Gemma {c.family} config with rope_scale_local='
        f'{c.rope_scale_local} has no Hugging Face form (its sliding layers '
        f'scale RoPE by {local_scale}).')
  if c.family < 3 and c.rope_base_local != c.rope_base_global:
    raise ValueError(
        f'a Gemma {c.family} config with rope_base_local={c.rope_base_local} '
        f'has no Hugging Face form (Gemma {c.family} has one RoPE base, '
        f'{c.rope_base_global}).')
  model_type = {1: 'gemma', 2: 'gemma2', 3: 'gemma3_text'}[c.family]
  arch = {1: 'GemmaForCausalLM', 2: 'Gemma2ForCausalLM',
          3: 'Gemma3ForCausalLM'}[c.family]
  d = {
      'architectures': [arch], 'model_type': model_type,
      'vocab_size': c.vocab_size, 'hidden_size': c.width,
      'intermediate_size': c.mlp_dim, 'num_hidden_layers': c.num_layers,
      'num_attention_heads': c.num_heads,
      'num_key_value_heads': c.num_kv_heads, 'head_dim': c.head_dim,
      'rms_norm_eps': c.norm_eps, 'rope_theta': c.rope_base_global,
      'max_position_embeddings': c.max_seq_len,
      'hidden_activation': 'gelu_pytorch_tanh',
      'tie_word_embeddings': True, 'pad_token_id': 0, 'eos_token_id': 1,
      'bos_token_id': 2, 'torch_dtype': torch_dtype,
      'layer_types': [{LOCAL: 'sliding_attention', GLOBAL: 'full_attention'}[t]
                      for t in c.layer_types],
  }
  # An int where it is one: transformers 5 validates the field as an int
  # and refused 256.0, so nothing saved here loaded there.
  scalar = c.query_pre_attn_scalar
  d['query_pre_attn_scalar'] = (int(scalar) if float(scalar).is_integer()
                                else scalar)
  if c.family >= 2:
    d['attn_logit_softcapping'] = c.attn_logit_softcap
    d['final_logit_softcapping'] = c.final_logit_softcap
  if c.sliding_window is not None:
    d['sliding_window'] = c.sliding_window
  if c.family == 3:
    d['rope_local_base_freq'] = c.rope_base_local
    d['sliding_window_pattern'] = len(c.attention_pattern)
  if c.rope_scale_global != 1.0:
    d['rope_scaling'] = {'rope_type': 'linear', 'factor': c.rope_scale_global}
  return d


def _config_file(directory: str) -> str:
  """``directory``'s config.json, or one error (a folder that is no model,
  such as a run's adapter/)."""
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: config.json not found (expected a Hugging '
                            'Face model directory).')
  return path


def read_hf_config(directory: str) -> GemmaConfig:
  path = _config_file(directory)
  try:
    with open(path, encoding='utf-8') as f:
      d = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: malformed JSON ({e}).') from None
  return config_from_hf(d, path)


# ----------------------------------------------------------------------------
# Parameter table: our module paths <-> Hugging Face tensor names
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple            # path of the nnx.Param inside Gemma
  hf_name: str           # PyTorch-style tensor name
  hf_shape: tuple        # shape in the HF file
  to_ours: Callable      # HF array -> our kernel layout
  to_hf: Callable        # our kernel -> HF array
  is_norm: bool = False


def _param_table(c: GemmaConfig) -> list[_Entry]:
  d, n, k, h, f = c.width, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  ident = lambda a: a
  t = lambda a: a.T
  # q: HF [N*H, D] -> ours (D, N, H); k/v likewise with K heads.
  in_heads = lambda heads: (
      lambda a: a.reshape(heads, h, d).transpose(2, 0, 1),
      lambda a: a.transpose(1, 2, 0).reshape(heads * h, d))
  # o: HF [D, N*H] -> ours (N, H, D).
  o_ours = lambda a: a.T.reshape(n, h, d)
  o_hf = lambda a: a.reshape(n * h, d).T
  entries = [
      _Entry(('embedding',), 'model.embed_tokens.weight', (c.vocab_size, d),
             ident, ident),
      _Entry(('final_norm', 'scale'), 'model.norm.weight', (d,), ident, ident,
             True),
  ]
  for i in range(c.num_layers):
    p = f'model.layers.{i}.'
    lp = ('layers', i)
    norm = lambda ours, hf, dim=d: _Entry(lp + (ours, 'scale'), p + hf, (dim,),
                                          ident, ident, True)
    entries += [
        norm('pre_attn_norm', 'input_layernorm.weight'),
        _Entry(lp + ('attn', 'q', 'kernel'), p + 'self_attn.q_proj.weight',
               (n * h, d), *in_heads(n)),
        _Entry(lp + ('attn', 'k', 'kernel'), p + 'self_attn.k_proj.weight',
               (k * h, d), *in_heads(k)),
        _Entry(lp + ('attn', 'v', 'kernel'), p + 'self_attn.v_proj.weight',
               (k * h, d), *in_heads(k)),
        _Entry(lp + ('attn', 'o', 'kernel'), p + 'self_attn.o_proj.weight',
               (d, n * h), o_ours, o_hf),
        _Entry(lp + ('mlp', 'gate', 'kernel'), p + 'mlp.gate_proj.weight',
               (f, d), t, t),
        _Entry(lp + ('mlp', 'up', 'kernel'), p + 'mlp.up_proj.weight',
               (f, d), t, t),
        _Entry(lp + ('mlp', 'down', 'kernel'), p + 'mlp.down_proj.weight',
               (d, f), t, t),
    ]
    if c.use_post_norms:
      entries += [
          norm('post_attn_norm', 'post_attention_layernorm.weight'),
          norm('pre_ffw_norm', 'pre_feedforward_layernorm.weight'),
          norm('post_ffw_norm', 'post_feedforward_layernorm.weight'),
      ]
    else:  # Gemma 1 names its pre-MLP norm post_attention_layernorm.
      entries.append(norm('pre_ffw_norm', 'post_attention_layernorm.weight'))
    if c.use_qk_norm:
      entries += [
          _Entry(lp + ('attn', 'q_norm', 'scale'), p + 'self_attn.q_norm.weight',
                 (h,), ident, ident, True),
          _Entry(lp + ('attn', 'k_norm', 'scale'), p + 'self_attn.k_norm.weight',
                 (h,), ident, ident, True),
      ]
  return entries


# Where a loaded weight goes: (its variable, the host array) -> array.
Place = Callable[[nnx.Variable, np.ndarray], jax.Array]


def _get_var(model: nnx.Module, path: tuple) -> nnx.Variable:
  node = model
  for p in path:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  return node


def build_model(config: GemmaConfig, get_tensor: Callable[[_Entry], np.ndarray],
                *, dtype=jnp.float32, param_dtype=jnp.float32,
                place: Place | None = None) -> Gemma:
  """A Gemma whose params come from ``get_tensor(entry)`` (HF layout arrays).

  The module is built abstractly (`nnx.eval_shape`) so no random weights are
  drawn for a model that is about to be overwritten. ``place(variable,
  host array)`` puts each weight where it goes (e.g. sharded over a mesh);
  by default on the default device.
  """
  # Before eval_shape, whose traceback note would follow Gemma's error.
  check_float_dtypes('Gemma', dtype=dtype, param_dtype=param_dtype)
  model = nnx.eval_shape(lambda: Gemma(config, dtype=dtype,
                                       param_dtype=param_dtype,
                                       rngs=nnx.Rngs(0)))
  for e in _param_table(config):
    var = _get_var(model, e.path)
    arr = np.asarray(e.to_ours(get_tensor(e)), dtype=param_dtype)
    var.set_value(place(var, arr) if place else jnp.asarray(arr))
  return model


# Prefixes under which multimodal / wrapped checkpoints keep the text model.
_HF_PREFIXES = ('', 'language_model.', 'model.language_model.')


def _resolve_name(name: str, available) -> str | None:
  for prefix in _HF_PREFIXES:
    cand = prefix + name
    if prefix == 'model.language_model.':
      cand = 'model.language_model.' + name.removeprefix('model.')
    if cand in available:
      return cand
  return None


def hf_module_prefix(directory: str) -> str:
  """The transformers module that holds the checkpoint's decoder layers.

  ``'model'`` for Gemma*ForCausalLM; ``'model.language_model'`` for the
  multimodal Gemma 3 checkpoints: the module prefix a PEFT adapter for that
  checkpoint must use (see :func:`models.lora.gemma_hf_name`). Reads only
  the safetensors headers.
  """
  probe = 'model.layers.0.self_attn.q_proj.weight'
  found = _resolve_name(probe, hf_io.open_tensors(directory))
  if found is None:
    raise ValueError(f'{directory}: no tensor {probe!r} under any of the '
                     f'prefixes {list(_HF_PREFIXES)}.')
  prefix = found.removesuffix('.layers.0.self_attn.q_proj.weight')
  # Files saved before transformers 4.52 keep language_model.model.layers;
  # the module is model.language_model now (the file's prefix is mapped on
  # loading), and PEFT matches an adapter's targets to module names: the
  # file's prefix had matched nothing.
  return 'model.language_model' if prefix == 'language_model.model' else prefix


# Tensors of a multimodal checkpoint outside its text decoder (not loaded).
_HF_NON_TEXT_PREFIXES = ('vision_tower.', 'multi_modal_projector.',
                         'model.vision_tower.', 'model.multi_modal_projector.')
# Where a checkpoint may store the output head that Gemma ties to the
# embedding (the head itself is not loaded; see _unexpected_hf_tensors).
_HF_LM_HEADS = ('lm_head.weight', 'language_model.lm_head.weight')


def _unexpected_hf_tensors(config: GemmaConfig,
                           tensors: hf_io.Tensors) -> list[str]:
  """Sorted names in ``tensors`` that the model of ``config`` does not use.

  Leftovers mean the config does not describe the checkpoint (e.g. fewer
  layers than it holds), so loading would silently drop weights. Allowed:
  a copy of the tied output head (``lm_head.weight`` of the embedding's
  shape; config_from_hf refuses a config that unties it, and load_hf a
  head that differs from the embedding) and, in a multimodal
  checkpoint (text model under a prefix), its vision tower and projector.
  """
  used = set()
  for e in _param_table(config):
    name = _resolve_name(e.hf_name, tensors)
    if name is not None:
      used.add(name)
  embed = (config.vocab_size, config.width)
  used.update(n for n in _HF_LM_HEADS
              if n in tensors and tensors.shape(n) == embed)
  multimodal = _resolve_name('model.embed_tokens.weight', tensors) not in (
      None, 'model.embed_tokens.weight')
  return sorted(n for n in tensors if n not in used and not (
      multimodal and n.startswith(_HF_NON_TEXT_PREFIXES)))


def load_hf(directory: str, *, dtype=jnp.float32,
            param_dtype=jnp.float32, place: Place | None = None) -> Gemma:
  """A Gemma from a Hugging Face layout directory.

  Raises:
    FileNotFoundError: no config.json or weights.
    ValueError: a malformed config.json or safetensors file, or missing,
      mis-shaped or unexpected tensors (one line naming the file).
  """
  config = read_hf_config(directory)
  # Read on access: each tensor is read once, when the model takes it.
  tensors = hf_io.open_tensors(directory)
  where = tensors.file
  files = ', '.join(sorted({where(n).name for n in tensors})) or (
      'the safetensors files')

  def get(e: _Entry) -> np.ndarray:
    name = _resolve_name(e.hf_name, tensors)
    if name is None:
      raise ValueError(f'{directory}: missing tensor {e.hf_name!r} (looked '
                       f'in {files}; expected shape {list(e.hf_shape)}).')
    shape = tensors.shape(name)
    if shape != e.hf_shape:
      raise ValueError(
          f'{where(name)}: tensor {name!r} has shape {list(shape)}, '
          f'expected {list(e.hf_shape)} for this config.json.')
    return hf_io.floating_tensor(tensors[name], name, where(name))

  # Checked before building: a missing tensor first (the clearer message
  # when the checkpoint is another model), then leftovers.
  for e in _param_table(config):
    if _resolve_name(e.hf_name, tensors) is None:
      get(e)
  embed = _resolve_name('model.embed_tokens.weight', tensors)
  for head in _HF_LM_HEADS:
    # A copy of the tied head is allowed; a head of its own would be
    # dropped for the embedding, silently.
    if (head in tensors and tensors.shape(head) == tensors.shape(embed) and
        not np.array_equal(tensors[head], tensors[embed])):
      raise ValueError(
          f'{where(head)}: tensor {head!r} is not the embedding (an untied '
          'output head); Gemma models here tie it to the embedding.')
  unexpected = _unexpected_hf_tensors(config, tensors)
  if unexpected:
    raise ValueError(f'{where(unexpected[0])}: unexpected tensor '
                     f'{unexpected[0]!r}{hf_io.and_more(unexpected)} for '
                     'this config.json.')
  return build_model(config, get, dtype=dtype, param_dtype=param_dtype,
                     place=place)


def save_pretrained(model: Gemma, directory: str, *,
                    allow_residual_base: bool = False) -> None:
  """Writes ``config.json`` and ``model.safetensors`` in the HF layout.

  LoRA adapters attached to projections are not included (merge them first,
  or export them in PEFT format with `models.lora`). The shards and index of
  an earlier sharded save in ``directory`` are removed.

  Raises:
    ValueError: a kernel holds the residual of an unmerged PiSSA / LoRA-GA
      adapter (unless ``allow_residual_base``: the residual model PiSSA
      releases beside an adapter exported with ``original_base=False``), or
      the config has a value JSON cannot hold; nothing is written then.
  """
  hf_io.check_directory(directory, 'gemma.save_pretrained')
  lora.check_no_residual_base(model, 'gemma.save_pretrained',
                              allowed=allow_residual_base)
  c = model.config
  tensors = {}
  dtypes = set()
  for e in _param_table(c):
    arr = np.asarray(jax.device_get(_get_var(model, e.path).get_value()))
    tensors[e.hf_name] = np.ascontiguousarray(e.to_hf(arr))
    dtypes.add(arr.dtype)
  torch_dtype = {np.dtype(np.float32): 'float32',
                 np.dtype(ml_dtypes.bfloat16): 'bfloat16',
                 np.dtype(np.float16): 'float16'}.get(
                     dtypes.pop() if len(dtypes) == 1 else None, 'float32')
  config_path = os.path.join(directory, hf_io.CONFIG)
  config = hf_io.dumps_json(config_to_hf(c, torch_dtype), config_path)
  hf_io.save_tensors(directory, tensors, texts={hf_io.CONFIG: config})


# ----------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------

_GGUF_ARCHS = {'gemma': 1, 'gemma2': 2, 'gemma3': 3}
# llama.cpp tensor names (the suffix after blk.N.) for each HF layer name.
_GGUF_LAYER_NAMES = {
    'input_layernorm.weight': 'attn_norm.weight',
    'self_attn.q_proj.weight': 'attn_q.weight',
    'self_attn.k_proj.weight': 'attn_k.weight',
    'self_attn.v_proj.weight': 'attn_v.weight',
    'self_attn.o_proj.weight': 'attn_output.weight',
    'self_attn.q_norm.weight': 'attn_q_norm.weight',
    'self_attn.k_norm.weight': 'attn_k_norm.weight',
    'mlp.gate_proj.weight': 'ffn_gate.weight',
    'mlp.up_proj.weight': 'ffn_up.weight',
    'mlp.down_proj.weight': 'ffn_down.weight',
    'post_feedforward_layernorm.weight': 'post_ffw_norm.weight',
    'pre_feedforward_layernorm.weight': 'ffn_norm.weight',
}


def gguf_name(hf_name: str, family: int) -> str:
  """llama.cpp's tensor name of a Hugging Face Gemma tensor name."""
  if hf_name == 'model.embed_tokens.weight':
    return 'token_embd.weight'
  if hf_name == 'model.norm.weight':
    return 'output_norm.weight'
  _, _, i, rest = hf_name.split('.', 3)
  if rest == 'post_attention_layernorm.weight':
    # Gemma 1's post_attention_layernorm is its pre-MLP norm.
    rest_g = 'post_attention_norm.weight' if family >= 2 else 'ffn_norm.weight'
  else:
    rest_g = _GGUF_LAYER_NAMES[rest]
  return f'blk.{i}.{rest_g}'


@functools.lru_cache(maxsize=2)
def _read_gguf_cached(path: str, identity: tuple[int, ...]) -> GGUFFile:
  del identity  # part of the cache key only
  return read_gguf(path)


def gguf_file(path: str) -> GGUFFile:
  """The parsed GGUF file (cached: model and tokenizer share one parse)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: GGUF file not found.')
  # The file's identity, not only its mtime: a file replaced by one with
  # the same mtime (cp -p, rsync -t, tar x) had returned the old parse, whose
  # memory map then read the new bytes at the old offsets.
  st = os.stat(path)
  return _read_gguf_cached(os.path.abspath(path), (
      st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


def config_from_gguf(gf: GGUFFile) -> GemmaConfig:
  """A `GemmaConfig` from GGUF metadata (llama.cpp's Gemma conventions).

  Raises:
    ValueError: one line naming the file and what is wrong with it.
  """
  return _in_one_line(lambda: _config_from_gguf(gf),
                      f'{gf.path}: invalid Gemma GGUF metadata')


def _config_from_gguf(gf: GGUFFile) -> GemmaConfig:
  source = gf.path
  meta = gf.metadata
  arch = meta.get('general.architecture')
  if not isinstance(arch, str) or arch not in _GGUF_ARCHS:
    raise _ConfigError(
        f'{source}: GGUF architecture is {_short(arch)}; expected a Gemma '
        f'model ({", ".join(_GGUF_ARCHS)}).')
  family = _GGUF_ARCHS[arch]

  def size(key, default=None):
    """Metadata ``{arch}.{key}`` as a positive integer."""
    v = meta.get(f'{arch}.{key}', default)
    if v is None:
      raise _ConfigError(f'{source}: missing GGUF metadata {arch}.{key}.')
    v = _as_int(v, f'GGUF metadata {arch}.{key}', source)
    if v < 1:
      raise _ConfigError(f'{source}: GGUF metadata {arch}.{key} must be a '
                         f'positive integer, got {v}.')
    return v

  def number(key, default=None):
    v = meta.get(f'{arch}.{key}', default)
    return None if v is None else _as_float(v, f'GGUF metadata {arch}.{key}',
                                            source)

  emb = gf.tensors.get('token_embd.weight')
  if emb is None:
    raise _ConfigError(f'{source}: missing tensor token_embd.weight.')
  vocab_size = int(emb.shape[0])
  width = size('embedding_length')
  num_heads = size('attention.head_count')
  num_layers = size('block_count')
  head_dim = size('attention.key_length', width // num_heads or None)
  window = meta.get(f'{arch}.attention.sliding_window')
  pattern = {1: (GLOBAL,), 2: (LOCAL, GLOBAL),
             3: (LOCAL,) * 5 + (GLOBAL,)}[family]
  if family == 3 and window is None:
    # llama.cpp's converter writes no window for a Gemma 3 whose layers are
    # all global (sliding_window_pattern 1), and runs every layer as full
    # attention with rope.freq_base; a 5:1 pattern with a 512 window had
    # been assumed.
    pattern = (GLOBAL,)
  # llama.cpp scales queries by head_dim^-0.5 except for the 27B models,
  # which use (width / heads)^-0.5 like their query_pre_attn_scalar.
  qpas = None
  if (family, num_layers) in ((2, 46), (3, 62)):
    qpas = float(width // num_heads)
  scale = 1.0
  scaling = meta.get(f'{arch}.rope.scaling.type')
  if scaling == 'linear':
    scale = number('rope.scaling.factor', 1.0)
  elif scaling not in (None, 'none'):
    # Running such a model unscaled would be silently wrong.
    raise _ConfigError(f'{source}: GGUF rope scaling {_short(scaling)} is not '
                       'supported (only linear); this model would run with '
                       'wrong positions.')
  base = number('rope.freq_base', 1e6 if family == 3 else 1e4)
  return GemmaConfig(
      family=family, vocab_size=vocab_size, width=width,
      num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=size('attention.head_count_kv', num_heads),
      head_dim=head_dim, mlp_dim=size('feed_forward_length'),
      norm_eps=number('attention.layer_norm_rms_epsilon', 1e-6),
      query_pre_attn_scalar=qpas,
      # llama.cpp's defaults for Gemma 2 files made before these keys
      # existed (and the Hugging Face config's): without them such a file
      # ran with no soft-capping, silently.
      # Gemma 3 caps no attention logits (llama.cpp and transformers).
      attn_logit_softcap=(number('attn_logit_softcapping',
                                 50.0 if family == 2 else None)
                          if family != 3 else None),
      final_logit_softcap=number('final_logit_softcapping',
                                 30.0 if family == 2 else None),
      attention_pattern=pattern,
      # Only a missing window takes llama.cpp's default; 0 is refused.
      sliding_window=(
          _as_int(window, f'GGUF metadata {arch}.attention.sliding_window',
                  source) if window is not None else
          (4096 if family == 2 else None)),
      rope_base_global=base,
      rope_base_local=10_000.0 if family == 3 else base,
      rope_scale_global=scale,
      # One rotary embedding for every layer of a Gemma 1 or 2 (llama.cpp:
      # rope_freq_scale_train_swa defaults to rope_freq_scale_train).
      rope_scale_local=1.0 if family == 3 else scale,
      use_post_norms=family >= 2, use_qk_norm=family == 3,
      max_seq_len=size('context_length', 8192))


def load_gguf(path: str, *, dtype=jnp.float32,
              param_dtype=jnp.float32, place: Place | None = None) -> Gemma:
  """A Gemma from a llama.cpp GGUF file, dequantized to ``param_dtype``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: an unreadable file, unusable metadata, or missing,
      mis-shaped or unexpected tensors (one line naming the file).
  """
  gf = gguf_file(path)
  config = config_from_gguf(gf)
  by_name = gf.tensors

  def dequantize(t) -> np.ndarray:
    """[out, in], numpy order; an error names the file."""
    try:
      return t.dequantize()
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from None

  def get(e: _Entry) -> np.ndarray:
    name = gguf_name(e.hf_name, config.family)
    t = by_name.get(name)
    if t is None:
      raise ValueError(f'{path}: missing tensor {name!r} '
                       f'(expected shape {list(e.hf_shape)[::-1]} in ggml order).')
    arr = dequantize(t)
    if tuple(arr.shape) != e.hf_shape:
      raise ValueError(f'{path}: tensor {name!r} dequantizes to shape '
                       f'{list(arr.shape)}, expected {list(e.hf_shape)}.')
    if e.is_norm:
      # llama.cpp's converter stores Gemma's norm gains as (1 + w); our
      # RMSNorm adds the 1 itself.
      arr = arr.astype(np.float32) - 1.0
    return arr

  # Checked before building (and dequantizing): missing tensors first, then
  # leftovers, which mean the metadata does not describe the file's tensors
  # (e.g. a block_count below the blocks it holds).
  table = _param_table(config)
  names = {gguf_name(e.hf_name, config.family) for e in table}
  for e in table:
    if gguf_name(e.hf_name, config.family) not in by_name:
      get(e)
  out = by_name.get('output.weight')  # a copy of the tied head
  if out is not None and tuple(out.shape) == (config.vocab_size, config.width):
    # Gemma ties its head to the embedding; llama.cpp would run a head of
    # its own, which this model has no place for: refused, not dropped.
    embed = by_name.get('token_embd.weight')
    if embed is None or not np.array_equal(dequantize(out),
                                           dequantize(embed)):
      raise ValueError(f'{path}: output.weight differs from token_embd.weight '
                       '(an untied head); Gemma ties them.')
    names.add('output.weight')
  unexpected = sorted(set(by_name) - names)
  if unexpected:
    arch = gf.metadata.get('general.architecture')
    raise ValueError(f'{path}: unexpected tensor {unexpected[0]!r}'
                     f'{hf_io.and_more(unexpected)} for the model its metadata '
                     f'describes ({arch}.block_count = {config.num_layers}).')
  return build_model(config, get, dtype=dtype, param_dtype=param_dtype,
                     place=place)


def from_pretrained(path: str, *, dtype=jnp.float32,
                    param_dtype=jnp.float32,
                    place: Place | None = None) -> Gemma:
  """A ready `Gemma` from a Hugging Face directory or a ``.gguf`` file.

  Args:
    path: a directory with config.json + model.safetensors (or a sharded
      model.safetensors.index.json), or a .gguf file.
    dtype: compute dtype (jnp.float32 or jnp.bfloat16).
    param_dtype: storage dtype of the loaded weights.
    place: ``place(variable, host array) -> jax.Array`` puts each weight
      where it goes, e.g. straight to its sharding over a mesh (the train
      loop does: a model larger than one device's memory never lands whole
      on the first); default the default device.
  """
  path = os.fspath(path)
  if checkpoint_format(path) == 'hf':
    return load_hf(path, dtype=dtype, param_dtype=param_dtype, place=place)
  return load_gguf(path, dtype=dtype, param_dtype=param_dtype, place=place)


def checkpoint_format(path: str | os.PathLike) -> str:
  """``'hf'`` for a directory with a config.json, ``'gguf'`` for a GGUF
  file (by its header, or its name: a truncated one gets `load_gguf`'s own
  error); else one error line. Callers that read the tokenizer from the
  same path ask this first: another file had been reported as a bad
  SentencePiece model."""
  path = os.fspath(path)
  if os.path.isdir(path):
    _config_file(path)
    return 'hf'
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such checkpoint (expected a Hugging '
                            'Face directory or a .gguf file).')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic == b'GGUF' or path.endswith('.gguf'):
    return 'gguf'
  raise ValueError(f'{path}: not a Hugging Face directory or a GGUF file '
                   f'(starts with {magic!r}).')


def iter_named_params(model: Gemma) -> Iterator[tuple[str, np.ndarray]]:
  """(HF tensor name, HF-layout array) of every base parameter."""
  for e in _param_table(model.config):
    yield e.hf_name, e.to_hf(np.asarray(_get_var(model, e.path).get_value()))

"""Tiny random T5 checkpoints in Hugging Face layout, and their HF logits.

The checkpoint builder depends on numpy only (names and shapes written out
from transformers' T5 layout, independent of models.t5), so tests can rebuild
the exact weights. Running this file regenerates ``t5_reference.safetensors``,
the logits of transformers' own Flax T5 (4.46; it needs ``pip install
transformers==4.46.3``, and under jax >= 0.7 its two ``jnp.clip(a_max=...)``
calls renamed to ``max=``) on those weights:

  python tests/data/t5_reference.py
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, 't5_reference.safetensors')

# Widths of models.t5's 'tiny' config, so tests share its compiled ops.
BASE = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2,
            num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, layer_norm_epsilon=1e-6,
            dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)
CONFIGS = {
    # v1.1 / mT5: gated-GELU, untied head.
    'gated': dict(BASE, model_type='mt5', feed_forward_proj='gated-gelu',
                  tie_word_embeddings=False),
    # Original T5: ReLU, tied head (scaled by d_model ** -0.5).
    'tied_relu': dict(BASE, model_type='t5', feed_forward_proj='relu',
                      tie_word_embeddings=True),
}
ENCODER_TOKENS = np.array([[5, 6, 7, 8, 9, 0, 0], [9, 10, 11, 12, 13, 14, 15]])
DECODER_TOKENS = np.array([[0] + list(range(20, 39)), [0] + list(range(40, 59))])


def hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  """Every tensor of T5ForConditionalGeneration, [out, in] for linears."""
  d, inner, f = c['d_model'], c['num_heads'] * c['d_kv'], c['d_ff']
  gated = c['feed_forward_proj'].startswith('gated')
  shapes = {'shared.weight': (c['vocab_size'], d)}
  if not c['tie_word_embeddings']:
    shapes['lm_head.weight'] = (c['vocab_size'], d)
  for stack, n in (('encoder', c['num_layers']),
                   ('decoder', c['num_decoder_layers'])):
    shapes[f'{stack}.final_layer_norm.weight'] = (d,)
    for i in range(n):
      p = f'{stack}.block.{i}.layer'
      attns = ['0.SelfAttention'] + (['1.EncDecAttention'] if stack == 'decoder'
                                     else [])
      for j, a in enumerate(attns):
        shapes[f'{p}.{j}.layer_norm.weight'] = (d,)
        for m in 'qkv':
          shapes[f'{p}.{a}.{m}.weight'] = (inner, d)
        shapes[f'{p}.{a}.o.weight'] = (d, inner)
      if i == 0:
        shapes[f'{p}.0.SelfAttention.relative_attention_bias.weight'] = (
            c['relative_attention_num_buckets'], c['num_heads'])
      ff = len(attns)
      shapes[f'{p}.{ff}.layer_norm.weight'] = (d,)
      for m in (('wi_0', 'wi_1') if gated else ('wi',)):
        shapes[f'{p}.{ff}.DenseReluDense.{m}.weight'] = (f, d)
      shapes[f'{p}.{ff}.DenseReluDense.wo.weight'] = (d, f)
  return shapes


def random_checkpoint(directory: str, config: dict, seed: int = 0) -> dict:
  """Writes config.json + model.safetensors with seeded random weights."""
  rng = np.random.RandomState(seed)
  tensors = {}
  for name, shape in sorted(hf_shapes(config).items()):
    if name.endswith('layer_norm.weight'):
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(shape[-1])
    tensors[name] = value.astype(np.float32)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, 'model.safetensors'),
            metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f)
  return tensors


def _hf_logits(directory: str, config: dict) -> np.ndarray:
  import jax  # pylint: disable=g-import-not-at-top
  from transformers import FlaxT5ForConditionalGeneration, T5Config  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  model = FlaxT5ForConditionalGeneration(T5Config.from_pretrained(directory),
                                         seed=0)
  pt = load_file(os.path.join(directory, 'model.safetensors'))
  params = jax.tree.map(np.asarray, model.params)
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [p.key for p in path]
    stem = '.'.join(keys[:-1])
    if keys[-1] == 'kernel':
      value = pt[stem + '.weight'].T
    elif keys[-1] == 'embedding':
      value = pt[stem + '.weight']
    else:
      value = pt['.'.join(keys)]
    node = params
    for k in keys[:-1]:
      node = node[k]
    assert node[keys[-1]].shape == value.shape, keys
    node[keys[-1]] = value
  out = model(input_ids=ENCODER_TOKENS,
              attention_mask=(ENCODER_TOKENS != 0).astype(np.int32),
              decoder_input_ids=DECODER_TOKENS, params=params)
  return np.asarray(out.logits, np.float32)


if __name__ == '__main__':
  import tempfile  # pylint: disable=g-import-not-at-top
  logits = {}
  for key, cfg in CONFIGS.items():
    with tempfile.TemporaryDirectory() as tmp:
      random_checkpoint(tmp, cfg, seed=1)
      logits[key] = _hf_logits(tmp, cfg)
  save_file(logits, REFERENCE)
  print('wrote', REFERENCE, {k: v.shape for k, v in logits.items()}, file=sys.stderr)

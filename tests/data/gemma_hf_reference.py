"""Tiny random Gemma 1, 2 and 3 checkpoints as transformers writes them, and
transformers' logits on them.

``gemma_hf_reference.json`` holds, per case, the config.json that
transformers' ``save_pretrained`` wrote (so the tests read its own keys:
``hidden_act``, ``rope_parameters`` per layer type, ``layer_types``...) and
the name and shape of every tensor it saved. `random_checkpoint` rebuilds a
case's folder from that with seeded numpy weights (no torch needed), and
``gemma_hf_reference.safetensors`` holds transformers' logits on those
weights for `TOKENS` with `MASK` (row 1 left-padded; its positions count
from its first real token). Running this file regenerates both; it needs
torch and transformers (5.25 made the stored ones):

  python tests/data/gemma_hf_reference.py
"""

from __future__ import annotations

import json
import os
import sys
import zlib

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
SPECS = os.path.join(HERE, 'gemma_hf_reference.json')
REFERENCE = os.path.join(HERE, 'gemma_hf_reference.safetensors')

_SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48,
              num_attention_heads=2, pad_token_id=0, eos_token_id=1,
              bos_token_id=2)
# (transformers config class, model class, config arguments). Sequences
# are longer than every sliding window, and head_dim differs from
# hidden_size / heads.
CASES = {
    # Multi-query attention, one RoPE.
    'gemma1': ('GemmaConfig', 'GemmaForCausalLM',
               dict(_SMALL, num_hidden_layers=2, num_key_value_heads=1,
                    head_dim=24)),
    # Grouped queries, both soft-caps, a query scale other than head_dim,
    # linear RoPE scaling (every layer, local ones too).
    'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM',
               dict(_SMALL, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16,
                    query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0, sliding_window=5,
                    rope_parameters={'rope_type': 'linear', 'factor': 3.0,
                                     'rope_theta': 500.0})),
    # The 5:1 local/global pattern and a local layer after the global one,
    # qk-norm, a RoPE per layer type (the global one scaled).
    'gemma3': ('Gemma3TextConfig', 'Gemma3ForCausalLM',
               dict(_SMALL, num_hidden_layers=7, num_key_value_heads=1,
                    head_dim=16, query_pre_attn_scalar=20, sliding_window=4,
                    rms_norm_eps=1e-5, rope_parameters={
                        'full_attention': {'rope_type': 'linear',
                                           'factor': 2.0,
                                           'rope_theta': 100000.0},
                        'sliding_attention': {'rope_type': 'default',
                                              'rope_theta': 1000.0}})),
    # Irregular layer_types, a final soft-cap, and an attention soft-cap,
    # which transformers' Gemma 3 keeps in its config but does not apply.
    'gemma3_capped': ('Gemma3TextConfig', 'Gemma3ForCausalLM',
                      dict(_SMALL, num_hidden_layers=4,
                           num_key_value_heads=1, head_dim=16,
                           sliding_window=3,
                           layer_types=['full_attention', 'sliding_attention',
                                        'sliding_attention', 'full_attention'],
                           attn_logit_softcapping=4.0,
                           final_logit_softcapping=6.0)),
}
TOKENS = np.random.RandomState(0).randint(3, 128, size=(2, 13))
MASK = np.ones((2, 13), np.int32)
MASK[1, :4] = 0
TOKENS[1, :4] = 0


def random_checkpoint(directory: str, case: str) -> None:
  """Writes case ``case``'s config.json and model.safetensors (seeded by
  each tensor's name, so a regenerated spec keeps the weights)."""
  with open(SPECS, encoding='utf-8') as f:
    spec = json.load(f)[case]
  tensors = {}
  for name, shape in spec['tensors'].items():
    rng = np.random.RandomState(zlib.crc32(name.encode()))
    if 'norm' in name:  # Gemma's RMSNorm scales by 1 + weight
      value = 0.3 * rng.standard_normal(shape)
    elif 'embed' in name:
      value = rng.standard_normal(shape)
    else:
      value = 0.15 * rng.standard_normal(shape)
    tensors[name] = value.astype(np.float32)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, 'model.safetensors'),
            metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w',
            encoding='utf-8') as f:
    json.dump(spec['config'], f, indent=1)


def _regenerate() -> None:
  import tempfile  # pylint: disable=g-import-not-at-top
  import safetensors  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  specs, logits = {}, {}
  for case, (config_cls, model_cls, kwargs) in CASES.items():
    model_cls = getattr(transformers, model_cls)
    with tempfile.TemporaryDirectory() as tmp:
      model_cls(getattr(transformers, config_cls)(**kwargs)).save_pretrained(
          tmp)
      with open(os.path.join(tmp, 'config.json'), encoding='utf-8') as f:
        config = json.load(f)
      with safetensors.safe_open(os.path.join(tmp, 'model.safetensors'),
                                 'np') as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}
    specs[case] = {'config': config, 'tensors': shapes}
  with open(SPECS, 'w', encoding='utf-8') as f:
    json.dump(specs, f, indent=1)
    f.write('\n')
  positions = np.maximum(np.cumsum(MASK, 1) - 1, 0)
  for case, (_, model_cls, _) in CASES.items():
    with tempfile.TemporaryDirectory() as tmp:
      random_checkpoint(tmp, case)
      model = getattr(transformers, model_cls).from_pretrained(
          tmp, attn_implementation='eager', dtype=torch.float32).eval()
      with torch.no_grad():
        out = model(torch.tensor(TOKENS), attention_mask=torch.tensor(MASK),
                    position_ids=torch.tensor(positions)).logits
      logits[case] = out.numpy().astype(np.float32)
  save_file(logits, REFERENCE)
  print('wrote', SPECS, REFERENCE, file=sys.stderr)


if __name__ == '__main__':
  _regenerate()

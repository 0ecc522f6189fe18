"""Gemma 1, 2 and 3 text models in Flax NNX, with HF and GGUF loading.

  path = gemma.gemma3_270m_gguf()            # the real 270M's package, joined
  model = gemma.from_pretrained(path)        # HF directory or .gguf file
  tokenizer = gemma.load_tokenizer(path)     # tokenizer.model or .gguf
  logits = model(tokens)                     # [B, T] ints -> [B, T, V] float32
  hidden = model.hidden(tokens)              # [B, T, D]; then, at chosen
  logits = model.logits(hidden[:, idx])      # positions only: [B, P, V]
  out = gemma.Sampler(model, tokenizer)(['prompt'], max_new_tokens=32)

Parameters carry the logical axes 'vocab', 'embed', 'heads', 'kv_heads',
'head_dim', 'mlp' and 'norm'; LoRA targets are the Projections at
layers/<i>/attn/{q,k,v,o} and layers/<i>/mlp/{gate,up,down}.
"""

from models.gemma.config import CONFIGS, GemmaConfig, get_config
from models.gemma.load import from_pretrained, save_pretrained
from models.gemma.model import Cache, Gemma, forward_fn, init_cache
from models.gemma.packaged import gemma3_270m_gguf
from models.gemma.sampler import Sampler, SamplerOutput, generate, sample_logits
from models.gemma.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    'CONFIGS', 'Cache', 'Gemma', 'GemmaConfig', 'Sampler', 'SamplerOutput',
    'Tokenizer', 'forward_fn', 'from_pretrained', 'gemma3_270m_gguf',
    'generate', 'get_config', 'init_cache', 'load_tokenizer',
    'sample_logits', 'save_pretrained',
]

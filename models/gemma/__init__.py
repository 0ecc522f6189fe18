"""Gemma 1, 2 and 3 text models in Flax NNX, with HF and GGUF loading."""

from models.gemma.config import CONFIGS, GemmaConfig, get_config
from models.gemma.model import Cache, Gemma, forward_fn, init_cache
from models.gemma.load import from_pretrained, save_pretrained
from models.gemma.sampler import Sampler, SamplerOutput, generate, sample_logits
from models.gemma.tokenizer import Tokenizer, load_tokenizer

"""Greedy continuation of a prompt from the command line.

  python -m models.generate --checkpoint PATH --prompt TEXT --max-new-tokens N

PATH is a Hugging Face Gemma directory (config.json, safetensors,
tokenizer.model) or a .gguf file (its vocabulary is the tokenizer).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m models.generate',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='Hugging Face Gemma directory or .gguf file')
  parser.add_argument('--prompt', required=True)
  parser.add_argument('--max-new-tokens', type=int, default=32)
  parser.add_argument('--tokenizer', default=None,
                      help='tokenizer.model or .gguf (default: from checkpoint)')
  parser.add_argument('--temperature', type=float, default=0.0,
                      help='0 (default) decodes greedily')
  parser.add_argument('--top-k', type=int, default=None)
  parser.add_argument('--top-p', type=float, default=None)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                      default='float32', help='compute dtype')
  args = parser.parse_args(argv)

  # Imported here so --help answers without loading JAX.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top

  try:
    tokenizer = gemma.load_tokenizer(args.tokenizer or args.checkpoint)
    model = gemma.from_pretrained(args.checkpoint,
                                  dtype=getattr(jnp, args.dtype))
    # Inside the try: the Sampler refuses bad settings (--max-new-tokens 0,
    # --top-k beyond the vocabulary) and a tokenizer whose ids the model
    # lacks, each with one line.
    out = gemma.Sampler(model, tokenizer)(
        [args.prompt], args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(out.text[0])
  return 0


if __name__ == '__main__':
  sys.exit(main())

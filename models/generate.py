"""Continuation of a prompt from the command line (greedy, or sampled).

  python -m models.generate --checkpoint PATH --prompt TEXT --max-new-tokens N
      [--adapter DIR] [--temperature T [--top-k K] [--top-p P] [--seed S]]

PATH is a Hugging Face Gemma directory (config.json, safetensors,
tokenizer.model) or a .gguf file (its vocabulary is the tokenizer), or a
Hugging Face T5 / mT5 directory (spiece.model; the prompt is the encoder's
input, and decoding is greedy). DIR is a PEFT LoRA adapter folder
(adapter_config.json + adapter_model.safetensors, as ``python -m train``
exports to ``<run_dir>/adapter``), applied to the model before generating.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys

# Where a PEFT adapter for Gemma keeps the decoder layers: Gemma*ForCausalLM
# ('model') or a multimodal Gemma 3 checkpoint's text model.
_GEMMA_PREFIXES = ('model', 'model.language_model', 'language_model.model')
_ADAPTER_LAYER_KEY = re.compile(
    r'base_model\.model\.(?P<prefix>.+?)\.layers\.\d+\.(?:self_attn|mlp)\.')


def load_adapter(model, directory: str):
  """Attaches the PEFT adapter in ``directory`` to ``model``.

  For a Gemma, the module prefix of its keys (``model.layers...`` or a
  multimodal checkpoint's ``model.language_model.layers...``, as the trainer
  exports them) is read off the adapter, so one adapter applies to the HF
  folder and to the .gguf of the same model; a T5's keys take the model's
  own names.

  Raises:
    FileNotFoundError: no such folder, or it lacks the adapter's files.
    ValueError: an adapter for another model (names, shapes) or a malformed
      one (each with one line).
  """
  from models import hf_io, lora  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(directory):
    what = 'not a folder' if os.path.exists(directory) else 'no such folder'
    raise FileNotFoundError(
        f'{directory}: {what} (expected a PEFT adapter folder: '
        f'{lora.ADAPTER_CONFIG} + {lora.ADAPTER_WEIGHTS}, as python -m train '
        'writes to <run_dir>/adapter).')
  keys = hf_io.open_tensors(directory, lora.ADAPTER_WEIGHTS, index=None)
  prefixes = {m['prefix'] for m in map(_ADAPTER_LAYER_KEY.match, keys) if m}
  name_map = None
  if len(prefixes) == 1 and prefixes <= set(_GEMMA_PREFIXES):
    name_map = functools.partial(lora.gemma_hf_name, prefix=prefixes.pop())
  # Anything else (another model's names, shapes, rank) load_peft_adapter
  # refuses before it changes the model.
  return lora.load_peft_adapter(model, directory, name_map=name_map)


class _OneLineParser(argparse.ArgumentParser):
  """Command-line mistakes as one `error:` line (exit 2), as `python -m
  train` reports them, not argparse's usage block."""

  def error(self, message):
    self.exit(2, f'error: {message} (--help lists the options)\n')


def main(argv: list[str] | None = None) -> int:
  parser = _OneLineParser(prog='python -m models.generate',
                          description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='Hugging Face Gemma directory or .gguf file, or a '
                           'Hugging Face T5 / mT5 directory')
  parser.add_argument('--prompt', required=True)
  parser.add_argument('--max-new-tokens', type=int, default=32)
  parser.add_argument('--tokenizer', default=None,
                      help='tokenizer.model or .gguf (default: from checkpoint)')
  parser.add_argument('--adapter', default=None, metavar='DIR',
                      help='PEFT LoRA adapter folder to apply, e.g. '
                           '<run_dir>/adapter from python -m train')
  parser.add_argument('--temperature', type=float, default=0.0,
                      help='0 (default) decodes greedily')
  parser.add_argument('--top-k', type=int, default=None)
  parser.add_argument('--top-p', type=float, default=None)
  parser.add_argument('--seed', type=int, default=None,
                      help='sampling seed (default 0)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                      default='float32', help='compute dtype')
  args = parser.parse_args(argv)
  sampling = [f'--{n}' for n, v in (('temperature', args.temperature != 0),
                                    ('top-k', args.top_k is not None),
                                    ('top-p', args.top_p is not None),
                                    ('seed', args.seed is not None)) if v]
  if sampling and os.path.exists(args.checkpoint) and _is_t5(args.checkpoint):
    # Before the greedy check below, whose advice (pass --temperature) T5
    # then refused.
    print(f'error: T5 / mT5 checkpoints decode greedily here: leave out '
          f'{", ".join(sampling)}.', file=sys.stderr)
    return 2
  if args.temperature == 0 and sampling:
    # Greedy decoding ignores them: say so rather than ignore them silently
    # (every --seed had given the same text).
    them = 'them' if len(sampling) > 1 else 'it'
    print(f'error: {" and ".join(sampling)}: --temperature 0 (the default) '
          f'decodes greedily, which ignores {them}; pass --temperature (e.g. '
          '1.0) to sample.', file=sys.stderr)
    return 2
  if args.seed is None:
    args.seed = 0

  # Imported here so --help answers without loading JAX.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  from models.gemma.load import checkpoint_format  # pylint: disable=g-import-not-at-top

  if not os.path.exists(args.checkpoint):
    # Before the tokenizer, which would be the one named missing.
    print(f'error: --checkpoint {args.checkpoint}: no such file or directory '
          '(a Hugging Face model folder or a .gguf file).', file=sys.stderr)
    return 2
  if _is_t5(args.checkpoint):
    return _generate_t5(args)
  try:
    # The checkpoint's format first: the tokenizer is read from it by
    # default, and another file had been named a bad SentencePiece model.
    checkpoint_format(args.checkpoint)
    tokenizer = gemma.load_tokenizer(args.tokenizer or args.checkpoint)
    model = gemma.from_pretrained(args.checkpoint,
                                  dtype=getattr(jnp, args.dtype))
    if args.adapter is not None:
      load_adapter(model, args.adapter)
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


def _is_t5(path: str) -> bool:
  """Whether ``path`` is a Hugging Face T5 / mT5 folder (by its config)."""
  from models import hf_io  # pylint: disable=g-import-not-at-top
  try:
    config = hf_io.read_json(os.path.join(path, hf_io.CONFIG), 'config.json')
  except (OSError, ValueError):
    return False  # the Gemma loader says what is wrong with it
  return isinstance(config, dict) and config.get('model_type') in ('t5', 'mt5')


def _generate_t5(args) -> int:
  """Greedy decoding of a T5 / mT5 folder (the train loop's evaluation):
  the prompt and EOS are the encoder's input, the reply ends at EOS."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from models import t5  # pylint: disable=g-import-not-at-top
  from models.gemma.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  try:
    # --tokenizer: a SentencePiece model, or a folder holding one.
    where = args.tokenizer or args.checkpoint
    spec = t5.tokenizer_file(where) if os.path.isdir(where) else where
    if spec is None:
      raise FileNotFoundError(
          f'{where}: no spiece.model in this folder (pass --tokenizer with '
          'the T5 / mT5 SentencePiece model).')
    tokenizer = Tokenizer.from_model_file(spec, add_bos=False)
    model = t5.from_pretrained(args.checkpoint,
                               dtype=getattr(jnp, args.dtype))
    mismatch = t5.tokenizer_mismatch(tokenizer, model.config)
    if mismatch:  # as the train loop refuses it
      raise ValueError(f'{spec}: {mismatch}')
    if args.adapter is not None:
      load_adapter(model, args.adapter)
    ids = tokenizer.encode(args.prompt) + [tokenizer.eos_id]
    out = np.asarray(t5.greedy_generate(model, np.asarray([ids], np.int32),
                                        args.max_new_tokens))[0].tolist()
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  eos = model.config.eos_token_id
  print(tokenizer.decode(out[:out.index(eos)] if eos in out else out))
  return 0


if __name__ == '__main__':
  sys.exit(main())

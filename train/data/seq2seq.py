"""Encoder-decoder (T5 / mT5) rows: the prompt is the encoder input, the
target the teacher-forced decoder sequence.

Row format (a dict of numpy arrays; S = encoder length `input_len`, T =
decoder length `target_len`):

  encoder_tokens  int32   [S]  prompt EOS, then `pad_id` (T5 marks encoder
                               padding by the pad id).
  decoder_tokens  int32   [T]  start, target[:-1] (shifted right; T5's start
                               token is the pad id), then `pad_id`.
  targets         int32   [T]  target tokens and EOS, then `pad_id`.
  weights         float32 [T]  1 on the targets (the loss), 0 on padding.
  dropped         int32   []   target tokens (EOS included) cut because the
                               target was longer than T.

Tokenisation is the decoder-only pipeline's (`encode_text`: BOS/EOS the
tokenizer adds are stripped and placed here); the prompt, template already
applied, is truncated from the left as there (its end, the 'Answer:' cue,
matters most) and the target from the right.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

from train.data import pipeline
from train.data.example import Example
from train.data.tokenize import encode_text
from train.data.tokenize import Features
from train.data.tokenize import Tokenizer

FEATURES = ("encoder_tokens", "decoder_tokens", "targets", "weights")


def _check_lengths(input_len: int, target_len: int = 1) -> None:
  # 0 had kept the whole prompt (ids[-0:]) while `encoder_tokens_cut` said
  # all of it was cut, and a dataset had been built that failed when read.
  if input_len < 1 or target_len < 1:
    raise ValueError(f"need input_len >= 1 and target_len >= 1, got "
                     f"{input_len}, {target_len}")


def encoder_ids(prompt: str, tokenizer: Tokenizer, input_len: int
                ) -> list[int]:
  """``prompt EOS``, cut from the left to ``input_len`` (EOS kept)."""
  _check_lengths(input_len)
  ids = encode_text(tokenizer, prompt) + [tokenizer.eos_id]
  return ids[-input_len:]


def encoder_tokens_cut(example: Example, tokenizer: Tokenizer,
                       input_len: int) -> int:
  """How many of ``example``'s prompt tokens `encoder_ids` drops to fit."""
  _check_lengths(input_len)
  return max(len(encode_text(tokenizer, example.prompt)) + 1 - input_len, 0)


def seq2seq_features(input_ids: Sequence[int], target_ids: Sequence[int], *,
                     input_len: int, target_len: int, pad_id: int,
                     start_id: int) -> Features:
  """One padded row from encoder ids and decoder target ids (see the module
  docstring). ``input_ids`` is cut from the left, ``target_ids`` from the
  right; neither gets an EOS here."""
  _check_lengths(input_len, target_len)
  inputs = list(input_ids)[-input_len:]
  targets = list(target_ids)[:target_len]
  n = len(targets)
  enc = np.full(input_len, pad_id, np.int32)
  enc[:len(inputs)] = inputs
  tgt = np.full(target_len, pad_id, np.int32)
  tgt[:n] = targets
  dec = np.full(target_len, pad_id, np.int32)
  dec[0] = start_id
  dec[1:n] = targets[:max(n - 1, 0)]
  weights = np.zeros(target_len, np.float32)
  weights[:n] = 1.0
  return {"encoder_tokens": enc, "decoder_tokens": dec, "targets": tgt,
          "weights": weights,
          "dropped": np.int32(len(target_ids) - n)}


def tokenize_seq2seq(example: Example, tokenizer: Tokenizer, *,
                     input_len: int, target_len: int,
                     start_id: int | None = None) -> Features:
  """A training row: encoder ``prompt EOS``, decoder targets ``target EOS``.

  ``start_id`` defaults to the pad id (T5's decoder start token).
  """
  target = encode_text(tokenizer, example.target) + [tokenizer.eos_id]
  return seq2seq_features(
      encoder_ids(example.prompt, tokenizer, input_len), target,
      input_len=input_len, target_len=target_len, pad_id=tokenizer.pad_id,
      start_id=tokenizer.pad_id if start_id is None else start_id)


def make_seq2seq_train_dataset(examples: Sequence[Example],
                               tokenizer: Tokenizer, *, input_len: int,
                               target_len: int, batch_size: int, seed: int,
                               start_id: int | None = None,
                               num_epochs: int | None = None,
                               shuffle: bool = True,
                               drop_remainder: bool = True,
                               num_threads: int = 2) -> grain.IterDataset:
  """source -> shuffle -> repeat -> tokenise -> pad -> batch, as
  `make_train_dataset` (same order for the same seed, same checkpointable
  iterator state) but with encoder-decoder rows; no packing."""
  if not examples:
    raise ValueError("make_seq2seq_train_dataset got no examples")
  if batch_size < 1:
    raise ValueError(f"need batch_size >= 1, got {batch_size}")
  _check_lengths(input_len, target_len)
  ds = grain.MapDataset.source(list(examples))
  if shuffle:
    ds = pipeline.EpochShuffle(ds, seed)
  ds = ds.repeat(num_epochs)
  if num_epochs is not None and drop_remainder:
    pipeline.check_full_batch("make_seq2seq_train_dataset", len(ds),
                              len(examples), num_epochs, 1, batch_size)
  ds = ds.map(functools.partial(tokenize_seq2seq, tokenizer=tokenizer,
                                input_len=input_len, target_len=target_len,
                                start_id=start_id))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=64 if num_threads else 0))
  return it_ds.batch(batch_size, drop_remainder=drop_remainder)

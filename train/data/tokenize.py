"""Tokenisation of examples into training sequences with a target-only mask.

A sequence is `BOS prompt target EOS`. `loss_mask[t]` is 1 where token t is
to be predicted (from position t-1): on the target tokens and the EOS, never
on BOS, the prompt or padding. The loss pairs logits[:, :-1] with
tokens[:, 1:] under loss_mask[:, 1:].
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from train.data.example import Example

Features = dict[str, np.ndarray]


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline needs of a tokenizer (the Gemma one fits).

  `encode` may add BOS and/or EOS itself (Gemma's adds BOS by default): the
  pipeline strips a leading BOS and a trailing EOS and places its own.
  """

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: a dependency-free tokenizer for tests and `tiny`.

  Ids: 0 pad, 1 BOS, 2 EOS, 3 + byte value; vocabulary size 259.
  """

  pad_id = 0
  bos_id = 1
  eos_id = 2
  vocab_size = 259
  _OFFSET = 3

  def encode(self, text: str) -> list[int]:
    return [b + self._OFFSET for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    data = bytes(int(i) - self._OFFSET for i in ids if int(i) >= self._OFFSET)
    return data.decode("utf-8", errors="replace")


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
  """`tokenizer.encode(text)` without a leading BOS or a trailing EOS.

  Why: it spares callers from knowing each tokenizer's defaults (the
  Gemma tokenizer adds BOS, some do not), and `encode_pair` places them.
  Text that spells special pieces out (``<eos>``, ``<start_of_turn>``) is
  read as their ids, as Hugging Face's tokenizers read it: such a piece
  inside a target is a real EOS there, and a ``<bos>``/``<eos>`` at the
  very start/end of the text is dropped here like an added one.
  """
  ids = list(tokenizer.encode(text))
  if ids and ids[0] == tokenizer.bos_id:
    ids = ids[1:]
  if ids and ids[-1] == tokenizer.eos_id:
    ids = ids[:-1]
  return ids


def encode_pair(prompt: str, target: str, tokenizer: Tokenizer,
                max_length: int, *, add_eos: bool = True,
                max_target: int | None = None
                ) -> tuple[list[int], list[int]]:
  """Encodes (prompt, target) to fit `max_length` tokens in all.

  The prompt (with BOS first) is truncated from the left, because its end
  (the question, the 'Response:' cue) matters most and the target must stay
  whole. Only when the target alone does not fit is the prompt dropped to
  BOS and the target cut from the right (losing EOS).

  Args:
    prompt: Prompt text.
    target: Target text.
    tokenizer: A `Tokenizer`.
    max_length: Total token budget, at least 2.
    add_eos: Append EOS to the target (training: yes; scoring answer
      options: no).
    max_target: Keep at most this many target tokens (EOS included), cut
      from the right, before fitting the prompt: training scores only the
      first ones, and a target that fills the row would cost the prompt.
      At least 1, or None for no limit.

  Returns:
    (prompt_ids starting with BOS, target_ids).
  """
  prompt_ids, target_ids, _, _ = _encode_pair_counted(
      prompt, target, tokenizer, max_length, add_eos, max_target)
  return prompt_ids, target_ids


def prompt_tokens_cut(example: Example, tokenizer: Tokenizer,
                      max_length: int, max_target: int | None = None) -> int:
  """How many of ``example``'s prompt tokens a training row drops to fit
  (`encode_pair`'s left cut; all of them when the target fills the row)."""
  return _encode_pair_counted(example.prompt, example.target, tokenizer,
                              max_length, True, max_target)[3]


def _encode_pair_counted(prompt, target, tokenizer, max_length, add_eos,
                         max_target
                         ) -> tuple[list[int], list[int], int, int]:
  """`encode_pair`, how many target tokens it cut, and how many prompt
  tokens."""
  if max_length < 2:
    raise ValueError(f"max_length must be at least 2, got {max_length}")
  if max_target is not None and max_target < 1:
    # A negative one had cut from the end, as a Python slice does.
    raise ValueError(f"max_target must be >= 1 or None, got {max_target}")
  prompt_ids = encode_text(tokenizer, prompt)
  target_ids = encode_text(tokenizer, target)
  if add_eos:
    target_ids.append(tokenizer.eos_id)
  full = len(target_ids)
  if max_target is not None:
    target_ids = target_ids[:max_target]
  budget = max_length - 1 - len(target_ids)  # Room left for prompt tokens.
  if budget < 0:
    target_ids = target_ids[:max_length - 1]
    return ([tokenizer.bos_id], target_ids, full - len(target_ids),
            len(prompt_ids))
  cut = max(len(prompt_ids) - budget, 0)
  return ([tokenizer.bos_id] + prompt_ids[cut:], target_ids,
          full - len(target_ids), cut)


def tokenize_example(example: Example, tokenizer: Tokenizer,
                     max_length: int, max_target: int | None = None
                     ) -> Features:
  """Unpadded features of one training example, L <= max_length tokens.

  Returns:
    {'tokens': int32[L], 'loss_mask': float32[L], 'dropped': float32[L]}:
    'dropped' holds at position 0 the number of target tokens (EOS
    included) cut to fit (see `encode_pair`'s ``max_target``), zeros
    elsewhere, so that it packs and pads like the other features and a
    batch's sum is its count.
  """
  prompt_ids, target_ids, cut, _ = _encode_pair_counted(
      example.prompt, example.target, tokenizer, max_length, True,
      max_target)
  tokens = np.asarray(prompt_ids + target_ids, np.int32)
  loss_mask = np.zeros(len(tokens), np.float32)
  loss_mask[len(prompt_ids):] = 1.0
  dropped = np.zeros(len(tokens), np.float32)
  dropped[0] = cut
  return {"tokens": tokens, "loss_mask": loss_mask, "dropped": dropped}


def pad_features(features: Features, length: int, pad_id: int) -> Features:
  """Pads one unpacked sequence to `length`, adding positions and segment ids.

  Args:
    features: {'tokens', 'loss_mask'} of length L <= `length`.
    length: The padded length T.
    pad_id: Token id for padding.

  Returns:
    {'tokens', 'loss_mask', 'positions', 'segment_ids'}, each [T];
    segment_ids is 1 on real tokens and 0 on padding, positions count from 0
    (0 on padding), the same layout packed rows have.
  """
  n = len(features["tokens"])
  if n > length:
    raise ValueError(f"sequence of {n} tokens does not fit length {length}")
  tokens = np.full(length, pad_id, np.int32)
  tokens[:n] = features["tokens"]
  loss_mask = np.zeros(length, np.float32)
  loss_mask[:n] = features["loss_mask"]
  positions = np.zeros(length, np.int32)
  positions[:n] = np.arange(n)
  segment_ids = np.zeros(length, np.int32)
  segment_ids[:n] = 1
  out = {"tokens": tokens, "loss_mask": loss_mask, "positions": positions,
         "segment_ids": segment_ids}
  if "dropped" in features:
    out["dropped"] = np.zeros(length, np.float32)
    out["dropped"][:n] = features["dropped"]
  return out

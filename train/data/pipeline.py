"""grain pipelines: examples -> shuffled, repeated, tokenised, batched rows.

Batch format (a dict of numpy arrays, B = batch size, T = `seq_len`):

  tokens       int32   [B, T]  BOS prompt target EOS (several per row when
                               packed), then `pad_id`.
  loss_mask    float32 [B, T]  1 where the token is a training target (target
                               tokens and EOS), 0 on BOS, prompt, padding.
                               Loss: logits[:, :-1] vs tokens[:, 1:] under
                               loss_mask[:, 1:].
  positions    int32   [B, T]  position within its own example (restarts at
                               0 for each packed example; 0 on padding).
  segment_ids  int32   [B, T]  1, 2, ... per packed example, 0 on padding;
                               attention must not cross segments.
  dropped      float32 [B, T]  target tokens cut to fit, counted at each
                               example's first token (0 elsewhere): the
                               batch's sum is its count.

Determinism: the same examples, seed and arguments give the same batches.
Checkpointing: the iterator's `get_state()` is a small JSON-able dict and
`set_state(state)` on a fresh iterator of the same dataset resumes with
exactly the batches an uninterrupted iterator would have produced next.
With orbax, save it as `grain.checkpoint.CheckpointSave(iterator)` (and
restore with `grain.checkpoint.CheckpointRestore(iterator)`) inside an
`ocp.args.Composite`; `grain.checkpoint.CheckpointHandler` is the handler.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from train.data.example import Example
from train.data.tokenize import Features
from train.data.tokenize import pad_features
from train.data.tokenize import Tokenizer
from train.data.tokenize import tokenize_example

FEATURES = ("tokens", "loss_mask", "positions", "segment_ids", "dropped")


def _tokenize(example: Example, *, tokenizer: Tokenizer, seq_len: int,
              max_target: int | None = None) -> Features:
  return tokenize_example(example, tokenizer, seq_len, max_target)


def _pad(features: Features, *, seq_len: int, pad_id: int) -> Features:
  return pad_features(features, seq_len, pad_id)


def _rename_packed(features: Features) -> Features:
  """grain's packer names positions/segments per feature; keep one of each."""
  return {"tokens": features["tokens"],
          "loss_mask": features["loss_mask"],
          "dropped": features["dropped"],
          "positions": features["tokens_positions"],
          "segment_ids": features["tokens_segment_ids"]}


def _read_options(num_threads: int) -> grain.ReadOptions:
  # A small pool: tokenising is cheap next to a train step, and the machines
  # this first runs on have 2 cores.
  return grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=64 if num_threads else 0)


def make_train_dataset(examples: Sequence[Example], tokenizer: Tokenizer, *,
                       seq_len: int, batch_size: int, seed: int,
                       num_epochs: int | None = None, shuffle: bool = True,
                       pack: bool = False, num_packing_bins: int | None = None,
                       shard_index: int = 0, shard_count: int = 1,
                       drop_remainder: bool = True, num_threads: int = 2,
                       max_target_tokens: int | None = None
                       ) -> grain.IterDataset:
  """The training pipeline: source -> shuffle -> repeat -> shard -> tokenise
  -> pad or pack -> batch.

  Args:
    examples: Training examples.
    tokenizer: A `Tokenizer`.
    seq_len: Row length T.
    batch_size: Rows per batch (per process when sharded).
    seed: Shuffle seed; each epoch is reshuffled from it.
    num_epochs: Passes over the data, or None to repeat forever.
    shuffle: Whether to shuffle.
    pack: Pack several examples per row (first-fit); otherwise one per row.
    num_packing_bins: Rows packed at once (default `batch_size`).
    shard_index: This process's shard (`jax.process_index()`).
    shard_count: Number of shards (`jax.process_count()`). Shards take
      turns over one stream of every epoch, shuffled alike on every process
      (the same ``seed``), so each epoch reads every example once, on one
      process, and each example counts as much as any other. With finite
      epochs shards are equal: the stream's last
      `len(examples) * num_epochs % shard_count` examples are left out, so
      that every process has the same number of batches (one process with a
      batch more would wait in its step's collective forever). Packing fills
      rows by length, so packed shards can still differ by a batch; repeat
      forever (`num_epochs=None`) when packing.
    drop_remainder: Drop a last partial batch (only with finite epochs).
      If the examples alone cannot fill one batch, an error (packed rows,
      fewer than the examples, are known only when read: packing can still
      leave none).
    num_threads: grain reader threads (0: no prefetch).
    max_target_tokens: Keep at most this many target tokens (EOS included)
      of each example (the ones a step scores), so that a long target leaves
      room for its prompt; the rest is counted in 'dropped'. At least 1, or
      None for no limit.

  Returns:
    A `grain.IterDataset` of batches; see the module docstring.
  """
  if not examples:
    raise ValueError("make_train_dataset got no examples")
  if seq_len < 2 or batch_size < 1:
    raise ValueError(
        f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  if max_target_tokens is not None and max_target_tokens < 1:
    raise ValueError(f"max_target_tokens must be >= 1 or None, got "
                     f"{max_target_tokens}")
  # Checked here too: without shuffling only the packer reads the seed, and
  # grain's own error does not name it.
  _check_seed(seed)
  if len(examples) < shard_count:
    raise ValueError(f"make_train_dataset got {len(examples)} examples for "
                     f"{shard_count} shards: each shard needs one")
  ds = grain.MapDataset.source(list(examples))
  if shuffle:
    ds = EpochShuffle(ds, seed)
  ds = ds.repeat(num_epochs)
  if shard_count > 1:
    # Shard the repeated stream, not the source: shards of a source that
    # does not divide evenly, each repeated on its own, had read the
    # smaller shards' examples more often (3 examples on 2 processes: one
    # of them twice as often as the others).
    if num_epochs is not None:
      ds = ds[:len(ds) - len(ds) % shard_count]
    ds = ds[shard_index::shard_count]
  if num_epochs is not None and drop_remainder:
    check_full_batch("make_train_dataset", len(ds), len(examples),
                     num_epochs, shard_count, batch_size)
  ds = ds.map(functools.partial(_tokenize, tokenizer=tokenizer,
                                seq_len=seq_len, max_target=max_target_tokens))
  if pack:
    it_ds = ds.to_iter_dataset(_read_options(num_threads))
    it_ds = grain.experimental.FirstFitPackIterDataset(
        it_ds, length_struct={"tokens": seq_len, "loss_mask": seq_len,
                              "dropped": seq_len},
        num_packing_bins=num_packing_bins or batch_size, seed=seed,
        padding_struct={"tokens": tokenizer.pad_id, "loss_mask": 0.0,
                        "dropped": 0.0})
    it_ds = it_ds.map(_rename_packed)
  else:
    ds = ds.map(functools.partial(_pad, seq_len=seq_len,
                                  pad_id=tokenizer.pad_id))
    it_ds = ds.to_iter_dataset(_read_options(num_threads))
  return it_ds.batch(batch_size, drop_remainder=drop_remainder)


def check_full_batch(who: str, rows: int, examples: int, num_epochs: int,
                     shard_count: int, batch_size: int) -> None:
  """Refuses finite epochs whose ``rows`` (per shard, before packing) fill
  no batch of ``batch_size``: the iterator had ended at once, and a loop
  over it did no steps. A packed row holds one example or more, so
  packing cannot fill one either (it can empty one more: packed rows are
  known only when read)."""
  if rows < batch_size:
    raise ValueError(
        f"{who}: {rows} examples per shard (of {examples} x {num_epochs} "
        f"epochs over {shard_count} shards) make no full batch of "
        f"{batch_size}; lower batch_size or pass drop_remainder=False")


def _check_seed(seed: int) -> None:
  if not 0 <= seed < 2**32:
    raise ValueError(f"data.seed must be in [0, 2**32), got {seed}")


@functools.lru_cache(maxsize=256)  # asked once per example read
def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of ``epoch``: ``seed`` itself for the first, a 32-bit
  seed mixed from both for the others."""
  if epoch == 0:
    return seed
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochShuffle(grain.MapDataset):
  """``parent`` shuffled anew every epoch (``index // len(parent)``).

  grain's ``shuffle(seed)`` orders epoch ``e`` with ``seed + e``, so
  ``data.seed`` s's second epoch was seed s + 1's first: runs of a seed
  sweep over several epochs saw one another's orders. Epoch 0 is grain's
  order for ``seed`` (a run of under an epoch is as before); epoch e > 0 is
  shuffled with `epoch_seed`.
  """

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    _check_seed(seed)
    self._seed = int(seed)

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    length = len(self._parent)
    epoch, index_in_epoch = divmod(index, length)
    shuffled = grain.experimental.index_shuffle(
        index_in_epoch, max_index=length - 1,
        seed=epoch_seed(self._seed, epoch), rounds=4)
    return self._parent[shuffled + epoch * length]


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int, pad_id: int
               ) -> dict[str, np.ndarray]:
  """Pads a short last batch with empty rows (all-zero masks and segments),
  so evaluation keeps one static shape under jit."""
  n = len(batch["tokens"])
  if n == batch_size:
    return batch
  out = {}
  for key, value in batch.items():
    pad = np.full((batch_size - n,) + value.shape[1:],
                  pad_id if key == "tokens" else 0, value.dtype)
    out[key] = np.concatenate([value, pad])
  return out


def make_eval_dataset(examples: Sequence[Example], tokenizer: Tokenizer, *,
                      seq_len: int, batch_size: int, num_threads: int = 2
                      ) -> grain.IterDataset:
  """One ordered pass, one example per row, the last batch padded with empty
  rows (segment_ids and loss_mask all 0) to `batch_size`."""
  if not examples:
    raise ValueError("make_eval_dataset got no examples")
  ds = grain.MapDataset.source(list(examples)).map(
      functools.partial(_tokenize, tokenizer=tokenizer, seq_len=seq_len)).map(
          functools.partial(_pad, seq_len=seq_len, pad_id=tokenizer.pad_id))
  it_ds = ds.to_iter_dataset(_read_options(num_threads)).batch(
      batch_size, drop_remainder=False)
  return it_ds.map(functools.partial(_pad_batch, batch_size=batch_size,
                                   pad_id=tokenizer.pad_id))


def iterator_from_state(dataset: grain.IterDataset, state: dict[str, Any]
                        ) -> grain.DatasetIterator:
  """A fresh iterator over `dataset` positioned at a saved `get_state()`."""
  iterator = iter(dataset)
  iterator.set_state(state)
  return iterator

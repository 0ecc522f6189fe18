"""Tokenisation, masks, packing and the grain pipelines of `train.data`."""

import collections
import json

import grain
import numpy as np
import pytest

from train import data
from train.data import Example

TOK = data.ByteTokenizer()


def _examples(n, seed=0):
  return data.load_task("arithmetic", "train", num_examples=n + n // 9 + 2,
                        seed=seed)[:n]


def _targets_of_row(tokens, loss_mask, segment_ids):
  """Decoded masked text of each segment of a row."""
  out = []
  for seg in range(1, segment_ids.max() + 1):
    where = (segment_ids == seg) & (loss_mask > 0)
    out.append(TOK.decode([t for t in tokens[where] if t != TOK.eos_id]))
  return out


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_tokenizer_protocol():
  assert isinstance(TOK, data.Tokenizer)
  assert TOK.decode(TOK.encode("héllo")) == "héllo"


class _AddsBos(data.ByteTokenizer):
  """Like Gemma's tokenizer: encode() prepends BOS (and here also EOS)."""

  def encode(self, text):
    return [self.bos_id] + super().encode(text) + [self.eos_id]


def test_tokenizer_that_adds_bos_gets_one_bos():
  e = Example(prompt="Q?", target=" 7")
  np.testing.assert_array_equal(
      data.tokenize_example(e, _AddsBos(), 16)["tokens"],
      data.tokenize_example(e, TOK, 16)["tokens"])


def test_encode_pair_truncates_prompt_from_the_left():
  prompt, target = data.encode_pair("abcdefgh", "XY", TOK, max_length=7)
  assert prompt == [TOK.bos_id] + TOK.encode("fgh")  # 7 = 1 + 3 + 2 + 1.
  assert target == TOK.encode("XY") + [TOK.eos_id]
  # Exactly full: prompt kept whole.
  prompt, _ = data.encode_pair("abcd", "XY", TOK, max_length=8)
  assert prompt == [TOK.bos_id] + TOK.encode("abcd")
  # No room for any prompt token.
  prompt, target = data.encode_pair("abcd", "XY", TOK, max_length=4)
  assert prompt == [TOK.bos_id] and len(target) == 3
  # The target alone is too long: cut from the right, EOS lost.
  prompt, target = data.encode_pair("abcd", "WXYZ", TOK, max_length=3)
  assert prompt == [TOK.bos_id] and target == TOK.encode("WX")
  _, target = data.encode_pair("p", "XY", TOK, 8, add_eos=False)
  assert target == TOK.encode("XY")
  with pytest.raises(ValueError, match="max_length must be at least 2"):
    data.encode_pair("p", "t", TOK, 1)
  # A negative one had cut from the end, as a Python slice does.
  with pytest.raises(ValueError, match=r"^max_target must be >= 1 or None, "
                     "got -1$"):
    data.encode_pair("p", "t", TOK, 8, max_target=-1)


def test_prompt_tokens_cut_counts_what_the_row_drops():
  # The cases above: 5 of "abcdefgh" dropped; none at exactly full; all 4
  # of "abcd" with no room, and with a target too long for the row.
  for prompt, target, length, max_target, cut in [
      ("abcdefgh", "XY", 7, None, 5), ("abcd", "XY", 8, None, 0),
      ("abcd", "XY", 4, None, 4), ("abcd", "WXYZ", 3, None, 4),
      # A cap on the target tokens leaves room for the prompt.
      ("abcd", "WXYZ", 7, 2, 0)]:
    got = data.prompt_tokens_cut(Example(prompt=prompt, target=target), TOK,
                                 length, max_target)
    assert got == cut, (prompt, target, length, max_target)
  # The T5 encoder's row: prompt + EOS, cut from the left.
  e = Example(prompt="abcdef", target="xy")
  assert [data.encoder_tokens_cut(e, TOK, n) for n in (8, 7, 4)] == [0, 0, 3]
  assert len(data.encoder_ids(e.prompt, TOK, 4)) == 4


def test_tokenize_example_masks_target_and_eos_only():
  features = data.tokenize_example(Example(prompt="Q?", target=" 7"), TOK, 16)
  assert features["tokens"].dtype == np.int32
  assert features["loss_mask"].dtype == np.float32
  assert features["tokens"].tolist() == (
      [TOK.bos_id] + TOK.encode("Q?") + TOK.encode(" 7") + [TOK.eos_id])
  assert features["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1]
  padded = data.pad_features(features, 8, TOK.pad_id)
  assert padded["tokens"].tolist()[-2:] == [TOK.pad_id] * 2
  assert padded["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
  assert padded["positions"].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
  assert padded["segment_ids"].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
  with pytest.raises(ValueError, match="does not fit"):
    data.pad_features(features, 5, TOK.pad_id)


def test_unpacked_batches():
  examples = _examples(12)
  ds = data.make_train_dataset(examples, TOK, seq_len=128, batch_size=4,
                               seed=0, num_epochs=1, shuffle=False)
  batches = list(ds)
  assert len(batches) == 3
  b = batches[0]
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      "tokens": ((4, 128), np.int32), "loss_mask": ((4, 128), np.float32),
      "positions": ((4, 128), np.int32), "segment_ids": ((4, 128), np.int32),
      "dropped": ((4, 128), np.float32)}
  assert b["dropped"].sum() == 0  # Every target fits.
  for row in range(4):
    e = examples[row]
    assert _targets_of_row(b["tokens"][row], b["loss_mask"][row],
                           b["segment_ids"][row]) == [e.target]
    n = int(b["segment_ids"][row].sum())
    assert TOK.decode(b["tokens"][row][:n]) == e.prompt + e.target
    assert b["tokens"][row][0] == TOK.bos_id
    assert b["tokens"][row][n - 1] == TOK.eos_id
    assert (b["tokens"][row][n:] == TOK.pad_id).all()


@pytest.mark.parametrize("pack", [False, True])
def test_a_long_target_keeps_its_prompt_and_counts_what_is_cut(pack):
  """With max_target_tokens a target that would fill the row is cut to the
  tokens a step scores, and the prompt keeps the rest of the row; the cut
  tokens are counted in 'dropped' (packed or not)."""
  long = Example("Question: what is 2 + 2?\nAnswer:", " " + "4" * 50)
  short = Example("Question: what is 1 + 1?\nAnswer:", " 2")
  ds = data.make_train_dataset([long, short], TOK, seq_len=40, batch_size=2,
                               seed=0, num_epochs=1, shuffle=False, pack=pack,
                               max_target_tokens=8)
  (b,) = list(ds)
  row = b["tokens"][0]
  texts = _targets_of_row(row, b["loss_mask"][0], b["segment_ids"][0])
  assert texts[0] == " " + "4" * 7  # 8 target tokens kept.
  first = np.flatnonzero(b["segment_ids"][0] == 1)
  prompt = row[first][b["loss_mask"][0][first] == 0][1:]  # After BOS.
  assert TOK.decode(prompt) == long.prompt[-(40 - 1 - 8):]
  assert b["dropped"].sum() == 51 + 1 - 8  # Target + EOS, less the kept 8.
  # Without it, the old behaviour: the prompt gives way to the target.
  (b,) = list(data.make_train_dataset(
      [long, short], TOK, seq_len=40, batch_size=2, seed=0, num_epochs=1,
      shuffle=False, pack=pack))
  first = np.flatnonzero(b["segment_ids"][0] == 1)
  assert b["loss_mask"][0][first[1]] == 1  # Only BOS before the target.
  assert b["dropped"].sum() == 51 + 1 - 39


def test_packed_batches_have_segments_positions_and_masks():
  examples = _examples(40)
  ds = data.make_train_dataset(examples, TOK, seq_len=256, batch_size=4,
                               seed=0, num_epochs=1, shuffle=False, pack=True)
  seen = []
  for b in ds:
    for row in range(len(b["tokens"])):
      seg, pos = b["segment_ids"][row], b["positions"][row]
      assert seg.max() >= 2  # Several examples share a row.
      for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all()  # Contiguous.
        assert pos[where].tolist() == list(range(len(where)))
        assert b["tokens"][row][where[0]] == TOK.bos_id
        assert b["loss_mask"][row][where[0]] == 0  # Nothing crosses segments.
      assert (b["loss_mask"][row][seg == 0] == 0).all()
      seen += _targets_of_row(b["tokens"][row], b["loss_mask"][row], seg)
  assert sorted(seen) == sorted(e.target for e in examples)


def test_same_seed_same_batches_and_epochs_reshuffled():
  examples = _examples(10)
  kw = dict(seq_len=96, batch_size=5, num_epochs=2)
  a = list(data.make_train_dataset(examples, TOK, seed=3, **kw))
  b = list(data.make_train_dataset(examples, TOK, seed=3, **kw))
  c = list(data.make_train_dataset(examples, TOK, seed=4, **kw))
  _assert_batches_equal(a, b)
  assert not all(np.array_equal(x["tokens"], y["tokens"])
                 for x, y in zip(a, c))
  epoch1 = np.concatenate([a[0]["tokens"], a[1]["tokens"]])
  epoch2 = np.concatenate([a[2]["tokens"], a[3]["tokens"]])
  assert sorted(map(bytes, epoch1)) == sorted(map(bytes, epoch2))
  assert not np.array_equal(epoch1, epoch2)


@pytest.mark.parametrize("pack", [False, True])
def test_resume_from_saved_state_is_exact(pack):
  examples = _examples(30)

  def make():  # A fresh pipeline, as a restarted job would build.
    return data.make_train_dataset(examples, TOK, seq_len=160, batch_size=4,
                                   seed=7, pack=pack)

  uninterrupted = _take(iter(make()), 25)  # Crosses several epochs.
  it = iter(make())
  _take(it, 11)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able.
  _take(it, 3)  # Progress after the save must not leak into the resume.
  resumed = data.iterator_from_state(make(), state)
  _assert_batches_equal(_take(resumed, 14), uninterrupted[11:])


def test_orbax_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  examples = _examples(20)

  def make():
    return data.make_train_dataset(examples, TOK, seq_len=128, batch_size=3,
                                   seed=1)

  expected = _take(iter(make()), 9)[5:]
  it = iter(make())
  _take(it, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  fresh = iter(make())
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(fresh, 4), expected)


def test_shards_are_disjoint_and_cover():
  examples = _examples(12)
  rows = []
  for index in range(2):
    ds = data.make_train_dataset(examples, TOK, seq_len=96, batch_size=2,
                                 seed=0, num_epochs=1, shard_index=index,
                                 shard_count=2)
    rows.append({bytes(r) for b in ds for r in b["tokens"]})
  assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == 12
  # Shards are equal, so that with finite epochs no process has a batch the
  # others lack (5 and 4 examples gave 3 and 2 batches of 2 with the last
  # kept, one step for one process alone): the ninth example is left out.
  counts = [len(list(data.make_train_dataset(
      _examples(9), TOK, seq_len=96, batch_size=2, seed=0, num_epochs=1,
      shard_index=index, shard_count=2, drop_remainder=False)))
            for index in range(2)]
  assert counts == [2, 2]
  # Repeating forever, shards take turns over one stream: every example is
  # read as often as any other (shards of the source, each repeated on its
  # own, had read 3 examples on 2 processes as 300, 600 and 300 times).
  for shuffle in (False, True):
    counts = collections.Counter()
    for index in range(2):
      it = iter(data.make_train_dataset(
          _examples(3), TOK, seq_len=96, batch_size=1, seed=0,
          shuffle=shuffle, shard_index=index, shard_count=2, num_threads=0))
      counts.update(bytes(next(it)['tokens'][0]) for _ in range(30))
    assert sorted(counts.values()) == [20, 20, 20], counts
  # Each epoch (3 stream rows) reads every example once, on one process.
  per_epoch = [list(data.make_train_dataset(
      _examples(3), TOK, seq_len=96, batch_size=1, seed=0, num_epochs=2,
      shard_index=index, shard_count=2, num_threads=0)) for index in range(2)]
  stream = [bytes(b['tokens'][0]) for pair in zip(*per_epoch) for b in pair]
  assert len(stream) == 6 and len(set(stream[:3])) == len(set(stream[3:])) == 3
  with pytest.raises(ValueError, match="1 examples for 2 shards"):
    data.make_train_dataset(_examples(1), TOK, seq_len=8, batch_size=1,
                            seed=0, shard_count=2)
  with pytest.raises(ValueError, match="shard_index 2 not in"):
    data.make_train_dataset(examples, TOK, seq_len=8, batch_size=1, seed=0,
                            shard_index=2, shard_count=2)


@pytest.mark.parametrize("kwargs,message", [
    # Had been an iterator that ended at once: a loop over it did no steps.
    (dict(num_epochs=1, shard_count=4, batch_size=2),
     r"^make_train_dataset: 1 examples per shard \(of 7 x 1 epochs over 4 "
     r"shards\) make no full batch of 2; lower batch_size"),
    (dict(num_epochs=1, batch_size=8, pack=True),
     "make no full batch of 8"),
    # Had cut from the end, as a Python slice does.
    (dict(max_target_tokens=-1), r"^max_target_tokens must be >= 1 or None, "
     "got -1$"),
    # Without shuffling only the packer reads the seed (grain's error).
    (dict(seed=-1, shuffle=False, pack=True),
     r"^data.seed must be in \[0, 2\*\*32\), got -1$"),
])
def test_bad_pipeline_arguments_are_one_line(kwargs, message):
  kwargs = {"batch_size": 1, "seed": 0, **kwargs}
  with pytest.raises(ValueError, match=message):
    data.make_train_dataset(_examples(7), TOK, seq_len=96, **kwargs)


def test_seq2seq_epochs_that_fill_no_batch_are_one_line():
  with pytest.raises(ValueError, match=r"^make_seq2seq_train_dataset: 3 "
                     r"examples per shard \(of 3 x 1 epochs over 1 shards\) "
                     "make no full batch of 8"):
    data.make_seq2seq_train_dataset(
        _examples(3), TOK, input_len=64, target_len=16, start_id=0,
        batch_size=8, seed=0, num_epochs=1, num_threads=0)


def test_eval_dataset_keeps_order_and_pads_last_batch():
  examples = _examples(7)
  batches = list(data.make_eval_dataset(examples, TOK, seq_len=96,
                                        batch_size=3))
  assert [b["tokens"].shape for b in batches] == [(3, 96)] * 3
  last = batches[-1]
  assert (last["segment_ids"][1:] == 0).all()
  assert (last["loss_mask"][1:] == 0).all()
  assert (last["tokens"][1:] == TOK.pad_id).all()
  got = [_targets_of_row(b["tokens"][r], b["loss_mask"][r],
                         b["segment_ids"][r])
         for b in batches for r in range(3)][:7]
  assert got == [[e.target] for e in examples]


def test_bad_pipeline_arguments():
  with pytest.raises(ValueError, match="got no examples"):
    data.make_train_dataset([], TOK, seq_len=8, batch_size=1, seed=0)
  with pytest.raises(ValueError, match="need seq_len >= 2"):
    data.make_train_dataset(_examples(2), TOK, seq_len=1, batch_size=1,
                            seed=0)


def _epoch_orders(seed, epochs, n=12, seq2seq=False):
  """Per epoch, the order (first tokens of each row) a seed's run sees."""
  examples = _examples(n)
  if seq2seq:
    ds = data.make_seq2seq_train_dataset(
        examples, TOK, input_len=64, target_len=16, start_id=0, batch_size=1,
        seed=seed, num_epochs=epochs, num_threads=0)
    key = "encoder_tokens"
  else:
    ds = data.make_train_dataset(examples, TOK, seq_len=64, batch_size=1,
                                 seed=seed, num_epochs=epochs, num_threads=0)
    key = "tokens"
  rows = [tuple(b[key][0][:24]) for b in ds]
  return [rows[e * n:(e + 1) * n] for e in range(epochs)]


@pytest.mark.parametrize("seq2seq", [False, True])
def test_each_epoch_is_its_own_shuffle_and_no_other_seeds(seq2seq):
  """grain shuffles epoch e with seed + e: seed 0's second epoch had been
  seed 1's first, so a seed sweep over several epochs repeated orders."""
  zero = _epoch_orders(0, 3, seq2seq=seq2seq)
  one = _epoch_orders(1, 2, seq2seq=seq2seq)
  assert zero[1] != one[0] and zero[2] != one[1]
  assert len({tuple(o) for o in zero}) == 3  # reshuffled every epoch
  assert sorted(zero[1]) == sorted(zero[0])  # each epoch: every example once
  # The first epoch is grain's own order for the seed, as it always was.
  if not seq2seq:
    grains = grain.MapDataset.source(_examples(12)).shuffle(seed=0)
    ds = data.make_train_dataset([grains[i] for i in range(12)], TOK,
                                 seq_len=64, batch_size=1, seed=0,
                                 num_epochs=1, shuffle=False, num_threads=0)
    assert zero[0] == [tuple(b["tokens"][0][:24]) for b in ds]


class _PadSeven(data.ByteTokenizer):
  pad_id = 7


def test_eval_batches_pad_with_the_tokenizers_pad_id():
  ex = [Example(f"p{i}", "t") for i in range(3)]
  batches = list(data.make_eval_dataset(ex, _PadSeven(), seq_len=8,
                                        batch_size=2, num_threads=0))
  assert (batches[-1]["tokens"][1] == 7).all()


def test_shards_take_turns_over_an_endless_stream():
  ex = [Example(f"p{i}", "t") for i in range(6)]

  def firsts(index):
    it = iter(data.make_train_dataset(
        ex, TOK, seq_len=8, batch_size=1, seed=0, shuffle=False,
        shard_index=index, shard_count=2, num_threads=0))
    return [TOK.decode(next(it)["tokens"][0])[:2] for _ in range(3)]

  assert firsts(0) == ["p0", "p2", "p4"] and firsts(1) == ["p1", "p3", "p5"]


def test_the_largest_seed_is_refused_in_one_line():
  with pytest.raises(ValueError, match=r"must be in \[0, 2\*\*32\)"):
    data.make_train_dataset([Example("p", "t")], TOK, seq_len=8,
                            batch_size=1, seed=2**32)


def test_seq2seq_batch_size_is_checked():
  with pytest.raises(ValueError, match="need batch_size >= 1, got 0"):
    data.make_seq2seq_train_dataset([Example("p", "t")], TOK, input_len=4,
                                    target_len=4, batch_size=0, seed=0)

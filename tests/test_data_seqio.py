"""seqio Task registrations (the optional [seqio] extra).

Tests that need seqio are skipped only when seqio cannot be imported.
"""

import functools
import json
import math
import os
import sys
from pathlib import Path

import pytest

from train import data
from train.data import formats
from train.data import seqio_tasks

DATA_DIR = Path(os.environ.get("LRO_DATA_DIR") or
                Path(__file__).resolve().parents[1].parent / "shared" / "data")


def test_missing_seqio_is_one_clear_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "seqio", None)
  with pytest.raises(ImportError, match=r"need the \[seqio\] extra") as e:
    seqio_tasks.register_tasks(vocabulary=None)
  assert "\n" not in str(e.value)


def test_bad_arguments_are_refused_at_registration(monkeypatch):
  """Before seqio is imported: a wrong style or fraction had failed at the
  first get_dataset, inside seqio; a held_out key spelt another way
  ('Math') had been passed over, serving GSM8K's test questions."""
  monkeypatch.setitem(sys.modules, "seqio", None)
  for kwargs, message in (
      ({"style": "chat"}, r"^unknown prompt style 'chat'; expected one of "
       r"alpaca, plain, tk$"),
      ({"validation_fraction": 2.0}, r"^validation_fraction must be a number "
       r"in \[0, 1\), got 2.0$"),
      ({"validation_fraction": "0.1"}, r"^validation_fraction must be"),
      ({"held_out": {"maths": ("gsm8k",)}}, r"^held_out: unknown task "
       r"'maths'; expected one of "),
      ({"held_out": {"math": ("gsm8kk",)}}, r"^held_out: unknown task "
       r"'gsm8kk'"),
      ({"held_out": ["gsm8k"]}, r"^held_out must map a task name")):
    with pytest.raises(ValueError, match=message):
      seqio_tasks.register_tasks(vocabulary=None, **kwargs)
  # Keys and values by their canonical names; one task as a string.
  assert seqio_tasks._held_out_by_task(  # pylint: disable=protected-access
      {"Math": "GSM8K", "arc-challenge": []}) == {
          "math": ("gsm8k",), "arc_challenge": ()}


def test_the_test_split_is_the_same_for_every_seed():
  """As in the train loop: arithmetic's test set had been drawn anew for
  each seed, so each seed of a sweep was scored on other questions."""
  test = seqio_tasks.split_examples("arithmetic", "test", seed=1)
  assert test == seqio_tasks.split_examples("arithmetic", "test")
  assert test == data.load_task("arithmetic", "test")
  # The seed still draws the training pool (the control).
  assert seqio_tasks.split_examples("arithmetic", "train", seed=1) != (
      seqio_tasks.split_examples("arithmetic", "train"))


def test_postprocess_and_metrics_without_seqio():
  post = seqio_tasks.postprocess
  assert post("the correct answer is Answer2", kind=formats.CHOICE) == "answer2"
  assert post("b", {"gold": b"answer1"}, True, kind=formats.CHOICE) == "answer1"
  assert post("The answer is 1,234.", kind=formats.NUMBER) == "1234"
  assert post("x", {"gold": b"a\x1fb"}, True, kind=formats.GENERATION) == (
      "a", "b")
  assert seqio_tasks.choice_accuracy(["true", "false"], ["true", "true"]) == {
      "accuracy": 50.0}
  assert seqio_tasks.number_exact_match(["12", "3"], ["12.0", ""]) == {
      "exact_match": 50.0}
  assert seqio_tasks.superni_metrics([("a b",)], ["a b"])["rougeL"] == 100.0
  # An example without a gold answer (target '') is not scored, as
  # train.evaluate skips it: it had counted as wrong for numbers, and as
  # right for a choice when the prediction named no option either.
  assert seqio_tasks.number_exact_match(["12", ""], ["12", "7"]) == {
      "exact_match": 100.0}
  assert seqio_tasks.choice_accuracy(["", "true"], ["", "false"]) == {
      "accuracy": 0.0}
  assert math.isnan(seqio_tasks.choice_accuracy([""], [""])["accuracy"])


def test_choice_predictions_are_read_with_the_examples_labels():
  """With the example's 'labels' feature a prediction is read as
  train.evaluate reads it: one-letter labels (an 'Answer format: A/B/C/D'
  record's) had always given '' (no accuracy at all), and a label in upper
  case came back lower case, never equal to its gold."""
  post = functools.partial(seqio_tasks.postprocess, kind=formats.CHOICE)
  letters = {"labels": b"A\x1fB\x1fC\x1fD", "gold": b"B"}
  assert post("The answer is B.", letters) == "B"
  assert post("a tricky one: the answer is (C)", letters) == "C"
  assert post("no option named", letters) == ""
  assert post("x", letters, True) == "B"
  cased = {"labels": b"Answer1\x1fAnswer2", "gold": b"Answer2"}
  assert post("the correct answer is answer2", cased) == "Answer2"
  # Scored against the gold as seqio compares them.
  targets = [post("", letters, True), post("", cased, True)]
  predictions = [post("The answer is B", letters),
                 post("answer2", cased)]
  assert seqio_tasks.choice_accuracy(targets, predictions) == {
      "accuracy": 100.0}


def _seqio():
  # `make test-seqio` (run by CI) sets LRO_REQUIRE_SEQIO=1: there a missing
  # seqio is a failure, not a skip.
  if os.environ.get("LRO_REQUIRE_SEQIO") == "1":
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio
  return pytest.importorskip("seqio")


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="needs ../shared/data")
def test_math_splits_leave_out_gsm8k_test_questions():
  """The train loop leaves its eval task's prompts out of training; the
  seqio tasks had served math whole, GSM8K's test questions and all, to a
  T5X user who then evaluates on lro_gsm8k."""
  test = {data.prompt_key(e)
          for e in data.load_task("gsm8k", "test", data_dir=DATA_DIR)}
  removed = 0
  for split in ("train", "validation"):
    whole = data.load_task("math", split, data_dir=DATA_DIR)
    kept = seqio_tasks.split_examples("math", split, data_dir=DATA_DIR,
                                      held_out=seqio_tasks.HELD_OUT["math"])
    assert not {data.prompt_key(e) for e in kept} & test
    assert kept == [e for e in whole if data.prompt_key(e) not in test]
    removed += len(whole) - len(kept)
  assert removed == 1055  # As the data README counts them.
  assert seqio_tasks.split_examples(
      "math", "train", data_dir=DATA_DIR) == (
          data.load_task("math", "train", data_dir=DATA_DIR))


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="needs ../shared/data")
def test_math_without_gsm8k_at_hand_is_served_whole_with_a_warning(tmp_path):
  (tmp_path / "math").symlink_to(DATA_DIR / "math")
  with pytest.warns(UserWarning, match=r"lro_math: the gsm8k test split "
                    r"could not be read \(.*\); train examples that are its "
                    "prompts are not left out"):
    kept = seqio_tasks.split_examples("math", "train", data_dir=tmp_path,
                                      held_out=("gsm8k",))
  assert kept == data.load_task("math", "train", data_dir=DATA_DIR)
  # A misspelt task is refused, not taken for a missing file (it had
  # trained on GSM8K's test questions with only a warning).
  with pytest.raises(ValueError, match="unknown task 'gsm8kk'"):
    seqio_tasks.split_examples("math", "train", data_dir=DATA_DIR,
                               held_out=("gsm8kk",))


def test_registered_tasks_give_tokenised_datasets():
  seqio = _seqio()
  vocab = seqio.ByteVocabulary()
  names = seqio_tasks.register_tasks(vocab, data_dir=DATA_DIR)
  assert names == ["lro_" + n for n in data.task_names()]
  # None registers every task; [] none, and a string one (not its letters).
  assert seqio_tasks.register_tasks(vocab, names=[]) == []
  assert seqio_tasks.register_tasks(vocab, names="BoolQ",
                                    data_dir=DATA_DIR) == ["lro_boolq"]

  task = seqio.get_mixture_or_task("lro_arithmetic")
  assert set(task.splits) == {"train", "validation", "test"}
  expected = data.load_task("arithmetic", "test")[:3]
  got = list(task.get_dataset({"inputs": 256, "targets": 8}, split="test",
                              shuffle=False).take(3).as_numpy_iterator())
  for ex, e in zip(got, expected):
    assert ex["inputs_pretokenized"].decode() == e.prompt
    assert vocab.decode(ex["inputs"][:-1].tolist()) == e.prompt
    assert ex["inputs"][-1] == ex["targets"][-1] == vocab.eos_id
  # A prompt longer than the encoder keeps its end and EOS, as the train
  # loop's encoder input does (it had kept the start, without EOS).
  short = list(task.get_dataset({"inputs": 40, "targets": 8}, split="test",
                                shuffle=False).take(3).as_numpy_iterator())
  for ex, e in zip(short, expected):
    assert len(ex["inputs"]) == 40 and ex["inputs"][-1] == vocab.eos_id
    assert vocab.decode(ex["inputs"][:-1].tolist()) == (
        e.prompt.encode()[-39:].decode())
    assert ex["gold"].decode() == e.gold_number
    assert task.postprocess_fn(ex["targets_pretokenized"].decode(),
                               example=ex, is_target=True) == e.gold_number

  if DATA_DIR.is_dir():
    boolq = seqio.get_mixture_or_task("lro_boolq")
    [ex] = boolq.get_dataset({"inputs": 512, "targets": 32},
                             split="validation", shuffle=False
                             ).take(1).as_numpy_iterator()
    first = data.load_task("boolq", "validation", data_dir=DATA_DIR)[0]
    assert ex["inputs_pretokenized"].decode() == first.prompt
    assert ex["gold"].decode() == first.labels[first.gold_index]
    assert ex["labels"].decode().split("\x1f") == list(first.labels)
    wrong = first.labels[1 - first.gold_index]
    assert boolq.postprocess_fn(f"The answer is {wrong}", example=ex,
                                is_target=False) == wrong
    # lro_math serves math without GSM8K's test questions (see below).
    math_task = seqio.get_mixture_or_task("lro_math")
    served = [ex["inputs_pretokenized"].decode() for ex in
              math_task.get_dataset({"inputs": 4096, "targets": 1024},
                                    split="validation", shuffle=False
                                    ).as_numpy_iterator()]
    assert served == [e.prompt for e in seqio_tasks.split_examples(
        "math", "validation", data_dir=DATA_DIR, held_out=("gsm8k",))]


def test_train_split_leaves_out_its_validation_prompts(tmp_path):
  """A file that repeats a question can put its twins on both sides of the
  carve: the train loop leaves the validation prompts out of training, the
  seqio train split had served them."""
  questions = [f"is {i} an even number" for i in range(30)]
  records = [{"instruction": f"Please answer the following question with "
                             f"true or false, question: {q}?\n\nAnswer "
                             "format: true/false", "input": "",
              "output": "the correct answer is true", "answer": "true"}
             for q in questions + questions[:10]]  # ten twins
  (tmp_path / "boolq").mkdir()
  (tmp_path / "boolq" / "train.json").write_text(json.dumps(records))
  leaked = 0
  for seed in range(4):
    train = seqio_tasks.split_examples("boolq", "train", data_dir=tmp_path,
                                       seed=seed, validation_fraction=0.25)
    val = seqio_tasks.split_examples("boolq", "validation", data_dir=tmp_path,
                                     seed=seed, validation_fraction=0.25)
    assert not ({data.prompt_key(e) for e in train} &
                {data.prompt_key(e) for e in val})
    whole = data.load_task("boolq", "train", data_dir=tmp_path, seed=seed,
                           validation_fraction=0.25)
    leaked += len(whole) - len(train)
  assert leaked > 0  # some seed's carve split a pair of twins


def test_number_predictions_fall_back_to_the_last_number():
  assert seqio_tasks.postprocess("so 12 apples", kind=formats.NUMBER) == "12"


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="needs ../shared/data")
def test_held_out_as_a_string_and_never_on_the_test_split():
  d = str(DATA_DIR)
  one = seqio_tasks.split_examples("math", "train", data_dir=d,
                                   held_out="gsm8k")
  assert one == seqio_tasks.split_examples("math", "train", data_dir=d,
                                           held_out=("gsm8k",))
  test = seqio_tasks.split_examples("gsm8k", "test", data_dir=d,
                                    held_out=("gsm8k",))
  assert len(test) == 1319

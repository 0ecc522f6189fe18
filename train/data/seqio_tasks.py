"""seqio Task registrations of the same tasks, for T5X users (extra `[seqio]`).

seqio needs full TensorFlow, so nothing here is imported by `train.data`;
importing this module without seqio installed works, and calling
`register_tasks` then raises a one-line ImportError.

Each task `NAME` is registered as `lro_NAME` with splits train / validation /
test (as `train.data.load_task` defines them), string features 'inputs'
(the prompt) and 'targets' (the target), plus 'gold' (the gold label, number
or references) that the postprocessor hands to the metrics and, for multiple
choice, 'labels' (the option labels, from which the postprocessor reads a
prediction as `train.evaluate` does). As the train loop leaves its
evaluation task's prompts out of training, ``lro_math``'s train and
validation splits leave out GSM8K's test questions (`HELD_OUT`; the
``held_out`` argument of `register_tasks` changes it). Usage::

  from train.data import seqio_tasks
  vocab = seqio.SentencePieceVocabulary("tokenizer.model")
  seqio_tasks.register_tasks(vocab)
  ds = seqio.get_mixture_or_task("lro_boolq").get_dataset(
      {"inputs": 512, "targets": 16}, split="train")
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from train.data import example as example_lib
from train.data import formats
from train.data import numbers
from train.data import tasks as tasks_lib
from train.data import templates
from train.errors import first_line

PREFIX = "lro_"
SPLITS = ("train", "validation", "test")
# Joins several SuperNI references in the one string feature 'gold'.
_REF_SEP = "\x1f"
_LABEL_RE = re.compile(r"\b(answer\d+|ending\d+|true|false)\b")


def _import_seqio():
  try:
    import seqio  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "seqio tasks need the [seqio] extra (`pip install seqio`, which "
        "brings TensorFlow)") from None
  return seqio, tf


def _gold(example, kind: str) -> str:
  if kind == formats.CHOICE:
    return "" if example.gold_index is None else example.labels[
        example.gold_index]
  if kind == formats.NUMBER:
    return example.gold_number or ""
  return _REF_SEP.join(example.references)


# The test sets a task's training data must not hold: LLM-Adapters' math
# set, which the GSM8K presets train on, holds 1,055 of GSM8K's 1,319 test
# questions (the train loop leaves out its eval task's prompts the same way).
HELD_OUT = {"math": ("gsm8k",)}


def split_examples(task: str, split: str, *, data_dir: str | None = None,
                   style: str = "alpaca", validation_fraction: float = 0.1,
                   seed: int = 0,
                   held_out: Sequence[str] = ()) -> list:
  """The examples of one split of ``task``, as its seqio Task serves them.

  The train and validation splits leave out every example whose prompt
  (`train.data.prompt_key`) is one of the test prompts of the tasks in
  ``held_out``, and the train split those of its own validation split. A
  test split that cannot be read (a data folder without it) is warned
  about and not held out, as the train loop does when it does not
  evaluate.
  """
  examples = tasks_lib.load_task(
      task, split, data_dir=data_dir, style=style,
      validation_fraction=validation_fraction,
      # One test set whatever the seed, as in the train loop: `arithmetic`'s
      # had been drawn anew for each seed.
      seed=0 if split == "test" else seed)
  held = []
  if split == "train" and validation_fraction > 0:
    # A file that repeats a question (OpenBookQA's, math's) can put its
    # twins on both sides of the carve. The validation split is served for
    # evaluation, so training leaves its prompts out (as the train loop
    # does when it evaluates on the validation split).
    held.extend(tasks_lib.load_task(
        task, "validation", data_dir=data_dir, style=style,
        validation_fraction=validation_fraction, seed=seed))
  if split == "test" or not (held_out or held):
    return examples
  if isinstance(held_out, str):  # one task, not its letters
    held_out = (held_out,)
  for other in held_out:
    tasks_lib.get_task(other)  # a name that is no task is an error, not absent
    try:
      tests = tasks_lib.load_task(other, "test", data_dir=data_dir,
                                  style=style, seed=0)
    except OSError as e:  # the file is not at hand
      warnings.warn(
          f"seqio task {PREFIX}{task}: the {other} test split could not be "
          f"read ({first_line(e)}); {split} examples that are its prompts "
          "are not left out.", stacklevel=2)
      continue
    held.extend(tests)
  return example_lib.without_prompts_of(examples, held)


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *,
                task: str, data_dir: str | None, style: str,
                validation_fraction: float, data_seed: int,
                held_out: Sequence[str]):
  """seqio FunctionDataSource callback: one split as a tf.data.Dataset."""
  del shuffle_files, seed  # One file per split; seqio shuffles examples.
  _, tf = _import_seqio()
  kind = tasks_lib.get_task(task).kind
  examples = split_examples(
      task, split, data_dir=data_dir, style=style,
      validation_fraction=validation_fraction, seed=data_seed,
      held_out=held_out)
  return tf.data.Dataset.from_tensor_slices({
      "inputs": [e.prompt for e in examples],
      "targets": [e.target for e in examples],
      "gold": [_gold(e, kind) for e in examples],
      "labels": [_REF_SEP.join(e.labels) for e in examples],
  })


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def postprocess(text: str, example: dict[str, Any] | None = None,
                is_target: bool = False, *, kind: str) -> Any:
  """seqio postprocess_fn: targets -> their gold; predictions -> a label,
  a number or the text, matching what the task's metric compares."""
  if is_target and example is not None and "gold" in example:
    gold = _text(example["gold"])
    return tuple(gold.split(_REF_SEP)) if kind == formats.GENERATION else gold
  if kind == formats.CHOICE:
    labels = _text(example.get("labels", b"")) if example else ""
    if labels:
      # The example's own labels, read as train.evaluate reads them: a
      # one-letter label ('A'..'D', from an 'Answer format: A/B/C/D' record)
      # is a label only in its own case and after 'answer is' first, and
      # the label comes back in the case of the gold it is compared with.
      from train import evaluate  # pylint: disable=g-import-not-at-top
      options = labels.split(_REF_SEP)
      index = evaluate.parse_choice(text, options)
      return "" if index is None else options[index]
    match = _LABEL_RE.search(text.lower())
    return match.group(1) if match else ""
  if kind == formats.NUMBER:
    return numbers.extract_final_number(text) or ""
  return text


def _scored(targets: Sequence[str], predictions: Sequence[str]
            ) -> list[tuple[str, str]]:
  """The (target, prediction) pairs of examples with a gold answer: one
  without (target '') is skipped, as `train.evaluate` skips it (it had
  counted as wrong, or as right when the prediction named nothing)."""
  return [(t, p) for t, p in zip(targets, predictions) if t != ""]


def _percent(hits: list[bool]) -> float:
  return 100.0 * float(np.mean(hits)) if hits else float("nan")


def choice_accuracy(targets: Sequence[str], predictions: Sequence[str]
                    ) -> dict[str, float]:
  """Accuracy (0-100) of predicted option labels, over labelled examples."""
  return {"accuracy": _percent(
      [t == p for t, p in _scored(targets, predictions)])}


def number_exact_match(targets: Sequence[str], predictions: Sequence[str]
                       ) -> dict[str, float]:
  """Exact match (0-100) of extracted final numbers, over examples with a
  gold number."""
  return {"exact_match": _percent(
      [numbers.numbers_equal(p or None, t)
       for t, p in _scored(targets, predictions)])}


def superni_metrics(targets: Sequence[Sequence[str]],
                    predictions: Sequence[str]) -> dict[str, float]:
  """SuperNI exact match and ROUGE-L (0-100) against all references."""
  # Lazy: train.evaluate is a sibling package, only needed at eval time.
  from train import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.superni_metrics(predictions, targets)


_METRICS = {formats.CHOICE: choice_accuracy,
            formats.NUMBER: number_exact_match,
            formats.GENERATION: superni_metrics}


def _keep_the_end_of_inputs(dataset, sequence_length=None):
  """Cuts 'inputs' from the left to leave room for EOS (seqio's own trim
  keeps the start): the end of a prompt holds its question and answer cue."""
  if not sequence_length or not sequence_length.get("inputs"):
    return dataset
  _, tf = _import_seqio()
  room = sequence_length["inputs"] - 1

  def cut(example):
    example = dict(example)
    inputs = example["inputs"]
    example["inputs"] = inputs[tf.maximum(tf.size(inputs) - room, 0):]
    return example

  return dataset.map(cut, num_parallel_calls=tf.data.AUTOTUNE)


def _held_out_by_task(held_out: Mapping[str, Sequence[str]]
                      ) -> dict[str, tuple[str, ...]]:
  """``held_out`` by canonical task name: a key spelt another way ("Math",
  an alias) had been passed over silently, serving GSM8K's test questions
  for training; a string value had been read letter by letter."""
  if not isinstance(held_out, Mapping):
    raise ValueError("held_out must map a task name to the tasks whose test "
                     f"prompts it leaves out, got {type(held_out).__name__}")
  result = {}
  try:
    for key, others in held_out.items():
      others = (others,) if isinstance(others, str) else tuple(others)
      result[tasks_lib.get_task(key).name] = tuple(
          tasks_lib.get_task(other).name for other in others)
  except ValueError as e:
    raise ValueError(f"held_out: {first_line(e)}") from None
  return result


def register_tasks(vocabulary, *, names: Sequence[str] | None = None,
                   data_dir: str | os.PathLike[str] | None = None,
                   style: str = "alpaca", validation_fraction: float = 0.1,
                   seed: int = 0, prefix: str = PREFIX,
                   held_out: Mapping[str, Sequence[str]] | None = None
                   ) -> list[str]:
  """Registers seqio Tasks (replacing earlier ones of the same name).

  Args:
    vocabulary: A `seqio.Vocabulary` (e.g. `seqio.SentencePieceVocabulary`
      of the model's tokenizer).
    names: Task names (default: all of `train.data.task_names()`). Data is
      read only when a split is requested.
    data_dir: Data folder in the `../shared/data` layout (default
      `train.data.default_data_dir()`).
    style: Prompt style ('alpaca', 'plain' or 'tk').
    validation_fraction: Share of the training data held out as validation.
    seed: Seed of the validation carve and of `arithmetic`'s training
      pool (its test set is the same for every seed, as in the train loop).
    prefix: Prefix of the registered names.
    held_out: Task name -> the tasks whose test prompts its train and
      validation splits leave out (default `HELD_OUT`: math leaves out
      GSM8K's test questions; ``{}`` keeps every example).

  Returns:
    The registered seqio task names.
  """
  # Checked here: they had failed at the first get_dataset, inside seqio.
  if style not in templates.STYLES:
    raise ValueError(f"unknown prompt style {style!r}; expected one of "
                     f"{', '.join(templates.STYLES)}")
  if (isinstance(validation_fraction, bool) or
      not isinstance(validation_fraction, (int, float, np.integer,
                                           np.floating)) or
      not 0 <= validation_fraction < 1):
    raise ValueError("validation_fraction must be a number in [0, 1), got "
                     f"{validation_fraction!r}")
  held_out = _held_out_by_task(HELD_OUT if held_out is None else held_out)
  if isinstance(names, str):  # one name, not its letters
    names = [names]
  seqio, _ = _import_seqio()
  registered = []
  # `[]` registers none (it had registered every task, as None does).
  for name in tasks_lib.task_names() if names is None else names:
    spec = tasks_lib.get_task(name)
    full_name = prefix + spec.name
    source = seqio.FunctionDataSource(
        dataset_fn=functools.partial(
            _dataset_fn, task=spec.name,
            data_dir=None if data_dir is None else str(data_dir), style=style,
            validation_fraction=validation_fraction, data_seed=seed,
            held_out=held_out.get(spec.name, ())),
        splits=SPLITS)
    seqio.TaskRegistry.remove(full_name)
    seqio.TaskRegistry.add(
        full_name,
        source=source,
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            _keep_the_end_of_inputs,
            seqio.preprocessors.append_eos_after_trim,
        ],
        # The encoder-decoder layout (T5X's): the encoder input is the
        # prompt's end and EOS, as the train loop feeds a T5
        # (`seq2seq.encoder_ids`); it had been the prompt's start without
        # EOS, losing a long prompt's question.
        output_features={
            "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
            "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        },
        postprocess_fn=functools.partial(postprocess, kind=spec.kind),
        metric_fns=[_METRICS[spec.kind]])
    registered.append(full_name)
  return registered

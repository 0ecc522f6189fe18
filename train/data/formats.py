"""Record formats -> `Example`: the LLM-Adapters instruction format and each
task's Hugging Face format.

A record is recognised as the instruction format when it has an
`instruction` key; otherwise it must be in its task's Hugging Face format.
Converters return a list because one SuperNI task file holds many instances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from train.data import numbers
from train.data import templates
from train.data.example import Example

Record = dict[str, Any]

CHOICE = "choice"
NUMBER = "number"
GENERATION = "generation"


def _missing(record: Record, keys: Sequence[str], where: str, task: str,
             fmt: str) -> None:
  """Raises a one-line ValueError naming the fields `record` lacks."""
  missing = [k for k in keys if k not in record]
  if missing:
    have = ", ".join(sorted(map(str, record))) or "none"
    raise ValueError(
        f"{where}: missing field(s) {', '.join(missing)} for task {task!r} in "
        f"the {fmt} format (record has: {have})")


# --- LLM-Adapters instruction format ---------------------------------------


def from_instruction(record: Record, *, task: str, kind: str,
                     default_labels: Sequence[str], style: str,
                     where: str) -> list[Example]:
  """Converts an instruction-format record {instruction, input, output, answer}.

  The gold of a multiple-choice record is its `answer` label (else the label
  at the end of `output`). The gold number of `gsm8k` is its `answer` field;
  of `math` it is the number after 'The answer is' in `output`, not the
  `answer` field: in `math/train.json` the two disagree on 127 of the last
  300 records and the output is what the model is trained on. A `math`
  record whose output has no 'the answer is N' (any case) gets no gold
  number and is left out of exact-match scoring.
  """
  _missing(record, ("instruction", "output"), where, task, "instruction")
  instruction = str(record["instruction"])
  output = str(record["output"])
  prompt = templates.wrap_instruction(
      instruction, str(record.get("input") or ""), style)
  if kind == CHOICE:
    labels = templates.parse_answer_format(instruction) or tuple(
        default_labels)
    gold = str(record.get("answer") or output.rsplit(" ", 1)[-1]).strip()
    if gold.lower() not in labels:
      raise ValueError(
          f"{where}: answer {gold!r} is not one of the options "
          f"{'/'.join(labels)} for task {task!r}")
    choices = templates.parse_choices(instruction, labels)
    if not choices and labels == ("true", "false"):
      choices = labels  # BoolQ: the labels are the option texts.
    return [Example(
        prompt=prompt, target=output, task=task,
        options=tuple(templates.choice_target(l) for l in labels),
        labels=labels, choices=choices,
        gold_index=labels.index(gold.lower()))]
  if kind == NUMBER:
    if task == "math":
      gold = numbers.extract_final_number(output, fallback_to_last=False)
    else:
      gold = numbers.canonical_number(record.get("answer"))
      if gold is None:
        gold = numbers.extract_final_number(output, fallback_to_last=False)
    return [Example(prompt=prompt, target=output, task=task, gold_number=gold)]
  return [Example(prompt=prompt, target=output, task=task)]


# --- Hugging Face formats, one per task -------------------------------------


def _from_hf_choices(record: Record, *, task: str, question_key: str,
                     style: str, where: str) -> list[Example]:
  """ARC / OpenBookQA: {question(_stem), choices{text, label}, answerKey}."""
  _missing(record, (question_key, "choices", "answerKey"), where, task,
           "Hugging Face")
  choices = record["choices"]
  if not (isinstance(choices, dict) and "text" in choices
          and "label" in choices):
    raise ValueError(
        f"{where}: field 'choices' must be an object with 'text' and 'label' "
        f"lists for task {task!r}")
  texts = [str(t) for t in choices["text"]]
  keys = [str(k) for k in choices["label"]]
  if str(record["answerKey"]) not in keys:
    raise ValueError(
        f"{where}: answerKey {record['answerKey']!r} is not one of the choice "
        f"labels {keys} for task {task!r}")
  gold = keys.index(str(record["answerKey"]))
  labels = templates.choice_labels(len(texts))
  instruction = templates.multiple_choice_instruction(
      str(record[question_key]), texts)
  return [Example(
      prompt=templates.wrap_instruction(instruction, "", style),
      target=templates.choice_target(labels[gold]), task=task,
      options=tuple(templates.choice_target(l) for l in labels),
      labels=labels, choices=tuple(texts), gold_index=gold)]


def arc_from_hf(record: Record, **kw) -> list[Example]:
  """allenai/ai2_arc: {question, choices{text, label}, answerKey}."""
  return _from_hf_choices(record, question_key="question", **kw)


def openbookqa_from_hf(record: Record, **kw) -> list[Example]:
  """allenai/openbookqa: {question_stem, choices{text, label}, answerKey}."""
  return _from_hf_choices(record, question_key="question_stem", **kw)


def boolq_from_hf(record: Record, *, task: str, style: str,
                  where: str) -> list[Example]:
  """google/boolq {question, answer: bool} or super_glue {question, label}.

  The passage is left out, as in `../shared/data/boolq`, so that both
  sources give the same prompts.
  """
  key = "answer" if "answer" in record else "label"
  _missing(record, ("question", key), where, task, "Hugging Face")
  value = record[key]
  if isinstance(value, str):
    if value.lower() not in ("true", "false"):
      raise ValueError(f"{where}: {key} {value!r} is not true/false")
    value = value.lower() == "true"
  gold = 0 if bool(value) else 1
  labels = ("true", "false")
  return [Example(
      prompt=templates.wrap_instruction(
          templates.boolq_instruction(str(record["question"])), "", style),
      target=templates.choice_target(labels[gold]), task=task,
      options=tuple(templates.choice_target(l) for l in labels),
      labels=labels, choices=labels, gold_index=gold)]


def gsm8k_from_hf(record: Record, *, task: str, style: str,
                  where: str) -> list[Example]:
  """openai/gsm8k: {question, answer: '<steps>\\n#### N'}."""
  _missing(record, ("question", "answer"), where, task, "Hugging Face")
  answer = str(record["answer"])
  rationale, sep, final = answer.rpartition("####")
  gold = numbers.canonical_number(final) if sep else None
  if gold is None:
    raise ValueError(
        f"{where}: answer has no '#### N' final number for task {task!r}")
  return [Example(
      prompt=templates.wrap_instruction(str(record["question"]), "", style),
      target=templates.math_target(rationale, gold), task=task,
      gold_number=gold)]


def hellaswag_from_hf(record: Record, *, task: str, style: str,
                      where: str) -> list[Example]:
  """Rowan/hellaswag: {ctx, endings, label} (label '' in the test split)."""
  _missing(record, ("ctx", "endings", "label"), where, task, "Hugging Face")
  endings = tuple(templates.clean_hellaswag(str(e)) for e in record["endings"])
  labels = templates.choice_labels(len(endings), "Ending")
  label = str(record["label"]).strip()
  gold = int(label) if label else None
  instruction = templates.multiple_choice_instruction(
      templates.clean_hellaswag(str(record["ctx"])), endings, prefix="Ending")
  return [Example(
      prompt=templates.wrap_instruction(instruction, "", style),
      target=templates.choice_target(labels[gold]) if gold is not None else "",
      task=task, options=tuple(templates.choice_target(l) for l in labels),
      labels=labels, choices=endings, gold_index=gold)]


def superni_from_hf(record: Record, *, task: str, style: str,
                    where: str) -> list[Example]:
  """Super-Natural Instructions, in either of its two shapes.

  Flat rows as in 'Muennighoff/natural-instructions': {definition, inputs,
  targets} (targets a string or a list), or an original task file
  {Definition: [str], Instances: [{input, output: [str]}]}, which expands to
  one example per instance. The definition is the instruction and the
  instance input the input, as in Tk-Instruct's zero-shot setup.
  """
  if "Instances" in record or "Definition" in record:
    _missing(record, ("Definition", "Instances"), where, task, "SuperNI task")
    definition = record["Definition"]
    if isinstance(definition, list):
      definition = " ".join(map(str, definition))
    out = []
    for i, instance in enumerate(record["Instances"]):
      out += _superni_example(str(definition), instance.get("input"),
                              instance.get("output"), task, style,
                              f"{where} instance {i}")
    return out
  _missing(record, ("definition", "inputs", "targets"), where, task,
           "Hugging Face")
  return _superni_example(str(record["definition"]), record["inputs"],
                          record["targets"], task, style, where)


def _superni_example(definition: str, inputs: Any, targets: Any, task: str,
                     style: str, where: str) -> list[Example]:
  if inputs is None or targets is None:
    raise ValueError(f"{where}: missing input or output for task {task!r}")
  refs = (targets,) if isinstance(targets, str) else tuple(map(str, targets))
  if not refs:
    raise ValueError(f"{where}: empty output list for task {task!r}")
  return [Example(prompt=templates.wrap_instruction(definition, str(inputs),
                                                    style),
                  target=refs[0], task=task, references=refs)]


HfConverter = Callable[..., list[Example]]

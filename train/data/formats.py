"""Record formats -> `Example`: the LLM-Adapters instruction format and each
task's Hugging Face format.

A record is recognised as the instruction format when it has an
`instruction` key; otherwise it must be in its task's Hugging Face format.
Converters return a list because one SuperNI task file holds many instances.
"""

from __future__ import annotations

import re
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


def _got(value: Any) -> str:
  """A short description of a bad value for an error message."""
  if value is None:
    return "null"
  if isinstance(value, (str, bool, int, float)):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
  return f"a {type(value).__name__}"


def _string(record: Record, key: str, where: str, task: str) -> str:
  """`record[key]`, which must be a string (not null, a number or a list)."""
  value = record[key]
  if not isinstance(value, str):
    raise ValueError(
        f"{where}: field {key!r} must be a string for task {task!r}, got "
        f"{_got(value)}")
  return value


def _strings(value: Any, what: str, where: str, task: str) -> list[str]:
  """`value`, which must be a list of strings; `what` names it."""
  if not isinstance(value, (list, tuple)):
    raise ValueError(
        f"{where}: {what} must be a list of strings for task {task!r}, got "
        f"{_got(value)}")
  for i, item in enumerate(value):
    if not isinstance(item, str):
      raise ValueError(
          f"{where}: {what} item {i} must be a string for task {task!r}, got "
          f"{_got(item)}")
  return list(value)


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
  instruction = _string(record, "instruction", where, task)
  output = _string(record, "output", where, task)
  input_text = record.get("input")
  if input_text is not None and not isinstance(input_text, str):
    raise ValueError(
        f"{where}: field 'input' must be a string or null for task {task!r}, "
        f"got {_got(input_text)}")
  prompt = templates.wrap_instruction(instruction, input_text or "", style)
  if kind == CHOICE:
    # Labels keep the case the 'Answer format:' line gives them; the gold
    # matches any case, as `evaluate.parse_choice` does. Without that line
    # they are the options the instruction lists (Answer1: ... AnswerN:),
    # then the task's default.
    listed = templates.listed_labels(instruction)
    stated = templates.parse_answer_format(instruction)
    labels = stated or listed or tuple(default_labels)
    if (listed and stated and len(listed) != len(stated)
        and all(re.fullmatch(r"[a-zA-Z]+\d+", l) for l in stated)):
      raise ValueError(
          f"{where}: the instruction lists {len(listed)} options "
          f"({listed[0]} to {listed[-1]}, any case) but its 'Answer format:' "
          f"line has {len(stated)} ({'/'.join(stated)}) for task {task!r}")
    folded = [l.lower() for l in labels]
    if len(set(folded)) != len(folded):
      raise ValueError(
          f"{where}: the options {'/'.join(labels)} repeat a label (labels "
          f"ignore case) for task {task!r}")
    # The option the output ends on ('The answer is B.', '答案是B。'; else
    # its last word, for the error); an answer of false (BoolQ in JSON) is
    # an answer, not a missing one.
    said = (templates.ending_label(output, labels)
            or output.rsplit(" ", 1)[-1].strip())
    answer = record.get("answer")
    gold = said if answer is None or answer == "" else str(answer).strip()
    if gold.lower() not in folded:
      raise ValueError(
          f"{where}: answer {gold!r} is not one of the options "
          f"{'/'.join(labels)} (in any case) for task {task!r}")
    choices = templates.parse_choices(instruction, labels)
    if not choices and tuple(folded) == ("true", "false"):
      choices = labels  # BoolQ: the labels are the option texts.
    if said.lower() in folded and said.lower() != gold.lower():
      # Training on one label while scoring against another.
      raise ValueError(
          f"{where}: answer {gold!r} but the output ends on the option "
          f"{said.lower()!r} for task {task!r}")
    gold_index = folded.index(gold.lower())
    # The options scored are worded as the target trained on; an output
    # that does not end on its label gets the template's wording.
    options = templates.options_like(output, labels[gold_index], labels) or (
        tuple(templates.choice_target(l) for l in labels))
    return [Example(
        prompt=prompt, target=output, task=task, options=options,
        labels=labels, choices=choices, gold_index=gold_index)]
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
  question = _string(record, question_key, where, task)
  texts = _strings(choices["text"], "field 'choices.text'", where, task)
  raw_keys = choices["label"]
  if not isinstance(raw_keys, (list, tuple)) or not all(
      isinstance(k, (str, int)) and not isinstance(k, bool) for k in raw_keys):
    raise ValueError(
        f"{where}: field 'choices.label' must be a list of strings for task "
        f"{task!r}, got {_got(raw_keys)}")
  keys = [str(k) for k in raw_keys]
  if len(keys) != len(texts) or not texts:
    raise ValueError(
        f"{where}: field 'choices' has {len(texts)} text(s) but "
        f"{len(keys)} label(s) for task {task!r}; expected the same number, "
        "at least one")
  if len(set(keys)) != len(keys):
    raise ValueError(
        f"{where}: field 'choices.label' repeats a label ({keys}) for task "
        f"{task!r}")
  if not isinstance(record["answerKey"], (str, int)) or isinstance(
      record["answerKey"], bool) or str(record["answerKey"]) not in keys:
    raise ValueError(
        f"{where}: answerKey {record['answerKey']!r} is not one of the choice "
        f"labels {keys} for task {task!r}")
  gold = keys.index(str(record["answerKey"]))
  labels = templates.choice_labels(len(texts))
  instruction = templates.multiple_choice_instruction(question, texts)
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
  question = _string(record, "question", where, task)
  value = record[key]
  # google/boolq's answer is a bool, super_glue's label 1 (true) / 0 (false)
  # and -1 in its unlabelled test split: anything else is refused, not
  # read as truthy.
  if isinstance(value, str) and value.strip().lower() in ("true", "false"):
    value = value.strip().lower() == "true"
  elif not (isinstance(value, bool) or (isinstance(value, int)
                                        and value in (0, 1))):
    hint = " (an unlabelled record)" if value == -1 else ""
    raise ValueError(
        f"{where}: {key} {_got(value)}{hint} is not a boolean, "
        f"'true'/'false' or 1/0 for task {task!r}")
  gold = 0 if value else 1
  labels = ("true", "false")
  return [Example(
      prompt=templates.wrap_instruction(
          templates.boolq_instruction(question), "", style),
      target=templates.choice_target(labels[gold]), task=task,
      options=tuple(templates.choice_target(l) for l in labels),
      labels=labels, choices=labels, gold_index=gold)]


def gsm8k_from_hf(record: Record, *, task: str, style: str,
                  where: str) -> list[Example]:
  """openai/gsm8k: {question, answer: '<steps>\\n#### N'}."""
  _missing(record, ("question", "answer"), where, task, "Hugging Face")
  question = _string(record, "question", where, task)
  answer = _string(record, "answer", where, task)
  rationale, sep, final = answer.rpartition("####")
  gold = numbers.canonical_number(final) if sep else None
  if gold is None:
    raise ValueError(
        f"{where}: answer has no '#### N' final number for task {task!r}")
  return [Example(
      prompt=templates.wrap_instruction(question, "", style),
      target=templates.math_target(rationale, gold), task=task,
      gold_number=gold)]


def hellaswag_from_hf(record: Record, *, task: str, style: str,
                      where: str) -> list[Example]:
  """Rowan/hellaswag: {activity_label, ctx, endings, label} (label '' in the
  test split).

  As LLM-Adapters writes it: ``{activity_label}: {ctx}``, WikiHow's
  ``[header]``/``[title]`` marks kept (lm-evaluation-harness removes them;
  doing so here had given other prompts than the instruction files').
  """
  _missing(record, ("ctx", "endings", "label"), where, task, "Hugging Face")
  ctx = _string(record, "ctx", where, task)
  if record.get("activity_label") is not None:
    ctx = f'{_string(record, "activity_label", where, task)}: {ctx}'
  endings = tuple(_strings(record["endings"], "field 'endings'", where, task))
  if not endings:
    raise ValueError(f"{where}: field 'endings' is empty for task {task!r}")
  labels = templates.choice_labels(len(endings), "Ending")
  label = record["label"]
  if isinstance(label, str) and not label.strip():
    gold = None  # The unlabelled test split.
  elif isinstance(label, int) and not isinstance(label, bool):
    gold = label
  elif isinstance(label, str) and label.strip().isdecimal():
    gold = int(label.strip())
  else:
    raise ValueError(
        f"{where}: label {_got(label)} is not an ending index (0 to "
        f"{len(endings) - 1}, or '' when unlabelled) for task {task!r}")
  if gold is not None and not 0 <= gold < len(endings):
    raise ValueError(
        f"{where}: label {_got(label)} is out of range for "
        f"{len(endings)} endings (0 to {len(endings) - 1}) for task {task!r}")
  instruction = templates.multiple_choice_instruction(ctx, endings,
                                                     prefix="Ending")
  return [Example(
      prompt=templates.wrap_instruction(instruction, "", style),
      target=templates.choice_target(labels[gold]) if gold is not None else "",
      task=task, options=tuple(templates.choice_target(l) for l in labels),
      labels=labels, choices=endings, gold_index=gold)]


def superni_from_hf(record: Record, *, task: str, style: str,
                    where: str) -> list[Example]:
  """Super-Natural Instructions, in any of its three shapes.

  Flat rows as in 'Muennighoff/natural-instructions': {definition, inputs,
  targets} (targets a string or a list); an original task file
  {Definition: [str], Instances: [{input, output: [str]}]}, which expands to
  one example per instance; or one instance of it as the official
  `ni_dataset.py` yields them, {Definition, Instance: {input, output}}. The
  definition is the instruction and the instance input the input, in the
  prompt style's template: with style 'tk' Tk-Instruct's own prompt, with
  the task file's first two positive examples (Hub rows have none), else
  the content of its zero-shot prompt in the Alpaca or plain template.
  Every output is a reference, the first the training target.
  """
  if "Instance" in record and "Instances" not in record:
    record = dict(record, Instances=[record["Instance"]])
  if "Instances" in record or "Definition" in record:
    _missing(record, ("Definition", "Instances"), where, task, "SuperNI task")
    definition = record["Definition"]
    if not isinstance(definition, str):
      definitions = _strings(definition, "field 'Definition'", where, task)
      # Tk-Instruct's collator takes the first.
      definition = (definitions[0] if style == "tk" and definitions else
                    " ".join(definitions))
    examples = _positive_examples(record, where, task) if style == "tk" else ()
    # One task object per task: the official reader's instances name it
    # ('Task'); a task file's own object does not (its file name does), so
    # the place it was read from stands for it.
    subtask = _subtask(record.get("Task"), where)
    instances = record["Instances"]
    if not isinstance(instances, list):
      raise ValueError(
          f"{where}: field 'Instances' must be a list of objects for task "
          f"{task!r}, got {_got(instances)}")
    out = []
    for i, instance in enumerate(instances):
      here = f"{where} instance {i}"
      if not isinstance(instance, dict):
        raise ValueError(
            f"{here}: expected an object with 'input' and 'output' for task "
            f"{task!r}, got {_got(instance)}")
      out += _superni_example(definition, instance.get("input"),
                              instance.get("output"), task, style, here,
                              examples, subtask)
    return out
  _missing(record, ("definition", "inputs", "targets"), where, task,
           "Hugging Face")
  return _superni_example(_string(record, "definition", where, task),
                          record["inputs"], record["targets"], task, style,
                          where, subtask=_subtask(record.get("task_name"),
                                                  ""))


def _positive_examples(record: Record, where: str,
                       task: str) -> tuple[tuple[str, str], ...]:
  """A task file's first two 'Positive Examples' as (input, output)."""
  shown = record.get("Positive Examples") or []
  if not isinstance(shown, list):
    raise ValueError(
        f"{where}: field 'Positive Examples' must be a list of objects for "
        f"task {task!r}, got {_got(shown)}")
  out = []
  for i, example in enumerate(shown[:2]):
    if not (isinstance(example, dict) and
            isinstance(example.get("input"), str) and
            isinstance(example.get("output"), str)):
      raise ValueError(
          f"{where}: positive example {i} must be an object with string "
          f"'input' and 'output' for task {task!r}, got {_got(example)}")
    out.append((example["input"], example["output"]))
  return tuple(out)


def _subtask(name: Any, default: str) -> str:
  return name if isinstance(name, str) and name else default


def _superni_example(definition: str, inputs: Any, targets: Any, task: str,
                     style: str, where: str,
                     examples: tuple[tuple[str, str], ...] = (),
                     subtask: str = "") -> list[Example]:
  if inputs is None or targets is None:
    raise ValueError(f"{where}: missing input or output for task {task!r}")
  if not isinstance(inputs, str):
    raise ValueError(
        f"{where}: the input must be a string for task {task!r}, got "
        f"{_got(inputs)}")
  refs = (targets,) if isinstance(targets, str) else tuple(
      _strings(targets, "the output", where, task))
  if not refs:
    raise ValueError(f"{where}: empty output list for task {task!r}")
  return [Example(prompt=templates.wrap_instruction(definition, str(inputs),
                                                    style, examples),
                  target=refs[0], task=task, references=refs,
                  subtask=subtask)]


HfConverter = Callable[..., list[Example]]

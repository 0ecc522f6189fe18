"""Prompt and target templates.

The multiple-choice and true/false templates reproduce the LLM-Adapters
instruction format of `../shared/data` (its `instruction` field already holds
the question and the options, its `output` the target), so that records read
from a Hugging Face dataset's own format give the same prompts and targets as
the same question in the instruction files.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from train.data import word_edges

# The Alpaca template (alpaca-lora's). LLM-Adapters' generate_prompt has
# the same words, but its f-string keeps its source indentation (16 spaces
# before each line after the first) and a trailing space after "request.":
# prompts here are the clean template, not byte for byte that one.
_ALPACA = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes "
    "the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n")

STYLES = ("alpaca", "plain", "tk")


def _tk_end(text: str) -> str:
  """Tk-Instruct's rule: a period after text not ending in punctuation."""
  return text if text and text[-1] in string.punctuation else text + "."


def tk_instruct_prompt(definition: str, input_text: str,
                       examples: Sequence[tuple[str, str]] = ()) -> str:
  """Tk-Instruct's SuperNI prompt (the definition and up to two positive
  examples, no explanations), to 'Output: '.

  Word for word as `ni_collator.py` writes it in the setting Tk-Instruct's
  scripts run it (`--add_task_definition True --num_pos_examples 2`; the
  collator's own default shows no examples), its trailing space on the
  target's side (see `Example`); it does not drop examples that would not
  fit the model's input (`encode_pair` cuts the prompt from the left
  instead).
  """
  text = _tk_end("Definition: " + definition.strip()) + "\n\n"
  for i, (example_input, example_output) in enumerate(examples[:2], 1):
    shown = _tk_end(f" Positive Example {i} -\nInput: {example_input.strip()}")
    text += _tk_end(shown + f"\n Output: {example_output.strip()}") + "\n\n"
  return (text + _tk_end("Now complete the following example -\nInput: "
                         + input_text.strip()) + "\nOutput: ")


def wrap_instruction(instruction: str, input_text: str = "",
                     style: str = "alpaca",
                     examples: Sequence[tuple[str, str]] = ()) -> str:
  """Returns the model prompt for an instruction (and optional input).

  Args:
    instruction: The task instruction, question and options included.
    input_text: Optional further context (empty in `../shared/data`).
    style: 'alpaca' (the Alpaca template, the format of the LLM-Adapters
      setups the paper follows, without that code's stray indentation),
      'plain' (the instruction, the input, then a newline: fewer tokens for
      small CPU runs) or 'tk' (Tk-Instruct's SuperNI prompt, the
      instruction as its definition: `tk_instruct_prompt`).
    examples: (input, output) demonstrations, for 'tk' only (SuperNI's
      positive examples; the first two are shown).

  Returns:
    The prompt; the target follows it directly.
  """
  if style == "tk":
    return tk_instruct_prompt(instruction, input_text, examples)
  if style == "alpaca":
    if input_text:
      return _ALPACA_WITH_INPUT.format(instruction=instruction,
                                       input=input_text)
    return _ALPACA.format(instruction=instruction)
  if style == "plain":
    parts = [instruction] + ([input_text] if input_text else [])
    return "\n\n".join(parts) + "\n"
  raise ValueError(
      f"unknown prompt style {style!r}; expected one of {', '.join(STYLES)}")


def choice_target(label: str) -> str:
  """The target text that selects `label` ('answer2', 'true', ...)."""
  return f"the correct answer is {label}"


def multiple_choice_instruction(question: str, choices: Sequence[str],
                                prefix: str = "Answer") -> str:
  """ARC / OpenBookQA style instruction with numbered options.

  Args:
    question: The question text.
    choices: The option texts, in order.
    prefix: 'Answer' (ARC, OpenBookQA) or 'Ending' (HellaSwag).

  Returns:
    The instruction, e.g. '... Answer1: x Answer2: y ...\\n\\nAnswer format:
    answer1/answer2'.
  """
  options = " ".join(f"{prefix}{i}: {c}" for i, c in enumerate(choices, 1))
  labels = "/".join(choice_labels(len(choices), prefix))
  if prefix == "Ending":
    lead = "Please choose the correct ending to complete the given sentence: "
  else:
    lead = "Please choose the correct answer to the question: "
  return f"{lead}{question}\n\n{options}\n\nAnswer format: {labels}"


def choice_labels(num_choices: int, prefix: str = "Answer") -> tuple[str, ...]:
  """('answer1', ..., 'answerN') for a prefix such as 'Answer' or 'Ending'."""
  return tuple(f"{prefix.lower()}{i}" for i in range(1, num_choices + 1))


def boolq_instruction(question: str) -> str:
  """BoolQ instruction as in `../shared/data/boolq` (no passage there)."""
  question = question.strip()
  if not question.endswith("?"):
    question += "?"
  return (f"Please answer the following question with true or false, "
          f"question: {question}\n\nAnswer format: true/false")


def math_target(rationale: str, answer: str) -> str:
  """LLM-Adapters chain-of-thought target: '\\nA: <steps> The answer is N.'"""
  rationale = " ".join(line.strip() for line in rationale.splitlines()
                       if line.strip())
  rationale = re.sub(r"<<[^>]*>>", "", rationale)  # GSM8K calculator notes.
  return f"\nA: {rationale} The answer is {answer}."


def parse_answer_format(instruction: str) -> tuple[str, ...]:
  """Labels from an 'Answer format: a/b/c' line, or () when there is none.

  The labels keep the line's case ('True/False' gives ('True', 'False')):
  they are compared ignoring case (`formats.from_instruction`,
  `evaluate.parse_choice`); the options scored are worded as the record's
  output writes its gold label (`options_like`).
  """
  match = re.search(r"Answer format:\s*([^\n]+)", instruction)
  if not match:
    return ()
  return tuple(x.strip() for x in match.group(1).split("/") if x.strip())


def listed_labels(instruction: str) -> tuple[str, ...]:
  """('answer1', ..., 'answerN') for the options 'Answer1: x ... AnswerN: z'
  an instruction lists ('Ending' too), or () when it lists none.

  A record with no 'Answer format:' line takes its labels from here, so a
  3- or 5-way question is not scored as 4-way.
  """
  match = re.search(r"\b(Answer|Ending)1:", instruction)
  if not match:
    return ()
  prefix = match.group(1)
  # On one line or one per line: every numbered option from the first on.
  numbers = [int(n) for n in re.findall(rf"\b{prefix}(\d+):",
                                        instruction[match.start():])]
  if numbers != list(range(1, len(numbers) + 1)):
    return ()
  return choice_labels(len(numbers), prefix)


def _ending(output: str, labels: Sequence[str]) -> re.Match[str] | None:
  """The match of the label (any of `labels`, any case) that `output` ends
  on, then only punctuation or spaces: group 1 the label as written, group
  2 what follows it."""
  # The label as a word of its own ('A' ends 'Banana' too), also against
  # CJK or Thai text ('答案是B。').
  body = "|".join(re.escape(l) for l in labels)
  return re.search(rf"{word_edges.START}({body})(\W*)$", output,
                   re.IGNORECASE)


def ending_label(output: str, labels: Sequence[str]) -> str | None:
  """The label of `labels` that `output` ends on (as `output` writes it,
  then only punctuation or spaces: 'The answer is B.' ends on 'B'), or
  None."""
  match = _ending(output, labels)
  return match.group(1) if match else None


def options_like(output: str, gold_label: str,
                 labels: Sequence[str]) -> tuple[str, ...] | None:
  """The option texts for `labels` written as `output` writes the gold one.

  When `output` ends on its gold label (any case, then only punctuation or
  spaces), each option is `output` with that label swapped for another, in
  the case `output` wrote it: the gold option is then the target trained on
  ('the correct answer is true' scored against '... false', not the
  template's '... True'). None when `output` does not end on the label.
  """
  match = _ending(output, (gold_label,))
  if not match:
    return None
  written = match.group(1)
  if written.islower():
    case = str.lower
  elif written.isupper():
    case = str.upper
  elif written == written.capitalize():
    case = str.capitalize
  else:
    case = lambda label: label
  stem, tail = output[:match.start()], match.group(2)
  options = []
  for label in labels:
    same = label.lower() == gold_label.lower()
    options.append(stem + (written if same else case(label)) + tail)
  return tuple(options)


def parse_choices(instruction: str, labels: Sequence[str]) -> tuple[str, ...]:
  """Option texts from 'Answer1: x Answer2: y' in an instruction, or ().

  `labels` in any case: 'answer1' and 'Answer1' both read 'Answer1: x'.
  """
  if not labels or not all(re.fullmatch(r"[a-zA-Z]+\d+", l) for l in labels):
    return ()
  prefix = re.sub(r"\d+$", "", labels[0]).capitalize()
  match = re.search(rf"{prefix}1:(.*?)(?:\n|$)", instruction)
  if not match:
    return ()
  parts = re.split(rf"\s*{prefix}\d+:\s*", f"{prefix}1:" + match.group(1))
  texts = tuple(p.strip() for p in parts if p.strip())
  return texts if len(texts) == len(labels) else ()



"""The one example type every loader produces and every later stage consumes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Example:
  """A task example, normalised across datasets and file formats.

  Attributes:
    prompt: The full model input, template already applied; its trailing
      spaces, if any, are moved to the start of `target` (and of each
      option).
    target: The text the model is trained to produce after `prompt`; its
      leading line breaks, if any, are moved to the end of `prompt` (with
      options, those that every option starts with, from each; see
      `__post_init__`).
    task: The registered task name ('boolq', 'arithmetic', ...).
    options: For multiple choice, the candidate targets to score, one per
      answer option (e.g. 'the correct answer is answer2'); empty otherwise.
    labels: For multiple choice, the short label each option stands for, in
      the same order (e.g. 'answer2', 'true'); what a greedy generation is
      parsed against.
    choices: For multiple choice, the human-readable option texts when known
      (e.g. the HellaSwag endings), in the same order; may be empty.
    gold_index: For multiple choice, the index of the correct option.
    gold_number: For math tasks, the canonical gold number
      (`numbers.canonical_number`), or None when the record has none.
    references: For generation tasks, every acceptable target (SuperNI has
      several); defaults to `(target,)`.
    subtask: For SuperNI, the task the instance belongs to (a Hub row's
      'task_name', e.g. 'task1557_jfleg_answer_generation'), by which
      `load_task`'s ``max_per_task`` caps; empty elsewhere.
  """

  prompt: str
  target: str
  task: str = ""
  options: tuple[str, ...] = ()
  labels: tuple[str, ...] = ()
  choices: tuple[str, ...] = ()
  gold_index: int | None = None
  gold_number: str | None = None
  references: tuple[str, ...] = ()
  subtask: str = ""
  # How many of the target's leading line breaks were moved to the prompt
  # (`__post_init__`): what a checkpoint's record of its training data
  # held before 2026-12-07 is recomputed from it (train.loop).
  moved_line_breaks: int = dataclasses.field(default=0, compare=False,
                                             repr=False)
  # Likewise the prompt's trailing spaces moved to the target.
  moved_spaces: int = dataclasses.field(default=0, compare=False, repr=False)

  def __post_init__(self):
    # Why here: every constructor path (loaders, hub, generated) gets the
    # same invariants without repeating the checks.
    if self.options and len(self.labels) not in (0, len(self.options)):
      raise ValueError(
          f"Example has {len(self.options)} options but "
          f"{len(self.labels)} labels")
    if self.gold_index is not None and not (
        0 <= self.gold_index < len(self.options)):
      raise ValueError(
          f"Example gold_index {self.gold_index} is outside its "
          f"{len(self.options)} options")
    # dataclasses.replace re-runs this with the moved counts: they hold only
    # while the text still has what was moved (a new target or prompt
    # starts again from 0).
    if not self.prompt.endswith("\n" * self.moved_line_breaks):
      object.__setattr__(self, "moved_line_breaks", 0)
    if not self.target.startswith(" " * self.moved_spaces):
      object.__setattr__(self, "moved_spaces", 0)
    # A target's leading line breaks go to the end of the prompt, where the
    # text is the same ('Response:\n' + '\nA: ...', the math tasks'
    # records) but the tokens are what the tokenizer makes of it: Gemma's
    # has one '\n\n' piece, and prompt and target encoded apart had taught
    # '\n', '\n' instead (the first target token at ~e^-13 for the base
    # model), in training, scoring and generation alike. With options, the
    # run they all start with (each is scored after the same prompt).
    moved = _leading_line_breaks(self.target)
    if self.options:
      moved = min([moved] + [_leading_line_breaks(o) for o in self.options])
    if moved:
      object.__setattr__(self, "prompt", self.prompt + "\n" * moved)
      object.__setattr__(self, "target", self.target[moved:])
      object.__setattr__(self, "options",
                         tuple(o[moved:] for o in self.options))
      object.__setattr__(self, "moved_line_breaks",
                         self.moved_line_breaks + moved)
    # A prompt's trailing spaces (Tk-Instruct's 'Output: ') go to the
    # target's side, for the same reason the other way round: apart, Gemma
    # encodes a lone space piece and a target without its leading space,
    # pieces the joined text never has.
    unmoved_target = self.target
    spaces = len(self.prompt) - len(self.prompt.rstrip(" "))
    if spaces:
      object.__setattr__(self, "prompt", self.prompt[:-spaces])
      object.__setattr__(self, "target", " " * spaces + self.target)
      object.__setattr__(self, "options",
                         tuple(" " * spaces + o for o in self.options))
      object.__setattr__(self, "moved_spaces", self.moved_spaces + spaces)
    if not self.references:
      object.__setattr__(self, "references", (unmoved_target,))

  def as_before_2026_12_07(self) -> tuple[str, str]:
    """(prompt, target) with the moved line breaks back on the target's
    side and the moved spaces on the prompt's, as records of training data
    made before then hold them."""
    prompt, target = self.prompt, self.target
    if self.moved_spaces:
      prompt, target = (prompt + target[:self.moved_spaces],
                        target[self.moved_spaces:])
    n = self.moved_line_breaks
    if not n:
      return prompt, target
    return prompt[:len(prompt) - n], "\n" * n + target


def _leading_line_breaks(text: str) -> int:
  return len(text) - len(text.lstrip("\n"))


def prompt_key(example: Example) -> str:
  """The prompt with runs of whitespace collapsed: examples with the same key
  ask the same question (used to keep evaluation items out of training)."""
  return " ".join(example.prompt.split())


def without_prompts_of(examples: Sequence[Example],
                       held_out: Iterable[Example]) -> list[Example]:
  """``examples`` less those whose `prompt_key` is one of ``held_out``'s:
  the rule that keeps evaluation questions out of training, for the train
  loop and the seqio tasks alike."""
  held = {prompt_key(e) for e in held_out}
  return [e for e in examples if prompt_key(e) not in held]

"""`arithmetic`: a built-in generated task that needs no files.

Templated one-step word problems (addition, subtraction, multiplication,
division) with short numeric targets, so that a 270M model can learn the
format and improve within a few hundred CPU steps, and a fresh machine can
train and evaluate offline.

Train and test are disjoint by construction: each (operation, a, b) triple
belongs to exactly one split, chosen by a fixed hash, so no test question is
seen in training under any name, object or wording, and the split does not
depend on the sampling seed. The triple is ordered: for addition and
multiplication ``b op a`` is another triple, and 126 of the 177 addition test
pairs (12 of 22 for multiplication) have their swapped twin in training. The
split is kept as it is so that the committed results (docs/results) stay
reproducible; read the task as "the format and nearby arithmetic", not as
arithmetic never seen.
"""

from __future__ import annotations

import zlib

import numpy as np

from train.data.example import Example

NAME = "arithmetic"
TEST_SHARE = 5  # One (op, a, b) triple in TEST_SHARE goes to test.

_NAMES = ("Tom", "Anna", "Ben", "Maria", "Sam", "Lena", "Omar", "Priya",
          "Kenji", "Zoe", "Lucas", "Mia")
_OBJECTS = ("apples", "pencils", "marbles", "cookies", "stickers", "books",
            "oranges", "cards", "shells", "balloons")

# (operation, template); {a} and {b} are the operands as the op defines them.
_TEMPLATES = (
    ("add", "{name} has {a} {obj} and buys {b} more. How many {obj} does "
            "{name} have now?"),
    ("add", "There are {a} {obj} in a box. {name} puts in {b} more. How many "
            "{obj} are in the box?"),
    ("add", "{name} found {a} {obj} on Monday and {b} {obj} on Tuesday. How "
            "many {obj} did {name} find in total?"),
    ("sub", "{name} has {a} {obj} and gives {b} to a friend. How many {obj} "
            "does {name} have left?"),
    ("sub", "A basket holds {a} {obj}. {name} takes out {b}. How many {obj} "
            "are left in the basket?"),
    ("mul", "{name} buys {a} bags with {b} {obj} in each bag. How many {obj} "
            "does {name} buy?"),
    ("mul", "There are {a} rows of {obj} with {b} {obj} in each row. How many "
            "{obj} are there?"),
    ("div", "{name} shares {a} {obj} equally among {b} friends. How many "
            "{obj} does each friend get?"),
)


def _operands(op: str, rng: np.random.Generator) -> tuple[int, int, int]:
  """Draws (a, b, answer) for `op`; small numbers keep targets 1-3 tokens."""
  if op == "add":
    a, b = rng.integers(2, 31, size=2)
    return int(a), int(b), int(a + b)
  if op == "sub":
    a = int(rng.integers(5, 41))
    b = int(rng.integers(1, a))
    return a, b, a - b
  if op == "mul":
    a, b = rng.integers(2, 13, size=2)
    return int(a), int(b), int(a * b)
  # div: a = quotient * b, so answers are whole.
  b, quotient = (int(x) for x in rng.integers(2, 11, size=2))
  return quotient * b, b, quotient


def _all_operands(op: str) -> list[tuple[int, int]]:
  """Every (a, b) `_operands` can draw for `op`."""
  if op == "add":
    return [(a, b) for a in range(2, 31) for b in range(2, 31)]
  if op == "sub":
    return [(a, b) for a in range(5, 41) for b in range(1, a)]
  if op == "mul":
    return [(a, b) for a in range(2, 13) for b in range(2, 13)]
  return [(q * b, b) for b in range(2, 11) for q in range(2, 11)]


def capacity(split: str) -> int:
  """How many distinct questions `split` holds."""
  want_test = split == "test"
  total = 0
  for op, template in _TEMPLATES:
    pairs = sum(is_test_item(op, a, b) == want_test
                for a, b in _all_operands(op))
    total += pairs * len(_OBJECTS) * (
        len(_NAMES) if "{name}" in template else 1)
  return total


def is_test_item(op: str, a: int, b: int) -> bool:
  """Whether the arithmetic triple (op, a, b) belongs to the test split."""
  return zlib.crc32(f"{op}:{a}:{b}".encode()) % TEST_SHARE == 0


def make_prompt(question: str) -> str:
  """Short prompt, no instruction header: cheap on CPU."""
  return f"Question: {question}\nAnswer:"


def generate(split: str = "train", num_examples: int = 2000, seed: int = 0
             ) -> list[Example]:
  """Generates `num_examples` distinct word problems of one split.

  Args:
    split: 'train' or 'test' (a validation split is carved from 'train' by
      `tasks.load_task`).
    num_examples: How many distinct problems to return.
    seed: Sampling seed; the same seed gives the same list.

  Returns:
    Examples with prompt 'Question: ...\\nAnswer:', target ' N' (a leading
    space, then the number) and `gold_number` N.

  Raises:
    ValueError: unknown split, or more examples asked than the split holds.
  """
  if split not in ("train", "test"):
    raise ValueError(
        f"unknown split {split!r} for task 'arithmetic'; expected train or "
        "test")
  if num_examples > capacity(split) // 2:
    # Past half the pool, rejection sampling of distinct items gets slow.
    raise ValueError(
        f"task 'arithmetic' cannot make {num_examples} distinct {split} "
        f"examples; at most {capacity(split) // 2}")
  want_test = split == "test"
  # Different streams per split so train and test sampling are independent.
  rng = np.random.default_rng([seed, int(want_test)])
  seen: set[str] = set()
  out: list[Example] = []
  while len(out) < num_examples:
    op, template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    a, b, answer = _operands(op, rng)
    if is_test_item(op, a, b) != want_test:
      continue
    question = template.format(
        name=_NAMES[int(rng.integers(len(_NAMES)))],
        obj=_OBJECTS[int(rng.integers(len(_OBJECTS)))], a=a, b=b)
    if question in seen:
      continue
    seen.add(question)
    out.append(Example(prompt=make_prompt(question), target=f" {answer}",
                       task=NAME, gold_number=str(answer)))
  return out

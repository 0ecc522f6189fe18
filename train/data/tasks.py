"""The task registry and `load_task`: one call from a task name to examples.

Splits: 'train' and 'validation' come from the training data (validation is
carved out by seed, never from the test set); 'test' is the test data.
Sources: a local file or folder (`../shared/data` layout by default), the
Hugging Face Hub by id, or, for `arithmetic`, the built-in generator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lora_rite_optax import checks
from train.data import arithmetic
from train.data import formats
from train.data import records as records_lib
from train.data.example import Example
from train.errors import first_line

SPLITS = ("train", "validation", "test")
DATA_DIR_ENV = "LRO_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """How to find and read one task.

  Attributes:
    name: Registry name.
    kind: formats.CHOICE, formats.NUMBER or formats.GENERATION.
    folder: Folder under the data dir holding `train.json` / `test.json`
      (or .jsonl / .parquet), or None.
    hub_id: Hugging Face dataset id, or None.
    hub_config: The dataset's config name, or None.
    hub_splits: Our 'train' / 'test' -> the Hub's split names.
    default_labels: Option labels when a record does not list them.
    hf_converter: Converter for the task's Hugging Face format, or None.
  """

  name: str
  kind: str
  folder: str | None = None
  hub_id: str | None = None
  hub_config: str | None = None
  hub_splits: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: {"train": "train", "test": "test"})
  default_labels: tuple[str, ...] = ()
  hf_converter: formats.HfConverter | None = None


_ANSWERS4 = ("answer1", "answer2", "answer3", "answer4")

TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("arc_challenge", formats.CHOICE, "ARC-Challenge",
             "allenai/ai2_arc", "ARC-Challenge", default_labels=_ANSWERS4,
             hf_converter=formats.arc_from_hf),
    TaskSpec("openbookqa", formats.CHOICE, "openbookqa", "allenai/openbookqa",
             "main", default_labels=_ANSWERS4,
             hf_converter=formats.openbookqa_from_hf),
    # BoolQ and HellaSwag publish no test labels: their Hub 'validation'
    # split serves as our test set.
    TaskSpec("boolq", formats.CHOICE, "boolq", "google/boolq",
             hub_splits={"train": "train", "test": "validation"},
             default_labels=("true", "false"),
             hf_converter=formats.boolq_from_hf),
    TaskSpec("hellaswag", formats.CHOICE, "hellaswag", "Rowan/hellaswag",
             hub_splits={"train": "train", "test": "validation"},
             default_labels=("ending1", "ending2", "ending3", "ending4"),
             hf_converter=formats.hellaswag_from_hf),
    TaskSpec("gsm8k", formats.NUMBER, "gsm8k", "openai/gsm8k", "main",
             hf_converter=formats.gsm8k_from_hf),
    # LLM-Adapters' math training set for the GSM8K format; local only.
    TaskSpec("math", formats.NUMBER, "math"),
    TaskSpec("superni", formats.GENERATION, "superni",
             "Muennighoff/natural-instructions",
             hf_converter=formats.superni_from_hf),
    TaskSpec(arithmetic.NAME, formats.NUMBER),
)}

# Keyed by the name with '-' read as '_' ('natural-instructions' had been
# unknown while 'natural_instructions' was not).
_ALIASES = {"arc": "arc_challenge", "obqa": "openbookqa",
            "super_natural_instructions": "superni",
            "natural_instructions": "superni"}


def task_names() -> tuple[str, ...]:
  """The registered task names."""
  return tuple(TASKS)


def is_generated(name: str, path=None, hub=None) -> bool:
  """Whether `load_task` generates task `name`'s examples (`arithmetic`,
  given no file and no Hub id): `num_examples` then sizes their pool."""
  return get_task(name).name == arithmetic.NAME and not path and not hub


def get_task(name: str) -> TaskSpec:
  """Returns the spec of task `name` (case-insensitive; a few aliases)."""
  key = name.strip().lower().replace("-", "_")
  key = _ALIASES.get(key, key)
  if key not in TASKS:
    raise ValueError(
        f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
  return TASKS[key]


def default_data_dir() -> Path:
  """$LRO_DATA_DIR, else `shared/data` beside the repository checkout."""
  if os.environ.get(DATA_DIR_ENV):
    return Path(os.environ[DATA_DIR_ENV])
  return Path(__file__).resolve().parents[3] / "shared" / "data"


def examples_from_records(recs: Sequence[records_lib.Record], task: str, *,
                          style: str = "alpaca", source: str = "records",
                          places: Sequence[str] | None = None
                          ) -> list[Example]:
  """Converts raw records of `task`, in any supported format, to examples.

  Args:
    recs: Records from `records.read_records` or a Hub dataset.
    task: Task name.
    style: Prompt style, see `templates.wrap_instruction`.
    source: Where the records came from, for error messages.
    places: Where each record is in `source` ("line 4"), for error
      messages; by default "record <index>".

  Returns:
    The examples, in record order.

  Raises:
    ValueError: unknown task, or a record lacking its format's fields.
  """
  spec = get_task(task)
  out: list[Example] = []
  for i, record in enumerate(recs):
    where = f"{source} {places[i] if places else f'record {i}'}"
    # 'output' is the instruction format's too (no Hub format has it): a
    # record with it but no instruction is told it lacks the instruction,
    # not the Hub format's fields.
    if ("instruction" in record or "output" in record
        or spec.hf_converter is None):
      out += formats.from_instruction(
          record, task=spec.name, kind=spec.kind,
          default_labels=spec.default_labels, style=style, where=where)
    else:
      out += spec.hf_converter(record, task=spec.name, style=style,
                               where=where)
  return out


def load_file(path: str | os.PathLike[str], task: str, *,
              style: str = "alpaca") -> list[Example]:
  """Reads one local JSON / JSONL / Parquet file of `task` into examples."""
  get_task(task)  # Unknown names fail before any file access.
  recs, places = records_lib.read_placed_records(path)
  return examples_from_records(recs, task, style=style, source=str(path),
                               places=places)


def _local_file(folder: Path, spec: TaskSpec, file_split: str) -> Path:
  for suffix in records_lib.SUFFIXES:
    candidate = folder / f"{file_split}{suffix}"
    if candidate.is_file():
      return candidate
  hint = ("; LLM-Adapters trains GSM8K on task 'math'"
          if spec.name == "gsm8k" and file_split == "train" else "")
  raise FileNotFoundError(
      f"no {file_split} file for task {spec.name!r}: looked for "
      f"{folder / file_split}{{{','.join(records_lib.SUFFIXES)}}}{hint}")


def load_hub_records(hub_id: str, config: str | None, split: str
                     ) -> list[records_lib.Record]:
  """Downloads one split of a Hugging Face dataset (needs `datasets`)."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"loading {hub_id!r} from the Hugging Face Hub needs the `datasets` "
        "package (`pip install datasets`) and network access; or pass a "
        "local path") from None
  try:
    ds = datasets.load_dataset(hub_id, config, split=split)
  except Exception as e:  # Network, auth, missing split: all land here.
    raise ValueError(
        f"could not load {hub_id!r} (config {config!r}, split {split!r}) "
        f"from the Hugging Face Hub: {first_line(e)}") from None
  return [dict(r) for r in ds]


def cap_per_task(examples: Sequence[Example], limit: int,
                 seed: int | None = None) -> list[Example]:
  """At most ``limit`` examples of each `Example.subtask`, in their order:
  the first ones, or (``seed`` given) a sample drawn with it.

  Raises:
    ValueError: an example names no subtask (only SuperNI's do).
  """
  unnamed = sum(not e.subtask for e in examples)
  if unnamed:
    raise ValueError(
        f"max_per_task caps SuperNI's tasks, but {unnamed} of the "
        f"{len(examples)} examples name none (a Hub row names its task in "
        "'task_name'; a task file stands for one task)")
  by_task: dict[str, list[int]] = {}
  for i, e in enumerate(examples):
    by_task.setdefault(e.subtask, []).append(i)
  keep = []
  for name, rows in by_task.items():
    if len(rows) > limit and seed is not None:
      # Seeded by the task's name too: a task's sample does not depend on
      # which other tasks the file holds.
      rng = np.random.default_rng(
          [seed, *hashlib.sha256(name.encode()).digest()[:8]])
      rows = sorted(rng.choice(rows, limit, replace=False).tolist())
    keep += rows[:limit]
  return [examples[i] for i in sorted(keep)]


def split_validation(examples: Sequence[Example], fraction: float = 0.1,
                     seed: int = 0) -> tuple[list[Example], list[Example]]:
  """Carves a validation set out of training examples, deterministically.

  Args:
    examples: The training examples.
    fraction: Share held out, in (0, 1); at least one example is held out.
    seed: The same seed gives the same split.

  Returns:
    (train, validation), each in the original order.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
  n = len(examples)
  if n < 2:
    raise ValueError(f"cannot carve a validation set out of {n} example(s) "
                     "(validation_fraction 0 trains on all of them)")
  k = min(n - 1, max(1, round(n * fraction)))
  held = np.zeros(n, bool)
  held[np.random.default_rng(seed).permutation(n)[:k]] = True
  return ([e for e, h in zip(examples, held) if not h],
          [e for e, h in zip(examples, held) if h])


def load_task(name: str, split: str = "train", *,
              path: str | os.PathLike[str] | None = None,
              data_dir: str | os.PathLike[str] | None = None,
              hub: bool | str = False, hub_config: str | None = None,
              style: str = "alpaca",
              validation_fraction: float = 0.1, seed: int = 0,
              num_examples: int | None = None,
              max_per_task: int | None = None) -> list[Example]:
  """Loads one split of a task as examples.

  Args:
    name: Task name, see `task_names()`.
    split: 'train', 'validation' (carved from the training data by `seed`)
      or 'test'.
    path: A file to read instead of the data dir's file for this split (for
      'train'/'validation', the training file to carve from), or a folder
      holding `train.json` / `test.json` (or .jsonl / .parquet).
    data_dir: Folder holding one subfolder per task in the `../shared/data`
      layout; default `default_data_dir()`.
    hub: Load from the Hugging Face Hub instead: True for the task's
      registered id, or a dataset id (in the task's Hugging Face format),
      optionally with its config after a colon (``allenai/ai2_arc:ARC-Easy``).
    hub_config: The Hub dataset's config, with a `hub` id (default: the one
      after the colon, else the task's own when the id is its registered
      one, else none).
    style: Prompt style ('alpaca', 'plain' or 'tk').
    validation_fraction: Share of the training data held out as validation,
      in [0, 1); 0 trains on all of it and has no validation split.
    seed: Seed of the validation carve (and of `arithmetic` generation).
    num_examples: For `arithmetic`, how many to generate: the training pool
      the validation set is carved from (default 2000) or the test set
      (default 200); for other tasks, keep only the first `num_examples`
      examples of the split.
    max_per_task: For SuperNI, keep at most this many instances of each of
      its tasks, as Tk-Instruct does (100 per task in both splits): a test
      task's first ones (the official evaluation instances come first in
      its file), a sample of a training task's drawn with `seed`, kept in
      file order. Before the validation carve and `num_examples`.

  Returns:
    The examples.

  Raises:
    ValueError: unknown task or split, malformed data.
    FileNotFoundError: the data file is missing.
  """
  spec = get_task(name)
  if split not in SPLITS:
    raise ValueError(
        f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
  file_split = "test" if split == "test" else "train"
  if num_examples is not None and (not checks.is_integer(num_examples) or
                                   num_examples < 1):
    # -1 had dropped the last example (a slice), silently; 0 had given no
    # examples for a file task but the default size for `arithmetic` (the
    # loop's `0: all` is None here).
    raise ValueError(f"num_examples must be None (all) or an int >= 1, got "
                     f"{num_examples!r}")
  if max_per_task is not None and (not checks.is_integer(max_per_task) or
                                   max_per_task < 1):
    raise ValueError(f"max_per_task must be None (all) or an int >= 1, got "
                     f"{max_per_task!r}")
  if hub and path is not None:
    raise ValueError(f"give a local path or a Hub dataset, not both (path "
                     f"{path}, hub {hub!r})")
  if split == "validation" and validation_fraction == 0:
    raise ValueError("no validation split: validation_fraction is 0 (the "
                     "training split keeps every example)")
  if path is None and is_generated(name, hub=hub):
    # `num_examples` sizes the generated pool (train before the carve).
    examples = arithmetic.generate(
        file_split, num_examples or (200 if split == "test" else 2000), seed)
    num_examples = None
  elif hub:
    hub_id = hub if isinstance(hub, str) else spec.hub_id
    if hub_id is None:
      raise ValueError(f"task {spec.name!r} has no Hugging Face Hub id; pass "
                       "a local path or a Hub id")
    hub_id, _, named = hub_id.partition(":")
    # A fork or mirror of a multi-config dataset needs its config named
    # (allenai/ai2_arc cannot load without one).
    config = (hub_config or named or
              (spec.hub_config if hub_id == spec.hub_id else None))
    recs = load_hub_records(hub_id, config, spec.hub_splits[file_split])
    examples = examples_from_records(recs, spec.name, style=style,
                                     source=f"hub:{hub_id}")
  else:
    if path is not None and Path(path).is_dir():
      file = _local_file(Path(path), spec, file_split)
    elif path is not None:
      file = Path(path)
    else:
      data_root = Path(data_dir) if data_dir is not None else (
          default_data_dir())
      file = _local_file(data_root / (spec.folder or spec.name), spec,
                         file_split)
    examples = load_file(file, spec.name, style=style)
    if not examples:
      raise ValueError(f"{file} holds no records for task {spec.name!r}")
  if max_per_task is not None:
    examples = cap_per_task(examples, max_per_task,
                            None if file_split == "test" else seed)
  if split != "test" and validation_fraction != 0:
    train, validation = split_validation(examples, validation_fraction, seed)
    examples = train if split == "train" else validation
  if num_examples is not None:
    examples = examples[:num_examples]
  return examples

"""Loaders, formats, templates and the built-in task of `train.data`."""

import collections
import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest

from train import data
from train.data import arithmetic
from train.data import numbers
from train.data import templates

from tests.shared_data import DATA_DIR, needs_data  # pylint: disable=g-importing-member


def _listing(path):
  return sorted(str(p) for p in Path(path).rglob("*"))


# --- the real files in ../shared/data ---------------------------------------


@needs_data
@pytest.mark.parametrize("task,split,count", [
    ("arc_challenge", "test", 1172),
    ("openbookqa", "test", 500),
    ("boolq", "test", 3270),
    ("gsm8k", "test", 1319),
    ("math", "train", 2934),
])
def test_real_files_load(task, split, count):
  examples = data.load_task(task, split, data_dir=DATA_DIR)
  assert len(examples) == count
  assert all(e.task == task and e.prompt and e.prompt.endswith("\n")
             for e in examples)


@needs_data
def test_real_multiple_choice_fields():
  examples = data.load_task("arc_challenge", "test", data_dir=DATA_DIR)
  sizes = {len(e.options) for e in examples}
  assert sizes == {3, 4, 5}  # ARC has a few 3- and 5-way questions.
  for e in examples:
    assert e.target == e.options[e.gold_index]
    assert e.labels[e.gold_index] == e.target.rsplit(" ", 1)[-1]
    assert len(e.choices) == len(e.options)
  first = data.load_task("openbookqa", "train", data_dir=DATA_DIR,
                         validation_fraction=0.5)[0]
  assert "Answer1:" in first.prompt and "### Response:\n" in first.prompt
  boolq = data.load_task("boolq", "test", data_dir=DATA_DIR)
  assert {e.labels for e in boolq} == {("true", "false")}
  assert sum(e.gold_index == 0 for e in boolq) == 2033  # 'true' answers.


@needs_data
def test_real_math_gold_comes_from_output_not_answer():
  recs = json.loads((DATA_DIR / "math" / "train.json").read_text())
  examples = data.load_file(DATA_DIR / "math" / "train.json", "math")
  assert len(examples) == len(recs)
  disagree = [(r, e) for r, e in zip(recs, examples)
              if e.gold_number is not None and
              numbers.canonical_number(r["answer"]) != e.gold_number]
  assert disagree  # The README's caution: the answer field is unreliable.
  for r, e in disagree[:20]:
    assert e.gold_number == numbers.extract_final_number(
        r["output"], fallback_to_last=False)
  no_marker = [e for r, e in zip(recs, examples)
               if "The answer is" not in r["output"]]
  assert len(no_marker) == 26  # As the data README counts them.
  # Ten of them end '... so the answer is N.' (lower case), which counts.
  assert sum(e.gold_number is None for e in no_marker) == 16
  gsm = data.load_task("gsm8k", "test", data_dir=DATA_DIR)
  assert gsm[0].gold_number == "576"  # From `answer`, '576.0'.


@needs_data
def test_validation_is_carved_from_train_by_seed():
  full = data.load_file(DATA_DIR / "boolq" / "train.json", "boolq")
  train = data.load_task("boolq", "train", data_dir=DATA_DIR)
  val = data.load_task("boolq", "validation", data_dir=DATA_DIR)
  assert len(train) + len(val) == len(full) and len(val) == 943
  assert collections.Counter(train) + collections.Counter(val) == (
      collections.Counter(full))
  assert val == data.load_task("boolq", "validation", data_dir=DATA_DIR)
  other = data.load_task("boolq", "validation", data_dir=DATA_DIR, seed=1)
  assert other != val
  # Fraction 0: training keeps every example, and there is no validation.
  assert data.load_task("boolq", "train", data_dir=DATA_DIR,
                        validation_fraction=0) == full
  with pytest.raises(ValueError, match="no validation split: "
                     "validation_fraction is 0"):
    data.load_task("boolq", "validation", data_dir=DATA_DIR,
                   validation_fraction=0)
  with pytest.raises(FileNotFoundError, match="task 'math'"):
    data.load_task("math", "test", data_dir=DATA_DIR)


def test_data_dir_honours_env(monkeypatch, tmp_path):
  monkeypatch.setenv("LRO_DATA_DIR", str(tmp_path))
  assert data.default_data_dir() == tmp_path
  monkeypatch.delenv("LRO_DATA_DIR")
  assert data.default_data_dir().parts[-2:] == ("shared", "data")


# --- small files the tests write ---------------------------------------------

_INSTR = {"instruction": "Please answer the following question with true or "
                         "false, question: is the sky blue?\n\nAnswer format: "
                         "true/false",
          "input": "", "output": "the correct answer is true",
          "answer": "true"}


def test_json_jsonl_parquet_give_same_examples(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  recs = [_INSTR, dict(_INSTR, answer="false",
                       output="the correct answer is false")]
  (tmp_path / "a.json").write_text(json.dumps(recs))
  (tmp_path / "a.jsonl").write_text(
      "\n".join(json.dumps(r) for r in recs) + "\n\n")
  pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
  loaded = [data.load_file(tmp_path / f"a.{s}", "boolq")
            for s in ("json", "jsonl", "parquet")]
  assert loaded[0] == loaded[1] == loaded[2]
  assert [e.gold_index for e in loaded[0]] == [0, 1]
  # JSON Lines under a `.json` name, as Hugging Face `Dataset.to_json`
  # writes it, had been refused as "malformed JSON ... Extra data".
  (tmp_path / "lines.json").write_text((tmp_path / "a.jsonl").read_text())
  assert data.load_file(tmp_path / "lines.json", "boolq") == loaded[0]
  (tmp_path / "junk.json").write_text(json.dumps(recs) + "\n]")
  with pytest.raises(ValueError, match="line 2 column 1: Extra data"):
    data.load_file(tmp_path / "junk.json", "boolq")


def test_a_parquet_file_without_a_working_pyarrow_says_which(
    tmp_path, monkeypatch):
  """An installed pyarrow that fails to import (pyarrow 15 under NumPy 2)
  had been reported as missing: 'install it', which it was."""
  import importlib.util
  import sys
  path = tmp_path / "a.parquet"
  path.write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails
  with pytest.raises(ImportError, match=r"^reading .*a\.parquet: pyarrow is "
                     r"installed but fails to import \(.*\); upgrade it: pip "
                     r"install -U pyarrow$"):
    data.load_file(path, "boolq")
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      None if name == "pyarrow" else real(name, *a)))
  with pytest.raises(ImportError, match=r"^reading .*a\.parquet needs "
                     r"pyarrow; install it with `pip install pyarrow`"):
    data.load_file(path, "boolq")


def test_local_folder_layout_and_suffix_search(tmp_path):
  folder = tmp_path / "boolq"
  folder.mkdir()
  (folder / "test.jsonl").write_text(json.dumps(_INSTR) + "\n")
  examples = data.load_task("boolq", "test", data_dir=tmp_path)
  assert len(examples) == 1 and examples[0].gold_index == 0
  assert examples[0].choices == ("true", "false")
  # `path` may name the task's folder itself, or one file.
  assert data.load_task("boolq", "test", path=folder) == examples
  assert data.load_task("boolq", "test", path=folder / "test.jsonl") == (
      examples)


def test_hf_formats(tmp_path):
  arc = {"id": "x", "question": "Which is a metal?",
         "choices": {"text": ["wood", "iron", "glass"],
                     "label": ["A", "B", "C"]}, "answerKey": "B"}
  [e] = data.examples_from_records([arc], "arc_challenge")
  assert e.gold_index == 1 and e.target == "the correct answer is answer2"
  assert "Answer1: wood Answer2: iron Answer3: glass" in e.prompt
  assert "Answer format: answer1/answer2/answer3" in e.prompt
  assert e.choices == ("wood", "iron", "glass")

  obqa = {"question_stem": "The sun is", "answerKey": "4",
          "choices": {"text": ["a", "b", "c", "d"],
                      "label": ["1", "2", "3", "4"]}}
  [e] = data.examples_from_records([obqa], "openbookqa")
  assert e.gold_index == 3 and len(e.options) == 4

  [yes, no] = data.examples_from_records(
      [{"question": "is the sky blue", "passage": "...", "answer": True},
       {"question": "is fire cold", "label": 0}], "boolq")
  assert (yes.gold_index, no.gold_index) == (0, 1)
  # Same prompt as the instruction file gives for the same question.
  [instr] = data.examples_from_records([_INSTR], "boolq")
  assert yes.prompt == instr.prompt and yes.target == instr.target

  gsm = {"question": "Tom has 3 apples and buys 2. How many?",
         "answer": "He has 3+2=<<3+2=5>>5 apples.\n#### 1,005"}
  [e] = data.examples_from_records([gsm], "gsm8k")
  assert e.gold_number == "1005"
  # LLM-Adapters' '\nA: ...' target, its line break at the prompt's end
  # (the same joined text; see Example).
  assert e.target == "A: He has 3+2=5 apples. The answer is 1005."
  assert e.prompt.endswith("### Response:\n\n")

  # LLM-Adapters' own record (its README's example): the activity label
  # leads the context, and WikiHow's [header]/[title] marks are kept.
  hs = {"activity_label": "Playing drums",
        "ctx": "People are standing behind large drums. A man", "label": "3",
        "endings": ["is playing a bag pipe.", "starts to play around the "
                    "drums.", "begins playing a drum set.",
                    "begins playing the drums."]}
  adapters = {
      "instruction": "Please choose the correct ending to complete the given "
                     "sentence: Playing drums: People are standing behind "
                     "large drums. A man\n\nEnding1: is playing a bag pipe. "
                     "Ending2: starts to play around the drums. Ending3: "
                     "begins playing a drum set. Ending4: begins playing the "
                     "drums.\n\nAnswer format: ending1/ending2/ending3/"
                     "ending4",
      "input": "", "output": "the correct answer is ending4",
      "answer": "ending4"}
  [e, instr] = data.examples_from_records([hs, adapters], "hellaswag")
  assert e.gold_index == 3 and e.labels[3] == "ending4"
  assert (e.prompt, e.target) == (instr.prompt, instr.target)
  [e] = data.examples_from_records(
      [dict(hs, ctx="Travel: [header] How to", label="")], "hellaswag")
  assert e.gold_index is None  # The unlabelled test split.
  assert "Playing drums: Travel: [header] How to\n" in e.prompt

  flat = {"task_name": "t1", "definition": "Reverse the word.",
          "inputs": "abc", "targets": "cba"}
  [e] = data.examples_from_records([flat], "superni")
  assert e.target == "cba" and e.references == ("cba",)
  assert "Reverse the word." in e.prompt and "### Input:\nabc" in e.prompt
  task_file = {"Definition": ["Answer yes or no."],
               "Positive Examples": [],
               "Instances": [{"id": "1", "input": "a?", "output": ["yes",
                                                                   "Yes"]},
                             {"id": "2", "input": "b?", "output": ["no"]}]}
  path = tmp_path / "task001.json"
  path.write_text(json.dumps(task_file))
  examples = data.load_file(path, "superni")
  assert [e.references for e in examples] == [("yes", "Yes"), ("no",)]
  # One instance as the official ni_dataset.py yields them (had been
  # refused for a missing 'Instances').
  instance = {"Task": "task001", "Definition": task_file["Definition"],
              "Positive Examples": [], "Instance": task_file["Instances"][1]}
  [one] = data.examples_from_records([instance], "superni")
  assert (one.prompt, one.references) == (examples[1].prompt, ("no",))


def test_superni_tk_instruct_prompt():
  """--data.style tk: Tk-Instruct's prompt (its collator's default setting,
  the definition and two positive examples) word for word, its trailing
  space on the target's side."""
  task_file = {"Definition": ["Classify the review as Positive or Negative"],
               "Positive Examples": [
                   {"input": "I loved it.", "output": "Positive",
                    "explanation": "not shown"},
                   {"input": " Dull ", "output": "Negative."},
                   {"input": "third", "output": "not shown"}],
               "Instances": [{"id": "1", "input": " What a waste of time ",
                              "output": ["Negative", "negative"]}]}
  [e] = data.examples_from_records([task_file], "superni", style="tk")
  # ni_collator.py's text for this record, then the target.
  official = ("Definition: Classify the review as Positive or Negative.\n\n"
              " Positive Example 1 -\nInput: I loved it.\n Output: Positive."
              "\n\n"
              " Positive Example 2 -\nInput: Dull.\n Output: Negative.\n\n"
              "Now complete the following example -\n"
              "Input: What a waste of time.\nOutput: ")
  assert e.prompt + e.target == official + "Negative"
  assert e.prompt == official[:-1] and e.target == " Negative"
  # What a checkpoint's record of its training data held before the move.
  assert e.as_before_2026_12_07() == (official, "Negative")
  # A replaced target keeps the count only if it still has the space (it
  # had been cut into 'P', 'ositive').
  assert dataclasses.replace(e, target=" Positive").as_before_2026_12_07(
  ) == (official, "Positive")
  assert dataclasses.replace(e, target="Positive").as_before_2026_12_07(
  ) == (official[:-1], "Positive")
  assert e.references == ("Negative", "negative")
  [hub] = data.examples_from_records([{"definition": "Reverse the word",
                                       "inputs": "abc", "targets": "cba"}],
                                     "superni", style="tk")
  assert hub.prompt + hub.target == (
      "Definition: Reverse the word.\n\nNow complete the following example "
      "-\nInput: abc.\nOutput: cba")
  # Other tasks take it too, the instruction as the definition.
  [boolq] = data.examples_from_records([_INSTR], "boolq", style="tk")
  assert boolq.prompt.startswith("Definition: ")
  assert boolq.target.startswith(" the correct answer is")
  assert all(o.startswith(" the correct answer is") for o in boolq.options)
  with pytest.raises(ValueError, match="positive example 0 must be an object"):
    data.examples_from_records([dict(task_file, **{
        "Positive Examples": ["x"]})], "superni", style="tk")


def test_prompt_styles():
  [plain] = data.examples_from_records([_INSTR], "boolq", style="plain")
  assert plain.prompt == _INSTR["instruction"] + "\n"
  with pytest.raises(ValueError, match="unknown prompt style 'x'"):
    templates.wrap_instruction("q", style="x")


# --- the Hub, monkeypatched ---------------------------------------------------


def test_hub_loading_by_id(monkeypatch):
  calls = []

  def load_dataset(hub_id, config, split):
    calls.append((hub_id, config, split))
    return [{"question": "q?", "answer": False}] * 4

  monkeypatch.setitem(sys.modules, "datasets",
                      types.SimpleNamespace(load_dataset=load_dataset))
  test = data.load_task("boolq", "test", hub=True)
  assert calls == [("google/boolq", None, "validation")]
  assert len(test) == 4 and test[0].gold_index == 1
  train = data.load_task("boolq", "train", hub=True,
                         validation_fraction=0.25)
  assert calls[-1] == ("google/boolq", None, "train") and len(train) == 3
  data.load_task("boolq", "test", hub="someone/boolq-copy", hub_config="x")
  assert calls[-1] == ("someone/boolq-copy", "x", "validation")
  # --data.hub ID:CONFIG; the task's own id by name takes the task's config
  # (both had loaded allenai/ai2_arc with none, which it refuses).
  # A fork named without one gets none (not the registered id's).
  for hub in ("someone/arc-copy:ARC-Easy", "allenai/ai2_arc",
              "someone/arc-copy"):
    with pytest.raises(ValueError, match="missing field"):  # boolq records
      data.load_task("arc_challenge", "test", hub=hub)
  assert calls[-3:] == [("someone/arc-copy", "ARC-Easy", "test"),
                        ("allenai/ai2_arc", "ARC-Challenge", "test"),
                        ("someone/arc-copy", None, "test")]


def test_hub_errors_are_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # Not installed.
  with pytest.raises(ImportError, match="needs the `datasets` package") as e:
    data.load_task("gsm8k", "test", hub=True)
  assert "\n" not in str(e.value)

  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach the Hub\nsecond line")

  monkeypatch.setitem(sys.modules, "datasets",
                      types.SimpleNamespace(load_dataset=offline))
  with pytest.raises(ValueError, match="could not load 'openai/gsm8k'") as e:
    data.load_task("gsm8k", "test", hub=True)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="has no Hugging Face Hub id"):
    data.load_task("math", "train", hub=True)
  # The generated task had ignored --data.hub and trained on its own
  # problems, silently.
  with pytest.raises(ValueError, match="'arithmetic' has no Hugging Face"):
    data.load_task("arithmetic", "train", hub=True)
  with pytest.raises(ValueError, match="num_examples must be None .* got -1"):
    data.load_task("arithmetic", "test", num_examples=-1)
  # 0 had meant no examples for a file task and the default size for
  # `arithmetic`.
  for task in ("arithmetic", "boolq"):
    with pytest.raises(ValueError, match="int >= 1, got 0"):
      data.load_task(task, "test", num_examples=0)


# --- the built-in task --------------------------------------------------------


_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b, "div": lambda a, b: a // b}


def test_arithmetic_is_deterministic_disjoint_and_right():
  train = data.load_task("arithmetic", "train")
  val = data.load_task("arithmetic", "validation")
  test = data.load_task("arithmetic", "test")
  assert (len(train), len(val), len(test)) == (1800, 200, 200)
  assert train == data.load_task("arithmetic", "train")
  assert train != data.load_task("arithmetic", "train", seed=1)
  assert not {e.prompt for e in train} & {e.prompt for e in test}
  assert len({e.prompt for e in train + val}) == 2000  # no repeats
  # Disjoint in the arithmetic itself, not only in wording.
  patterns = []
  for op, template in arithmetic._TEMPLATES:
    regex = re.escape(template)
    for field, group in (("name", r"\w+"), ("obj", r"\w+"),
                         ("a", r"(?P<a>\d+)"), ("b", r"(?P<b>\d+)")):
      regex = regex.replace(re.escape("{%s}" % field), group, 1)
      regex = regex.replace(re.escape("{%s}" % field), r"\w+")
    patterns.append((op, re.compile(regex)))

  def triples(examples):
    out = set()
    for e in examples:
      question = e.prompt[len("Question: "):-len("\nAnswer:")]
      [(op, m)] = [(op, p.fullmatch(question)) for op, p in patterns
                   if p.fullmatch(question)]
      a, b = int(m["a"]), int(m["b"])
      # The gold answer is the arithmetic's, of operands the task draws.
      assert (a, b) in arithmetic._all_operands(op), (op, a, b)
      assert e.gold_number == str(_OPS[op](a, b)), e.prompt
      assert arithmetic.is_test_item(op, a, b) == (examples is test)
      out.add((op, a, b))
    return out

  assert not triples(train) & triples(test)
  for e in train[:50] + test[:50]:
    assert e.target == f" {e.gold_number}" and len(e.target) <= 4
    assert e.prompt.startswith("Question: ") and e.prompt.endswith("Answer:")
  ops = {t for t, _ in arithmetic._TEMPLATES}
  assert ops == {"add", "sub", "mul", "div"}
  with pytest.raises(ValueError, match="cannot make"):
    arithmetic.generate("test", 10**6)


# --- bad inputs: one clear line, nothing written -----------------------------


def test_missing_file(tmp_path):
  before = _listing(tmp_path)
  with pytest.raises(FileNotFoundError, match="data file not found") as e:
    data.load_file(tmp_path / "nope.json", "boolq")
  assert "nope.json" in str(e.value) and "\n" not in str(e.value)
  # A folder had been "not found".
  (tmp_path / "folder.json").mkdir()
  with pytest.raises(FileNotFoundError, match=r"folder.json is a folder, not "
                     r"a data file$"):
    data.load_file(tmp_path / "folder.json", "boolq")
  before = _listing(tmp_path)
  with pytest.raises(FileNotFoundError, match="no test file for task"):
    data.load_task("boolq", "test", data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="trains GSM8K on task 'math'"):
    data.load_task("gsm8k", "train", data_dir=tmp_path)
  assert _listing(tmp_path) == before


def test_malformed_json_names_file_and_position(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text('[\n  {"instruction": "x",\n   "output": oops}\n]')
  bad_lines = tmp_path / "bad.jsonl"
  bad_lines.write_text(json.dumps(_INSTR) + "\n{not json}\n")
  before = _listing(tmp_path)
  with pytest.raises(ValueError) as e:
    data.load_file(bad, "boolq")
  msg = str(e.value)
  assert str(bad) in msg and "line 3 column 14" in msg and "\n" not in msg
  with pytest.raises(ValueError, match=r"bad\.jsonl at line 2 column 2"):
    data.load_file(bad_lines, "boolq")
  (tmp_path / "scalar.json").write_text("3")
  with pytest.raises(ValueError, match="expected a JSON list"):
    data.read_records(tmp_path / "scalar.json")
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(ValueError, match="unsupported data file suffix"):
    data.read_records(tmp_path / "x.csv")
  (tmp_path / "bad.parquet").write_text("not parquet")
  with pytest.raises(ValueError, match="malformed Parquet") as e:
    data.read_records(tmp_path / "bad.parquet")
  assert "\n" not in str(e.value)
  assert _listing(tmp_path) == sorted(before + [
      str(tmp_path / n) for n in ("scalar.json", "x.csv", "bad.parquet")])


def test_unknown_task_and_split(tmp_path):
  for call in (lambda: data.load_task("squad"),
               lambda: data.load_file(tmp_path / "x.json", "squad"),
               lambda: data.examples_from_records([], "squad")):
    with pytest.raises(ValueError, match="unknown task 'squad'; expected one "
                                         "of arc_challenge") as e:
      call()
    assert "\n" not in str(e.value)
  assert data.get_task("ARC-Challenge").name == "arc_challenge"
  assert data.get_task("ARC").name == "arc_challenge"
  assert data.get_task("obqa").name == "openbookqa"
  # '-' reads as '_' in the aliases too ('natural-instructions' had been
  # unknown while 'natural_instructions' was not).
  for alias in ("natural-instructions", "Super-Natural-Instructions",
                "natural_instructions", "superni", "Natural-Instructions",
                "super_natural_instructions"):
    assert data.get_task(alias).name == "superni", alias
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    data.load_task("boolq", "dev")


@pytest.mark.parametrize("task,record,missing", [
    ("boolq", {"instruction": "q"}, "output"),
    ("arc_challenge", {"question": "q", "answerKey": "A"}, "choices"),
    ("openbookqa", {"question": "q", "choices": {}, "answerKey": "A"},
     "question_stem"),
    ("gsm8k", {"question": "q"}, "answer"),
    ("hellaswag", {"ctx": "c", "endings": []}, "label"),
    ("superni", {"definition": "d", "inputs": "i"}, "targets"),
])
def test_record_missing_fields(tmp_path, task, record, missing):
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps(record))
  with pytest.raises(ValueError) as e:
    data.load_file(path, task)
  msg = str(e.value)
  assert f"missing field(s) {missing}" in msg and "r.jsonl line 1:" in msg
  assert "\n" not in msg


def test_a_jsonl_record_is_placed_by_its_line(tmp_path):
  """Blank lines are skipped, so a record's index was not its line."""
  path = tmp_path / "r.jsonl"
  good = {"instruction": "q", "input": "", "output":
          "the correct answer is false", "answer": "false"}
  path.write_text(json.dumps(good) + "\n\n\n" +
                  json.dumps({"instruction": "q"}))
  with pytest.raises(ValueError, match=r"r.jsonl line 4: missing field"):
    data.load_file(path, "boolq")
  path.write_text(json.dumps({k: v for k, v in good.items()
                              if k != "instruction"}))
  with pytest.raises(ValueError, match=r"line 1: missing field\(s\) "
                     r"instruction"):
    data.load_file(path, "boolq")
  # An answer of false (a JSON boolean) is the gold; it had been taken for
  # no answer, and the output's last word read instead.
  path.write_text(json.dumps(dict(good, answer=False)))
  assert data.load_file(path, "boolq")[0].gold_index == 1
  # An answer the output contradicts is refused, not trained on one label
  # and scored against the other.
  path.write_text(json.dumps(dict(good, output="the correct answer is true",
                                  answer=False)))
  with pytest.raises(ValueError, match=r"r.jsonl line 1: answer 'False' but "
                     r"the output ends on the option 'true'"):
    data.load_file(path, "boolq")


def test_bad_gold_labels():
  with pytest.raises(ValueError, match="answer 'maybe' is not one of"):
    data.examples_from_records([dict(_INSTR, answer="maybe")], "boolq")
  arc = {"question": "q", "choices": {"text": ["a"], "label": ["A"]},
         "answerKey": "Z"}
  with pytest.raises(ValueError, match="answerKey 'Z' is not one of"):
    data.examples_from_records([arc], "arc_challenge")
  with pytest.raises(ValueError, match="no '#### N' final number"):
    data.examples_from_records([{"question": "q", "answer": "5"}], "gsm8k")


def test_a_targets_leading_line_breaks_go_to_its_prompt():
  """The same joined text, with the line breaks on the prompt's side (see
  Example): alone, or those that the target and every option start with."""
  e = data.Example("Q:\n", "\n\nA: 5")
  assert (e.prompt, e.target, e.references, e.moved_line_breaks) == (
      "Q:\n\n\n", "A: 5", ("A: 5",), 2)
  c = data.Example("Q:\n", "\nyes", options=("\nyes", "\n\nno"),
                   gold_index=0)
  assert (c.prompt, c.target, c.options, c.moved_line_breaks) == (
      "Q:\n\n", "yes", ("yes", "\nno"), 1)
  kept = data.Example("Q:\n", "\nyes", options=("\nyes", "no"),
                      gold_index=0)
  assert (kept.prompt, kept.target, kept.moved_line_breaks) == (
      "Q:\n", "\nyes", 0)
  assert data.Example("Q:\n", "\nb") == data.Example("Q:\n\n", "b")


def test_a_held_out_prompt_is_found_whatever_its_whitespace():
  """The same question with other runs of spaces, tabs or line breaks is
  the same question: it stays out of training."""
  spaced = data.Example('Q:  what\n is\t2+2?', 'x')
  assert data.prompt_key(spaced) == 'Q: what is 2+2?'
  kept = data.Example('Q: what is 2+3?', 'z')
  assert data.without_prompts_of(
      [spaced, kept], [data.Example('Q: what is 2+2?', 'y')]) == [kept]


def test_a_superni_task_with_several_definitions_joins_them():
  """Every Definition string is the instruction, except in Tk-Instruct's
  own prompt, whose collator takes the first."""
  task = {'Definition': ['First part.', 'Second part.'],
          'Positive Examples': [],
          'Instances': [{'id': '1', 'input': 'x', 'output': ['y']}]}
  [e] = data.examples_from_records([task], 'superni')
  assert 'First part. Second part.' in e.prompt
  [tk] = data.examples_from_records([task], 'superni', style='tk')
  assert 'First part.' in tk.prompt and 'Second part.' not in tk.prompt


def _one(record, task):
  [e] = data.examples_from_records([record], task, style="plain")
  return e


def test_an_empty_answer_field_reads_the_gold_from_the_output():
  e = _one({"instruction": "Is it? \n\nAnswer format: true/false",
            "input": "", "output": "the correct answer is false",
            "answer": ""}, "boolq")
  assert e.labels[e.gold_index] == "false"


def test_a_gsm8k_instruction_record_without_answer_reads_the_output():
  e = _one({"instruction": "How many?", "input": "",
            "output": "2 + 3 = 5. The answer is 5."}, "gsm8k")
  assert e.gold_number == "5"
  e = _one({"instruction": "How many?", "input": "", "answer": None,
            "output": "The answer is 1,234."}, "gsm8k")
  assert e.gold_number == "1234"


def test_hf_answer_key_is_found_by_its_position_not_its_sort_order():
  e = _one({"question": "q", "choices": {"text": ["b", "a", "c"],
                                         "label": ["B", "A", "C"]},
            "answerKey": "A"}, "arc_challenge")
  assert e.gold_index == 1 and e.target.endswith("answer2")


def test_superni_empty_output_list_is_one_line():
  with pytest.raises(ValueError, match="empty output list"):
    _one({"definition": "d", "inputs": "i", "targets": []}, "superni")


def test_hashes_mark_an_answer_only_at_a_line_start():
  assert numbers.extract_final_number(
      "The answer is 12. See note ####3") == "12"


def test_the_answer_marker_is_read_in_any_case():
  assert numbers.extract_final_number("ANSWER IS 7") == "7"
  assert numbers.extract_final_number("Answer is: 9", fallback_to_last=False
                                      ) == "9"


def test_tk_prompt_adds_no_period_after_punctuation_and_shows_two_examples():
  assert templates.tk_instruct_prompt("Is it?", "Why!") == (
      "Definition: Is it?\n\nNow complete the following example -\n"
      "Input: Why!\nOutput: ")
  shown = templates.tk_instruct_prompt(
      "D.", "x", [("a", "1"), ("b", "2"), ("c", "3")])
  assert "Positive Example 2" in shown and "Positive Example 3" not in shown


def test_answer_format_line_edge_cases():
  assert templates.parse_answer_format("Answer format: true/false/") == (
      "true", "false")
  assert templates.parse_answer_format(
      "Answer format: a/b\nNote: c/d") == ("a", "b")
  assert templates.listed_labels("Q Answer1: x Answer3: y") == ()
  assert templates.parse_choices(
      "Answer1: x Answer2: y", ("answer1", "answer2", "answer3")) == ()


def test_math_target_joins_a_multi_line_rationale():
  assert templates.math_target("a = 1\n\n  b = 2\n", "5") == (
      "\nA: a = 1 b = 2 The answer is 5.")


def test_split_validation_keeps_a_training_example_and_refuses_all():
  two = [data.Example("p1", "t"), data.Example("p2", "t")]
  train, val = data.split_validation(two, 0.9)
  assert len(train) == 1 and len(val) == 1
  with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
    data.split_validation(two, 1.0)


def test_num_examples_keeps_the_first_ones(tmp_path):
  path = tmp_path / "test.jsonl"
  path.write_text("".join(json.dumps({"question": f"q{i}", "answer": True})
                          + "\n" for i in range(5)))
  got = data.load_task("boolq", "test", path=path, num_examples=2)
  assert [e.prompt for e in got] == [
      e.prompt for e in data.load_task("boolq", "test", path=path)[:2]]


def test_a_json_list_item_that_is_not_an_object_is_one_line(tmp_path):
  path = tmp_path / "test.json"
  path.write_text(json.dumps([{"question": "q", "answer": True}, 5]))
  with pytest.raises(ValueError, match=r"record 1 is a int, expected an "
                     "object"):
    data.load_file(path, "boolq")


def test_an_upper_case_suffix_is_read(tmp_path):
  path = tmp_path / "TEST.JSON"
  path.write_text(json.dumps([{"question": "q", "answer": True}]))
  assert len(data.load_file(path, "boolq")) == 1


def test_example_invariants():
  with pytest.raises(ValueError, match="outside its 2 options"):
    data.Example("p", "t", options=("a", "b"), gold_index=2)
  with pytest.raises(ValueError, match="2 options but 1 labels"):
    data.Example("p", "t", options=("a", "b"), labels=("x",))


def test_references_default_to_the_target_before_spaces_move():
  assert data.Example("Output: ", "yes").references == ("yes",)


def test_a_new_prompt_forgets_the_moved_line_breaks():
  e = data.Example("p", "\nA")
  assert dataclasses.replace(e, prompt="q").as_before_2026_12_07() == (
      "q", "A")


def test_arithmetic_is_pinned_and_bounded():
  assert arithmetic.generate("train", 1, 0)[0].prompt == (
      "Question: There are 9 rows of cookies with 7 cookies in each row. "
      "How many cookies are there?\nAnswer:")
  assert arithmetic.generate("test", 1, 0)[0].prompt == (
      "Question: A basket holds 37 cookies. Omar takes out 36. How many "
      "cookies are left in the basket?\nAnswer:")
  limit = arithmetic.capacity("test") // 2
  with pytest.raises(ValueError, match=f"at most {limit}"):
    arithmetic.generate("test", limit + 1)


def _superni_rows(tasks, n):
  """Hub rows (Muennighoff/natural-instructions' shape): n instances of
  each task, their inputs '<task>-<i>'."""
  return [{"task_name": t, "definition": f"Do {t}.", "inputs": f"{t}-{i}",
           "targets": "x"} for t in tasks for i in range(n)]


def _inputs(examples):
  return [e.prompt.split("### Input:\n")[1].split("\n")[0] for e in examples]


def test_max_per_task_keeps_a_test_tasks_first_and_samples_a_training_tasks(
    tmp_path):
  """Tk-Instruct's 100 instances per SuperNI task: a test task's first ones
  (the official evaluation instances), a seeded sample of a training
  task's, kept in file order, whatever other tasks the file holds."""
  folder = tmp_path / "superni"
  folder.mkdir()
  rows = _superni_rows(("t1", "t2", "t3"), 6)
  for split in ("train", "test"):
    (folder / f"{split}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:14]))  # t3: 2 of them
  load = lambda split, **kw: data.load_task(
      "superni", split, path=folder, validation_fraction=0, **kw)
  assert _inputs(load("test", max_per_task=3)) == [
      "t1-0", "t1-1", "t1-2", "t2-0", "t2-1", "t2-2", "t3-0", "t3-1"]
  sample = _inputs(load("train", max_per_task=3))
  assert [s.split("-")[0] for s in sample] == ["t1"] * 3 + ["t2"] * 3 + [
      "t3"] * 2
  assert sample == sorted(sample) and len(set(sample)) == 8
  assert sample != _inputs(load("test", max_per_task=3))  # not the first
  assert sample != _inputs(load("train", max_per_task=3, seed=1))
  # A task's sample is drawn by its name: the same without the others.
  (folder / "train.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows[6:12]))
  assert _inputs(load("train", max_per_task=3)) == sample[3:6]
  # Before the validation carve, which then takes from the kept ones.
  carved = [data.load_task("superni", split, path=folder, max_per_task=3,
                           validation_fraction=0.5)
            for split in ("train", "validation")]
  assert sorted(_inputs(carved[0] + carved[1])) == sample[3:6]
  assert len(load("train", max_per_task=100)) == 6


def test_max_per_task_reads_each_task_file_as_one_task_and_refuses_nameless(
    tmp_path):
  task_file = {"Definition": ["Answer."], "Positive Examples": [],
               "Instances": [{"id": str(i), "input": f"q{i}", "output": ["a"]}
                             for i in range(5)]}
  path = tmp_path / "tasks.json"
  path.write_text(json.dumps([task_file, task_file]))  # two task objects
  got = data.load_task("superni", "test", path=path, max_per_task=2)
  assert [e.prompt.count("q0") + e.prompt.count("q1") for e in got] == [1] * 4
  instance = {"Task": "task001", "Definition": ["Answer."],
              "Positive Examples": [], "Instance": task_file["Instances"][0]}
  [one] = data.examples_from_records([instance], "superni")
  assert one.subtask == "task001"
  nameless = tmp_path / "test.jsonl"
  nameless.write_text(json.dumps({"definition": "d", "inputs": "i",
                                  "targets": "t"}) + "\n")
  with pytest.raises(ValueError, match=r"^max_per_task caps SuperNI's tasks, "
                     r"but 1 of the 1 examples name none \(a Hub row names "
                     r"its task in 'task_name'"):
    data.load_task("superni", "test", path=nameless, max_per_task=2)
  for bad in (0, -1, 1.5):
    with pytest.raises(ValueError, match="max_per_task must be None"):
      data.load_task("superni", "test", path=nameless, max_per_task=bad)

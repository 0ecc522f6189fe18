"""Malformed records are refused in one line naming the file and record; the
'Answer format:' labels compare ignoring case."""

import json

import pytest

from train import data

from tests.shared_data import DATA_DIR, needs_data  # pylint: disable=g-importing-member

_HS = {"ctx": "A man is sitting.", "label": "2",
       "endings": ["stands.", "runs.", "sleeps.", "eats."]}
_ARC = {"question": "Which is a metal?", "answerKey": "B",
        "choices": {"text": ["wood", "iron", "glass"],
                    "label": ["A", "B", "C"]}}
_BOOLQ = {"instruction": "Please answer the following question with true or "
                         "false, question: is the sky blue?\n\nAnswer format: "
                         "true/false",
          "input": "", "output": "the correct answer is true",
          "answer": "true"}
_TASK_FILE = {"Definition": ["Answer yes or no."],
              "Instances": [{"id": "1", "input": "a?", "output": ["yes"]}]}


def _refused(tmp_path, task, records, *expected, name="r.json"):
  """Writes `records` to a file, loads it, returns the one-line message."""
  path = tmp_path / name
  if name.endswith(".jsonl"):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
  else:
    path.write_text(json.dumps(records))
  with pytest.raises(ValueError) as e:
    data.load_file(path, task)
  msg = str(e.value)
  assert "\n" not in msg
  for part in expected:
    assert part in msg, (part, msg)
  return msg


# --- 1. malformed records -----------------------------------------------------


@pytest.mark.parametrize("label,expected", [
    ("4", "label '4' is out of range for 4 endings (0 to 3)"),
    (-1, "label -1 is out of range for 4 endings"),
    ("B", "label 'B' is not an ending index (0 to 3, or '' when unlabelled)"),
    (None, "label null is not an ending index"),
    (True, "label True is not an ending index"),
])
def test_hellaswag_bad_label(tmp_path, label, expected):
  _refused(tmp_path, "hellaswag", [_HS, dict(_HS, label=label)],
           "r.json record 1: ", expected, "for task 'hellaswag'")


def test_hellaswag_bad_endings(tmp_path):
  _refused(tmp_path, "hellaswag", [dict(_HS, endings=None)],
           "r.json record 0: field 'endings' must be a list of strings for "
           "task 'hellaswag', got null")
  _refused(tmp_path, "hellaswag", [dict(_HS, endings=["a", None])],
           "r.json record 0: field 'endings' item 1 must be a string")
  _refused(tmp_path, "hellaswag", [dict(_HS, endings=[], label="")],
           "r.json record 0: field 'endings' is empty")
  _refused(tmp_path, "hellaswag", [dict(_HS, ctx=None)],
           "r.json record 0: field 'ctx' must be a string")
  # Still read: an int label, and '' for the unlabelled test split.
  examples = data.examples_from_records(
      [dict(_HS, label=3), dict(_HS, label=""), dict(_HS, label=" 0 ")],
      "hellaswag")
  assert [e.gold_index for e in examples] == [3, None, 0]


def test_arc_bad_choices(tmp_path):
  _refused(tmp_path, "arc_challenge",
           [_ARC, dict(_ARC, choices={"text": None, "label": ["A"]})],
           "r.json record 1: field 'choices.text' must be a list of strings "
           "for task 'arc_challenge', got null")
  _refused(tmp_path, "arc_challenge",
           [dict(_ARC, choices={"text": ["a", None], "label": ["A", "B"]})],
           "r.json record 0: field 'choices.text' item 1 must be a string")
  more_labels = {"text": ["wood", "iron"], "label": ["A", "B", "C"]}
  _refused(tmp_path, "arc_challenge",
           [dict(_ARC, choices=more_labels, answerKey="C")],
           "r.json record 0: field 'choices' has 2 text(s) but 3 label(s)")
  _refused(tmp_path, "arc_challenge",
           [dict(_ARC, choices={"text": ["a", "b"], "label": None})],
           "r.json record 0: field 'choices.label' must be a list")
  _refused(tmp_path, "arc_challenge",
           [dict(_ARC, choices={"text": ["a", "b"], "label": ["A", "A"]},
                 answerKey="A")],
           "r.json record 0: field 'choices.label' repeats a label")
  _refused(tmp_path, "openbookqa",
           [{"question_stem": None, "answerKey": "A",
             "choices": {"text": ["a"], "label": ["A"]}}],
           "r.json record 0: field 'question_stem' must be a string")


def test_superni_bad_instances(tmp_path):
  bad = dict(_TASK_FILE, Instances=[{"input": "a?", "output": ["yes"]},
                                    "b?"])
  _refused(tmp_path, "superni", bad,
           "task.json record 0 instance 1: expected an object with 'input' "
           "and 'output' for task 'superni', got 'b?'", name="task.json")
  _refused(tmp_path, "superni", dict(_TASK_FILE, Instances=None),
           "task.json record 0: field 'Instances' must be a list of objects "
           "for task 'superni', got null", name="task.json")
  _refused(tmp_path, "superni",
           dict(_TASK_FILE, Instances=[{"input": "a?", "output": 3}]),
           "task.json record 0 instance 0: the output must be a list of "
           "strings", name="task.json")
  _refused(tmp_path, "superni",
           dict(_TASK_FILE, Instances=[{"input": ["a?"], "output": ["y"]}]),
           "task.json record 0 instance 0: the input must be a string",
           name="task.json")
  _refused(tmp_path, "superni", dict(_TASK_FILE, Definition=None),
           "task.json record 0: field 'Definition' must be a list of strings",
           name="task.json")
  _refused(tmp_path, "superni",
           [{"definition": "d", "inputs": "i", "targets": ["a", None]}],
           "r.json record 0: the output item 1 must be a string")


@pytest.mark.parametrize("key,value,expected", [
    ("label", None, "label null is not a boolean, 'true'/'false' or 1/0"),
    ("label", -1, "label -1 (an unlabelled record) is not a boolean"),
    ("label", 2, "label 2 is not a boolean"),
    ("label", 1.0, "label 1.0 is not a boolean"),
    ("answer", "yes", "answer 'yes' is not a boolean"),
    ("answer", [True], "answer a list is not a boolean"),
])
def test_boolq_bad_label(tmp_path, key, value, expected):
  _refused(tmp_path, "boolq", [{"question": "is fire cold", key: value}],
           "r.jsonl line 1: ", expected, "for task 'boolq'",
           name="r.jsonl")


def test_boolq_good_labels():
  values = [("answer", True), ("answer", False), ("label", 1), ("label", 0),
            ("answer", "True"), ("label", "false")]
  examples = data.examples_from_records(
      [{"question": "q", k: v} for k, v in values], "boolq")
  assert [e.gold_index for e in examples] == [0, 1, 0, 1, 0, 1]


def test_instruction_output_and_input_must_be_strings(tmp_path):
  for task in ("boolq", "gsm8k", "superni"):
    _refused(tmp_path, task, [dict(_BOOLQ, output=None)],
             "r.json record 0: field 'output' must be a string for task "
             f"{task!r}, got null")
  _refused(tmp_path, "boolq", [_BOOLQ, dict(_BOOLQ, output=["x"])],
           "r.json record 1: field 'output' must be a string", "got a list")
  _refused(tmp_path, "boolq", [dict(_BOOLQ, instruction=None)],
           "r.json record 0: field 'instruction' must be a string")
  _refused(tmp_path, "boolq", [dict(_BOOLQ, input=5)],
           "r.json record 0: field 'input' must be a string or null")
  [e] = data.examples_from_records([dict(_BOOLQ, input=None)], "boolq")
  assert e.gold_index == 0


def test_gsm8k_fields_must_be_strings(tmp_path):
  _refused(tmp_path, "gsm8k", [{"question": None, "answer": "x\n#### 3"}],
           "r.json record 0: field 'question' must be a string")
  _refused(tmp_path, "gsm8k", [{"question": "q", "answer": 3}],
           "r.json record 0: field 'answer' must be a string")


def test_hub_source_is_named():
  with pytest.raises(ValueError) as e:
    data.examples_from_records([_HS, dict(_HS, label="9")], "hellaswag",
                               source="hub:Rowan/hellaswag")
  assert str(e.value).startswith("hub:Rowan/hellaswag record 1: label '9'")


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_latin1_file_is_named(tmp_path, suffix):
  record = dict(_BOOLQ, instruction=_BOOLQ["instruction"].replace(
      "sky", "caf\u00e9's sky"))
  text = (json.dumps([_BOOLQ, record], ensure_ascii=False, indent=1)
          if suffix == "json" else
          json.dumps(_BOOLQ) + "\n" + json.dumps(record, ensure_ascii=False))
  path = tmp_path / f"latin.{suffix}"
  path.write_bytes(text.encode("latin-1"))
  with pytest.raises(ValueError) as e:
    data.load_file(path, "boolq")
  msg = str(e.value)
  assert msg.startswith(f"{path} is not valid UTF-8 at line ")
  assert "byte 0xe9" in msg and "must be UTF-8" in msg and "\n" not in msg
  if suffix == "jsonl":
    assert "at line 2 " in msg
  # The same text in UTF-8 reads.
  path.write_bytes(text.encode("utf-8"))
  assert len(data.load_file(path, "boolq")) == 2


def test_jsonl_newlines_read_as_before(tmp_path):
  path = tmp_path / "crlf.jsonl"
  path.write_bytes(b"\r\n".join(json.dumps(r).encode()
                                for r in (_BOOLQ, _BOOLQ)) + b"\r\n\r\n")
  assert len(data.load_file(path, "boolq")) == 2
  path.write_bytes(json.dumps(_BOOLQ).encode() + b"\r{bad}\n")
  with pytest.raises(ValueError, match=r"crlf\.jsonl at line 2 column 2"):
    data.load_file(path, "boolq")
  # A line cut short: the error at its end, not at column 1.
  path.write_bytes(json.dumps(_BOOLQ).encode() + b'\n{"instruction": \n')
  with pytest.raises(ValueError, match=r"crlf\.jsonl at line 2 column 17"):
    data.load_file(path, "boolq")


# --- 2. 'Answer format:' labels ignore case ----------------------------------


def test_answer_format_true_false_any_case(tmp_path):
  instruction = _BOOLQ["instruction"].replace("true/false", "True/False")
  recs = [dict(_BOOLQ, instruction=instruction, answer="True",
               output="the correct answer is True"),
          dict(_BOOLQ, instruction=instruction, answer="false",
               output="the correct answer is False"),
          dict(_BOOLQ, instruction=instruction, answer=None,
               output="the correct answer is FALSE")]
  path = tmp_path / "b.json"
  path.write_text(json.dumps(recs))
  yes, no, no2 = data.load_file(path, "boolq")
  assert (yes.gold_index, no.gold_index, no2.gold_index) == (0, 1, 1)
  # The labels and options keep the file's case: the option scored as gold
  # is the target trained on.
  assert yes.labels == yes.choices == ("True", "False")
  assert yes.target == yes.options[yes.gold_index]
  assert no.target == no.options[no.gold_index]
  msg = _refused(tmp_path, "boolq",
                 [dict(recs[0], answer="maybe")],
                 "r.json record 0: answer 'maybe' is not one of the options "
                 "True/False (in any case) for task 'boolq'")
  assert "'True' is not one of" not in msg


def test_answer_format_letters_any_case(tmp_path):
  instruction = ("Please choose the correct answer to the question: q\n\n"
                 "Answer1: x Answer2: y\n\nAnswer format: A/B")
  recs = [{"instruction": instruction, "input": "",
           "output": "the correct answer is A", "answer": "A"},
          {"instruction": instruction, "input": "",
           "output": "the correct answer is B", "answer": "b"}]
  path = tmp_path / "arc.json"
  path.write_text(json.dumps(recs))
  a, b = data.load_file(path, "arc_challenge")
  assert (a.gold_index, b.gold_index) == (0, 1)
  assert a.labels == ("A", "B") and a.target == a.options[0]
  _refused(tmp_path, "arc_challenge", [dict(recs[0], answer="C")],
           "r.json record 0: answer 'C' is not one of the options A/B")
  # Capitalised 'Answer1/Answer2' labels still find the option texts.
  upper = dict(recs[0], instruction=instruction.replace(
      "A/B", "Answer1/Answer2"), answer="answer2")
  [e] = data.examples_from_records([upper], "arc_challenge")
  assert e.gold_index == 1 and e.choices == ("x", "y")
  # Labels equal but for case cannot tell the gold apart.
  _refused(tmp_path, "arc_challenge",
           [dict(recs[0], instruction=instruction.replace("A/B", "A/a"))],
           "r.json record 0: the options A/a repeat a label (labels ignore "
           "case)")


@needs_data
@pytest.mark.parametrize("task,file", [("boolq", "boolq/test.json"),
                                       ("arc_challenge",
                                        "ARC-Challenge/test.json")])
def test_shipped_records_in_upper_case_keep_their_golds(task, file):
  recs = json.loads((DATA_DIR / file).read_text())
  upper = []
  for r in recs:
    head, sep, fmt = r["instruction"].rpartition("Answer format: ")
    upper.append(dict(r, instruction=head + sep + fmt.title(),
                      answer=r["answer"].upper()))
  before = data.examples_from_records(recs, task)
  after = data.examples_from_records(upper, task)
  assert [e.gold_index for e in before] == [e.gold_index for e in after]
  # The option texts too (BoolQ's are its labels, in the file's case).
  assert [tuple(c.lower() for c in e.choices) for e in before] == [
      tuple(c.lower() for c in e.choices) for e in after]
  # The gold option is the target trained on, whatever case the format
  # line has (the options had been '... True' against targets '... true').
  assert all(e.target == e.options[e.gold_index] for e in before)
  assert all(e.target == e.options[e.gold_index] for e in after)
  assert [e.options for e in before] == [e.options for e in after]


def test_options_are_worded_as_the_output(tmp_path):
  """Each option is the output with its gold label swapped, in the output's
  case and punctuation; an output not ending on its label keeps the
  template's options."""
  instruction = ("Please choose the correct answer to the question: q\n\n"
                 "Answer1: x Answer2: y Answer3: z\n\nAnswer format: "
                 "answer1/answer2/answer3")
  recs = [dict(_BOOLQ, output="the correct answer is true", answer="true",
               instruction=_BOOLQ["instruction"].replace("true/false",
                                                         "True/False")),
          {"instruction": instruction, "input": "",
           "output": "The correct answer is Answer2.", "answer": "answer2"},
          {"instruction": instruction, "input": "",
           "output": "Answer2 is right", "answer": "answer2"}]
  (path := tmp_path / "r.json").write_text(json.dumps(recs[:1]))
  [yes] = data.load_file(path, "boolq")
  assert yes.options == ("the correct answer is true",
                         "the correct answer is false")
  path.write_text(json.dumps(recs[1:]))
  two, other = data.load_file(path, "arc_challenge")
  assert two.options == ("The correct answer is Answer1.",
                         "The correct answer is Answer2.",
                         "The correct answer is Answer3.")
  assert two.target == two.options[two.gold_index]
  assert other.options == tuple(f"the correct answer is answer{i}"
                                for i in (1, 2, 3))
  # The label must be a word of its own: 'A' also ends 'Banana'.
  letters = ("Please choose the correct answer to the question: q\n\n"
             "Answer1: x Answer2: y\n\nAnswer format: A/B")
  path.write_text(json.dumps([{"instruction": letters, "input": "",
                               "output": "A. Banana", "answer": "A"}]))
  [banana] = data.load_file(path, "arc_challenge")
  assert banana.options == ("the correct answer is A",
                            "the correct answer is B")


def test_a_label_written_against_cjk_text_is_its_gold_and_options(tmp_path):
  """'答案是B。' ends on B: without an answer field it is the gold (it had
  been refused as '答案是B。' not being an option), the options are worded
  as it (they had been the English template), and an answer field that
  disagrees is refused, as 'the answer is B' with answer C is."""
  instruction = ("Please choose the correct answer to the question: q\n\n"
                 "Answer1: x Answer2: y\n\nAnswer format: A/B")
  cjk = "\u7b54\u6848\u662f"  # 'the answer is'
  rec = {"instruction": instruction, "input": "", "output": cjk + "B\u3002"}
  [e] = data.examples_from_records([rec], "arc_challenge")
  assert e.gold_index == 1
  assert e.options == (cjk + "A\u3002", cjk + "B\u3002")
  assert e.target == e.options[e.gold_index]
  # As English with a full stop ('B.' had been read as no option).
  [e] = data.examples_from_records(
      [dict(rec, output="The answer is B.")], "arc_challenge")
  assert e.gold_index == 1
  _refused(tmp_path, "arc_challenge", [dict(rec, answer="A")],
           "r.json record 0: answer 'A' but the output ends on the option "
           "'b'")


@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("sep", [" ", "\n"])
def test_without_an_answer_format_line_the_listed_options_count(tmp_path, n,
                                                                 sep):
  """No 'Answer format:' line: the labels are the options the instruction
  lists, not a fixed four (a 3-way question had been scored with an
  'answer4', a 5-way one refused or scored 4-way)."""
  options = sep.join(f"Answer{i}: o{i}" for i in range(1, n + 1))
  rec = {"instruction": f"Please choose the correct answer to the question: "
                        f"q?\n\n{options}",
         "input": "", "output": f"the correct answer is answer{n}",
         "answer": f"answer{n}"}
  (path := tmp_path / "r.json").write_text(json.dumps([rec]))
  [e] = data.load_file(path, "arc_challenge")
  assert e.labels == tuple(f"answer{i}" for i in range(1, n + 1))
  if sep == " ":  # option texts are read off one line only
    assert e.choices == tuple(f"o{i}" for i in range(1, n + 1))
  assert e.gold_index == n - 1 and e.target == e.options[-1]
  # A format line that disagrees with the options listed is refused.
  _refused(tmp_path, "arc_challenge", [dict(
      rec, instruction=rec["instruction"] + "\n\nAnswer format: "
      "answer1/answer2/answer3/answer4/answer5/answer6", answer="answer1")],
           f"r.json record 0: the instruction lists {n} options (answer1 to "
           f"answer{n}, any case) but its 'Answer format:' line has 6")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_utf8_file_with_a_byte_order_mark_loads(tmp_path, suffix):
  text = (json.dumps([_BOOLQ]) if suffix == ".json" else
          json.dumps(_BOOLQ) + "\n")
  path = tmp_path / f"bom{suffix}"
  path.write_bytes(b"\xef\xbb\xbf" + text.encode())
  plain = tmp_path / f"plain{suffix}"
  plain.write_text(text)
  assert data.load_file(path, "boolq") == data.load_file(plain, "boolq")
  # A bad byte after the mark is placed in the file, mark included.
  path.write_bytes(b"\xef\xbb\xbf[\n\n\xe9]")
  with pytest.raises(ValueError) as e:
    data.load_file(path, "boolq")
  assert str(e.value) == (f"{path} is not valid UTF-8 at line 3 (byte 0xe9 "
                          "at offset 6): data files must be UTF-8 encoded")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_half_an_emoji_is_refused_naming_the_record(tmp_path, suffix):
  """A lone UTF-16 surrogate ('\\ud83d', an emoji cut in two by an exporter)
  is valid JSON, but no tokenizer encodes it: sentencepiece had failed in
  a 30-line traceback at the first prompt. Whole pairs still load."""
  good = dict(_BOOLQ, input="smile \U0001f600")
  bad = dict(_BOOLQ, input="smile \ud83d")
  path = tmp_path / f"r{suffix}"
  dump = (lambda recs: json.dumps(recs) if suffix == ".json" else
          "".join(json.dumps(r) + "\n" for r in recs))
  path.write_text(dump([good, good]))
  assert "\\ud83d\\ude00" in path.read_text()  # as json.dumps escapes it
  assert "smile \U0001f600\n" in data.load_file(path, "boolq")[0].prompt
  path.write_text(dump([good, bad]))
  with pytest.raises(ValueError) as e:
    data.load_file(path, "boolq")
  where = "record 1" if suffix == ".json" else "line 2"
  assert str(e.value) == (
      f"{path}: {where}, field 'input' holds \\ud83d, half of a UTF-16 pair "
      "(a character such as an emoji cut in two): data files must hold "
      "whole characters")


def test_an_empty_file_or_a_path_and_a_hub_are_refused(tmp_path):
  """An empty data file is named (it had ended in 'cannot carve a
  validation set out of 0 example(s)'); a path and a Hub id together are
  refused (the path had been ignored)."""
  (path := tmp_path / "empty.json").write_text("[]")
  # An empty `.json` had been "malformed JSON ... Expecting value".
  (blank := tmp_path / "blank.json").write_text("\n")
  for split, file in (("train", path), ("test", path), ("test", blank)):
    with pytest.raises(ValueError) as e:
      data.load_task("boolq", split, path=file)
    assert str(e.value) == f"{file} holds no records for task 'boolq'"
  with pytest.raises(ValueError) as e:
    data.load_task("boolq", "test", path=path, hub=True)
  assert str(e.value) == (f"give a local path or a Hub dataset, not both "
                          f"(path {path}, hub True)")


def test_one_example_names_the_way_out_of_the_validation_carve(tmp_path):
  (path := tmp_path / "one.json").write_text(json.dumps([_BOOLQ]))
  with pytest.raises(ValueError) as e:
    data.load_task("boolq", "train", path=path)
  assert str(e.value) == ("cannot carve a validation set out of 1 example(s) "
                          "(validation_fraction 0 trains on all of them)")
  assert len(data.load_task("boolq", "train", path=path,
                            validation_fraction=0)) == 1

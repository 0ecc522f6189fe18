"""Reading raw records (dicts) from local JSON, JSONL and Parquet files.

Format is chosen by suffix. Every failure is raised as one line that names
the file and, for malformed JSON, the line and column.
"""

from __future__ import annotations

import codecs
import importlib.util
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from train.errors import first_line

Record = dict[str, Any]

SUFFIXES = (".json", ".jsonl", ".parquet")


def read_records(path: str | os.PathLike[str]) -> list[Record]:
  """Reads a list of records from a local file.

  Args:
    path: A `.json` file (a list of objects, one object such as a
      Super-Natural Instructions task file, or one object a line as Hugging
      Face `Dataset.to_json` writes), a `.jsonl` file (one object a line;
      blank lines skipped) or a `.parquet` file (needs pyarrow).

  Returns:
    The records, as dicts, in file order.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: unknown suffix, malformed content, text that is not UTF-8,
      or a record that is not an object.
  """
  return read_placed_records(path)[0]


def read_placed_records(path: str | os.PathLike[str]
                        ) -> tuple[list[Record], list[str]]:
  """`read_records`' records and where each one is in the file, for error
  messages: "line 4" in JSONL (blank lines skipped, so a count of records
  would not find it), "record 0" in a JSON list, "row 0" in Parquet."""
  path = Path(path)
  if path.is_dir():
    raise FileNotFoundError(f"{path} is a folder, not a data file")
  if not path.is_file():
    raise FileNotFoundError(f"data file not found: {path}")
  suffix = path.suffix.lower()
  if suffix in (".json", ".jsonl"):
    text = _read_text(path)
    records = _read_json(path, text) if suffix == ".json" else None
    if records is not None:
      places = [f"record {i}" for i in range(len(records))]
    else:
      # A `.jsonl`, or a `.json` of JSON Lines: what Hugging Face
      # `Dataset.to_json` writes by default.
      placed = _read_jsonl(path, text)
      records, places = [r for _, r in placed], [f"line {n}" for n, _ in placed]
    if _SURROGATE_ESCAPE.search(text):
      _check_whole_characters(path, records, places)
    return records, places
  if suffix == ".parquet":
    records = _read_parquet(path)
    return records, [f"row {i}" for i in range(len(records))]
  raise ValueError(
      f"unsupported data file suffix {suffix!r} for {path}; expected one of "
      f"{', '.join(SUFFIXES)}")


def _read_text(path: Path) -> str:
  """The file's text, newlines translated as a text-mode open() does; a file
  that is not UTF-8 (e.g. latin-1) is one line naming the file and where its
  first bad byte is."""
  raw = path.read_bytes()
  # A byte-order mark (as Windows tools write) is not text.
  bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
  try:
    return raw[bom:].decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
  except UnicodeDecodeError as e:
    start = bom + e.start  # an offset in the file, mark included
    lineno = raw.count(b"\n", 0, start) + 1
    raise ValueError(
        f"{path} is not valid UTF-8 at line {lineno} (byte "
        f"0x{raw[start]:02x} at offset {start}): data files must be "
        "UTF-8 encoded") from None


# A JSON escape of half a UTF-16 pair: '\\ud83d' alone (an exporter that
# cut a string between the two halves of an emoji) decodes to a str that
# no tokenizer can encode; sentencepiece then failed in a 30-line
# traceback far from the file.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_whole_characters(path: Path, records: list[Record],
                            places: list[str]) -> None:
  """Raises one line naming the record and field of the first string that
  holds half a UTF-16 pair."""
  def bad(value) -> str | None:
    if isinstance(value, str):
      try:
        value.encode("utf-8")
      except UnicodeEncodeError as e:
        return f"\\u{ord(value[e.start]):04x}"
      return None
    items = (value.items() if isinstance(value, dict) else
             enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
      found = bad(key) or bad(item)
      if found:
        return found
    return None

  for record, place in zip(records, places):
    for key, value in record.items():
      found = bad(key) or bad(value)
      if found:
        raise ValueError(
            f"{path}: {place}, field {key!r} holds {found}, half of a "
            "UTF-16 pair (a character such as an emoji cut in two): data "
            "files must hold whole characters")


def _read_json(path: Path, text: str) -> list[Record] | None:
  """The records of JSON file ``path`` (its ``text``), or None where it
  holds JSON Lines."""
  if not text.strip():
    return []  # as an empty `.jsonl` file is
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    if (e.msg == "Extra data" and e.colno == 1 and
        text.lstrip().startswith("{")):
      return None  # an object, then more on the next line: JSON Lines
    raise ValueError(
        f"malformed JSON in {path} at line {e.lineno} column {e.colno}: "
        f"{e.msg}") from None
  if isinstance(data, dict):
    # A single object: e.g. one SuperNI task file ({"Definition", "Instances"}).
    data = [data]
  if not isinstance(data, list):
    raise ValueError(
        f"{path}: expected a JSON list of objects, got {type(data).__name__}")
  for i, record in enumerate(data):
    if not isinstance(record, dict):
      raise ValueError(
          f"{path}: record {i} is a {type(record).__name__}, expected an "
          "object")
  return data


def _read_jsonl(path: Path, text: str) -> list[tuple[int, Record]]:
  """(line number, record) of every non-blank line of ``path``'s
  ``text``."""
  records = []
  with io.StringIO(text) as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        # Without its line break: an error at the line's end had been
        # placed at column 1 (of the next line, in json's view).
        record = json.loads(line.rstrip("\r\n"))
      except json.JSONDecodeError as e:
        raise ValueError(
            f"malformed JSON in {path} at line {lineno} column {e.colno}: "
            f"{e.msg}") from None
      if not isinstance(record, dict):
        raise ValueError(
            f"{path}: line {lineno} is a {type(record).__name__}, expected an "
            "object")
      records.append((lineno, record))
  return records


def _read_parquet(path: Path) -> list[Record]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if importlib.util.find_spec("pyarrow") is not None:
      # Installed but broken (pyarrow 15 under NumPy 2): "needs pyarrow"
      # had sent the user to install what they have.
      raise ImportError(
          f"reading {path}: pyarrow is installed but fails to import "
          f"({first_line(e)}); upgrade it: pip install -U pyarrow") from None
    raise ImportError(
        f"reading {path} needs pyarrow; install it with `pip install pyarrow` "
        "(part of the [train] extra)") from None
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises several unrelated types.
    raise ValueError(f"malformed Parquet file {path}: {first_line(e)}"
                     ) from None
  return table.to_pylist()

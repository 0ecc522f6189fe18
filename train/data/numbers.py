"""Finding and normalising the final number of a math answer.

Shared by the loaders (to read the gold number out of a target text) and by
`train.evaluate` (to read the predicted number out of a generation), so that
gold and prediction go through exactly the same normalisation.
"""

from __future__ import annotations

import math
import re

# A number as written in answers: optional sign and '$', thousands commas,
# optional decimals; also '.5'.
_NUMBER = r"-?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
# After an answer marker also thousands grouped by spaces ('$9 500', as in
# some GSM8K solutions) and a fraction ('29/3'): read whole, not as '9' or
# '29'.
_MARKED = (r"-?\$?\s?(?:\d{1,3}(?:[ \u00a0]\d{3})+(?![\d,.]\d)"
           r"|\d[\d,]*(?:\.\d+)?/\d+(?:\.\d+)?"
           r"|\d[\d,]*(?:\.\d+)?|\.\d+)")
_HASHES_RE = re.compile(r"####\s*(" + _MARKED + ")")
_ANSWER_IS_RE = re.compile(
    r"answer\s+is\s*:?\s*(?:\\boxed\{)?\s*(" + _MARKED + ")", re.IGNORECASE)


def canonical_number(text: str | float | int | None) -> str | None:
  """Returns `text` as a canonical number string, or None if it is not one.

  Drops '$', thousands commas, a trailing '.', '%' and surrounding space;
  integers lose a trailing '.0' ('576.0' -> '576'); other values are written
  with up to 6 significant decimals ('0.50' -> '0.5').

  Args:
    text: A number as a string ('$1,234.00'), or a Python number.

  Returns:
    The canonical string, or None if `text` does not hold a finite number.
  """
  if text is None:
    return None
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value = float(text)
  else:
    cleaned = str(text).strip().replace("$", "").replace(",", "")
    cleaned = cleaned.replace(" ", "").replace("\u00a0", "").rstrip(".%")
    try:
      value = float(cleaned)
    except ValueError:
      return None
  if not math.isfinite(value):
    return None
  if value == int(value) and abs(value) < 1e15:
    return str(int(value))
  return f"{value:.6f}".rstrip("0").rstrip(".")


def _marked_value(text: str) -> str | None:
  """A marked answer: a number, or a fraction 'a/b' as its value."""
  if "/" not in text:
    return canonical_number(text)
  num, den = (canonical_number(part) for part in text.split("/"))
  if num is None or den is None or float(den) == 0:
    return None
  return canonical_number(float(num) / float(den))


def extract_final_number(text: str, *, fallback_to_last: bool = True
                         ) -> str | None:
  """Returns the final answer number in `text`, canonicalised.

  Looks, in order, for '#### N' (GSM8K's own format), the last 'the answer
  is N' (the LLM-Adapters chain-of-thought format), and, when
  `fallback_to_last`, the last number anywhere in the text.

  Args:
    text: A target or a model generation.
    fallback_to_last: Whether to fall back to the last number in the text when
      neither marker is present. Gold answers are read with False, so a
      target without a marker gives no gold rather than a guess.

  Returns:
    The canonical number string (see `canonical_number`), or None.
  """
  for pattern in (_HASHES_RE, _ANSWER_IS_RE):
    matches = pattern.findall(text)
    if matches:
      return _marked_value(matches[-1])
  if not fallback_to_last:
    return None
  matches = _NUMBER_RE.findall(text)
  return canonical_number(matches[-1]) if matches else None


def numbers_equal(a: str | None, b: str | None, *, tolerance: float = 1e-6
                  ) -> bool:
  """Whether two canonical number strings denote the same value."""
  if a is None or b is None:
    return False
  return math.isclose(float(a), float(b), rel_tol=tolerance,
                      abs_tol=tolerance)

"""Finding and normalising the final number of a math answer.

Shared by the loaders (to read the gold number out of a target text) and by
`train.evaluate` (to read the predicted number out of a generation), so that
gold and prediction go through exactly the same normalisation.
"""

from __future__ import annotations

import math
import re

from train.data import word_edges

# A number as written in answers: optional sign and currency ('$', and the
# euro, pound, yen and rupee signs some GSM8K solutions use), thousands
# commas, optional decimals; also '.5'. A sign touches the number (or its
# currency): the '-' of a list item ('- 18') or a dash ('answer - 18') is
# not one, nor is the hyphen of a range or a word ('3-4 hours' ends in 4,
# not -4); the typographic minus U+2212 may have a space after it.
# A word is `word_edges`': the '-' of '答案是-5' is a sign.
_CURRENCY = "$\u20ac\u00a3\u00a5\u20b9"
_NOT_AFTER_WORD = rf"(?<!{word_edges.WORD_CHAR})(?<!\.)"
_SIGN = (rf"(?:{_NOT_AFTER_WORD}-|\u2212\s?)?(?:[" + re.escape(_CURRENCY) +
         r"]\s?)?")
# A fraction ('29/3', '3/4') is read whole, as its value: not as the 29 or
# the 4 (a '4' read out of '3/4 of a cup' scored right against a gold of 4).
_FRACTION = r"(?<!/)\d[\d,]*(?:\.\d+)?/\d+(?:\.\d+)?(?![\d/])"  # not a date's
# A bare '.5' has no letter, digit or dot before its point: 'Rs.500' is 500
# (it had read as 0.5), and '5 km.3 hours' ends in 3.
# A point after CJK text is a full stop ('答．12個' is 12, not 0.12): here a
# CJK letter is a letter (`\w`), as it is not for a sign.
_POINT_ONLY = r"(?<![\w.])\.\d+"
_NUMBER = (_SIGN + r"(?:" + _FRACTION + r"|\d[\d,]*(?:\.\d+)?|" +
           _POINT_ONLY + ")")
_NUMBER_RE = re.compile(_NUMBER)
# After an answer marker also a mixed number ('2 1/2', 2.5) and thousands
# grouped by spaces ('$9 500', as in some GSM8K solutions; not '4 100-meter
# races'): read whole, not as '2' or '9'.
_MARKED = (_SIGN + r"(?:\d+[ \u00a0]" + _FRACTION +
           r"|\d{1,3}(?:[ \u00a0]\d{3})+(?![\d,.]\d|-\w)"
           r"|" + _FRACTION + r"|\d[\d,]*(?:\.\d+)?|" + _POINT_ONLY + ")")
# An equation after the marker ('The answer is 40 - 29 = 11', as some
# LLM-Adapters targets write it, or '(4 * 5) - 2 = 18'; also with the
# division sign, the minus sign U+2212, the dot operators and '^') answers
# with its result, not its first operand; a chain ('3 * 15 - 5 = 40 - 5 =
# 35') with its last result (it had been 40), and an operand may be a
# percentage ('100 - 20% = 80' had been 100).
# Each operand is matched atomically (a lookahead captures it, the
# backreference consumes it; Python 3.10 has no '(?>...)'): '1/2' is a
# fraction or '1', '/', '2', and trying both readings of every term had made
# a generation of n such terms without '=' take 2^n steps.
_OPERAND = r"(?:\(\s*)*" + _MARKED + r"%?(?:\s*\))*"
_EQUATION = (r"(?:(?=(?P<first>" + _OPERAND + r"))(?P=first)"
             r"(?:\s*[-+*/^x\u00d7\u00f7\u2212\u00b7\u22c5]\s*(?=(?P<next>" +
             _OPERAND +
             r"))(?P=next))+\s*=\s*)*")
# GSM8K's '#### N' at the start of a line (a '#### 1.' heading in a
# generation's middle is not it).
_HASHES_RE = re.compile(r"^[ \t]*####\s*(?P<n>" + _MARKED + ")",
                        re.MULTILINE)
# The answer itself may stand in parentheses, with a unit or '%' before
# they close ('(12)', '(12 apples)'), but not the '(12' of '(12 + 8)', which
# is not an answer.
_ANSWER_IS_RE = re.compile(
    r"answer\s+is\s*:?\s*(?:\$?\s*\\boxed\{)?\s*" + _EQUATION +
    r"(?P<paren>\(\s*)?(?P<n>" + _MARKED +
    r")(?(paren)[^()\n\d+\-*/=\u00d7]{0,40}\))", re.IGNORECASE)


_DROPPED = str.maketrans("", "", _CURRENCY + ",")
# Signs and separators of other scripts as the ASCII ones they stand for
# (digits need none: `\d` and float() read '４２' and '٤٢'): the full-width
# minus and point ('－５', '４２．５' had read as 5 and 42), the Arabic decimal
# and thousands separators ('٣٫٥', '١٬٢٣٤' had read as 5 and 1), and the thin
# and narrow no-break spaces that group thousands ('1 234' in French) as the
# no-break space. Each is one character for one, so places in a text stay.
_AS_ASCII = str.maketrans({"\uff0d": "-", "\uff0e": ".", "\u066b": ".",
                           "\u066c": ",", "\u2009": "\u00a0",
                           "\u202f": "\u00a0"})


def canonical_number(text: str | float | int | None) -> str | None:
  """Returns `text` as a canonical number string, or None if it is not one.

  Drops a currency sign ('$', '\u20ac', ...), thousands commas, a trailing '.', '%' and surrounding space;
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
    cleaned = str(text).strip().translate(_AS_ASCII).translate(_DROPPED)
    cleaned = cleaned.replace("\u2212", "-")
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
  """A number, or a fraction 'a/b' or mixed number 'w a/b' as its value."""
  if "/" not in text:
    return canonical_number(text)
  whole, _, fraction = text.replace("\u00a0", " ").rpartition(" ")
  num, den = (canonical_number(part) for part in fraction.split("/"))
  if num is None or den is None or float(den) == 0:
    return None
  value = float(num) / float(den)
  if whole.strip():
    w = canonical_number(whole)
    if w is None:
      return None
    value = float(w) + math.copysign(value, float(w))  # '-2 1/2' is -2.5
  return canonical_number(value)


def extract_final_number(text: str, *, fallback_to_last: bool = True
                         ) -> str | None:
  """Returns the final answer number in `text`, canonicalised.

  Looks for the last answer marker, '#### N' at the start of a line
  (GSM8K's own format) or 'the answer is N' (the LLM-Adapters
  chain-of-thought format; 'the answer is a - b = N' gives N), and, when
  there is none and `fallback_to_last`, the last number anywhere.

  Args:
    text: A target or a model generation.
    fallback_to_last: Whether to fall back to the last number in the text when
      neither marker is present. Gold answers are read with False, so a
      target without a marker gives no gold rather than a guess.

  Returns:
    The canonical number string (see `canonical_number`), or None.
  """
  text = text.translate(_AS_ASCII)
  marked = [m for pattern in (_HASHES_RE, _ANSWER_IS_RE)
            for m in pattern.finditer(text)]
  if marked:
    return _marked_value(max(marked, key=lambda m: m.start()).group('n'))
  if not fallback_to_last:
    return None
  matches = _NUMBER_RE.findall(text)
  return _marked_value(matches[-1]) if matches else None


def numbers_equal(a: str | None, b: str | None, *, tolerance: float = 1e-6
                  ) -> bool:
  """Whether two canonical number strings denote the same value, up to
  an absolute ``tolerance`` (a relative one would let 1,000,001 match a
  gold of 1,000,000)."""
  if a is None or b is None:
    return False
  return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=tolerance)

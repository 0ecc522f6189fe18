"""Metrics of `train.evaluate` on hand-made cases."""

import math

import numpy as np
import pytest

from train import data
from train import evaluate as ev
from train.data import Example
from train.data import numbers

from tests.shared_data import DATA_DIR, needs_data  # pylint: disable=g-importing-member

TOK = data.ByteTokenizer()


def _mc(gold, labels=("answer1", "answer2", "answer3")):
  return Example(prompt="Q:", target=f"the correct answer is {labels[gold]}",
                 options=tuple(f"the correct answer is {l}" for l in labels),
                 labels=labels, gold_index=gold)


# --- numbers -----------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("The answer is 576.", "576"),
    ("The answer is $1,234.00.", "1234"),
    ("the answer is: 3.50 dollars", "3.5"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,000,000", "1000000"),
    ("So he has 5 apples, then 7.0 apples", "7"),  # Last number.
    ("First 3. The answer is 12 apples and 4 pears.", "12"),
    ("The answer is -3.", "-3"),
    ("It costs $.5 each", "0.5"),
    # A point after a letter is not a decimal point: 'Rs.500' (as the math
    # training set writes rupees) had read as 0.5.
    ("The answer is Rs.500", "500"),
    ("He paid Rs.4578, which is Rs.3662.", "3662"),
    ("He walked 5 km.3 hours later", "3"),
    ("The answer is .75", "0.75"),
    ("The answer is 9.9999999999999999 ", "10"),
    ("no number here", None),
    ("The answer is (C).", None),
    # Thousands grouped by spaces (a GSM8K solution writes '$9 500') and a
    # fraction are read whole, not as their first group or numerator.
    ("The answer is $9 500.", "9500"),
    ("The answer is 5 000 000.", "5000000"),
    ("The answer is 29/3.", "9.666667"),
    # A mixed number after the marker; a fraction without one (had been its
    # whole part, and its denominator); a date is not a fraction.
    ("The answer is 2 1/2.", "2.5"),
    ("The answer is -2 1/2", "-2.5"),
    ("She needs 3/4 of a cup.", "0.75"),
    ("So x = 7/2", "3.5"),
    ("It was on 3/4/2020", "2020"),
    ("The answer is 29/4", "7.25"),
    ("The answer is 12 and 300.", "12"),
    ("The answer is 7/0.", None),
    # An equation after the marker answers with its result (three targets
    # of the packaged GSM8K and math sets are written so).
    ("The answer is 40 - 29 = 11 holes.", "11"),
    ("The answer is 4 + 16 + 20 = 40.", "40"),
    ("The answer is 5 x 3 = 15.", "15"),
    # Other operator signs (each had been read as the first operand).
    ("The answer is 12 \u00f7 3 = 4", "4"),
    ("The answer is 40 \u2212 29 = 11", "11"),
    ("The answer is 3 \u00b7 4 = 12", "12"),
    ("The answer is 3 \u22c5 4 = 12", "12"),
    ("The answer is 5^2 = 25", "25"),
    # In parentheses: the marker had not matched, and the last number
    # anywhere (2) was read.
    ("The answer is (12 + 8) = 20. She gives 2 away.", "20"),
    ("The answer is (4 * 5) - 2 = 18", "18"),
    ("The answer is (12) + 8 = 20", "20"),
    ("The answer is (12). She gives 2 away.", "12"),
    # Not an answer in parentheses: its first number is not read.
    ("The answer is (12 + 8).", "8"),
    ("The answer is (12%). 3 of them", "12"),
    ("The answer is (12 apples). Check: 5 + 7", "12"),
    ("The answer is (1,200 dollars) 5", "1200"),
    # A sign touches its number: a dash or a list bullet is not one.
    ("Final answer - 18", "18"),
    ("Apples left:\n- 18", "18"),
    ("It costs -$5", "-5"),
    # Nor is the hyphen of a range ('-4' had been read).
    ("It takes 3-4 hours", "4"),
    ("so x = 10-4", "4"),
    ("The total is (-3)", "-3"),
    ("The answer is \u2212 5.", "-5"),
    # '####' counts at the start of a line, and the last marker wins.
    ("#### 1. Find the cost\nThen add.\nThe answer is 42.", "42"),
    ("The answer is 41.\n#### 42", "42"),
    # Space-grouped thousands, but not a number before a hyphenated word.
    ("The answer is 4 100-meter races.", "4"),
    # Other currencies than '$' after the marker (a GSM8K solution ends
    # 'The answer is \u20ac77.'): not the last number after it.
    ("The answer is \u20ac77. She kept 3 for herself.", "77"),
    ("The answer is \u00a31,200 and 5 left.", "1200"),
    ("The answer is \u00a5 300, not 7.", "300"),
    # A chain of equations answers with its last result (had been 40 and
    # 8), a percentage may be an operand (had been 100), and a boxed
    # answer in '$...$' is the marker's (had been the last number, 2).
    ("The answer is 3 * 15 - 5 = 40 - 5 = 35.", "35"),
    ("The answer is 5 + 3 = 8 - 2 = 6 apples.", "6"),
    ("The answer is 100 - 20% = 80", "80"),
    ("The final answer is $\\boxed{18}$. She makes $2 per egg.", "18"),
    ("The answer is: $ \\boxed{18}$ dollars for 3 eggs", "18"),
    # Other scripts: a '-' after CJK text is a sign (had been 5 and 12);
    # full-width signs and points, Arabic separators and thin-space groups
    # (had been 5, 42, 5, 1 and 1; a range in full width stays a range).
    ("\u6240\u4ee5\u7b54\u6848\u662f-5\u3002", "-5"),
    ("\u7b54\u3048\u306f-12\u3067\u3059", "-12"),
    ("The answer is \uff0d\uff15", "-5"),
    ("The answer is \uff14\uff12\uff0e\uff15", "42.5"),
    ("\u0627\u0644\u062c\u0648\u0627\u0628 \u0647\u0648 "
     "\u0663\u066b\u0665", "3.5"),
    ("The answer is \u0661\u066c\u0662\u0663\u0664", "1234"),
    ("The answer is 1\u202f234 apples", "1234"),
    ("The answer is 1\u2009000.", "1000"),
    ("\uff11\uff12\uff0d\uff13 \u65e5", "3"),
    # A full stop after CJK text is not a decimal point (had become 0.12
    # with the edges above), nor is a full-width letter's hyphen a sign.
    ("\u7b54\uff0e12\u500b", "12"),
    ("\u5408\u8a08\u306f12\u500b.5\u500b\u304c\u7b54\u3048", "5"),
    ("\uff38\uff0d\uff15", "5"),
    # Without a marker, the last number keeps its thousands separators.
    ("So she earns $1,200 in total", "1200"),
])
def test_extract_number(text, expected):
  assert ev.extract_number(text) == expected


def test_canonical_number():
  assert data.canonical_number("576.0") == "576"
  assert data.canonical_number(" $1,234 ") == "1234"
  assert data.canonical_number("\u20ac1,234.00") == "1234"
  assert data.canonical_number("50%") == "50"
  assert data.canonical_number(2.50) == "2.5"
  assert data.canonical_number("1/3") is None
  # A gold answer written in other scripts (had been 1, 42 and None).
  assert data.canonical_number("\u0661\u066c\u0662\u0663\u0664") == "1234"
  assert data.canonical_number("\uff14\uff12\uff0e\uff15") == "42.5"
  assert data.canonical_number("\uff0d\uff15") == "-5"
  assert data.extract_final_number("it is 5", fallback_to_last=False) is None


def test_number_exact_match():
  examples = [Example("q", "t", gold_number="576"),
              Example("q", "t", gold_number="1234"),
              Example("q", "t", gold_number="3.5"),
              Example("q", "t", gold_number=None)]
  result = ev.number_exact_match(
      examples, ["#### 576.0", "The answer is 1,234", "It is 3.49", "7"])
  assert result.correct.tolist() == [True, True, False]
  assert result.accuracy == pytest.approx(2 / 3)
  assert result.num_skipped == 1 and result.predictions == ("576", "1234",
                                                            "3.49")
  arith = data.load_task("arithmetic", "test", num_examples=20)
  assert ev.number_exact_match(arith, [e.target for e in arith]).accuracy == 1
  with pytest.raises(ValueError, match="3 generations for 4 examples"):
    ev.number_exact_match(examples, ["1", "2", "3"])


# --- multiple choice ---------------------------------------------------------


def test_requests_to_batch_scores_like_the_training_loss():
  example = _mc(1)
  pairs = [data.encode_pair(example.prompt, o, TOK, 64, add_eos=False)
           for o in example.options]
  batch = ev.requests_to_batch(pairs, 40, TOK.pad_id)
  assert batch["tokens"].shape == (3, 40) and batch["tokens"].dtype == np.int32
  for row, (prompt_ids, option_ids) in enumerate(pairs):
    mask = batch["loss_mask"][row] > 0
    assert batch["tokens"][row][mask].tolist() == option_ids
    assert batch["tokens"][row][0] == TOK.bos_id
    assert int(batch["segment_ids"][row].sum()) == (
        len(prompt_ids) + len(option_ids))
  with pytest.raises(ValueError, match="more than seq_len 10"):
    ev.requests_to_batch(pairs, 10, TOK.pad_id)


def test_parse_choice():
  labels = ("answer1", "answer2", "answer3", "answer4")
  assert ev.parse_choice("the correct answer is answer3", labels) == 2
  assert ev.parse_choice("Answer2, not answer1", labels) == 1  # First wins.
  assert ev.parse_choice("answer10", labels) is None  # Whole words only.
  assert ev.parse_choice("I think it is True.", ("true", "false")) == 0
  assert ev.parse_choice("nothing", labels) is None
  # Letters: the article 'a' is not option A, nor is a sentence's 'A'
  # before 'the answer is C' (both had read as A).
  letters = ("A", "B", "C", "D")
  assert ev.parse_choice("Plants absorb a gas: the correct answer is C",
                         letters) == 2
  assert ev.parse_choice("A gas. The answer is (D).", letters) == 3
  assert ev.parse_choice("B", letters) == 1
  assert ev.parse_choice("it is a gas", letters) is None
  # Marked otherwise: 'answer is:', 'Answer:', bold, quoted, 'option (B)'
  # (each had fallen back to the sentence's 'A', or the digit before).
  for text in ("A whale is a mammal. The answer is: B",
               "A whale breathes air.\nAnswer: B",
               "A cat. The answer is **B**", 'A cat. Answer is "B".',
               "A gas. The answer is option (B).", "A cat. Answer: [B]",
               "A cat. **Answer**: B", "A cat. **Answer:** B",
               "A cat.\n### Answer\nB", "A cat. **Answer** B",
               "A cat. Answer (B)"):
    assert ev.parse_choice(text, letters) == 1, text
  digits = ("1", "2", "3", "4")
  assert ev.parse_choice("Of the 4 options, the answer is: 2", digits) == 1
  assert ev.parse_choice("Plants need 2 things. Answer: **3**", digits) == 2
  # An echoed 'Answer format: A/B/C/D' is no marker; 'answers' is no word
  # of one.
  assert ev.parse_choice("Answer format: A/B/C/D\nD", letters) == 0
  assert ev.parse_choice("C answers B", letters) == 2
  # 'answer is' outranks an earlier bare 'answer' (these had read as A).
  for text, gold in (
      ("Answer A is incorrect: plants need light. The answer is C.", 2),
      ("Answer (A) is wrong; the answer is B", 1),
      ("To answer A, B and C we need more. The answer is D.", 3)):
    assert ev.parse_choice(text, letters) == gold, text
  assert ev.parse_choice("ending4", ("ending1", "ending2", "ending3",
                                     "ending4")) == 3
  # Chinese, Japanese, Korean and Thai write a label against the text
  # around it (each had read as no answer); a Latin word still bounds one.
  for text, gold in (("\u7b54\u6848\u662fB\u3002", 1),
                     ("\u6b63\u786e\u7b54\u6848\u4e3aC", 2),
                     ("\u7b54\u3048\u306fB\u3067\u3059", 1),
                     ("\ub2f5\uc740 D\uc785\ub2c8\ub2e4", 3),
                     ("\u0e04\u0e33\u0e15\u0e2d\u0e1a\u0e04\u0e37"
                      "\u0e2dA", 0),
                     ("\u7b54\u6848\u662fBanana", None),
                     ("\uff21B", None)):  # a full-width A is a letter
    assert ev.parse_choice(text, letters) == gold, text
  assert ev.parse_choice("\u7b54\u6848\u662ftrue", ("true", "false")) == 0


def test_multiple_choice_generation():
  examples = [_mc(0), _mc(1), _mc(2), Example("q", "t", options=("a", "b"),
                                                labels=("a", "b"))]
  result = ev.multiple_choice_generation(
      examples, ["the correct answer is answer1", "answer3", "no idea", "a"])
  assert result.correct.tolist() == [True, False, False]
  assert result.predictions == (0, 2, -1) and result.num_skipped == 1


def test_multiple_choice_loglik_plain_and_length_normalised():
  # Option 1 is short but less likely per token; option 2 is long.
  table = {"A": -2.0, "BBBBBB": -3.0, "CC": -9.0}
  calls = []

  def score_fn(pairs):
    calls.append(len(pairs))
    out = []
    for prompt_ids, option_ids in pairs:
      assert prompt_ids[0] == TOK.bos_id and TOK.eos_id not in option_ids
      out.append(table[TOK.decode(option_ids)])
    return out

  example = Example("Q:", "A", options=("A", "BBBBBB", "CC"),
                    labels=("x", "y", "z"), gold_index=0)
  plain = ev.multiple_choice_loglik([example] * 5, TOK, score_fn,
                                    batch_size=4)
  assert plain.accuracy == 1.0 and set(plain.predictions) == {0}
  assert calls == [4, 4, 4, 3]  # 15 pairs in batches of at most 4.
  normed = ev.multiple_choice_loglik([example], TOK, score_fn,
                                     length_normalized=True)
  assert normed.predictions == (1,) and normed.accuracy == 0.0
  assert ev.choose_option([-1.0, -1.0]) == 0  # Ties: first.
  # NaN had won argmax: a NaN option ranks last, all NaN is no answer.
  nan = float('nan')
  assert ev.choose_option([-5.0, nan, -1.0]) == 2
  assert ev.choose_option([nan, -3.0], lengths=[1, 2]) == 1
  assert ev.choose_option([nan, nan]) == -1
  with pytest.raises(ValueError, match="returned 1 scores for 3 pairs"):
    ev.multiple_choice_loglik([example], TOK, lambda pairs: [0.0])


def test_multiple_choice_loglik_shares_a_pass_across_last_token_options():
  """Options differing only in their last token go to `alternatives_fn` as
  one request per example; others (different lengths) stay pairs. The
  scores, predictions and per-option records match the pair-only path."""
  table = {"the correct answer is answer1": -4.0,
           "the correct answer is answer2": -1.5,
           "the correct answer is answer3": -3.0,
           "A": -2.0, "BBBBBB": -3.0, "CC": -9.0}
  pair_calls, request_calls = [], []

  def score_fn(pairs):
    pair_calls.append(len(pairs))
    return [table[TOK.decode(o)] for _, o in pairs]

  def alternatives_fn(requests):
    request_calls.append(len(requests))
    return [[table[TOK.decode(list(shared) + [t])] for t in last]
            for _, shared, last in requests]

  odd = Example("Q:", "A", options=("A", "BBBBBB", "CC"),
                labels=("x", "y", "z"), gold_index=2)
  examples = [_mc(1), odd, _mc(0), Example("Q:", "t")]  # Last: no gold.
  fast = ev.multiple_choice_loglik(examples, TOK, score_fn, batch_size=4,
                                   alternatives_fn=alternatives_fn)
  assert request_calls == [2] and pair_calls == [3]  # 2 requests, 3 pairs.
  slow = ev.multiple_choice_loglik(examples, TOK, score_fn)
  assert fast.predictions == slow.predictions == (1, 0, 1)
  assert fast.correct.tolist() == [True, False, False]
  assert fast.num_skipped == slow.num_skipped == 1
  assert fast.option_scores == slow.option_scores
  assert fast.option_scores[0] == (-4.0, -1.5, -3.0)
  assert fast.option_lengths[1] == (1, 6, 2)
  with pytest.raises(ValueError, match="alternatives_fn returned"):
    ev.multiple_choice_loglik([_mc(0)], TOK, score_fn,
                              alternatives_fn=lambda q: [[0.0, 0.0]])


def test_an_option_extending_another_can_win():
  """'answer10' extends 'answer1' token for token: scored without an end,
  its log-likelihood could never exceed answer1's. Such an item's options
  end in EOS (as training targets do); other items' stay without."""
  labels = tuple(f"answer{k}" for k in range(1, 11))
  tenway = _mc(9, labels)
  gold = TOK.encode(tenway.options[9]) + [TOK.eos_id]
  seen = []

  def model(pairs):  # Left to right, 0.99 on each next token of gold + EOS.
    seen.extend(o for _, o in pairs)
    scores = []
    for _, option in pairs:
      logp = 0.0
      for i, token in enumerate(option):
        if list(option[:i]) != gold[:i]:
          logp += np.log(0.5)  # Off the gold path: anything.
        else:
          logp += np.log(0.99 if i < len(gold) and token == gold[i] else 0.01)
      scores.append(logp)
    return scores

  for normalized in (False, True):
    seen.clear()
    result = ev.multiple_choice_loglik([tenway, _mc(1)], TOK, model,
                                       length_normalized=normalized)
    assert result.predictions[0] == 9 and result.correct[0]
    assert all(o[-1] == TOK.eos_id for o in seen[:10])
    assert all(TOK.eos_id not in o for o in seen[10:])  # answer1-3: no EOS.
  # An empty option is a prefix of every other: scored as p(EOS), it had
  # scored 0 (certain) and always won.
  empty = Example("Q:", "no", options=("", "no"), labels=("", "no"),
                  gold_index=1)
  gold = TOK.encode("no") + [TOK.eos_id]
  assert ev.multiple_choice_loglik([empty], TOK, model).predictions == (1,)


def test_every_option_is_scored_after_the_same_cut_prompt():
  """A prompt too long for the row is cut by as much as the longest option
  needs: each option's own cut had scored BoolQ's 'false' after one prompt
  token fewer than 'true'."""
  seen = []

  def score_fn(pairs):
    seen.extend(pairs)
    return [0.0] * len(pairs)

  example = Example("question " * 20 + "?", "the correct answer is true",
                    options=("the correct answer is true",
                             "the correct answer is false"),
                    labels=("true", "false"), gold_index=0)
  ev.multiple_choice_loglik([example], TOK, score_fn, max_length=64)
  (p_true, o_true), (p_false, o_false) = seen
  assert p_true == p_false and p_true[0] == TOK.bos_id
  assert len(p_false) + len(o_false) == 64  # the longest fills the row
  assert len(p_true) + len(o_true) == 63
  assert TOK.decode(p_true[1:]) == ("question " * 20 + "?")[
      -(64 - 1 - len(o_false)):]


@needs_data
def test_multiple_choice_on_real_examples():
  examples = data.load_task("arc_challenge", "test", data_dir=DATA_DIR)[:40]
  gold = {e.prompt: e.target for e in examples}

  def oracle(pairs):  # Knows the gold answer of each prompt.
    return [0.0 if TOK.decode(o) == gold[TOK.decode(p)] else -1.0
            for p, o in pairs]

  result = ev.multiple_choice_loglik(examples, TOK, oracle, max_length=4096)
  assert result.accuracy == 1.0 and result.num_examples == 40
  assert ev.multiple_choice_generation(
      examples, [e.target for e in examples]).accuracy == 1.0
  always_first = ev.multiple_choice_generation(
      examples, ["answer1"] * len(examples))
  assert always_first.accuracy == np.mean([e.gold_index == 0
                                           for e in examples])


# --- SuperNI ------------------------------------------------------------------


@pytest.mark.parametrize("pred,ref,expected", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
    ("a b c d", "a c", 2 * 0.5 * 1.0 / 1.5),  # P 1/2, R 1: F 2/3.
    ("Hello, World!", "hello world", 1.0),
    # Lin (2004)'s examples, against 'police killed the gunman', with
    # SuperNI's Porter stemming ('kill' matches 'killed': 0.75 unstemmed).
    ("police kill the gunman", "police killed the gunman", 1.0),
    ("the gunman kill police", "police killed the gunman", 0.5),
    # Scored as the SuperNI script (rouge_score, use_stemmer=True) scores
    # them; an unstemmed LCS had given 0, 2/3 and 4/9.
    ("studies show", "study showed", 1.0),
    ("He walked home", "He walks home", 1.0),
    ("The cats are running quickly", "the cat runs quickly", 8 / 9),
    ("", "anything", 0.0),
    ("x y", "z", 0.0),
])
def test_rouge_l(pred, ref, expected):
  assert ev.rouge_l(pred, ref) == pytest.approx(expected)


def test_superni_metrics():
  preds = ["Yes.", "the answer is no", "Paris"]
  refs = [["yes"], ["no"], ["Lyon", "paris"]]
  m = ev.superni_metrics(preds, refs)
  assert m["exact_match"] == pytest.approx(200 / 3)
  rouge_2 = 2 * 0.25 * 1.0 / 1.25
  assert m["rougeL"] == pytest.approx(100 * (1 + rouge_2 + 1) / 3)
  assert ev.normalize_answer("  The  Answer, is: Yes! ") == "the answer is yes"
  examples = [Example("p", "yes", references=("yes", "y"))]
  assert ev.superni_evaluate(examples, ["Y"])["exact_match"] == 100.0
  with pytest.raises(ValueError, match="2 predictions for 1 reference"):
    ev.superni_metrics(["a", "b"], [["a"]])
  assert ev.superni_metrics(["hi"], [np.array(["hello", "hi"])]) == (
      {"exact_match": 100.0, "rougeL": 100.0})
  assert ev.superni_metrics(["hi"], np.array([["hello", "hi"]])) == (
      {"exact_match": 100.0, "rougeL": 100.0})
  # A 0-d array is one reference, not its letters.
  assert ev.superni_metrics(["h"], [np.array("hello")])["exact_match"] == 0
  # Had been max() of nothing, None.lower() and 'NoneType' not iterable.
  for preds, refs, message in (
      (["a"], [[]], r"^superni_metrics: references 0 must be a non-empty "
       "list of strings, got \\[\\]$"),
      (["a"], [None], "references 0 must be a non-empty list"),
      ([None], [["a"]], r"^superni_metrics: prediction 0 must be a string, "
       "got NoneType$")):
    with pytest.raises(ValueError, match=message):
      ev.superni_metrics(preds, refs)


def test_superni_rouge_warns_on_text_the_default_track_cannot_score():
  """rouge_score's default tokenizer keeps [a-z0-9] only: an exact Japanese
  answer scores ROUGE-L 0 (as SuperNI's default track would), said in a
  warning rather than silently beside exact match 100."""
  with pytest.warns(UserWarning, match=r"superni_metrics: 1 of 2 examples "
                    "have references with no \\[a-z0-9\\] token"):
    m = ev.superni_metrics(["おはよう", "hello"], [["おはよう"], ["hello"]])
  assert m == {"exact_match": 100.0, "rougeL": 50.0}


# --- statistics ---------------------------------------------------------------


def test_wilson_interval():
  lo, hi = ev.wilson_interval(8, 10)
  assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4),
                      pytest.approx(0.9433, abs=1e-4))
  assert ev.wilson_interval(0, 10)[0] == 0.0
  assert ev.wilson_interval(10, 10)[1] == pytest.approx(1.0)
  assert ev.wilson_interval(13, 13)[1] == 1.0  # unclamped: 0.9999999999999999
  lo99, hi99 = ev.wilson_interval(8, 10, confidence=0.99)
  assert lo99 < lo and hi99 > hi
  with pytest.raises(ValueError, match='needs n > 0, got 0'):
    ev.wilson_interval(0, 0)
  with pytest.raises(ValueError, match=r'successes must be an integer in '
                     r'\[0, 10\], got 11'):
    ev.wilson_interval(11, 10)
  with pytest.raises(ValueError, match=r'successes must be an integer'):
    ev.wilson_interval(2.5, 5)
  # 95 for 95% had failed naming a 'p'; -0.5 gave an upside-down interval.
  for bad in (95, -0.5, 1.0, 0):
    with pytest.raises(ValueError, match=r'^wilson_interval: confidence must '
                       r'be in \(0, 1\) \(0.95 for 95%\), got '):
      ev.wilson_interval(3, 5, confidence=bad)


def test_bootstrap_interval():
  values = np.r_[np.ones(70), np.zeros(30)]
  lo, hi = ev.bootstrap_interval(values, seed=0)
  assert lo < 0.7 < hi and hi - lo < 0.25
  # As wide as the normal interval of a 70% mean over 100 items (within
  # 10%): a mean over the resamples' axis (nearly no width) or a 90%
  # interval had passed the checks above.
  normal = 2 * 1.96 * np.sqrt(0.7 * 0.3 / 100)
  assert 0.9 * normal < hi - lo < 1.1 * normal, (lo, hi)
  # The last value is drawn too (a resample of indices below len - 1 had
  # never drawn it).
  assert ev.bootstrap_interval(np.r_[np.zeros(99), 1.0])[1] > 0
  assert (lo, hi) == ev.bootstrap_interval(values, seed=0)
  assert ev.bootstrap_interval([0.5] * 5) == (0.5, 0.5)
  med = ev.bootstrap_interval(values, statistic=np.median, num_resamples=200)
  assert med == (1.0, 1.0)
  # A seeds x items matrix had given an interval of nothing.
  with pytest.raises(ValueError, match=r'non-empty vector of per-example '
                     r'values, got shape \(2, 2\)'):
    ev.bootstrap_interval([[0, 1], [1, 1]])
  with pytest.raises(ValueError, match=r'confidence must be in \(0, 1\)'):
    ev.bootstrap_interval(values, confidence=95)
  with pytest.raises(ValueError, match=r'num_resamples must be an integer '
                     r'>= 1, got 0'):
    ev.bootstrap_interval(values, num_resamples=0)


def test_mcnemar_exact():
  a = [1] * 5 + [0] * 1 + [1] * 10
  b = [0] * 5 + [1] * 1 + [1] * 10
  r = ev.mcnemar_exact(a, b)
  assert (r.only_a, r.only_b) == (5, 1)
  assert r.p_value == pytest.approx(14 / 64)  # 2 * (1 + 6) / 2**6.
  assert ev.mcnemar_exact([1, 0], [1, 0]).p_value == 1.0
  # An item both get wrong counts for neither; an even split is p 1 (the
  # two tails' sum, 1.5, is capped).
  r = ev.mcnemar_exact([1, 0, 0], [0, 0, 1])
  assert (r.only_a, r.only_b, r.p_value) == (1, 1, 1.0)
  assert ev.mcnemar_exact([1] * 10, [0] * 10).p_value == pytest.approx(
      2 / 1024)
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  x, y = rng.random(300) < 0.6, rng.random(300) < 0.5
  r = ev.mcnemar_exact(x, y)
  assert r.p_value == pytest.approx(stats.binomtest(
      r.only_a, r.only_a + r.only_b, 0.5).pvalue)
  with pytest.raises(ValueError, match="equal-length"):
    ev.mcnemar_exact([1, 0], [1])
  # 'False' (from a CSV) had counted as correct, scores as correct too.
  with pytest.raises(ValueError, match=r"^mcnemar_exact: correct_a must be "
                     r"per-example correctness \(bools or 0/1\), got <U5 "
                     r"values such as 'False'"):
    ev.mcnemar_exact(['False', 'False'], [True, True])
  with pytest.raises(ValueError, match=r"correct_b must be per-example"):
    ev.mcnemar_exact([0, 1], [0.2, 0.9])
  assert ev.mcnemar_exact(np.array([1.0, 0.0]), [True, True]).only_b == 1


def test_numbers_equal_is_absolute():
  # A relative tolerance had let 1,000,001 match a gold of 1,000,000.
  equal = numbers.numbers_equal
  assert not equal("1000001", "1000000")
  assert not equal("2000002", "2000000")
  assert equal("0.333333", "0.3333333")
  assert equal("576", "576.0000001")


def test_a_long_chain_of_fractions_is_read_in_linear_time():
  """'(1/2) + (1/2) + ...' with no '=' (a generation stuck repeating): each
  term read both as a fraction and as 1 / 2 had made the answer regex take
  2^n steps (n = 18: 0.4 s; 40 would never end). Run apart, with a limit."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("from train.data.numbers import extract_final_number as e\n"
          "print(e('So the answer is ' + ' + '.join(['(1/2)'] * 40) + '.'),"
          " e('The answer is ' + '1/1 x ' * 40))")
  done = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=60,
                        cwd=pathlib.Path(__file__).parents[1])
  assert done.stdout.split() == ['0.5', '1'], done.stderr


def test_an_option_set_without_a_finite_score_has_no_answer():
  """All -inf, or NaN beside -inf, is no answer (-1), not option 0."""
  assert ev.choose_option([-math.inf, -math.inf]) == -1
  assert ev.choose_option([math.nan, -math.inf]) == -1


def test_options_of_one_length_differing_before_their_last_token():
  """Only options that differ in their last token alone share a pass
  (alternatives_fn); 'xab' and 'xcd' are scored whole, each as itself (a
  shorter shared-prefix check had scored 'xcd' as 'xad')."""
  table = {'xab': -5.0, 'xcd': -1.0, 'xad': -9.0}
  shared = []

  def score_fn(pairs):
    return [table[TOK.decode(o)] for _, o in pairs]

  def alternatives_fn(requests):
    shared.extend(requests)
    return [[table[TOK.decode(list(s) + [t])] for t in last]
            for _, s, last in requests]

  e = Example('Q:', 'xcd', options=('xab', 'xcd'), labels=('a', 'b'),
              gold_index=1)
  res = ev.multiple_choice_loglik([e], TOK, score_fn,
                                  alternatives_fn=alternatives_fn)
  assert shared == []
  assert res.option_scores == ((-5.0, -1.0),) and res.correct[0]


def test_numbers_are_matched_as_numbers_and_counted():
  """A gold 0.3333333 matches '1/3' (as a number, not its text); more
  generations than examples are refused, as fewer are."""
  assert ev.number_exact_match([Example('q', 't', gold_number='0.3333333')],
                               ['The answer is 1/3']).accuracy == 1.0
  with pytest.raises(ValueError, match='3 generations for 2 examples'):
    ev.number_exact_match([Example('q', 't', gold_number='1')] * 2, ['1'] * 3)

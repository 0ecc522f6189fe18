"""Evaluation metrics: multiple choice, math exact match, SuperNI, statistics.

Model-free by design: the training loop supplies a scoring function (for
log-likelihood multiple choice) or generated texts, so every metric here can
be tested on hand-made cases and reused by the benchmarks.

- Multiple choice (ARC, OpenBookQA, HellaSwag, BoolQ): by comparing the
  log-likelihoods of the answer options (`multiple_choice_loglik`, plain or
  length-normalised) or by parsing a greedy generation
  (`multiple_choice_generation`).
- GSM8K / math / arithmetic: exact match of the extracted final number
  (`number_exact_match`).
- Super-Natural Instructions: exact match and ROUGE-L (`superni_metrics`),
  following the SuperNI evaluation script.
- Statistics for comparing runs: `wilson_interval`, `bootstrap_interval`,
  `mcnemar_exact`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import statistics
import string
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from lora_rite_optax import checks

from train.data import numbers
from train.data import word_edges
from train.data.example import Example
from train.data.tokenize import encode_pair
from train.data.tokenize import Tokenizer

# Scores a batch of (prompt_ids, option_ids) pairs: for each pair, the summed
# log-probability of option_ids given prompt_ids (prompt_ids start with BOS).
ScoreFn = Callable[[Sequence[tuple[Sequence[int], Sequence[int]]]],
                   Sequence[float]]

# Scores a batch of (prompt_ids, shared_ids, last_ids) requests: for each,
# [log p(shared_ids + [t] | prompt_ids) for t in last_ids], i.e. every option
# of a multiple-choice item whose options differ only in their last token,
# from one forward pass (`train.step.alternative_logprobs`).
AlternativesFn = Callable[
    [Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]],
    Sequence[Sequence[float]]]

extract_number = numbers.extract_final_number


@dataclasses.dataclass(frozen=True)
class Result:
  """Per-example outcome of an evaluation.

  Attributes:
    accuracy: Mean of `correct` (0.0 when nothing was scored).
    correct: bool [N], one entry per scored example, in input order; feed it
      to `mcnemar_exact` or `bootstrap_interval`.
    predictions: What was predicted per scored example (option index, -1 when
      a generation named no option or no option's score was finite; or the
      extracted number, None if none).
    num_skipped: Examples left out because they have no gold answer.
    option_scores: Log-likelihood-scored multiple choice only: per scored
      example, each option's summed log-probability.
    option_lengths: Likewise, each option's token count.
  """

  accuracy: float
  correct: np.ndarray
  predictions: tuple
  num_skipped: int = 0
  option_scores: tuple = ()
  option_lengths: tuple = ()

  @property
  def num_examples(self) -> int:
    return int(len(self.correct))


def _result(correct: Sequence[bool], predictions: Sequence,
            skipped: int = 0, **options) -> Result:
  correct = np.asarray(correct, bool)
  return Result(float(correct.mean()) if len(correct) else 0.0, correct,
                tuple(predictions), skipped, **options)


# --- multiple choice ---------------------------------------------------------


def choose_option(scores: Sequence[float], lengths: Sequence[int] | None = None
                  ) -> int:
  """Index of the best option: highest log-likelihood, or per token if
  `lengths` (option token counts) is given. Ties go to the first option.

  A NaN score (a diverged model, an overflow) ranks last, and with no finite
  score the answer is -1, wrong: argmax had chosen the first NaN, so a model
  scoring NaN everywhere was reported at chance.
  """
  scores = np.asarray(scores, np.float64)
  if lengths is not None:
    scores = scores / np.maximum(np.asarray(lengths, np.float64), 1.0)
  if not np.isfinite(scores).any():
    return -1
  return int(np.argmax(np.where(np.isnan(scores), -np.inf, scores)))


def _differ_in_last_token_only(encoded) -> bool:
  """Whether (prompt_ids, option_ids) pairs share the prompt and all option
  tokens but the last (so one forward pass scores them all)."""
  prompt, option = encoded[0]
  return bool(option) and all(
      p == prompt and len(o) == len(option) and o[:-1] == option[:-1]
      for p, o in encoded[1:])


def _some_option_extends_another(options: Sequence[Sequence[int]]) -> bool:
  """Whether some option's token ids are a proper prefix of another's (an
  empty option's are of every other's)."""
  as_tuples = {tuple(o) for o in options}
  return any(o[:k] in as_tuples for o in map(tuple, options)
             for k in range(len(o)))


def multiple_choice_loglik(examples: Sequence[Example], tokenizer: Tokenizer,
                           score_fn: ScoreFn, *, max_length: int = 1024,
                           length_normalized: bool = False,
                           batch_size: int = 64,
                           alternatives_fn: AlternativesFn | None = None
                           ) -> Result:
  """Multiple-choice accuracy by comparing option log-likelihoods.

  Each option target (e.g. 'the correct answer is answer2') is scored after
  the example's prompt; the prediction is the option with the highest summed
  log-probability, or the highest mean per token when `length_normalized`.
  Options are scored without EOS, except in an example where one option's
  tokens extend another's ('answer1' and 'answer10'; an empty option and any
  other): there all its options
  end in EOS, as training targets do, since otherwise the longer option's
  summed log-probability could never exceed the shorter's.

  Args:
    examples: Examples with `options` and `gold_index`; those without a gold
      index are skipped and counted.
    tokenizer: The model's `Tokenizer`.
    score_fn: Scores a batch of (prompt_ids, option_ids) pairs, see `ScoreFn`.
    max_length: Token budget of prompt + option (the prompt is truncated from
      the left, as in training, by as much as the longest option needs, so
      every option is scored after the same prompt tokens).
    length_normalized: Divide each option's score by its token count.
    batch_size: Pairs (or requests) per `score_fn` (or `alternatives_fn`)
      call.
    alternatives_fn: Optional, see `AlternativesFn`: scores all options of an
      example at once where they differ only in their last token (ARC,
      OpenBookQA and BoolQ as packaged here), one forward pass per example
      instead of one per option; other examples go to `score_fn`.

  Returns:
    A `Result` whose predictions are option indices, with every option's
    score and token count.
  """
  scored = [e for e in examples if e.gold_index is not None]
  for e in scored:
    if not e.options:
      raise ValueError(f"example of task {e.task!r} has no options to score")
  pairs, requests, encoded, shared = [], [], [], []
  for e in scored:
    enc = [encode_pair(e.prompt, option, tokenizer, max_length, add_eos=False)
           for option in e.options]
    if _some_option_extends_another([o for _, o in enc]):
      # 'answer10' extends 'answer1' token for token, so without an end its
      # log-likelihood could never beat answer1's (and ties went to
      # answer1): score such an item's options with the EOS that training
      # puts after every target.
      enc = [encode_pair(e.prompt, option, tokenizer, max_length)
             for option in e.options]
    # Every option after the same context: the prompt as far as the longest
    # option leaves room for (each its own cut had scored a longer option
    # after fewer prompt tokens).
    context = min((p for p, _ in enc), key=len)
    enc = [(context, o) for _, o in enc]
    encoded.append(enc)
    shared.append(alternatives_fn is not None and
                  _differ_in_last_token_only(enc))
    if shared[-1]:
      requests.append((enc[0][0], enc[0][1][:-1], [o[-1] for _, o in enc]))
    else:
      pairs.extend(enc)
  pair_scores, request_scores = [], []
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    out = np.asarray(score_fn(chunk), np.float64).reshape(-1)
    if len(out) != len(chunk):
      raise ValueError(
          f"score_fn returned {len(out)} scores for {len(chunk)} pairs")
    pair_scores.extend(out.tolist())
  for start in range(0, len(requests), batch_size):
    chunk = requests[start:start + batch_size]
    out = [np.asarray(s, np.float64).reshape(-1).tolist()
           for s in alternatives_fn(chunk)]
    if len(out) != len(chunk) or any(
        len(s) != len(q[2]) for s, q in zip(out, chunk)):
      raise ValueError(
          f"alternatives_fn returned {[len(s) for s in out]} scores for "
          f"requests of {[len(q[2]) for q in chunk]} options")
    request_scores.extend(out)
  pair_scores, request_scores = iter(pair_scores), iter(request_scores)
  predictions, correct, option_scores, option_lengths = [], [], [], []
  for e, enc, one_pass in zip(scored, encoded, shared):
    lengths = [len(o) for _, o in enc]
    if one_pass:
      scores = next(request_scores)
    else:
      scores = [next(pair_scores) for _ in enc]
    pred = choose_option(scores, lengths if length_normalized else None)
    predictions.append(pred)
    correct.append(pred == e.gold_index)
    option_scores.append(tuple(scores))
    option_lengths.append(tuple(lengths))
  return _result(correct, predictions, len(examples) - len(scored),
                 option_scores=tuple(option_scores),
                 option_lengths=tuple(option_lengths))


def requests_to_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                      seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Lays scoring pairs out as a training-format batch, for a `ScoreFn`.

  Row i holds prompt_ids + option_ids, padded; its `loss_mask` marks the
  option tokens, under the training convention (token t scored from
  position t-1). So a `ScoreFn` is the training loss without the mean:
  sum over t of loss_mask[:, 1:] * log p(tokens[:, 1:] | logits[:, :-1]).

  Args:
    pairs: (prompt_ids, option_ids) pairs, as `ScoreFn` receives them.
    seq_len: Row length; at least the longest pair.
    pad_id: Padding token id.

  Returns:
    {'tokens', 'loss_mask', 'positions', 'segment_ids'}, each [len(pairs),
    seq_len], dtypes as in `train.data.pipeline`.
  """
  n = len(pairs)
  batch = {"tokens": np.full((n, seq_len), pad_id, np.int32),
           "loss_mask": np.zeros((n, seq_len), np.float32),
           "positions": np.zeros((n, seq_len), np.int32),
           "segment_ids": np.zeros((n, seq_len), np.int32)}
  for i, (prompt_ids, option_ids) in enumerate(pairs):
    total = len(prompt_ids) + len(option_ids)
    if total > seq_len:
      raise ValueError(
          f"scoring pair {i} has {total} tokens, more than seq_len {seq_len}")
    batch["tokens"][i, :total] = list(prompt_ids) + list(option_ids)
    batch["loss_mask"][i, len(prompt_ids):total] = 1.0
    batch["positions"][i, :total] = np.arange(total)
    batch["segment_ids"][i, :total] = 1
  return batch


def parse_choice(text: str, labels: Sequence[str]) -> int | None:
  """Index of the first option label named in a generation, or None.

  The first whole-word, case-insensitive occurrence of any label
  ('answer3', 'ending2', 'true', ...) wins. LLM-Adapters' extract_answer
  takes the first case-sensitive match of any label anywhere (no word
  boundaries): 'Answer2' or 'True' it reads as no answer, so a model that
  capitalises a label scores higher here than there. A
  one-character label (an 'Answer format: A/B/C/D' record's) is matched in
  its own case, so the article 'a' is not option A; and the first one that
  follows 'answer is' (else 'answer:', else 'answer') wins over any before
  it ('A cat. The answer is B', '... Answer: B', 'the answer is: **B**' or
  'answer is option (B)' give B, and so does 'Answer A is wrong; the answer
  is B'). Without a marker, a capital 'A' opening a sentence does read as
  option A. In Chinese, Japanese, Korean or Thai text a label needs no space
  around it ('答案是B', '答えはBです': see `word_edges`).
  """
  if not labels:
    return None
  folded = [l if len(l) == 1 else l.lower() for l in labels]
  body = "|".join(re.escape(l) if len(l) == 1 else f"(?i:{re.escape(l)})"
                  for l in labels)
  # 'answer is', else 'answer:', then the marks that dress a label
  # ('**B**', '"B"', '[B]', '(B)'), then perhaps 'option': only ' ' and '('
  # had been allowed, so 'The answer is: B' fell back to the sentence's 'A'.
  # 'answer is' first, then 'answer:', then a bare 'answer' ('### Answer\nB',
  # '**Answer** B'): an earlier 'Answer A is wrong' is no answer where a
  # later 'the answer is C' is.
  # Word edges are `word_edges`', not `\b`: a label against CJK or Thai
  # text ('答案是B', '答えはBです') is a word of its own there.
  start, end = word_edges.START, word_edges.END
  dressed = rf"[\s:*\"'\[(]*(?:(?i:option)\s*\(?)?({body}){end}"
  patterns = [rf"{start}(?i:answer\s+is){dressed}",
              rf"{start}(?i:answer)[\s*]*:{dressed}",
              rf"{start}(?i:answer)[\s*]*{dressed}"] if any(
                  len(l) == 1 for l in labels) else []
  for pattern in patterns + [rf"{start}({body}){end}"]:
    match = re.search(pattern, text)
    if match:
      found = match.group(1)
      return folded.index(found if len(found) == 1 else found.lower())
  return None


def multiple_choice_generation(examples: Sequence[Example],
                               generations: Sequence[str]) -> Result:
  """Multiple-choice accuracy of greedy generations, one per example.

  A generation that names no option counts as wrong (prediction -1).
  """
  _check_lengths(examples, generations)
  predictions, correct, skipped = [], [], 0
  for e, text in zip(examples, generations):
    if e.gold_index is None:
      skipped += 1
      continue
    pred = parse_choice(text, e.labels)
    predictions.append(-1 if pred is None else pred)
    correct.append(pred == e.gold_index)
  return _result(correct, predictions, skipped)


# --- math --------------------------------------------------------------------


def number_exact_match(examples: Sequence[Example],
                       generations: Sequence[str]) -> Result:
  """Exact match of the final number of each generation with `gold_number`.

  The number is read with `extract_number` (the last of '#### N' at a line
  start or 'The answer is N', else the last number; commas, '$' and a
  trailing '.0' ignored). Examples without a gold number (e.g. the `math` records whose
  output has no 'The answer is N', or letter answers) are skipped.
  """
  _check_lengths(examples, generations)
  predictions, correct, skipped = [], [], 0
  for e, text in zip(examples, generations):
    if e.gold_number is None:
      skipped += 1
      continue
    pred = extract_number(text)
    predictions.append(pred)
    correct.append(numbers.numbers_equal(pred, e.gold_number))
  return _result(correct, predictions, skipped)


# --- Super-Natural Instructions ---------------------------------------------


def normalize_answer(text: str) -> str:
  """SuperNI's exact-match normalisation: lowercase, no punctuation, single
  spaces."""
  text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
  return " ".join(text.split())


# What rouge_score's default tokenizer keeps (after lowercasing).
_ROUGE_TOKEN = re.compile(r"[a-z0-9]")


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
  try:
    from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("SuperNI's ROUGE-L needs the rouge-score package "
                      "(pip install -e '.[train]')") from None
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F-measure (beta 1) between two texts, in [0, 1], as SuperNI's
  script scores its default (English) track: rouge_score's tokenizer
  (lowercase, non-alphanumerics to spaces) and its Porter stemmer ('studies
  show' matches 'study showed'; without it, a hand-written LCS had scored
  that 0). Text with no [a-z0-9] token (Japanese, Russian, ...) scores 0
  this way: SuperNI's xlingual track tokenizes it with GPT-2's tokenizer,
  which this project does not have (`superni_metrics` warns)."""
  return _rouge_scorer().score(target=reference,
                               prediction=prediction)["rougeL"].fmeasure


def superni_metrics(predictions: Sequence[str],
                    references: Sequence[Sequence[str]]) -> dict[str, float]:
  """SuperNI exact match and ROUGE-L, each the max over an example's
  references, averaged and scaled to 0-100 as the SuperNI script reports."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for "
                     f"{len(references)} reference lists")
  if not predictions:
    return {"exact_match": 0.0, "rougeL": 0.0}
  em, rl = [], []
  unscorable = 0
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    if isinstance(refs, np.ndarray):  # of strings (np.str_ is a str)
      refs = refs.tolist()  # a 0-d array: one str, wrapped below
    if isinstance(refs, str):
      refs = [refs]
    # Else max() of nothing, or None.lower(), deep inside.
    if not isinstance(pred, str):
      raise ValueError(f"superni_metrics: prediction {i} must be a string, "
                       f"got {type(pred).__name__}")
    if (isinstance(refs, (bytes, dict)) or not isinstance(refs, Sequence)
        or not refs or not all(isinstance(r, str) for r in refs)):
      raise ValueError(f"superni_metrics: references {i} must be a non-empty "
                       f"list of strings, got {refs!r:.60}")
    unscorable += not any(_ROUGE_TOKEN.search(r.lower()) for r in refs)
    em.append(max(float(normalize_answer(pred) == normalize_answer(r))
                  for r in refs))
    rl.append(max(rouge_l(pred, r) for r in refs))
  if unscorable:
    warnings.warn(
        f"superni_metrics: {unscorable} of {len(references)} examples have "
        "references with no [a-z0-9] token (non-Latin text); ROUGE-L scores "
        "them 0, as SuperNI's default (English) track would: its xlingual "
        "track (GPT-2's tokenizer) is not done here.", stacklevel=2)
  return {"exact_match": 100.0 * float(np.mean(em)),
          "rougeL": 100.0 * float(np.mean(rl))}


def superni_evaluate(examples: Sequence[Example],
                     generations: Sequence[str]) -> dict[str, float]:
  """`superni_metrics` against each example's `references`."""
  _check_lengths(examples, generations)
  return superni_metrics(generations, [e.references for e in examples])


# --- statistics --------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = 0.95
                    ) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion (e.g. an accuracy)."""
  if n <= 0:
    raise ValueError(f"wilson_interval needs n > 0, got {n}")
  if not checks.is_integer(successes) or not 0 <= successes <= n:
    raise ValueError(f"wilson_interval: successes must be an integer in "
                     f"[0, {n}], got {successes!r}")
  _check_confidence("wilson_interval", confidence)
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  # The bounds at 0 and n are exactly 0 and 1; avoid rounding residue.
  lo = 0.0 if successes == 0 else max(0.0, centre - half)
  hi = 1.0 if successes == n else min(1.0, centre + half)
  return lo, hi


def _check_confidence(who: str, confidence: float) -> None:
  # 95 for 95% had failed in statistics' inv_cdf (naming a 'p'), and a
  # negative level gave an upside-down interval.
  if isinstance(confidence, bool) or not isinstance(
      confidence, (int, float, np.floating)) or not 0 < confidence < 1:
    raise ValueError(f"{who}: confidence must be in (0, 1) (0.95 for 95%), "
                     f"got {confidence!r}")


def bootstrap_interval(values: Sequence[float], *, confidence: float = 0.95,
                       num_resamples: int = 2000, seed: int = 0,
                       statistic: Callable[[np.ndarray], float] = np.mean
                       ) -> tuple[float, float]:
  """Percentile bootstrap interval of `statistic` over per-example values."""
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    # A seeds x items matrix had been resampled by rows and its quantiles
    # taken over everything: an interval of nothing.
    raise ValueError(f"bootstrap_interval needs a non-empty vector of "
                     f"per-example values, got shape {values.shape}")
  _check_confidence("bootstrap_interval", confidence)
  if not checks.is_integer(num_resamples) or num_resamples < 1:
    raise ValueError(f"bootstrap_interval: num_resamples must be an integer "
                     f">= 1, got {num_resamples!r}")
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(values), size=(num_resamples, len(values)))
  if statistic is np.mean:
    stats = values[idx].mean(axis=1)  # Vectorised: the common case.
  else:
    stats = np.array([statistic(values[i]) for i in idx])
  alpha = (1 - confidence) / 2
  lo, hi = np.quantile(stats, [alpha, 1 - alpha])
  return float(lo), float(hi)


@dataclasses.dataclass(frozen=True)
class McNemarResult:
  """Exact McNemar test of two classifiers on the same examples.

  Attributes:
    only_a: Examples A gets right and B wrong.
    only_b: Examples B gets right and A wrong.
    p_value: Two-sided exact (binomial) p-value of "A and B are equally
      accurate".
  """

  only_a: int
  only_b: int
  p_value: float


def _correctness(values: Sequence[bool], name: str) -> np.ndarray:
  """Booleans, or 0/1: strings ('False' is truthy), scores and NaN had been
  read as correct."""
  x = np.asarray(values)
  if x.dtype == bool:
    return x
  numeric = np.issubdtype(x.dtype, np.number)
  bad = x if not numeric else x[~np.isin(x, (0, 1))]
  if bad.size:
    raise ValueError(f"mcnemar_exact: {name} must be per-example correctness"
                     f" (bools or 0/1), got {x.dtype} values such as "
                     f"{bad.flat[0].item()!r}")
  return x.astype(bool)


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]
                  ) -> McNemarResult:
  """McNemar's exact paired test on per-example correctness of two runs."""
  a, b = (_correctness(x, name) for x, name in ((correct_a, "correct_a"),
                                                (correct_b, "correct_b")))
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(
        f"mcnemar_exact needs two equal-length vectors, got {a.shape} and "
        f"{b.shape}")
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n = only_a + only_b
  if n == 0:
    return McNemarResult(0, 0, 1.0)
  # Exact integer tail sum: no scipy, no float cancellation.
  tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
  return McNemarResult(only_a, only_b, min(1.0, 2 * tail / 2**n))


def _check_lengths(examples: Sequence[Example], outputs: Sequence) -> None:
  if len(examples) != len(outputs):
    raise ValueError(
        f"{len(outputs)} generations for {len(examples)} examples")

"""The scores the training loop's `Evaluator` reports, pinned by oracles.

Runs of the tiny model only show that a score lies in its range (a random
model gets some answers right by chance), which a scorer that always said
0 would pass. Here its generation or option scoring is replaced by an
oracle that answers right, or wrong, so every path must report exactly
full or zero marks: multiple choice by log-likelihood and by generation,
math by the final number, SuperNI by exact match and ROUGE-L (0-100).
The oracles look each answer up by the prompt (and option) text they are
given, so answers handed back in another order than the examples score
wrong too.
"""

from __future__ import annotations

import dataclasses

import pytest

from train import configs
from train import evaluate
from train import loop
from train.data import Example


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  # eval.after on: a run without evaluation holds no evaluation examples.
  cfg = configs.replace(
      configs.get_config('tiny'),
      run_dir=str(tmp_path_factory.mktemp('eval_scores') / 'run'),
      **{'data.seq_len': 96, 'eval.after': True})
  return loop.build(cfg)


def evaluator(r, examples=None, **eval_changes):
  """An `Evaluator` of `r` on `examples` under changed eval.* settings.

  Its target loss (a real forward pass, compiled per evaluator) is stubbed:
  it is not a score under test, and compiling it would take most of the
  time here.
  """
  r = dataclasses.replace(
      r, config=configs.replace(
          r.config, **{f'eval.{k}': v for k, v in eval_changes.items()}),
      eval_examples=r.eval_examples if examples is None else examples)
  ev = loop.Evaluator(r)
  ev.target_loss = lambda state: 0.5
  return ev


def generate_from(ev, answer):
  """Stands in for greedy generation: ``answer(example)`` per prompt."""
  tok = ev.r.tokenizer

  def example(ids):
    # By the prompt text, not the position: an order mix-up must not pass.
    # A long prompt arrives cut from the left (as in training).
    text = tok.decode(ids)
    found = [e for e in ev.examples if e.prompt.endswith(text)]
    assert len(found) == 1, text
    return found[0]

  def generate(state, prompts_ids):
    return [answer(example(ids)) for ids in prompts_ids]

  ev._generate = generate  # pylint: disable=protected-access


def score_from(ev, score):
  """Stands in for the model's option log-likelihoods: ``score(example,
  option index)`` for every (prompt, option) pair and every option of a
  shared-row request."""
  tok = ev.r.tokenizer
  index = {(e.prompt, o): (e, i) for e in ev.examples
           for i, o in enumerate(e.options)}

  def one(prompt_ids, option_ids):
    return score(*index[tok.decode(prompt_ids), tok.decode(option_ids)])

  def pairs(state, pairs):
    return [one(p, o) for p, o in pairs]

  def alternatives(state, requests):
    return [[one(p, list(shared) + [t]) for t in last]
            for p, shared, last in requests]

  ev._score_pairs = pairs  # pylint: disable=protected-access
  ev._score_last_token_alternatives = alternatives  # pylint: disable=protected-access


def choice(prompt, options, gold, labels=None, task='arc_challenge'):
  # Labels are bare words, as the tasks' are ('answer2', 'true').
  return Example(prompt, options[gold], task=task, options=tuple(options),
                 labels=tuple(labels or (o.strip() for o in options)),
                 gold_index=gold)


# Gold indices not all 0: ties and an all-equal scorer pick option 0.
# The 'answerK' items share a row (options differ in their last token
# only), the others are scored a pair at a time: both paths are covered.
CHOICES = [
    choice('Which one? ', [f' the correct answer is answer{k}'
                           for k in '1234'], 2,
           labels=[f'answer{k}' for k in '1234']),
    choice('Pick: ', [' A', ' BBBBBB', ' CC'], 1),
    choice('Is it? ', [' true', ' false'], 1, task='boolq'),
    choice('Five of them. ', [f' the correct answer is answer{k}'
                              for k in '12345'], 4,
           labels=[f'answer{k}' for k in '12345']),
]


def test_loglik_multiple_choice_scores_the_gold_option(built):
  ev = evaluator(built, CHOICES)
  assert ev.method == 'loglik'
  score_from(ev, lambda e, i: 0.0 if i == e.gold_index else -3.0)
  res = ev(built.state)
  assert res['accuracy'] == 1.0 and res['num_examples'] == len(CHOICES)
  score_from(ev, lambda e, i: -3.0 if i == e.gold_index else 0.0)
  assert ev(built.state)['accuracy'] == 0.0


def test_loglik_follows_eval_length_normalized(built):
  # The gold option has the lower sum but the higher mean per token.
  examples = [choice('Short or long? ', [' A', ' BBBBBBB'], 1),
              choice('Long or short? ', [' CCCCCCC', ' D'], 0)]

  def score(e, i):
    return -1.0 * len(e.options[i]) if i == e.gold_index else -4.0

  for normalized, accuracy in ((False, 0.0), (True, 1.0)):
    ev = evaluator(built, examples, length_normalized=normalized)
    score_from(ev, score)
    assert ev(built.state)['accuracy'] == accuracy, normalized


def test_generated_multiple_choice_parses_the_named_option(built):
  ev = evaluator(built, CHOICES, method='generation')
  assert ev.method == 'generation'
  generate_from(ev, lambda e: f'the correct answer is {e.labels[e.gold_index]}')
  res = ev(built.state)
  assert res['accuracy'] == 1.0 and res['num_examples'] == len(CHOICES)
  generate_from(ev, lambda e: f'the correct answer is '
                              f'{e.labels[e.gold_index - 1]}')
  assert ev(built.state)['accuracy'] == 0.0


def test_generation_prompts_leave_room_in_the_models_context(built):
  """With data.seq_len at the model's context, generation prompts are cut
  to leave eval.max_new_tokens room (the Sampler had refused them after
  training); a max_new_tokens that leaves none is refused up front."""
  context = built.model.config.max_seq_len
  r = dataclasses.replace(built, config=configs.replace(
      built.config, **{'data.seq_len': context, 'eval.max_new_tokens': 24}))
  assert len(loop._gemma_prompt('x ' * 3000, r)) == context - 24  # pylint: disable=protected-access
  assert len(loop._gemma_prompt('x', r)) == 2  # pylint: disable=protected-access
  with pytest.raises(loop.ConfigError) as e:
    evaluator(built, method='generation', max_new_tokens=context - 1)
  assert str(e.value) == (
      f'eval.max_new_tokens {context - 1} leaves no room for a prompt (BOS '
      f"and a token) in the model's context of {context} tokens.")


def test_math_scores_the_final_number_of_the_runs_own_examples(built):
  # tiny's own evaluation set (arithmetic), as a training run scores it.
  ev = evaluator(built)
  assert len(ev.examples) == 16 and all(e.gold_number for e in ev.examples)
  generate_from(ev, lambda e: e.target)
  res = ev(built.state)
  assert res['accuracy'] == 1.0 and res['num_examples'] == 16
  assert ev.last_generations == [e.target for e in ev.examples]
  generate_from(ev, lambda e: f' {int(e.gold_number) + 1}')
  assert ev(built.state)['accuracy'] == 0.0


def test_math_scores_the_answer_before_eval_stop(built):
  # Past the stop a made-up next question ends in another number: scored
  # without the cut, its number would be taken as the answer.
  ev = evaluator(built, stop='\n')
  generate_from(ev, lambda e: f'{e.target}\nQuestion: 1{e.gold_number}7')
  assert ev(built.state)['accuracy'] == 1.0
  assert ev.last_generations == [e.target for e in ev.examples]
  ev = evaluator(built, stop='')
  generate_from(ev, lambda e: f'{e.target}\nQuestion: 1{e.gold_number}7')
  assert ev(built.state)['accuracy'] == 0.0


def test_examples_without_gold_are_counted_apart(built):
  """Accuracy is over the examples with a gold answer: num_scored says how
  many (num_examples alone had overstated the denominator)."""
  examples = list(built.eval_examples[:6])
  examples[1:3] = [dataclasses.replace(e, gold_number=None)
                   for e in examples[1:3]]
  ev = evaluator(built, examples)
  generate_from(ev, lambda e: e.target if e is not examples[0] else ' -1')
  res = ev(built.state)
  assert (res['num_examples'], res['num_scored']) == (6, 4)
  assert res['accuracy'] == 3 / 4
  mc = [dataclasses.replace(CHOICES[0], gold_index=None)] + CHOICES[1:]
  ev = evaluator(built, mc)
  score_from(ev, lambda e, i: 0.0 if i == e.gold_index else -3.0)
  res = ev(built.state)
  assert (res['num_examples'], res['num_scored'], res['accuracy']) == (
      len(mc), len(mc) - 1, 1.0)


def test_eval_stop_cuts_after_a_leading_newline(built):
  # A target that starts on a new line (GSM8K's '\nA: ...'): cut at the
  # first '\n' it was '' and scored wrong.
  ev = evaluator(built, stop='\n')
  generate_from(ev, lambda e: f'\n {e.gold_number}\nQuestion: 1')
  assert ev(built.state)['accuracy'] == 1.0
  assert ev.last_generations == [f'\n {e.gold_number}' for e in ev.examples]


SUPERNI = [Example(f'Definition: copy. Input: {w}\nOutput:', w, task='superni')
           for w in ('cat', 'dog', 'red hat')]


def test_superni_exact_match_and_rouge_l_in_percent(built):
  ev = evaluator(built, SUPERNI)
  assert ev.method == 'generation'
  generate_from(ev, lambda e: e.target)
  res = ev(built.state)
  assert res['exact_match'] == 100.0 and res['rougeL'] == 100.0
  assert res['num_examples'] == 3
  generate_from(ev, lambda e: 'zebra')
  res = ev(built.state)
  assert res['exact_match'] == 0.0 and res['rougeL'] == 0.0
  # Apart: one exact answer, one half right ('red cap': ROUGE-L F 1/2),
  # one wrong; the two must not be swapped or mixed up.
  partial = {'cat': 'Cat.', 'dog': 'zebra', 'red hat': 'red cap'}
  generate_from(ev, lambda e: partial[e.target])
  res = ev(built.state)
  assert res['exact_match'] == pytest.approx(100 / 3)
  assert res['rougeL'] == pytest.approx(100 * (1 + 0 + 0.5) / 3)
  # The same as the model-free metric on those texts.
  assert res['rougeL'] == pytest.approx(evaluate.superni_evaluate(
      SUPERNI, [partial[e.target] for e in SUPERNI])['rougeL'])


def test_option_scores_are_the_models_own_log_probabilities(built):
  """The scored log-likelihood is the sum of the model's log-softmax at
  each option token, as a plain forward pass gives it: the scoring batch
  had been checked only against the same batch builder (positions left at
  0 passed every test)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from train import trees  # pylint: disable=g-import-not-at-top
  r = built
  bos = r.tokenizer.bos_id
  pairs = [([bos, 40, 41, 42, 43, 44], [50, 51, 52]), ([bos, 7], [60])]
  got = evaluator(r)._score_pairs(r.state, pairs)  # pylint: disable=protected-access
  model = nnx.merge(r.eval_graphdef, trees.int_keys(r.state['params']),
                    r.rngs, r.base)
  for (prompt, option), score in zip(pairs, got):
    logp = np.asarray(jax.nn.log_softmax(
        model(np.asarray([prompt + option], np.int32)), axis=-1))[0]
    want = sum(float(logp[len(prompt) - 1 + j, t])
               for j, t in enumerate(option))
    np.testing.assert_allclose(score, want, rtol=1e-5, atol=1e-5)

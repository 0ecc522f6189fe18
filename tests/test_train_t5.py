"""The training loop on encoder-decoder models (`tiny_t5`): it learns,
checkpoints, resumes exactly, exports a PEFT adapter, evaluates by
generation and by scoring; the mT5-XXL paper preset checks out abstractly;
bad T5 options stop with one line."""

from __future__ import annotations

import dataclasses
import csv
import json
import os

import jax
import numpy as np
import pytest

from train import cli
from train import configs
from train import loop
from train import trees as trees_lib
from train.data import Example
from train.data import ByteTokenizer
from train.data import seq2seq

# One xdist worker: the uninterrupted run and the built model are made once.
pytestmark = pytest.mark.xdist_group('train_t5')

FAST = {'steps': 24, 'log_every': 1, 'checkpoint_every': 12,
        'progress': False}


def tiny_t5(run_dir, **changes):
  return configs.replace(configs.get_config('tiny_t5'), run_dir=str(run_dir),
                         **{**FAST, **changes})


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """One uninterrupted tiny_t5 run, evaluated at the end."""
  run_dir = tmp_path_factory.mktemp('straight_t5') / 'run'
  return loop.run(tiny_t5(run_dir, **{'eval.after': True}),
                  log=lambda s: None)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  return loop.build(tiny_t5(tmp_path_factory.mktemp('unused')))


def test_tiny_t5_loss_falls_and_writes_outputs(straight):
  losses = [h['loss'] for h in straight['history']]
  assert len(losses) == FAST['steps']
  assert all(np.isfinite(losses))
  # ln(259) ~ 5.6 (a random model starts higher); the answer format (a
  # space, digits, EOS) is learnt within a couple of dozen steps.
  assert np.mean(losses[-3:]) < losses[0] - 2.0, losses
  assert straight['checkpoints'] == [12, 24]
  run_dir = straight['run_dir']
  with open(os.path.join(run_dir, 'metrics.csv')) as f:
    rows = list(csv.DictReader(f))
  for key in ('loss', 'lr', 'grad_norm', 'update_ratio_a', 'update_ratio_b',
              'tokens_per_s', 'target_tokens'):
    assert key in rows[0], key
  assert float(rows[-1]['update_ratio_b']) > 0
  # Every target token is scored: 8 rows of ' <1-3 digits>' + EOS.
  assert 8 * 2 <= float(rows[0]['target_tokens']) <= 8 * 5
  adapter = os.path.join(run_dir, 'adapter')
  cfg = json.load(open(os.path.join(adapter, 'adapter_config.json')))
  assert cfg['task_type'] == 'SEQ_2_SEQ_LM' and cfg['r'] == 4
  saved = configs.from_dict(json.load(open(os.path.join(run_dir,
                                                        'config.json'))))
  assert saved.model.family == 't5' and saved.data.target_len == 8


def test_tiny_t5_evaluates_by_generation(straight):
  res = straight['eval_after']
  assert res['num_examples'] == 16
  assert 0.0 <= res['accuracy'] <= 1.0


def test_tiny_t5_resume_continues_exactly(straight, tmp_path):
  run_dir = tmp_path / 'run'
  first = loop.run(tiny_t5(run_dir), log=lambda s: None, stop_at=12)
  assert first['steps'] == 12 and first['checkpoints'] == [12]
  second = loop.run(tiny_t5(run_dir, resume=True), log=lambda s: None)
  # The history is the whole run's (steps up to 12 from metrics.csv).
  resumed = [h['loss'] for h in second['history']]
  expected = [h['loss'] for h in straight['history']]
  assert resumed == expected


def test_superni_style_generation_metrics(built):
  # A copy: `built` is shared by the module's other tests.
  r = dataclasses.replace(built, eval_examples=[
      Example(prompt=f'Definition: copy. Input: {w}\nOutput:', target=w,
              task='superni') for w in ('cat', 'dog', 'red hat')])
  ev = loop.Evaluator(r)
  assert ev.method == 'generation'
  res = ev(r.state)
  assert set(res) >= {'exact_match', 'rougeL'}
  assert 0.0 <= res['rougeL'] <= 100.0 and len(ev.last_generations) == 3


def test_multiple_choice_shares_one_row_across_last_token_options(built):
  from tests.test_train_loop import check_alternatives_match_pairs  # pylint: disable=g-import-not-at-top
  check_alternatives_match_pairs(built, 'ans', ('x', 'yyyy'))


def test_options_longer_than_the_decoder_are_refused(built):
  """An option longer than data.target_len would be cut, and options cut
  to a shared prefix score alike (every prediction option 0): refused when
  the evaluator is made, before a run writes anything."""
  target_len = built.config.data.target_len
  long = ['the correct answer is ' + k for k in 'ABCD']
  assert min(len(o) for o in long) > target_len  # bytes: one token each
  item = Example('Which?', long[1], options=tuple(long), labels='ABCD',
                 gold_index=1, task='arc_challenge')
  r = dataclasses.replace(built, eval_examples=[item])
  with pytest.raises(loop.ConfigError, match=(
      rf"option 'the correct answer is A' of evaluation example 0 "
      rf"\(arc_challenge\) is 23 tokens, but a scoring row holds "
      rf"{target_len} target tokens \(--data.target_len\)")):
    loop.Evaluator(r)
  short = dataclasses.replace(item, options=('A', 'B'), target='B',
                              labels='AB', gold_index=1)
  assert loop.Evaluator(dataclasses.replace(
      built, eval_examples=[short])).method == 'loglik'


def test_scoring_is_the_teacher_forced_loss(built):
  """Evaluator scores (multiple choice by log-likelihood) = log p(option |
  prompt) of the decoder, computed by hand from the full logits."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  r = built
  ev = loop.Evaluator(r)
  tok = r.tokenizer
  pairs = [([tok.bos_id, 40, 41, 42], [50, 51]), ([tok.bos_id], [60])]
  got = ev._score_pairs(r.state, pairs)  # pylint: disable=protected-access
  model = nnx.merge(r.eval_graphdef, trees_lib.int_keys(r.state['params']),
                    r.rngs, r.base)
  # One padded batch (encoder padding is masked, decoder padding comes
  # after the scored positions), one compile.
  enc = np.zeros((2, 4), np.int32)
  dec = np.zeros((2, 2), np.int32)
  for i, (prompt, option) in enumerate(pairs):
    ids = prompt[1:] + [tok.eos_id]
    enc[i, :len(ids)] = ids
    dec[i, 1:len(option)] = option[:-1]
  logp = np.asarray(jax.nn.log_softmax(
      nnx.jit(lambda m, e, d: m(e, d))(model, enc, dec), axis=-1))
  for i, ((_, option), score) in enumerate(zip(pairs, got)):
    want = sum(float(logp[i, j, t]) for j, t in enumerate(option))
    np.testing.assert_allclose(score, want, rtol=1e-5, atol=1e-5)


def test_target_loss_scores_rows_as_training_makes_them(built):
  """The held-out loss sees what training sees: the encoder the last
  seq_len - 1 prompt tokens (+EOS) whatever the target's length, the decoder
  target_len target tokens, divided by the tokens scored. (It used to cut
  the prompt to fit prompt + target in seq_len, as for a decoder-only row,
  and divide by the uncut target.)"""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from train.data import Example  # pylint: disable=g-import-not-at-top
  r = built
  ev = loop.Evaluator(r)
  d = r.config.data
  examples = [Example(prompt='q' * 40 + 'w' * 200, target='t' * 30),
              Example(prompt='short', target='ab')]
  got = ev.target_losses(r.state, examples)
  model = nnx.merge(r.eval_graphdef, trees_lib.int_keys(r.state['params']),
                    r.rngs, r.base)
  for example, loss in zip(examples, got):
    row = seq2seq.tokenize_seq2seq(
        example, r.tokenizer, input_len=d.seq_len, target_len=d.target_len,
        start_id=r.model.config.decoder_start_token_id)
    logits = model(row['encoder_tokens'][None], row['decoder_tokens'][None])
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[0]
    nll = -sum(w * logp[j, t] for j, (t, w) in enumerate(
        zip(row['targets'], row['weights'])))
    np.testing.assert_allclose(loss, nll / row['weights'].sum(), rtol=1e-5)


def test_seq2seq_rows():
  tok = ByteTokenizer()
  row = seq2seq.tokenize_seq2seq(Example(prompt='abcdef', target='xy'), tok,
                                 input_len=4, target_len=4)
  b = lambda s: [c + 3 for c in s.encode()]
  # Prompt cut from the left, EOS kept; decoder = start, targets shifted.
  assert row['encoder_tokens'].tolist() == b('def') + [tok.eos_id]
  assert row['targets'].tolist() == b('xy') + [tok.eos_id, 0]
  assert row['decoder_tokens'].tolist() == [0] + b('xy') + [0]
  assert row['weights'].tolist() == [1, 1, 1, 0]
  assert int(row['dropped']) == 0
  short = seq2seq.tokenize_seq2seq(Example(prompt='a', target='xyz'), tok,
                                   input_len=4, target_len=2)
  assert short['targets'].tolist() == b('xy') and int(short['dropped']) == 2
  assert short['encoder_tokens'].tolist() == b('a') + [tok.eos_id, 0, 0]
  # A length of 0 is refused where it is given: encoder_ids had kept the
  # whole prompt (ids[-0:]), and the dataset had failed only when read.
  for call in (lambda: seq2seq.encoder_ids('abc', tok, 0),
               lambda: seq2seq.encoder_tokens_cut(Example('abc', 'x'), tok, 0),
               lambda: seq2seq.make_seq2seq_train_dataset(
                   [Example('a', 'b')], tok, input_len=0, target_len=8,
                   batch_size=1, seed=0, num_threads=0)):
    with pytest.raises(ValueError, match=r'^need input_len >= 1 and '
                       r'target_len >= 1, got 0, (1|8)$'):
      call()


def test_paper_mt5xxl_superni_checks_out_abstractly():
  """The preset validates and its adapters and optimizer state build on
  mT5-XXL's shapes (nnx.eval_shape: no weight is allocated)."""
  cfg = configs.get_config('paper_mt5xxl_superni')
  assert (cfg.model.family, cfg.data.target_len, cfg.data.seq_len) == (
      't5', 256, 1024)
  doc = configs.PRESETS['paper_mt5xxl_superni'].__doc__
  assert 'not publish' in doc and 'spiece.model' in doc
  params, opt_state = loop.abstract_state(cfg)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  # 24 encoder blocks x (q k v o wi_0 wi_1 wo) + 24 decoder blocks x
  # (self q k v o, cross q k v o, wi_0 wi_1 wo), an A and a B each.
  assert len(leaves) == 2 * (24 * 7 + 24 * 11)
  # r (in + out) per projection: attention 16 (4096 + 4096), FFN
  # 16 (4096 + 10240); ~0.5% of the 13B base.
  attn, ffn = 16 * (4096 + 4096), 16 * (4096 + 10240)
  n = sum(int(np.prod(x.shape)) for _, x in leaves)
  assert n == 24 * (4 * attn + 3 * ffn) + 24 * (8 * attn + 3 * ffn), n
  assert all(16 in x.shape for _, x in leaves)
  assert jax.tree.leaves(opt_state)


@pytest.mark.parametrize('config, extra, message', [
    ('tiny_t5', ['--data.target_len', '0'], 'data.target_len must be >= 1'),
    ('tiny_t5', ['--data.pack'], 'data.pack is for decoder-only models'),
    ('tiny_t5', ['--data.max_target_tokens', '4'],
     'data.max_target_tokens 4 is for decoder-only'),
    ('tiny', ['--data.target_len', '8'], 'data.target_len 8 is for '
     'encoder-decoder models'),
    ('tiny_t5', ['--model.family', 'bert'], "model.family must be one of"),
])
def test_bad_t5_options_one_line_nothing_written(tmp_path, capsys, config,
                                                 extra, message):
  run_dir = tmp_path / 'run'
  code = cli.main(['--config', config, '--run_dir', str(run_dir)] + extra)
  err = capsys.readouterr().err.strip()
  assert code != 0
  assert len(err.splitlines()) == 1, err
  assert err.startswith('error: ') and message in err, err
  assert not run_dir.exists()


def test_t5_tokenizer_from_a_sentencepiece_folder(tmp_path):
  """A Hugging Face T5 folder's spiece.model: pad 0, EOS 1, no BOS added."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  text = tmp_path / 'corpus.txt'
  text.write_text('\n'.join(f'{a} plus {b} is {a + b}' for a in range(30)
                            for b in range(10)))
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(tmp_path / 'spiece'), vocab_size=40,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  tok = loop.load_t5_tokenizer(configs.ModelConfig(family='t5'),
                               str(tmp_path))
  assert (tok.pad_id, tok.eos_id) == (0, 1)
  ids = tok.encode('3 plus 4 is 7')
  assert ids and 0 not in ids and 1 not in ids
  model = loop.load_t5_model(configs.ModelConfig(family='t5', name='tiny'),
                             '', 0, tok)
  assert model.config.vocab_size == 40
  with pytest.raises(loop.ConfigError, match='pad / EOS ids'):
    from models import t5  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    other = t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0))
    t5.save_pretrained(other, tmp_path / 'ckpt')  # pad 0, EOS 1 ...
    loop.load_t5_model(configs.ModelConfig(family='t5'),
                       str(tmp_path / 'ckpt'), 0, ByteTokenizer())  # ... EOS 2
  # SentencePiece's default layout has no pad piece (pad_id -1); a model
  # trained without EOS has none either. A random T5 had taken -1 for them,
  # which indexing wraps round to the last row: it trained silently.
  for name, ids in (('default', {}), ('noeos', dict(pad_id=0, eos_id=-1,
                                                    unk_id=2, bos_id=-1))):
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / name), vocab_size=40,
        minloglevel=2, **ids)
    tok = loop.load_t5_tokenizer(
        configs.ModelConfig(family='t5', tokenizer=str(tmp_path / name) +
                            '.model'), '')
    with pytest.raises(loop.ConfigError, match=(
        r'model.tokenizer: the SentencePiece model has no (pad|EOS) piece '
        r'\(pad_id -?\d, eos_id -?\d\); T5 needs both')):
      loop.load_t5_model(configs.ModelConfig(family='t5', name='tiny'), '', 0,
                         tok)
  with pytest.raises(ValueError, match=r'T5Config.pad_token_id must be a '
                     r'token id in \[0, 40\), got -1'):
    t5.get_config('tiny', vocab_size=40, pad_token_id=-1)


def test_tiny_t5_lora_ga_init_trains(tmp_path):
  """LoRA-GA reads the gradient off T5's own (encoder-decoder) batches."""
  built = loop.build(tiny_t5(tmp_path / 'b', **{'lora.init': 'lora_ga',
                                                 'lora.ga_batches': 1}))
  # B starts non-zero: the factors came from the gradient, not Kaiming/zero.
  assert all(np.abs(np.asarray(x)).max() > 0
             for x in jax.tree.leaves(built.state['params']))
  out = loop.run(tiny_t5(tmp_path / 'run', steps=3,
                         **{'lora.init': 'lora_ga', 'lora.ga_batches': 1}),
                 log=lambda s: None)
  assert len(out['history']) == 3
  assert all(np.isfinite(h['loss']) for h in out['history'])


def test_generate_cli_decodes_a_t5_folder_with_its_adapter(tmp_path, capsys):
  """python -m models.generate on a T5 folder (it had been Gemma-only, so a
  T5 run's exported adapter could not be tried): the prompt and EOS are the
  encoder's input, decoding is greedy and ends at EOS, as the loop's
  evaluation decodes; --adapter applies the PEFT adapter."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import generate, lora, t5  # pylint: disable=g-import-not-at-top
  text = tmp_path / 'corpus.txt'
  text.write_text('\n'.join(f'{a} plus {b} is {a + b}' for a in range(30)
                            for b in range(10)))
  ckpt = tmp_path / 'ckpt'
  ckpt.mkdir()
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(ckpt / 'spiece'), vocab_size=40,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  model = t5.T5(t5.get_config('tiny', vocab_size=40), rngs=nnx.Rngs(3))
  t5.save_pretrained(model, ckpt)
  lora.apply_lora(model, ('q', 'v'), rank=2, alpha=4.0, rngs=1)
  rng = np.random.default_rng(0)
  for proj in lora.select(model, ('q', 'v')).values():
    b = proj.lora.lora_b
    b.set_value(jax.numpy.asarray(rng.normal(size=b.shape) * 3, np.float32))
  lora.save_peft_adapter(model, tmp_path / 'adapter', str(ckpt))
  tok = loop.load_t5_tokenizer(configs.ModelConfig(family='t5'), str(ckpt))
  enc = np.asarray([tok.encode('3 plus 4 is') + [tok.eos_id]], np.int32)
  argv = ['--checkpoint', str(ckpt), '--prompt', '3 plus 4 is',
          '--max-new-tokens', '6']
  for extra, m in (([], t5.from_pretrained(ckpt)),
                   (['--adapter', str(tmp_path / 'adapter')], model)):
    want = np.asarray(t5.greedy_generate(m, enc, 6))[0].tolist()
    want = want[:want.index(1)] if 1 in want else want
    assert generate.main(argv + extra) == 0
    assert capsys.readouterr().out == tok.decode(want) + '\n'
  outs = [generate.main(argv + extra) or capsys.readouterr().out
          for extra in ([], ['--adapter', str(tmp_path / 'adapter')])]
  assert outs[0] != outs[1]  # the adapter changes the reply
  assert generate.main(argv + ['--temperature', '1']) == 2
  assert capsys.readouterr().err == ('error: T5 / mT5 checkpoints decode '
                                     'greedily here: leave out '
                                     '--temperature.\n')
  # --top-k alone had been told to add --temperature, which T5 refused; a
  # --seed had been ignored.
  assert generate.main(argv + ['--top-k', '5', '--seed', '3']) == 2
  assert capsys.readouterr().err == ('error: T5 / mT5 checkpoints decode '
                                     'greedily here: leave out --top-k, '
                                     '--seed.\n')
  # A tokenizer whose EOS is not the model's (the train loop refuses it):
  # the prompt had ended in the wrong EOS, silently.
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(tmp_path / 'other'), vocab_size=40,
      pad_id=0, eos_id=2, unk_id=1, bos_id=-1, minloglevel=2)
  assert generate.main(argv + ['--tokenizer',
                               str(tmp_path / 'other.model')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and "pad / EOS ids (0, 2) are not the " in err


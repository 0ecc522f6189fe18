"""models.t5: numerics against transformers, HF-layout I/O, decoding, errors."""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from models import hf_io, lora, t5

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'data'))
import t5_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

ENC = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
DEC = jnp.array([[0, 3, 4, 5], [0, 7, 8, 9]])


@pytest.fixture(scope='module')
def tiny():
  return t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def forward():
  # Eager: its per-op compilations are shared with the other tests (and with
  # test_lora_wrapper's models of the same widths); jit would compile anew
  # for every input shape.
  return lambda m, e, d: m(e, d)


def test_original_t5_config_without_feed_forward_proj_is_relu():
  # t5-small's config.json has no feed_forward_proj: HF defaults to 'relu'.
  cfg = t5.config_from_hf({'model_type': 't5', 'vocab_size': 32128,
                           'd_model': 512, 'd_kv': 64, 'd_ff': 2048,
                           'num_layers': 6, 'num_heads': 8})
  assert cfg.feed_forward_proj == 'relu' and cfg.tie_word_embeddings
  assert t5.config_from_hf({'model_type': 'mt5', 'vocab_size': 250112,
                            'd_model': 512, 'd_kv': 64, 'd_ff': 1024,
                            'num_layers': 8, 'num_heads': 6,
                            'feed_forward_proj': 'gated-gelu'}
                           ).feed_forward_proj == 'gated-gelu'


def test_absent_mt5_fields_take_mt5_defaults(tmp_path):
  """MT5Config unties the head and gates its MLP by default: an mT5
  config.json without those keys had loaded as a tied ReLU model (the
  checkpoint's own lm_head dropped silently, logits off by ~4)."""
  cfg = dict(t5_reference.CONFIGS['gated'])
  t5_reference.random_checkpoint(str(tmp_path), cfg, seed=1)
  del cfg['tie_word_embeddings'], cfg['feed_forward_proj']
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  model = t5.from_pretrained(tmp_path)
  assert not model.config.tie_word_embeddings and model.config.is_gated
  out = model(jnp.asarray(t5_reference.ENCODER_TOKENS),
              jnp.asarray(t5_reference.DECODER_TOKENS))
  np.testing.assert_allclose(np.asarray(out),
                             load_file(t5_reference.REFERENCE)['gated'],
                             atol=2e-5, rtol=1e-5)


def test_a_tied_config_refuses_a_head_of_its_own(tmp_path):
  cfg = t5_reference.CONFIGS['tied_relu']
  tensors = t5_reference.random_checkpoint(str(tmp_path), cfg, seed=1)
  weights = tmp_path / 'model.safetensors'
  # A copy of the embedding (as some exporters write a tied head) loads.
  save_file({**tensors, 'lm_head.weight': tensors['shared.weight']},
            str(weights))
  t5.from_pretrained(tmp_path)
  save_file({**tensors, 'lm_head.weight': tensors['shared.weight'] + 1.0},
            str(weights))
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(tmp_path)
  assert str(e.value) == (
      f"{weights}: tensor 'lm_head.weight' is not the embedding "
      "'shared.weight', but config.json ties them (tie_word_embeddings true "
      'or absent); an untied head needs tie_word_embeddings false.')


def _reference_logits(model):
  return np.asarray(model(jnp.asarray(t5_reference.ENCODER_TOKENS),
                          jnp.asarray(t5_reference.DECODER_TOKENS)))


@pytest.mark.parametrize('model_type, extra', [
    ('t5', {'scale_decoder_outputs': False}),  # T5 v1.1 re-saved by v5
    ('mt5', {}),                               # mT5 re-saved by v5
])
def test_checkpoints_saved_by_transformers_5_load_untied(tmp_path, model_type,
                                                         extra):
  """transformers 5 writes tie_word_embeddings true for every T5 and mT5,
  with the head of its own saved beside it (and, for T5, the real setting as
  scale_decoder_outputs): such a re-saved v1.1 / mT5 checkpoint (the usual
  way to convert a pytorch_model.bin) had been refused as a tied config
  with a head of its own."""
  cfg = dict(t5_reference.CONFIGS['gated'], model_type=model_type,
             tie_word_embeddings=True, **extra)
  t5_reference.random_checkpoint(str(tmp_path), t5_reference.CONFIGS['gated'],
                                 seed=1)
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  model = t5.from_pretrained(tmp_path)
  assert not model.config.tie_word_embeddings
  np.testing.assert_allclose(_reference_logits(model),
                             load_file(t5_reference.REFERENCE)['gated'],
                             atol=2e-5, rtol=1e-5)


def test_a_head_tied_but_unscaled_by_transformers_5_loads(tmp_path):
  """transformers 5 takes the head from the embedding where the file has no
  lm_head.weight, and scales only where scale_decoder_outputs says so (T5;
  never mT5): a T5 v1.1 saved so had been refused for a missing lm_head,
  and such an mT5 had loaded with the original T5's rescaled head."""
  cfg = dict(t5_reference.CONFIGS['gated'])
  tensors = t5_reference.random_checkpoint(str(tmp_path), cfg, seed=1)
  weights = tmp_path / 'model.safetensors'
  save_file({**tensors, 'lm_head.weight': tensors['shared.weight']},
            str(weights))
  want = _reference_logits(t5.from_pretrained(tmp_path))  # Untied copy.
  save_file({k: v for k, v in tensors.items() if k != 'lm_head.weight'},
            str(weights))
  for extra in ({'model_type': 't5', 'scale_decoder_outputs': False},
                {'model_type': 'mt5', 'transformers_version': '5.25.0'}):
    (tmp_path / 'config.json').write_text(json.dumps(
        dict(cfg, tie_word_embeddings=True, **extra)))
    model = t5.from_pretrained(tmp_path)
    assert not model.config.tie_word_embeddings, extra
    np.testing.assert_allclose(_reference_logits(model), want, atol=1e-5,
                               rtol=1e-5)
  # Written by transformers 4: its tied mT5 head was rescaled.
  (tmp_path / 'config.json').write_text(json.dumps(dict(
      cfg, model_type='mt5', tie_word_embeddings=True,
      transformers_version='4.46.0')))
  model = t5.from_pretrained(tmp_path)
  assert model.config.tie_word_embeddings
  np.testing.assert_allclose(_reference_logits(model),
                             want * cfg['d_model'] ** -0.5, atol=1e-5,
                             rtol=1e-5)


def test_original_t5_checkpoints_load_past_their_unused_cross_bias(tmp_path):
  """t5-small/base/large hold a cross-attention position bias that no layer
  uses (transformers ignores it): it had been an 'unexpected tensor'."""
  cfg = t5_reference.CONFIGS['tied_relu']
  tensors = t5_reference.random_checkpoint(str(tmp_path), cfg, seed=1)
  name = 'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight'
  save_file({**tensors, name: np.ones((32, cfg['num_heads']), np.float32)},
            str(tmp_path / 'model.safetensors'))
  model = t5.from_pretrained(tmp_path)
  np.testing.assert_allclose(_reference_logits(model),
                             load_file(t5_reference.REFERENCE)['tied_relu'],
                             atol=2e-5, rtol=1e-5)
  # v5's original-T5 config: tied and rescaled, said by scale_decoder_outputs.
  (tmp_path / 'config.json').write_text(json.dumps(
      dict(cfg, scale_decoder_outputs=True)))
  assert t5.from_pretrained(tmp_path).config.tie_word_embeddings


def test_named_configs():
  assert t5.get_config('t5-v1_1-xxl').d_model == 4096
  assert t5.get_config('t5-v1_1-xxl').d_ff == 10240
  assert t5.get_config('mt5-xxl').vocab_size == 250112
  assert t5.get_config('mt5-small').num_decoder_layers == 8
  assert t5.get_config('mt5-large').d_ff == 2816
  assert not t5.get_config('mt5-base').tie_word_embeddings
  with pytest.raises(ValueError, match='Unknown T5 config'):
    t5.get_config('t5-huge')


@pytest.mark.parametrize('variant', sorted(t5_reference.CONFIGS))
def test_matches_transformers_logits(tmp_path, variant):
  # Logits of transformers' own T5 on the same weights (tests/data).
  t5_reference.random_checkpoint(str(tmp_path), t5_reference.CONFIGS[variant],
                                 seed=1)
  model = t5.from_pretrained(tmp_path)
  out = model(jnp.asarray(t5_reference.ENCODER_TOKENS),
              jnp.asarray(t5_reference.DECODER_TOKENS))
  ref = load_file(t5_reference.REFERENCE)[variant]
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)


def test_every_param_has_logical_axes(tiny):
  specs = nnx.get_partition_spec(nnx.state(tiny, nnx.Param))
  for (path, spec), (_, x) in zip(
      jax.tree_util.tree_leaves_with_path(specs),
      jax.tree_util.tree_leaves_with_path(nnx.state(tiny, nnx.Param))):
    assert len(spec) == x.ndim and any(a is not None for a in spec), path
  names = {a for spec in jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
           for a in spec}
  assert {'vocab', 'embed', 'heads', 'head_dim', 'mlp', 'norm'} <= names


@pytest.mark.parametrize('shard', [None, 40_000])
def test_save_load_round_trip_is_exact(tiny, tmp_path, shard):
  t5.save_pretrained(tiny, tmp_path, max_shard_bytes=shard)
  if shard:
    assert (tmp_path / hf_io.SAFETENSORS_INDEX).is_file()
    assert not (tmp_path / hf_io.SAFETENSORS).exists()
  loaded = t5.from_pretrained(tmp_path)
  assert loaded.config == tiny.config
  for a, b in zip(jax.tree.leaves(nnx.state(tiny)),
                  jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Same names and [out, in] orientation as transformers.
  names = hf_io.load_tensors(tmp_path)
  assert names['encoder.block.0.layer.0.SelfAttention.q.weight'].shape == (32, 32)
  assert names['decoder.block.1.layer.2.DenseReluDense.wi_0.weight'].shape == (48, 32)
  assert names['lm_head.weight'].shape == (128, 32)
  assert json.loads((tmp_path / 'config.json').read_text())[
      'architectures'] == ['T5ForConditionalGeneration']


def test_checkpoint_dropout_is_usable(tiny, tmp_path):
  # eval_shape leaves dropout's RNG streams abstract; the loader fills them.
  t5.save_pretrained(tiny, tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps(dict(cfg, dropout_rate=0.5)))
  assert t5.from_pretrained(tmp_path).config.dropout_rate == 0.0
  model = t5.from_pretrained(tmp_path, dropout_rate=None)
  assert model.config.dropout_rate == 0.5
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      assert not isinstance(var.get_value(), jax.ShapeDtypeStruct), path
  # One dropout site (a whole jitted forward with ~30 of them compiles for
  # tens of seconds on CPU): fresh masks per call, identity after eval().
  x = jnp.ones((64,))
  a, b = model.encoder.dropout(x), model.encoder.dropout(x)
  assert set(np.unique(a)) == {0.0, 2.0} and not np.array_equal(a, b)
  model.eval()
  np.testing.assert_array_equal(model.encoder.dropout(x), x)
  # Saving writes the checkpoint's rate back, not the loader's override (a
  # load, fine-tune and save had written 0.0 over the checkpoint's 0.5).
  for loaded, out in ((t5.from_pretrained(tmp_path), 'default'),
                      (t5.from_pretrained(tmp_path, dropout_rate=0.1), 'set')):
    t5.save_pretrained(loaded, tmp_path / out)
    saved = json.loads((tmp_path / out / 'config.json').read_text())
    assert saved == dict(cfg, dropout_rate=0.5)
  # A model built from a config writes its own.
  t5.save_pretrained(tiny, tmp_path / 'built')
  assert json.loads((tmp_path / 'built' / 'config.json').read_text())[
      'dropout_rate'] == tiny.config.dropout_rate == 0.0


def test_padding_does_not_change_logits(tiny, forward):
  # T5 has only relative positions, so with a working mask the same tokens
  # padded on the right or on the left give the same decoder logits.
  enc = jnp.array([[5, 6, 7, 8, 0, 0], [0, 0, 5, 6, 7, 8]])
  dec = jnp.array([[0, 3, 4, 5], [0, 3, 4, 5]])
  out = forward(tiny, enc, dec)
  np.testing.assert_allclose(out[0], out[1], atol=1e-5)


def test_decoder_is_causal(tiny, forward):
  a = forward(tiny, ENC, DEC)
  b = forward(tiny, ENC, DEC.at[:, -1].set(99))
  np.testing.assert_allclose(a[:, :-1], b[:, :-1], atol=1e-6)


def test_cached_greedy_equals_full_forward(tiny, forward):
  tokens, logits = t5.greedy_generate(tiny, ENC, 4, return_logits=True)
  assert tokens.shape == (2, 4)
  start = jnp.full((2, 1), tiny.config.decoder_start_token_id)
  full = forward(tiny, ENC, jnp.concatenate([start, tokens[:, :-1]], axis=1))
  steps = logits.shape[1]
  np.testing.assert_allclose(logits, full[:, :steps], atol=1e-4)
  np.testing.assert_array_equal(tokens[:, :steps], jnp.argmax(full, -1)[:, :steps])


def test_greedy_ends_compile_nothing_new_whatever_the_length(tiny,
                                                              monkeypatch,
                                                              caplog):
  """Batches that end after 2 and after 3 tokens: the stack and pad of the
  tokens taken had compiled again for each new length (up to 2 x
  max_new_tokens small programs over a run's evaluations)."""
  eos, pad = tiny.config.eos_token_id, tiny.config.pad_token_id
  stop = {'at': 2}

  def decode_step(model, token, cross, valid, cache, i):
    del model, token, cross, valid
    nxt = jnp.where(i >= stop['at'], eos, 7) * jnp.ones((2,), jnp.int32)
    return nxt, jnp.zeros((2, 3)), cache

  monkeypatch.setattr(t5, '_decode_step', decode_step)
  first = t5.greedy_generate(tiny, ENC, 6)
  stop['at'] = 3
  with jax.log_compiles(), caplog.at_level('WARNING', logger='jax'):
    second = t5.greedy_generate(tiny, ENC, 6)
  np.testing.assert_array_equal(first[0], [7, 7, eos, pad, pad, pad])
  np.testing.assert_array_equal(second[0], [7, 7, 7, eos, pad, pad])
  compiled = [r.getMessage() for r in caplog.records
              if 'Compiling' in r.getMessage()]
  assert not compiled, compiled


def _write(tmp_path, config=None, tensors=None):
  tmp_path.mkdir(parents=True, exist_ok=True)
  if config is not None:
    (tmp_path / 'config.json').write_text(
        config if isinstance(config, str) else json.dumps(config))
  if tensors is not None:
    save_file(tensors, str(tmp_path / 'model.safetensors'))
  return tmp_path


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert '\n' not in msg and msg, msg
  return msg


def test_bad_inputs(tmp_path):
  cfg = t5_reference.CONFIGS['gated']
  good = t5_reference.random_checkpoint(str(tmp_path / 'good'), cfg)

  with pytest.raises(FileNotFoundError) as e:
    t5.from_pretrained(tmp_path / 'nowhere')
  assert 'nowhere' in _one_line(e)
  with pytest.raises(FileNotFoundError) as e:
    t5.from_pretrained(_write(tmp_path / 'noconfig', tensors=good))
  assert 'config.json' in _one_line(e)
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(_write(tmp_path / 'badjson', '{"d_model": 3,', good))
  assert 'not valid JSON' in _one_line(e)
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(_write(tmp_path / 'nofield',
                              {k: v for k, v in cfg.items() if k != 'd_kv'}, good))
  assert "missing required field 'd_kv'" in _one_line(e)
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(_write(tmp_path / 'gemma', dict(cfg, model_type='gemma'), good))
  assert 'not a T5/mT5' in _one_line(e)
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(_write(tmp_path / 'type', dict(cfg, d_model='32'), good))
  assert "'d_model' must be int" in _one_line(e)
  with pytest.raises(FileNotFoundError) as e:
    t5.from_pretrained(_write(tmp_path / 'noweights', cfg))
  assert 'model.safetensors' in _one_line(e)

  name = 'decoder.block.1.layer.1.EncDecAttention.k.weight'
  missing = {k: v for k, v in good.items() if k != name}
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(_write(tmp_path / 'missing', cfg, missing))
  assert f"missing tensor '{name}'" in _one_line(e)
  assert 'model.safetensors' in str(e.value)
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(_write(tmp_path / 'shape', cfg,
                              dict(good, **{name: good[name][:, :-1]})))
  assert f"'{name}' has shape (32, 31), expected (32, 32)" in _one_line(e)
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(_write(tmp_path / 'extra', cfg,
                              dict(good, **{'encoder.block.7.x.weight': good[name]})))
  assert 'unexpected tensor' in _one_line(e)
  assert '(and' not in str(e.value)  # the only one
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(_write(tmp_path / 'int', cfg, dict(
        good, **{name: good[name].astype(np.int32)})))
  assert f"'{name}' has dtype int32" in _one_line(e)
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(_write(tmp_path / 'nlayers', dict(cfg, num_layers=3), good))
  assert "missing tensor 'encoder.block.2" in _one_line(e)


def test_shard_index_cannot_escape_directory(tmp_path):
  cfg = t5_reference.CONFIGS['gated']
  d = _write(tmp_path / 'ckpt', cfg)
  (d / hf_io.SAFETENSORS_INDEX).write_text(json.dumps(
      {'weight_map': {'shared.weight': '../../etc/passwd'}}))
  with pytest.raises(ValueError) as e:
    t5.from_pretrained(d)
  assert 'outside the directory' in _one_line(e)


def test_decoding_cache_is_made_sharded_like_the_batch(tiny):
  """The KV cache had been made on the first device whatever the batch's
  sharding (an mT5-XXL evaluation batch's cache is gigabytes)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((1,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  valid = jax.device_put(jnp.ones((2, 6), bool),
                         NamedSharding(mesh, P('data', None)))
  cache = t5.init_cache(tiny, 2, 4, like=valid)
  for k, v in cache:
    for x in (k, v):
      assert x.sharding.spec == P('data', None, None, None)
      assert not np.any(np.asarray(x))
  plain = t5.init_cache(tiny, 2, 4)
  assert plain[0][0].shape == cache[0][0].shape


@pytest.mark.parametrize('rate', [1.5, -0.5, '0.1', True])
def test_a_dropout_rate_outside_0_1_is_refused(rate):
  """1.5 had zeroed every activation in training, -0.5 turned dropout off
  silently, and a string failed at the first layer."""
  with pytest.raises(ValueError, match=r'^T5Config\.dropout_rate must be a '
                     r'number in \[0, 1\), got '):
    t5.get_config('tiny', dropout_rate=rate)


@pytest.mark.parametrize('buckets, distance', [(2, 128), (3, 128), (32, 16),
                                               (32, 8)])
def test_relative_buckets_the_log_spacing_cannot_fill_are_refused(buckets,
                                                                  distance):
  """2 buckets had divided by zero at the first forward; a max_distance at
  or below the exact range gave negative buckets, which index the bias
  table from its end, silently."""
  with pytest.raises(ValueError, match=r'^T5Config needs relative_attention_'
                     r'num_buckets >= 4 and relative_attention_max_distance > '
                     rf'relative_attention_num_buckets // 2, got {buckets} and '
                     rf'{distance}\.$'):
    t5.get_config('tiny', relative_attention_num_buckets=buckets,
                  relative_attention_max_distance=distance)
  # The smallest settings that work bucket every distance inside the table.
  cfg = t5.get_config('tiny', relative_attention_num_buckets=4,
                      relative_attention_max_distance=3)
  for bidirectional in (True, False):
    got = np.asarray(t5.relative_position_bucket(
        jnp.arange(-40, 41), bidirectional=bidirectional, num_buckets=4,
        max_distance=3))
    assert got.min() >= 0 and got.max() < 4
  assert cfg.relative_attention_num_buckets == 4


def test_inputs_of_other_batches_or_ranks_are_refused():
  """One decoder row had been broadcast over every encoder row (and the
  reverse), and 1-D tokens had been an IndexError."""
  model = t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0))
  enc, dec = jnp.array([[3, 4, 5, 1], [6, 7, 1, 0]]), jnp.array([[0, 7], [0, 8]])
  assert model(enc, dec).shape == (2, 2, 128)
  for e, d, message in (
      (enc, dec[:1], r'^T5: the decoder tokens have 1 rows but the encoder '
       r'input had 2; give both the same batch\.$'),
      (enc[:1], dec, r'^T5: the decoder tokens have 2 rows but the encoder '
       r'input had 1'),
      (enc[0], dec[0], r'^T5 encoder tokens must be \[batch, seq\] ints, got '
       r'shape \(4,\)\.$'),
      (enc, dec[0], r'^T5 decoder tokens must be \[batch, seq\] ints')):
    with pytest.raises(ValueError, match=message):
      model(e, d)


@pytest.mark.parametrize('tied', [False, True])
def test_bfloat16_logits_are_not_rounded_to_bfloat16(tied):
  """The head accumulates in float32, as Gemma's does: the logits (and the
  loss and every eval score from them) had been bfloat16 values."""
  model = t5.T5(t5.get_config('tiny', tie_word_embeddings=tied),
                dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  if not tied:
    lora.apply_lora(model, 'lm_head', rank=2, rngs=nnx.Rngs(1))
  logits = model(jnp.array([[5, 6, 7, 1, 0, 0]]), jnp.array([[0, 8, 9, 10]]))
  assert logits.dtype == jnp.float32
  rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)
  assert float(jnp.mean(logits != rounded)) > 0.5


def test_token_ids_outside_the_vocabulary_are_refused_by_the_model():
  """-100 (a label's ignore id) had wrapped round to a real token, and an id
  past the vocabulary made every logit NaN."""
  model = t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0))
  enc, dec = jnp.array([[3, 4, 5, 1]]), jnp.array([[0, 7]])
  assert np.isfinite(model(enc, dec)).all()
  with pytest.raises(ValueError, match=r"^T5 decoder token id -100 is outside "
                     r"the model's vocabulary of 128 \(another tokenizer\?\)"):
    model(enc, jnp.array([[0, 7, -100]]))
  with pytest.raises(ValueError, match=r'^T5 encoder token id 500 is outside'):
    model(jnp.array([[3, 4, 500, 1]]), dec)
  # Under jit the ids are not read (no host sync in a train step).
  out = nnx.jit(lambda m, e, d: m(e, d))(model, enc, dec)
  np.testing.assert_allclose(out, model(enc, dec), atol=1e-5)


def test_remat_recomputes_each_block_and_changes_nothing():
  """remat=True puts each encoder and decoder block under jax.checkpoint
  and gives the same loss and LoRA gradients, with T5's own dropout and
  LoRA's on."""
  config = t5.get_config('tiny', dropout_rate=0.1)
  out = []
  for remat in (False, True):
    model = t5.T5(config, rngs=nnx.Rngs(0), remat=remat)
    lora.apply_lora(model, rank=2, dropout=0.2,
                    rngs=nnx.Rngs(params=0, dropout=1))
    model.train()
    graphdef, lp, rest = lora.split_lora(model)
    loss = lambda lp, rest, g=graphdef: jnp.mean(
        lora.combine_lora(g, lp, rest)(ENC, DEC) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(lp, rest))
    blocks = config.num_layers + config.num_decoder_layers
    assert jaxpr.count('remat') == (blocks if remat else 0)
    out.append(jax.jit(jax.value_and_grad(loss))(lp, rest))
  for got, expected in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[0])):
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def _hf_relative_position_bucket(rel, bidirectional, num_buckets, max_distance):
  """transformers' T5Attention._relative_position_bucket, in numpy."""
  rel = np.asarray(rel, np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0) * num_buckets
    n = np.abs(rel)
  else:
    n = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  large = max_exact + (np.log(np.maximum(n, 1) / max_exact)
                       / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(n < max_exact, n, large)


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets, max_distance', [(32, 128), (8, 16)])
def test_relative_buckets_saturate_in_their_own_direction(
    bidirectional, num_buckets, max_distance):
  """Distances past max_distance saturate in their direction's last bucket.
  The reference logits reach 6 positions in the encoder (max_distance 16),
  so the encoder's saturation was untested: unclamped, keys far before the
  query took the buckets of keys after it (mT5 inputs > 128 tokens)."""
  rel = np.arange(-3 * max_distance, 3 * max_distance + 1)
  got = np.asarray(t5.relative_position_bucket(
      jnp.asarray(rel, jnp.int32), bidirectional=bidirectional,
      num_buckets=num_buckets, max_distance=max_distance))
  np.testing.assert_array_equal(got, _hf_relative_position_bucket(
      rel, bidirectional, num_buckets, max_distance))
  assert got.min() == 0 and got.max() == num_buckets - 1
  if bidirectional:
    half = num_buckets // 2
    assert (got[rel < 0] < half).all() and (got[rel > 0] >= half).all()
    assert got[0] == half - 1 and got[-1] == num_buckets - 1
  else:
    assert (got[rel >= 0] == 0).all() and got[0] == num_buckets - 1
  if (num_buckets, max_distance) == (32, 128):
    # Pinned at T5's and mT5's defaults (from the transcription of
    # transformers' function above, not from transformers itself).
    at = dict(zip(rel.tolist(), got.tolist()))
    if bidirectional:
      assert [at[d] for d in (-200, -128, -20, -1, 0, 1, 20, 127, 200)] == [
          15, 15, 10, 1, 0, 17, 26, 31, 31]
    else:
      assert [at[d] for d in (-200, -128, -20, -1, 0, 5)] == [
          31, 31, 17, 1, 0, 0]


def test_greedy_pads_each_row_after_its_own_eos(monkeypatch):
  """Rows that end at different steps: the one that ended is padded while
  the other decodes on (greedy_generate's contract)."""
  model = t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0))
  eos, pad = model.config.eos_token_id, model.config.pad_token_id

  def decode_step(model, token, cross, valid, cache, i):
    del model, token, cross, valid
    stop = jnp.array([1, 3])
    return (jnp.where(i >= stop, eos, 7).astype(jnp.int32),
            jnp.zeros((2, 3)), cache)

  monkeypatch.setattr(t5, '_decode_step', decode_step)
  out = np.asarray(t5.greedy_generate(model, ENC, 6))
  np.testing.assert_array_equal(out, [[7, eos, pad, pad, pad, pad],
                                      [7, 7, 7, eos, pad, pad]])


def test_a_bfloat16_heads_lora_update_accumulates_in_float32():
  """The head's LoRA term lands in float32 like its kernel's (out_dtype):
  rounded to bfloat16 first, an adapter's share of the logits (all of it
  here, the kernel zeroed) had been bfloat16 values."""
  model = t5.T5(t5.get_config('tiny'), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  lora.apply_lora(model, 'lm_head', rank=2, rngs=nnx.Rngs(1))
  head = model.lm_head
  head.kernel.set_value(jnp.zeros_like(head.kernel[...]))
  b = head.lora.lora_b
  b.set_value(jnp.asarray(np.random.default_rng(0).normal(size=b.shape),
                          jnp.float32))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 32)), jnp.bfloat16)
  y = head(x)
  assert y.dtype == jnp.float32
  rounded = y.astype(jnp.bfloat16).astype(jnp.float32)
  assert float(jnp.mean(y != rounded)) > 0.5

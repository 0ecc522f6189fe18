"""models.gemma on tiny random configs: caching, I/O round trips, sharding, errors."""

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from flax import nnx

from models import gemma
from models.gemma import load as gemma_load
from models.gemma.config import GLOBAL, LOCAL
from models.layers import Projection
from tests import gemma_reference
from tests.data import gemma_hf_reference
from tests import gguf_files
from tests import xla_flags

FAMILIES = ['gemma-tiny', 'gemma2-tiny', 'gemma3-tiny']
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(name_or_config, seed=1, **kw):
  """A random Gemma, drawn with numpy (eager JAX init costs seconds).

  Kernels are normal with variance 1/fan_in; norm gains are non-zero, so a
  dropped or mis-mapped norm shows.
  """
  cfg = (gemma.get_config(name_or_config) if isinstance(name_or_config, str)
         else name_or_config)
  model = nnx.eval_shape(lambda: gemma.Gemma(cfg, **kw))
  rng = np.random.default_rng(seed)
  normal = lambda shape, std: jnp.asarray(rng.normal(size=shape) * std,
                                          jnp.float32)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Projection):
      node.kernel.set_value(normal(node.kernel.shape,
                                   math.prod(node.in_shape) ** -0.5))
    elif path and path[-1] == 'scale' and isinstance(node, nnx.Param):
      node.set_value(normal(node.shape, 0.1))
  model.embedding.set_value(normal(model.embedding.shape, cfg.width ** -0.5))
  return model


@functools.lru_cache(maxsize=None)
def _tiny(name):
  """A shared (not to be mutated) model of config ``name`` and its jitted forward."""
  model = _model(name)
  return model, gemma.forward_fn(model)


def _params(model):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert '\n' not in msg, msg
  return msg


# --------------------------------------------------------------------------
# Configs and structure.


def test_named_configs():
  assert gemma.get_config('gemma-2b').num_kv_heads == 1      # multi-query
  assert gemma.get_config('gemma-7b').num_kv_heads == 16     # multi-head
  g2 = gemma.get_config('gemma2-27b')
  assert g2.query_scale == pytest.approx(144 ** -0.5)
  assert (g2.attn_logit_softcap, g2.final_logit_softcap) == (50.0, 30.0)
  g3 = gemma.get_config('gemma3-270m')
  assert g3.query_scale == pytest.approx(256 ** -0.5)
  assert g3.layer_types[:6] == (LOCAL,) * 5 + (GLOBAL,)
  assert (g3.rope_base_local, g3.rope_base_global) == (1e4, 1e6)
  assert g3.sliding_window == 512 and g3.use_qk_norm
  assert gemma.get_config('gemma3-27b').query_pre_attn_scalar == 168
  for name in ('gemma3-1b', 'gemma3-4b', 'gemma3-12b', 'gemma2-2b', 'gemma2-9b'):
    assert gemma.get_config(name).family in (2, 3)
  with pytest.raises(ValueError, match='Unknown Gemma config') as e:
    gemma.get_config('gemma4-1t')
  assert 'gemma3-270m' in _one_line(e)


# config.json of published checkpoints (abridged to the keys that matter).
_LAYER_TYPES_270M = (['sliding_attention'] * 5 + ['full_attention']) * 3
PUBLISHED_HF_CONFIGS = {
    'gemma-2b': {
        'architectures': ['GemmaForCausalLM'], 'model_type': 'gemma',
        'head_dim': 256, 'hidden_act': 'gelu', 'hidden_size': 2048,
        'intermediate_size': 16384, 'max_position_embeddings': 8192,
        'num_attention_heads': 8, 'num_hidden_layers': 18,
        'num_key_value_heads': 1, 'rms_norm_eps': 1e-06,
        'rope_theta': 10000.0, 'vocab_size': 256000},
    'gemma2-2b': {
        'architectures': ['Gemma2ForCausalLM'], 'model_type': 'gemma2',
        'attn_logit_softcapping': 50.0, 'final_logit_softcapping': 30.0,
        'head_dim': 256, 'hidden_size': 2304, 'intermediate_size': 9216,
        'max_position_embeddings': 8192, 'num_attention_heads': 8,
        'num_hidden_layers': 26, 'num_key_value_heads': 4,
        'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06,
        'rope_theta': 10000.0, 'sliding_window': 4096, 'vocab_size': 256000},
    'gemma3-270m': {
        'architectures': ['Gemma3ForCausalLM'], 'model_type': 'gemma3_text',
        '_sliding_window_pattern': 6, 'attn_logit_softcapping': None,
        'final_logit_softcapping': None, 'head_dim': 256, 'hidden_size': 640,
        'intermediate_size': 2048, 'layer_types': _LAYER_TYPES_270M,
        'max_position_embeddings': 32768, 'num_attention_heads': 4,
        'num_hidden_layers': 18, 'num_key_value_heads': 1,
        'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06,
        'rope_local_base_freq': 10000.0, 'rope_scaling': None,
        'rope_theta': 1000000.0, 'sliding_window': 512,
        'use_bidirectional_attention': False, 'vocab_size': 262144},
    # Multimodal checkpoints nest a text_config holding non-defaults only.
    'gemma3-4b': {
        'architectures': ['Gemma3ForConditionalGeneration'],
        'model_type': 'gemma3', 'vision_config': {},
        'text_config': {
            'hidden_size': 2560, 'intermediate_size': 10240,
            'model_type': 'gemma3_text', 'num_hidden_layers': 34,
            'rope_scaling': {'factor': 8.0, 'rope_type': 'linear'},
            'sliding_window': 1024}},
}


@pytest.mark.parametrize('name', sorted(PUBLISHED_HF_CONFIGS))
def test_published_hf_configs_match_named_configs(name):
  cfg = gemma_load.config_from_hf(PUBLISHED_HF_CONFIGS[name])
  assert cfg == gemma.get_config(name)
  hf = gemma_load.config_to_hf(cfg)
  assert gemma_load.config_from_hf(hf) == cfg
  # transformers 5 validates it as an int: 256.0 had made every Gemma 2/3
  # save_pretrained unloadable there.
  assert type(hf['query_pre_attn_scalar']) is int


def test_untied_output_head_is_refused():
  d = dict(PUBLISHED_HF_CONFIGS['gemma3-270m'], tie_word_embeddings=False)
  with pytest.raises(ValueError, match='tie_word_embeddings is false'):
    gemma_load.config_from_hf(d)


def test_270m_parameter_count():
  model = nnx.eval_shape(lambda: gemma.Gemma(gemma.get_config('gemma3-270m')))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert 268e6 < n < 269e6  # the published 268M (170M embedding + 100M blocks)


def test_projection_paths_shapes_and_logical_axes():
  model, _ = _tiny('gemma3-tiny')
  c = model.config
  d, n, k, h, f = c.width, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  block = model.layers[0]
  shapes = {'q': (d, n, h), 'k': (d, k, h), 'v': (d, k, h), 'o': (n, h, d)}
  for name, shape in shapes.items():
    assert getattr(block.attn, name).kernel.get_value().shape == shape
  for name, shape in {'gate': (d, f), 'up': (d, f), 'down': (f, d)}.items():
    assert getattr(block.mlp, name).kernel.get_value().shape == shape
  allowed = {'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'norm'}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      axes = var.get_metadata()['out_sharding']
      assert len(axes) == var.get_value().ndim and set(axes) <= allowed, (path, axes)
  paths = {'/'.join(map(str, p)) for p, _ in nnx.iter_graph(model)}
  assert 'layers/0/attn/q' in paths and 'layers/6/mlp/down' in paths


def test_lora_pairs_have_einsum_shapes():
  lora = pytest.importorskip('models.lora')
  model = _model('gemma-tiny')
  tokens = jnp.arange(12).reshape(2, 6)
  forward = nnx.jit(lambda m, t: m(t))
  before = forward(model, tokens)
  lora.apply_lora(model, ['q', 'o'], rank=4)
  c = model.config
  q = model.layers[0].attn.q.lora
  o = model.layers[0].attn.o.lora
  assert q.lora_a.get_value().shape == (c.width, 4)
  assert q.lora_b.get_value().shape == (4, c.num_heads, c.head_dim)
  assert o.lora_a.get_value().shape == (c.num_heads, c.head_dim, 4)
  assert o.lora_b.get_value().shape == (4, c.width)
  np.testing.assert_allclose(forward(model, tokens), before, atol=1e-6)  # B = 0


def test_merged_lora_matches_peft_adapter_in_hf_layout(tmp_path):
  # The HF weights of a merged model equal base + (alpha / r) B @ A of the
  # exported PEFT adapter: our kernel layouts and the PEFT export agree on
  # the PyTorch orientation (heads-major q/k/v rows, o columns).
  lora = pytest.importorskip('models.lora')
  model = _model('gemma2-tiny')
  gemma.save_pretrained(model, tmp_path / 'base')
  lora.apply_lora(model, ['q', 'k', 'o', 'down'], rank=2, alpha=4.0)
  for path, var in nnx.iter_graph(model):
    if path and path[-1] == 'lora_b':
      var.set_value(jax.random.normal(jax.random.key(len(path)),
                                      var.get_value().shape))
  lora.save_peft_adapter(model, tmp_path / 'adapter', 'tiny')
  lora.merge_lora(model)
  gemma.save_pretrained(model, tmp_path / 'merged')
  read = lambda d, f: load_file(str(tmp_path / d / f))
  base = read('base', 'model.safetensors')
  merged = read('merged', 'model.safetensors')
  adapter = read('adapter', 'adapter_model.safetensors')
  checked = 0
  for name in base:
    a = adapter.get(f'base_model.model.{name[:-len(".weight")]}.lora_A.weight')
    if a is None:
      np.testing.assert_array_equal(merged[name], base[name], err_msg=name)
      continue
    b = adapter[f'base_model.model.{name[:-len(".weight")]}.lora_B.weight']
    np.testing.assert_allclose(merged[name], base[name] + 2.0 * b @ a,
                               atol=1e-5, err_msg=name)
    checked += 1
  assert checked == 4 * model.config.num_layers


# --------------------------------------------------------------------------
# Forward semantics.


_REFERENCE_CASES = {
    **{name: (name, {}) for name in FAMILIES},
    # Strong soft-caps; two 5:1 cycles with one kv head, 8x RoPE scaling on
    # the global layers and a query scale other than head_dim.
    'gemma2 caps 2/30': ('gemma2-tiny', dict(attn_logit_softcap=2.0,
                                             final_logit_softcap=30.0)),
    'gemma3 13 layers mqa': ('gemma3-tiny', dict(
        num_layers=13, num_kv_heads=1, rope_scale_global=8.0,
        query_pre_attn_scalar=10.0)),
}


@pytest.mark.parametrize('case', list(_REFERENCE_CASES))
def test_forward_matches_an_independent_numpy_reference(case):
  """Logits equal tests/gemma_reference.py's float64 forward (written from
  Hugging Face's modelling code) on 20 tokens, 5x the sliding window: the
  layer pattern, norms, RoPE bases and scaling, soft-caps and kv-head
  mapping are each checked against an implementation that decides them
  itself."""
  name, changes = _REFERENCE_CASES[case]
  cfg = gemma.get_config(name).replace(**changes)
  model = _model(cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 20)
  want = gemma_reference.logits(cfg, dict(gemma_load.iter_named_params(model)),
                                tokens)
  got = np.asarray(gemma.forward_fn(model)(jnp.asarray(tokens[None]))[0])
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
  # The window matters here: the same weights with every layer global
  # give other logits.
  assert cfg.family == 1 or not np.allclose(
      want, gemma_reference.logits(cfg.replace(sliding_window=10**6), dict(
          gemma_load.iter_named_params(model)), tokens),
      atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize('case', list(gemma_hf_reference.CASES))
def test_checkpoints_written_by_transformers_give_its_logits(case, tmp_path):
  """A folder with the config.json transformers 5.25 wrote (its own keys,
  not ours) and seeded weights gives transformers' logits (eager attention,
  float32), on a batch with a left-padded row; and token by token through
  the cache. Each case's features are in tests/data/gemma_hf_reference.py.
  """
  gemma_hf_reference.random_checkpoint(str(tmp_path), case)
  model = gemma.from_pretrained(str(tmp_path))
  want = load_file(gemma_hf_reference.REFERENCE)[case]
  real = gemma_hf_reference.MASK.astype(bool)
  tokens = jnp.asarray(gemma_hf_reference.TOKENS)
  mask = jnp.asarray(gemma_hf_reference.MASK)
  scale = np.abs(want).max()
  with jax.default_matmul_precision('highest'):
    got = np.asarray(model(tokens, attention_mask=mask))
    np.testing.assert_allclose(got[real], want[real], atol=1e-5 * scale)
    cache = gemma.init_cache(model.config, 2, tokens.shape[1])
    steps = [model(tokens[:, :5], attention_mask=mask[:, :5], cache=cache)]
    for i in range(5, tokens.shape[1]):
      steps.append(model(tokens[:, i:i + 1], cache=steps[-1][1]))
  cached = np.concatenate([np.asarray(logits) for logits, _ in steps], 1)
  np.testing.assert_allclose(cached[real], want[real], atol=1e-5 * scale)


def test_a_gemma_1_config_with_another_hidden_act_is_refused(tmp_path):
  """transformers 5 writes a Gemma 1's activation as hidden_act alone and
  runs it ('gelu' as the tanh approximation); 'silu' had loaded as GELU."""
  gemma_hf_reference.random_checkpoint(str(tmp_path), 'gemma1')
  config = json.loads((tmp_path / 'config.json').read_text())
  for act in ('gelu', 'gelu_pytorch_tanh'):
    (tmp_path / 'config.json').write_text(json.dumps(dict(config,
                                                          hidden_act=act)))
    assert gemma.from_pretrained(str(tmp_path)).config.family == 1
  (tmp_path / 'config.json').write_text(json.dumps(dict(config,
                                                        hidden_act='silu')))
  with pytest.raises(ValueError, match="hidden_act 'silu' is not supported; "
                     "the Gemma MLP here uses GELU's tanh approximation"):
    gemma.from_pretrained(str(tmp_path))


@pytest.mark.parametrize('name', FAMILIES)
def test_cached_generation_equals_full_forward(name):
  model, forward = _tiny(name)
  sampler = gemma.Sampler(model, pad_multiple=8)
  # Different lengths: the shorter prompt is left-padded in the batch, and
  # 7 + 12 tokens run past the sliding window (4) of the local layers.
  prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
  out = sampler(prompts, 12, stop_at_eos=False, return_logits=True)
  for row, prompt in enumerate(prompts):
    seq = prompt + out.tokens[row]
    assert len(out.tokens[row]) == 12
    full = np.asarray(forward(jnp.array([seq]))[0])
    np.testing.assert_allclose(out.logits[row],
                               full[len(prompt) - 1:len(seq) - 1],
                               atol=2e-5, rtol=1e-5)
    # Greedy: each token is the argmax of the full forward's logits.
    assert out.tokens[row] == full[len(prompt) - 1:-1].argmax(-1).tolist()


def test_sampling_controls():
  model, _ = _tiny('gemma-tiny')
  sampler = gemma.Sampler(model, pad_multiple=8)
  prompts = [[3, 4, 5]]
  greedy = sampler(prompts, 6, stop_at_eos=False).tokens
  # top_k = 1 leaves only the argmax; the same seed repeats a sample.
  assert sampler(prompts, 6, temperature=0.7, top_k=1,
                 stop_at_eos=False).tokens == greedy
  a = sampler(prompts, 6, temperature=0.7, top_k=1, seed=3,
              stop_at_eos=False).tokens
  assert a == greedy
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.jit(jax.vmap(lambda k: gemma.sample_logits(
      logits, k, temperature=1.0, top_k=2)))(jax.random.split(
          jax.random.key(0), 200))
  assert set(np.unique(draws).tolist()) == {0, 1}
  draws = jax.jit(jax.vmap(lambda k: gemma.sample_logits(
      logits, k, temperature=1.0, top_p=0.85)))(jax.random.split(
          jax.random.key(0), 300))
  assert set(np.unique(draws).tolist()) == {0, 1, 2}
  # A temperature so small the division overflows is greedy (it had
  # always drawn token 0).
  logits = jnp.array([[1.0, 3.0, 2.0, -1.0]])
  for kw in ({}, {'top_p': 0.9}, {'top_k': 2}):
    draws = jax.vmap(lambda k, kw=kw: gemma.sample_logits(
        logits, k, temperature=1e-40, **kw))(jax.random.split(
            jax.random.key(0), 50))
    assert set(np.unique(draws).tolist()) == {1}, kw


def test_bad_sampler_settings_are_refused_in_one_line():
  """Each had been a TypeError, OverflowError or out-of-memory error from
  inside JAX (or, for an infinite temperature, a uniform draw)."""
  model, _ = _tiny('gemma-tiny')
  sampler = gemma.Sampler(model, pad_multiple=8)
  context = model.config.max_seq_len
  for kw, message in (
      (dict(seed=2**63), 'seed must be an int in [-2**63, 2**63), got '
       '9223372036854775808'),
      (dict(seed=1.5), 'seed must be an int'),
      (dict(seed=None), 'seed must be an int'),
      (dict(max_new_tokens=context - 2),
       f'the prompt (3 tokens) and max_new_tokens ({context - 2}) exceed the '
       f"model's context of {context} tokens"),
      (dict(temperature=float('inf')), 'temperature must be a finite number'),
      (dict(temperature='1'), "temperature must be a finite number >= 0 (0 "
       "decodes greedily), got '1'"),
      (dict(temperature=None), 'temperature must be a finite number'),
      (dict(temperature=1.0, top_p='0.5'), "top_p must be in (0, 1]")):
    kw = {'max_new_tokens': 2, 'temperature': 1.0, **kw}
    with pytest.raises(ValueError) as e:
      sampler([[3, 4, 5]], **kw)
    assert message in _one_line(e), kw
  # Integer seeds of NumPy and JAX are seeds (a JAX int32 compared with
  # -2**63 had overflowed).
  draws = [sampler([[3, 4, 5]], 3, temperature=1.0, seed=seed).tokens
           for seed in (3, np.int64(3), jnp.int32(3), jnp.uint32(3))]
  assert draws[1:] == draws[:1] * 3


def test_a_full_kv_cache_is_an_error_not_a_lost_token():
  model, _ = _tiny('gemma-tiny')
  cache = gemma.init_cache(model.config, 1, 4)
  _, cache = model(jnp.array([[3, 4, 5]]), cache=cache)
  _, cache = model(jnp.array([[6]]), cache=cache)  # the last slot
  with pytest.raises(ValueError, match='KV cache holds 4 tokens; writing 1 '
                     'at position 4 would overflow'):
    model(jnp.array([[7]]), cache=cache)
  with pytest.raises(ValueError, match='writing 5'):
    model(jnp.array([[1, 2, 3, 4, 5]]),
          cache=gemma.init_cache(model.config, 1, 4))


def test_generation_stops_at_end_of_turn_as_well_as_eos():
  """Instruction-tuned Gemma ends a reply with <end_of_turn>: a row stops
  there (the token and what follows are cut), as at EOS."""
  import types  # pylint: disable=g-import-not-at-top
  model, _ = _tiny('gemma-tiny')
  prompts = [[3, 4, 5]]
  free = gemma.Sampler(model, pad_multiple=8)(prompts, 8,
                                              stop_at_eos=False).tokens[0]
  turn = free[3]
  eos = next(t for t in range(256) if t not in free)

  class Sp:
    def piece_to_id(self, piece):
      return turn if piece == '<end_of_turn>' else 0
    def id_to_piece(self, i):
      return '<end_of_turn>' if i == turn else '<unk>'
    def unk_id(self):
      return 0

  tok = types.SimpleNamespace(eos_id=eos, pad_id=0, sp=Sp(),
                              decode=lambda ids: ' '.join(map(str, ids)))
  out = gemma.Sampler(model, tok, pad_multiple=8)(prompts, 8)
  assert out.tokens[0] == free[:free.index(turn)]


def test_generation_runs_the_model_once_per_token(monkeypatch):
  """The prompt's pass, then one step per token fed back: the last token
  (the max_new_tokens-th, or a stop) is not fed back (that step's logits
  had been computed and thrown away)."""
  model, _ = _tiny('gemma-tiny')
  prompts = [[3, 4, 5], [6, 7]]
  free = gemma.Sampler(model, pad_multiple=8)(prompts, 6,
                                              stop_at_eos=False).tokens
  calls = []
  call = type(model).__call__

  def counted(self, *args, **kwargs):
    jax.debug.callback(lambda: calls.append(1))
    return call(self, *args, **kwargs)

  monkeypatch.setattr(type(model), '__call__', counted)
  for n in (1, 6):
    calls.clear()
    out = gemma.Sampler(model, pad_multiple=8)(prompts, n, stop_at_eos=False)
    jax.effects_barrier()
    assert out.tokens == [row[:n] for row in free] and len(calls) == n
  # A stop at the first token: the prompt's pass alone (rows that stop at
  # once; the tiny model repeats one token per prompt here).
  import types  # pylint: disable=g-import-not-at-top
  calls.clear()
  tok = types.SimpleNamespace(eos_id=free[0][0], pad_id=0, decode=str)
  out = gemma.Sampler(model, tok, pad_multiple=8)(prompts[:1], 6)
  jax.effects_barrier()
  assert out.tokens == [[]] and len(calls) == 1


def test_hidden_logits_split_and_positions():
  # Gemma 2: the final soft-cap must live in `logits`, after the gather.
  model, forward = _tiny('gemma2-tiny')
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 256)
  full = forward(tokens)
  assert full.shape == (2, 10, 256) and full.dtype == jnp.float32
  split = nnx.jit(lambda m, t: m.logits(m.hidden(t)))
  np.testing.assert_allclose(split(model, tokens), full, atol=1e-5)
  idx = jnp.array([9, 3])
  np.testing.assert_allclose(forward(tokens, logits_positions=idx),
                             full[:, idx], atol=1e-5)
  per_row = jnp.array([[9], [4]])
  np.testing.assert_allclose(forward(tokens, logits_positions=per_row)[:, 0],
                             jnp.stack([full[0, 9], full[1, 4]]), atol=1e-5)


def test_left_padding_and_packing_masks():
  _, model = _tiny('gemma3-tiny')  # the jitted forward
  seq = jnp.array([[7, 8, 9, 10, 11, 12]])
  ref = model(seq)[0]
  padded = jnp.array([[0, 0, 7, 8, 9, 10, 11, 12]])
  mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_allclose(model(padded, attention_mask=mask)[0, 2:], ref,
                             atol=1e-5)
  # Two sequences packed in one row: a block-diagonal mask and restarted
  # positions reproduce each sequence on its own.
  other = jnp.array([[30, 31, 32]])
  packed = jnp.concatenate([seq, other], axis=1)
  seg = jnp.array([0] * 6 + [1] * 3)
  full_mask = (seg[:, None] == seg[None, :])[None]
  positions = jnp.array([[0, 1, 2, 3, 4, 5, 0, 1, 2]])
  out = model(packed, positions=positions, attention_mask=full_mask)[0]
  np.testing.assert_allclose(out[:6], ref, atol=1e-5)
  np.testing.assert_allclose(out[6:], model(other)[0], atol=1e-5)


def test_sliding_window_limits_context():
  # One local layer with window 4: position 10 sees positions 7..10 only.
  cfg = gemma.get_config('gemma3-tiny').replace(num_layers=1,
                                                attention_pattern=(LOCAL,))
  model = gemma.forward_fn(_model(cfg))
  tokens = jnp.arange(20, 31)[None]
  ref = model(tokens)[0, 10]
  far = tokens.at[0, :7].set(99)
  np.testing.assert_allclose(model(far)[0, 10], ref, atol=1e-6)
  near = tokens.at[0, 7].set(99)
  assert np.abs(model(near)[0, 10] - ref).max() > 1e-4
  # The same model with a global layer sees everything.
  glob = gemma.forward_fn(_model(cfg.replace(attention_pattern=(GLOBAL,))))
  assert np.abs(glob(far)[0, 10] - glob(tokens)[0, 10]).max() > 1e-4


def test_forward_fn_advances_dropout_as_the_model_does():
  """In train mode forward_fn had dropped its copy's advanced streams: every
  call drew the same LoRA dropout masks, where model(...) draws new ones."""
  from models import lora  # pylint: disable=g-import-not-at-top

  def with_dropout():
    model = _model('gemma3-tiny')
    lora.apply_lora(model, ('q', 'v'), rank=2, dropout=0.5,
                    rngs=nnx.Rngs(params=0, dropout=1))
    for proj in lora.projections(model).values():
      if proj.lora is not None:
        proj.lora.lora_b.set_value(jnp.full(proj.lora.lora_b.shape, 0.05))
    return model

  tokens = jnp.arange(2, 10)[None]
  jitted, eager = with_dropout(), with_dropout()
  forward = gemma.forward_fn(jitted)
  first, second = forward(tokens), forward(tokens)
  assert np.abs(first - second).max() > 1e-3
  np.testing.assert_allclose(first, eager(tokens), atol=1e-5)
  np.testing.assert_allclose(second, eager(tokens), atol=1e-5)
  # Under nnx.jit the streams advance as model(...)'s do there.
  under_nnx_jit = nnx.jit(lambda m, t: gemma.forward_fn(m)(t))
  np.testing.assert_allclose(under_nnx_jit(jitted, tokens), eager(tokens),
                             atol=1e-5)
  # In eval mode it works under an outer jit, grad and vmap, as model(...)
  # does (updating the counts there had raised).
  jitted.eval()
  ref = forward(tokens)
  np.testing.assert_allclose(jax.jit(forward)(tokens), ref, atol=1e-5)
  np.testing.assert_allclose(jax.vmap(forward)(tokens[None])[0], ref,
                             atol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(forward(tokens)) * x)(1.0)
  np.testing.assert_allclose(grad, jnp.sum(ref), rtol=1e-5)


def test_remat_recomputes_each_block_and_changes_nothing():
  """remat=True puts each block under jax.checkpoint (one remat per layer in
  the gradient's jaxpr) and gives the same loss and LoRA gradients, LoRA
  dropout on; decoding with a cache does not remat."""
  from models import lora  # pylint: disable=g-import-not-at-top
  tokens = jnp.arange(2, 18).reshape(2, 8)
  out = []
  for remat in (False, True):
    model = _model('gemma3-tiny')
    model.remat = remat
    lora.apply_lora(model, ('q', 'gate'), rank=2, dropout=0.3,
                    rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, lp, rest = lora.split_lora(model)
    loss = lambda lp, rest, g=graphdef: jnp.mean(
        lora.combine_lora(g, lp, rest)(tokens) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(lp, rest))
    assert jaxpr.count('remat') == (model.config.num_layers if remat else 0)
    out.append(jax.jit(jax.value_and_grad(loss))(lp, rest))
  for got, expected in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[0])):
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  model.eval()
  cache = gemma.init_cache(model.config, 2, 12, model.dtype)
  jaxpr = str(jax.make_jaxpr(lambda t: model(t, cache=cache)[0])(tokens))
  assert 'remat' not in jaxpr


def test_bfloat16_compute():
  _, forward = _tiny('gemma3-tiny')
  tokens = jnp.arange(16).reshape(2, 8)
  ref = forward(tokens)
  bf16 = _model('gemma3-tiny', dtype=jnp.bfloat16)
  out = gemma.forward_fn(bf16)(tokens)
  assert out.dtype == jnp.float32
  assert bf16.layers[0].attn.q.kernel.get_value().dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.15)
  # Computed in bfloat16 (a model that ignored dtype gives float32's exact
  # logits), and its activations are bfloat16.
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() > 1e-3
  hidden = jax.eval_shape(lambda m, t: m.hidden(t), bf16, tokens)
  assert hidden.dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# Checkpoint I/O.


@pytest.mark.parametrize('name', FAMILIES)
def test_hf_save_load_round_trip_is_exact(tmp_path, name):
  model, _ = _tiny(name)
  gemma.save_pretrained(model, tmp_path)
  with open(tmp_path / 'config.json') as f:
    hf = json.load(f)
  assert hf['model_type'] == {'gemma-tiny': 'gemma', 'gemma2-tiny': 'gemma2',
                              'gemma3-tiny': 'gemma3_text'}[name]
  loaded = gemma.from_pretrained(tmp_path)
  assert loaded.config == model.config
  a, b = _params(model), _params(loaded)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_hf_layout_names_and_orientation(tmp_path):
  model, _ = _tiny('gemma3-tiny')
  gemma.save_pretrained(model, tmp_path)
  tensors = load_file(str(tmp_path / 'model.safetensors'))
  c = model.config
  q = tensors['model.layers.0.self_attn.q_proj.weight']
  assert q.shape == (c.num_heads * c.head_dim, c.width)  # PyTorch [out, in]
  x = np.random.default_rng(0).normal(size=(3, c.width)).astype(np.float32)
  np.testing.assert_allclose(
      (x @ q.T).reshape(3, c.num_heads, c.head_dim),
      model.layers[0].attn.q(jnp.asarray(x)), atol=1e-5)
  assert tensors['model.layers.0.self_attn.o_proj.weight'].shape == (
      c.width, c.num_heads * c.head_dim)
  assert tensors['model.layers.0.mlp.down_proj.weight'].shape == (c.width,
                                                                  c.mlp_dim)
  assert 'model.layers.0.self_attn.q_norm.weight' in tensors
  assert 'model.layers.0.pre_feedforward_layernorm.weight' in tensors


def test_sharded_safetensors_and_bfloat16_checkpoint(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  model, _ = _tiny('gemma2-tiny')
  gemma.save_pretrained(model, tmp_path)
  tensors = load_file(str(tmp_path / 'model.safetensors'))
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[:len(names) // 2],
            'model-00002-of-00002.safetensors': names[len(names) // 2:]}
  weight_map = {}
  for fn, keys in shards.items():
    # bfloat16 on disk, as published Gemma checkpoints are.
    save_file({k: np.asarray(tensors[k]).astype(ml_dtypes.bfloat16)
               for k in keys}, str(tmp_path / fn))
    weight_map.update({k: fn for k in keys})
  os.remove(tmp_path / 'model.safetensors')
  with open(tmp_path / 'model.safetensors.index.json', 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  loaded = gemma.from_pretrained(tmp_path)
  a, b = _params(model), _params(loaded)
  for k in a:
    np.testing.assert_array_equal(
        a[k].astype(ml_dtypes.bfloat16).astype(np.float32), b[k], err_msg=k)


def test_shard_index_cannot_escape_directory(tmp_path):
  """An index naming a shard outside the folder is refused, not read."""
  model, _ = _tiny('gemma2-tiny')
  ckpt = tmp_path / 'ckpt'
  gemma.save_pretrained(model, ckpt)
  os.replace(ckpt / 'model.safetensors', tmp_path / 'outside.safetensors')
  names = load_file(str(tmp_path / 'outside.safetensors'))
  with open(ckpt / 'model.safetensors.index.json', 'w') as f:
    json.dump({'weight_map': {k: '../outside.safetensors' for k in names}}, f)
  with pytest.raises(ValueError, match="refusing file name "
                     "'../outside.safetensors': a .. component could lead "
                     "outside"):
    gemma.from_pretrained(ckpt)


def test_sharded_checkpoint_in_a_hub_cache_loads(tmp_path):
  """A Hugging Face cache snapshot's files are links into its blobs/: the
  shard names stay inside the folder, so the links are followed."""
  model, _ = _tiny('gemma2-tiny')
  gemma.save_pretrained(model, tmp_path / 'src')
  tensors = load_file(str(tmp_path / 'src' /
                                            'model.safetensors'))
  snap, blobs = tmp_path / 'snapshots' / 'rev', tmp_path / 'blobs'
  snap.mkdir(parents=True)
  blobs.mkdir()
  os.replace(tmp_path / 'src' / 'config.json', snap / 'config.json')
  names, weight_map = sorted(tensors), {}
  for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
    shard = f'model-0000{i + 1}-of-00002.safetensors'
    save_file({k: np.asarray(tensors[k]) for k in part}, str(blobs / f'sha{i}'))
    os.symlink(os.path.join('..', '..', 'blobs', f'sha{i}'), snap / shard)
    weight_map.update({k: shard for k in part})
  with open(snap / 'model.safetensors.index.json', 'w') as f:
    json.dump({'weight_map': weight_map}, f)
  a, b = _params(model), _params(gemma.from_pretrained(snap))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_multimodal_checkpoint_layout(tmp_path):
  # Gemma 3 4B+ checkpoints nest the text config and prefix the tensor names.
  model, _ = _tiny('gemma3-tiny')
  gemma.save_pretrained(model, tmp_path)
  st = str(tmp_path / 'model.safetensors')
  tensors = {'model.language_model.' + k.removeprefix('model.'): np.array(v)
             for k, v in load_file(st).items()}
  save_file(tensors, st)
  with open(tmp_path / 'config.json') as f:
    text_config = json.load(f)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'model_type': 'gemma3', 'text_config': text_config,
               'vision_config': {}}, f)
  loaded = gemma.from_pretrained(tmp_path)
  assert loaded.config == model.config
  a, b = _params(model), _params(loaded)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _write_gemma_gguf(model, path, arch='gemma3', rope_scaling=None,
                      softcaps=True, extra=None, quantize=None, replace=None):
  """A float32 GGUF in llama.cpp's conventions (norm gains stored as 1 + w);
  ``softcaps``: write the config's soft-caps (llama.cpp's Gemma 2 keys);
  ``extra``: more tensors, {name: array}; ``quantize``: a
  gguf.GGMLQuantizationType for the matrices (gguf-py quantizes Q8_0 and
  Q4_0, not the K-quants); ``replace``: {GGUF name: array} written as given
  (shape and dtype) in place of the model's."""
  import gguf  # pylint: disable=g-import-not-at-top
  c = model.config
  replace = dict(replace or {})
  with gguf_files.gguf_writer(path, arch) as w:
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.width)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.mlp_dim)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_base_global)
    if c.sliding_window:
      w.add_sliding_window(c.sliding_window)
    if softcaps and c.attn_logit_softcap is not None:
      w.add_float32(f'{arch}.attn_logit_softcapping', c.attn_logit_softcap)
    if softcaps and c.final_logit_softcap is not None:
      w.add_float32(f'{arch}.final_logit_softcapping', c.final_logit_softcap)
    if c.rope_scale_global != 1.0 or rope_scaling is not None:
      w.add_rope_scaling_type(rope_scaling or gguf.RopeScalingType.LINEAR)
      w.add_rope_scaling_factor(c.rope_scale_global)
    # pylint: disable=protected-access
    for e in gemma_load._param_table(c):
      name = gemma_load.gguf_name(e.hf_name, c.family)
      if name in replace:
        w.add_tensor(name, np.ascontiguousarray(replace.pop(name)))
        continue
      arr = e.to_hf(np.asarray(gemma_load._get_var(model, e.path).get_value()))
      if e.is_norm:
        arr = arr + 1.0
      arr = np.ascontiguousarray(arr, np.float32)
      if quantize is not None and arr.ndim == 2:
        w.add_tensor(name, gguf.quants.quantize(arr, quantize),
                     raw_dtype=quantize)
      else:
        w.add_tensor(name, arr)
    for name, arr in (extra or {}).items():
      w.add_tensor(name, arr)
  assert not replace, f'no such tensor: {sorted(replace)}'


def test_gguf_load_follows_llama_cpp_conventions(tmp_path):
  # gemma3-tiny uses what llama.cpp assumes for Gemma 3: 5 local : 1 global,
  # local base 10k, query scale head_dim^-0.5.
  model, forward = _tiny('gemma3-tiny')
  _write_gemma_gguf(model, tmp_path / 'tiny.gguf')
  loaded = gemma.from_pretrained(tmp_path / 'tiny.gguf')
  assert loaded.config == model.config.replace(
      norm_eps=float(np.float32(model.config.norm_eps)))
  a, b = _params(model), _params(loaded)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
  tokens = jnp.arange(16).reshape(2, 8)
  np.testing.assert_allclose(gemma.forward_fn(loaded)(tokens), forward(tokens),
                             atol=1e-5)


def test_gguf_of_a_gemma3_with_no_window_is_global_everywhere(tmp_path):
  """llama.cpp writes no window for a Gemma 3 whose layers are all global
  (sliding_window_pattern 1) and runs them all as full attention at
  rope.freq_base; a 5:1 pattern with a 512 window had been assumed."""
  cfg = gemma.get_config('gemma3-tiny').replace(attention_pattern=(GLOBAL,),
                                                sliding_window=None)
  model = _model(cfg)
  _write_gemma_gguf(model, tmp_path / 'global.gguf')
  loaded = gemma.from_pretrained(tmp_path / 'global.gguf')
  assert loaded.config.layer_types == (GLOBAL,) * cfg.num_layers
  assert loaded.config.sliding_window is None
  tokens = jnp.arange(24).reshape(2, 12)
  np.testing.assert_allclose(gemma.forward_fn(loaded)(tokens),
                             gemma.forward_fn(model)(tokens), atol=1e-5)


def test_gemma2_rope_scaling_scales_every_layer(tmp_path):
  """Gemma 1 and 2 have one rotary embedding, rope_scaling included, for
  all layers (transformers, llama.cpp); the sliding layers had run
  unscaled. Gemma 3's sliding layers keep their own, unscaled."""
  from models.gemma import load  # pylint: disable=g-import-not-at-top
  base = {'vocab_size': 64, 'hidden_size': 32, 'intermediate_size': 64,
          'num_hidden_layers': 2, 'num_attention_heads': 2, 'head_dim': 16,
          'rope_scaling': {'rope_type': 'linear', 'factor': 4.0}}
  c2 = load.config_from_hf({**base, 'model_type': 'gemma2'})
  assert (c2.rope_scale_global, c2.rope_scale_local) == (4.0, 4.0)
  flat = load.config_from_hf({**base, 'model_type': 'gemma2',
                              'rope_scaling': None, 'rope_parameters': {
                                  'rope_type': 'linear', 'factor': 2.0,
                                  'rope_theta': 1e4}})
  assert (flat.rope_scale_global, flat.rope_scale_local) == (2.0, 2.0)
  c3 = load.config_from_hf({**base, 'model_type': 'gemma3_text'})
  assert (c3.rope_scale_global, c3.rope_scale_local) == (4.0, 1.0)
  rope = lambda c: (c.rope_scale_global, c.rope_scale_local, c.layer_types)
  for c in (c2, c3):
    assert rope(load.config_from_hf(load.config_to_hf(c))) == rope(c)
  # Sliding layers scaled otherwise have no Hugging Face form (a key of
  # this project's own had carried them, which transformers ignores).
  for c in (c2.replace(rope_scale_local=1.0),
            c3.replace(rope_scale_local=4.0)):
    with pytest.raises(ValueError, match='has no Hugging Face form'):
      load.config_to_hf(c)
  # And a GGUF's rope.scaling.factor applies to both kinds of layer.
  model = _model(gemma.get_config('gemma2-tiny').replace(
      rope_scale_global=3.0, rope_scale_local=3.0))
  _write_gemma_gguf(model, tmp_path / 'g2.gguf', arch='gemma2')
  loaded = gemma.from_pretrained(tmp_path / 'g2.gguf')
  assert (loaded.config.rope_scale_global,
          loaded.config.rope_scale_local) == (3.0, 3.0)


def _write_tokenizer_gguf(path, extra_control=(), eos_id=1, words=None,
                          add_bos=True, types=None, scores=None, unk_id=3):
  """A GGUF holding only a small Gemma-style SentencePiece vocabulary (and
  ``extra_control`` CONTROL pieces last, as Gemma 3's <mask> is); ``words``
  replace its word pieces, the last one user-defined, or as {piece: score}
  all normal; ``types`` and ``scores``: whole arrays written as given;
  ``unk_id``: written as an int32 when negative."""
  specials = ['<pad>', '<eos>', '<bos>', '<unk>']
  byte_pieces = [f'<0x{i:02X}>' for i in range(256)]
  words = words or ['▁', 'h', 'e', 'l', 'o', 'w', 'r', 'd', 'he', 'll',
                    'hell', 'hello', '▁hello', '▁w', '▁wo', '▁wor', '▁worl',
                    '▁world', '\n']
  tokens = specials + byte_pieces + list(words) + list(extra_control)
  if types is None:
    # llama.cpp types: control, byte, normal; the last word user-defined, as
    # Gemma 3's '\n' is (unless words come with their scores).
    last = [1] if isinstance(words, dict) else [4]
    types = ([3] * 4 + [6] * 256 + [1] * (len(words) - 1) + last +
             [3] * len(extra_control))
  if scores is None:
    word_scores = (list(words.values()) if isinstance(words, dict) else
                   [-float(i) for i in range(len(words))])
    scores = [0.0] * 260 + word_scores + [0.0] * len(extra_control)
  with gguf_files.gguf_writer(path, 'gemma3') as w:
    w.add_tokenizer_model('llama')
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(eos_id)
    if unk_id < 0:
      w.add_int32('tokenizer.ggml.unknown_token_id', unk_id)
    else:
      w.add_unk_token_id(unk_id)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_add_space_prefix(False)
  return len(tokens)


def test_tokenizer_from_gguf_vocabulary_and_model_file(tmp_path):
  n = _write_tokenizer_gguf(tmp_path / 'tok.gguf')
  tok = gemma.load_tokenizer(tmp_path / 'tok.gguf')
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
  assert tok.vocab_size == n
  ids = tok.encode('hello world\nhé')
  assert ids[0] == 2
  assert [tok.id_to_piece(i) for i in ids[1:4]] == ['hello', '▁world', '\n']
  # 'é' is not in the vocabulary: byte fallback, and decoding restores it.
  assert tok.decode(ids) == 'hello world\nhé'
  assert tok.decode(ids + [1, 0]) == 'hello world\nhé'
  # Ids past the vocabulary (a model's padded embedding rows, which it can
  # generate) decode to nothing; sentencepiece had raised mid-generation.
  assert tok.decode(ids + [n, n + 7]) == 'hello world\nhé'
  # The same vocabulary as a tokenizer.model file encodes identically.
  (tmp_path / 'tokenizer.model').write_bytes(tok.sp.serialized_model_proto())
  from_file = gemma.load_tokenizer(tmp_path)
  assert from_file.encode('hello world\nhé') == ids
  with pytest.raises(FileNotFoundError, match='tokenizer.model') as e:
    gemma.load_tokenizer(tmp_path / 'missing')
  _one_line(e)


def test_tokenizer_decode_takes_one_sequence_of_integer_ids(tmp_path):
  """A batch of rows had been joined into one text, ragged rows had been
  numpy's error, and '5' or 1.7 had been read as ids 5 and 1."""
  _write_tokenizer_gguf(tmp_path / 'tok.gguf')
  tok = gemma.load_tokenizer(tmp_path / 'tok.gguf')
  h = tok.encode('hello', add_bos=False)
  w = tok.encode(' world', add_bos=False)
  assert tok.decode(np.asarray(h + w, np.int32)) == 'hello world'
  assert tok.decode(jnp.asarray(h)) == tok.decode(tuple(h)) == 'hello'
  assert tok.decode([]) == ''
  for bad, what in (([h, h], r'shape \(2, 1\)'), ([h, w + w], 'different'),
                    (['5'], 'list of <U1'), ([1.7], 'list of float64')):
    with pytest.raises(ValueError, match=what) as e:
      tok.decode(bad)
    _one_line(e)


def test_gguf_parse_is_read_again_for_a_replaced_file(tmp_path):
  """The parse cache had been keyed on the path and mtime: a vocabulary
  replaced by a file with the same mtime (cp -p, rsync -t) came back old."""
  _write_tokenizer_gguf(tmp_path / 'a.gguf')
  _write_tokenizer_gguf(tmp_path / 'b.gguf', ['<end_of_turn>'], eos_id=279)
  path = tmp_path / 'tok.gguf'
  shutil.copy2(tmp_path / 'a.gguf', path)
  assert gemma.load_tokenizer(path).eos_id == 1
  shutil.copy2(tmp_path / 'b.gguf', tmp_path / 'new.gguf')
  mtime = os.stat(path).st_mtime_ns
  os.utime(tmp_path / 'new.gguf', ns=(mtime, mtime))
  os.replace(tmp_path / 'new.gguf', path)
  assert os.stat(path).st_mtime_ns == mtime
  tok = gemma.load_tokenizer(path)
  assert (tok.eos_id, tok.vocab_size) == (279, 280)


def test_tokenizer_special_pieces_as_hugging_face_reads_them(tmp_path):
  """`<bos>` written in a text (a chat template's output starts with it) is
  the BOS id, once, not '<', 'b', 'o', 's', '>'; decoding leaves out the
  GGUF's control tokens and <unk> (had printed '<mask>' and ' ⁇ ')."""
  n = _write_tokenizer_gguf(tmp_path / 'tok.gguf', extra_control=['<mask>'])
  mask = n - 1
  for tok in (gemma.load_tokenizer(tmp_path / 'tok.gguf'),):
    hello = tok.encode('hello', add_bos=False)
    assert tok.encode('<bos>hello') == [2] + hello
    assert tok.encode('hello<eos>') == [2] + hello + [1]
    assert tok.encode('<pad><unk>', add_bos=False) == [0, 3]
    assert tok.decode([2] + hello + [mask, 3, 1, 0]) == 'hello'
    # Kept when asked (SentencePiece never writes its own bos/eos/pad).
    assert tok.decode([2] + hello + [mask], skip_special_tokens=False) == (
        'hello<mask>')
  # An instruction-tuned GGUF may name <end_of_turn> its EOS: <eos> must
  # still stop a reply (it had been generated past, as text).
  from models.gemma import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  _write_tokenizer_gguf(tmp_path / 'it.gguf', ['<end_of_turn>'], eos_id=n - 1)
  it = gemma.load_tokenizer(tmp_path / 'it.gguf')
  assert it.eos_id == n - 1
  assert sampler_lib._stop_ids(it) == (n - 1, 1)  # pylint: disable=protected-access
  assert it.encode('hi<end_of_turn>', add_bos=False)[-1] == n - 1
  # A tokenizer.model: its control and unknown pieces.
  (tmp_path / 'tokenizer.model').write_bytes(tok.sp.serialized_model_proto())
  from_file = gemma.load_tokenizer(tmp_path)
  assert from_file.encode('<bos>hello') == [2] + hello
  assert from_file.decode([2] + hello + [3, 1]) == 'hello'


def test_generate_cli(tmp_path, capsys):
  from models import generate  # pylint: disable=g-import-not-at-top
  cfg = gemma.get_config('gemma-tiny').replace(vocab_size=288)
  gemma.save_pretrained(_model(cfg), tmp_path)
  assert generate.main(['--checkpoint', str(tmp_path), '--prompt', 'hi',
                        '--max-new-tokens', '3']) == 2
  assert 'no tokenizer.model' in capsys.readouterr().err
  _write_tokenizer_gguf(tmp_path / 'tok.gguf')
  sp = gemma.load_tokenizer(tmp_path / 'tok.gguf').sp
  (tmp_path / 'tokenizer.model').write_bytes(sp.serialized_model_proto())
  assert generate.main(['--checkpoint', str(tmp_path), '--prompt',
                        'hello world', '--max-new-tokens', '4']) == 0
  assert capsys.readouterr().out.endswith('\n')


# --------------------------------------------------------------------------
# Bad inputs: one clear line naming the input.


def test_missing_and_malformed_config(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json') as e:
    gemma.from_pretrained(tmp_path)
  _one_line(e)
  (tmp_path / 'config.json').write_text('{"model_type": "gemma3_text", ')
  with pytest.raises(ValueError, match='malformed JSON') as e:
    gemma.from_pretrained(tmp_path)
  assert str(tmp_path / 'config.json') in _one_line(e)
  (tmp_path / 'config.json').write_text('{"model_type": "llama"}')
  with pytest.raises(ValueError, match="model_type 'llama'") as e:
    gemma.from_pretrained(tmp_path)
  _one_line(e)
  (tmp_path / 'config.json').write_text('{"model_type": "gemma2"}')
  with pytest.raises(ValueError, match="missing required key 'hidden_size'") as e:
    gemma.from_pretrained(tmp_path)
  _one_line(e)
  with pytest.raises(FileNotFoundError, match='no such checkpoint') as e:
    gemma.from_pretrained(tmp_path / 'nope.gguf')
  _one_line(e)


def test_missing_and_misshaped_tensors(tmp_path):
  model, _ = _tiny('gemma-tiny')
  gemma.save_pretrained(model, tmp_path)
  st = str(tmp_path / 'model.safetensors')
  tensors = dict(load_file(st))
  name = 'model.layers.1.mlp.up_proj.weight'
  missing = {k: np.array(v) for k, v in tensors.items() if k != name}
  save_file(missing, st)
  with pytest.raises(ValueError, match=f"missing tensor '{name}'") as e:
    gemma.from_pretrained(tmp_path)
  assert 'model.safetensors' in _one_line(e)
  bad = dict(missing, **{name: np.zeros((3, 5), np.float32)})
  save_file(bad, st)
  with pytest.raises(ValueError,
                     match=r'has shape \[3, 5\], expected \[128, 64\]') as e:
    gemma.from_pretrained(tmp_path)
  assert st in _one_line(e)
  # Integers where weights go; a head of its own beside the embedding
  # (Gemma ties it, so it would be dropped); an activation other than
  # GELU's tanh form: each refused in one line rather than loaded.
  as_int = dict(missing, **{name: np.ones((128, 64), np.int64)})
  save_file(as_int, st)
  with pytest.raises(ValueError, match=f"'{name}' has dtype int64") as e:
    gemma.from_pretrained(tmp_path)
  assert st in _one_line(e)
  head = dict(tensors, **{'lm_head.weight': np.ones((256, 64), np.float32)})
  assert head['model.embed_tokens.weight'].shape == (256, 64)
  save_file(head, st)
  with pytest.raises(ValueError, match="'lm_head.weight' is not the embedding"
                     ) as e:
    gemma.from_pretrained(tmp_path)
  assert st in _one_line(e)
  tied = dict(tensors, **{'lm_head.weight': tensors['model.embed_tokens.weight']})
  save_file(tied, st)
  gemma.from_pretrained(tmp_path)  # a copy of the tied head is fine
  config = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps(
      dict(config, hidden_activation='silu')))
  with pytest.raises(ValueError, match="hidden_activation 'silu' is not") as e:
    gemma.from_pretrained(tmp_path)
  _one_line(e)
  del config['head_dim']  # transformers' default, 256 (gemma-tiny has 16)
  (tmp_path / 'config.json').write_text(json.dumps(config))
  assert gemma_load.read_hf_config(str(tmp_path)).head_dim == 256
  with open(st, 'wb') as f:
    f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json')
  with pytest.raises(ValueError, match='not a readable safetensors file') as e:
    gemma.from_pretrained(tmp_path)
  _one_line(e)
  os.remove(st)
  with pytest.raises(FileNotFoundError, match='no model.safetensors') as e:
    gemma.from_pretrained(tmp_path)
  _one_line(e)


def test_gguf_with_rope_scaling_other_than_linear_is_refused(tmp_path):
  import gguf  # pylint: disable=g-import-not-at-top
  model, _ = _tiny('gemma3-tiny')
  _write_gemma_gguf(model, tmp_path / 'yarn.gguf',
                    rope_scaling=gguf.RopeScalingType.YARN)
  with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
    gemma.from_pretrained(tmp_path / 'yarn.gguf')


def test_gguf_of_another_architecture(tmp_path):
  path = tmp_path / 'llama.gguf'
  gguf_files.write_minimal_gguf(path, 'llama')
  with pytest.raises(ValueError, match="architecture is 'llama'") as e:
    gemma.from_pretrained(path)
  assert str(path) in _one_line(e)
  junk = tmp_path / 'junk.gguf'
  junk.write_bytes(b'GGUF\x03\x00\x00\x00' + b'\xff' * 5)
  with pytest.raises(ValueError, match='not a readable GGUF file') as e:
    gemma.from_pretrained(junk)
  _one_line(e)


# --------------------------------------------------------------------------
# Sharding on 8 fake CPU devices (a subprocess: the device count is fixed
# when JAX initialises).

_SHARDED_SCRIPT = textwrap.dedent('''
    import os
    os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from models import gemma
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
    rules = [('vocab', 'model'), ('embed', 'data'), ('heads', 'model'),
             ('kv_heads', None), ('head_dim', None), ('mlp', 'model'),
             ('norm', None)]
    from tests.test_gemma_model import _model
    for name in ('gemma-tiny', 'gemma2-tiny', 'gemma3-tiny'):
      model = _model(name)
      tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, 256)
      graphdef, state = nnx.split(model)
      forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
      ref = np.asarray(forward(state, tokens))
      with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
      shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
      state = jax.device_put(state, shardings)
      q = state['layers'][0]['attn']['q']['kernel'].get_value()
      assert q.sharding.spec == P('data', 'model', None), q.sharding
      assert len(q.addressable_shards) == 8
      tokens = jax.device_put(tokens, NamedSharding(mesh, P('data', None)))
      out = forward(state, tokens)
      np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)
      print(name, 'sharded ok')
''')


def test_sharded_forward_on_8_fake_devices():
  env = xla_flags.script_env()
  proc = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count('sharded ok') == 3, proc.stdout


def test_token_ids_outside_the_vocabulary_are_refused_by_the_model():
  """-100 had wrapped round to a real token; an id past the vocabulary made
  the row's logits NaN."""
  model = _model('gemma2-tiny')
  vocab = model.config.vocab_size
  assert np.isfinite(model(jnp.array([[5, 6, 7]]))).all()
  for bad in (-100, vocab):
    with pytest.raises(ValueError, match=rf'^Gemma token id {bad} is outside '
                       rf"the model's vocabulary of {vocab}"):
      model(jnp.array([[5, bad, 7]]))


def test_embedding_scale_is_rounded_to_the_embedding_dtype():
  """bfloat16 weights computed in float32 are scaled by sqrt(width) rounded
  to bfloat16, as Hugging Face and Google's Gemma do (it had been rounded
  to the compute dtype: 25.298 for the 270M's 25.25)."""
  cfg = gemma.GemmaConfig(**{**vars(gemma.get_config('gemma3-tiny')),
                             'width': 640, 'mlp_dim': 64, 'num_layers': 1,
                             'attention_pattern': ('global',)})
  model = gemma.Gemma(cfg, dtype=jnp.float32, param_dtype=jnp.bfloat16,
                      rngs=nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 3]])
  rows = model.embedding[...][tokens]
  assert rows.dtype == jnp.bfloat16
  want = np.asarray(rows * jnp.bfloat16(25.25), np.float32)
  got = model.embed(tokens)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)


def test_misshapen_forward_inputs_are_refused_in_one_line():
  """Each had failed deep in the attention (a broadcast, an IndexError) or,
  for logits_positions, given another position's logits or NaN."""
  model = _model('gemma3-tiny')
  tokens = jnp.array([[5, 6, 7]])
  other = gemma.init_cache(gemma.get_config('gemma2-tiny'), 1, 8)
  for kw, message in (
      (dict(attention_mask=jnp.ones((1, 4))),
       'attention_mask must be [batch, seq] = [1, 3]'),
      (dict(positions=jnp.arange(4)[None]),
       'positions must be [batch, seq] = [1, 3], got shape (1, 4)'),
      (dict(cache=other), 'the KV cache holds 3 layers'),
      (dict(logits_positions=jnp.array([5])),
       'logits_positions 5 is outside the 3 tokens'),
      (dict(logits_positions=jnp.array([[-4]])),
       'logits_positions -4 is outside the 3 tokens')):
    with pytest.raises(ValueError) as e:
      model(tokens, **kw)
    assert message in _one_line(e), kw
  np.testing.assert_allclose(model(tokens, logits_positions=jnp.array([-1])),
                             model(tokens)[:, -1:], atol=1e-5)
  with pytest.raises(ValueError, match='head_dim must be even'):
    gemma.GemmaConfig(**{**vars(gemma.get_config('gemma3-tiny')),
                         'head_dim': 15})


def test_a_query_pre_attn_scalar_of_0_is_refused_not_made_head_dim(tmp_path):
  model, _ = _tiny('gemma2-tiny')
  gemma.save_pretrained(model, tmp_path)
  hf = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps(
      dict(hf, query_pre_attn_scalar=0)))
  with pytest.raises(ValueError, match='query_pre_attn_scalar') as e:
    gemma.from_pretrained(tmp_path)
  _one_line(e)


@pytest.mark.parametrize('arch, layers, scalar', [
    ('gemma2', 46, 168.0), ('gemma3', 62, 168.0), ('gemma3', 26, 128.0)])
def test_gguf_27b_models_scale_queries_by_width_over_heads(tmp_path, arch,
                                                            layers, scalar):
  """llama.cpp scales the queries of Gemma 2 27B (46 layers) and Gemma 3
  27B (62) by (width / heads) ** -0.5, others by head_dim ** -0.5."""
  path = tmp_path / f'{arch}.gguf'
  with gguf_files.gguf_writer(path, arch) as w:
    w.add_block_count(layers)
    w.add_embedding_length(5376)
    w.add_head_count(32)
    w.add_head_count_kv(16)
    w.add_key_length(128)
    w.add_value_length(128)
    w.add_feed_forward_length(64)
    w.add_context_length(128)
    w.add_sliding_window(1024)
    w.add_tensor('token_embd.weight', np.zeros((8, 4), np.float32))
  config = gemma_load.config_from_gguf(gemma_load.gguf_file(path))
  assert config.query_pre_attn_scalar == scalar


def test_gguf_tokenizer_reads_space_pieces_and_add_bos(tmp_path):
  """llama.cpp writes Gemma's user-defined runs of spaces with ' ' (they
  must match the text's spaces), and add_bos_token false means no BOS."""
  _write_tokenizer_gguf(tmp_path / 'spaces.gguf', words=['▁', 'a', 'b', '  '])
  tok = gemma.load_tokenizer(tmp_path / 'spaces.gguf')
  ids = tok.encode('a  b', add_bos=False)
  assert ids == [261, 263, 262] and tok.decode(ids) == 'a  b'
  _write_tokenizer_gguf(tmp_path / 'no_bos.gguf', words=['▁', 'a', 'b'],
                        add_bos=False)
  assert gemma.load_tokenizer(tmp_path / 'no_bos.gguf').encode('a') == [261]


def test_top_p_keeps_the_smallest_set_that_reaches_it():
  """At top_p 0.5 with probabilities .5 / .25 / .25 the first token alone
  reaches it: only it is drawn."""
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  draws = jax.vmap(lambda k: gemma.sample_logits(
      logits, k, temperature=1.0, top_p=0.5))(
          jax.random.split(jax.random.key(0), 200))
  assert set(np.unique(draws).tolist()) == {0}


def test_a_sampler_without_a_tokenizer_stops_at_id_1():
  from models.gemma import sampler  # pylint: disable=g-import-not-at-top
  assert sampler._stop_ids(None) == (1,)  # pylint: disable=protected-access


@pytest.mark.parametrize('qtype', ['Q8_0', 'Q4_0'])
def test_quantized_gguf_matrices_load_in_their_layout(tmp_path, qtype):
  """Quantized matrices (stored as [rows, bytes] blocks) load as their
  dequantized values in place: every kernel equals gguf-py's round trip of
  the written one, and the logits stay near the float model's."""
  import gguf  # pylint: disable=g-import-not-at-top
  kind = gguf.GGMLQuantizationType[qtype]
  model = _model('gemma3-tiny')
  _write_gemma_gguf(model, tmp_path / 'q.gguf', quantize=kind)
  loaded = gemma.from_pretrained(tmp_path / 'q.gguf')
  got = dict(gemma_load.iter_named_params(loaded))
  for name, arr in gemma_load.iter_named_params(model):
    want = (gguf.quants.dequantize(gguf.quants.quantize(
        np.ascontiguousarray(arr, np.float32), kind), kind)
            if arr.ndim == 2 else arr)
    np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6,
                               err_msg=name)
  tokens = jnp.arange(3, 19)[None]
  ref = np.asarray(gemma.forward_fn(model)(tokens))
  out = np.asarray(gemma.forward_fn(loaded)(tokens))
  assert not np.array_equal(out, ref)  # quantized, not a float copy
  # 8 bits: 3% of the logits' norm here; 4 bits: 39% (random weights).
  assert (np.linalg.norm(out - ref) / np.linalg.norm(ref)
          < {'Q8_0': 0.1, 'Q4_0': 0.8}[qtype])

"""The Gemma loaders refuse checkpoints their config does not describe.

Each refusal is one line naming the file (config.json, a .safetensors file or
the .gguf) and what is wrong: leftover tensors (a config with fewer layers
than the checkpoint), sizes that are not positive, malformed config values,
safetensors entries whose shape or byte range is invalid, unusable GGUF
metadata. A correct checkpoint still loads.
"""

import collections
import json
import os
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from models import gemma
from models import t5
from models.gemma.config import GLOBAL, LOCAL
from models.gemma import load as gemma_load
from tests import gguf_files
from tests.test_gemma_model import (_model, _one_line, _params, _tiny,
                                     _write_gemma_gguf)

LAYER2 = 'model.layers.2.input_layernorm.weight'


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """gemma3-tiny (7 layers) in Hugging Face layout and as a GGUF."""
  model, _ = _tiny('gemma3-tiny')
  root = tmp_path_factory.mktemp('gemma3')
  gemma.save_pretrained(model, root / 'hf')
  _write_gemma_gguf(model, root / 'tiny.gguf')
  return model, root


@pytest.fixture
def hf(saved, tmp_path):
  """A fresh copy of the saved Hugging Face folder (to break)."""
  shutil.copytree(saved[1] / 'hf', tmp_path / 'hf')
  return tmp_path / 'hf'


@pytest.fixture
def gguf_path(saved, tmp_path):
  shutil.copy(saved[1] / 'tiny.gguf', tmp_path / 'tiny.gguf')
  return tmp_path / 'tiny.gguf'


def _edit_config(hf, **changes):
  """Sets (or, for None values given as ..., deletes) config.json keys."""
  path = hf / 'config.json'
  d = json.loads(path.read_text())
  for k, v in changes.items():
    if v is ...:
      d.pop(k, None)
    else:
      d[k] = v
  path.write_text(json.dumps(d))
  return path


def _refused(path, match, exc=ValueError):
  with pytest.raises(exc, match=match) as e:
    gemma.from_pretrained(path)
  return _one_line(e)


def _same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------
# Correct checkpoints still load.


def test_correct_checkpoints_load(saved, hf, gguf_path):
  model, _ = saved
  _same_params(model, gemma.from_pretrained(hf))
  _same_params(model, gemma.from_pretrained(gguf_path))


def test_each_tensor_is_read_once(hf, monkeypatch):
  """Reads go through the safetensors package on access; a membership test
  (Mapping's own __contains__) had read the tensor, the embedding seven
  times a load. The tied head's copy is read once more to compare it."""
  from models import hf_io  # pylint: disable=g-import-not-at-top
  st = str(hf / 'model.safetensors')
  tensors = load_file(st)
  save_file(dict(tensors, **{
      'lm_head.weight': tensors['model.embed_tokens.weight']}), st)
  reads = collections.Counter()
  getitem = hf_io.Tensors.__getitem__

  def counted(self, name):
    reads[name] += 1
    return getitem(self, name)

  monkeypatch.setattr(hf_io.Tensors, '__getitem__', counted)
  gemma.from_pretrained(hf)
  assert reads.pop('model.embed_tokens.weight') == 2  # compared, loaded
  assert reads.pop('lm_head.weight') == 1  # compared
  assert set(reads.values()) == {1} and len(reads) == len(tensors) - 1
  reads.clear()
  assert gemma_load.hf_module_prefix(str(hf)) == 'model' and not reads


def test_tied_lm_head_copy_and_vision_tower_are_allowed(saved, hf):
  """A copy of the tied head is not a leftover; nor is a multimodal
  checkpoint's vision tower (the text decoder is what loads)."""
  model, _ = saved
  st = str(hf / 'model.safetensors')
  tensors = {k: np.array(v) for k, v in
             load_file(st).items()}
  embed = tensors['model.embed_tokens.weight']
  save_file(dict(tensors, **{'lm_head.weight': embed}), st)
  _same_params(model, gemma.from_pretrained(hf))
  # Multimodal layout: prefixed text model, nested config, vision tensors.
  mm = {'model.language_model.' + k.removeprefix('model.'): v
        for k, v in tensors.items()}
  mm['model.vision_tower.vision_model.post_layernorm.weight'] = np.ones(
      8, np.float32)
  mm['model.multi_modal_projector.mm_soft_emb_norm.weight'] = np.ones(
      8, np.float32)
  mm['lm_head.weight'] = embed
  save_file(mm, st)
  text = json.loads((hf / 'config.json').read_text())
  (hf / 'config.json').write_text(json.dumps(
      {'model_type': 'gemma3', 'text_config': text, 'vision_config': {}}))
  _same_params(model, gemma.from_pretrained(hf))


# --------------------------------------------------------------------------
# Leftover tensors: the config describes a smaller model.


def test_hf_config_with_fewer_layers_than_the_checkpoint(hf):
  _edit_config(hf, num_hidden_layers=2, layer_types=...)
  msg = _refused(hf, f"unexpected tensor '{LAYER2}' \\(and [0-9]+ more\\) "
                 'for this config.json')
  assert msg.startswith(str(hf / 'model.safetensors') + ':'), msg


def test_hf_layer_types_must_list_every_layer(hf):
  path = _edit_config(hf, num_hidden_layers=2)
  msg = _refused(hf, 'layer_types lists 7 layers but num_hidden_layers is 2')
  assert msg.startswith(f'{path}:'), msg


def test_hf_leftover_in_a_shard_names_that_shard(hf):
  # A sharded checkpoint (a single model.safetensors would be read instead
  # of the index, as transformers does).
  single = hf / 'model.safetensors'
  tensors = {k: np.array(v) for k, v in
             load_file(str(single)).items()}
  single.unlink()
  shard = 'model-00001-of-00002.safetensors'
  save_file(tensors, str(hf / shard))
  save_file({'model.layers.7.extra': np.zeros(2, np.float32)},
            str(hf / 'extra.safetensors'))
  (hf / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {
      **{k: shard for k in tensors},
      'model.layers.7.extra': 'extra.safetensors'}}))
  msg = _refused(hf, r"unexpected tensor 'model.layers.7.extra' for this config")
  assert msg.startswith(str(hf / 'extra.safetensors') + ':'), msg


def test_lm_head_that_is_not_the_tied_embedding_shape_is_refused(hf):
  st = str(hf / 'model.safetensors')
  tensors = {k: np.array(v) for k, v in
             load_file(st).items()}
  save_file(dict(
      tensors, **{'lm_head.weight': np.zeros((10, 64), np.float32)}), st)
  _refused(hf, r"model.safetensors: unexpected tensor 'lm_head.weight'")


def _patch_gguf_u32(path, key, value):
  """Rewrites the uint32 metadata value of ``key`` in place."""
  raw = bytearray(path.read_bytes())
  k = key.encode()
  tag = struct.pack('<Q', len(k)) + k + struct.pack('<I', 4)  # 4: uint32
  at = raw.find(tag)
  assert at >= 0 and raw.find(tag, at + 1) < 0, key
  raw[at + len(tag):at + len(tag) + 4] = struct.pack('<I', value)
  path.write_bytes(bytes(raw))


def test_gguf_block_count_below_the_blocks_it_holds(gguf_path):
  _patch_gguf_u32(gguf_path, 'gemma3.block_count', 3)
  msg = _refused(gguf_path, r"unexpected tensor 'blk.3.attn_k.weight' \(and "
                 r'[0-9]+ more\) for the model its metadata describes '
                 r'\(gemma3.block_count = 3\)')
  assert msg.startswith(f'{gguf_path}:'), msg


# --------------------------------------------------------------------------
# GemmaConfig sizes.


@pytest.mark.parametrize('change, match', [
    ({'num_layers': -1}, 'num_layers must be a positive integer, got -1'),
    ({'num_layers': 0}, 'num_layers must be a positive integer, got 0'),
    ({'sliding_window': -3}, 'sliding_window must be a positive integer, '
     'got -3'),
    ({'sliding_window': 0}, 'sliding_window must be a positive integer, '
     'got 0'),
    ({'num_kv_heads': 0}, 'num_kv_heads must be a positive integer, got 0'),
    ({'num_kv_heads': 3}, r'num_heads \(4\) must be a multiple of '
     r'num_kv_heads \(3\)'),
    ({'width': 64.5}, 'width must be a positive integer, got 64.5'),
    ({'head_dim': True}, 'head_dim must be a positive integer, got True'),
    ({'vocab_size': 0}, 'vocab_size must be a positive integer'),
    ({'mlp_dim': -2}, 'mlp_dim must be a positive integer'),
    ({'rope_base_local': 0.0}, 'rope_base_local must be a positive number'),
    ({'final_logit_softcap': -1.0}, 'final_logit_softcap must be a positive '
     'number'),
    ({'norm_eps': -1e-6}, 'norm_eps must be a finite number >= 0'),
    # Every RMSNorm had output 0.
    ({'norm_eps': float('inf')}, 'norm_eps must be a finite number >= 0'),
])
def test_config_sizes_are_validated(change, match):
  with pytest.raises(ValueError, match=match) as e:
    gemma.get_config('gemma3-tiny').replace(**change)
  assert _one_line(e).startswith('GemmaConfig.')


# --------------------------------------------------------------------------
# Malformed config.json values: one line naming config.json.


@pytest.mark.parametrize('change, match', [
    ({'hidden_size': '64x'}, "hidden_size must be an integer, got '64x'"),
    ({'hidden_size': None}, 'hidden_size must be a positive integer, got '
     'null'),
    ({'hidden_size': 64.5}, 'hidden_size must be an integer, got 64.5'),
    ({'rope_scaling': [1, 2]}, r'rope_scaling must be an object or null, got '
     r'\[1, 2\]'),
    ({'rope_scaling': {'rope_type': 'linear', 'factor': 'x'}},
     "rope_scaling.factor must be a number, got 'x'"),
    ({'num_hidden_layers': -1}, 'num_hidden_layers must be a positive '
     'integer, got -1'),
    ({'sliding_window': -3}, 'sliding_window must be a positive integer, '
     'got -3'),
    ({'sliding_window': 0}, 'sliding_window must be a positive integer, '
     'got 0'),
    ({'num_key_value_heads': 0}, 'num_key_value_heads must be a positive '
     'integer, got 0'),
    ({'num_key_value_heads': 3}, r'invalid Gemma config \(GemmaConfig.'
     r'num_heads \(4\) must be a multiple of num_kv_heads \(3\)'),
    ({'layer_types': 'full_attention'}, 'layer_types must be a list'),
    ({'attn_logit_softcapping': 'big'}, 'attn_logit_softcapping must be a '
     "number, got 'big'"),
    ({'rope_parameters': {'full_attention': [1]}},
     r'rope_parameters.full_attention must be an object, got \[1\]'),
    ({'rms_norm_eps': -1.0}, 'norm_eps must be a finite number >= 0'),
])
def test_malformed_config_json_values(hf, change, match):
  path = _edit_config(hf, **change)
  msg = _refused(hf, match)
  assert msg.startswith(f'{path}: '), msg


def test_multimodal_configs_other_than_gemma3_are_refused():
  """A PaliGemma (a prefix LM over Gemma 1 or 2) had loaded with Gemma 3's
  defaults: global RoPE at 1e6 where its own is 1e4, silently."""
  from models.gemma import load  # pylint: disable=g-import-not-at-top
  text = {'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
          'num_attention_heads': 2, 'num_key_value_heads': 1, 'head_dim': 16,
          'vocab_size': 64}
  assert load.config_from_hf({'model_type': 'gemma3', 'text_config': text}
                             ).rope_base_global == 1e6
  for outer, inner in (('paligemma', 'gemma2'), ('paligemma', None),
                       ('gemma3', 'gemma'), (None, 'gemma3_text')):
    config = {'text_config': dict(text, **({} if inner is None else
                                           {'model_type': inner}))}
    if outer is not None:
      config['model_type'] = outer
    with pytest.raises(ValueError, match=r'^config.json: model_type .* with a '
                       r'text_config of .* is not a Gemma text model') as e:
      load.config_from_hf(config)
    assert '\n' not in str(e.value)


def test_null_layer_types_follow_the_sliding_pattern():
  """transformers reads layer_types null as "from the sliding window
  pattern"; it had been refused as not a list."""
  from models.gemma import load  # pylint: disable=g-import-not-at-top
  base = {'model_type': 'gemma3_text', 'vocab_size': 64, 'hidden_size': 32,
          'intermediate_size': 64, 'num_hidden_layers': 6,
          'num_attention_heads': 2, 'head_dim': 16}
  for extra, pattern in (({}, (LOCAL,) * 5 + (GLOBAL,)),
                         ({'sliding_window_pattern': 3},
                          (LOCAL, LOCAL, GLOBAL))):
    config = load.config_from_hf({**base, **extra, 'layer_types': None})
    assert config == load.config_from_hf({**base, **extra})
    assert config.layer_types == pattern * (6 // len(pattern))


def test_a_dtype_that_is_not_floating_is_refused(hf):
  """int32 compute had made every logit 0 (the scaled embedding cast to
  int); an int8 param dtype failed in the random initialiser's words."""
  for kwargs, message in (
      ({'dtype': jnp.int32}, r"^Gemma: dtype must be a floating dtype "
       r"\(float32 or bfloat16\), got int32\.$"),
      ({'param_dtype': 'int8'}, r"^Gemma: param_dtype must be a floating "
       r"dtype \(float32 or bfloat16\), got int8\.$"),
      ({'dtype': 'float33'}, r"^Gemma: dtype must be a floating dtype")):
    with pytest.raises(ValueError, match=message):
      gemma.from_pretrained(hf, **kwargs)
  with pytest.raises(ValueError, match=r'^T5: dtype must be a floating'):
    t5.T5(t5.get_config('tiny'), dtype=jnp.int32, rngs=nnx.Rngs(0))
  t5_dir = t5.save_pretrained(t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0)),
                              hf.parent / 't5')
  with pytest.raises(ValueError, match=r"^T5: param_dtype must be a floating "
                     r"dtype \(float32 or bfloat16\), got int8\.$"):
    t5.from_pretrained(t5_dir, param_dtype='int8')
  # float16 is floating: it builds.
  assert gemma.from_pretrained(hf, dtype=jnp.float16).dtype == jnp.float16


def test_config_json_that_is_not_an_object(hf):
  (hf / 'config.json').write_text('[1, 2]')
  msg = _refused(hf, 'expected a JSON object, got list')
  assert msg.startswith(str(hf / 'config.json')), msg


def test_absent_config_keys_take_transformers_defaults():
  """A config.json without a family's keys loads as transformers would
  (Gemma2Config / Gemma3TextConfig defaults), where it had loaded with no
  soft-caps, a head_dim query scale and Gemma 3's local RoPE at rope_theta:
  another model, silently. A key that says null stays off."""
  from models.gemma import load  # pylint: disable=g-import-not-at-top
  base = {'vocab_size': 64, 'hidden_size': 32, 'intermediate_size': 64,
          'num_hidden_layers': 2, 'num_attention_heads': 2, 'head_dim': 16}
  c2 = load.config_from_hf({**base, 'model_type': 'gemma2'})
  assert (c2.attn_logit_softcap, c2.final_logit_softcap,
          c2.query_pre_attn_scalar, c2.sliding_window) == (50.0, 30.0, 256,
                                                            4096)
  c2 = load.config_from_hf({**base, 'model_type': 'gemma2',
                            'final_logit_softcapping': None})
  assert c2.final_logit_softcap is None
  c3 = load.config_from_hf({**base, 'model_type': 'gemma3_text'})
  assert (c3.rope_base_global, c3.rope_base_local, c3.query_pre_attn_scalar,
          c3.sliding_window, c3.attn_logit_softcap) == (1e6, 1e4, 256, 4096,
                                                         None)
  c1 = load.config_from_hf({**base, 'model_type': 'gemma'})
  assert c1.query_pre_attn_scalar == 16 and c1.sliding_window is None
  # A saved config says every key: it reads back as it was.
  assert load.config_from_hf(load.config_to_hf(c2)) == c2


# --------------------------------------------------------------------------
# GGUF metadata.


@pytest.mark.parametrize('key, value, match', [
    ('gemma3.attention.sliding_window', 0,
     'sliding_window must be a positive integer, got 0'),
    ('gemma3.attention.head_count_kv', 0,
     'GGUF metadata gemma3.attention.head_count_kv must be a positive '
     'integer, got 0'),
    ('gemma3.attention.head_count', 0,
     'GGUF metadata gemma3.attention.head_count must be a positive integer, '
     'got 0'),
    ('gemma3.attention.head_count_kv', 3,
     r'num_heads \(4\) must be a multiple of num_kv_heads \(3\)'),
])
def test_bad_gguf_metadata(gguf_path, key, value, match):
  _patch_gguf_u32(gguf_path, key, value)
  msg = _refused(gguf_path, match)
  assert msg.startswith(f'{gguf_path}: '), msg


def test_gguf_alignment_must_be_a_power_of_two(tmp_path):
  for align in (0, 24):
    path = tmp_path / f'a{align}.gguf'
    gguf_files.write_minimal_gguf(path, 'gemma3', alignment=32)
    _patch_gguf_u32(path, 'general.alignment', align)
    msg = _refused(path, 'not a readable GGUF file \\(general.alignment must '
                   f'be a power of two, got {align}\\)')
    assert msg.startswith(f'{path}: '), msg


# --------------------------------------------------------------------------
# Safetensors entries.


def _rewrite_header(st, edit):
  """Applies ``edit(header)`` to a .safetensors file, keeping its data."""
  raw = st.read_bytes()
  (n,) = struct.unpack('<Q', raw[:8])
  header = json.loads(raw[8:8 + n])
  edit(header)
  blob = json.dumps(header).encode()
  blob += b' ' * (-len(blob) % 8)
  st.write_bytes(struct.pack('<Q', len(blob)) + blob + raw[8 + n:])


NORM0 = 'model.layers.0.input_layernorm.weight'  # float32 [64]: 256 bytes
NORM1 = 'model.layers.1.input_layernorm.weight'


def _set(name, key, value):
  def edit(h):
    h[name][key] = value
  return edit


def _offsets_of(src, dst):
  def edit(h):
    h[dst]['data_offsets'] = list(h[src]['data_offsets'])
  return edit


def _shift(name, by):
  def edit(h):
    b, e = h[name]['data_offsets']
    h[name]['data_offsets'] = [b + by, e + by]
  return edit


# The safetensors package validates the header; each is its one-line error,
# naming the file, where the old hand-written reader had its own wording.
@pytest.mark.parametrize('edit, match', [
    (_set(NORM0, 'shape', [-8, -8]), 'integer `-8`, expected usize'),
    (_set(NORM0, 'shape', [64.0]), 'floating point `64.0`, expected usize'),
    (_set(NORM0, 'shape', [True] * 64), 'boolean `true`, expected usize'),
    (_shift(NORM0, -10**9), r'integer `-[0-9]+`, expected usize'),
    (_set(NORM0, 'data_offsets', [-16, 240]), 'integer `-16`, expected usize'),
    (_shift(NORM0, 10**9), 'invalid offset for tensor'),
    (_set(NORM0, 'data_offsets', [0.0, 256.0]), 'floating point `0.0`'),
    (_set(NORM0, 'shape', [65]), 'invalid shape, data type, or offset'),
    (_offsets_of(NORM0, NORM1), 'invalid offset for tensor'),
    (_set(NORM0, 'data_offsets', [1]), 'expected a tuple of size 2'),
    (_set(NORM0, 'dtype', 'F99'), 'unknown variant `F99`'),
])
def test_malformed_safetensors_entries(hf, edit, match):
  st = hf / 'model.safetensors'
  _rewrite_header(st, edit)
  msg = _refused(hf, 'not a readable safetensors file .*' + match)
  assert msg.startswith(f'{st}: '), msg
  with pytest.raises(ValueError, match=match) as e:  # and the PEFT prefix probe
    gemma_load.hf_module_prefix(str(hf))
  assert _one_line(e).startswith(f'{st}: ')


def test_truncated_safetensors_file_is_one_line(hf):
  st = hf / 'model.safetensors'
  st.write_bytes(st.read_bytes()[:-10])
  msg = _refused(hf, 'not a readable safetensors file .*not fully covered')
  assert msg.startswith(f'{st}: '), msg


def test_gemma2_gguf_without_soft_cap_keys_takes_llama_cpp_defaults(tmp_path):
  """Gemma 2 GGUFs made before llama.cpp wrote these keys: it runs them with
  50 and 30 (as a config.json without them does); they had run uncapped."""
  model = _model(gemma.get_config('gemma2-tiny'))
  _write_gemma_gguf(model, tmp_path / 'old.gguf', arch='gemma2',
                    softcaps=False)
  config = gemma.from_pretrained(tmp_path / 'old.gguf').config
  assert (config.attn_logit_softcap, config.final_logit_softcap) == (50.0,
                                                                    30.0)
  _write_gemma_gguf(model, tmp_path / 'new.gguf', arch='gemma2')
  config = gemma.from_pretrained(tmp_path / 'new.gguf').config
  assert (config.attn_logit_softcap, config.final_logit_softcap) == (5.0, 3.0)


def test_a_gemma3_attention_soft_cap_is_not_applied(tmp_path):
  """llama.cpp's and transformers' Gemma 3 read no attention soft-cap (a
  config.json may still hold one): such files had run capped here."""
  model = _model(gemma.get_config('gemma3-tiny').replace(
      attn_logit_softcap=5.0, final_logit_softcap=7.0))
  _write_gemma_gguf(model, tmp_path / 'capped.gguf')
  config = gemma.from_pretrained(tmp_path / 'capped.gguf').config
  assert (config.attn_logit_softcap, config.final_logit_softcap) == (None,
                                                                    7.0)


def test_gguf_files_that_cannot_be_used_are_one_line(tmp_path):
  """Each had been a traceback (NotImplementedError, IndexError,
  RuntimeError), or an error not naming the file, or (an untied head) was
  dropped silently."""
  from models.gemma import gguf_io  # pylint: disable=g-import-not-at-top
  from tests.test_gemma_model import _write_tokenizer_gguf  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'f64.gguf'
  with gguf_files.gguf_writer(path, 'gemma3') as w:
    w.add_block_count(1)
    w.add_tensor('token_embd.weight', np.zeros((8, 4), np.float64))
  with pytest.raises(ValueError, match="GGUF tensor 'token_embd.weight' has "
                     'type F64, which cannot be dequantized') as e:
    gguf_io.read_gguf(str(path)).tensors['token_embd.weight'].dequantize()
  _one_line(e)

  (tmp_path / 'empty.gguf').write_bytes(b'')
  with pytest.raises(ValueError, match='empty.gguf: not a readable GGUF file '
                     r'\(it is 0 bytes long\)') as e:
    gemma.from_pretrained(tmp_path / 'empty.gguf')
  _one_line(e)

  model = _model(gemma.get_config('gemma3-tiny'))
  c = model.config
  head = np.ones((c.vocab_size, c.width), np.float32)
  _write_gemma_gguf(model, tmp_path / 'untied.gguf',
                    extra={'output.weight': head})
  with pytest.raises(ValueError, match='untied.gguf: output.weight differs '
                     'from token_embd.weight') as e:
    gemma.from_pretrained(tmp_path / 'untied.gguf')
  _one_line(e)

  _write_tokenizer_gguf(tmp_path / 'tok.gguf', eos_id=999)
  with pytest.raises(ValueError, match='tok.gguf: GGUF tokenizer.ggml.'
                     'eos_token_id 999 is outside its vocabulary') as e:
    gemma.load_tokenizer(tmp_path / 'tok.gguf')
  _one_line(e)
  _write_tokenizer_gguf(tmp_path / 'dup.gguf', extra_control=('hello',))
  with pytest.raises(ValueError, match='dup.gguf: unusable GGUF vocabulary'
                     ) as e:
    gemma.load_tokenizer(tmp_path / 'dup.gguf')
  _one_line(e)


@pytest.mark.parametrize('name, change', [
    ('gemma3-tiny', dict(final_logit_softcap=5.0, rope_base_local=1000.0)),
    ('gemma2-tiny', dict(final_logit_softcap=None, sliding_window=3)),
])
def test_hf_config_round_trips_every_field(name, change):
  c = gemma.get_config(name).replace(**change)
  assert gemma_load.config_from_hf(gemma_load.config_to_hf(c)) == c


@pytest.mark.parametrize('name, change', [
    # Hugging Face derives the norms from the model type.
    ('gemma2-tiny', dict(use_post_norms=False)),
    ('gemma-tiny', dict(use_post_norms=True)),
    ('gemma2-tiny', dict(use_qk_norm=True)),
    # Not written (transformers has no such setting there): such a save had
    # come back without them, a Gemma 1's logits 70 apart.
    ('gemma-tiny', dict(attn_logit_softcap=5.0)),
    ('gemma2-tiny', dict(rope_base_local=1000.0)),
    # Written, then ignored by transformers (logits 0.9-2.9 apart).
    ('gemma-tiny', dict(query_pre_attn_scalar=64.0)),
    ('gemma3-tiny', dict(rope_scale_local=4.0)),
    # Written, then not applied by transformers' Gemma 3.
    ('gemma3-tiny', dict(attn_logit_softcap=5.0)),
])
def test_a_config_hugging_face_cannot_hold_is_refused_on_save(
    name, change, tmp_path):
  """Such a save had loaded as another model, or been refused only when
  loaded."""
  c = gemma.get_config(name).replace(**change)
  key = next(iter(change))
  with pytest.raises(ValueError, match=rf'^a Gemma {c.family} config with '
                     rf'{key}={change[key]} has no Hugging Face form') as e:
    gemma_load.save_pretrained(gemma.Gemma(c, rngs=nnx.Rngs(0)),
                               str(tmp_path / 'out'))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'out' / 'config.json').exists()


def test_a_preset_name_for_a_config_is_one_line():
  for make in (lambda: gemma.Gemma('gemma-tiny'),
               lambda: gemma.init_cache('gemma-tiny', 1, 4)):
    with pytest.raises(TypeError, match=r"config must be a GemmaConfig \(use "
                       r"models.gemma.get_config\('gemma-tiny'\)\), got str"):
      make()


def test_a_gemma_1_with_sliding_layers_is_refused_on_save():
  """transformers' Gemma 1 has no sliding window: every layer is global."""
  c = gemma.get_config('gemma-tiny').replace(
      attention_pattern=(LOCAL, GLOBAL), sliding_window=2)
  with pytest.raises(ValueError, match=r'^a Gemma 1 config with '
                     'sliding-window layers has no Hugging Face form'):
    gemma_load.config_to_hf(c)


def test_a_config_with_non_ascii_text_reads_under_any_locale(tmp_path):
  """A Hub config.json is UTF-8; read in the locale's encoding (ASCII
  under LC_ALL=POSIX without Python's UTF-8 mode, as some batch systems
  run jobs) one with a non-ASCII value had been 'malformed JSON'."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  hf = dict(gemma_load.config_to_hf(gemma.get_config('gemma3-tiny')))
  hf['_name_or_path'] = 'caf\u00e9/gemma \u2014 \u65e5\u672c'
  (tmp_path / 'config.json').write_text(
      json.dumps(hf, ensure_ascii=False), encoding='utf-8')
  root = Path(__file__).resolve().parents[1]
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('LC_', 'LANG', 'PYTHONUTF8'))}
  proc = subprocess.run(
      [sys.executable, '-c',
       'import sys; from models.gemma import load; '
       'print(load.read_hf_config(sys.argv[1]).num_layers)', str(tmp_path)],
      capture_output=True, text=True, timeout=120,
      env=dict(env, LC_ALL='POSIX', PYTHONCOERCECLOCALE='0', PYTHONUTF8='0',
               PYTHONPATH=str(root)))
  assert proc.returncode == 0, proc.stderr[-500:]
  assert proc.stdout.strip() == '7'

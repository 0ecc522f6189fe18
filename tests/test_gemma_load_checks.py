"""The Gemma loaders refuse checkpoints their config does not describe.

Each refusal is one line naming the file (config.json, a .safetensors file or
the .gguf) and what is wrong: leftover tensors (a config with fewer layers
than the checkpoint), sizes that are not positive, malformed config values,
safetensors entries whose shape or byte range is invalid, unusable GGUF
metadata. A correct checkpoint still loads.
"""

import collections
import json
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
from tests import xla_flags
from tests.test_gemma_model import (_model, _one_line, _params, _tiny,
                                     _write_gemma_gguf, _write_tokenizer_gguf)

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
  hf = dict(gemma_load.config_to_hf(gemma.get_config('gemma3-tiny')))
  hf['_name_or_path'] = 'caf\u00e9/gemma \u2014 \u65e5\u672c'
  (tmp_path / 'config.json').write_text(
      json.dumps(hf, ensure_ascii=False), encoding='utf-8')
  proc = subprocess.run(
      [sys.executable, '-c',
       'import sys; from models.gemma import load; '
       'print(load.read_hf_config(sys.argv[1]).num_layers)', str(tmp_path)],
      capture_output=True, text=True, timeout=120,
      env=xla_flags.script_env(drop=('LC_', 'LANG', 'PYTHONUTF8'),
                               LC_ALL='POSIX', PYTHONCOERCECLOCALE='0',
                               PYTHONUTF8='0'))
  assert proc.returncode == 0, proc.stderr[-500:]
  assert proc.stdout.strip() == '7'


# --------------------------------------------------------------------------
# Mutants of load.py, gguf_io.py and tokenizer.py the tests above let
# through (session 44): config values, GGUF names and defaults, the
# Hugging Face layouts, the GGUF tokenizer.

_BASE = {'vocab_size': 64, 'hidden_size': 32, 'intermediate_size': 64,
         'num_hidden_layers': 2, 'num_attention_heads': 2, 'head_dim': 16}


# config.json values.
@pytest.mark.parametrize('key, match', [
    ('num_hidden_layers', 'num_hidden_layers must be an integer, got True'),
    ('head_dim', 'head_dim must be an integer, got True'),
    ('rope_theta', 'rope_theta must be a number, got True'),
    ('rms_norm_eps', 'rms_norm_eps must be a number, got True'),
])
def test_config_json_booleans_are_not_numbers(key, match):
  """JSON true is a Python bool, an int subclass: it must not read as 1."""
  with pytest.raises(ValueError, match=f'^config.json: {match}') as e:
    gemma_load.config_from_hf({**_BASE, 'model_type': 'gemma2', key: True})
  _one_line(e)


# GGUF tensor names.
@pytest.mark.parametrize('name, arch', [('gemma-tiny', 'GEMMA'),
                                        ('gemma2-tiny', 'GEMMA2'),
                                        ('gemma3-tiny', 'GEMMA3')])
def test_gguf_tensor_names_are_llama_cpps(name, arch):
  """Every GGUF name is the one llama.cpp's converter writes for the HF
  tensor (gguf-py's own TensorNameMap): the GGUF tests write their files
  through gguf_name itself, so a swapped pair (attn_q / attn_k, ffn_gate /
  ffn_up, the norms) round-trips there and only the slow real-model tests
  (Gemma 3 only) would see it."""
  import gguf  # pylint: disable=g-import-not-at-top
  c = gemma.get_config(name)
  names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch),
                                   c.num_layers)
  for e in gemma_load._param_table(c):  # pylint: disable=protected-access
    want = names.get_name(e.hf_name, try_suffixes=('.weight',))
    assert want is not None, e.hf_name
    assert gemma_load.gguf_name(e.hf_name, c.family) == want, e.hf_name


# Configs that would run as another model.
@pytest.mark.parametrize('change, match', [
    ({'use_bidirectional_attention': True},
     'bidirectional attention \\(EmbeddingGemma\\) is not supported'),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}},
     "rope_scaling type 'yarn' is not supported"),
    ({'rope_scaling': {'type': 'dynamic', 'factor': 4.0}},
     "rope_scaling type 'dynamic' is not supported"),
    ({'rope_parameters': {'full_attention': {'rope_type': 'yarn',
                                             'factor': 8.0},
                          'sliding_attention': {}}},
     "rope_parameters.full_attention type 'yarn' is not supported"),
])
def test_hf_configs_of_other_models_are_refused(change, match):
  with pytest.raises(ValueError, match=f'^config.json: {match}') as e:
    gemma_load.config_from_hf({**_BASE, 'model_type': 'gemma3_text',
                               **change})
  _one_line(e)


@pytest.mark.parametrize('model_type', ['gemma', 'gemma2'])
def test_gemma_1_and_2_sliding_layers_share_rope_theta(model_type):
  """One rotary embedding for every layer of a Gemma 1 or 2: a rope_theta
  of its own is the local layers' base too (not 10k)."""
  c = gemma_load.config_from_hf({**_BASE, 'model_type': model_type,
                                 'rope_theta': 5e5})
  assert (c.rope_base_global, c.rope_base_local) == (5e5, 5e5)


def test_rope_parameters_per_layer_type_are_each_read():
  """transformers 5 writes one RoPE dict per attention kind; the sliding
  layers' own linear factor is theirs (it had been dropped for 1)."""
  c = gemma_load.config_from_hf({**_BASE, 'model_type': 'gemma3_text',
                                 'rope_parameters': {
                                     'full_attention': {
                                         'rope_type': 'linear', 'factor': 8.0,
                                         'rope_theta': 1e6},
                                     'sliding_attention': {
                                         'rope_type': 'linear', 'factor': 2.0,
                                         'rope_theta': 1e4}}})
  assert (c.rope_base_global, c.rope_scale_global, c.rope_base_local,
          c.rope_scale_local) == (1e6, 8.0, 1e4, 2.0)


def test_absent_num_key_value_heads_is_multi_head():
  c = gemma_load.config_from_hf({**_BASE, 'model_type': 'gemma2'})
  assert c.num_kv_heads == c.num_heads == 2


@pytest.mark.parametrize('model_type', ['gemma', 'gemma2', 'gemma3_text'])
def test_absent_eps_and_context_take_transformers_defaults(model_type):
  c = gemma_load.config_from_hf({**_BASE, 'model_type': model_type})
  assert c.norm_eps == 1e-6  # every Gemma config class's rms_norm_eps
  # GemmaConfig / Gemma2Config: 8192; Gemma3TextConfig 131072, flat as
  # nested (a flat gemma3_text config had got 8192).
  assert c.max_seq_len == (131_072 if model_type == 'gemma3_text' else 8192)
  nested = gemma_load.config_from_hf({
      'model_type': 'gemma3',
      'text_config': {**_BASE, 'num_key_value_heads': 2}})
  assert nested.max_seq_len == 131_072


# --------------------------------------------------------------------------
# GGUF metadata and tensors.


def test_a_gguf_tensor_of_another_shape_is_refused(tmp_path):
  """Without the check a norm of one element loads and broadcasts over the
  width, silently."""
  model = _model(gemma.get_config('gemma3-tiny'))
  path = tmp_path / 'bad.gguf'
  _write_gemma_gguf(model, path, replace={
      'blk.0.attn_norm.weight': np.ones(1, np.float32)})
  with pytest.raises(ValueError, match=r"bad.gguf: tensor 'blk.0.attn_norm."
                     r"weight' dequantizes to shape \[1\], expected \[64\]"
                     ) as e:
    gemma.from_pretrained(path)
  _one_line(e)


def test_a_gguf_with_a_copy_of_the_tied_head_loads(tmp_path):
  """output.weight equal to token_embd.weight is the tied head, not a
  leftover; one of another shape is a leftover."""
  model = _model(gemma.get_config('gemma3-tiny'))
  embed = np.asarray(model.embedding.get_value(), np.float32)
  _write_gemma_gguf(model, tmp_path / 'tied.gguf',
                      extra={'output.weight': embed})
  loaded = gemma.from_pretrained(tmp_path / 'tied.gguf')
  np.testing.assert_allclose(loaded.embedding.get_value(), embed)
  _write_gemma_gguf(model, tmp_path / 'other.gguf',
                      extra={'output.weight': embed[:8]})
  with pytest.raises(ValueError, match="other.gguf: unexpected tensor "
                     "'output.weight' for the model") as e:
    gemma.from_pretrained(tmp_path / 'other.gguf')
  _one_line(e)


@pytest.mark.parametrize('arch, base, window', [
    ('gemma', 1e4, None), ('gemma2', 1e4, 4096), ('gemma3', 1e6, 512)])
def test_gguf_metadata_defaults_are_llama_cpps(tmp_path, arch, base, window):
  """Keys a converter may leave out take llama.cpp's values: head_dim
  width / heads, rope.freq_base 10k (1M for Gemma 3), Gemma 2's 4096
  window."""
  path = tmp_path / f'{arch}.gguf'
  with gguf_files.gguf_writer(path, arch) as w:
    w.add_block_count(6)
    w.add_embedding_length(96)
    w.add_head_count(4)
    w.add_feed_forward_length(64)
    if arch == 'gemma3':
      w.add_sliding_window(512)
    w.add_tensor('token_embd.weight', np.zeros((8, 96), np.float32))
  c = gemma_load.config_from_gguf(gemma_load.gguf_file(path))
  assert (c.head_dim, c.num_kv_heads) == (24, 4)
  assert c.rope_base_global == base
  assert c.sliding_window == window


def test_gguf_version_2_files_are_read_and_1_refused(tmp_path):
  path = tmp_path / 'v.gguf'
  gguf_files.write_minimal_gguf(path, 'gemma3')
  raw = bytearray(path.read_bytes())
  assert raw[4:8] == bytes([3, 0, 0, 0])
  raw[4] = 2  # v2 and v3 share the layout read here (64-bit counts)
  path.write_bytes(bytes(raw))
  from models.gemma import gguf_io  # pylint: disable=g-import-not-at-top
  assert gguf_io.read_gguf(str(path)).tensors['token_embd.weight'].shape == (
      8, 4)
  raw[4] = 1
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match='unsupported GGUF version 1'):
    gguf_io.read_gguf(str(path))


def test_saved_gemma3_pattern_reads_back_without_layer_types():
  """transformers before 4.53 (no layer_types) derives Gemma 3's layers
  from sliding_window_pattern: it must say the config's own period."""
  c = gemma.get_config('gemma3-tiny').replace(
      attention_pattern=(LOCAL, LOCAL, GLOBAL), num_layers=6)
  d = gemma_load.config_to_hf(c)
  assert d['sliding_window_pattern'] == 3
  del d['layer_types']
  assert gemma_load.config_from_hf(d) == c


# --------------------------------------------------------------------------
# Hugging Face layouts.


def test_weights_load_in_param_dtype(tmp_path):
  """from_pretrained's param_dtype is the stored weights' dtype (float32
  whatever was asked would be twice the memory, silently)."""
  import jax  # pylint: disable=g-import-not-at-top
  model = _model(gemma.get_config('gemma3-tiny'))
  gemma.save_pretrained(model, tmp_path / 'hf')
  _write_gemma_gguf(model, tmp_path / 'm.gguf')
  for path in (tmp_path / 'hf', tmp_path / 'm.gguf'):
    loaded = gemma.from_pretrained(path, param_dtype=jnp.bfloat16)
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(loaded, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}, (path, dtypes)
  # And a bfloat16 model saves as one.
  gemma.save_pretrained(loaded, tmp_path / 'bf16')
  config = json.loads((tmp_path / 'bf16' / 'config.json').read_text())
  assert config['torch_dtype'] == 'bfloat16'


@pytest.mark.parametrize('stored, module', [
    ('model.layers.0.self_attn.q_proj.weight', 'model'),
    ('model.language_model.layers.0.self_attn.q_proj.weight',
     'model.language_model'),
    # Saved before transformers 4.52; the module is model.language_model.
    ('language_model.model.layers.0.self_attn.q_proj.weight',
     'model.language_model'),
])
def test_hf_module_prefix_of_each_layout(tmp_path, stored, module):
  save_file({stored: np.zeros((2, 2), np.float32)},
            str(tmp_path / 'model.safetensors'))
  assert gemma_load.hf_module_prefix(str(tmp_path)) == module


def test_vision_tensors_in_a_text_only_checkpoint_are_leftovers(tmp_path):
  """Only a multimodal checkpoint (its text model under a prefix) may hold
  a vision tower beside it."""
  model = _model(gemma.get_config('gemma-tiny'))
  gemma.save_pretrained(model, tmp_path)
  st = str(tmp_path / 'model.safetensors')
  tensors = dict(load_file(st))
  save_file(dict(tensors, **{'vision_tower.w': np.zeros(2, np.float32)}), st)
  with pytest.raises(ValueError, match="unexpected tensor 'vision_tower.w' "
                     'for this config.json') as e:
    gemma.from_pretrained(tmp_path)
  _one_line(e)


def test_a_renamed_tensor_is_reported_missing_not_leftover(tmp_path):
  """A checkpoint of another naming: the missing tensor is the clearer
  message, and it comes before the leftover one."""
  model = _model(gemma.get_config('gemma-tiny'))
  gemma.save_pretrained(model, tmp_path)
  st = str(tmp_path / 'model.safetensors')
  tensors = dict(load_file(st))
  name = 'model.layers.1.mlp.up_proj.weight'
  tensors['model.layers.1.mlp.w_up.weight'] = tensors.pop(name)
  save_file(tensors, st)
  with pytest.raises(ValueError, match=f"missing tensor '{name}'") as e:
    gemma.from_pretrained(tmp_path)
  _one_line(e)


# --------------------------------------------------------------------------
# The GGUF tokenizer.

# Three word pieces with their scores: 'ab' merges first.
AB = {'a': -1.0, 'b': -2.0, 'ab': -0.5}



def test_gguf_token_types_sentencepiece_lacks_are_normal(tmp_path):
  """llama.cpp's UNDEFINED (0) and any type past BYTE (6) are read as
  normal pieces, not handed to SentencePiece as they are."""
  n = _write_tokenizer_gguf(tmp_path / 't.gguf', words=AB,
                            types=[3] * 4 + [6] * 256 + [0, 7, 1])
  tok = gemma.load_tokenizer(tmp_path / 't.gguf')
  assert tok.vocab_size == n
  assert tok.encode('ab', add_bos=False) == [n - 1]
  assert tok.decode([n - 3, n - 2]) == 'ab'


def test_gguf_tokenizer_arrays_of_different_lengths_are_refused(tmp_path):
  for i, kw in enumerate(({'types': [3] * 4 + [6] * 256 + [1] * 2},
                          {'scores': [0.0] * 262})):
    path = tmp_path / f'short{i}.gguf'
    _write_tokenizer_gguf(path, words=AB, **kw)
    with pytest.raises(ValueError, match=f'short{i}.gguf: GGUF tokenizer '
                       'arrays differ in length') as e:
      gemma.load_tokenizer(path)
    _one_line(e)


def test_a_negative_special_token_id_is_refused(tmp_path):
  """An int32 id of -1 is refused (Python's negative indexing would
  otherwise pick the last piece)."""
  _write_tokenizer_gguf(tmp_path / 'neg.gguf', unk_id=-1)
  with pytest.raises(ValueError, match='neg.gguf: GGUF tokenizer.ggml.'
                     'unknown_token_id -1 is outside its vocabulary') as e:
    gemma.load_tokenizer(tmp_path / 'neg.gguf')
  _one_line(e)


def test_decode_drops_negative_ids(tmp_path):
  """Like ids past the vocabulary (sentencepiece raises on them)."""
  _write_tokenizer_gguf(tmp_path / 't.gguf', words=AB)
  tok = gemma.load_tokenizer(tmp_path / 't.gguf')
  ids = tok.encode('ab')
  assert tok.decode(ids + [-1, -7]) == 'ab'


def test_an_upper_case_gguf_name_without_its_header_is_named_so(tmp_path):
  path = tmp_path / 'MODEL.GGUF'
  path.write_bytes(b'<!DOCTYPE html>')  # a download's error page
  with pytest.raises(ValueError, match='MODEL.GGUF: not a GGUF file') as e:
    gemma.load_tokenizer(path)
  _one_line(e)


def test_unknown_piece_typed_unknown_is_left_out_of_decoding(tmp_path):
  """llama.cpp's converter types Gemma's <unk> UNKNOWN (2), not CONTROL:
  decode leaves it out all the same (not ' ⁇ ')."""
  _write_tokenizer_gguf(tmp_path / 't.gguf', words=AB,
                        types=[3, 3, 3, 2] + [6] * 256 + [1] * 3)
  tok = gemma.load_tokenizer(tmp_path / 't.gguf')
  assert tok.decode(tok.encode('ab') + [3]) == 'ab'


def test_a_gguf_without_a_sentencepiece_vocabulary_is_refused(tmp_path):
  path = tmp_path / 'bpe.gguf'
  with gguf_files.gguf_writer(path, 'gemma3') as w:
    w.add_tokenizer_model('gpt2')
    w.add_token_list(['a', 'b'])
    w.add_token_types([1, 1])
    w.add_token_scores([0.0, 0.0])
  with pytest.raises(ValueError, match="bpe.gguf: GGUF tokenizer model is "
                     "'gpt2'; expected a SentencePiece") as e:
    gemma.load_tokenizer(path)
  _one_line(e)


# gguf_io.


def test_a_truncated_gguf_is_named_so(tmp_path):
  """A download cut short: the tensor that runs past the end is named."""
  gguf_files.write_minimal_gguf(tmp_path / 'full.gguf', 'gemma3')
  raw = (tmp_path / 'full.gguf').read_bytes()
  (tmp_path / 'cut.gguf').write_bytes(raw[:-16])
  with pytest.raises(ValueError, match=r'cut.gguf: not a readable GGUF file '
                     r'\(tensor token_embd.weight extends past the end of the '
                     r'file\)') as e:
    gemma.from_pretrained(tmp_path / 'cut.gguf')
  _one_line(e)


def test_float16_gguf_matrices_load(tmp_path):
  """llama.cpp's f16 files: matrices stored as F16 (norms stay F32)."""
  import gguf  # pylint: disable=g-import-not-at-top
  from models.gemma import gguf_io  # pylint: disable=g-import-not-at-top
  model = _model(gemma.get_config('gemma3-tiny'))
  c = model.config
  half = {}
  for e in gemma_load._param_table(c):  # pylint: disable=protected-access
    arr = e.to_hf(np.asarray(gemma_load._get_var(model, e.path).get_value()))  # pylint: disable=protected-access
    if arr.ndim == 2:
      half[gemma_load.gguf_name(e.hf_name, c.family)] = arr.astype(np.float16)
  path = tmp_path / 'f16.gguf'
  _write_gemma_gguf(model, path, replace=half)
  assert gguf_io.read_gguf(str(path)).tensors['token_embd.weight'].qtype == (
      gguf.GGMLQuantizationType.F16)
  loaded = dict(gemma_load.iter_named_params(gemma.from_pretrained(path)))
  for name, arr in gemma_load.iter_named_params(model):
    want = arr.astype(np.float16).astype(np.float32) if arr.ndim == 2 else arr
    np.testing.assert_allclose(loaded[name], want, rtol=0, atol=1e-6,
                               err_msg=name)


def test_gguf_vocabulary_merges_as_bpe_by_score(tmp_path):
  """Gemma's SentencePiece model is BPE: the higher-scored merge wins
  ('b'+'c' over 'a'+'b'), where a unigram model takes the best-scoring
  path (ab + c) and equal scores the leftmost pair."""
  n = _write_tokenizer_gguf(tmp_path / 'bpe.gguf', words={
      'a': -10.0, 'b': -5.0, 'c': -0.5, 'ab': -2.0, 'bc': -1.0})
  tok = gemma.load_tokenizer(tmp_path / 'bpe.gguf')
  ids = tok.encode('abc', add_bos=False)
  assert [tok.id_to_piece(i) for i in ids] == ['a', 'bc']
  assert ids == [n - 5, n - 1]

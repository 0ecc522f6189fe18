"""Checkpoint writing and generation settings in models/: what a bad input or
an earlier save in the same folder must not do silently.

* a re-save in the other layout (single file vs shards + index) leaves no
  stale weights that would load instead of the new ones;
* an unmerged PiSSA / LoRA-GA residual kernel is not saved as a model;
* JSON and safetensors files are replaced atomically, NumPy / JAX scalars
  and paths are written as plain JSON values;
* sampling settings, generation lengths, token ids and KV cache bounds are
  checked with one-line ValueErrors.
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import gemma, hf_io, lora, t5
from tests.test_gemma_model import _model, _one_line, _write_tokenizer_gguf

T5_CONFIG = t5.get_config('tiny', num_layers=1, num_decoder_layers=1)
ENC = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
DEC = jnp.array([[0, 3, 4, 5], [0, 7, 8, 9]])


@pytest.fixture(scope='module')
def t5_models():
  """Two tiny T5s with different weights (not to be mutated)."""
  return (t5.T5(T5_CONFIG, rngs=nnx.Rngs(1)),
          t5.T5(T5_CONFIG, rngs=nnx.Rngs(2)))


def _tensors(seed, n=4):
  rng = np.random.default_rng(seed)
  return {f't{i}': rng.normal(size=(64, 64)).astype(np.float32)
          for i in range(n)}


def _assert_loads(directory, expected):
  got = hf_io.load_tensors(directory)
  assert got.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


# --------------------------------------------------------------------------
# A re-save leaves only the new layout's weights.


def test_save_tensors_removes_the_other_layouts_files(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'other.safetensors').write_bytes(b'not ours')
  old = _tensors(0)
  hf_io.save_tensors(tmp_path, old)
  new = _tensors(1)
  # 16 KiB tensors, 40 KB shards: 2 per shard, 2 shards.
  hf_io.save_tensors(tmp_path, new, max_shard_bytes=40_000)
  assert sorted(os.listdir(tmp_path)) == [
      'config.json', 'model-00001-of-00002.safetensors',
      'model-00002-of-00002.safetensors', hf_io.SAFETENSORS_INDEX,
      'other.safetensors']
  _assert_loads(tmp_path, new)
  # More shards, then fewer: the earlier save's extra shards go.
  hf_io.save_tensors(tmp_path, old, max_shard_bytes=20_000)
  hf_io.save_tensors(tmp_path, new, max_shard_bytes=40_000)
  assert sorted(p.name for p in tmp_path.glob('model-*')) == [
      'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
  _assert_loads(tmp_path, new)
  # Back to one file: the index and the shards go, the rest stays.
  hf_io.save_tensors(tmp_path, old)
  assert sorted(os.listdir(tmp_path)) == [
      'config.json', hf_io.SAFETENSORS, 'other.safetensors']
  _assert_loads(tmp_path, old)


def test_save_tensors_touches_only_files_named_as_its_own(tmp_path):
  # A user's 'model-best-of-sweep.safetensors' is not a shard name
  # (model-NNNNN-of-NNNNN), and shards that are links (into a cache's
  # blobs/) are replaced by the names the new index lists, not unlinked.
  (tmp_path / 'model-best-of-sweep.safetensors').write_bytes(b'keep me')
  (tmp_path / 'blobs').mkdir()
  for i in (1, 2):
    blob = tmp_path / 'blobs' / f'b{i}'
    blob.write_bytes(b'')
    (tmp_path / f'model-0000{i}-of-00002.safetensors').symlink_to(blob)
  new = _tensors(1)
  hf_io.save_tensors(tmp_path, new, max_shard_bytes=40_000)
  _assert_loads(tmp_path, new)
  assert (tmp_path / 'model-best-of-sweep.safetensors').read_bytes() == (
      b'keep me')


def test_replacing_keeps_the_old_files_permissions(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text('{}')
  path.chmod(0o600)
  hf_io.write_json(path, {'a': 1})
  assert json.loads(path.read_text()) == {'a': 1}
  assert path.stat().st_mode & 0o777 == 0o600
  assert sorted(os.listdir(tmp_path)) == ['config.json']  # no temp left
  # A new file gets what open() would give it (not a temp file's 0600).
  umask = os.umask(0o022)
  os.umask(umask)
  hf_io.write_json(tmp_path / 'new.json', {})
  assert (tmp_path / 'new.json').stat().st_mode & 0o777 == 0o666 & ~umask
  # Weights too: safetensors' save_file recreates the file at 0600.
  for shard in (None, 8):
    out = tmp_path / f'weights{shard}'
    for path in hf_io.save_tensors(out, {'a': np.zeros(4, np.float32),
                                         'b': np.ones(4, np.float32)},
                                   max_shard_bytes=shard):
      assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path


def test_save_tensors_failing_to_write_is_one_oserror(tmp_path, monkeypatch):
  """A full disk fails inside safetensors (SafetensorError, which the train
  CLI did not catch: a 26-line traceback): one OSError naming the file,
  and no file half-written or left behind."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top

  def full(tensors, filename, metadata=None):
    with open(filename, 'wb') as f:
      f.write(b'half')
    raise SafetensorError('Error while serializing: IoError(No space left '
                          'on device (os error 28))')

  monkeypatch.setattr(hf_io, 'save_file', full)
  with pytest.raises(OSError) as e:
    hf_io.save_tensors(tmp_path, {'a': np.zeros(4, np.float32)})
  assert str(e.value) == (
      f'{tmp_path}/model.safetensors: cannot write (Error while serializing: '
      'IoError(No space left on device (os error 28))).')
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('failing', ['config.json',
                                     'model.safetensors.index.json'])
def test_a_text_file_failing_to_write_names_it(tmp_path, monkeypatch,
                                               failing):
  """config.json (an adapter's adapter_config.json) or the shard index on
  a full disk: the error had been the bare '[Errno 28] No space left on
  device', naming no file."""
  import errno  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  real = pathlib.Path.write_text

  def full_disk(self, text, *args, **kwargs):
    if self.name.startswith(f'.{failing}.'):
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(self, text, *args, **kwargs)

  monkeypatch.setattr(pathlib.Path, 'write_text', full_disk)
  with pytest.raises(OSError) as e:
    hf_io.save_tensors(tmp_path, {'a': np.zeros(4, np.float32),
                                  'b': np.zeros(4, np.float32)},
                       max_shard_bytes=16, texts={'config.json': '{}'})
  assert str(e.value) == (
      f'{tmp_path}/{failing}: cannot write (No space left on device).')
  assert os.listdir(tmp_path) == []


def test_a_save_that_fails_part_way_leaves_the_earlier_save_whole(
    tmp_path, monkeypatch):
  """A full disk on the second of four shards, or on config.json after the
  weights: the folder had held new shards among old ones, or new weights
  under the old config, and loaded as neither model without an error."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  old, new = _tensors(0), _tensors(1)
  # 16 KiB tensors, 20 KB shards: 4 shards.
  hf_io.save_tensors(tmp_path, old, max_shard_bytes=20_000,
                     texts={'config.json': '{"old": 1}'})
  files = sorted(os.listdir(tmp_path))
  calls = []

  def second_fails(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 2:
      raise OSError(28, 'No space left on device')
    save_file(tensors, filename, metadata=metadata)

  monkeypatch.setattr(hf_io, 'save_file', second_fails)
  with pytest.raises(OSError, match='No space left'):
    hf_io.save_tensors(tmp_path, new, max_shard_bytes=20_000,
                       texts={'config.json': '{"new": 1}'})
  assert sorted(os.listdir(tmp_path)) == files  # no temporary file left
  _assert_loads(tmp_path, old)
  assert (tmp_path / 'config.json').read_text() == '{"old": 1}'
  # Every shard written, then the config fails: nothing of the new save.
  monkeypatch.setattr(hf_io, 'save_file', save_file)
  real_write_text = hf_io.Path.write_text

  def config_fails(self, text, *args, **kwargs):
    if '.config.json.' in self.name:
      raise OSError(28, 'No space left on device')
    return real_write_text(self, text, *args, **kwargs)

  monkeypatch.setattr(hf_io.Path, 'write_text', config_fails)
  with pytest.raises(OSError, match='No space left'):
    hf_io.save_tensors(tmp_path, new, max_shard_bytes=20_000,
                       texts={'config.json': '{"new": 1}'})
  assert sorted(os.listdir(tmp_path)) == files
  _assert_loads(tmp_path, old)
  monkeypatch.undo()
  hf_io.save_tensors(tmp_path, new, max_shard_bytes=20_000,
                     texts={'config.json': '{"new": 1}'})
  _assert_loads(tmp_path, new)
  assert (tmp_path / 'config.json').read_text() == '{"new": 1}'


def test_a_save_replaces_links_out_of_the_folder_never_writes_through(
    tmp_path):
  """A Hugging Face cache snapshot's files are links into blobs/ outside
  the snapshot folder: a save over it had been refused (or, before saves
  went through temporary files, would have written into the blobs). The
  links are replaced by the new files; the blobs stay as they were. A
  folder leading out is still refused."""
  snap = tmp_path / 'snapshots' / 'abc'
  snap.mkdir(parents=True)
  blobs = tmp_path / 'blobs'
  blobs.mkdir()
  old = _tensors(0)
  hf_io.save_tensors(blobs, old)
  (blobs / 'cfg').write_text('{"old": 1}')
  (snap / hf_io.SAFETENSORS).symlink_to(blobs / hf_io.SAFETENSORS)
  (snap / 'config.json').symlink_to(blobs / 'cfg')
  new = _tensors(1)
  hf_io.save_tensors(snap, new, texts={'config.json': '{"new": 1}'})
  for name in (hf_io.SAFETENSORS, 'config.json'):
    assert not (snap / name).is_symlink(), name
  _assert_loads(snap, new)
  _assert_loads(blobs, old)
  assert (blobs / 'cfg').read_text() == '{"old": 1}'
  (snap / 'sub').symlink_to(blobs)
  with pytest.raises(ValueError, match="refusing file name 'sub', which "
                     'resolves outside'):
    hf_io.save_tensors(snap, new, filename='sub/model.safetensors')


def test_t5_save_pretrained_over_the_other_layout(t5_models, tmp_path):
  first, second = t5_models
  for model, shard in ((first, None), (second, 40_000), (first, None)):
    t5.save_pretrained(model, tmp_path, max_shard_bytes=shard)
    loaded = t5.from_pretrained(tmp_path)
    np.testing.assert_array_equal(loaded.embedding[...], model.embedding[...])
    assert (tmp_path / hf_io.SAFETENSORS).exists() == (shard is None)
    assert (tmp_path / hf_io.SAFETENSORS_INDEX).exists() == (shard is not None)


def test_saves_refuse_an_empty_or_file_directory_and_a_bad_shard_size(
    t5_models, tmp_path, monkeypatch):
  """'' had saved into the current folder (replacing, and removing, the
  model files there); '5GB' failed comparing with an int after the folder
  was made, and 0 wrote one shard per tensor."""
  monkeypatch.chdir(tmp_path)
  gemma_model = _model('gemma2-tiny')
  lora.apply_lora(gemma_model, ['q'], rank=2)
  (tmp_path / 'afile').write_text('')
  saves = {
      't5.save_pretrained': lambda d: t5.save_pretrained(t5_models[0], d),
      'gemma.save_pretrained': lambda d: gemma.save_pretrained(gemma_model, d),
      'save_peft_adapter': lambda d: lora.save_peft_adapter(gemma_model, d,
                                                            'base'),
  }
  for who, save in saves.items():
    with pytest.raises(ValueError, match=rf"^{who}: directory must be a "
                       r"non-empty path, got ''\.$"):
      save('')
    with pytest.raises(ValueError, match=rf'^{who}: .*afile is a file, not a '
                       r'folder\.$'):
      save(tmp_path / 'afile')
  for bad in ('5GB', 0, -5, True):
    with pytest.raises(ValueError, match=r'^t5\.save_pretrained: '
                       r'max_shard_bytes must be None or a positive number of '
                       r'bytes, got '):
      t5.save_pretrained(t5_models[0], tmp_path / 'out', max_shard_bytes=bad)
  assert sorted(os.listdir(tmp_path)) == ['afile']


def test_peft_adapter_save_keeps_a_model_index_in_the_folder(t5_models,
                                                             tmp_path):
  # The adapter's own layout is adapter_model*; a model's files beside it
  # are not the adapter's to remove.
  t5.save_pretrained(t5_models[0], tmp_path, max_shard_bytes=40_000)
  before = sorted(os.listdir(tmp_path))
  model = t5.T5(T5_CONFIG, rngs=nnx.Rngs(0))
  lora.apply_lora(model, 'q', rank=2)
  lora.save_peft_adapter(model, tmp_path, 'base')
  assert sorted(os.listdir(tmp_path)) == sorted(
      before + [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS])
  t5.from_pretrained(tmp_path)


def _reshard(directory):
  """Turns a saved Gemma folder into an index + shards one (as on the hub)."""
  single = directory / hf_io.SAFETENSORS
  tensors = {k: np.array(v) for k, v in hf_io.load_tensors(directory).items()}
  single.unlink()
  hf_io.save_tensors(directory, tensors, max_shard_bytes=100_000)
  assert len(list(directory.glob('model-*-of-*.safetensors'))) > 1


def test_gemma_save_pretrained_over_a_sharded_checkpoint(tmp_path):
  old, new = _model('gemma-tiny', seed=1), _model('gemma-tiny', seed=2)
  gemma.save_pretrained(old, tmp_path)
  _reshard(tmp_path)
  gemma.save_pretrained(new, tmp_path)
  assert sorted(os.listdir(tmp_path)) == ['config.json', hf_io.SAFETENSORS]
  np.testing.assert_array_equal(gemma.from_pretrained(tmp_path).embedding[...],
                                new.embedding[...])


def test_gemma_loader_prefers_the_single_file_to_the_index(tmp_path):
  # As transformers does; a folder holding both loads model.safetensors.
  old, new = _model('gemma-tiny', seed=1), _model('gemma-tiny', seed=2)
  gemma.save_pretrained(old, tmp_path / 'old')
  _reshard(tmp_path / 'old')
  gemma.save_pretrained(new, tmp_path / 'new')
  for p in (tmp_path / 'old').iterdir():
    if p.name != 'config.json':
      p.rename(tmp_path / 'new' / p.name)
  assert (tmp_path / 'new' / hf_io.SAFETENSORS_INDEX).is_file()
  np.testing.assert_array_equal(
      gemma.from_pretrained(tmp_path / 'new').embedding[...],
      new.embedding[...])


# --------------------------------------------------------------------------
# A PiSSA residual kernel is not a model to save.


def test_gemma_save_pretrained_refuses_an_unmerged_pissa_adapter(tmp_path):
  model = _model('gemma-tiny')
  lora.apply_lora(model, 'q', rank=2, init='pissa')
  with pytest.raises(ValueError, match='merge_lora') as e:
    gemma.save_pretrained(model, tmp_path / 'ckpt')
  assert "'layers.0.attn.q'" in _one_line(e)
  assert not (tmp_path / 'ckpt').exists()
  toks = jnp.array([[3, 4, 5, 6]])
  tuned = model(toks)
  lora.merge_lora(model)
  gemma.save_pretrained(model, tmp_path / 'ckpt')
  np.testing.assert_allclose(gemma.from_pretrained(tmp_path / 'ckpt')(toks),
                             tuned, atol=1e-4)


def test_t5_save_pretrained_refuses_an_unmerged_pissa_adapter(tmp_path):
  model = t5.T5(T5_CONFIG, rngs=nnx.Rngs(0))
  base = model(ENC, DEC)
  lora.apply_lora(model, 'wo', rank=2, init='pissa')
  with pytest.raises(ValueError, match='remove_lora') as e:
    t5.save_pretrained(model, tmp_path / 'ckpt')
  assert 't5.save_pretrained' in _one_line(e)
  assert not (tmp_path / 'ckpt').exists()
  lora.remove_lora(model)
  t5.save_pretrained(model, tmp_path / 'ckpt')
  np.testing.assert_allclose(t5.from_pretrained(tmp_path / 'ckpt')(ENC, DEC),
                             base, atol=1e-5)


def test_the_residual_model_saves_when_asked(tmp_path):
  # PiSSA's release format: the residual W0 - s A0 B0 as the model, beside
  # an adapter relative to it (original_base=False); together they are the
  # adapted model.
  model = _model('gemma-tiny')
  lora.apply_lora(model, 'q', rank=2, init='pissa')
  toks = jnp.array([[3, 4, 5, 6]])
  adapted = model(toks)
  gemma.save_pretrained(model, tmp_path / 'residual',
                        allow_residual_base=True)
  lora.save_peft_adapter(model, tmp_path / 'adapter', 'residual',
                         original_base=False)
  again = gemma.from_pretrained(tmp_path / 'residual')
  lora.load_peft_adapter(again, tmp_path / 'adapter')
  np.testing.assert_allclose(again(toks), adapted, atol=1e-4)


# --------------------------------------------------------------------------
# JSON and safetensors: plain values, atomic replacement.


def _listing(directory):
  return {p.name: p.read_bytes() for p in pathlib.Path(directory).iterdir()}


def test_write_json_converts_numpy_jax_and_path_values(tmp_path):
  path = tmp_path / 'c.json'
  hf_io.write_json(path, {'i': np.int64(3), 'f': np.float32(0.5),
                          'b': np.bool_(True), 'j': jnp.float32(2.0),
                          'p': pathlib.Path('/ckpt/mt5-small'),
                          'n': {'list': [np.int32(1), 2]}})
  assert json.loads(path.read_text()) == {
      'i': 3, 'f': 0.5, 'b': True, 'j': 2.0, 'p': '/ckpt/mt5-small',
      'n': {'list': [1, 2]}}


def test_write_json_that_fails_leaves_the_old_file(tmp_path):
  path = tmp_path / 'c.json'
  hf_io.write_json(path, {'a': 1})
  before = _listing(tmp_path)
  for bad in ({'a': object()}, {'a': np.zeros(3)}, {np.int64(1): 'key'}):
    with pytest.raises(ValueError, match='cannot write as JSON') as e:
      hf_io.write_json(path, bad)
    assert str(path) in _one_line(e)
    assert _listing(tmp_path) == before


def test_safetensors_write_that_fails_leaves_the_old_file(tmp_path,
                                                         monkeypatch):
  hf_io.save_tensors(tmp_path, _tensors(0))
  before = _listing(tmp_path)

  def half_write(tensors, path, metadata=None):
    del tensors, metadata
    pathlib.Path(path).write_bytes(b'\0' * 10)
    raise OSError('disk full')

  monkeypatch.setattr(hf_io, 'save_file', half_write)
  for shard in (None, 40_000):
    with pytest.raises(OSError, match='disk full'):
      hf_io.save_tensors(tmp_path, _tensors(1), max_shard_bytes=shard)
    assert _listing(tmp_path) == before


def test_save_peft_adapter_writes_path_and_scalar_values(tmp_path):
  model = t5.T5(T5_CONFIG, rngs=nnx.Rngs(0))
  lora.apply_lora(model, 'q', rank=2, alpha=jnp.float32(8.0))
  lora.save_peft_adapter(model, tmp_path, pathlib.Path('/ckpt/mt5-small'))
  cfg = json.loads((tmp_path / lora.ADAPTER_CONFIG).read_text())
  assert cfg['base_model_name_or_path'] == '/ckpt/mt5-small'
  assert cfg['lora_alpha'] == 8.0
  fresh = t5.T5(T5_CONFIG, rngs=nnx.Rngs(0))
  lora.load_peft_adapter(fresh, tmp_path)
  np.testing.assert_allclose(fresh(ENC, DEC), model(ENC, DEC), atol=1e-6)


def test_save_peft_adapter_with_a_bad_value_writes_nothing(tmp_path):
  model = t5.T5(T5_CONFIG, rngs=nnx.Rngs(0))
  lora.apply_lora(model, 'q', rank=2)
  with pytest.raises(ValueError, match='adapter_config.json') as e:
    lora.save_peft_adapter(model, tmp_path / 'a', 'base', task_type=object())
  _one_line(e)
  # PEFT reads the base as a Hub id or a path: 5 had been written.
  with pytest.raises(ValueError, match=r'^save_peft_adapter: '
                     r'base_model_name_or_path must be a Hub id or a path, or '
                     r'None, got int\.$'):
    lora.save_peft_adapter(model, tmp_path / 'a', 5)
  assert not (tmp_path / 'a').exists()
  lora.save_peft_adapter(model, tmp_path / 'a', None)  # as PEFT allows
  assert json.loads((tmp_path / 'a' / lora.ADAPTER_CONFIG).read_text())[
      'base_model_name_or_path'] is None


def test_gemma_save_pretrained_with_numpy_config_values(tmp_path):
  gemma.save_pretrained(_model('gemma-tiny'), tmp_path)
  cfg = gemma.get_config('gemma-tiny').replace(mlp_dim=np.int64(128))
  model = _model(cfg)
  gemma.save_pretrained(model, tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())[
      'intermediate_size'] == 128
  back = gemma.from_pretrained(tmp_path)
  assert back.config.mlp_dim == 128
  np.testing.assert_array_equal(back.embedding[...], model.embedding[...])


# --------------------------------------------------------------------------
# Sampling settings.


@pytest.mark.parametrize('kw, match', [
    (dict(temperature=-1.0), 'temperature must be a finite number >= 0'),
    (dict(temperature=float('nan')), 'temperature must be a finite number >= 0'),
    (dict(top_p=0.0), r'top_p must be in \(0, 1\]'),
    (dict(top_p=-1.0), r'top_p must be in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p must be in \(0, 1\]'),
    (dict(top_k=-2), r'top_k must be .* 1\.\.3'),
    (dict(top_k=4), r'top_k must be .* 1\.\.3'),
    (dict(top_k=1.5), r'top_k must be .* 1\.\.3'),
])
def test_sample_logits_refuses_bad_settings(kw, match):
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
  kw = dict(dict(temperature=1.0), **kw)
  with pytest.raises(ValueError, match=match) as e:
    gemma.sample_logits(logits, jax.random.key(0), **kw)
  _one_line(e)


def test_sample_logits_takes_any_integer_top_k_and_greedy_ignores_the_rest():
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
  for k in (jnp.int32(1), np.array(1), np.int64(1)):
    assert int(gemma.sample_logits(logits, jax.random.key(0), temperature=1.0,
                                   top_k=k)[0]) == 1
  # Greedy decoding uses neither top_k nor top_p: they are not refused.
  assert int(gemma.sample_logits(logits, jax.random.key(0), temperature=0.0,
                                 top_k=99, top_p=0.0)[0]) == 1


def test_sample_logits_smallest_top_p_keeps_the_top_token():
  # The nucleus always holds the top token (a top_p <= 0 that would keep
  # none is refused above).
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
  draws = jax.vmap(lambda k: gemma.sample_logits(
      logits, k, temperature=1.0, top_p=1e-9, top_k=0))(
          jax.random.split(jax.random.key(0), 50))
  assert set(np.unique(draws).tolist()) == {1}


def test_sampler_refuses_bad_settings():
  sampler = gemma.Sampler(_model('gemma-tiny'))
  vocab = sampler.config.vocab_size
  for kw, match in ((dict(temperature=-1.0), 'temperature'),
                    (dict(temperature=1.0, top_p=0.0), 'top_p'),
                    (dict(temperature=1.0, top_k=vocab + 1), str(vocab))):
    with pytest.raises(ValueError, match=match) as e:
      sampler([[3, 4]], 2, **kw)
    _one_line(e)
  # One prompt's ids not wrapped in a list had raised a TypeError; a float
  # count, a JAX shape error.
  for prompts, n, match in (([3, 4], 2, r'one prompt\'s ids: \[\[2, 5, 6\]\]'
                                         r'\), got \[3, 4\]'),
                            (None, 2, 'got None'),
                            ([[3, 4]], 2.0, 'max_new_tokens must be an int, '
                             'got 2.0'),
                            # 3.9 had been read as id 3 and True as 1.
                            ([[2, 3.9]], 2, r'^Sampler prompt ids must be '
                             r'integers, got float64 ids \[2, 3.9\]\.$'),
                            ([[True, False]], 2, 'got bool ids')):
    with pytest.raises(ValueError, match=match) as e:
      sampler(prompts, n)
    _one_line(e)
  # A cache of 0 rows or tokens had failed in an empty reduction at the
  # first call, an int one held truncated keys (wrong logits, silently).
  config = sampler.config
  for args, match in (((config, 1, 0), r'^init_cache: cache_size must be an '
                       r'int >= 1, got 0\.$'),
                      ((config, 0, 4), 'batch_size must be an int >= 1'),
                      ((config, 1, 2.5), 'cache_size must be an int >= 1, '
                       'got 2.5'),
                      ((config, 1, 4, jnp.int32), r'^init_cache: dtype must '
                       'be a floating dtype')):
    with pytest.raises(ValueError, match=match) as e:
      gemma.init_cache(*args)
    _one_line(e)
  with pytest.raises(ValueError, match=r'^init_cache: max_length must be an '
                     r'int >= 1, got 0\.$'):
    t5.init_cache(t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0)), 1, 0)
  # 0 had divided by zero at the first call, -16 failed in numpy.
  for pad in (0, -16, 2.0):
    with pytest.raises(ValueError, match='pad_multiple must be an int >= 1, '
                       f'got {pad}') as e:
      gemma.Sampler(sampler._model, pad_multiple=pad)  # pylint: disable=protected-access
    _one_line(e)
  assert sampler(np.array([[3, 4]]), 1).tokens == sampler([[3, 4]], 1).tokens


@pytest.fixture(scope='module')
def cli_checkpoints(tmp_path_factory):
  """A Gemma folder with a 288-piece tokenizer, and a 200-token model."""
  root = tmp_path_factory.mktemp('cli')
  gemma.save_pretrained(
      _model(gemma.get_config('gemma-tiny').replace(vocab_size=288)),
      root / 'ckpt')
  _write_tokenizer_gguf(root / 'tok.gguf')
  sp = gemma.load_tokenizer(root / 'tok.gguf').sp
  (root / 'ckpt' / 'tokenizer.model').write_bytes(sp.serialized_model_proto())
  gemma.save_pretrained(
      _model(gemma.get_config('gemma-tiny').replace(vocab_size=200)),
      root / 'small')
  return root


@pytest.mark.parametrize('extra, match', [
    (['--max-new-tokens', '0'], 'max_new_tokens must be >= 1'),
    (['--temperature', '-1'], 'temperature must be a finite number >= 0'),
    (['--temperature', '1', '--top-k', '1000'], 'top_k must be None or 0'),
    (['--temperature', '1', '--top-p', '0'], 'top_p must be'),
    # Greedy decoding had ignored them silently.
    (['--top-p', '0.9'], '--temperature 0 (the default) decodes greedily'),
    (['--top-k', '5'], 'pass --temperature (e.g. 1.0) to sample'),
    # Every seed had given the same greedy text, without a word.
    (['--seed', '5'], 'error: --seed: --temperature 0 (the default) decodes '
     'greedily, which ignores it; pass --temperature (e.g. 1.0) to sample.'),
    (['--top-k', '5', '--seed', '1'], 'error: --top-k and --seed: '
     '--temperature 0 (the default) decodes greedily, which ignores them'),
    (['--checkpoint', 'small', '--tokenizer', 'ckpt/tokenizer.model'],
     'outside the model\'s vocabulary of 200'),
])
def test_generate_cli_bad_settings_give_one_error_line(cli_checkpoints, capsys,
                                                       extra, match):
  from models import generate  # pylint: disable=g-import-not-at-top
  argv = ['--checkpoint', 'ckpt', '--prompt', 'hello world'] + extra
  # Later --checkpoint / --tokenizer win; paths are under the fixture's root.
  argv = [str(cli_checkpoints / a) if a in ('ckpt', 'small',
                                            'ckpt/tokenizer.model') else a
          for a in argv]
  assert generate.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert match in err


def test_generate_cli_names_a_missing_checkpoint_or_a_fake_gguf(
    tmp_path, capsys):
  """A missing --checkpoint is named as such (it had been 'tokenizer not
  found'), and a .gguf that is not one is 'not a GGUF file' (it had been
  'not a SentencePiece model')."""
  from models import generate  # pylint: disable=g-import-not-at-top
  fake = tmp_path / 'text.gguf'
  fake.write_text('not a model')
  # Neither a folder nor a .gguf: named as the checkpoint it is not (it had
  # been 'not a SentencePiece model', from the tokenizer read from it).
  other = tmp_path / 'list.json'
  other.write_text('[1]')
  folder = tmp_path / 'adapter'
  folder.mkdir()
  for path, want in (
      (tmp_path / 'nope', f'error: --checkpoint {tmp_path}/nope: no such file '
       'or directory (a Hugging Face model folder or a .gguf file).'),
      (fake, f'error: {fake}: not a GGUF file (no GGUF header; a truncated '
       'download or another file renamed).'),
      (other, f"error: {other}: not a Hugging Face directory or a GGUF file "
       "(starts with b'[1]')."),
      # A folder that is no model (a run's adapter/): had been 'no
      # tokenizer.model in this directory'.
      (folder, f'error: {folder}/config.json: config.json not found '
       '(expected a Hugging Face model directory).')):
    assert generate.main(['--checkpoint', str(path), '--prompt', 'hi']) == 2
    assert capsys.readouterr().err == want + '\n'


@pytest.mark.parametrize('argv, message', [
    (['--prompt', 'hi', '--max-new-tokens', 'abc'],
     "argument --max-new-tokens: invalid int value: 'abc'"),
    (['--prompt', 'hi'], 'the following arguments are required: '
     '--checkpoint'),
])
def test_generate_cli_usage_mistakes_are_one_line(argv, message, capsys):
  from models import generate  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    generate.main(argv)
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      f'error: {message} (--help lists the options)\n')


def _export_adapter(model, directory, seed=0, **kw):
  """Exports a rank-2 adapter on every projection, with a nonzero lora_b."""
  lora.apply_lora(model, rank=2, alpha=4.0, rngs=seed)
  rng = np.random.default_rng(seed)
  for proj in lora.select(model).values():
    b = proj.lora.lora_b
    b.set_value(jnp.asarray(rng.normal(size=b.shape), jnp.float32))
  lora.save_peft_adapter(model, directory, 'base', **kw)
  return model


@pytest.mark.parametrize('prefix', ['model', 'model.language_model'])
def test_generate_cli_applies_an_adapter(cli_checkpoints, tmp_path, capsys,
                                         prefix):
  # As python -m train exports it: model.layers... for Gemma*ForCausalLM,
  # model.language_model.layers... for a multimodal Gemma 3 checkpoint.
  import functools  # pylint: disable=g-import-not-at-top
  from models import generate  # pylint: disable=g-import-not-at-top
  ckpt = cli_checkpoints / 'ckpt'
  tuned = _export_adapter(
      gemma.from_pretrained(ckpt), tmp_path / 'adapter',
      name_map=functools.partial(lora.gemma_hf_name, prefix=prefix))
  argv = ['--checkpoint', str(ckpt), '--prompt', 'hello world',
          '--max-new-tokens', '8']
  assert generate.main(argv) == 0
  plain = capsys.readouterr().out
  assert generate.main(argv + ['--adapter', str(tmp_path / 'adapter')]) == 0
  adapted = capsys.readouterr().out
  tok = gemma.load_tokenizer(ckpt)
  expected = gemma.Sampler(tuned, tok)(['hello world'], 8).text[0]
  assert adapted == expected + '\n'
  assert plain == gemma.Sampler(gemma.from_pretrained(ckpt), tok)(
      ['hello world'], 8).text[0] + '\n'
  assert adapted != plain


@pytest.fixture(scope='module')
def wrong_adapters(tmp_path_factory):
  """Adapters the tiny CLI checkpoint cannot take, and an empty folder."""
  root = tmp_path_factory.mktemp('adapters')
  (root / 'empty').mkdir()
  _export_adapter(t5.T5(T5_CONFIG, rngs=nnx.Rngs(0)), root / 't5')
  wide = gemma.get_config('gemma-tiny').replace(vocab_size=288, width=96)
  _export_adapter(_model(wide), root / 'wide')
  deep = gemma.get_config('gemma-tiny').replace(vocab_size=288, num_layers=3)
  _export_adapter(_model(deep), root / 'deep')
  return root


@pytest.mark.parametrize('adapter, match', [
    ('missing', 'missing: no such folder (expected a PEFT adapter'),
    ('empty', 'no adapter_model.safetensors'),
    ('t5', 'is not a projection of this model'),
    ('wide', 'has shape (2, 96), expected (r, 64)'),
    ('deep', "module 'model.layers.2."),
])
def test_generate_cli_bad_adapter_gives_one_error_line(
    cli_checkpoints, wrong_adapters, capsys, adapter, match):
  from models import generate  # pylint: disable=g-import-not-at-top
  argv = ['--checkpoint', str(cli_checkpoints / 'ckpt'), '--prompt', 'hello',
          '--adapter', str(wrong_adapters / adapter)]
  assert generate.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  err = captured.err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert match in err


# --------------------------------------------------------------------------
# T5 decoding bounds.


def test_t5_kv_cache_overflow_is_refused(t5_models):
  model = t5_models[0]
  full = model(ENC[:1], DEC[:1, :3])
  encoded, valid = model.encode(ENC[:1])
  cross = model.cross_kv(encoded)
  cache = t5.init_cache(model, 1, 2)
  for i in range(2):
    logits, cache = model.decode(DEC[:1, i:i + 1], cross, valid, cache, i)
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5)
  with pytest.raises(ValueError, match='KV cache holds 2 tokens') as e:
    model.decode(DEC[:1, 2:3], cross, valid, cache, 2)
  _one_line(e)
  with pytest.raises(ValueError, match='writing 3 at position 0') as e:
    model.decode(DEC[:1, :3], cross, valid, t5.init_cache(model, 1, 2), 0)
  _one_line(e)


@pytest.mark.parametrize('n', [0, -1])
def test_t5_greedy_generate_needs_a_token_to_generate(t5_models, n):
  with pytest.raises(ValueError, match=f'max_new_tokens must be an int >= 1, '
                     f'got {n}') as e:
    t5.greedy_generate(t5_models[0], ENC, n)
  _one_line(e)


@pytest.mark.parametrize('tokens, n, match', [
    # An AttributeError, an IndexError and a JAX shape error before.
    ([[5, 6, 1]], 2.5, r'max_new_tokens must be an int >= 1, got 2.5'),
    (np.array([5, 6, 1]), 2, r'encoder_tokens must be \[batch, seq\] ints, '
     r'got int\d+ of shape \(3,\)'),
    (np.array([[5.0, 6.0]]), 2, r'encoder_tokens must be \[batch, seq\] ints'),
])
def test_t5_greedy_generate_refuses_bad_input_in_one_line(t5_models, tokens,
                                                           n, match):
  with pytest.raises(ValueError, match=match) as e:
    t5.greedy_generate(t5_models[0], tokens, n)
  _one_line(e)
  # A list of rows is taken as an array.
  assert t5.greedy_generate(t5_models[0], [[5, 6, 1]], 1).shape == (1, 1)


def test_a_kv_cache_for_another_batch_size_is_refused(t5_models):
  """It had broadcast: a cache of 2 rows with 1 row of tokens gave 2 rows of
  logits, the second garbage."""
  model = t5_models[0]
  encoded, valid = model.encode(ENC[:1])
  with pytest.raises(ValueError, match='the KV cache holds 2 rows but the '
                     'tokens have 1') as e:
    model.decode(DEC[:1, :1], model.cross_kv(encoded), valid,
                 t5.init_cache(model, 2, 4), 0)
  _one_line(e)
  m = _model('gemma-tiny')
  with pytest.raises(ValueError, match='the KV cache holds 2 rows but the '
                     'tokens have 1') as e:
    m(jnp.asarray([[5, 6, 7]]), cache=gemma.init_cache(m.config, 2, 8))
  _one_line(e)


@pytest.mark.parametrize('bad', [128, -1])
def test_t5_greedy_generate_refuses_token_ids_outside_the_vocabulary(
    t5_models, bad):
  with pytest.raises(ValueError, match=f'token id {bad} is outside the '
                     'model\'s vocabulary of 128') as e:
    t5.greedy_generate(t5_models[0], ENC.at[1, 2].set(bad), 2)
  _one_line(e)


# --------------------------------------------------------------------------
# Sharded saves as transformers writes them.


def test_a_shard_is_full_at_its_limit_not_before(tmp_path):
  """transformers starts a new shard only when the next tensor would pass
  the limit: two 16-byte tensors fill one 32-byte shard."""
  tensors = {'a': np.zeros(4, np.float32), 'b': np.ones(4, np.float32)}
  assert [p.name for p in hf_io.save_tensors(
      tmp_path / 'one', tensors, max_shard_bytes=32)] == [hf_io.SAFETENSORS]
  tensors['c'] = np.ones(4, np.float32)
  assert len(hf_io.save_tensors(tmp_path / 'two', tensors,
                                max_shard_bytes=32)) == 2


def test_a_sharded_save_renames_shards_then_index_then_config(
    tmp_path, monkeypatch):
  """The index's total size is every tensor's bytes, each file carries
  transformers' 'pt' format tag, and the files appear shards first, then
  the index, then config.json: a reader that finds config.json finds the
  rest."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  order, replace = [], os.replace

  def recording(src, dst):
    order.append(pathlib.Path(dst).name)
    return replace(src, dst)

  monkeypatch.setattr(hf_io.os, 'replace', recording)
  tensors = {f't{i}': np.zeros(4096, np.float32) for i in range(4)}
  paths = hf_io.save_tensors(tmp_path, tensors, max_shard_bytes=20_000,
                             texts={'config.json': '{}'})
  assert len(paths) == 4 and order[:4] == [p.name for p in paths]
  assert order[4:] == [hf_io.SAFETENSORS_INDEX, 'config.json']
  index = json.loads((tmp_path / hf_io.SAFETENSORS_INDEX).read_text())
  assert index['metadata']['total_size'] == 4 * 4096 * 4
  for path in paths + hf_io.save_tensors(tmp_path / 'single', tensors):
    with safe_open(str(path), framework='numpy') as f:
      assert f.metadata() == {'format': 'pt'}, path


@pytest.mark.parametrize('model_type', ['t5', 'mt5'])
def test_generate_refuses_sampling_for_t5_and_mt5(tmp_path, capsys,
                                                  model_type):
  """The greedy-only refusal comes before any file is read, for mT5 too
  (it had fallen through to a missing tokenizer.model)."""
  from models import generate  # pylint: disable=g-import-not-at-top
  (tmp_path / 'config.json').write_text(json.dumps(
      {'model_type': model_type}))
  assert generate.main(['--checkpoint', str(tmp_path), '--prompt', 'x',
                        '--temperature', '1']) == 2
  assert capsys.readouterr().err == ('error: T5 / mT5 checkpoints decode '
                                     'greedily here: leave out '
                                     '--temperature.\n')

"""Adapters whose structure changes after a sampler or forward function was
built, and PiSSA/LoRA-GA bases when adapters are replaced or exported."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import gemma
from models import lora
from tests.test_gemma_model import _model

TOKENS = jnp.array([[5, 6, 7, 8, 9]])


def _adapted(name='gemma2-tiny', **kw):
  m = _model(name)
  lora.apply_lora(m, ['q', 'v', 'down'], rank=4, alpha=8, **kw)
  lora.set_lora_params(m, jax.tree.map(lambda x: x + 0.2 * jnp.ones_like(x),
                                       lora.lora_params(m)))
  return m


def test_sampler_and_forward_fn_follow_merge_and_unmerge():
  # Split before merge_lora, they had added the merged adapter again
  # (logits off by ~1.4).
  m = _adapted()
  sampler, forward = gemma.Sampler(m, pad_multiple=8), gemma.forward_fn(m)
  first = lambda: sampler([[5, 6, 7, 8]], 1, stop_at_eos=False,
                          return_logits=True).logits[0, 0]
  want_logits, want = first(), forward(TOKENS)
  for change in (lora.merge_lora, lora.unmerge_lora):
    change(m)
    np.testing.assert_allclose(first(), want_logits, atol=2e-5)
    np.testing.assert_allclose(forward(TOKENS), want, atol=2e-5)
  lora.remove_lora(m)  # and the adapter's removal is seen too
  np.testing.assert_allclose(forward(TOKENS), _model('gemma2-tiny')(TOKENS),
                             atol=2e-5)


def test_sampler_names_a_token_outside_the_vocabulary():
  m = _model('gemma2-tiny')
  with pytest.raises(ValueError, match='token id 300 is outside the '
                     "model's vocabulary of 256"):
    gemma.Sampler(m)([[5, 300]], 1)


def test_a_pissa_base_is_restored_before_another_adapter_lands_on_it(
    tmp_path):
  base = _model('gemma2-tiny')(TOKENS)
  m = _adapted(init='pissa')
  trained = m(TOKENS)
  lora.save_peft_adapter(m, tmp_path, 'base')  # against the original W0
  # Loaded onto the residual W0 - s A0 B0 it had been off by ~2.4, silently.
  with pytest.raises(ValueError, match="kernel of 'layers.0.attn.q' is the "
                     'residual of a PiSSA / LoRA-GA adapter'):
    lora.load_peft_adapter(m, tmp_path)
  np.testing.assert_allclose(m(TOKENS), trained, atol=1e-6)  # untouched
  lora.remove_lora(m)  # puts s A0 B0 back: the base model again
  np.testing.assert_allclose(m(TOKENS), base, atol=2e-5)
  lora.load_peft_adapter(m, tmp_path)
  np.testing.assert_allclose(m(TOKENS), trained, atol=2e-5)
  # A merged adapter is part of the kernel: unmerge first.
  lora.merge_lora(m)
  with pytest.raises(ValueError, match='has a merged adapter; call '
                     'unmerge_lora'):
    lora.load_peft_adapter(m, tmp_path)


def test_export_of_a_nested_language_model_targets_only_it(tmp_path):
  m = _model('gemma3-tiny')
  lora.apply_lora(m, ['q', 'k', 'v', 'o', 'gate', 'up', 'down'], rank=4)
  nested = lambda p: lora.gemma_hf_name(p, prefix='model.language_model')
  lora.save_peft_adapter(m, tmp_path / 'mm', 'x', name_map=nested)
  targets = json.loads((tmp_path / 'mm' / 'adapter_config.json').read_text()
                       )['target_modules']
  # PEFT's rule for a string: the module name must match it whole.
  assert re.fullmatch(targets, 'model.language_model.layers.0.self_attn.q_proj')
  assert re.fullmatch(targets, 'model.language_model.layers.3.mlp.down_proj')
  assert not re.fullmatch(
      targets, 'model.vision_tower.vision_model.encoder.layers.0.self_attn.'
      'q_proj')
  # A text-only checkpoint keeps PEFT's plain list of names.
  lora.save_peft_adapter(m, tmp_path / 'text', 'x')
  assert json.loads((tmp_path / 'text' / 'adapter_config.json').read_text()
                    )['target_modules'] == [
                        'down_proj', 'gate_proj', 'k_proj', 'o_proj',
                        'q_proj', 'up_proj', 'v_proj']


def test_sampler_set_model_reuses_the_compiled_generation():
  # The training loop merges new weights into a fresh model per evaluation.
  first, second = _adapted(), _adapted()
  lora.set_lora_params(second, jax.tree.map(lambda x: 2 * x,
                                            lora.lora_params(second)))
  sampler = gemma.Sampler(first, pad_multiple=8)
  logits = lambda: sampler([[5, 6, 7, 8]], 1, stop_at_eos=False,
                           return_logits=True).logits[0, 0]
  logits()
  fn = sampler._fn  # pylint: disable=protected-access
  sampler.set_model(second)
  want = gemma.Sampler(second, pad_multiple=8)([[5, 6, 7, 8]], 1,
                                               stop_at_eos=False,
                                               return_logits=True).logits[0, 0]
  np.testing.assert_allclose(logits(), want, atol=2e-5)
  assert sampler._fn is fn  # pylint: disable=protected-access


def test_apply_lora_takes_any_integer_rank():
  m = _model('gemma2-tiny')
  lora.apply_lora(m, ['q'], rank=np.int64(4))  # as lro.init takes it
  assert {x.shape[-1] for x in jax.tree.leaves(lora.lora_params(m))
          if x.ndim == 2 and x.shape[-1] == 4}
  for bad in (4.0, True, 0):
    with pytest.raises(ValueError, match='rank must be a positive int'):
      lora.apply_lora(_model('gemma2-tiny'), ['q'], rank=bad)


@pytest.mark.parametrize('kw, message', [
    # Read by truthiness, 'False' had switched each on (rslora: scale
    # alpha/sqrt(r); randomized_svd: another PiSSA init).
    (dict(rslora='False'), "rslora must be True or False, got 'False'"),
    (dict(init='pissa', randomized_svd='False'),
     "randomized_svd must be True or False, got 'False'"),
    (dict(lora_ga_use_sign='no'), "lora_ga_use_sign must be True or False"),
    (dict(dropout='0.1'), r"dropout must be a number in \[0, 1\), got '0.1'"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    # Above min(in, out) = 64 for every init: the optimizers had refused
    # the tree as factors of the wrong layout.
    (dict(rank=80), r"rank 80 is too large for 'layers\.0\.attn\.q''s matrix "
     r"shape \(64, 64\): standard needs rank <= 64"),
])
def test_apply_lora_refuses_bad_switches_dropout_and_rank(kw, message):
  m = _model('gemma2-tiny')
  with pytest.raises(ValueError, match='^apply_lora: ' + message):
    lora.apply_lora(m, ['q'], **kw)
  assert not lora.lora_modules(m)


def test_apply_lora_writes_a_numeric_switch_as_a_bool(tmp_path):
  """rslora=1 (0/1 as inject_hyperparams makes switches) is True, and the
  adapter it writes loads back: "use_rslora": 1 had been refused."""
  m = _model('gemma2-tiny')
  lora.apply_lora(m, ['q'], rank=4, alpha=8, rslora=1)
  assert m.layers[0].attn.q.lora.scale == 4.0  # 8 / sqrt(4)
  lora.save_peft_adapter(m, tmp_path, 'tiny')
  assert json.loads((tmp_path / 'adapter_config.json').read_text())[
      'use_rslora'] is True
  fresh = _model('gemma2-tiny')
  lora.load_peft_adapter(fresh, tmp_path)
  assert fresh.layers[0].attn.q.lora.scale == 4.0


def test_estimate_full_gradients_refuses_a_bad_num_batches():
  m = _model('gemma2-tiny')
  for bad in (0, -1, 2.0, '3'):
    with pytest.raises(ValueError, match=r'^estimate_full_gradients: '
                       r'num_batches must be None or an int >= 1, got '):
      lora.estimate_full_gradients(m, lambda m, b: 0.0, iter([TOKENS]),
                                   ['q'], num_batches=bad)

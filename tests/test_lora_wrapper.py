"""models.lora: targets, inits, pair trees for lro, merge, PEFT I/O, sharding."""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import lora_rite_optax as lro
from lora_rite_optax import init as lro_init
from models import lora, t5
from models.layers import Projection
from tests import xla_flags

ENC = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
DEC = jnp.array([[0, 3, 4, 5], [0, 7, 8, 9]])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# One block per stack keeps every path kind (self/cross attention, gated
# FFN, lm_head) while halving the work; the shapes match test_t5's 'tiny'.
CONFIG = t5.get_config('tiny', num_layers=1, num_decoder_layers=1)


def _t5():
  return t5.T5(CONFIG, rngs=nnx.Rngs(0))


def fwd(model, enc, dec):
  # Eager on purpose: every test adapts a different set of modules, so jit
  # would compile each variant, while eager ops are compiled once per shape.
  return model(enc, dec)


@pytest.fixture(scope='module')
def base_logits():
  return fwd(_t5(), ENC, DEC)


def _randomize_b(model, seed=1):
  """Non-zero B so the adapters change the output."""
  params = lora.lora_params(model)
  keys = iter(jax.random.split(jax.random.key(seed), 1000))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: (0.3 * jax.random.normal(next(keys), x.shape, x.dtype)
                    if p[-1].key == 'lora_b' else x), params)
  lora.set_lora_params(model, params)


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert msg and '\n' not in msg, msg
  return msg


def test_targets_by_name_pattern_and_error():
  model = _t5()
  paths = list(lora.select(model, 'wi'))
  assert paths and all(p.endswith(('wi_0', 'wi_1')) for p in paths)
  assert list(lora.select(model, 'cross_attn.q')) == [
      'decoder.layers.0.cross_attn.q']
  assert set(lora.select(model, r'decoder\.layers\.0\.self_attn\..*')) == {
      f'decoder.layers.0.self_attn.{n}' for n in 'qkvo'}
  assert list(lora.select(model, 'encoder.*.o')) == [
      'encoder.layers.0.self_attn.o']  # A glob: not mlp.wo.
  assert len(lora.select(model, r'.*\.0\.(self|cross)_attn\.[qv]')) == 6
  # A regex matches a whole path tail, not inside one: '(o)' is the o
  # projections (with search, every path holding an 'o', 'encoder' too).
  assert set(lora.select(model, r'(o)')) == {
      'encoder.layers.0.self_attn.o', 'decoder.layers.0.self_attn.o',
      'decoder.layers.0.cross_attn.o'}
  with pytest.raises(ValueError, match='matches no projection'):
    lora.select(model, r'layers\.0')
  assert list(lora.select(model, 'lm_head')) == ['lm_head']
  # The model's defaults: q, k, v, o, wi, wo everywhere (not lm_head).
  assert len(lora.select(model)) == 7 + 11
  with pytest.raises(ValueError) as e:
    lora.apply_lora(model, ('q', 'gate'))
  assert "target 'gate' matches no projection" in _one_line(e)
  assert 'wi_0' in str(e.value)
  assert not lora.lora_modules(model)  # Nothing applied on error.
  with pytest.raises(ValueError, match='unknown init'):
    lora.apply_lora(model, 'q', init='olora')
  # Each had failed mid-way with a TypeError or AttributeError; alpha=True
  # had been read as 1.0.
  for kw, message in (
      (dict(targets=5), 'targets must be a string or a list of strings, got 5'),
      (dict(targets=['q', 5]), "list of strings, got ['q', 5]"),
      (dict(targets=b'q'), "list of strings, got b'q'"),
      (dict(rngs=None), 'rngs must be an nnx.Rngs or an int seed, got None'),
      (dict(rngs='x'), "int seed, got 'x'"),
      # An Rngs without a dropout stream had failed deep inside Flax.
      (dict(dropout=0.5, rngs=nnx.Rngs(params=0)), "apply_lora: dropout 0.5 "
       "needs a 'dropout' or 'default' stream in rngs, which has neither."),
      # Random factors without a params stream: likewise (Flax's "No
      # RngStream named 'params'"); PiSSA's exact SVD draws nothing.
      (dict(rngs=nnx.Rngs(dropout=0)), "apply_lora: init='standard' needs a "
       "'params' or 'default' stream in rngs, which has neither."),
      (dict(init='gaussian', rngs=nnx.Rngs(dropout=0)), "init='gaussian' "
       "needs a 'params'"),
      (dict(init='pissa', randomized_svd=True, rngs=nnx.Rngs(dropout=0)),
       "init='pissa' with randomized_svd needs a 'params' or 'default'"),
      (dict(alpha=True), 'alpha must be a finite number > 0, got True')):
    with pytest.raises(ValueError) as e:
      lora.apply_lora(model, **kw)
    assert message in _one_line(e)
  assert not lora.lora_modules(model)
  lora.apply_lora(model, 'q', rank=2, init='pissa', rngs=nnx.Rngs(dropout=0))
  lora.remove_lora(model)
  lora.apply_lora(model, 'q', rank=2, rngs=nnx.Rngs(default=0))
  lora.remove_lora(model)
  lora.apply_lora(model, 'q', rank=2, rngs=np.int64(3))  # numpy seeds work


def test_zero_b_leaves_output_unchanged_and_axes(base_logits):
  model = _t5()
  lora.apply_lora(model, rank=4, alpha=8.0)
  np.testing.assert_array_equal(fwd(model, ENC, DEC), base_logits)
  q = model.decoder.layers[0].cross_attn.q
  assert q.lora.lora_a.shape == (32, 4) and q.lora.lora_b.shape == (4, 4, 8)
  assert q.lora.scale == 2.0
  axes = lambda v: tuple(v.get_metadata()['out_sharding'])
  assert axes(q.lora.lora_a) == ('embed', None)
  assert axes(q.lora.lora_b) == (None, 'heads', 'head_dim')
  o = model.encoder.layers[0].self_attn.o
  assert axes(o.lora.lora_a) == ('heads', 'head_dim', None)
  assert axes(o.lora.lora_b) == (None, 'embed')
  with pytest.raises(ValueError, match='already has a LoRA adapter'):
    lora.apply_lora(model, 'q')
  rs = _t5()
  lora.apply_lora(rs, 'q', rank=4, alpha=8.0, rslora=True)
  assert rs.encoder.layers[0].self_attn.q.lora.scale == 4.0


def test_pairs_feed_lro_and_optimizer():
  model = _t5()
  lora.apply_lora(model, ('self_attn.q', 'o', 'wi'), rank=4)
  params = lora.lora_params(model)
  paired = lro.find_lora_pairs(params)
  assert len(paired.pairs) == len(lora.lora_modules(model)) == 2 + 3 + 4
  # n-D (einsum-shaped) factors are among them: q's lora_b is (r, N, H).
  names = {p.name for p in paired.pairs}
  assert 'encoder/layers/0/self_attn/q/lora' in names
  # lora_rite takes the tree as is (its init finds the pairs itself), and
  # the NNX State that nnx.Optimizer hands it with the filter.
  lro.lora_rite(1e-2).init(params)
  nnx.Optimizer(model, lro.lora_rite(1e-2), wrt=lora.LORA_FILTER)
  # nnx.Optimizer with the filter holds state for, and updates, adapters only.
  kernel_before = model.encoder.layers[0].self_attn.q.kernel[...]
  opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=lora.LORA_FILTER)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, lora.LORA_FILTER))
  opt.update(model, grads)
  np.testing.assert_array_equal(model.encoder.layers[0].self_attn.q.kernel[...],
                                kernel_before)
  np.testing.assert_allclose(model.encoder.layers[0].self_attn.q.lora.lora_b[...],
                             -0.5)
  # split / combine round trip.
  graphdef, lp, rest = lora.split_lora(model)
  again = lora.combine_lora(graphdef, lp, rest)
  np.testing.assert_array_equal(fwd(again, ENC, DEC), fwd(model, ENC, DEC))
  with pytest.raises(ValueError, match='has shape'):
    lora.set_lora_params(model, jax.tree.map(lambda x: x[..., :1], lp))
  # A tree lacking an adapter (it had been left as it was, silently), or
  # holding one the model does not have.
  short = jax.tree.map(lambda x: x, lp)
  del short['encoder']['layers'][0]['self_attn']['q']
  with pytest.raises(ValueError, match=r"^set_lora_params: LoRA parameter "
                     r"\['encoder'\]\['layers'\]\[0\]\['self_attn'\]\['q'\]"
                     r"\['lora'\]\['lora_a'\] is missing\.$"):
    lora.set_lora_params(model, short)
  extra = {**lp, 'head2': lp['decoder']}
  with pytest.raises(ValueError, match=r"\['head2'\]\['layers'\].* is not an "
                     r'adapter of the model\.$'):
    lora.set_lora_params(model, extra)


def test_a_pure_step_with_dropout_from_split_lora():
  """split_lora's rest had been a State: with any dropout, a model rebuilt
  inside jax.grad failed ('Cannot mutate RngCount from a different trace
  level'). With the step folded into its keys as the docstring says, the
  masks follow the step, LoRA's and T5's own ('default' stream) alike."""
  for t5_rate, lora_rate in ((0.1, 0.5), (0.3, 0.0)):
    model = t5.T5(t5.get_config('tiny', num_layers=1, num_decoder_layers=1,
                                dropout_rate=t5_rate), rngs=nnx.Rngs(0))
    lora.apply_lora(model, rank=2, dropout=lora_rate,
                    rngs=nnx.Rngs(params=0, dropout=1))
    _randomize_b(model)
    model.train()
    graphdef, lp, rest = lora.split_lora(model)

    def loss(lp, rest, step, graphdef=graphdef):
      m = lora.combine_lora(graphdef, lp, lora.fold_keys(rest, step))
      return jnp.mean(m(ENC, DEC) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    values = [float(step(lp, rest, i)[0]) for i in (0, 1, 0)]
    assert values[0] == values[2] != values[1], (t5_rate, lora_rate)
    grads = step(lp, rest, 2)[1]
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_unmerge_restores_the_base_after_a_step_taken_while_merged():
  """A merged adapter gets zero gradients, but weight decay and momentum
  still move its factors: unmerge_lora subtracts what merge_lora added, so
  the kernel comes back (it had subtracted the moved factors: off by 3e-3),
  and the adapter keeps its moved factors. Under nnx.jit too."""
  model = _t5()
  o = model.decoder.layers[0].cross_attn.o
  kernel = o.kernel[...]
  lora.apply_lora(model, rank=4, alpha=8.0)
  _randomize_b(model)
  opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.5),
                      wrt=lora.LORA_FILTER)
  nnx.jit(lora.merge_lora)(model)
  assert o.lora.merged
  b = o.lora.lora_b[...]
  grads = nnx.grad(lambda m: jnp.sum(fwd(m, ENC, DEC) ** 2),
                   argnums=nnx.DiffState(0, lora.LORA_FILTER))(model)
  assert not any(np.any(g) for g in jax.tree.leaves(grads))  # Skipped.
  opt.update(model, grads)
  assert not np.allclose(o.lora.lora_b[...], b)  # Decay moved it.
  nnx.jit(lora.unmerge_lora)(model)
  assert not o.lora.merged and not hasattr(o.lora, 'merged_a')
  np.testing.assert_allclose(o.kernel[...], kernel, atol=1e-6)
  unmerged = fwd(model, ENC, DEC)
  lora.merge_lora(model)  # The moved factors now.
  np.testing.assert_allclose(fwd(model, ENC, DEC), unmerged, atol=2e-5)


def test_a_second_merge_adds_nothing_and_the_merged_copies_are_their_own():
  """merge_lora twice folds each adapter in once; what unmerge_lora
  subtracts is a copy of the factors, not their buffers, which a train
  step donates (it had failed 'Array has been deleted'); a bfloat16 kernel
  stays bfloat16 (a float32 merge doubled its checkpoint)."""
  model = _t5()
  o = model.decoder.layers[0].cross_attn.o
  kernel = o.kernel[...]
  lora.apply_lora(model, rank=4, alpha=8.0)
  _randomize_b(model)
  out = fwd(model, ENC, DEC)
  lora.merge_lora(model)
  merged = o.kernel[...]
  lora.merge_lora(model)
  np.testing.assert_array_equal(o.kernel[...], merged)
  np.testing.assert_allclose(fwd(model, ENC, DEC), out, atol=2e-5)
  step = jax.jit(lambda f: f + 1.0, donate_argnums=0)
  for factor in (o.lora.lora_a, o.lora.lora_b):
    factor.set_value(step(factor[...]))
  lora.unmerge_lora(model)
  np.testing.assert_allclose(o.kernel[...], kernel, atol=1e-6)
  # bfloat16: kept through merge and unmerge.
  model = t5.T5(CONFIG, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  o = model.decoder.layers[0].cross_attn.o
  lora.apply_lora(model, 'o', rank=4, alpha=8.0)
  _randomize_b(model)
  lora.merge_lora(model)
  assert o.kernel[...].dtype == jnp.bfloat16
  lora.unmerge_lora(model)
  assert o.kernel[...].dtype == jnp.bfloat16


def test_merge_equals_unmerged():
  model = _t5()
  lora.apply_lora(model, rank=4, alpha=8.0)
  _randomize_b(model)
  kernel = model.decoder.layers[0].cross_attn.o.kernel[...]
  out = fwd(model, ENC, DEC)
  lora.merge_lora(model)
  assert model.decoder.layers[0].cross_attn.o.lora.merged
  np.testing.assert_allclose(fwd(model, ENC, DEC), out, atol=2e-5)
  lora.unmerge_lora(model)
  np.testing.assert_allclose(fwd(model, ENC, DEC), out, atol=2e-5)
  np.testing.assert_allclose(model.decoder.layers[0].cross_attn.o.kernel[...],
                             kernel, atol=1e-6)
  # New factors on a merged model would be skipped by the forward: refused.
  lora.merge_lora(model)
  params = jax.tree.map(lambda x: 3 * x, lora.lora_params(model))
  with pytest.raises(ValueError, match='merged adapter .*call unmerge_lora'):
    lora.set_lora_params(model, params)
  lora.unmerge_lora(model)
  np.testing.assert_allclose(model.decoder.layers[0].cross_attn.o.kernel[...],
                             kernel, atol=1e-6)


def test_every_init_runs(base_logits):
  for init in ('gaussian', 'pissa'):
    model = _t5()
    w0 = {p: np.asarray(proj.kernel[...])
          for p, proj in lora.select(model, ('q', 'wo')).items()}
    lora.apply_lora(model, ('q', 'wo'), rank=4, init=init)
    # B = 0 (gaussian) or W_res + s A B = W0 (PiSSA): the output is kept.
    np.testing.assert_allclose(fwd(model, ENC, DEC), base_logits, atol=1e-4)
    assert float(jnp.abs(model.encoder.layers[0].self_attn.q.lora.lora_a[...]).max()) > 0
    if init == 'pissa':
      # Each pair is PiSSA of its own kernel (the top-4 singular directions,
      # the residual in the kernel): a random A with B = 0 keeps the output
      # too, and had passed the checks above.
      for p, proj in lora.select(model, ('q', 'wo')).items():
        n_in, n_out = math.prod(proj.in_shape), math.prod(proj.out_shape)
        a, b, w_res = lro_init.pissa(w0[p].reshape(n_in, n_out), 4,
                                     proj.lora.scale)
        for got, want in ((proj.lora.lora_a[...].reshape(n_in, 4), a),
                          (proj.lora.lora_b[...].reshape(4, n_out), b),
                          (proj.kernel[...].reshape(n_in, n_out), w_res)):
          np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                     err_msg=p)
  model = _t5()
  # A loss linear in the batch's weight w: the mean over w = 1, 3 (the
  # third batch is past num_batches) equals the gradient at w = 2.
  loss = lambda m, w: w * jnp.mean(m(ENC, DEC) ** 2)
  pulled = []
  batches = (pulled.append(w) or jnp.float32(w) for w in (1.0, 3.0, 100.0))
  grads = lora.estimate_full_gradients(model, loss, batches, targets='wi',
                                       num_batches=2)
  assert pulled == [1.0, 3.0]
  assert set(grads) == set(lora.select(model, 'wi'))
  assert grads['encoder.layers.0.mlp.wi_0'].shape == (32, 48)
  at_two = lora.estimate_full_gradients(model, loss, [jnp.float32(2.0)], 'wi')
  for name, g in grads.items():
    np.testing.assert_allclose(g, at_two[name], rtol=1e-5, atol=1e-7)
  w0 = {p: np.asarray(proj.kernel[...])
        for p, proj in lora.select(model, 'wi').items()}
  lora.apply_lora(model, 'wi', rank=4, init='lora_ga', init_grads=grads,
                  lora_ga_gamma=4.0)
  np.testing.assert_allclose(fwd(model, ENC, DEC), base_logits, atol=1e-4)
  b = model.encoder.layers[0].mlp.wi_1.lora.lora_b[...]
  assert float(jnp.abs(b).max()) > 0
  # Each pair is LoRA-GA of its own gradient, in the kernel's (in, out)
  # layout, with the gamma asked for (a transposed gradient or the default
  # gamma had passed every check above).
  for p, proj in lora.select(model, 'wi').items():
    n_in, n_out = math.prod(proj.in_shape), math.prod(proj.out_shape)
    a, b, _ = lro_init.lora_ga(jnp.asarray(grads[p]).reshape(n_in, n_out),
                               w0[p].reshape(n_in, n_out), 4, proj.lora.scale,
                               gamma=4.0)
    np.testing.assert_allclose(proj.lora.lora_a[...].reshape(n_in, 4), a,
                               rtol=1e-5, atol=1e-6, err_msg=p)
    np.testing.assert_allclose(proj.lora.lora_b[...].reshape(4, n_out), b,
                               rtol=1e-5, atol=1e-6, err_msg=p)
  with pytest.raises(ValueError, match='needs init_grads'):
    lora.apply_lora(_t5(), 'wo', init='lora_ga', init_grads={})
  # The options reach the init (only their refusal elsewhere had been
  # tested): LoRA-GA's use_sign, the gaussian init's std.
  signed = _t5()
  lora.apply_lora(signed, 'wi', rank=4, init='lora_ga', init_grads=grads,
                  lora_ga_gamma=4.0, lora_ga_use_sign=True)
  for p, proj in lora.select(signed, 'wi').items():
    n_in, n_out = math.prod(proj.in_shape), math.prod(proj.out_shape)
    _, b, _ = lro_init.lora_ga(jnp.asarray(grads[p]).reshape(n_in, n_out),
                               w0[p].reshape(n_in, n_out), 4, proj.lora.scale,
                               gamma=4.0, use_sign=True)
    np.testing.assert_allclose(proj.lora.lora_b[...].reshape(4, n_out), b,
                               rtol=1e-5, atol=1e-6, err_msg=p)
  narrow = _t5()
  lora.apply_lora(narrow, 'wi', rank=4, init='gaussian', gaussian_std=1e-3)
  a = narrow.encoder.layers[0].mlp.wi_0.lora.lora_a[...]
  assert 0.7e-3 < float(jnp.std(a)) < 1.3e-3


def test_bad_init_inputs_are_refused_before_any_change():
  """A LoRA-GA gradient in another layout (a PyTorch (out, in) one, the
  same size) had been reshaped into a meaningless init, and a NaN in the
  gradient or the kernel had made the whole frozen kernel NaN, silently."""
  path = 'encoder.layers.0.mlp.wo'
  grad = np.ones((48, 32), np.float32)  # wo is (48 in, 32 out)
  cases = [
      (dict(init='lora_ga', init_grads={path: grad.T}),
       'has shape (32, 48), expected the kernel\'s (48, 32)'),
      (dict(init='lora_ga', init_grads={path: np.where(
          np.eye(48, 32) > 0, np.nan, grad)}), 'has non-finite values'),
      (dict(alpha=0.0), 'alpha must be a finite number > 0, got 0.0'),
      (dict(alpha=float('inf')), 'alpha must be a finite number > 0'),
      # Another init's options: gaussian_std had silently given Kaiming.
      (dict(gaussian_std=0.02),
       "gaussian_std is for init 'gaussian', not 'standard'."),
      (dict(init='pissa', lora_ga_gamma=8.0),
       "lora_ga_gamma is for init 'lora_ga', not 'pissa'."),
      # LoRA-GA's default gamma, given for another init, is refused too.
      (dict(init='pissa', lora_ga_gamma=16.0),
       "lora_ga_gamma is for init 'lora_ga', not 'pissa'."),
      (dict(lora_ga_use_sign=True),
       "lora_ga_use_sign is for init 'lora_ga', not 'standard'."),
      (dict(init_grads={path: grad}),
       "init_grads is for init 'lora_ga', not 'standard'."),
      (dict(init='gaussian', randomized_svd=True),
       "randomized_svd is for init 'pissa' or 'lora_ga', not 'gaussian'."),
  ]
  for kwargs, expected in cases:
    model = _t5()
    with pytest.raises(ValueError) as e:
      lora.apply_lora(model, path, rank=2, **kwargs)
    assert expected in _one_line(e), (kwargs, str(e.value))
    assert not lora.lora_modules(model)
  model = _t5()
  wo = model.encoder.layers[0].mlp.wo
  wo.kernel.set_value(wo.kernel.get_value().at[0, 0].set(jnp.inf))
  with pytest.raises(ValueError) as e:
    lora.apply_lora(model, path, rank=2, init='pissa')
  assert f'the kernel of {path!r} has non-finite values' in _one_line(e)
  assert not lora.lora_modules(model)


def test_initial_factors_rebuild_the_same_adapters_and_base():
  """apply_lora(initial_factors=) from a PiSSA / LoRA-GA model's (A0, B0):
  the same factors and, bit for bit, the same base kernels, with no
  gradient and no SVD."""
  model = _t5()
  grads = lora.estimate_full_gradients(
      model, lambda m, _: jnp.mean(m(ENC, DEC) ** 2), [0], 'wi')
  for init, kw in (('pissa', {}), ('lora_ga', {'init_grads': grads})):
    first = lora.apply_lora(_t5(), 'wi', rank=4, init=init, **kw)
    factors = lora.initial_factors(first)
    assert set(factors) == set(lora.select(first, 'wi'))
    again = lora.apply_lora(_t5(), 'wi', rank=4, init=init,
                            initial_factors=factors)
    assert lora.initial_factors(again).keys() == factors.keys()
    for path, proj in lora.select(first, 'wi').items():
      other = lora.select(again, 'wi')[path]
      np.testing.assert_array_equal(other.kernel[...], proj.kernel[...])
      np.testing.assert_array_equal(other.lora.lora_a[...],
                                    proj.lora.lora_a[...])
      np.testing.assert_array_equal(other.lora.lora_b[...],
                                    proj.lora.lora_b[...])
  # The given factors are used as given (not redrawn by an SVD): perturbed
  # ones give exactly their own residual base.
  bent = {p: (a * 1.5, b - 0.1) for p, (a, b) in factors.items()}
  model = _t5()
  w0 = {p: x.kernel[...] for p, x in lora.select(model, 'wi').items()}
  lora.apply_lora(model, 'wi', rank=4, init='pissa', initial_factors=bent)
  for path, proj in lora.select(model, 'wi').items():
    in_dim, out_dim = bent[path][0].shape[0], bent[path][1].shape[1]
    want = lro.init.residual(w0[path].reshape(in_dim, out_dim), *bent[path],
                             proj.lora.scale)
    np.testing.assert_array_equal(
        proj.kernel[...], want.reshape(proj.kernel[...].shape))
  assert lora.initial_factors(lora.apply_lora(_t5(), 'wi', rank=4)) == {}
  with pytest.raises(ValueError, match='not .standard'):
    lora.apply_lora(_t5(), 'wi', rank=4, initial_factors=factors)
  with pytest.raises(ValueError, match='has no'):
    lora.apply_lora(_t5(), ('wi', 'wo'), rank=4, init='pissa',
                    initial_factors=factors)
  with pytest.raises(ValueError, match='rank 2 needs'):
    lora.apply_lora(_t5(), 'wi', rank=2, init='pissa', initial_factors=factors)
  # LoRA-GA takes B from directions r+1..2r: checked before any kernel moves.
  model = _t5()
  before = {p: np.asarray(x.kernel[...]) for p, x in
            lora.select(model, 'wi').items()}
  with pytest.raises(ValueError, match='2 \\* rank <= 32'):
    lora.apply_lora(model, 'wi', rank=17, init='lora_ga', init_grads=grads)
  for p, x in lora.select(model, 'wi').items():
    assert x.lora is None
    np.testing.assert_array_equal(x.kernel[...], before[p])


def test_peft_round_trip_t5(tmp_path):
  model = _t5()
  lora.apply_lora(model, rank=4, alpha=8.0)
  lora.apply_lora(model, 'lm_head', rank=2, alpha=3.0, rslora=True)
  _randomize_b(model)
  out = fwd(model, ENC, DEC)
  lora.save_peft_adapter(model, tmp_path, 'google/mt5-small')
  tensors = load_file(str(tmp_path / 'adapter_model.safetensors'))
  a = tensors['base_model.model.decoder.block.0.layer.1.EncDecAttention.q.lora_A.weight']
  b = tensors['base_model.model.decoder.block.0.layer.1.EncDecAttention.q.lora_B.weight']
  assert a.shape == (4, 32) and b.shape == (32, 4)  # (r, in), (N*H, r)
  assert 'base_model.model.decoder.block.0.layer.2.DenseReluDense.wi_1.lora_A.weight' in tensors
  assert 'base_model.model.encoder.block.0.layer.1.DenseReluDense.wo.lora_B.weight' in tensors
  q = model.decoder.layers[0].cross_attn.q.lora
  np.testing.assert_array_equal(b, np.asarray(q.lora_b[...]).reshape(4, 32).T)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert cfg['peft_type'] == 'LORA' and cfg['task_type'] == 'SEQ_2_SEQ_LM'
  assert (cfg['r'], cfg['lora_alpha']) == (4, 8.0)
  assert cfg['base_model_name_or_path'] == 'google/mt5-small'
  assert cfg['target_modules'] == ['k', 'lm_head', 'o', 'q', 'v', 'wi_0', 'wi_1', 'wo']
  # The rsLoRA head keeps its scale under the adapter-wide use_rslora=False.
  assert cfg['rank_pattern'] == {'lm_head': 2}
  assert math.isclose(cfg['alpha_pattern']['lm_head'] / 2, 3.0 / math.sqrt(2))

  fresh = _t5()
  lora.load_peft_adapter(fresh, tmp_path)
  for x, y in zip(jax.tree.leaves(lora.lora_params(model)),
                  jax.tree.leaves(lora.lora_params(fresh))):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_allclose(fwd(fresh, ENC, DEC), out, atol=1e-5)


def test_peft_partial_targets_and_pissa_export(tmp_path, base_logits):
  model = _t5()
  lora.apply_lora(model, r'encoder\.layers\.0\.self_attn\.(q|v)', rank=2,
                  init='pissa')
  _randomize_b(model)
  out = fwd(model, ENC, DEC)
  lora.save_peft_adapter(model, tmp_path, 'base')
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  # Only some q/v modules: an exact regex instead of a list of names.
  assert cfg['target_modules'] == (
      r'(encoder\.block\.0\.layer\.0\.SelfAttention\.q|'
      r'encoder\.block\.0\.layer\.0\.SelfAttention\.v)')
  # PiSSA exports as rank 2r against the original weights, same scale.
  assert cfg['r'] == 4 and cfg['lora_alpha'] == 32.0  # 16/2 == 32/4
  original = _t5()
  lora.load_peft_adapter(original, tmp_path)
  np.testing.assert_allclose(fwd(original, ENC, DEC), out, atol=1e-4)
  assert not np.allclose(out, base_logits, atol=1e-3)


def _save_adapter(tmp_path):
  model = _t5()
  lora.apply_lora(model, ('q', 'wo'), rank=4)
  return lora.save_peft_adapter(model, tmp_path / 'ok', 'base')


def test_peft_bad_inputs(tmp_path):
  src = _save_adapter(tmp_path)
  tensors = load_file(str(src / 'adapter_model.safetensors'))
  cfg = json.loads((src / 'adapter_config.json').read_text())

  def write(name, tensors=tensors, cfg=cfg):
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, str(d / 'adapter_model.safetensors'))
    (d / 'adapter_config.json').write_text(json.dumps(cfg))
    return d

  key = 'base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight'
  cases = [
      (write('shape', dict(tensors, **{key: tensors[key][:, :-1]})),
       'has shape (4, 31), expected (r, 32)'),
      (write('missing', {k: v for k, v in tensors.items() if k != key}),
       "missing base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A"),
      (write('unknown', dict(tensors, **{
          key.replace('block.0', 'block.9'): tensors[key]})),
       "module 'encoder.block.9.layer.0.SelfAttention.q' is not a projection"),
      (write('rank', cfg=dict(cfg, r=8)), 'has rank 4 but adapter_config.json says 8'),
      (write('type', cfg=dict(cfg, peft_type='IA3')), 'expected "LORA"'),
      (write('dora', cfg=dict(cfg, use_dora=True)), 'use_dora=True is not supported'),
      # Plain lora_A / lora_B names, another forward pass: activated LoRA
      # acts only after its invocation tokens, and had loaded as LoRA.
      (write('alora', cfg=dict(cfg, alora_invocation_tokens=[5, 9])),
       'alora_invocation_tokens=[5, 9] is not supported'),
      (write('qalora', cfg=dict(cfg, use_qalora=True)),
       'use_qalora=True is not supported'),
      # PEFT re-runs these inits on load and makes the base their residual:
      # the factors had been attached to the unchanged base.
      (write('pissa', cfg=dict(cfg, init_lora_weights='pissa_niter_4')),
       "init_lora_weights='pissa_niter_4' is not supported: PEFT rebuilds "
       'the base weights'),
      (write('loftq', cfg=dict(cfg, init_lora_weights='loftq')),
       "init_lora_weights='loftq' is not supported: PEFT rebuilds"),
      (write('unknown_init', cfg=dict(cfg, init_lora_weights='newer')),
       "init_lora_weights='newer' is not supported: an init this loader "
       'does not know'),
      (write('int_init', cfg=dict(cfg, init_lora_weights=1)),
       'init_lora_weights=1 is not supported'),  # PEFT fails on it too.
      # The config targets every q, the file lacks one: it had loaded the
      # rest with no error.
      (write('partial', {k: v for k, v in tensors.items()
                         if 'encoder.block.0.layer.0.SelfAttention.q.' not in k}),
       "has no lora_A/lora_B for 'encoder.block.0.layer.0.SelfAttention.q', "
       'which adapter_config.json targets'),
      # Config values are checked before any adapter is attached: a bad
      # alpha_pattern value had raised a bare TypeError with some
      # projections already changed, and 'false' had read as true.
      (write('alpha_pattern', cfg=dict(cfg, alpha_pattern={'wo': None})),
       "alpha_pattern['wo'] must be a finite non-zero number, got None"),
      (write('rank_pattern', cfg=dict(cfg, rank_pattern={'q': '4'})),
       "rank_pattern['q'] must be an int >= 1, got '4'"),
      (write('regex', cfg=dict(cfg, rank_pattern={'q(': 4})),
       "rank_pattern key 'q(' is not a regular expression"),
      (write('pattern_list', cfg=dict(cfg, rank_pattern=['q'])),
       'rank_pattern must be an object of module pattern -> value, got list'),
      # A string where PEFT writes a list had been a TypeError mid-match.
      (write('layers_str', cfg=dict(cfg, layers_to_transform='1')),
       "layers_to_transform must be null, an integer or a list of integers, "
       "got '1'"),
      (write('targets_int', cfg=dict(cfg, target_modules=5)),
       'target_modules must be null, a string or a list of strings, got 5'),
      (write('rslora', cfg=dict(cfg, use_rslora='false')),
       "use_rslora must be true or false, got 'false'"),
      (write('dropout', cfg=dict(cfg, lora_dropout=1.5)),
       'lora_dropout must be a number in [0, 1), got 1.5'),
      (write('alpha', cfg=dict(cfg, lora_alpha=0)),
       'lora_alpha must be finite and non-zero, got 0'),
      # true had loaded as rank 1 (rank_pattern's true was refused).
      (write('r_bool', cfg=dict(cfg, r=True)),
       'needs an int r >= 1 and a numeric lora_alpha, got r=True'),
      (write('int_factor', dict(tensors, **{key: tensors[key].astype(
          np.int32)})), f"'{key}' has dtype int32; LoRA factors are floating"),
      (write('nan', dict(tensors, **{key: np.full_like(tensors[key], np.nan)})),
       f'{key} has non-finite values'),
  ]
  for directory, expected in cases:
    model = _t5()
    with pytest.raises(ValueError) as e:
      lora.load_peft_adapter(model, directory)
    assert expected in _one_line(e), (directory, str(e.value))
    assert not lora.lora_modules(model)  # Checked before anything changes.
  for init in ('Gaussian', 'eva', 'orthogonal', 'mica', False, None):  # Kept.
    model = _t5()
    lora.load_peft_adapter(model, write(f'init_{init}', cfg=dict(
        cfg, init_lora_weights=init)))
    assert lora.lora_modules(model)
  with pytest.raises(FileNotFoundError) as e:
    lora.load_peft_adapter(_t5(), tmp_path / 'nothing')
  assert 'adapter_config.json' in _one_line(e)
  model = _t5()
  lora.apply_lora(model, 'q', rank=2)
  for bad in ('..', '../x', 'a/b', ''):
    with pytest.raises(ValueError) as e:
      lora.save_peft_adapter(model, tmp_path / 'out', 'base', adapter_name=bad)
    assert 'plain file-name' in _one_line(e)
  assert not (tmp_path / 'x').exists()
  lora.save_peft_adapter(model, tmp_path / 'out', 'base', adapter_name='mine')
  assert (tmp_path / 'out' / 'mine' / 'adapter_model.safetensors').is_file()


def test_gemma_names_and_round_trip(tmp_path):
  from models import gemma  # pylint: disable=g-import-not-at-top
  config = gemma.get_config('gemma-tiny')
  # Export and import need only the projections' shapes and the adapters:
  # an abstract base (no weights) skips building a real Gemma.
  abstract = lambda: nnx.eval_shape(lambda: gemma.Gemma(config, rngs=nnx.Rngs(0)))
  model = abstract()
  lora.apply_lora(model, rank=2, alpha=4.0)  # q, k, v, o, gate, up, down
  _randomize_b(model)
  assert lora.gemma_hf_name('layers.3.attn.q') == 'model.layers.3.self_attn.q_proj'
  assert lora.gemma_hf_name('layers.0.mlp.down') == 'model.layers.0.mlp.down_proj'
  lora.save_peft_adapter(model, tmp_path, 'google/gemma-2b')
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert cfg['task_type'] == 'CAUSAL_LM'
  assert cfg['target_modules'] == ['down_proj', 'gate_proj', 'k_proj', 'o_proj',
                                   'q_proj', 'up_proj', 'v_proj']
  c = model.config
  tensors = load_file(str(tmp_path / 'adapter_model.safetensors'))
  assert tensors['base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'].shape == (
      c.num_heads * c.head_dim, 2)
  assert tensors['base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight'].shape == (
      2, c.num_heads * c.head_dim)
  fresh = abstract()
  lora.load_peft_adapter(fresh, tmp_path)
  for x, y in zip(jax.tree.leaves(lora.lora_params(model)),
                  jax.tree.leaves(lora.lora_params(fresh))):
    np.testing.assert_array_equal(x, y)


class _Fused(nnx.Module):
  """A fake model with one fused qkv projection, to test PEFT splitting."""

  def __init__(self):
    self.layers = nnx.List([nnx.Dict(qkv=Projection(
        (6,), (3, 4), axes=('embed', 'qkv', 'mlp'), rngs=nnx.Rngs(0)))])


def test_fused_projection_splits_for_peft(tmp_path):
  def name_map(path):
    i = path.split('.')[1]
    return [(f'model.layers.{i}.self_attn.{n}_proj', 4 * j, 4 * j + 4)
            for j, n in enumerate('qkv')]

  model = _Fused()
  lora.apply_lora(model, 'qkv', rank=2)
  _randomize_b(model)
  lora.save_peft_adapter(model, tmp_path, 'base', name_map=name_map,
                         task_type='CAUSAL_LM')
  tensors = load_file(str(tmp_path / 'adapter_model.safetensors'))
  assert tensors['base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight'].shape == (4, 2)
  fresh = _Fused()
  lora.load_peft_adapter(fresh, tmp_path, name_map=name_map)
  np.testing.assert_array_equal(fresh.layers[0]['qkv'].lora.lora_b[...],
                                model.layers[0]['qkv'].lora.lora_b[...])
  # Each part's own alpha and rank from the patterns: the first part's had
  # been used for all (an alpha_pattern for k_proj, which PEFT scales 4x,
  # loaded at the scale of q and v). One adapter has one scale: refused.
  cfg_path = tmp_path / 'adapter_config.json'
  cfg = json.loads(cfg_path.read_text())
  for key, pattern, match in (
      ('alpha_pattern', 8.0, r"fused parts of 'layers.0.qkv' have different "
       r'lora_alpha in adapter_config.json \(model.layers.0.self_attn.q_proj: '
       r'16, model.layers.0.self_attn.k_proj: 8, '
       r'model.layers.0.self_attn.v_proj: 16\)'),
      ('rank_pattern', 4, r'model.layers.0.self_attn.k_proj has rank 2 but '
       r'adapter_config.json says 4')):
    cfg_path.write_text(json.dumps(
        {**cfg, key: {'model.layers.0.self_attn.k_proj': pattern}}))
    with pytest.raises(ValueError, match=match):
      lora.load_peft_adapter(_Fused(), tmp_path, name_map=name_map)


class _Blocks(nnx.Module):
  """A model of no family the defaults know ('blocks.0.q')."""

  def __init__(self):
    self.blocks = nnx.List([nnx.Dict(q=Projection(
        (6,), (4,), axes=('embed', 'mlp'), rngs=nnx.Rngs(0)))])


def test_a_name_map_serves_a_model_of_another_family(tmp_path):
  """The family was guessed (and failed) even with a name_map given."""
  name_map = lambda path: f'model.h.{path.split(".")[1]}.attn.q_proj'
  model = _Blocks()
  lora.apply_lora(model, 'q', rank=2)
  _randomize_b(model)
  with pytest.raises(ValueError) as e:
    lora.save_peft_adapter(model, tmp_path / 'no_task', 'base',
                           name_map=name_map)
  assert _one_line(e).endswith('pass task_type.')
  assert not (tmp_path / 'no_task').exists()
  lora.save_peft_adapter(model, tmp_path, 'base', name_map=name_map,
                         task_type='CAUSAL_LM')
  fresh = _Blocks()
  lora.load_peft_adapter(fresh, tmp_path, name_map=name_map)
  np.testing.assert_array_equal(fresh.blocks[0]['q'].lora.lora_b[...],
                                model.blocks[0]['q'].lora.lora_b[...])
  with pytest.raises(ValueError) as e:
    lora.load_peft_adapter(_Blocks(), tmp_path)
  assert _one_line(e).endswith('pass name_map.')


SHARDED = textwrap.dedent('''
    import os
    os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from flax import nnx
    from models import lora, t5
    assert len(jax.devices()) == 8
    config = t5.get_config('tiny', num_layers=1, num_decoder_layers=1)

    @nnx.jit  # One compile instead of one per eager op: a faster start.
    def make():
      model = t5.T5(config, rngs=nnx.Rngs(0))
      lora.apply_lora(model, rank=4)
      lora.set_lora_params(model, jax.tree.map(lambda x: x + 0.1,
                                               lora.lora_params(model)))
      return model

    model = make()
    enc = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    dec = jnp.array([[0, 3, 4, 5], [0, 7, 8, 9]])
    fwd = nnx.jit(lambda m, e, d: m(e, d))
    ref = np.asarray(fwd(model, enc, dec))
    mesh = jax.make_mesh((2, 4), ('data', 'model'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (('vocab', 'model'), ('heads', 'model'), ('mlp', 'model'),
             ('embed', None), ('head_dim', None), ('norm', None),
             ('relpos_buckets', None))
    state = nnx.state(model)
    shardings = nn.logical_to_mesh_sharding(nnx.get_partition_spec(state),
                                            mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    q = model.encoder.layers[0].self_attn.q
    assert q.kernel[...].sharding.spec == jax.P(None, 'model', None), q.kernel[...].sharding
    assert q.lora.lora_b[...].sharding.spec == jax.P(None, 'model', None)
    batch = jax.sharding.NamedSharding(mesh, jax.P('data'))
    out = fwd(model, jax.device_put(enc, batch), jax.device_put(dec, batch))
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)
    # PiSSA on a sharded base rewrites the kernel: it had come back on
    # another sharding (the SVD's), so a step jitted with the old resharded.
    base = t5.T5(config, rngs=nnx.Rngs(0))
    state = nnx.state(base)
    nnx.update(base, jax.device_put(state, nn.logical_to_mesh_sharding(
        nnx.get_partition_spec(state), mesh, rules)))
    lora.apply_lora(base, ['q'], rank=2, init='pissa')
    q = base.encoder.layers[0].self_attn.q
    assert q.kernel[...].sharding.spec == jax.P(None, 'model', None), q.kernel[...].sharding
    print('SHARDED_OK')
''')


def test_sharded_forward_equals_unsharded():
  env = xla_flags.script_env()
  result = subprocess.run([sys.executable, '-c', SHARDED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert 'SHARDED_OK' in result.stdout, result.stderr[-3000:]


def test_a_new_adapters_dropout_follows_the_models_mode(tmp_path):
  """apply_lora on a model in eval mode: its adapters' dropout had been on
  (two eval calls gave other outputs) until model.eval() again."""
  model = t5.T5(t5.get_config('tiny', dropout_rate=0.1), rngs=nnx.Rngs(0))
  model.eval()
  lora.apply_lora(model, ['q', 'v'], rank=2, dropout=0.5, rngs=nnx.Rngs(3))
  _randomize_b(model)
  np.testing.assert_array_equal(fwd(model, ENC, DEC), fwd(model, ENC, DEC))
  model.train()  # the control: it acts in training
  assert not np.array_equal(model(ENC, DEC), model(ENC, DEC))
  # load_peft_adapter checks rngs as apply_lora does, before any change
  # (None had failed at the first training step, a JAX key inside Flax).
  lora.save_peft_adapter(model, tmp_path, 'tiny')
  fresh = t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0))
  for rngs, message in ((None, 'rngs must be an nnx.Rngs or an int seed, '
                         'got None'),
                        (nnx.Rngs(params=0), "dropout 0.5 needs a 'dropout' "
                         "or 'default' stream")):
    with pytest.raises(ValueError, match=f'^load_peft_adapter: {message}'):
      lora.load_peft_adapter(fresh, tmp_path, rngs=rngs)
  assert not lora.lora_modules(fresh)


def test_adapter_dropout_is_off_for_inference(tmp_path):
  """LoRA dropout acts in training only: a loaded PEFT adapter (its config
  says lora_dropout 0.05) starts in inference, and generation runs without
  dropout whatever mode the model is in, leaving that mode as it was."""
  from models import gemma  # pylint: disable=g-import-not-at-top
  config = gemma.get_config('gemma-tiny')
  tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
  model = gemma.Gemma(config, rngs=nnx.Rngs(0))
  lora.apply_lora(model, ['q', 'v'], rank=4, alpha=8.0)
  _randomize_b(model)
  want = model(tokens)
  lora.save_peft_adapter(model, tmp_path, 'tiny')
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  (tmp_path / 'adapter_config.json').write_text(
      json.dumps({**cfg, 'lora_dropout': 0.05}))
  loaded = lora.load_peft_adapter(gemma.Gemma(config, rngs=nnx.Rngs(0)),
                                  tmp_path)
  np.testing.assert_allclose(loaded(tokens), want, atol=1e-5)
  loaded.train()  # training the adapter further: its dropout acts
  assert not np.allclose(loaded(tokens), want, atol=1e-3)

  # A model built for training (dropout 0.5, in train mode) generates
  # deterministically, and stays in train mode.
  trained = gemma.Gemma(config, rngs=nnx.Rngs(0))
  lora.apply_lora(trained, ['q', 'v'], rank=4, alpha=8.0, dropout=0.5,
                  rngs=nnx.Rngs(3))
  lora.set_lora_params(trained, lora.lora_params(model))
  sampler = gemma.Sampler(trained, pad_multiple=8)
  runs = [sampler([[5, 6, 7, 8, 9, 10]], 3, stop_at_eos=False,
                  return_logits=True) for _ in range(2)]
  np.testing.assert_array_equal(runs[0].logits, runs[1].logits)
  np.testing.assert_allclose(runs[0].logits[0][0], want[0, -1], atol=1e-4)
  assert not np.allclose(trained(tokens), want, atol=1e-3)  # still training

  t5_model = _t5()
  lora.apply_lora(t5_model, ['q', 'v'], rank=2, alpha=4.0, dropout=0.5,
                  rngs=nnx.Rngs(3))
  _randomize_b(t5_model)
  runs = [t5.greedy_generate(t5_model, ENC, 3, return_logits=True)
          for _ in range(2)]
  np.testing.assert_array_equal(runs[0][1], runs[1][1])
  t5_model.eval()
  np.testing.assert_allclose(runs[0][1][:, 0], t5_model(ENC, DEC[:, :1])[:, 0],
                             atol=1e-5)


@pytest.mark.parametrize('cfg, name, picked', [
    ({'target_modules': ['q_proj']}, 'model.layers.3.self_attn.q_proj', True),
    ({'target_modules': ['q_proj']}, 'model.layers.3.self_attn.xq_proj', False),
    ({'target_modules': 'model\\.layers\\.0\\..*q_proj'},
     'model.layers.0.self_attn.q_proj', True),
    ({'target_modules': 'model\\.layers\\.0\\..*q_proj'},
     'model.layers.10.self_attn.q_proj', False),
    ({'target_modules': ['q_proj'], 'layers_to_transform': [0, 2]},
     'model.layers.2.self_attn.q_proj', True),
    ({'target_modules': ['q_proj'], 'layers_to_transform': 1},
     'model.layers.2.self_attn.q_proj', False),
    ({'target_modules': ['q_proj'], 'layers_to_transform': [2],
      'layers_pattern': 'blocks'}, 'model.layers.2.self_attn.q_proj', False),
    ({'target_modules': 'all-linear', 'exclude_modules': ['v_proj']},
     'model.layers.2.self_attn.v_proj', False),
    # A string exclude_modules is a regex over the whole name (fullmatch).
    ({'target_modules': 'all-linear', 'exclude_modules': 'v_proj'},
     'model.layers.2.self_attn.v_proj', True),
    ({'target_modules': 'all-linear', 'exclude_modules': r'.*\.v_proj'},
     'model.layers.2.self_attn.v_proj', False),
    ({'target_modules': 'all-linear'}, 'model.layers.2.mlp.up_proj', True),
    # PEFT's all-linear leaves out the output layer.
    ({'target_modules': 'ALL-LINEAR'}, 'lm_head', False),
    ({'target_modules': None}, 'model.layers.2.mlp.up_proj', None),
    # The first numbered part is the layer, as PEFT reads it: block 0 here,
    # not sub-layer 1 (the last one, which had been read).
    ({'target_modules': ['q'], 'layers_to_transform': [1]},
     'decoder.block.0.layer.1.EncDecAttention.q', False),
    ({'target_modules': ['q'], 'layers_to_transform': [1]},
     'decoder.block.1.layer.0.SelfAttention.q', True),
    ({'target_modules': ['q'], 'layers_to_transform': [0],
      'layers_pattern': 'block'}, 'encoder.block.0.layer.0.SelfAttention.q',
     True),
    # A pattern may start the name (PEFT 0.21's '(?:^|.*?\.)'; older PEFT
    # wanted a '.' before it, and read the last layer number, not the first).
    ({'target_modules': ['q'], 'layers_to_transform': 3,
      'layers_pattern': ['h']}, 'h.3.attn.q', True),
])
def test_peft_target_rule(cfg, name, picked):
  """PEFT's check_target_module_exists, which decides what a file must
  hold."""
  assert lora._peft_selects(cfg, name) is picked  # pylint: disable=protected-access


def test_a_numpy_alpha_keeps_a_bfloat16_model_in_bfloat16():
  """A numpy (or JAX) scalar alpha or rank is strongly typed: the scale had
  made every adapted output float32 (and been a state leaf)."""
  model = t5.T5(t5.get_config('tiny'), dtype=jnp.bfloat16,
                param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  lora.apply_lora(model, 'q', rank=np.int64(2), alpha=np.float32(4.0))
  q = model.encoder.layers[0].self_attn.q
  assert type(q.lora.scale) is float and q.lora.scale == 2.0  # pylint: disable=unidiomatic-typecheck
  out = q(jnp.ones((1, 3, q.in_shape[0]), jnp.bfloat16))
  assert out.dtype == jnp.bfloat16


def test_a_second_apply_lora_draws_other_factors_and_masks():
  """Each call made Rngs(0) anew: 'q' then 'k' in two calls had the same A
  (and dropout masks) wherever the shapes agreed."""
  model = _t5()
  lora.apply_lora(model, 'q', rank=2, dropout=0.5)
  lora.apply_lora(model, 'k', rank=2, dropout=0.5)
  attn = model.encoder.layers[0].self_attn
  assert attn.q.lora.lora_a[...].shape == attn.k.lora.lora_a[...].shape
  assert not np.array_equal(attn.q.lora.lora_a[...], attn.k.lora.lora_a[...])
  x = jnp.ones((4, attn.q.in_shape[0]))
  assert not np.array_equal(attn.q.lora.dropout(x), attn.k.lora.dropout(x))
  # A model without adapters draws as it always has.
  fresh = _t5()
  lora.apply_lora(fresh, 'q', rank=2, dropout=0.5)
  np.testing.assert_array_equal(
      fresh.encoder.layers[0].self_attn.q.lora.lora_a[...],
      attn.q.lora.lora_a[...])


def _t5_adapter(directory, names, **cfg):
  """A PEFT adapter folder for tiny T5 with factors for ``names``."""
  rng = np.random.default_rng(0)
  tensors = {}
  for n in names:
    tensors[f'base_model.model.{n}.lora_A.weight'] = rng.normal(
        size=(4, 32)).astype(np.float32)
    tensors[f'base_model.model.{n}.lora_B.weight'] = rng.normal(
        size=(32, 4)).astype(np.float32)
  directory.mkdir(exist_ok=True)
  save_file(tensors, str(directory / 'adapter_model.safetensors'))
  (directory / 'adapter_config.json').write_text(json.dumps(dict(
      peft_type='LORA', task_type='SEQ_2_SEQ_LM', r=4, lora_alpha=8, **cfg)))
  return directory


def test_a_peft_adapter_on_some_t5_blocks_loads(tmp_path):
  """What PEFT 0.21 writes for T5 with layers_to_transform=[1] and no
  layers_pattern: block 1's three q projections. It had been refused as a
  partial file, the decoder's block 0 cross-attention (sub-layer 1) taken
  for a targeted layer 1."""
  names = ['encoder.block.1.layer.0.SelfAttention.q',
           'decoder.block.1.layer.0.SelfAttention.q',
           'decoder.block.1.layer.1.EncDecAttention.q']
  _t5_adapter(tmp_path, names, target_modules=['q'], layers_to_transform=[1],
              layers_pattern=None)
  model = t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0))  # two blocks
  lora.load_peft_adapter(model, tmp_path)
  adapted = sorted(lora.lora_modules(model))
  assert len(adapted) == 3 and all('.1.' in p for p in adapted), adapted


def test_an_older_peft_adapter_on_some_t5_sub_layers_loads(tmp_path):
  """PEFT before mid-2026 read the layer index from the last numbered part
  (T5's sub-layer): with layers_to_transform=[1] it wrote the decoder's two
  cross-attention q's. Whole by the rule that wrote it, so it loads; a file
  partial by both rules is still refused."""
  names = ['decoder.block.0.layer.1.EncDecAttention.q',
           'decoder.block.1.layer.1.EncDecAttention.q']
  cfg = dict(target_modules=['q'], layers_to_transform=[1])
  model = t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0))  # two blocks
  lora.load_peft_adapter(model, _t5_adapter(tmp_path / 'old', names, **cfg))
  adapted = sorted(lora.lora_modules(model))
  assert len(adapted) == 2 and all('cross' in p for p in adapted), adapted
  model = t5.T5(t5.get_config('tiny'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"has no lora_A/lora_B for '[a-z]+"
                     r"\.block\.1\.layer"):
    lora.load_peft_adapter(model, _t5_adapter(tmp_path / 'cut', names[:1],
                                              **cfg))
  assert not lora.lora_modules(model)


def test_peft_target_rule_refuses_a_pattern_that_is_no_regex():
  with pytest.raises(ValueError, match=r'^cfg.json: target_modules, '
                     'exclude_modules or layers_pattern holds a pattern'):
    lora._peft_selects({'target_modules': ['q'], 'exclude_modules': '(('},  # pylint: disable=protected-access
                       'a.q', 'cfg.json')


@pytest.mark.parametrize('init, rank, alpha', [('standard', 4, 8.0),
                                                ('pissa', 2, 4.0)])
def test_an_rslora_adapter_round_trips_through_peft(tmp_path, init, rank,
                                                    alpha):
  """All-rsLoRA adapters (use_rslora true, scaled by alpha / sqrt(r)): the
  mixed case the other round trip covers is rewritten without rsLoRA, so
  this scale had not been read back; PiSSA's rank-2r export against the
  original base doubles alpha by sqrt(2), not 2."""
  model = _t5()
  lora.apply_lora(model, ('q', 'v'), rank=rank, alpha=alpha, rslora=True,
                  init=init)
  _randomize_b(model)
  out = fwd(model, ENC, DEC)
  lora.save_peft_adapter(model, tmp_path, 'base')
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert cfg['use_rslora'] is True and cfg['alpha_pattern'] == {}
  assert cfg['r'] == (2 * rank if init == 'pissa' else rank)
  np.testing.assert_allclose(fwd(lora.load_peft_adapter(_t5(), tmp_path),
                                 ENC, DEC), out, atol=1e-4)

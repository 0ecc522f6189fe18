"""LoRA initialisations: standard, gaussian, PiSSA and LoRA-GA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_rite_optax import init


# --------------------------------------------------------------------------
# A real gradient: a small 2-layer MLP regression, LoRA on its first layer.

IN, HIDDEN, OUT, RANK, SCALE = 16, 32, 4, 4, 2.0


@functools.lru_cache(maxsize=None)
def _mlp_problem():
  """(W0, params, data, loss) of a tanh MLP fitted to a shifted teacher.

  Inputs are correlated (a random low-rank-plus-noise covariance) and the
  targets come from a teacher whose first layer is W0 plus a perturbation,
  so the gradient in W0 has the structure of a fine-tuning gradient.
  """
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(IN, IN)) * np.linspace(1.0, 0.1, IN)
  x = rng.normal(size=(256, IN)) @ mix.T
  w0 = rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN)
  b0 = rng.normal(size=HIDDEN) * 0.1
  w1 = rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN)
  w_teacher = w0 + 0.3 * rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN)
  y = np.tanh(x @ w_teacher + b0) @ w1
  data = tuple(jnp.asarray(v, jnp.float32) for v in (x, y))
  rest = tuple(jnp.asarray(v, jnp.float32) for v in (b0, w1))
  return jnp.asarray(w0, jnp.float32), rest, data


def _loss(w, rest, data):
  b0, w1 = rest
  x, y = data
  return jnp.mean((jnp.tanh(x @ w + b0) @ w1 - y) ** 2)


def _full_gradient():
  w0, rest, data = _mlp_problem()
  return w0, jax.grad(_loss)(w0, rest, data)


def _lora_loss(factors, w_frozen, rest, data):
  a, b = factors
  return _loss(w_frozen + SCALE * a @ b, rest, data)


def _ga_measure(a, b, g):
  """LoRA-GA's ||A A^T G + G B^T B - G||_F, our (in, out) orientation."""
  return float(jnp.linalg.norm(a @ a.T @ g + g @ b.T @ b - g))


def _cosine(x, y):
  return float(jnp.sum(x * y) / (jnp.linalg.norm(x) * jnp.linalg.norm(y)))


def test_lora_ga_keeps_the_model_output():
  w0, g = _full_gradient()
  a, b, w_new = init.lora_ga(g, w0, RANK, SCALE)
  assert a.shape == (IN, RANK) and b.shape == (RANK, HIDDEN)
  np.testing.assert_allclose(w_new + SCALE * a @ b, w0, atol=1e-6)
  # bfloat16 in, bfloat16 out; the identity holds to bfloat16 rounding.
  a16, b16, w16 = init.lora_ga(g, w0.astype(jnp.bfloat16), RANK, SCALE)
  assert a16.dtype == b16.dtype == w16.dtype == jnp.bfloat16
  recon = w16.astype(jnp.float32) + SCALE * (a16.astype(jnp.float32)
                                             @ b16.astype(jnp.float32))
  np.testing.assert_allclose(recon, w0, atol=2e-2)
  # The base is rebuilt from the returned (rounded) factors bit for bit,
  # as a resume or another host rebuilds it (from the unrounded ones it
  # had differed in a few entries).
  w016 = w0.astype(jnp.bfloat16)
  assert bool((init.residual(w016, a16, b16, SCALE) == w16).all())
  p16, q16, r16 = init.pissa(w016, RANK, scale=SCALE)
  assert bool((init.residual(w016, p16, q16, SCALE) == r16).all())


def test_lora_ga_first_step_approximates_full_finetuning():
  w0, g = _full_gradient()
  rest, data = _mlp_problem()[1:]
  a, b, w_new = init.lora_ga(g, w0, RANK, SCALE)
  ga_measure = _ga_measure(a, b, g)
  ga_factors = (a, b)
  others = {}
  for seed in range(5):
    key = jax.random.key(seed)
    others[f'standard{seed}'] = init.standard(key, IN, HIDDEN, RANK)
    others[f'gaussian{seed}'] = init.gaussian(key, IN, HIDDEN, RANK)
  for name, (a0, b0) in others.items():
    assert ga_measure < _ga_measure(a0, b0, g), name
  # LoRA-GA's claim on an actual step: one SGD step on (A, B) changes W by a
  # multiple of -G far more closely than from a standard init.
  lr = 1e-3

  def delta_w(factors, w_frozen):
    grads = jax.grad(_lora_loss)(factors, w_frozen, rest, data)
    new = jax.tree.map(lambda p, d: p - lr * d, factors, grads)
    return SCALE * (new[0] @ new[1] - factors[0] @ factors[1])

  cos_ga = _cosine(delta_w(ga_factors, w_new), -g)
  cos_std = _cosine(delta_w(others['standard0'], w0), -g)
  assert cos_ga > 0.9, cos_ga
  assert cos_ga > cos_std + 0.2, (cos_ga, cos_std)


@pytest.mark.parametrize('gamma', [16.0, 4.0])
def test_lora_ga_matches_the_authors_orientation(gamma):
  """Our (A, B) are the transposes of the authors' (lora_A, lora_B)."""
  w0, g = _full_gradient()
  a, b, _ = init.lora_ga(g, w0, RANK, SCALE, gamma=gamma)
  # The authors: G_t = G^T (out, in); U, S, V = svd(G_t); V = V^T;
  # lora_B = U[:, r:2r], lora_A = V[:r] scaled by m^(1/4)/sqrt(gamma), m = out.
  g_t = np.asarray(g, np.float64).T
  u, _, vt = np.linalg.svd(g_t, full_matrices=False)
  c = g_t.shape[0] ** 0.25 / np.sqrt(gamma)
  lora_b = c * u[:, RANK:2 * RANK]
  lora_a = c * vt[:RANK]
  # Singular vectors are defined up to sign: compare the projectors.
  np.testing.assert_allclose(a @ a.T, lora_a.T @ lora_a, atol=1e-5)
  np.testing.assert_allclose(b.T @ b, lora_b @ lora_b.T, atol=1e-5)


def test_lora_ga_sign_and_randomized():
  w0, g = _full_gradient()
  a, b, w_new = init.lora_ga(g, w0, RANK, SCALE, use_sign=True)
  np.testing.assert_allclose(w_new + SCALE * a @ b, w0, atol=1e-6)
  u, _, vt = np.linalg.svd(np.sign(np.asarray(g, np.float64)))
  c = HIDDEN ** 0.25 / 4.0
  np.testing.assert_allclose(a @ a.T, c**2 * u[:, :RANK] @ u[:, :RANK].T,
                             atol=1e-5)
  # Randomized SVD: the same subspaces where the spectrum decays. The matrix
  # (64 x 48) is wider than the sketch (4 r = 16 columns), so the sketch is
  # not exact by size: without its power iterations or its oversampling
  # the projectors miss by ~1e-3.
  m, n = 64, 48
  spectrum = 1.5 ** -np.arange(n)
  rng = np.random.default_rng(5)
  q1, _ = np.linalg.qr(rng.normal(size=(m, n)))
  q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
  g_decay = jnp.asarray((q1 * spectrum) @ q2.T, jnp.float32)
  w_big = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  exact = init.lora_ga(g_decay, w_big, RANK, SCALE)
  fast = init.lora_ga(g_decay, w_big, RANK, SCALE, randomized=True,
                      key=jax.random.key(1))
  np.testing.assert_allclose(fast[0] @ fast[0].T, exact[0] @ exact[0].T,
                             atol=1e-4)
  np.testing.assert_allclose(fast[1].T @ fast[1], exact[1].T @ exact[1],
                             atol=1e-4)
  np.testing.assert_allclose(fast[2] + SCALE * fast[0] @ fast[1], w_big,
                             atol=1e-5)
  rough = init.lora_ga(g_decay, w_big, RANK, SCALE, randomized=True,
                       key=jax.random.key(1), niter=0)
  assert np.abs(rough[0] @ rough[0].T - exact[0] @ exact[0].T).max() > 1e-4


def test_lora_ga_errors():
  w0, g = _full_gradient()
  with pytest.raises(ValueError, match='2 \\* rank <= min'):
    init.lora_ga(g, w0, 9, SCALE)
  with pytest.raises(ValueError, match='same \\(in, out\\) matrix shape'):
    init.lora_ga(g.T, w0, RANK, SCALE)
  # A zero gradient (a layer the loss does not reach) had given arbitrary
  # factors without a word.
  with pytest.warns(UserWarning, match=r"^lora_ga: grad is all zeros .* A "
                    r"and B are not LoRA-GA's\.$"):
    init.lora_ga(jnp.zeros_like(g), w0, RANK, SCALE)


@pytest.mark.parametrize('niter', [None, 6])
def test_pissa_residual_and_principal_part(niter):
  rng = np.random.default_rng(3)
  u, _ = np.linalg.qr(rng.normal(size=(12, 8)))
  v, _ = np.linalg.qr(rng.normal(size=(10, 8)))
  w0 = jnp.asarray((u * 2.0 ** -np.arange(8)) @ v.T * 5, jnp.float32)
  a, b, w_res = init.pissa(w0, 3, scale=0.5, niter=niter)
  assert a.shape == (12, 3) and b.shape == (3, 10)
  np.testing.assert_allclose(w_res + 0.5 * a @ b, w0, atol=1e-5)
  # s A B is the best rank-3 approximation (Eckart-Young), A and B balanced.
  uu, ss, vvt = np.linalg.svd(np.asarray(w0, np.float64))
  best = (uu[:, :3] * ss[:3]) @ vvt[:3]
  np.testing.assert_allclose(0.5 * a @ b, best, atol=1e-4)
  np.testing.assert_allclose(a.T @ a, b @ b.T, atol=1e-4)


def test_pissa_dtype_and_errors():
  w0 = jax.random.normal(jax.random.key(0), (8, 6), jnp.bfloat16)
  a, b, w_res = init.pissa(w0, 2)
  assert a.dtype == b.dtype == w_res.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='rank 7 must be in'):
    init.pissa(w0, 7)


def test_pissa_rejects_a_scale_that_is_not_positive():
  w0 = jax.random.normal(jax.random.key(0), (8, 6))
  for scale in (0.0, -2.0):
    with pytest.raises(ValueError, match='scale must be > 0'):
      init.pissa(w0, 2, scale=scale)


def test_randomized_svd_in_low_precision_and_its_errors():
  x = jnp.diag(jnp.arange(6.0, 0.0, -1.0)).astype(jnp.bfloat16)
  _, s, _ = init.randomized_svd(x, 2, niter=6, oversample=2)
  assert s.dtype == jnp.float32  # computed in float32: bf16 has no QR
  np.testing.assert_allclose(s, [6.0, 5.0], atol=1e-4)
  with pytest.raises(ValueError, match='oversample and niter must be >= 0'):
    init.randomized_svd(x, 2, oversample=-1)
  with pytest.raises(ValueError, match='rank 7 must be in \\[1, 6\\]'):
    init.randomized_svd(x, 7)
  with pytest.raises(ValueError, match='2-D matrix'):
    init.randomized_svd(x[None], 2)


def test_standard_and_gaussian():
  a, b = init.standard(jax.random.key(0), 400, 7, 8, dtype=jnp.bfloat16)
  assert a.dtype == b.dtype == jnp.bfloat16
  a, b = init.standard(jax.random.key(0), 400, 7, 8)
  assert a.shape == (400, 8) and b.shape == (8, 7)
  assert not bool(jnp.any(b))
  bound = 1 / np.sqrt(400)   # PEFT: kaiming_uniform_(a=sqrt(5)), fan_in = in
  assert float(jnp.max(jnp.abs(a))) <= bound
  assert float(jnp.max(jnp.abs(a))) > 0.95 * bound
  np.testing.assert_allclose(float(jnp.std(a)), bound / np.sqrt(3), rtol=0.05)
  a, b = init.gaussian(jax.random.key(1), 400, 7, 8)
  np.testing.assert_allclose(float(jnp.std(a)), 1 / 8, rtol=0.05)
  assert not bool(jnp.any(b))
  a, _ = init.gaussian(jax.random.key(1), 400, 7, 8, std=0.02)
  np.testing.assert_allclose(float(jnp.std(a)), 0.02, rtol=0.05)
  with pytest.raises(ValueError, match='must be positive'):
    init.standard(jax.random.key(0), 4, 4, 0)


@pytest.mark.parametrize('call, message', [
    (lambda w: init.residual(w, w[:, :2], w[:2], float('nan')),
     'residual: scale must be > 0 and finite, got nan.'),
    (lambda w: init.residual(w, w[:, :2], w[:2], -2.0),
     'residual: scale must be > 0 and finite, got -2.0.'),
    (lambda w: init.residual(w, None, w[:2], 1.0),
     'residual: a must be an array, got NoneType.'),
    (lambda w: init.pissa(None, 2), 'pissa: w0 must be an array, got NoneType.'),
    (lambda w: init.pissa([[1.0, 2.0], [3.0, 4.0]], 1),
     'pissa: w0 must be an array, got list.'),
    (lambda w: init.lora_ga(None, w, 2, 1.0),
     'lora_ga: grad must be an array, got NoneType.'),
    (lambda w: init.randomized_svd(w.at[0, 0].set(jnp.inf), 2),
     'randomized_svd: x holds inf or NaN; the SVD needs finite values.'),
], ids=['residual_nan_scale', 'residual_negative_scale', 'residual_none',
        'pissa_none', 'pissa_list', 'lora_ga_none', 'randomized_svd_inf'])
def test_inputs_the_svd_inits_refuse_in_one_line(call, message):
  """residual had rebuilt a wrong base from a NaN or negative scale, None or
  a list failed in an AttributeError on .ndim, and randomized_svd returned
  NaN factors from a matrix holding inf."""
  w = jax.random.normal(jax.random.key(0), (8, 6))
  with pytest.raises(ValueError, match='^' + message.replace('(', r'\(')
                     .replace(')', r'\)').replace('.', r'\.') + '$'):
    call(w)

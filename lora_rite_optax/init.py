"""LoRA initialisations on arrays: standard, gaussian, PiSSA and LoRA-GA.

Everything here uses this library's convention for one adapted weight:

  W0: (in, out)   frozen weight, y = x @ W0
  A:  (in, r)     ``lora_a``, rank last
  B:  (r, out)    ``lora_b``, rank first
  y = x @ (W0 + s * A @ B)    with s the LoRA scaling (alpha / r)

PyTorch / PEFT store the transposes (``weight`` (out, in), ``lora_A`` (r, in),
``lora_B`` (out, r)); every function below says how it maps onto PEFT's. All
functions take and return 2-D arrays; reshaping einsum-shaped kernels to
(in, out) matrices is the model wrapper's job.
"""

from __future__ import annotations

import math
from typing import Optional
import warnings

import jax
import jax.numpy as jnp

from lora_rite_optax import casting
from lora_rite_optax import checks
from lora_rite_optax import linalg

__all__ = ['standard', 'gaussian', 'pissa', 'lora_ga', 'residual',
           'randomized_svd']


def _check_int(who: str, name: str, value) -> None:
  """A size must be an integer (``operator.index``: not 2.0, not True)."""
  if not checks.is_integer(value):
    raise ValueError(f'{who}: {name} must be an integer, got {value!r}.')


def _check_array(who: str, **named) -> None:
  """Each of ``named`` must be an array (anything with a shape and dtype):
  None or a nested list had failed in an AttributeError on ``.ndim``."""
  for name, x in named.items():
    if not (hasattr(x, 'shape') and hasattr(x, 'dtype')):
      raise ValueError(f'{who}: {name} must be an array, got '
                       f'{type(x).__name__}.')


def _check_float(who: str, name: str, x) -> None:
  """SVD-based factors are scaled by non-integer amounts."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{who}: {name} must be a floating-point matrix, got '
                     f'{x.dtype}.')


def _finite_for_svd(who: str, name: str, x: jax.Array,
                    why: str = 'the SVD needs finite values') -> jax.Array:
  """``x``, refused where it is known to hold inf or NaN.

  LAPACK's SVD of a matrix holding inf never returns (Reference-LAPACK
  #1409; numpy checks first for this reason). Under jit, where ``x`` is
  unknown, inf becomes NaN, which the SVD passes through: NaN factors, not a
  hang.
  """
  if isinstance(x, jax.core.Tracer):
    return jnp.where(jnp.isinf(x), jnp.nan, x)
  # At compile time: inside a jit trace jnp's test would be traced even for
  # a concrete x, and numpy's cannot read an array spread over processes.
  with jax.ensure_compile_time_eval():
    finite = bool(jnp.all(jnp.isfinite(x)))
  if not finite:
    raise ValueError(f'{who}: {name} holds inf or NaN; {why}.')
  return x


def _check_dtype(who: str, dtype) -> None:
  """An integer A is all 0 (the uniform's bound is below 1) and a bool one
  all True: neither trains."""
  checks.floating_dtype(who, 'dtype', dtype)


def _check_dims(who: str, in_dim: int, out_dim: int, rank: int) -> None:
  for name, value in (('in_dim', in_dim), ('out_dim', out_dim),
                      ('rank', rank)):
    _check_int(who, name, value)
  if rank < 1 or in_dim < 1 or out_dim < 1:
    raise ValueError(f'{who}: in_dim, out_dim and rank must be positive, got '
                     f'({in_dim}, {out_dim}, {rank}).')


def standard(key: jax.Array, in_dim: int, out_dim: int, rank: int,
             dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  r"""LoRA's default init: ``A`` Kaiming-uniform, ``B`` zero.

  Matches PEFT's ``init_lora_weights=True``, which applies
  ``kaiming_uniform_(a=sqrt(5))`` to ``lora_A`` (r, in): fan-in ``in``, gain
  :math:`\sqrt{2 / (1 + 5)}`, so every entry of ``A`` is drawn from
  :math:`U(-1/\sqrt{in}, 1/\sqrt{in})`; ``lora_B`` is zero, so ``A @ B = 0``.

  Args:
    key: a PRNG key.
    in_dim: input features of the adapted weight.
    out_dim: output features of the adapted weight.
    rank: the LoRA rank ``r``.
    dtype: dtype of the returned factors.

  Returns:
    ``(A, B)`` with shapes ``(in_dim, rank)`` and ``(rank, out_dim)``.

  Example:
    >>> import jax
    >>> from lora_rite_optax import init
    >>> a, b = init.standard(jax.random.key(0), 16, 8, 4)
    >>> a.shape, b.shape, float(abs(b).max())
    ((16, 4), (4, 8), 0.0)

  References:
    Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
    <https://arxiv.org/abs/2106.09685>`_, 2021.
  """
  _check_dims('standard', in_dim, out_dim, rank)
  _check_dtype('standard', dtype)
  bound = 1.0 / math.sqrt(in_dim)
  a = jax.random.uniform(key, (in_dim, rank), casting.compute_dtype(dtype),
                         -bound, bound).astype(dtype)
  return a, jnp.zeros((rank, out_dim), dtype)


def gaussian(key: jax.Array, in_dim: int, out_dim: int, rank: int,
             std: Optional[float] = None,
             dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  r"""PEFT's ``init_lora_weights="gaussian"``: ``A ~ N(0, std^2)``, ``B = 0``.

  Args:
    key: a PRNG key.
    in_dim: input features of the adapted weight.
    out_dim: output features of the adapted weight.
    rank: the LoRA rank ``r``.
    std: standard deviation of ``A``; ``None`` uses PEFT's :math:`1 / r`.
    dtype: dtype of the returned factors.

  Returns:
    ``(A, B)`` with shapes ``(in_dim, rank)`` and ``(rank, out_dim)``.

  Example:
    >>> import jax
    >>> from lora_rite_optax import init
    >>> a, b = init.gaussian(jax.random.key(0), 4096, 8, 5)
    >>> round(float(a.std()), 2)
    0.2
  """
  _check_dims('gaussian', in_dim, out_dim, rank)
  _check_dtype('gaussian', dtype)
  if std is not None:
    # 0 leaves A = B = 0, where neither factor ever gets a gradient.
    checks.positive('gaussian', 'std', std)
  std = 1.0 / rank if std is None else std
  a = std * jax.random.normal(key, (in_dim, rank),
                              casting.compute_dtype(dtype))
  return a.astype(dtype), jnp.zeros((rank, out_dim), dtype)


def randomized_svd(x: jax.Array, rank: int, *, niter: int = 4,
                   oversample: int = 0, key: Optional[jax.Array] = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Top-``rank`` SVD of a matrix by randomized subspace iteration.

  Halko, Martinsson and Tropp's range finder with ``niter`` power iterations
  (re-orthonormalised by QR each time), the algorithm of
  ``torch.svd_lowrank`` that PEFT's PiSSA and LoRA-GA use. The sketch has
  ``q = min(rank + oversample, *x.shape)`` columns.

  Args:
    x: an ``(m, n)`` matrix.
    rank: number of singular triplets returned.
    niter: subspace (power) iterations.
    oversample: extra sketch columns beyond ``rank``.
    key: PRNG key of the Gaussian sketch; ``None`` uses ``jax.random.key(0)``.

  Returns:
    ``(U, S, Vh)`` with shapes ``(m, rank)``, ``(rank,)``, ``(rank, n)``,
    in ``x``'s dtype promoted to at least float32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_rite_optax import init
    >>> x = jnp.diag(jnp.arange(6.0, 0.0, -1.0))
    >>> u, s, vh = init.randomized_svd(x, 2, niter=6, oversample=2)
    >>> [round(float(v), 4) for v in s]
    [6.0, 5.0]
  """
  _check_array('randomized_svd', x=x)
  if x.ndim != 2:
    raise ValueError(f'randomized_svd: x must be a 2-D matrix, got shape '
                     f'{x.shape}.')
  m, n = x.shape
  _check_int('randomized_svd', 'rank', rank)
  if not 1 <= rank <= min(m, n):
    raise ValueError(f'randomized_svd: rank {rank} must be in [1, '
                     f'{min(m, n)}] for a matrix of shape {x.shape}.')
  _check_int('randomized_svd', 'niter', niter)
  _check_int('randomized_svd', 'oversample', oversample)
  if oversample < 0 or niter < 0:
    raise ValueError(f'randomized_svd: oversample and niter must be >= 0, '
                     f'got {oversample} and {niter}.')
  q = min(rank + oversample, m, n)
  # QR and SVD need at least float32 (jnp.linalg has no bfloat16 QR).
  x = _finite_for_svd('randomized_svd', 'x',
                      x.astype(casting.compute_dtype(x.dtype)))
  key = jax.random.key(0) if key is None else key
  omega = jax.random.normal(key, (n, q), x.dtype)
  mm = linalg.matmul
  basis, _ = jnp.linalg.qr(mm(x, omega))
  for _ in range(niter):
    basis, _ = jnp.linalg.qr(mm(x.T, basis))
    basis, _ = jnp.linalg.qr(mm(x, basis))
  u_small, s, vh = jnp.linalg.svd(mm(basis.T, x), full_matrices=False)
  return mm(basis, u_small)[:, :rank], s[:rank], vh[:rank]


def residual(w0: jax.Array, a: jax.Array, b: jax.Array,
             scale: float) -> jax.Array:
  r"""The base that an adapter ``(A, B)`` starting at ``W0`` sits on.

  .. math::
    W_{res} = W_0 - s A B,

  computed in at least float32 and cast to ``w0``'s dtype. `pissa` and
  `lora_ga` return exactly this for the factors they return, so a caller
  that kept those factors (a resumed run) rebuilds the same base from the
  same ``W0`` without redoing the SVD, bit for bit.

  Args:
    w0: the frozen weight, ``(in, out)``.
    a: ``(in, r)``.
    b: ``(r, out)``.
    scale: the LoRA scaling ``s`` the model multiplies ``A @ B`` by.

  Returns:
    ``W_res``, ``(in, out)``, in ``w0``'s dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_rite_optax import init
    >>> w0 = jax.random.normal(jax.random.key(0), (8, 6))
    >>> a, b, w_res = init.pissa(w0, 2, scale=2.0)
    >>> bool((init.residual(w0, a, b, 2.0) == w_res).all())
    True
  """
  _check_array('residual', w0=w0, a=a, b=b)
  if w0.ndim != 2 or a.shape != (w0.shape[0], b.shape[0]) or (
      b.shape != (a.shape[1], w0.shape[1])):
    raise ValueError(f'residual: shapes w0 {w0.shape}, a {a.shape}, b '
                     f'{b.shape} are not (in, out), (in, r), (r, out).')
  # As pissa and lora_ga check it: a NaN or negative scale had rebuilt a
  # wrong base without a word.
  checks.positive('residual', 'scale', scale)
  dtype = casting.compute_dtype(w0.dtype)
  w = w0.astype(dtype) - scale * linalg.matmul(a.astype(dtype),
                                               b.astype(dtype))
  return w.astype(w0.dtype)


def pissa(w0: jax.Array, rank: int, scale: float = 1.0,
          niter: Optional[int] = None, key: Optional[jax.Array] = None
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""PiSSA: the adapter takes W0's top-``rank`` singular directions.

  With the SVD :math:`W_0 = U S V^\top` (``W0`` as ``(in, out)``)

  .. math::
    A = U_r \sqrt{S_r / s}, \quad B = \sqrt{S_r / s}\, V_r^\top, \quad
    W_{res} = W_0 - s A B,

  so :math:`W_{res} + s A B = W_0`. This is PEFT's ``pissa_init`` transposed
  (PEFT: ``lora_A = sqrt(S/s) Uh_r`` (r, in), ``lora_B = V_r sqrt(S/s)``
  (out, r) for ``weight`` (out, in)).

  Args:
    w0: the frozen weight, ``(in, out)``.
    rank: the LoRA rank ``r``.
    scale: the LoRA scaling ``s`` the model multiplies ``A @ B`` by.
    niter: ``None`` for an exact SVD; an int for PEFT's fast
      ``pissa_niter_<niter>`` (randomized SVD with a sketch of ``rank``
      columns, as ``torch.svd_lowrank(W, rank, niter)``).
    key: PRNG key of the randomized SVD (``None``: ``jax.random.key(0)``).

  Returns:
    ``(A, B, w_res)`` with shapes ``(in, r)``, ``(r, out)``, ``(in, out)``, all
    in ``w0``'s dtype (computed in at least float32).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_rite_optax import init
    >>> w0 = jax.random.normal(jax.random.key(0), (8, 6))
    >>> a, b, w_res = init.pissa(w0, 2, scale=2.0)
    >>> bool(jnp.allclose(w_res + 2.0 * a @ b, w0, atol=1e-5))
    True

  References:
    Meng, Wang and Zhang, `PiSSA: Principal Singular Values and Singular
    Vectors Adaptation of Large Language Models
    <https://arxiv.org/abs/2404.02948>`_, 2024.
  """
  _check_array('pissa', w0=w0)
  if w0.ndim != 2:
    raise ValueError(f'pissa: w0 must be a 2-D (in, out) matrix, got shape '
                     f'{w0.shape}.')
  _check_float('pissa', 'w0', w0)
  _check_int('pissa', 'rank', rank)
  if not 1 <= rank <= min(w0.shape):
    raise ValueError(f'pissa: rank {rank} must be in [1, {min(w0.shape)}] for '
                     f'w0 of shape {w0.shape}.')
  # The LoRA scaling alpha / r; checked where its value is known (a number
  # or a concrete array, not a tracer).
  checks.positive('pissa', 'scale', scale)
  w = _finite_for_svd('pissa', 'w0', w0.astype(casting.compute_dtype(
      w0.dtype)))
  if niter is None:
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
  else:
    u, s, vh = randomized_svd(w, rank, niter=niter, key=key)
  root = jnp.sqrt(s / scale)  # scale > 0, checked above
  a = (u * root[None, :]).astype(w0.dtype)
  b = (root[:, None] * vh).astype(w0.dtype)
  return a, b, residual(w0, a, b, scale)


def lora_ga(grad: jax.Array, w0: jax.Array, rank: int, scale: float,
            gamma: float = 16.0, use_sign: bool = False,
            randomized: bool = False, key: Optional[jax.Array] = None,
            niter: int = 4) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""LoRA-GA: align the adapter's first step with full fine-tuning's.

  From the (batch-averaged) gradient ``G`` of the loss in ``W0`` (same
  ``(in, out)`` orientation as ``W0``), with SVD :math:`G = U S V^\top`,
  LoRA-GA's default ``ArB2r`` direction takes

  .. math::
    A = c\, U_{[:, 1..r]}, \quad B = c\, V_{[:, r+1..2r]}^\top, \quad
    c = d_{out}^{1/4} / \sqrt{\gamma},\quad W_0' = W_0 - s A B,

  so the model's output is unchanged at step 0 and one SGD step on ``(A, B)``
  moves ``W`` by :math:`-\eta s^2 (A A^\top G + G B^\top B)`, the part of
  ``G`` in ``A``'s column space plus the part in ``B``'s row space.

  Orientation: the authors' code works on PyTorch's ``weight`` (out, in) with
  ``G_t = G^T``, ``U_t, S, V_t = svd(G_t)``, ``lora_A = V_t[:r]`` (r, in) and
  ``lora_B = U_t[:, r:2r]`` (out, r), scaled by ``m^{1/4}/sqrt(gamma)`` with
  ``m = G_t.shape[0] = d_out``. Since ``G = V_t^T S U_t^T``, our ``U`` is their
  ``V_t^T`` and our ``V`` their ``U_t``, so ``A = lora_A^T`` and
  ``B = lora_B^T`` exactly: the same init, transposed. PEFT's own
  ``init_lora_weights="lora_ga"`` (0.21) differs: it multiplies ``lora_B`` by
  ``S[r:2r]`` and scales only ``lora_B``, so its factors are not these.

  Args:
    grad: the full-weight gradient ``G``, ``(in, out)``, averaged over as many
      batches as the caller wants (the authors' default config averages 8
      batches of one example).
    w0: the frozen weight, ``(in, out)``.
    rank: the LoRA rank ``r`` (needs ``2 r <= min(in, out)``).
    scale: the LoRA scaling ``s`` the model multiplies ``A @ B`` by.
    gamma: the stable-scale hyperparameter (paper default 16).
    use_sign: take the directions from ``sign(G)`` instead of ``G``, the
      first step full fine-tuning with Adam takes (``-lr * sign(G)`` without
      epsilon): a heuristic that moves the target toward Adam's first
      full-weight step and away from SGD's.
    randomized: use a randomized SVD (sketch of ``min(4 r, in, out)`` columns
      and ``niter`` power iterations, as the authors' ``torch.svd_lowrank``
      call) instead of an exact one, for large matrices.
    key: PRNG key of the randomized SVD (``None``: ``jax.random.key(0)``).
    niter: power iterations of the randomized SVD.

  Returns:
    ``(A, B, w0_new)`` with shapes ``(in, r)``, ``(r, out)``, ``(in, out)``, in
    ``w0``'s dtype; ``w0_new`` is computed from the returned (cast) factors, so
    ``w0_new + s * A @ B == w0`` up to rounding in ``w0``'s dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_rite_optax import init
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> w0 = jax.random.normal(k1, (16, 12))
    >>> g = jax.random.normal(k2, (16, 12))
    >>> a, b, w0_new = init.lora_ga(g, w0, rank=2, scale=2.0)
    >>> bool(jnp.allclose(w0_new + 2.0 * a @ b, w0, atol=1e-5))
    True

  References:
    Wang, Yu and Li, `LoRA-GA: Low-Rank Adaptation with Gradient
    Approximation <https://arxiv.org/abs/2407.05000>`_, NeurIPS 2024; code:
    github.com/Outsider565/LoRA-GA.
  """
  _check_array('lora_ga', grad=grad, w0=w0)
  if grad.ndim != 2 or grad.shape != w0.shape:
    raise ValueError(f'lora_ga: grad {grad.shape} and w0 {w0.shape} must be '
                     'the same (in, out) matrix shape.')
  in_dim, out_dim = w0.shape
  _check_float('lora_ga', 'w0', w0)
  _check_float('lora_ga', 'grad', grad)
  _check_int('lora_ga', 'rank', rank)
  checks.positive('lora_ga', 'scale', scale)
  checks.positive('lora_ga', 'gamma', gamma)
  # Tested by Python below: the string 'False' would switch either on.
  checks.flag('lora_ga', 'use_sign', use_sign)
  checks.flag('lora_ga', 'randomized', randomized)
  if rank < 1 or 2 * rank > min(in_dim, out_dim):
    raise ValueError(f'lora_ga: needs 1 <= 2 * rank <= min(in, out); got rank '
                     f'{rank} for shape {w0.shape}.')
  dtype = casting.compute_dtype(w0.dtype)
  # W0 takes no SVD here, but a NaN in it would pass silently into W0'.
  _finite_for_svd('lora_ga', 'w0', w0,
                  why='the new base W0 - s A B would carry them')
  g = _finite_for_svd('lora_ga', 'grad', grad.astype(dtype))
  if not isinstance(g, jax.core.Tracer):
    with jax.ensure_compile_time_eval():
      zero = not bool(jnp.any(g != 0))
    if zero:
      # Its SVD is any orthonormal basis: the factors would be arbitrary,
      # not LoRA-GA's, without a word.
      warnings.warn('lora_ga: grad is all zeros (a layer the loss does not '
                    'reach?), so its SVD gives arbitrary directions: A and B '
                    "are not LoRA-GA's.", stacklevel=2)
  if use_sign:
    g = jnp.sign(g)
  if randomized:
    q = min(4 * rank, in_dim, out_dim)
    u, _, vh = randomized_svd(g, 2 * rank, niter=niter,
                              oversample=q - 2 * rank, key=key)
  else:
    u, _, vh = jnp.linalg.svd(g, full_matrices=False)
  gamma_value = checks.concrete(gamma)  # None while traced
  c = out_dim ** 0.25 / (jnp.sqrt(gamma) if gamma_value is None
                         else math.sqrt(gamma_value))
  a = (c * u[:, :rank]).astype(w0.dtype)
  b = (c * vh[rank:2 * rank]).astype(w0.dtype)
  return a, b, residual(w0, a, b, scale)

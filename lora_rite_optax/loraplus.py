"""LoRA+: a larger learning rate for the ``lora_b`` factor of every pair."""

from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_rite_optax import nan_free_adam
from lora_rite_optax import casting
from lora_rite_optax import checks
from lora_rite_optax import pairs as pairs_lib

__all__ = ['loraplus', 'loraplus_labels']

ScalarOrSchedule = optax.ScalarOrSchedule
BaseFactory = Callable[[ScalarOrSchedule], optax.GradientTransformation]

# Group labels used by `loraplus_labels` and the partition in `loraplus`.
A, B, B_NO_DECAY, EMBEDDING = 'a', 'b', 'b_no_decay', 'embedding'


def _scaled(rate: ScalarOrSchedule, factor: float) -> ScalarOrSchedule:
  if callable(rate):
    return lambda count: factor * rate(count)
  return factor * rate


def _no_decay(path: str) -> bool:
  lowered = path.lower()
  return 'bias' in lowered or 'norm' in lowered


def loraplus_labels(params, layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
                    is_embedding: Optional[Callable[[str], bool]] = None
                    ) -> Any:
  """The LoRA+ group of every leaf, following PEFT's ``create_loraplus_optimizer``.

  * ``'b'``: every ``lora_b`` factor of a pair, and every other 1-D leaf
    (under a scanned layout also a stack of them, such as a per-layer bias
    ``(L, d)``: see :func:`lora_rite_optax.pairs.stacked_axes`).
  * ``'b_no_decay'``: those vectors outside pairs whose path names a bias or
    a norm (PEFT: biases and ``nn.LayerNorm`` weights get no weight decay).
  * ``'embedding'``: both factors of a pair whose path satisfies
    ``is_embedding`` (only when ``is_embedding`` is given).
  * ``'a'``: everything else (``lora_a`` factors and other leaves).

  Args:
    params: a pytree of arrays (masked-out leaves get ``'a'``; they are
      skipped by every group anyway).
    layout: how pairs are recognised, see :func:`find_lora_pairs`.
    is_embedding: predicate on a pair's path (``'embed/tokens'``).

  Returns:
    A pytree of labels with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from lora_rite_optax import loraplus_labels
    >>> params = {'q': {'lora_a': jnp.zeros((4, 2)), 'lora_b': jnp.zeros((2, 3))},
    ...           'bias': jnp.zeros(3)}
    >>> loraplus_labels(params)
    {'bias': 'b_no_decay', 'q': {'lora_a': 'a', 'lora_b': 'b'}}
  """
  return _labels('loraplus_labels', params, layout, is_embedding)


def _labels(who: str, params, layout, is_embedding):
  """:func:`loraplus_labels`, its errors naming ``who`` (the function the
  user called)."""
  _check_is_embedding(who, is_embedding)
  paired = pairs_lib.find_lora_pairs(params, layout, who=who,
                                     allow_unpaired=True)
  leaves, _ = pairs_lib.flatten(params)
  if not paired.pairs and not paired.lone and not all(
      pairs_lib._is_empty(leaf) for _, leaf in leaves):  # pylint: disable=protected-access
    # Else every vector (a flattened tree's one leaf too) silently took
    # lr_ratio times the rate.
    lay = pairs_lib.layout_fn(layout, who)('')
    raise ValueError(
        f'{who}: no {lay.a_key}/{lay.b_key} factor in the params, so no '
        f'rate to raise (LoRA+ trains {lay.b_key} lr_ratio times faster '
        f'than {lay.a_key}); under optax.flatten the factors lose their '
        'names: put loraplus outside it.')
  labels = []
  for path, leaf in leaves:
    if pairs_lib._is_empty(leaf):  # pylint: disable=protected-access
      labels.append(A)
    elif (jnp.ndim(leaf) -
          pairs_lib.stacked_axes(path, jnp.shape(leaf), layout, who)) == 1:
      labels.append(B_NO_DECAY if _no_decay('/'.join(path)) else B)
    else:
      labels.append(A)
  for pair in paired.pairs:
    if is_embedding is not None and is_embedding(pair.name):
      labels[pair.a_index] = labels[pair.b_index] = EMBEDDING
    else:
      labels[pair.a_index], labels[pair.b_index] = A, B
  for factor in paired.lone:  # its partner masked out (e.g. LoRA-FA)
    if is_embedding is not None and is_embedding(factor.name):
      labels[factor.index] = EMBEDDING
    else:
      labels[factor.index] = B if factor.role == 'b' else A
  return jax.tree_util.tree_unflatten(paired.treedef, labels)


def _check_is_embedding(who: str, is_embedding: Any) -> None:
  # Called on each pair's name at init; a string (the embedding's name)
  # had failed there with "'str' object is not callable".
  if is_embedding is not None and not callable(is_embedding):
    raise ValueError(
        f'{who}: is_embedding must be a function of a pair\'s name '
        '(e.g. lambda name: \'embed\' in name), got '
        f'{checks.shown(is_embedding)}.')


def loraplus(
    learning_rate: ScalarOrSchedule,
    lr_ratio: chex.Numeric = 16.0,
    b1: chex.Numeric = 0.9,
    b2: chex.Numeric = 0.999,
    eps: chex.Numeric = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    base: Optional[BaseFactory] = None,
    layout: pairs_lib.LayoutSpec = pairs_lib.NNX_LAYOUT,
    lr_embedding: Optional[ScalarOrSchedule] = None,
    is_embedding: Optional[Callable[[str], bool]] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA+: AdamW (or any optimizer) with ``lr_ratio`` times the rate on B.

  For every pair ``delta W = A @ B`` (``lora_a``, ``lora_b``), ``B`` is
  trained with learning rate :math:`\lambda \eta_t` and ``A`` with
  :math:`\eta_t`, where :math:`\lambda` is ``lr_ratio`` and :math:`\eta_t`
  the (possibly scheduled) ``learning_rate``:

  .. math::
    A_{t+1} = A_t - \eta_t\, u(A)_t, \qquad
    B_{t+1} = B_t - \lambda \eta_t\, u(B)_t,

  with :math:`u` the base optimizer's update before its learning rate (AdamW's
  :math:`\hat m / (\sqrt{\hat v} + \epsilon) + wd\, \theta` by default, and
  0 where a gradient entry has always been 0, as ``lora_a``'s while
  ``lora_b = 0``, even with :math:`\epsilon = 0`). Each group has its own
  optimizer state, exactly as PyTorch parameter groups.

  Which leaf gets which rate follows PEFT's ``create_loraplus_optimizer``:
  ``lora_B`` factors and every 1-D parameter get ``lr * ratio``; 1-D biases
  and LayerNorm weights get no weight decay; LoRA factors of embedding layers
  get ``loraplus_lr_embedding``; everything else (``lora_A``, other trainable
  matrices) gets ``lr``. Non-pair leaves are allowed. Differences from PEFT:

  * PEFT exempts from weight decay only 1-D parameters named ``bias`` or owned
    by ``nn.LayerNorm``; here it is 1-D leaves whose path contains ``bias`` or
    ``norm`` (so RMSNorm scales, which PEFT decays, are not decayed).
  * The embedding group is opt-in: PEFT's default ``loraplus_lr_embedding`` is
    1e-6 for both factors of ``lora.Embedding`` modules, but until PEFT PR
    #3503 (issue #3499) that group was always empty (its module test never
    matched), so both embedding factors trained at ``lr`` (the name
    ``lora_embedding_B`` does not match the ``lora_B`` test either). Here,
    without ``is_embedding`` every pair is an ordinary pair (A at ``lr``, B at
    ``lr * ratio``); with it, both factors of matching pairs use
    ``lr_embedding`` (default 1e-6, as PEFT).
  * A schedule applies to every group (B's rate is ``ratio * schedule``); the
    embedding group uses ``lr_embedding`` as given (float or schedule).
  * With ``base``, all groups use ``base`` and its own weight decay: pass
    ``b1``, ``weight_decay``, ... to ``base`` (``functools.partial``); the
    no-decay group then uses ``base`` too.

  Args:
    learning_rate: rate of the ``A`` group; a float or an optax schedule.
    lr_ratio: :math:`\lambda`, the ratio of B's rate to A's (the paper
      recommends 2^3 to 2^5; default 2^4).
    b1: AdamW's first-moment decay (must stay at its default with
      ``base``: pass it to ``base``).
    b2: AdamW's second-moment decay (must stay at its default with
      ``base``: pass it to ``base``).
    eps: AdamW's epsilon (must stay at its default with
      ``base``: pass it to ``base``).
    weight_decay: AdamW's decoupled weight decay, a number or a schedule
      (must stay 0 with ``base``).
    base: optional factory ``base(learning_rate) -> GradientTransformation``
      (for example ``optax.lion`` or ``functools.partial(optax.adamw, b2=0.99,
      weight_decay=0.1)``) used for every group instead of AdamW.
    layout: how pairs are recognised, see :func:`find_lora_pairs`.
    lr_embedding: rate of the embedding group (default 1e-6 when
      ``is_embedding`` is given).
    is_embedding: predicate on a pair's path selecting embedding adapters.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (an ``optax.partition``).
    With ``optax.inject_hyperparams`` pass ``static_args=('base',
    'is_embedding', 'layout')`` for those you set (``layout`` when it is a
    function): it would treat any callable as a schedule. With ``base``, the
    injected ``b1``, ``b2``, ``eps`` and ``weight_decay`` are not used (set
    them in ``base``): a value changed in the state is refused in one line
    by an update outside ``jax.jit`` and changes nothing inside it, so name
    them in ``static_args`` too to keep them out of it.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_rite_optax as lro
    >>> key = jax.random.key(0)
    >>> params = {'lora_a': jax.random.normal(key, (4, 2)),
    ...           'lora_b': jnp.zeros((2, 3))}
    >>> target = jnp.arange(12.0).reshape(4, 3) / 10
    >>> loss = lambda p: jnp.sum((p['lora_a'] @ p['lora_b'] - target) ** 2)
    >>> tx = lro.loraplus(1e-2)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> state = tx.init(params)
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 1e-2)
    True

  References:
    Hayou, Ghosh and Yu, `LoRA+: Efficient Low Rank Adaptation of Large Models
    <https://arxiv.org/abs/2402.12354>`_, ICML 2024; PEFT's
    ``peft.optimizers.create_loraplus_optimizer``.
  """
  checks.learning_rate('loraplus', learning_rate)
  checks.positive('loraplus', 'lr_ratio', lr_ratio)
  pairs_lib.layout_fn(layout, 'loraplus')
  _check_is_embedding('loraplus', is_embedding)
  if lr_embedding is not None:
    if is_embedding is None:
      raise ValueError('loraplus: lr_embedding applies to the pairs that '
                       'is_embedding selects; pass is_embedding too.')
    checks.learning_rate('loraplus', lr_embedding, 'lr_embedding')
  if base is None:
    for name, value in (('b1', b1), ('b2', b2)):
      checks.beta('loraplus', name, value)
    checks.non_negative('loraplus', 'eps', eps, finite=True)
    checks.non_negative('loraplus', 'weight_decay', weight_decay,
                        finite=True, schedule_ok=True)

    def make(rate, decay):
      return casting.with_stable_dtypes(
          nan_free_adam.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=decay))
  else:
    if not callable(base):
      raise ValueError(
          'loraplus: base must be a function of the learning rate that '
          'returns the optimizer (e.g. optax.lion), not an optimizer: one is '
          f'built per group, each at its own rate; got {type(base).__name__}.')
    given = zip((b1, b2, eps, weight_decay), (0.9, 0.999, 1e-8, 0.0))

    def differs(value, default):
      # Traced under optax.inject_hyperparams: unknown, skipped. A concrete
      # array (numpy's, or inject_hyperparams' own copy of the default) is
      # compared with the default rounded to its dtype by numpy (bfloat16
      # makes 0.999 1.0; float64 stays float64, which jnp would make float32
      # without x64).
      if callable(value):  # A schedule: it would be dropped.
        return True
      v = checks.concrete(value)
      dtype = getattr(value, 'dtype', None)
      return v is not None and v != (
          default if dtype is None else float(np.asarray(default, dtype)))

    if any(differs(v, d) for v, d in given):
      raise ValueError('loraplus: with base=..., pass b1/b2/eps/weight_decay '
                       'to base itself, e.g. functools.partial(optax.lion, '
                       'weight_decay=0.1).')

    def make(rate, decay):
      del decay
      return casting.with_stable_dtypes(base(rate))
  if lr_embedding is None:
    lr_embedding = 1e-6
  transforms = {
      A: make(learning_rate, weight_decay),
      B: make(_scaled(learning_rate, lr_ratio), weight_decay),
  }
  # Groups that would behave exactly like another are merged into it, so the
  # common case compiles two optimizers, not four.
  split_no_decay = base is None and not (
      isinstance(weight_decay, (int, float)) and weight_decay == 0)
  if split_no_decay:
    transforms[B_NO_DECAY] = make(_scaled(learning_rate, lr_ratio), 0.0)
  if is_embedding is not None:
    transforms[EMBEDDING] = make(lr_embedding, weight_decay)

  def labels(tree):
    tree = _labels('loraplus', tree, layout, is_embedding)
    if not split_no_decay:
      tree = jax.tree.map(lambda x: B if x == B_NO_DECAY else x, tree)
    return tree

  inner = optax.partition(transforms, labels)
  # The state init() gives each structure of updates, by its shapes: kept
  # so that an eager loop traces init once, not at every step.
  expected_states = {}

  def expected_state(updates):
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    key = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in expected_states:
      if len(expected_states) >= 8:
        expected_states.clear()
      expected_states[key] = jax.eval_shape(inner.init, updates)
    return expected_states[key]

  def update_fn(updates, state, params=None, **extra_args):
    # optax.partition had failed on another optimizer's state with an
    # AttributeError ('tuple' object has no attribute 'inner_states').
    checks.state_of('loraplus', state, optax.PartitionState)
    if base is None:  # a base of the user's may need none
      pairs_lib.refuse_no_params('loraplus', params)
    # Wrong gradients had been blamed on the state.
    pairs_lib.check_updates_fit('loraplus', updates, params)
    # Shapes only, at trace time: optax's Adam had failed on a state made
    # for other params in a broadcast that names no leaf.
    checks.state_fits('loraplus', state, expected_state(updates))
    return inner.update(updates, state, params, **extra_args)

  def init_fn(params):
    state = inner.init(params)  # the factors' errors first, naming them
    # The leaves beside the pairs too: an integer one had been stepped by 0.
    pairs_lib.check_trainable('loraplus', params)
    return state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

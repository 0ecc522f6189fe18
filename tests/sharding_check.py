"""LoRA-RITE under SPMD on 8 fake CPU devices; run by tests/test_sharding.py.

A separate process because XLA_FLAGS must be set before jax is imported.
The donated step must also leave no factor shard to copy, with balance_factors
on too.
Each check raises AssertionError with a message; success prints 'ok <name>'.
"""

from __future__ import annotations

import os
import re
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_rite_optax as lro
from lora_rite_optax import placement
from tests.test_donation import factor_copies

RANK = 8
# Explicit mesh axes need jax 0.10 for LoRA-RITE, ScaledAdam and Shampoo
# (refused before: placement.require_explicit_api); donating_jit's copy-free
# pairing on a mesh holds from jax 0.7. `make test-oldest` runs this on 0.6.
JAX_AT_LEAST_0_10 = (placement._jax_version() >=  # pylint: disable=protected-access
                     placement._EXPLICIT_AXES_JAX)  # pylint: disable=protected-access


def make_params(seed=0):
  """Pairs shaped like a transformer's: plain, einsum (r, N, H), and wide."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
  return {
      'q': {'lora_a': f(256, RANK), 'lora_b': f(RANK, 16, 32) * 0.1},
      'o': {'lora_a': f(16, 32, RANK), 'lora_b': f(RANK, 256) * 0.1},
      'up': {'lora_a': f(256, RANK), 'lora_b': f(RANK, 1024) * 0.1},
      'down': {'lora_a': f(1024, RANK), 'lora_b': jnp.zeros((RANK, 256))},
  }


def param_specs(long_axis):
  """Every factor sharded along its long (N) axis; the rank never split."""
  return {
      'q': {'lora_a': P(long_axis, None), 'lora_b': P(None, long_axis, None)},
      'o': {'lora_a': P(long_axis, None, None), 'lora_b': P(None, long_axis)},
      'up': {'lora_a': P(long_axis, None), 'lora_b': P(None, long_axis)},
      'down': {'lora_a': P(long_axis, None), 'lora_b': P(None, long_axis)},
  }


def grads_for(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-2, x.dtype), params)


def derived_state_shardings(tx, params, shardings, non_params):
  """The state's shardings as a trainer derives them before allocating
  anything: the params' for param-shaped leaves, ``non_params(subtree)``
  for the rest."""
  return optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
      shardings, transform_non_params=non_params)


def train_step(tx):
  """``(params, state, grads) -> (params, state)``: one update applied."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def factor_sized_gathers(hlo: str) -> list[str]:
  """All-gathers in compiled HLO with an axis longer than the rank."""
  found = []
  for line in hlo.splitlines():
    if 'all-gather' in line and '=' in line:
      result = line.split('=', 1)[1]
      for shape in re.findall(r'\[([\d,]*)\]', result.split('all-gather')[0]):
        dims = [int(d) for d in shape.split(',') if d]
        if dims and max(dims) > RANK:
          found.append(line.strip()[:200])
          break
  return found


def detector_catches_householder_qr():
  """Control: a Householder QR of a row-sharded factor does gather it."""
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.device_put(jnp.ones((256, RANK)), NamedSharding(mesh, P('data')))
  hlo = jax.jit(lambda x: jnp.linalg.qr(x)[1]).lower(x).compile().as_text()
  assert factor_sized_gathers(hlo), 'the all-gather detector missed a QR'


def assert_placed(params, param_shardings, state, state_shardings, what):
  """Every param and state leaf is sharded as given (state_shardings: one
  per state leaf, in order); ``what`` heads a state mismatch."""
  for got, want in zip(jax.tree.leaves(state), state_shardings):
    assert got.sharding.is_equivalent_to(want, got.ndim), (
        f'{what}: {got.sharding} vs {want}')
  for got, want in zip(jax.tree.leaves(params),
                       jax.tree.leaves(param_shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim)


def run(mesh_shape, axis_names, long_axis, steps=4):
  mesh = jax.make_mesh(mesh_shape, axis_names,
                       axis_types=(jax.sharding.AxisType.Auto,) *
                       len(axis_names))
  tx = lro.lora_rite(1e-2, escape_mass=True, update_capping=0.5,
                     balance_factors=True)
  params = make_params()
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s),
                           param_specs(long_axis))
  replicated = NamedSharding(mesh, P())
  state_shardings = derived_state_shardings(tx, params, shardings,
                                            lambda _: replicated)
  sharded_params = jax.device_put(params, shardings)
  state = jax.jit(tx.init, out_shardings=state_shardings)(sharded_params)
  step = train_step(tx)

  # As a trainer jits it: donating, with the state's shardings pinned.
  jitted = lro.donating_jit(step, donate_argnums=(0, 1),
                            out_shardings=(shardings, state_shardings))
  grads0 = jax.device_put(grads_for(params, 1), shardings)
  hlo = jitted.lower(sharded_params, state, grads0).compile().as_text()

  # Only r x r quantities may cross devices; the reductions are all-reduces.
  gathers = factor_sized_gathers(hlo)
  assert not gathers, f'factor-sized all-gather in compiled update: {gathers[0]}'
  assert 'all-reduce' in hlo, 'expected r x r all-reduces of Gram matrices'
  # donating_jit pairs buffers by global shape and dtype, as jax.jit does;
  # on a mesh the params and the basis share a sharding, so the swap it
  # makes still leaves no factor shard to copy (jax.jit's pairing does).
  shards = [jax.ShapeDtypeStruct(s.shard_shape(x.shape), x.dtype)
            for s, x in zip(jax.tree.leaves(shardings),
                            jax.tree.leaves(params))]
  in_order = jax.jit(step, donate_argnums=(0, 1),
                     out_shardings=(shardings, state_shardings))
  assert factor_copies(
      in_order.lower(sharded_params, state, grads0).compile().as_text(),
      shards), 'control: jax.jit pairing should copy factor shards'
  if placement._jax_version() >= (0, 7):  # pylint: disable=protected-access
    # jax 0.6 still copies a factor shard per pair (0.7-0.9 do not).
    assert not factor_copies(hlo, shards), factor_copies(hlo, shards)[:2]

  unsharded = jax.jit(step)
  ref_params, ref_state = params, tx.init(params)
  for i in range(steps):
    grads = grads_for(params, i + 1)
    sharded_params, state = jitted(sharded_params, state,
                                   jax.device_put(grads, shardings))
    ref_params, ref_state = unsharded(ref_params, ref_state, grads)
    # The state keeps its sharding through update.
    # tree_map_params gives one sharding for each per-pair dict of r x r
    # statistics; broadcast it so that leaves line up.
    flat_shardings = jax.tree.leaves(jax.tree.map(
        lambda s, x: jax.tree.map(lambda _: s, x), state_shardings, state,
        is_leaf=lambda s: isinstance(s, NamedSharding)))
    assert_placed(sharded_params, shardings, state, flat_shardings,
                  'state sharding changed')
  # Unpinned (plain jax.jit, no out_shardings): the update itself keeps the
  # state's sharding, the outputs' shardings left to XLA's propagation from
  # the inputs (the pinned step above would hold them whatever it did).
  free_params, free_state = jax.jit(step)(
      jax.device_put(params, shardings),
      jax.jit(tx.init, out_shardings=state_shardings)(
          jax.device_put(params, shardings)), grads0)
  assert_placed(free_params, shardings, free_state, flat_shardings,
                'unpinned update changed a state sharding')
  # N x r state parts are sharded like the params, r x r parts replicated.
  rite = state[0]
  like = lambda x, spec: x.sharding.is_equivalent_to(
      NamedSharding(mesh, spec), x.ndim)
  assert like(rite.mu['up']['lora_b'], P(None, long_axis))
  assert like(rite.basis['o']['lora_a'], P(long_axis, None, None))
  assert not rite.mu['up']['lora_b'].sharding.is_fully_replicated
  assert rite.nu and all(v.sharding.is_fully_replicated
                         for v in rite.nu.values())
  for got, want in zip(jax.tree.leaves(sharded_params),
                       jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4,
                               atol=2e-6, err_msg='sharded != unsharded')


def init_places_the_state_like_the_params():
  """An eager ``tx.init`` on sharded params: factor-shaped state sharded as
  its param, the small statistics and the counts replicated on the mesh, as
  optax.adam's init places its moments (they had all landed on device 0)."""
  axis_types = (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit)
  for axis_type in axis_types if JAX_AT_LEAST_0_10 else axis_types[:1]:
    mesh = jax.make_mesh((4, 2), ('fsdp', 'tensor'), axis_types=(axis_type,) * 2)
    explicit = axis_type == jax.sharding.AxisType.Explicit
    specs = param_specs(('fsdp', 'tensor'))
    params = jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
        make_params(), specs)
    shapes = {x.shape: x.sharding for x in jax.tree.leaves(params)}
    # 2-D factors: jax itself rewrites a 3-D factor's spec (None, 'x', None)
    # as (None, 'x') in a step's outputs, params and optax.adam's state too.
    plain = {k: v for k, v in params.items() if k in ('up', 'down')}
    for name in lro.OPTIMIZER_NAMES:
      if explicit and name == 'shampoo':
        continue  # refused there (explicit_axes_work_or_are_refused_...)
      for lr in (1e-2, optax.linear_schedule(0.0, 1e-2, 10)):
        tx = lro.optimizer(name, lr)
        state = tx.init(plain if explicit else params)
        for path, x in jax.tree_util.tree_leaves_with_path(state):
          where = f'{name} {jax.tree_util.keystr(path)}'
          assert isinstance(x.sharding, NamedSharding), (where, x.sharding)
          want = shapes.get(x.shape, NamedSharding(mesh, P()))
          assert x.sharding.is_equivalent_to(want, x.ndim), (where,
                                                             x.sharding)
        if name == 'shampoo':
          continue  # Shampoo's blocks: XLA shards them at the first update
        # So a jitted training step compiles once: the counts (the
        # optimizer's and a schedule's) had been uncommitted on device 0,
        # and on Explicit axes the r x r statistics spelt P() where the step
        # writes P(None, None, ...): the second call compiled again.

        @jax.jit
        def step(p, s, tx=tx):
          loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))
          updates, s = tx.update(jax.grad(loss)(p), s, p)
          return optax.apply_updates(p, updates), s

        p = plain
        s = tx.init(p)
        for _ in range(3):
          p, s = step(p, s)
        assert step._cache_size() == 1, (axis_type, name, lr,  # pylint: disable=protected-access
                                         step._cache_size())  # pylint: disable=protected-access
  # Params committed to one device (not the default): the state beside them.
  device = jax.devices()[3]
  params = jax.device_put(make_params(), device)
  for name in lro.OPTIMIZER_NAMES:
    state = lro.optimizer(name, 1e-2).init(params)
    for path, x in jax.tree_util.tree_leaves_with_path(state):
      assert x.devices() == {device}, (name, jax.tree_util.keystr(path),
                                       x.devices())


def stacked_layers_split_along_layers_compile_once():
  """Stacked layers whose layer axis is split over the mesh: the update
  splits the r x r statistics along the layers too, so init puts them
  there (replicated, the first update moved them and the second call
  compiled again); results as unsharded."""
  mesh = jax.make_mesh((4, 2), ('fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  plain = {k: {'lora_a': jnp.asarray(rng.normal(size=(8, 64, 4)), jnp.float32),
               'lora_b': jnp.asarray(rng.normal(size=(8, 4, 32)), jnp.float32)}
           for k in ('q', 'v')}
  # Two stacked axes (scanned(2)): the first split, merged with the second.
  two_axes = jax.tree.map(lambda x: x.reshape((4, 2) + x.shape[1:]), plain)
  for spec, layers, stacked, escape in (
      (P('fsdp', None, None), plain, 1, False),
      (P(('fsdp', 'tensor'), None, None), plain, 1, False),
      (P('fsdp', None, None), plain, 1, True),  # its escaped mass split too
      (P('fsdp'), two_axes, 2, False)):
    plain_layers = layers
    placed = jax.device_put(layers, NamedSharding(mesh, spec))
    tx = lro.lora_rite(1e-2, layout=lro.NNX_LAYOUT.scanned(stacked),
                       escape_mass=escape)

    @jax.jit
    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    p, s = placed, tx.init(placed)
    want, want_state = plain_layers, tx.init(plain_layers)
    for i in range(3):
      grads = grads_for(plain_layers, i)
      p, s = step(p, s, jax.device_put(grads, NamedSharding(mesh, spec)))
      u, want_state = tx.update(grads, want_state, want)
      want = optax.apply_updates(want, u)
    assert step._cache_size() == 1, (spec, step._cache_size())  # pylint: disable=protected-access
    for g, w in zip(jax.tree.leaves(p), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)


def explicit_axes_work_or_are_refused_in_one_line():
  """jax.make_mesh's default axes in jax 0.10: LoRA-RITE's and ScaledAdam's
  Grams name their output's sharding, so factors train (as unsharded):
  2-D, n-D and stacked ones (LoRA-RITE's r x r algebra replicated; each
  view as matrices names its sharding). Each compiles once and gathers no factor. What does not work yet
  is one line (it had been a ShardingTypeError from inside)."""
  mesh = jax.make_mesh((4, 2), ('fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  full = make_params()
  full_specs = param_specs(('fsdp', 'tensor'))
  plain = {k: v for k, v in full.items() if k in ('up', 'down')}
  specs = {k: v for k, v in full_specs.items() if k in plain}
  placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                        plain, specs)
  scanned = lro.NNX_LAYOUT.scanned(1)
  stacked_plain = {'q': {
      'lora_a': jax.random.normal(jax.random.key(1), (2, 64, 4)),
      'lora_b': jax.random.normal(jax.random.key(2), (2, 4, 32))}}
  stacked_spec = P('tensor', 'fsdp')
  stacked_grads = lambda step: jax.tree.map(lambda x: jnp.cos(x * (step + 1)),
                                            stacked_plain)
  # Layers over one mesh axis, the long axis over the other (and the rank
  # axis never split), spelt in full as a step writes them: a short spec
  # is another jit cache key, for optax.adam too.
  stacked_specs = {'q': {'lora_a': P('tensor', 'fsdp', None),
                         'lora_b': P('tensor', None, 'fsdp')}}
  # ScaledAdam's Adam divides by the root of a small second moment, which
  # magnifies the Grams' float32 reduction-order noise: a wider atol.
  cases = (
      # n-D factors (heads x head_dim), split along their first long axis.
      (lro.lora_rite(1e-2, escape_mass=True, update_capping=0.5), full,
       full_specs, lambda s: grads_for(full, s), 2e-6, True),
      (lro.lora_rite(1e-2, layout=scanned, escape_mass=True), stacked_plain,
       stacked_specs, stacked_grads, 2e-6, True),
      # Split along the layers only (the Grams, asked for whole, had made
      # XLA gather the factors), and the two factors' layers split apart,
      # balanced (lora_a's norms had moved their sharding onto lora_b).
      (lro.lora_rite(1e-2, layout=scanned), stacked_plain,
       {'q': {'lora_a': P('tensor', None, None),
              'lora_b': P('tensor', None, None)}}, stacked_grads, 2e-6, True),
      (lro.lora_rite(1e-2, layout=scanned, balance_factors=True),
       stacked_plain, {'q': {'lora_a': P('tensor', 'fsdp', None),
                             'lora_b': P(None, None, 'fsdp')}},
       stacked_grads, 2e-6, True),
      (lro.scaled_adam(1e-2), full, full_specs, lambda s: grads_for(full, s),
       1e-5, True),
      # Layers sharded over one axis, rows over the other (a short spec,
      # respelt in the step's outputs: a second compile, not checked).
      (lro.scaled_adam(1e-2, layout=scanned), stacked_plain,
       jax.tree.map(lambda _: stacked_spec, stacked_plain), stacked_grads,
       1e-5, False))
  for tx, plain_params, param_specs_, grads_at, atol, spelt_in_full in cases:
    want_state = tx.init(plain_params)
    want = plain_params
    for step in range(3):
      u, want_state = tx.update(grads_at(step), want_state, want)
      want = optax.apply_updates(want, u)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs_)
    params = jax.device_put(plain_params, shardings)
    # Inside jax.set_mesh and without it (a bare spec had needed the former).
    for in_mesh in (True, False):
      # A function of its own: jits of one function share a cache.
      update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
      got, got_state = params, tx.init(params)
      for step in range(3):
        grads = jax.device_put(grads_at(step), shardings)
        if in_mesh:
          with jax.set_mesh(mesh):
            u, got_state = update(grads, got_state, got)
        else:
          u, got_state = update(grads, got_state, got)
        got = optax.apply_updates(got, u)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=atol)
      for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        assert g.sharding.is_equivalent_to(p.sharding, g.ndim), (
            g.sharding, p.sharding)
      if not spelt_in_full:
        continue
      assert update._cache_size() == 1, update._cache_size()  # pylint: disable=protected-access
      # Only r x r quantities cross devices (all-gathers of replicated
      # Grams along the layers), never a factor.
      hlo = update.lower(grads, got_state, got).compile().as_text()
      gathers = factor_sized_gathers(hlo)
      assert not gathers, gathers[0]
  rank_in_middle = jax.device_put(
      {'q': {'lora_a': jnp.ones((4, 8, 16)), 'lora_b': jnp.ones((4, 8, 16))}},
      NamedSharding(mesh, P(None, None, 'fsdp')))
  inner_split = jax.device_put(
      {'o': full['o']}, {'o': {'lora_a': NamedSharding(mesh, P(None, 'tensor')),
                               'lora_b': NamedSharding(mesh, P())}})
  rank_split = jax.device_put(
      {'q': {'lora_a': jnp.ones((64, 8)), 'lora_b': jnp.ones((8, 32))}},
      {'q': {'lora_a': NamedSharding(mesh, P(None, 'fsdp')),
             'lora_b': NamedSharding(mesh, P('fsdp', None))}})
  split_apart = jax.device_put(
      jax.tree.map(lambda x: jnp.concatenate([x, x]), stacked_plain),
      {'q': {'lora_a': NamedSharding(mesh, P('tensor')),
             'lora_b': NamedSharding(mesh, P('fsdp'))}})
  for tx, params, message in (
      # A ShardingTypeError from inside its batched product, before.
      (lro.scaled_adam(1e-2, layout=scanned), split_apart,
       "scaled_adam: pair 'q' splits the stacked layers of lora_a and lora_b "
       'over different Explicit mesh axes'),
      # Two stacked axes, the second split: jax refuses merging them.
      (lro.scaled_adam(1e-2, layout=lro.NNX_LAYOUT.scanned(2)),
       jax.device_put(
           jax.tree.map(lambda x: jnp.stack([x, x]), stacked_plain),
           NamedSharding(mesh, P(None, 'tensor'))),
       "scaled_adam: pair 'q' splits the stacked layers of lora_a and lora_b "
       'over different Explicit mesh axes, or splits a stacked axis after '
       'the first'),
      # Its statistics had come back replicated (a second compile), and
      # MultiSteps failed inside jax on the branches' shardings.
      (optax.MultiSteps(lro.lora_rite(1e-2), 2), rank_split,
       'lora_rite: factors whose rank axis is sharded over Explicit '
       'mesh axes are not supported'),
      # Its view as one matrix would merge a split axis into the one
      # before it.
      (lro.lora_rite(1e-2), inner_split,
       "lora_rite: o/lora_a (16, 32, 8), split as P(None, "
       "'tensor', None): its view as matrices would merge an axis split "
       "over 'tensor' into the axis before it; put those mesh axes on the "
       'first of the merged axes, or make the mesh with Auto axes.'),
      # The rank axis in the middle: named in the factor's own shape (not
      # that of its view, the rank axis moved last).
      (lro.lora_rite(1e-2, layout=lro.LoraLayout(a_rank_axis=1,
                                                 b_rank_axis=1)),
       rank_in_middle, "lora_rite: q/lora_a (4, 8, 16), split as "
       "P(None, None, 'fsdp'): its view as matrices would merge "
       "an axis split over 'fsdp' into the axis before it"),
      (lro.scaled_adam(1e-2), inner_split, "scaled_adam: o/lora_a "
       "(16, 32, 8), split as P(None, 'tensor', None): its view "
       "as matrices would merge an axis split over 'tensor' into the axis "
       'before it'),
      # In init, before a trainer allocates the state.
      (lro.shampoo(1e-2), placed, 'shampoo: params sharded over Explicit '
       'mesh axes are not supported')):
    try:
      with jax.set_mesh(mesh):
        jax.jit(tx.update)(params, tx.init(params), params)
    except ValueError as e:
      assert str(e).startswith(message), str(e)
    else:
      raise AssertionError(f'not refused: {message}')


def explicit_axes_take_derived_shardings_and_donation():
  """A trainer on an Explicit mesh: state shardings derived before anything
  is allocated, a donated step pinned to them (lro.donating_jit's
  out_shardings had been refused there: with_sharding_constraint takes
  only Auto axes, and reshard only Explicit ones, where a mesh mixes
  both), one compile, results as unsharded."""
  explicit, auto = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
  # On the mixed mesh, outputs placed over its Auto axis come back spelt
  # without trailing Nones (with_sharding_constraint's result), another
  # jit cache key: a second compile there, which jax.jit's own
  # out_shardings avoid.
  for types, long_axis, compiles in (
      ((explicit, explicit), ('fsdp', 'tensor'), 1),
      ((explicit, auto), 'fsdp', 1), ((explicit, auto), 'tensor', 2)):
    _derived_shardings_and_donation(
        jax.make_mesh((4, 2), ('fsdp', 'tensor'), axis_types=types),
        long_axis, compiles)
  # An Auto axis before an Explicit one in one entry: placed in two steps,
  # the devices had come out in another order than asked, silently.
  mixed = jax.make_mesh((4, 2), ('fsdp', 'tensor'), axis_types=(explicit, auto))
  x = jax.device_put(jnp.zeros((8, 8)), NamedSharding(mixed, P('fsdp', None)))
  try:
    lro.donating_jit(lambda a: a + 1, donate_argnums=(0,), out_shardings=(
        NamedSharding(mixed, P(('tensor', 'fsdp'), None))))(x)
  except ValueError as e:
    assert str(e) == (
        "donating_jit: out_shardings entry ('tensor', 'fsdp') names an Auto "
        'mesh axis before an Explicit one, which cannot be placed here; name '
        'the Explicit axes first, or use jax.jit.'), str(e)
  else:
    raise AssertionError('an Auto axis before an Explicit one was placed')
  # init traced (jax.eval_shape, jax.jit(tx.init)) keeps the factor-shaped
  # state's Explicit sharding, as optax.adam's does: it had come out
  # replicated (each device holding every moment whole), and the step fed
  # it compiled again.
  mesh = jax.make_mesh((4, 2), ('fsdp', 'tensor'),
                       axis_types=(explicit, explicit))
  specs = {'q': {'lora_a': P('tensor', 'fsdp', None),
                 'lora_b': P('tensor', None, 'fsdp')}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  stacked = {'q': {'lora_a': jnp.ones((2, 64, 4)),
                   'lora_b': jnp.full((2, 4, 32), 0.1)}}
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      stacked, shardings)
  scanned = lro.NNX_LAYOUT.scanned(1)
  for tx in (lro.lora_rite(1e-2, layout=scanned),
             lro.scaled_adam(1e-2, layout=scanned)):
    with jax.set_mesh(mesh):
      shapes = jax.eval_shape(tx.init, abstract)
    factor_like = [x for x in jax.tree.leaves(shapes)
                   if x.shape in ((2, 64, 4), (2, 4, 32))]
    assert len(factor_like) >= 4, factor_like
    for x in factor_like:
      want = specs['q']['lora_a' if x.shape == (2, 64, 4) else 'lora_b']
      assert x.sharding.spec == want, (x.sharding.spec, want)
    params = jax.device_put(stacked, shardings)
    with jax.set_mesh(mesh):
      state = jax.jit(tx.init)(params)
      step = jax.jit(lambda p, s, tx=tx: tx.update(
          jax.tree.map(jnp.cos, p), s, p))
      for _ in range(3):
        _, state = step(params, state)
    assert step._cache_size() == 1, step._cache_size()  # pylint: disable=protected-access
  # A zero-size factor's view: nothing to place (its size matching had run
  # off the shape).
  zero = jax.device_put(jnp.zeros((0, 8)), NamedSharding(mixed, P(None, 'fsdp')))
  assert placement.reshape_sharding(zero, (8, 0)).spec == P(None, None)


def _derived_shardings_and_donation(mesh, long_axis, compiles):
  tx = lro.lora_rite(1e-2, escape_mass=True)
  params = make_params()
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s),
                           param_specs(long_axis))
  # Replicated spelt as a step writes it on Explicit axes: one None an axis.
  replicated = lambda x: NamedSharding(mesh, P(*(None,) * x.ndim))
  state_shardings = derived_state_shardings(
      tx, params, shardings, lambda x: jax.tree.map(replicated, x))
  placed = jax.device_put(params, shardings)
  state = jax.jit(tx.init, out_shardings=state_shardings)(placed)
  step = train_step(tx)

  jitted = lro.donating_jit(step, donate_argnums=(0, 1),
                            out_shardings=(shardings, state_shardings))
  want, want_state = params, tx.init(params)
  for i in range(3):
    grads = grads_for(params, i + 1)
    placed, state = jitted(placed, state, jax.device_put(grads, shardings))
    want, want_state = step(want, want_state, grads)
  assert jitted._cache_size() == compiles, jitted._cache_size()  # pylint: disable=protected-access
  for got, w, s in zip(jax.tree.leaves(placed), jax.tree.leaves(want),
                       jax.tree.leaves(shardings)):
    assert got.sharding.is_equivalent_to(s, got.ndim), (got.sharding, s)
    np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-6)


def explicit_axes_before_jax_0_10():
  """On an older jax, LoRA-RITE, ScaledAdam and Shampoo refuse Explicit mesh
  axes in one line, in init and in a jitted update (jax 0.6 has no
  jax.sharding.reshard; 0.7-0.9 failed inside LoRA-RITE's update on an
  AbstractMesh); Adam, LoRA+ and Lamb, which need none of it, train there
  as unsharded."""
  mesh = jax.make_mesh((4, 2), ('fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  plain = make_params()['up']
  placed = jax.device_put(plain, NamedSharding(mesh, P('fsdp', None)))
  for name in lro.OPTIMIZER_NAMES:
    tx = lro.optimizer(name, 1e-2)
    if name in ('adam', 'loraplus', 'lamb'):
      got, _ = jax.jit(tx.update)(placed, tx.init(placed), placed)
      want, _ = tx.update(plain, tx.init(plain), plain)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
      continue
    want = (f'{name}: params on Explicit mesh axes need jax 0.10 or newer '
            f'(this is jax {jax.__version__}); make the mesh with Auto axes '
            '(axis_types=(jax.sharding.AxisType.Auto,) * n), or upgrade jax.')
    if name == 'shampoo':  # refused on every jax
      update_error = ('shampoo: gradients sharded over Explicit mesh axes '
                      'are not supported')
    else:
      update_error = want
    for call, error in (
        (lambda tx=tx: tx.init(placed), want),
        (lambda tx=tx: jax.jit(tx.update)(placed, tx.init(plain), placed),
         update_error)):
      try:
        call()
      except ValueError as e:
        assert str(e).startswith(error), (name, str(e))
      else:
        raise AssertionError(f'{name}: an Explicit mesh was not refused')


def main():
  assert len(jax.devices()) == 8, jax.devices()
  detector_catches_householder_qr()
  print('ok detector', flush=True)
  init_places_the_state_like_the_params()
  print('ok init placed', flush=True)
  stacked_layers_split_along_layers_compile_once()
  print('ok stacked layers', flush=True)
  if JAX_AT_LEAST_0_10:
    explicit_axes_work_or_are_refused_in_one_line()
    print('ok explicit axes', flush=True)
    explicit_axes_take_derived_shardings_and_donation()
    print('ok explicit donated', flush=True)
  else:
    explicit_axes_before_jax_0_10()
    print(f'ok explicit axes: refused by LoRA-RITE, ScaledAdam and Shampoo '
          f'on jax {jax.__version__}', flush=True)
    print('ok explicit donated: not on this jax', flush=True)
  run((8,), ('data',), 'data')
  print('ok data=8', flush=True)
  run((4, 2), ('fsdp', 'tensor'), ('fsdp', 'tensor'))
  print('ok fsdp=4 x tensor=2', flush=True)


if __name__ == '__main__':
  sys.exit(main())

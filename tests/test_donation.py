"""lro.donating_jit: same results as jax.jit, without XLA copying the factors.

The buffer plan is checked by hand on stand-in values; the copies are read
from the compiled HLO of a LoRA-RITE step, with plain jax.jit as the control
that shows the detector fires.
"""

import re
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_rite_optax as lro
from lora_rite_optax import donation

SHAPES = {'q': (64, 48), 'up': (64, 160), 'down': (160, 64)}
RANK = 4


def lora_params(seed=0):
  key = jax.random.key(seed)
  tree = {}
  for name, (d_in, d_out) in SHAPES.items():
    key, ka, kb = jax.random.split(key, 3)
    tree[name] = {'lora_a': jax.random.normal(ka, (d_in, RANK)) / d_in**0.5,
                  'lora_b': jax.random.normal(kb, (RANK, d_out)) * 0.1}
  return tree


def grads_for(params, seed):
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(seed), x.shape) * 1e-2,
      params)


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def factor_copies(hlo: str, params, inputs_only=False) -> list[str]:
  """Compiled-HLO copies of arrays shaped like a factor; with
  ``inputs_only``, only copies of a step input (or of such a copy), which
  leaves out layout copies of computed values."""
  shapes = {','.join(map(str, x.shape)) for x in jax.tree.leaves(params)}
  entry = hlo[hlo.index('\nENTRY'):]  # not the fused computations' params
  inputs = set(re.findall(r'%(\S+) = \S+ parameter\(', entry))
  copies = {}
  for line in entry.splitlines():
    m = re.search(r'%(\S+) = f32\[([\d,]+)\]\S* copy\(%([^),]+)\)', line)
    if m and m.group(2) in shapes:
      copies[m.group(1)] = (m.group(3), line.strip())
  return [line for src, line in copies.values()
          if not inputs_only or src in inputs or src in copies]


def sds(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_plan_gives_a_returned_input_its_own_buffer():
  p, b, m = sds((8, 2)), sds((8, 2)), sds((8, 2))
  new_p, new_m = sds((8, 2)), sds((8, 2))
  # Outputs (new_p, b' = p, new_m); jax pairs the e-th emitted output of a
  # shape with the e-th donated input of it: p, b, m.
  order = donation._plan([p, b, m], [new_p, p, new_m])
  assert order == [1, 0, 2]  # p's buffer to b' (= p), b's to new_p


def test_plan_keeps_order_without_returned_inputs_and_across_shapes():
  a, b = sds((8, 2)), sds((2, 8))
  outs = [sds((8, 2)), sds((2, 8)), sds(()), sds((8, 2))]
  assert donation._plan([a, b], outs) == [0, 1, 2, 3]
  # A returned input of another shape moves only among its shape's outputs.
  outs = [sds((8, 2)), sds((2, 8)), a]
  assert donation._plan([a, b], outs) == [2, 1, 0]


def test_plan_gives_an_input_returned_twice_to_one_output():
  p, b = sds((8, 2)), sds((8, 2))
  new = sds((8, 2))
  order = donation._plan([p, b], [new, p, p])
  assert order == [1, 0, 2]  # the second p gets no buffer (XLA copies it)


def test_lora_rite_step_same_results_and_no_factor_copies():
  tx = lro.lora_rite(1e-2)
  params = lora_params()
  step = make_step(tx)
  plain = jax.jit(step, donate_argnums=(0, 1))
  fast = lro.donating_jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  grads = grads_for(params, 1)

  plain_compiled = plain.lower(params, state, grads).compile()
  fast_compiled = fast.lower(params, state, grads).compile()
  # Control: jax.jit's in-order pairing does make XLA copy the factors.
  assert factor_copies(plain_compiled.as_text(), params)
  assert not factor_copies(fast_compiled.as_text(), params), (
      factor_copies(fast_compiled.as_text(), params)[:3])
  # The compiled step answers memory_analysis like jax's own, and the
  # copies it saves show as scratch memory it no longer needs.
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(fast_compiled) < temp(plain_compiled)
  assert fast_compiled.cost_analysis()['flops'] > 0

  copy = lambda t: jax.tree.map(jnp.copy, t)
  a = (copy(params), tx.init(params))
  b = (copy(params), tx.init(params))
  c = (copy(params), tx.init(params))
  for i in range(3):
    grads = grads_for(params, i + 1)
    donated = jax.tree.leaves(b[0])[0]
    a = plain(*a, grads)
    b = fast(*b, grads)
    c = fast_compiled(*c, grads)
    assert donated.is_deleted()  # donation still happens
  for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                     jax.tree.leaves(c)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
  # The returned structure is the step's: the new basis is the old params.
  assert jax.tree.structure(b) == jax.tree.structure(a)


def test_adam_step_unchanged():
  tx = optax.adam(1e-2)
  params = lora_params()
  step = make_step(tx)
  fast = lro.donating_jit(step, donate_argnums=(0, 1))
  grads = grads_for(params, 1)
  hlo = fast.lower(params, tx.init(params), grads).compile().as_text()
  assert not factor_copies(hlo, params)
  want = jax.jit(step)(params, tx.init(params), grads)
  got = fast(jax.tree.map(jnp.copy, params), tx.init(params), grads)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_out_shardings_prefix_and_unsupported_arguments():
  tx = lro.lora_rite(1e-2)
  params = lora_params()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  fast = lro.donating_jit(make_step(tx), donate_argnums=(1, 0),
                          out_shardings=(device, None))
  new_params, state = fast(params, tx.init(params), grads_for(params, 1))
  assert all(x.sharding == device for x in jax.tree.leaves(new_params))
  assert state[0].count == 1
  with pytest.raises(TypeError, match='static_argnums is not supported'):
    lro.donating_jit(make_step(tx), donate_argnums=0, static_argnums=2)
  with pytest.raises(TypeError, match='^donating_jit: fun must be callable, '
                     'got int.$'):
    lro.donating_jit(3, donate_argnums=0)
  step = lro.donating_jit(make_step(tx), donate_argnums=(0, 1))
  with pytest.raises(TypeError, match=r'positional arguments only; got '
                     r'keyword\(s\) grads'):
    step(params, tx.init(params), grads=grads_for(params, 1))
  with pytest.raises(TypeError, match=r'positional arguments only'):
    step.lower(params, tx.init(params), grads=grads_for(params, 1))
  with pytest.raises(TypeError, match=r'donate_argnums must be >= 0, got '
                     r'\(-1,\)'):
    lro.donating_jit(make_step(tx), donate_argnums=-1)
  # A string had failed comparing with ints, 'yes' as a KeyError at the
  # first call.
  with pytest.raises(TypeError, match=r"donate_argnums must be an int or a "
                     r"sequence of ints, got '0'\."):
    lro.donating_jit(make_step(tx), donate_argnums='0')
  with pytest.raises(TypeError, match=r"reorder_outputs must be True, False "
                     r"or None, got 'yes'\."):
    lro.donating_jit(make_step(tx), donate_argnums=0, reorder_outputs='yes')
  # numpy's integers, as jax.jit takes them.
  numpy_index = lro.donating_jit(make_step(tx), donate_argnums=np.int64(0))
  assert numpy_index(lora_params(), tx.init(params), grads_for(params, 1))[
      1][0].count == 1
  wide = lro.donating_jit(make_step(tx), donate_argnums=(0, 3))
  with pytest.raises(TypeError, match=r'donate_argnums=\(0, 3\), but the '
                     r'call has only 3 positional argument'):
    wide(params, tx.init(params), grads_for(params, 1))


def test_python_scalar_and_key_arguments():
  tx = lro.lora_rite(1e-2)
  params = lora_params()

  def step(params, state, grads, scale, key):
    grads = jax.tree.map(
        lambda g: g * scale + 0 * jax.random.uniform(key), grads)
    return make_step(tx)(params, state, grads), 0.0  # a constant output too

  fast = lro.donating_jit(step, donate_argnums=(0, 1))
  want = jax.jit(step)(params, tx.init(params), grads_for(params, 1), 2.0,
                       jax.random.key(0))
  got = fast(jax.tree.map(jnp.copy, params), tx.init(params),
             grads_for(params, 1), 2.0, jax.random.key(0))
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.skipif(jax.default_backend() != 'cpu',
                    reason='the default reorders on CPU only')
def test_reordering_is_for_cpu_unless_asked(monkeypatch):
  """By default the outputs are reordered on CPU only (on an H200 the
  reordered step was twice as slow as jax.jit's pairing); the argument
  overrides the platform either way, and results never change."""
  tx = lro.lora_rite(1e-2)
  params = lora_params()
  step = make_step(tx)
  grads = grads_for(params, 1)
  hlo = lambda f: f.lower(params, tx.init(params), grads).compile().as_text()
  fast = lro.donating_jit(step, donate_argnums=(0, 1))
  assert fast.reorders_outputs(params, tx.init(params), grads)
  assert not factor_copies(hlo(fast), params)
  # Asked not to reorder: jax.jit's in-order pairing, whose copies show.
  keep = lro.donating_jit(step, donate_argnums=(0, 1), reorder_outputs=False)
  assert not keep.reorders_outputs(params, tx.init(params), grads)
  assert factor_copies(hlo(keep), params)
  # ... exactly: the same input/output aliasing as jax.jit's own.
  alias = lambda text: re.search(r'input_output_alias=\{.*?\}\s', text)[0]
  plain = jax.jit(step, donate_argnums=(0, 1), keep_unused=True)
  assert alias(hlo(keep)) == alias(hlo(plain))
  want = jax.jit(step)(params, tx.init(params), grads)
  got = keep(jax.tree.map(jnp.copy, params), tx.init(params), grads)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # On another platform the default is jax.jit's pairing; True still reorders.
  monkeypatch.setattr(donation, '_platform', lambda args, kwargs: 'gpu')
  assert not fast.reorders_outputs(params, tx.init(params), grads)
  assert factor_copies(hlo(lro.donating_jit(step, donate_argnums=(0, 1))),
                       params)
  assert not factor_copies(
      hlo(lro.donating_jit(step, donate_argnums=(0, 1), reorder_outputs=True)),
      params)
  got = lro.donating_jit(step, donate_argnums=(0, 1))(
      jax.tree.map(jnp.copy, params), tx.init(params), grads)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _Device:
  def __init__(self, platform):
    self.platform = platform


class _Sharding:
  def __init__(self, platform):
    self.device_set = {_Device(platform)}


class _Array:
  """Stands for an array on another platform (the CPU test box has none)."""

  def __init__(self, platform, committed=True):
    self.sharding = _Sharding(platform)
    self.committed = committed


def test_platform_is_where_jit_places_the_call(monkeypatch):
  """Committed arrays decide; then in_shardings or out_shardings; then
  jax_default_device; then the default backend (uncommitted arrays, NumPy,
  scalars, tracers, abstract shardings)."""
  default = jax.default_backend()
  gpu = _Array('gpu')
  assert donation._platform((np.ones(3), jnp.ones(3), 2.0, gpu), {}) == 'gpu'
  on_cpu = jax.device_put(jnp.ones(3), jax.devices('cpu')[0])
  assert on_cpu.committed
  assert donation._platform((on_cpu, gpu), {}) == 'cpu'
  assert donation._platform((_Array('gpu', committed=False),), {}) == default
  assert donation._platform((np.ones(3),),
                            {'in_shardings': _Sharding('tpu')}) == 'tpu'
  assert donation._platform((np.ones(3),), {
      'in_shardings': (None, jax.sharding.PartitionSpec()),
      'out_shardings': _Sharding('tpu')}) == 'tpu'
  assert donation._platform((np.ones(3),), {'in_shardings': None}) == default
  # Only shardings count there: strings (axis names) are not platforms.
  assert donation._platform((np.ones(3),), {'in_shardings': ('data',)}
                            ) == default
  mesh = jax.sharding.AbstractMesh((2,), ('x',))
  abstract = jax.ShapeDtypeStruct(
      (4,), jnp.float32,
      sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  assert donation._platform((abstract,),
                            {'in_shardings': abstract.sharding}) == default
  seen = []
  jax.jit(lambda x: seen.append(donation._platform((x,), {})) or x)(on_cpu)
  assert seen == [default]
  with jax.default_device(jax.devices('cpu')[0]):
    assert donation._default_device() == jax.devices('cpu')[0]
  monkeypatch.setattr(donation, '_default_device', lambda: _Device('tpu'))
  assert donation._platform((np.ones(3),), {}) == 'tpu'
  monkeypatch.setattr(donation, '_default_device', lambda: 'gpu')
  assert donation._platform((np.ones(3),), {}) == 'gpu'
  assert donation._platform((on_cpu,), {}) == 'cpu'


def test_out_shardings_decide_where_no_argument_is_committed(monkeypatch):
  """donating_jit hands its out_shardings to the platform choice."""
  seen = []
  real = donation._platform

  def spy(args, kwargs):
    seen.append(kwargs.get('out_shardings'))
    return real(args, kwargs)

  monkeypatch.setattr(donation, '_platform', spy)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  step = lro.donating_jit(lambda x: x + 1, donate_argnums=0,
                          out_shardings=device)
  np.testing.assert_array_equal(step(np.ones(3, np.float32)), 2.0)
  assert seen == [device]


def test_a_retrace_under_a_mesh_keeps_the_first_traces_outputs_in_place():
  """jax.jit retraces a signature under a mesh: the second trace's output
  order had replaced the first's, and a later call without the mesh, which
  runs the first executable, came back with its outputs swapped."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('d',))

  def step(p):
    if jax.sharding.get_abstract_mesh().empty:
      return p + 1, p  # the donated input returned: reordered
    return p + 1, jax.lax.with_sharding_constraint(
        p * 1.0, jax.sharding.PartitionSpec())

  for reorder in (True, False):
    fast = lro.donating_jit(step, donate_argnums=0, reorder_outputs=reorder)
    got = [fast(jnp.zeros(4))]
    # jax.set_mesh is new in 0.7 (make test-oldest runs 0.6).
    set_mesh = getattr(jax, 'set_mesh', None) or jax.sharding.use_mesh
    with set_mesh(mesh):
      got.append(fast(jnp.zeros(4)))
    got.append(fast(jnp.zeros(4)))
    for new, old in got:
      np.testing.assert_array_equal(new, 1.0)
      np.testing.assert_array_equal(old, 0.0)


def test_arguments_whose_tree_compares_by_identity_keep_their_outputs():
  """A pytree whose aux data compares by identity flattens to another
  treedef inside the trace: the plan had been looked up under a key the
  call never made, a KeyError after the inputs were donated."""

  class Meta:
    pass

  @jax.tree_util.register_pytree_node_class
  class Box:
    def __init__(self, x, meta=None):
      self.x, self.meta = x, meta

    def tree_flatten(self):
      return (self.x,), Meta()

    @classmethod
    def tree_unflatten(cls, aux, children):
      return cls(children[0], aux)

  fast = lro.donating_jit(lambda b: (Box(b.x + 1), b.x), donate_argnums=0,
                          reorder_outputs=True)
  for _ in range(2):
    new, old = fast(Box(jnp.ones(3)))
    np.testing.assert_array_equal(new.x, 2.0)
    np.testing.assert_array_equal(old, 1.0)


def test_what_it_answers_beside_a_call():
  fast = lro.donating_jit(lambda p: (p + 1, 'tag'), donate_argnums=0,
                          reorder_outputs=True)
  p = jnp.ones(3)
  with pytest.raises(TypeError, match=r"^donating_jit: output 1 of <lambda> "
                     r"is of type str, not a JAX type\."):
    fast(p)
  assert not p.is_deleted()  # refused while tracing: nothing was donated
  step = lro.donating_jit(lambda p, s: (p * 2, s + p), donate_argnums=(0, 1))
  shapes = step.eval_shape(p, p)
  assert [x.shape for x in shapes] == [(3,), (3,)]
  lowered = step.lower(p, p)
  assert 'stablehlo' in str(lowered.compiler_ir())
  np.testing.assert_array_equal(step(jnp.ones(3), jnp.ones(3))[1], 2.0)
  assert step._cache_size() == 1  # pylint: disable=protected-access
  compiled = step.lower(p, p).compile()
  step.clear_cache()
  assert step._cache_size() == 0  # pylint: disable=protected-access
  np.testing.assert_array_equal(step(jnp.ones(3), jnp.ones(3))[0], 2.0)
  # A step compiled before clear_cache keeps its own plan (it had been a
  # KeyError after the inputs were donated).
  step.clear_cache()
  np.testing.assert_array_equal(compiled(jnp.ones(3), jnp.ones(3))[1], 2.0)


def test_a_step_is_compiled_under_its_own_name():
  """Compile logs, cache-miss explanations, profiles and the persistent
  cache's file names had called every donating_jit step 'reordered'."""

  def my_train_step(x, y):
    return x + y, x

  fast = lro.donating_jit(my_train_step, donate_argnums=0)
  text = fast.lower(jnp.ones(3), jnp.ones(3)).as_text()
  assert 'jit_my_train_step' in text and 'reordered' not in text


def test_the_plan_pairs_buffers_by_dtype_too():
  """A donated bfloat16 input returned unchanged keeps its place: a float32
  output of the same shape cannot take its buffer (jax pairs donations by
  shape and dtype)."""
  a, b = jnp.ones(2, jnp.float32), jnp.ones(2, jnp.bfloat16)
  assert donation._plan([a, b], [b, jnp.zeros(2, jnp.float32)]) == [0, 1]  # pylint: disable=protected-access


def test_returned_inputs_in_a_cycle_come_back_in_place():
  """Inputs returned rotated, (p, q, r) -> (q, r, p): the plan is a 3-cycle
  (not its own inverse, as a swap is), every output keeps its input's
  buffer (no copy), and the call puts the outputs back in order."""
  sds = lambda: jax.ShapeDtypeStruct((4,), jnp.float32)
  p, q, r = sds(), sds(), sds()
  assert donation._plan([p, q, r], [q, r, p]) == [2, 0, 1]  # pylint: disable=protected-access
  rotate = lro.donating_jit(lambda p, q, r: (q, r, p), donate_argnums=(0, 1, 2),
                            reorder_outputs=True)
  args = lambda: [jnp.full(4, float(i)) for i in range(3)]
  compiled = rotate.lower(*args()).compile()
  assert ' copy(' not in compiled.as_text()
  for got in (rotate(*args()), compiled(*args())):
    assert [float(x[0]) for x in got] == [1.0, 2.0, 0.0]


def test_the_plan_gives_every_returned_input_its_own_buffer_where_it_can():
  """Exhaustively over 4 donated inputs of one shape and up to 5 outputs
  (each a fresh value or one of the inputs, repeats allowed): the order is
  a permutation, and each input returned whose rank in-order pairing can
  reach (rank < number of outputs) is emitted at that rank, so it keeps
  its own buffer; one returned past the outputs' count leaves the order
  alone."""
  sds = lambda: jax.ShapeDtypeStruct((2,), jnp.float32)
  ins = [sds() for _ in range(4)]
  for m in range(1, 6):
    for combo in itertools.product(range(-1, 4), repeat=m):
      outs = [ins[c] if c >= 0 else sds() for c in combo]
      order = donation._plan(ins, outs)  # pylint: disable=protected-access
      assert sorted(order) == list(range(m)), (combo, order)
      for r in {c for c in combo if c >= 0 and c < m}:
        assert outs[order[r]] is ins[r], (combo, order, r)
  # A call whose returned input is past the outputs' count: results as asked.
  second = lro.donating_jit(lambda x, y: y, donate_argnums=(0, 1),
                            reorder_outputs=True)
  with pytest.warns(UserWarning, match='donated buffers were not usable'):
    np.testing.assert_array_equal(second(jnp.zeros(4), jnp.ones(4)), 1.0)


def test_another_output_structure_for_the_same_signature_is_refused():
  """A retrace (under a mesh) that returns another structure cannot reuse
  the first trace's plan: one line, before anything is donated."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('d',))

  def step(p):
    if jax.sharding.get_abstract_mesh().empty:
      return p + 1, p
    return (p + 1,)

  fast = lro.donating_jit(step, donate_argnums=0, reorder_outputs=True)
  fast(jnp.zeros(4))
  x = jnp.zeros(4)
  set_mesh = getattr(jax, 'set_mesh', None) or jax.sharding.use_mesh
  with set_mesh(mesh), pytest.raises(
      ValueError, match=r'^donating_jit: step returned another output '
      r'structure for arguments of the same shapes'):
    fast(x)
  assert not x.is_deleted()


@pytest.mark.parametrize('argnums', [[0, 1], (1, 0)])
def test_donate_argnums_as_a_list_or_out_of_order(argnums):
  """jax.jit takes a list, and indices in any order: the plan still pairs
  the donated leaves in argument order (no factor copied), and an index
  past the call's arguments is refused whatever its place."""
  tx = lro.lora_rite(1e-2)
  params = lora_params()
  fast = lro.donating_jit(make_step(tx), donate_argnums=argnums)
  grads = grads_for(params, 1)
  hlo = fast.lower(params, tx.init(params), grads).compile().as_text()
  assert not factor_copies(hlo, params), factor_copies(hlo, params)[:2]
  want = jax.jit(make_step(tx))(params, tx.init(params), grads)
  got = fast(jax.tree.map(jnp.copy, params), tx.init(params), grads)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(TypeError, match='donate_argnames is not supported'):
    lro.donating_jit(make_step(tx), donate_argnums=(), donate_argnames='params')
  wide = lro.donating_jit(make_step(tx), donate_argnums=(3, 0))
  with pytest.raises(TypeError, match=r'donate_argnums=\(0, 3\), but the '
                     r'call has only 3 positional argument'):
    wide(params, tx.init(params), grads)


def test_an_unused_donated_argument_keeps_its_place_in_the_pairing():
  """keep_unused by default: an argument the step never reads is still
  donated, and still counts in the in-order pairing the plan relies on;
  pruned, the returned input lost its buffer (a copy) and the unread one
  stayed undonated."""
  step = lro.donating_jit(lambda unused, a: (a * 2, a), donate_argnums=(0, 1))
  compiled = step.lower(jnp.ones(4), jnp.ones(4)).compile()
  assert ' copy(' not in compiled.as_text()
  unused, a = jnp.ones(4), jnp.full(4, 3.0)
  doubled, same = step(unused, a)
  assert unused.is_deleted()
  np.testing.assert_array_equal(doubled, 6.0)
  np.testing.assert_array_equal(same, 3.0)


def test_only_the_donated_arguments_rank_in_the_plan():
  """An argument not donated, of the returned input's shape, before it: the
  plan ranks the donated leaves only (ranked among all arguments, the
  returned input had lost its buffer to the new value, a copy)."""
  step = lro.donating_jit(lambda x, p: (p + x, p), donate_argnums=1,
                          reorder_outputs=True)
  compiled = step.lower(jnp.ones(4), jnp.ones(4)).compile()
  assert ' copy(' not in compiled.as_text(), compiled.as_text()
  new, old = step(jnp.ones(4), jnp.full(4, 2.0))
  np.testing.assert_array_equal(new, 3.0)
  np.testing.assert_array_equal(old, 2.0)


@pytest.mark.skipif(jax.default_backend() != 'cpu',
                    reason='the default reorders on CPU only')
def test_a_platform_decided_per_call_keeps_a_plan_per_choice(monkeypatch):
  """reorder_outputs=None decides at each call: after a reordered call on
  CPU, a call of the same signature placed elsewhere gets jax.jit's
  in-order pairing, not the plan stored for the reordered one."""
  tx = lro.lora_rite(1e-2)
  params = lora_params()
  grads = grads_for(params, 1)
  fast = lro.donating_jit(make_step(tx), donate_argnums=(0, 1))
  fast(jax.tree.map(jnp.copy, params), tx.init(params), grads)
  monkeypatch.setattr(donation, '_platform', lambda leaves, kwargs: 'gpu')
  hlo = fast.lower(params, tx.init(params), grads).compile().as_text()
  assert factor_copies(hlo, params)  # in-order pairing: XLA copies


def test_clear_cache_forgets_the_plans_too():
  """After clear_cache a step that now returns another structure (it closes
  over a setting the user changed) is traced afresh, not refused against
  the plan of the executable that was dropped."""
  extra = {'on': False}

  def step(p):
    return (p + 1, p, p * 3) if extra['on'] else (p + 1, p)

  fast = lro.donating_jit(step, donate_argnums=0, reorder_outputs=True)
  assert len(fast(jnp.zeros(4))) == 2
  extra['on'] = True
  fast.clear_cache()
  new, old, tripled = fast(jnp.ones(4))
  np.testing.assert_array_equal(new, 2.0)
  np.testing.assert_array_equal(old, 1.0)
  np.testing.assert_array_equal(tripled, 3.0)

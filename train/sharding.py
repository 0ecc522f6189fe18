"""Where a run's arrays live on the device mesh.

Parameters carry logical axis names (``out_sharding`` metadata); the mesh
rules (``--mesh.rules`` over `configs.DEFAULT_RULES`) map them to mesh
axes. The optimizer state follows its parameters where it has their
shape, and is replicated elsewhere (counts, r x r statistics), except
Shampoo's per-block statistics, which shard with their factor's rows.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import lora_rite_optax as lro

from train import configs as configs_lib
from train import distributed
from train.errors import ConfigError
from train.trees import path_names


def mesh_rules(cfg: configs_lib.Config) -> dict[str, str | None]:
  """``--mesh.rules`` over the default rules: a rule replaces the default
  of its own logical axis only (``embed=fsdp`` had dropped the other
  seven, replicating the rest of the model); ``name=`` replicates."""
  return {**distributed.parse_rules(configs_lib.DEFAULT_RULES),
          **distributed.parse_rules(cfg.mesh.rules)}


def check_rule_names(cfg: configs_lib.Config, states) -> None:
  """Refuses a rule for a logical axis no parameter has (a typo such as
  ``embd=fsdp`` placed nothing, silently)."""
  # Every rule but a default one verbatim (the defaults name both families'
  # axes): a default name, such as T5's relpos_buckets on Gemma, had not
  # been checked.
  given = set(distributed.parse_rules(
      [r for r in cfg.mesh.rules if r not in configs_lib.DEFAULT_RULES]))
  if not given:
    return
  names = {a for state in states for _, var in nnx.to_flat_state(state)
           for a in (var.get_metadata().get('out_sharding') or ()) if a}
  unknown = sorted(given - names)
  if unknown:
    raise ConfigError(f'mesh.rules: no parameter has the logical axis '
                      f'{unknown[0]!r}; this model\'s are '
                      f'{", ".join(sorted(names))}.')


def state_shardings(state: nnx.State, rules, mesh) -> dict:
  """Pure-dict-shaped NamedShardings from each Variable's logical axes."""
  out: dict = {}
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get('out_sharding')
    spec = distributed.logical_to_spec(axes, np.shape(var.get_value()), rules,
                                       mesh)
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = NamedSharding(mesh, spec)
  return out


def mesh_placer(rules, mesh):
  """A loader's ``place``: each weight from the host straight to its
  sharding over ``mesh`` by its logical axes, as `state_shardings` gives
  it. Loaded onto the default device first, a model larger than one
  device's memory (an mT5-XXL in bfloat16 is 26 GB) had failed before it
  could be sharded."""
  def place(var, value):
    spec = distributed.logical_to_spec(
        var.get_metadata().get('out_sharding'), np.shape(value), rules, mesh)
    # From every host's own copy, no collective (see global_array).
    return distributed.global_array(value, NamedSharding(mesh, spec))
  return place


def opt_state_shardings(abstract_opt_state, params, param_shardings, mesh):
  """Shardings of the optimizer state, derived from its abstract init.

  A state leaf whose key path ends with a parameter's path and has that
  parameter's shape (first and second moments, LoRA-RITE's last basis)
  shards like the parameter; everything else (counts, r x r statistics)
  is replicated.
  """
  by_path = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    by_path[path_names(path)] = (tuple(leaf.shape), None)
  for path, sh in jax.tree_util.tree_leaves_with_path(param_shardings):
    names = path_names(path)
    by_path[names] = (by_path[names][0], sh)
  lengths = sorted({len(p) for p in by_path}, reverse=True)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    names = path_names(path)
    for n in lengths:
      if len(names) >= n and names[-n:] in by_path:
        shape, sh = by_path[names[-n:]]
        if tuple(leaf.shape) == shape:
          return sh
    return replicated

  shardings = jax.tree_util.tree_map_with_path(pick, abstract_opt_state)
  return _shard_shampoo_blocks(abstract_opt_state, shardings, params,
                               param_shardings, mesh)


def _shard_shampoo_blocks(abstract_opt_state, shardings, params,
                          param_shardings, mesh):
  """Shampoo's per-block statistics sharded as their factor's long axis.

  A factor ``(N, r)`` has ``N / b`` blocks of ``b x b`` statistics (and
  as many roots): 2 b / r times the factor's size, too much to hold whole
  on every device. Where the blocks are the factor's one sharded axis cut
  in order (``blocks * b == N``, no stacked layers), the blocks' leading
  axis shards over that axis's mesh axes, so each device keeps the blocks
  of its own rows and the statistics need no data from other devices; any
  other leaf stays replicated.
  """
  is_shampoo = lambda x: isinstance(x, lro.ShampooState)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: x is None)
  leaf_shardings = jax.tree.leaves(param_shardings,
                                   is_leaf=lambda x: x is None)

  def blocks_sharding(stats, param, sharding):
    if stats is None or not isinstance(sharding, NamedSharding):
      return None
    spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
    split = [(axis, names) for axis, names in enumerate(spec) if names]
    if len(split) != 1:
      return None
    axis, names = split[0]
    blocks, b = stats.left.shape[0], stats.left.shape[-1]
    names_tuple = names if isinstance(names, tuple) else (names,)
    devices = math.prod(mesh.shape[n] for n in names_tuple)
    if blocks * b != param.shape[axis] or blocks % devices:
      return None
    return NamedSharding(mesh, P(names))

  def per_state(state, sh):
    if not is_shampoo(state) or not isinstance(state.stats, tuple) or len(
        state.stats) != len(leaves) or len(leaf_shardings) != len(leaves):
      return sh
    fields = {}
    for name in ('stats', 'roots'):
      fields[name] = tuple(
          own if (want := blocks_sharding(st, p, ps)) is None else
          lro.BlockStats(want, want)
          for st, own, p, ps in zip(state.stats, getattr(sh, name), leaves,
                                    leaf_shardings))
    return sh._replace(**fields)

  return jax.tree.map(per_state, abstract_opt_state, shardings,
                      is_leaf=is_shampoo)

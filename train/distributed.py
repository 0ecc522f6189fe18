"""Multi-host start, the device mesh, and logical-axis -> mesh placement.

On a Cloud TPU VM pod slice every host runs the same command;
`maybe_initialize` calls ``jax.distributed.initialize()`` (which finds the
coordinator from the TPU metadata) before any other JAX call. Off TPU, pass
the coordinator explicitly (the two-process CPU test does, over loopback).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Re-exported: the loop places and fetches batches with these.
from models.host_arrays import global_array  # pylint: disable=unused-import
from models.host_arrays import to_host  # pylint: disable=unused-import
# The batch dimension is split over both data-parallel axes (the models
# hold their activations to it, `models.layers.shard_batch`).
from models.layers import BATCH_AXES  # pylint: disable=unused-import
from train.errors import first_line

MESH_AXES = ('data', 'fsdp', 'tensor')

_initialized = False


def _on_cloud_tpu() -> bool:
  """Whether this is a Cloud TPU VM (or a worker of a slice on GKE).

  GKE sets TPU_WORKER_HOSTNAMES; a TPU VM made with ``gcloud`` need not,
  and JAX finds its slice's workers in the VM metadata instead. So: TPU
  chips on this host's PCI bus, read as JAX itself reads them, without
  starting a backend. ``jax.distributed.initialize()`` then works for one
  host as for a pod slice.
  """
  if os.environ.get('TPU_WORKER_HOSTNAMES'):
    return True
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # pylint: disable=broad-except
    return False  # a JAX without this helper: pass --distributed.initialize always
  return chips > 0


def maybe_initialize(cfg) -> bool:
  """Calls ``jax.distributed.initialize`` when the config asks for it.

  Args:
    cfg: a `train.configs.DistributedConfig`.

  Returns:
    True when this call (or an earlier one) initialised the runtime.
  """
  global _initialized
  if _initialized:
    return True
  if cfg.initialize not in ('auto', 'always', 'never'):
    raise ValueError(f"distributed.initialize must be 'auto', 'always' or "
                     f"'never', got {cfg.initialize!r}.")
  wanted = cfg.initialize == 'always' or (
      cfg.initialize == 'auto' and (cfg.coordinator_address or _on_cloud_tpu()))
  if not wanted:
    given = [f'distributed.{name}' for name, on in (
        ('num_processes', cfg.num_processes), ('process_id',
                                               cfg.process_id >= 0)) if on]
    if given:
      # Else each host would train alone, as if it were the only one.
      raise ValueError(
          f"{' and '.join(given)} given, but no multi-process start: "
          + ('distributed.initialize is never' if cfg.initialize == 'never'
             else 'give distributed.coordinator_address (host:port of '
             'process 0) too, or distributed.initialize=always') + '.')
    return False
  kwargs: dict[str, Any] = {}
  if cfg.coordinator_address:
    host, sep, port = cfg.coordinator_address.rpartition(':')
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
      # jax had failed on it with an IndexError, or 26 lines ending in
      # 'Failed to start RPC server'.
      raise ValueError(f'distributed.coordinator_address must read host:port '
                       f'with a port in 1-65535, got '
                       f'{cfg.coordinator_address!r}.')
    kwargs['coordinator_address'] = cfg.coordinator_address
  if cfg.num_processes:
    kwargs['num_processes'] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs['process_id'] = cfg.process_id
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:  # e.g. the port is taken
    raise ValueError(f'distributed: jax.distributed.initialize failed '
                     f'({first_line(e)}).') from None
  _initialized = True
  return True


def mesh_shape(cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes, one -1 filled with the remaining devices.

  Raises:
    ValueError: the sizes do not multiply to the device count.
  """
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes (data={cfg.data}, fsdp={cfg.fsdp}, '
                     f'tensor={cfg.tensor}) must be positive, with at most '
                     'one -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh (data={cfg.data}, fsdp={cfg.fsdp}, '
                       f'tensor={cfg.tensor}) does not divide the '
                       f'{num_devices} devices.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh (data={sizes[0]}, fsdp={sizes[1]}, '
                     f'tensor={sizes[2]}) needs {math.prod(sizes)} devices, '
                     f'have {num_devices}.')
  return tuple(sizes)


def make_mesh(cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over all devices of all hosts."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(cfg, len(devices))
  try:
    # mesh_utils orders TPU devices along the physical torus.
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # Odd shapes on CPU: plain order is as good.
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def parse_rules(rules: Sequence[str]) -> dict[str, str | None]:
  """'logical=mesh' strings -> dict; an empty mesh axis means replicated."""
  out: dict[str, str | None] = {}
  for rule in rules:
    name, sep, axis = rule.partition('=')
    name, axis = name.strip(), axis.strip()
    if not sep or not name:
      raise ValueError(f"mesh rule {rule!r} must read 'logical=mesh_axis' "
                       "(empty mesh axis for replicated).")
    if axis and axis not in MESH_AXES:
      raise ValueError(f'mesh rule {rule!r}: unknown mesh axis {axis!r}; '
                       f'use one of {", ".join(MESH_AXES)} or nothing.')
    if out.get(name, axis or None) != (axis or None):
      # The last had won, the first dropped without a word.
      raise ValueError(f'mesh rule {rule!r}: {name!r} is already given as '
                       f'{out[name] or ""!r}; give each name once.')
    out[name] = axis or None
  return out


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int],
                    rules: Mapping[str, str | None], mesh: Mesh) -> P:
  """The PartitionSpec of an array with logical ``axes``.

  A dimension stays replicated when its logical name has no rule, when the
  mesh axis is already used by an earlier dimension, or when the mesh axis
  size does not divide it (MQA's single kv head, a rank-16 LoRA factor on a
  32-way axis): placement never fails, it only shards less.
  """
  if not axes:
    return P()
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    axis = rules.get(name) if name is not None else None
    if (axis is None or axis in used or mesh.shape[axis] == 1
        or dim % mesh.shape[axis]):
      spec.append(None)
      continue
    used.add(axis)
    spec.append(axis)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
  """Rows split over data x fsdp; ``leading`` unsplit axes before the rows."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES,
                               *([None] * (ndim - leading - 1))))


def process_0_flag(flag: bool) -> bool:
  """Process 0's ``flag``, on every process.

  For decisions only process 0 can make (it alone reads back the metric
  files) that every process must follow: an evaluation is a collective
  computation, which all processes run or none.
  """
  return bool(from_process_0(int(bool(flag))))


def from_process_0(value: int) -> int:
  """Process 0's int ``value`` (below 2**31), on every process (one
  collective; none on a single process)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def on_any_process(value: int) -> int:
  """The largest of every process's ``value`` (one collective; none on a
  single process). A signal reaches each host on its own, and every host
  must stop at the same step (a checkpoint is a collective)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def raise_where_process_0_failed(error: BaseException | None,
                                 what: str) -> None:
  """Raises on every process if process 0's write of ``what`` failed
  (``error``, None where it did not; one collective across processes).

  Process 0 alone writes a run's files. Had it raised alone (a full disk),
  the others went on into the step's collectives and waited there until
  the job's timeout, ending in stack traces."""
  if not on_any_process(int(error is not None)):
    return
  if error is not None:
    raise error
  raise OSError(f'process 0 could not write {what} (its log says why); '
                'this process stops with it.')


def write_on_process_0(write: Callable[[], Any], what: str) -> None:
  """Runs ``write`` on process 0 and stops every process if it fails with
  an OSError (see `raise_where_process_0_failed`)."""
  error = None
  if jax.process_index() == 0:
    try:
      write()
    except OSError as e:
      error = e
  raise_where_process_0_failed(error, what)


class AnotherProcessFailed(OSError):
  """Another process raised in a block every process runs (its log says
  why); this one stops with it."""


@contextlib.contextmanager
def fail_together(what: str):
  """Runs the block on each process and, if it raises on any, raises on
  every one (one collective at the block's end; none on a single process).

  For host-local work before a collective (reading the data, tokenizer and
  model files): a host missing one file had raised alone, and the others
  waited in the next collective (placing the model) until the job's
  timeout. The process that failed raises its own error; the others raise
  `AnotherProcessFailed`, one line naming ``what``.
  """
  try:
    yield
  except Exception:
    on_any_process(1)
    raise
  if on_any_process(0):
    raise AnotherProcessFailed(
        f'another process failed {what} (its log says why); this process '
        'stops with it.')


def differ_between_processes(digests: dict[str, str]) -> list[str]:
  """The names in ``digests`` whose hex digest is not the same on every
  process (one collective for them all).

  Each process builds the global batch from its own copy of the training
  examples; hosts that read different files (one lacking the evaluation
  split that the others hold out of training) would otherwise train on
  silently different batches.
  """
  if jax.process_count() == 1:
    return []
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.stack([np.frombuffer(bytes.fromhex(d), np.uint8)
                   for d in digests.values()])
  every = np.asarray(multihost_utils.process_allgather(mine))
  same = (every == every[:1]).all(axis=(0, 2))
  return [name for name, ok in zip(digests, same) if not ok]

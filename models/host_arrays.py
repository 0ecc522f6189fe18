"""Host arrays to and from (possibly multi-host) global arrays.

Shared by the models' sampler and the train loop (`train.distributed`), so
that both place and fetch batches the same way on one host or many.
"""

from __future__ import annotations

import jax
import numpy as np


def global_array(host_value: np.ndarray,
                 sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array from a value every process holds in full.

  Every process builds the same global batch (same seed, same order), so
  each device simply takes its slice; the result is the same whatever the
  number of processes, which makes multi-host runs reproduce single-host
  ones exactly. No collective: `jax.device_put` of a host array to a
  sharding over several processes would first gather it on every device to
  check that the hosts agree.
  """
  host_value = np.asarray(host_value)
  return jax.make_array_from_callback(host_value.shape, sharding,
                                      lambda idx: host_value[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) array as a full numpy array on every process."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))

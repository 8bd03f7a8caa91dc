"""The device mesh and where arrays live on it.

One `jax.jit`-compiled step runs over a `Mesh` of every device of every process: the global
batch is sharded on the mesh axis "data", the train state is replicated. `state_shardings` is
the one place that decides the state's layout, so sharding parameters later is a local change.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices of all processes (or `devices`), axis "data"."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def mesh_platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ("cpu", "tpu", "gpu"): what a program jitted for the
  mesh is lowered for (deviceless topologies included, whatever the host's backend)."""
  return mesh.devices.flat[0].platform


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, state: Any) -> Any:
  """Sharding of every train-state leaf: replicated. Change here to shard parameters."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows -> the global array sharded on "data" (works multi-host)."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def host_replicated(value: np.ndarray, mesh: Mesh) -> jax.Array:
  """An array every process holds in full -> a global replicated array."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, replicated(mesh), lambda index: value[index])

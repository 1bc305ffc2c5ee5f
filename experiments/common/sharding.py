"""Where arrays live: one place that decides the mesh and the shardings.

Data parallelism over every local device: a 1-D ``jax.sharding.Mesh`` with axis
``"data"``; batches are split along their leading axis over it, parameters and optimizer
state are replicated. The same code runs on one CPU, a multi-GPU box or a TPU host. (An
FSDP axis would be added here, and only here.)

Single-process only: the mesh holds ``jax.local_devices()``; multi-host runs are not
covered.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every local device) with axis "data"."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def num_data_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str) -> str | None:
    """An error line if ``batch_size`` does not split evenly over the data axis, else None."""
    shards = num_data_shards(mesh)
    if batch_size % shards:
        return (
            f"  --config.{field}: {batch_size} is not divisible by the {shards} local devices; "
            f"use a multiple of {shards}"
        )
    return None


def shard_batch(batch, mesh: Mesh):
    """Host numpy batch (pytree, leading batch axis) -> device arrays sharded over "data"."""
    return jax.device_put(batch, batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
    """Copy every leaf of ``tree`` to every device of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))

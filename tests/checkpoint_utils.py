"""Checkpoint helpers shared by the fault and multi-device tests."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp


def restore_on_one_device(path):
    """A saved state restored as host arrays through this process's first device, whatever
    the topology (device count, sharding) it was saved from."""
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return jax.device_get(checkpointer.restore(path, target))

"""Where arrays live: the device mesh, the shardings, multi-host set-up and host I/O.

The mesh is a 2-D ``jax.sharding.Mesh`` over every device of the job (all processes) with
axes ``("data", "fsdp")`` of sizes ``(devices / fsdp, fsdp)``:

* batches are split along their leading axis over BOTH axes (``P(("data", "fsdp"))``), so
  every device holds ``global_batch / devices`` examples, and so do the activations, the
  BDIA side bits and the reversible stack's two kept states;
* parameters and optimizer state are replicated (``mesh.fsdp = 1``, plain data
  parallelism), or with ``mesh.fsdp = n > 1`` sharded FSDP-style over the "fsdp" axis:
  each array along its largest axis divisible by n (arrays with no such axis stay
  replicated). The train step all-gathers the weights at its start (``gather_sharding``)
  and the gradients are reduce-scattered back to the shards; without that constraint
  XLA's partitioner may instead reshard the activations to follow the weights' layout,
  which costs more memory (measured with ``benchmarks/train_step_memory.py``).

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize()`` when the
config or the environment asks for it (see ``distributed_wanted``); then
``jax.devices()`` spans every host, each process feeds only the batch rows its own devices
hold (``process_rows`` / ``shard_batch``), and only process 0 writes logs and files
(``is_primary``). With one process everything reduces to the single-host behaviour.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over both
DISTRIBUTED_MODES = ("auto", "always", "never")


# --------------------------------------------------------------------------- config


def add_parallel_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the ``mesh`` and ``distributed`` sections (shared by every experiment) to ``c``."""
    c.mesh = ml_collections.ConfigDict()
    # Devices on the "fsdp" mesh axis: 1 = plain data parallelism (parameters and optimizer
    # state replicated on every device); n > 1 = FSDP: parameters and optimizer state
    # sharded over groups of n devices (each array along its largest axis divisible by n).
    # Must divide the number of devices. The batch is always split over all devices.
    c.mesh.fsdp = 1

    c.distributed = ml_collections.ConfigDict()
    # jax.distributed.initialize() for multi-host runs: "auto" (when the environment is a
    # multi-process launch: JAX_COORDINATOR_ADDRESS, SLURM with several tasks, Open MPI,
    # a TPU pod's worker list), "always" (e.g. on a TPU VM pod, where JAX finds the
    # coordinator itself) or "never".
    c.distributed.initialize = "auto"
    # Explicit settings (else from $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES /
    # $JAX_PROCESS_ID, else JAX's cluster auto-detection): "host:port" of process 0.
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0  # processes in the job (0: from env / auto-detect)
    c.distributed.process_id = -1  # this process's index (-1: from env / auto-detect)
    return c


def validate_parallel_config(config: ml_collections.ConfigDict, mesh: Mesh | None,
                             checks) -> None:
    """Append problems with ``config.mesh`` / ``config.distributed`` to ``checks``.

    ``mesh`` (the mesh the run got) gives the device count that ``mesh.fsdp`` must divide.
    """
    fsdp = config.mesh.fsdp
    devices = mesh.size if mesh is not None else jax.device_count()
    if checks.require(isinstance(fsdp, int) and not isinstance(fsdp, bool) and fsdp >= 1,
                      "mesh.fsdp", f"must be an int >= 1, got {fsdp!r}"):
        checks.require(devices % fsdp == 0, "mesh.fsdp",
                       f"must divide the {devices} devices, got {fsdp}; use one of "
                       f"{tuple(d for d in range(1, devices + 1) if devices % d == 0)}")
    d = config.distributed
    checks.one_of(d.initialize, DISTRIBUTED_MODES, "distributed.initialize")
    checks.require(not d.coordinator_address or _is_host_port(d.coordinator_address),
                   "distributed.coordinator_address",
                   f"must be 'host:port' or empty, got {d.coordinator_address!r}")
    checks.require(isinstance(d.num_processes, int) and d.num_processes >= 0,
                   "distributed.num_processes",
                   f"must be an int >= 0 (0: from the environment), got {d.num_processes!r}")
    checks.require(isinstance(d.process_id, int) and d.process_id >= -1,
                   "distributed.process_id",
                   f"must be an int >= -1 (-1: from the environment), got {d.process_id!r}")
    if (isinstance(d.num_processes, int) and isinstance(d.process_id, int)
            and d.num_processes > 0 and d.process_id >= 0):
        checks.require(d.process_id < d.num_processes, "distributed.process_id",
                       f"must be < distributed.num_processes={d.num_processes}, "
                       f"got {d.process_id}")


def _is_host_port(text: str) -> bool:
    host, _, port = str(text).rpartition(":")
    return bool(host) and port.isdigit()


# --------------------------------------------------------------------------- multi-host


def distributed_wanted(environ=None) -> str | None:
    """Why the environment looks like a multi-process launch (a short reason), or None.

    Checked: JAX_COORDINATOR_ADDRESS; SLURM with more than one task; Open MPI (mpirun);
    a TPU pod's worker list (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with several
    hosts) or a multislice coordinator (MEGASCALE_COORDINATOR_ADDRESS).
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                              "SLURM_PROCID", "SLURM_LOCALID")) and _int(env["SLURM_NTASKS"]) > 1:
        return f"SLURM job step with {env['SLURM_NTASKS']} tasks"
    if "OMPI_MCA_orte_hnp_uri" in env and _int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1:
        return "Open MPI launch"
    for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if len([h for h in env.get(var, "").split(",") if h.strip()]) > 1:
            return f"TPU pod ({var} lists several hosts)"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU multislice (MEGASCALE_COORDINATOR_ADDRESS is set)"
    return None


def _int(text: str, default: int = 0) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


class DistributedInitError(RuntimeError):
    """``jax.distributed.initialize()`` was asked for and failed (the message says why)."""


def initialize_distributed(dist: ml_collections.ConfigDict, environ=None) -> bool:
    """Call ``jax.distributed.initialize()`` if ``dist`` (a ``distributed`` config section)
    and the environment ask for it; idempotent. Returns True when the job is multi-process
    after the call.

    Must run before anything touches a JAX backend (creating arrays, listing devices).
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    env = os.environ if environ is None else environ
    mode = dist.initialize
    if mode not in DISTRIBUTED_MODES:
        return False  # validate_parallel_config reports it
    reason = distributed_wanted(env) if mode == "auto" else None
    if mode == "auto" and dist.coordinator_address:
        reason = "distributed.coordinator_address is set"
    if mode == "never" or (mode == "auto" and reason is None):
        return False
    kwargs = {}
    address = dist.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num = dist.num_processes or _int(env.get("JAX_NUM_PROCESSES", "0"))
    pid = dist.process_id if dist.process_id >= 0 else _int(env.get("JAX_PROCESS_ID", "-1"), -1)
    if address:
        kwargs["coordinator_address"] = address
    if num > 0:
        kwargs["num_processes"] = num
    if pid >= 0:
        kwargs["process_id"] = pid
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as error:  # noqa: BLE001 - reported as one clear line below
        why = reason or "distributed.initialize=always"
        raise DistributedInitError(
            f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
            f" failed ({why}): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
            f"Set --config.distributed.coordinator_address/num_processes/process_id (or "
            f"JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) on every host, or "
            f"--config.distributed.initialize=never for a single-process run."
        ) from None
    return jax.process_count() > 1


def is_primary() -> bool:
    """True on the process that writes logs, metrics, plots and JSON files (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process gets here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- mesh


def make_mesh(devices=None, *, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of the job).

    ``fsdp`` must divide the device count; the "data" axis takes the rest.
    """
    devices = jax.devices() if devices is None else list(devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {len(devices)} "
                         f"devices")
    shape = (len(devices) // fsdp, fsdp)
    try:  # topology-aware device order on TPU/GPU
        return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto,) * 2,
                             devices=devices)
    except Exception:  # noqa: BLE001 - e.g. a device subset the helper cannot lay out
        return Mesh(np.asarray(devices).reshape(shape), BATCH_AXES)


def mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
    """Initialise multi-host JAX if asked (``config.distributed``), then the mesh of
    ``config.mesh``. A bad ``mesh.fsdp`` falls back to 1 here so that validation can
    report it together with every other bad field."""
    initialize_distributed(config.distributed)
    fsdp = config.mesh.fsdp
    ok = isinstance(fsdp, int) and not isinstance(fsdp, bool) and fsdp >= 1 and (
        jax.device_count() % fsdp == 0)
    return make_mesh(fsdp=fsdp if ok else 1)


def num_data_shards(mesh: Mesh) -> int:
    """How many pieces a batch is split into (every device of the mesh)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def fsdp_size(mesh: Mesh) -> int:
    return int(mesh.shape.get(FSDP_AXIS, 1))


def _batch_axes(mesh: Mesh):
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return axes if len(axes) > 1 else axes[0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], size: int) -> PartitionSpec:
    """Shard along the largest axis divisible by ``size`` (the last of equals); replicate
    when there is none (scalars, odd shapes) or ``size`` is 1."""
    if size <= 1:
        return PartitionSpec()
    candidates = [(n, i) for i, n in enumerate(shape) if n % size == 0 and n >= size]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    return PartitionSpec(*([None] * axis), FSDP_AXIS)


def param_shardings(tree, mesh: Mesh):
    """A pytree like ``tree`` of ``NamedSharding``: FSDP-sharded leaves when the mesh has
    an "fsdp" axis of size > 1, else replicated."""
    size = fsdp_size(mesh)
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), size)), tree)


def train_state_shardings(state, mesh: Mesh):
    """Shardings of a ``TrainState``: ``params`` and ``opt_state`` FSDP-style (see
    ``param_shardings``), everything else (step, probes, keys, counters) replicated."""
    replicated = replicated_sharding(mesh)
    out = jax.tree_util.tree_map(lambda _: replicated, state)
    return out.replace(params=param_shardings(state.params, mesh),
                       opt_state=param_shardings(state.opt_state, mesh))


def gather_sharding(mesh: Mesh) -> NamedSharding | None:
    """What the train step constrains the parameters to at its start (see
    ``bdia_jax.training.make_train_step(gather_params=...)``): replicated under FSDP, so the
    weights are all-gathered once per step and the activations keep their batch sharding;
    None (no constraint) with replicated parameters."""
    return replicated_sharding(mesh) if fsdp_size(mesh) > 1 else None


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str) -> str | None:
    """An error line if ``batch_size`` does not split evenly over the devices, else None."""
    shards = num_data_shards(mesh)
    if batch_size % shards:
        return (
            f"  --config.{field}: {batch_size} is not divisible by the {shards} devices; "
            f"use a multiple of {shards}"
        )
    return None


# --------------------------------------------------------------------------- host <-> device


def process_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """Indices (sorted) of the rows of a global batch that this process's devices hold.

    All of them with one process; ``global_batch / process_count`` of them otherwise. A
    pipeline reads only these rows of every global batch and hands them to
    ``shard_local_batch``.
    """
    if jax.process_count() == 1:
        return np.arange(global_batch)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(global_batch)))
    return np.asarray(sorted(rows), np.int64)


def shard_local_batch(local_batch, mesh: Mesh, global_batch: int):
    """This process's rows (``process_rows``) of a global batch -> global device arrays
    sharded over the batch axes. With one process the local batch is the global batch."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (global_batch, *np.shape(x)[1:])), local_batch)


def shard_batch(batch, mesh: Mesh):
    """Host numpy batch (pytree, leading batch axis; the same GLOBAL batch on every
    process) -> device arrays sharded over the batch axes. Each process transfers only
    its own rows."""
    if jax.process_count() == 1:
        return jax.device_put(batch, batch_sharding(mesh))
    size = len(jax.tree_util.tree_leaves(batch)[0])
    rows = process_rows(mesh, size)
    local = jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], batch)
    return shard_local_batch(local, mesh, size)


def place(tree, shardings):
    """Put every leaf of ``tree`` (host or device values, identical on every process) on
    the devices with the matching leaf of ``shardings`` (a pytree, or one sharding)."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def replicate(tree, mesh: Mesh):
    """Copy every leaf of ``tree`` to every device of the mesh."""
    return place(tree, replicated_sharding(mesh))


def to_host(tree):
    """``jax.device_get`` that also works for arrays spread over several processes:
    replicated ones are read from a local copy, sharded ones are gathered."""
    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(fetch, tree)

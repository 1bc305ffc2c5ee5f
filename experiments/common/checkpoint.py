"""Orbax checkpoints of a ``TrainState`` plus a small JSON record, written atomically and
checked on restore.

Saves every ``save_every_steps`` steps (and whenever the loop asks, e.g. at the end of an
epoch), keeps the last ``keep`` checkpoints, restores the latest good one onto the mesh.
The state's ``step`` is the data-iterator position (the data order of every epoch is a
function of (seed, epoch)) and the RNG position (step keys are ``fold_in(base_key, step)``),
so a resumed run continues with the same batches and keys.

Faults:

* Atomic writes: Orbax writes a step into a temporary folder and renames it when complete
  (or marks it with a commit file where renames are not atomic), so a process killed while
  writing leaves no folder that ``latest_step`` would pick; leftovers are cleared when the
  next run opens the folder.
* Corruption: the record stores a fingerprint of the state (``finite_and_fingerprint``).
  ``restore`` tries the newest checkpoint first; if it cannot be read or its fingerprint or
  step does not match, it prints one line naming the step and the problem, moves that
  folder aside to ``<directory>.corrupt/`` (so a later save at that step is not skipped)
  and falls back to the previous one; with none left the run starts fresh, and says so.
* Config mismatch is not corruption: a checkpoint whose record holds another run config
  (``run_config``: the fields the training depends on, see ``runs.run_config``), or whose
  arrays have other names, shapes or dtypes than the state being resumed, was written by
  another config. ``restore`` raises ``CheckpointMismatchError`` naming the first
  differences and leaves every checkpoint where it is.
* Quiet restore: before Orbax reads a step, every saved array is opened and read once with
  blocking TensorStore calls (``_check_saved_arrays``); see there for why.
* A state with a non-finite leaf is never written.
* Disk full: before a save the free space is compared with the state's size, and a write
  that fails for lack of space (ENOSPC, TensorStore's RESOURCE_EXHAUSTED) is caught; either
  way ``CheckpointWriteError`` names the workdir, the free space and the last good
  checkpoint in one line, the step's temporary folder is removed, and Orbax's own error
  logs of the failed write are held back. The earlier checkpoints are intact, so the rerun
  resumes from the last good one once there is space.

Multi-host: every process calls ``save``/``restore`` (Orbax coordinates the writes of the
shards; the JSON record and the renames are done by process 0).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import glob
import logging
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.common import runs
from experiments.common.config import ConfigError, on_sigint
from experiments.common.metrics import log
from experiments.common.runs import CONFIG_FINGERPRINT_KEY, CONFIG_KEY
from experiments.common.sharding import is_primary, sync, to_host
from experiments.common.train_state import finite_and_fingerprint

FINGERPRINT_KEY = "state_fingerprint"
# Saved arrays read at once by the pre-restore check (bounds its host memory).
_READS_IN_FLIGHT = 8


class CheckpointMismatchError(ConfigError):
    """A checkpoint holds other arrays (names, shapes, dtypes) than the state being resumed:
    it was written by another config. Not corruption, so nothing is moved aside."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the disk is full); the message says where, how
    much space is left and which checkpoint the rerun resumes from."""


_DISK_FULL_MARKS = ("No space left on device", "RESOURCE_EXHAUSTED", "os_error_code='28'",
                    "Disk quota exceeded")


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT, or TensorStore's error for it, anywhere in the exception chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(mark in str(error) for mark in _DISK_FULL_MARKS):
            return True
        error = error.__cause__ or error.__context__
    return False


class _HoldOrbaxErrors(logging.Filter):
    """Drops the error records (with tracebacks) that Orbax logs from its worker threads
    when a write fails, possibly after ``save`` returned (async saves): the failure itself
    reaches the caller as an exception from ``save``, ``wait`` or ``close``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


@contextlib.contextmanager
def _orbax_errors_held():
    held = _HoldOrbaxErrors()
    loggers = [logging.getLogger(), logging.getLogger("absl")]
    handlers = [h for logger in loggers for h in logger.handlers]
    for target in (*loggers, *handlers):
        target.addFilter(held)
    try:
        yield
    finally:
        for target in (*loggers, *handlers):
            target.removeFilter(held)


def _megabytes(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f} MB"


class Checkpointer:
    """Checkpoints of one model's training under ``directory``.

    Args:
      directory: where the step folders go (created if missing).
      save_every_steps: periodic save interval in steps (>= 1).
      keep: how many of the latest checkpoints to keep (>= 1).
      async_save: write in a background thread (worthwhile for large models on
        accelerators); False writes synchronously.
      run_config: the plain-dict config the training depends on (``runs.run_config``):
        stored with every checkpoint, and a checkpoint holding another one (or none) is
        refused on restore. None: neither stored nor checked.
    """

    def __init__(self, directory: str, *, save_every_steps: int, keep: int,
                 async_save: bool = False, run_config: dict | None = None) -> None:
        self.directory = os.path.abspath(directory)
        self.save_every_steps = int(save_every_steps)
        self.run_config = run_config
        self._failed = False
        self._held = contextlib.ExitStack()  # Orbax's error logs, until close()
        self._held.enter_context(_orbax_errors_held())
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # leftovers of a run killed mid-write
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def is_due(self, step: int) -> bool:
        return step > 0 and step % self.save_every_steps == 0

    def save(self, step: int, state, record: dict) -> None:
        """Write ``state`` and the JSON-serialisable ``record`` as checkpoint ``step``."""
        finite, fingerprint = finite_and_fingerprint(state)
        if not finite:
            raise FloatingPointError(
                f"refusing to checkpoint step {step}: the train state has NaN/Inf values."
            )
        if step in self._manager.all_steps():
            return  # already saved (e.g. an epoch end that was also a periodic save)
        needed = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                     for x in jax.tree_util.tree_leaves(state))
        free = self._free_bytes()
        if free is not None and free < needed:
            self._disk_full(step, f"{_megabytes(free)} free, the state needs "
                                  f"{_megabytes(needed)}")
        record = {**record, FINGERPRINT_KEY: fingerprint, "step": int(step)}
        if self.run_config is not None:
            record.update({CONFIG_KEY: self.run_config,
                           CONFIG_FINGERPRINT_KEY: runs.fingerprint(self.run_config)})
        with self._write_errors(step), _ctrl_c_deferred():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
                ),
                force=True,
            )

    def _free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.directory).free
        except OSError:
            return None

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """Turns a write that failed for lack of space into ``CheckpointWriteError``."""
        try:
            yield
        except Exception as error:
            if not _is_disk_full(error):
                raise
            free = self._free_bytes()
            self._disk_full(step, "no space left on the device"
                            + (f" ({_megabytes(free)} free)" if free is not None else ""))

    def _disk_full(self, step: int | None, why: str):
        self._failed = True
        for leftover in glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")):
            shutil.rmtree(leftover, ignore_errors=True)
            head = os.path.basename(leftover).split(".")[0]
            if head.isdigit():  # an async write that failed after its save() returned
                step = min(int(head), step) if step is not None else int(head)
        with contextlib.suppress(Exception):
            self._manager.reload()
        good = [s for s in self._manager.all_steps() if s != step]
        parent = os.path.dirname(self.directory)
        workdir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" \
            else self.directory
        last = (f"the last good checkpoint is step {max(good)} in {self.directory}"
                if good else f"no checkpoint was written yet in {self.directory}")
        raise CheckpointWriteError(
            f"cannot write checkpoint{f' step {step}' if step is not None else ''} in the "
            f"workdir {workdir}: {why}; {last}. Free some space (or pass another "
            f"--workdir) and rerun the same command to resume.") from None

    def restore(self, like_state, sharding) -> tuple | None:
        """``(state, record)`` of the newest checkpoint that reads back intact, placed
        with ``sharding`` (one sharding for every leaf, or a pytree like the state), or
        None when there is none. ``like_state`` gives the tree structure/shapes.

        A checkpoint that fails to read or to verify is reported in one line, moved to
        ``<directory>.corrupt/`` and skipped. Raises ``CheckpointMismatchError`` (and
        moves nothing) when the newest readable checkpoint was written by another config.
        """
        self._manager.wait_until_finished()
        if isinstance(sharding, jax.sharding.Sharding):
            shardings = jax.tree_util.tree_map(lambda _: sharding, like_state)
        else:
            shardings = sharding
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like_state,
            shardings)
        bad = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, record = self._restore_step(step, abstract)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure means: not usable
                problem = _one_line(error)
                log(f"checkpoint step {step} in {self.directory} is unusable ({problem}); "
                    f"moving it to {self.directory}.corrupt/ and falling back to the "
                    f"previous checkpoint")
                bad.append(step)
                self._set_aside(step)
                continue
            if bad:
                log(f"resuming from checkpoint step {step} instead of the unusable "
                    f"step{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}")
            return state, record
        if bad:
            log(f"no usable checkpoint left in {self.directory}; starting from step 0")
        return None

    def _check_run_config(self, step: int) -> None:
        """Raise ``CheckpointMismatchError`` when step ``step``'s record holds another run
        config than ``self.run_config`` (or none); reads the small JSON record only."""
        if self.run_config is None:
            return
        with _ctrl_c_deferred():
            record = dict(self._manager.restore(
                step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record or {})
        if record.get(CONFIG_FINGERPRINT_KEY) != runs.fingerprint(self.run_config):
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} was written with a different "
                f"config ({runs.describe_change(record.get(CONFIG_KEY), self.run_config)}); "
                f"resume with the config it was written with, or use a new --workdir")

    def _restore_step(self, step: int, abstract):
        self._check_run_config(step)
        _check_saved_arrays(os.path.join(self.directory, str(step), "state"), abstract,
                            where=f"checkpoint step {step} in {self.directory}")
        with _ctrl_c_deferred():
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()
                ),
            )
        state, record = restored.state, dict(restored.record or {})
        saved_step = int(to_host(state.step)) if hasattr(state, "step") else step
        if saved_step != step:
            raise ValueError(f"the state inside says step {saved_step}")
        if FINGERPRINT_KEY not in record:
            raise ValueError("its record has no state fingerprint")
        finite, fingerprint = finite_and_fingerprint(state)
        if fingerprint != record[FINGERPRINT_KEY]:
            raise ValueError(
                f"the state's fingerprint {fingerprint} differs from the saved "
                f"{record[FINGERPRINT_KEY]}: the array files were altered")
        if not finite:
            raise ValueError("the state holds NaN/Inf values")
        for key in (FINGERPRINT_KEY, "step", CONFIG_KEY, CONFIG_FINGERPRINT_KEY):
            record.pop(key, None)
        return state, record

    def _set_aside(self, step: int) -> None:
        """Move step ``step``'s folder to ``<directory>.corrupt/<step>-<time>``."""
        source = os.path.join(self.directory, str(step))
        if is_primary() and os.path.exists(source):
            target_dir = self.directory + ".corrupt"
            os.makedirs(target_dir, exist_ok=True)
            target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                os.replace(source, target)
            except OSError:
                shutil.rmtree(source, ignore_errors=True)
        sync(f"checkpoint_set_aside_{step}")
        self._manager.reload()

    def wait(self) -> None:
        with self._write_errors(None):
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._held:
            if self._failed:  # a failed write: nothing worth waiting for, no second error
                with contextlib.suppress(Exception):
                    self._manager.close()
                return
            with self._write_errors(None):
                self._manager.wait_until_finished()
            self._manager.close()


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Hold a Ctrl-C (or a SIGTERM the command line turns into one) until the block ends,
    then raise it: an interrupt inside Orbax's event loop would abandon its pending reads
    or writes the way a failed read does (see ``_check_saved_arrays``). Only signals with
    a Python handler (Python's own SIGINT one or the command line's, its SIGTERM one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    held = {sig: handler for sig, handler in handlers.items()
            if callable(handler) and (sig != signal.SIGINT
                                      or handler in (signal.default_int_handler, on_sigint))}
    received = []
    for sig in held:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        if received:
            held[received[0]](received[0], None)  # raises KeyboardInterrupt / Terminated


def _check_saved_arrays(state_dir: str, abstract, *, where: str) -> None:
    """Open and read every array saved under ``state_dir`` (Orbax's OCDBT + zarr layout)
    with blocking TensorStore calls, and compare names, shapes and dtypes with ``abstract``.

    Why: Orbax reads a step's arrays as concurrent coroutines under ``asyncio.gather`` on a
    private event loop. When one read fails (a garbled ``manifest.ocdbt`` or data file),
    ``gather`` raises at once and Orbax closes the loop while the sibling reads are still
    pending. Their TensorStore futures complete later on TensorStore's threads and call
    ``loop.call_soon_threadsafe`` on the closed loop ("RuntimeError: Event loop is closed"),
    and the abandoned coroutines are closed whenever the garbage collector reaches them
    ("Exception ignored in: <coroutine object _read_array_index_and_device_put>"), so how
    much is printed, and when, depends on timing (hence the flake under xdist). The same
    happens when a shape differs from the config's. Blocking reads have no event loop to
    outlive: a step that fails here never reaches Orbax, and one that passes has already
    been read back once in full.

    Raises ``CheckpointMismatchError`` when the arrays' names, shapes or dtypes differ from
    ``abstract``'s (another config), ``ValueError`` (or TensorStore's error) when they
    cannot be read (corruption).
    """
    import tensorstore as ts

    if not os.path.isfile(os.path.join(state_dir, "manifest.ocdbt")):
        raise ValueError("its state has no manifest.ocdbt")
    kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": state_dir}}
    keys = [key.decode() for key in ts.KvStore.open(kvstore).result().list().result()]
    drivers = {"/.zarray": "zarr", "/zarr.json": "zarr3"}
    saved = {key[: -len(suffix)]: driver for key in keys
             for suffix, driver in drivers.items() if key.endswith(suffix)}
    if not saved:
        raise ValueError("its state holds no arrays")
    wanted = {_param_name(path): leaf
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}

    def mismatch(detail: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"{where} was written with a different config: {detail}; resume with the "
            f"config it was written with, or use a new --workdir")

    # Parameters first: their names say most about the change (the optimizer's mirror them).
    def order(name):
        return (not name.startswith("params."), name)

    missing = sorted((name for name in wanted if name not in saved), key=order)
    extra = sorted((name for name in saved if name not in wanted), key=order)
    if missing or extra:
        detail = (f"this config has {missing[0]!r}, which it lacks" if missing
                  else f"it has {extra[0]!r}, which this config lacks")
        raise mismatch(f"{detail} ({len(missing)} missing, {len(extra)} extra arrays)")
    stores = []
    for name, leaf in wanted.items():
        store = ts.open({"driver": saved[name], "kvstore": {**kvstore, "path": name + "/"},
                         "open": True}).result()
        shape, dtype = tuple(store.shape), np.dtype(store.dtype.numpy_dtype)
        if shape != tuple(leaf.shape) or dtype != np.dtype(leaf.dtype):
            raise mismatch(f"{name} is {dtype.name}{list(shape)} there but "
                           f"{np.dtype(leaf.dtype).name}{list(leaf.shape)} in this config")
        stores.append(store)
    # Wait for every read, even after a failure, so that none is left running.
    errors, in_flight = [], collections.deque()

    def settle_oldest() -> None:
        try:
            in_flight.popleft().result()
        except Exception as error:  # noqa: BLE001 - raised below, after the wait
            errors.append(error)

    for store in stores:
        in_flight.append(store.read())
        if len(in_flight) >= _READS_IN_FLIGHT:
            settle_oldest()
    while in_flight:
        settle_oldest()
    if errors:
        raise errors[0]


def _param_name(path) -> str:
    """Orbax's name of the array at a pytree key path: the keys joined with dots."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > 160:
        text = text[:160] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

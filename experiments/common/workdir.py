"""The run's output folder (``--workdir``): checked before anything is written, and locked
so that one workdir holds one run at a time.

* Checks (one line each, ``WorkdirError``): an empty ``--workdir=``, a path that is a file,
  a folder this process cannot write, a ``config.json`` there that is not JSON.
* Lock: ``<workdir>/run.lock``, held with ``fcntl.flock`` for the whole run and holding the
  owner's pid, host and start time (for the message a second run prints). The kernel drops
  an flock when its process dies, however it dies (``kill -9`` included), so a lock file
  left behind by a killed run is free: the next run takes it over and resumes.
* On the way out the lock file is removed, and so is a workdir this run created and left
  empty; a run stopped by a bad config also removes the ``config.json`` it wrote, so that
  the workdir is as it was. (A ``config.json`` left by a run stopped for another reason
  before its first checkpoint, e.g. missing data, does not block a rerun with another
  config: ``runs.check_resume_config``.)

Multi-host: only process 0 of the launch locks (the workdir is usually shared); the others
run the checks. POSIX only (``fcntl``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

LOCK_NAME = "run.lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be used (the message says why and what to do)."""


@contextlib.contextmanager
def claimed_workdir(flag_value: str | None, default: str, config=None) -> Iterator[str]:
    """The workdir to write to, checked and locked for the ``with`` block.

    Args:
      flag_value: ``--workdir`` as given (None when the flag is absent, which means
        ``default``; an empty string is an error, not the default).
      default: the workdir when the flag is absent, e.g. ``runs/vit_cifar_quick``.
      config: the run's config; its ``distributed.process_id`` (or the launch environment)
        tells whether this process is the one that locks.

    Raises ``WorkdirError`` with one line when the workdir is unusable or in use.
    """
    from experiments.common.config import ConfigError

    workdir = resolve(flag_value, default)
    created = not os.path.exists(workdir)
    had_config = os.path.exists(os.path.join(workdir, "config.json"))
    lock = None
    try:
        check(workdir)
        lock = _Lock(workdir) if _locks(config) else None
        yield workdir
    except ConfigError:
        if not had_config:  # the record of a config that never ran
            with contextlib.suppress(OSError):
                os.remove(os.path.join(workdir, "config.json"))
        raise
    finally:
        if lock is not None:
            lock.release()
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(workdir)  # only if still empty


def resolve(flag_value: str | None, default: str) -> str:
    if flag_value is None:
        return default
    if not flag_value.strip():
        raise WorkdirError(
            f"--workdir is empty; give an output folder, or leave the flag out to use "
            f"{default}")
    return flag_value


def check(workdir: str) -> None:
    """Create ``workdir`` if missing; raise ``WorkdirError`` unless it is a writable folder
    whose ``config.json`` (if any) is JSON."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} is a file, not a folder; pass a folder "
                           f"(it is created if missing)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise WorkdirError(f"cannot create --workdir {workdir} ({error.strerror}); pass a "
                           f"folder you can write to") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {workdir} is not writable; pass a folder you can "
                           f"write to")
    config_path = os.path.join(workdir, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                recorded = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise WorkdirError(
                f"{config_path} (the config this workdir's run was started with) cannot be "
                f"read ({error}); restore it, or delete it to record the current config, or "
                f"use a new --workdir") from None
        if not isinstance(recorded, dict):
            raise WorkdirError(
                f"{config_path} holds a JSON {type(recorded).__name__}, not a config; "
                f"restore it, or delete it to record the current config, or use a new "
                f"--workdir")


def _locks(config) -> bool:
    """Whether this process takes the lock: process 0 of a multi-process launch, or a
    single process. A multi-process launch whose index cannot be told does not lock."""
    from experiments.common import sharding

    dist = getattr(config, "distributed", None)
    process_id = getattr(dist, "process_id", -1) if dist is not None else -1
    if isinstance(process_id, int) and process_id >= 0:
        return process_id == 0
    initialize = getattr(dist, "initialize", "auto") if dist is not None else "auto"
    if initialize == "never" or (initialize == "auto" and sharding.distributed_wanted() is None
                                 and not getattr(dist, "coordinator_address", "")):
        return True
    for var in ("JAX_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "TPU_WORKER_ID"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var]) == 0
    return False


class _Lock:
    """An exclusive flock on ``<workdir>/run.lock`` that records its owner."""

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, LOCK_NAME)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise WorkdirError(f"cannot write {self.path} ({error.strerror}); pass a "
                                   f"--workdir you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                raise WorkdirError(
                    f"--workdir {workdir} is in use by another run ({owner}); wait for it "
                    f"to end, stop it, or pass another --workdir") from None
            # The previous owner may have removed the file between our open and our lock:
            # then we hold a lock on a file no one else can see. Open the path again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _owner(fd)
        if previous != "owner unknown":
            from experiments.common.metrics import log

            log(f"{workdir}: taking over the lock of a run that ended without releasing it "
                f"({previous})")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
        }).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        # Remove the file while still holding the lock, then unlock by closing.
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self._fd)


def _owner(fd: int) -> str:
    """"pid N on host H, started T" from an open lock file, or "owner unknown"."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 65536).decode() or "null")
        return f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "owner unknown"

"""Run records: ``metrics.jsonl`` (one JSON object per line) and ``summary.json``.

Every record has "model" (which of the run's models), "kind" ("train" for a logging step,
"eval" for an evaluation, "sweep" for one point of an inference sweep), "step" and the
metric values. On resume the writer drops a model's records past the restored step, so
the file reads as if the run had never stopped.

Multi-host: only process 0 writes (records, JSON files) and prints (``log``); the other
processes' writers are no-ops, so every process can run the same code.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from typing import Any

import numpy as np


def _primary() -> bool:
    import jax

    return jax.process_index() == 0


def log(message: str) -> None:
    """Print a line (process 0 only) without breaking an active progress bar."""
    if not _primary():
        return
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def _plain(value: Any) -> Any:
    """JSON-friendly value: numpy/jax scalars to Python numbers; NaN/Inf to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "shape") and getattr(value, "shape", None) == ():
        value = np.asarray(value).item()
    elif hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends records to ``path`` (created with its folder if missing), flushing each line.
    On processes other than 0 it writes nothing (and drops nothing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.enabled = _primary()
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **_plain(record)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self, model: str | None = None, kind: str | None = None) -> list[dict]:
        return read_records(self.path, model=model, kind=kind)

    def drop_after(self, model: str, step: int) -> int:
        """Remove ``model``'s records with step > ``step`` (resume); returns how many."""
        return self._drop(lambda r: r.get("model") == model and r.get("step", -1) > step)

    def drop_kind(self, model: str, kind: str) -> int:
        """Remove ``model``'s records of ``kind`` (e.g. a sweep about to be redone)."""
        return self._drop(lambda r: r.get("model") == model and r.get("kind") == kind)

    def _drop(self, predicate) -> int:
        if not self.enabled or not os.path.exists(self.path):
            return 0
        kept, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                record = _parse(line)
                if record is None or predicate(record):  # a line cut by a kill goes too
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        return dropped


def read_records(path: str, model: str | None = None, kind: str | None = None) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            record = _parse(line) if line.strip() else None
            if record is None:  # blank, or the last line of a killed run, cut short
                continue
            if model is not None and record.get("model") != model:
                continue
            if kind is not None and record.get("kind") != kind:
                continue
            out.append(record)
    return out


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def versions() -> dict:
    """Versions of Python and the libraries a result depends on."""
    import flax
    import jax
    import optax

    import bdia_jax

    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _dist_version("jaxlib"),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": _dist_version("orbax-checkpoint"),
        "bdia_jax": bdia_jax.__version__,
    }
    try:
        import tensorflow_datasets

        out["tensorflow_datasets"] = tensorflow_datasets.__version__
    except ImportError:
        pass
    return out


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_info(mesh=None) -> dict:
    """Backend, device counts (this process's and the job's), and the mesh axes."""
    import jax

    devices = jax.local_devices()
    out = {
        "backend": jax.default_backend(),
        "num_devices": len(devices),
        "num_global_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "device_kind": devices[0].device_kind if devices else None,
    }
    if mesh is not None:
        out["mesh"] = {str(k): int(v) for k, v in mesh.shape.items()}
    return out


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` atomically (tmp file + rename); process 0 only."""
    if not _primary():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_plain(payload), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)

"""Run one measurement per device count, each in its own process.

XLA fixes the number of host (CPU) devices when its backend starts, so a benchmark that
compares 1, 2, 4 and 8 devices starts one worker process per count. ``fan_out`` does that
from the parent; the worker calls ``host_devices`` before it touches JAX. Used by
``benchmarks.sharding_memory`` and ``benchmarks.train_step_memory``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def host_devices(num_devices: int) -> list:
    """Ask XLA for ``num_devices`` host devices and return them (raises if it gave fewer).

    Must run before the JAX backend starts in this process (the flag is read then).
    """
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    )
    import jax

    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise RuntimeError(f"asked for {num_devices} devices, found {len(jax.devices())}")
    return devices


def fan_out(module: str, counts: list[int], args, forwarded: tuple[str, ...]) -> list[dict]:
    """Run ``python -m <module> --worker <count>`` for every count, forwarding the
    ``forwarded`` fields of ``args`` as flags; each worker prints one JSON line last.
    Returns the parsed lines in the order of ``counts``."""
    rows = []
    for count in counts:
        cmd = [sys.executable, "-m", module, "--worker", str(count)]
        for name in forwarded:
            cmd += [f"--{name}", str(getattr(args, name))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{module}: the worker for {count} devices failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"measured {count} device(s)", flush=True)
    return rows


def measure(module: str, parser: argparse.ArgumentParser, worker, forwarded: tuple[str, ...],
            argv=None):
    """The command line of a per-device-count benchmark: adds ``--devices`` (each count
    must divide ``--batch``) and the hidden ``--worker``, parses ``argv``. In a worker:
    prints ``worker(count, args)`` as one JSON line and returns ``(args, None)``; in the
    parent: returns ``(args, rows)`` from ``fan_out`` over the counts."""
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return args, None
    counts = [int(c) for c in args.devices.split(",")]
    for c in counts:
        if args.batch % c:
            parser.error(f"--batch {args.batch} is not divisible by {c} devices")
    return args, fan_out(module, counts, args, forwarded)

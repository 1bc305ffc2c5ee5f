"""Memory figures of a training step: the one place that reads and sums them.

* ``compiled_memory`` – XLA's memory analysis of the compiled step, on any backend, per
  device: argument (inputs incl. the donated state), output, temp (activations and other
  scratch that lives only during the step), alias (outputs written into donated inputs),
  and ``peak_estimate_bytes = argument + output + temp - alias``. ``temp_bytes`` is the part
  that the reversible backward pass shrinks.
* ``device_memory`` – the runtime's ``memory_stats()`` (GPU/TPU; CPU returns none): the
  process-lifetime ``peak_bytes_in_use`` over the local devices. It cannot be reset, so when
  several models train in one process the later ones report the larger of their own peak
  and the earlier ones'.
* ``step_memory`` – ``compiled_memory`` of a jitted function at given arguments (the
  benchmarks), raising where the backend has no analysis.
* ``memory_only_options`` – compiler options for a step compiled only to be measured.
"""

from __future__ import annotations

import jax


def compiled_memory(compiled) -> dict | None:
    """Per-device bytes from ``compiled.memory_analysis()`` (None if unavailable)."""
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if analysis is None:
        return None
    fields = {
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "temp_bytes": "temp_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
    }
    out = {name: int(getattr(analysis, attr, 0) or 0) for name, attr in fields.items()}
    out["peak_estimate_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def memory_only_options() -> dict | None:
    """``compiler_options`` for a step compiled only to read its ``memory_analysis()``, never
    run: on XLA:CPU, LLVM -O0. XLA:CPU assigns buffers on the optimized HLO, before LLVM
    generates code, so every figure but ``generated_code_bytes`` is the same, for a fraction
    of the compile. Other backends: None (their defaults). The persistent compilation cache
    keys on these options, so such an executable is never handed to a call that runs."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def step_memory(jitted, *args, compiler_options: dict | None = None) -> dict:
    """``compiled_memory`` of ``jitted.lower(*args).compile(compiler_options)`` (arguments
    may be ``jax.ShapeDtypeStruct``s); RuntimeError when the backend gives no analysis."""
    figures = compiled_memory(jitted.lower(*args).compile(compiler_options=compiler_options))
    if figures is None:
        raise RuntimeError("this backend gives no compiled memory_analysis()")
    return figures


def device_memory() -> dict | None:
    """``{"peak_bytes_in_use", "bytes_in_use", "bytes_limit"}`` (max over local devices),
    or None when the backend has no ``memory_stats()`` (e.g. CPU)."""
    stats = []
    for device in jax.local_devices():
        try:
            s = device.memory_stats()
        except (NotImplementedError, RuntimeError, AttributeError):
            s = None
        if s:
            stats.append(s)
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: max(int(s.get(k, 0)) for s in stats) for k in keys if any(k in s for s in stats)}


def megabytes(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20

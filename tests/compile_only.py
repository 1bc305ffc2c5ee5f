"""Compiles whose program is only measured (its memory analysis), never run.

XLA:CPU assigns buffers on the optimized HLO, before LLVM generates the machine code, so
LLVM's optimization level cannot change a compiled memory analysis; at -O0 the code
generation, most of a compile, is several times cheaper. Only for programs that never run:
-O0 code rounds differently (tests/conftest.py). The persistent compilation cache keys on
these options, so no -O0 executable is ever handed to a program that runs.
"""

from __future__ import annotations

import jax

MEMORY_ONLY = {"xla_backend_optimization_level": 0}
# The same for a whole subprocess whose compiles are all only measured (after the
# suite's XLA flags: the last occurrence of a flag wins).
MEMORY_ONLY_XLA_FLAG = "--xla_backend_optimization_level=0"


def compile_for_memory(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """``lowered.compile()`` at ``MEMORY_ONLY``: read its ``memory_analysis()``, never call it."""
    return lowered.compile(compiler_options=MEMORY_ONLY)


def memory_only_compiles(monkeypatch) -> None:
    """For the rest of the test, every ``Lowered.compile()`` given no options compiles at
    ``MEMORY_ONLY``: for library code (benchmarks) that compiles steps only to read their
    memory. Jitted calls do not go through it; a test whose code also runs what it compiled
    this way must not use it."""
    original = jax.stages.Lowered.compile

    def compile(self, compiler_options=None, **kwargs):
        return original(self, compiler_options=compiler_options or MEMORY_ONLY, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile)

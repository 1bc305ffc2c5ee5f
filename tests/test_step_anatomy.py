"""benchmarks.step_anatomy: executed counts from the optimized HLO (a while body weighted
by its trip count), and the remat/BDIA dot comparison at the tiny test shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from compile_only import memory_only_compiles

from benchmarks import step_anatomy as sa


def test_loop_body_dots_count_once_per_trip():
    def f(a, b):
        return jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ b), a)

    a, b = jnp.ones((8, 16)), jnp.ones((16, 16))
    result = sa.anatomy(jax.jit(f).lower(a, b).compile().as_text())
    assert result["totals"]["dot_flops"] == 3 * 2 * 8 * 16 * 16
    assert result["totals"]["element_ops"] >= 3 * 8 * 16  # the tanh of every trip


@pytest.mark.parametrize("recompute, extra_projections", [("shared", 3), ("fused", 1)])
def test_bdia_recomputes_what_its_rebuild_needs_beyond_remat(monkeypatch, recompute,
                                                             extra_projections):
    # The steps are only read (their optimized HLO), never run: -O0 (tests/compile_only.py);
    # the HLO, costs and memory are the same as at the suite's level.
    memory_only_compiles(monkeypatch)
    # test-tiny with 8-position chunks, so that the MLP runs over position blocks. The
    # reversible rebuild needs each block's output; remat only the chunked MLP's own
    # recomputation under its VJP. "shared" runs the MLP's whole forward for it besides
    # (its three projections); "fused" gets it from that recomputation, adding only the
    # down projection.
    depth, batch, context = 4, 2, 16
    data = sa.measure("test-tiny", [depth], batch, context, dict(
        compute_dtype="float32", attention_chunk=8, loss_chunk=512, unchunked_mlp=[],
        bdia_recompute=recompute))
    fields = sa.mc.SHAPES["test-tiny"][0]
    projection = 2 * batch * context * fields["width"] * fields["mlp_dim"]

    def dots(method, role):
        return sum(v for k, v in data[f"{method}@{depth}"]["dots"].items() if k.endswith(role))

    for role in ("forward", "gradient"):
        assert dots("bdia", role) == dots("remat", role) > 0
    assert (dots("bdia", "recompute") - dots("remat", "recompute")
            == depth * extra_projections * projection)

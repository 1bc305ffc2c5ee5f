"""Property-based tests of the engine (hypothesis): exact whenever no overflow is reported,
and an inexact reversal is always accompanied by an overflow report."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bdia_jax
from bdia_jax import engine, fixed_point
from bdia_jax.testing import bits, init_mlp, make_tanh_block

# Shapes are drawn from small sets so that jit caches are reused across examples.
_settings = settings(max_examples=12, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(
    depth=st.sampled_from([1, 2, 3, 5, 9]),
    batch=st.sampled_from([1, 2, 3]),
    dim=st.sampled_from([4, 8]),
    gamma=st.sampled_from([0.5, 0.25]),
    frac_bits=st.sampled_from([0, 4, 9, 14]),
    log_scale=st.floats(min_value=-4.0, max_value=1.05),  # up to ~1.1x the exact range
    amplitude=st.floats(min_value=0.01, max_value=0.5),
    seed=st.integers(0, 2**16),
)
def test_reversal_exact_unless_overflow_reported(depth, batch, dim, gamma, frac_bits, log_scale,
                                                 amplitude, seed):
    limit = fixed_point.exact_range(jnp.float32, frac_bits)
    scale = limit * 10.0 ** (log_scale - 1.0)  # input magnitudes from 1e-5·limit to ~1.1·limit
    key = jax.random.PRNGKey(seed)
    params = init_mlp(jax.random.fold_in(key, 1), depth, dim)
    block = make_tanh_block(amplitude=scale * amplitude)
    x = jax.random.normal(jax.random.fold_in(key, 2), (batch, 3, dim)) * scale
    keys, gammas = engine.prepare_keys_and_gammas(jax.random.fold_in(key, 3), depth, batch,
                                                  gamma)
    pair = dict(update=bdia_jax.BDIA(gamma=gamma, frac_bits=frac_bits), keys=keys,
                gammas=gammas)
    x0 = fixed_point.quantize(x, frac_bits)
    states = _all_states(block, params, x0, **pair)
    record = _forward(block, params, x0, **pair)
    rebuilt = _invert(block, params, record, **pair)
    exact = bool(np.array_equal(np.asarray(bits(rebuilt)), np.asarray(bits(states))))
    overflow = bool(record.stats.overflow)
    # Exact whenever no overflow is reported (equivalently: inexact ⇒ overflow reported).
    assert exact or overflow, (float(record.stats.max_abs), limit)
    # The flag agrees with the states it summarises.
    assert overflow == bool(record.stats.max_abs >= limit)


_STATIC = dict(static_argnums=(0,), static_argnames=("update",))
_all_states = jax.jit(engine.bdia_all_states, **_STATIC)
_forward = jax.jit(engine.bdia_forward, **_STATIC)
_invert = jax.jit(engine.bdia_invert, **_STATIC)

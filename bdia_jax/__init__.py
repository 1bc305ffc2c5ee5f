"""bdia_jax: exact bit-level reversible BDIA-transformer training in JAX/Flax.

Core (pure JAX): ``bdia_stack``, ``standard_stack`` and the fixed-point helpers.
Models (Flax NNX): ``bdia_jax.models``.
"""

from bdia_jax import fixed_point, stable
from bdia_jax.fixed_point import exact_range, quantize
from bdia_jax.stack import (
    BACKPROP_METHODS,
    RECOMPUTE_MODES,
    EncodedStack,
    StackStats,
    bdia_decode,
    bdia_encode,
    bdia_forward_states,
    bdia_stack,
    draw_gammas,
    make_spec,
    prepare_keys_and_gammas,
    standard_stack,
)

__version__ = "0.1.0"

__all__ = [
    "BACKPROP_METHODS",
    "RECOMPUTE_MODES",
    "EncodedStack",
    "StackStats",
    "bdia_decode",
    "bdia_encode",
    "bdia_forward_states",
    "bdia_stack",
    "draw_gammas",
    "exact_range",
    "fixed_point",
    "make_spec",
    "prepare_keys_and_gammas",
    "quantize",
    "stable",
    "standard_stack",
]

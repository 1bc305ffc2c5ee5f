"""bdia_jax: exact bit-level reversible BDIA-transformer training in JAX/Flax.

Core (pure JAX): the method objects (``bdia_jax.methods``), ``apply_stack`` and its keyword
forms ``bdia_stack`` / ``standard_stack`` (``bdia_jax.engine``), the fixed-point helpers, and
the chunked tied-head loss (``bdia_jax.chunked_loss``).
Models (Flax NNX): ``bdia_jax.models``.
"""

from bdia_jax import chunked_loss, fixed_point, stable
from bdia_jax.chunked_loss import chunked_cross_entropy, chunked_token_losses
from bdia_jax.engine import (
    ForwardRecord,
    StackStats,
    apply_stack,
    bdia_all_states,
    bdia_forward,
    bdia_invert,
    bdia_stack,
    draw_gammas,
    prepare_keys_and_gammas,
    standard_stack,
)
from bdia_jax.fixed_point import exact_range, quantize
from bdia_jax.methods import (
    BACKPROP_METHODS,
    BDIA,
    RECOMPUTE_MODES,
    Autodiff,
    Backprop,
    Remat,
    Reversible,
    StackMethod,
    Standard,
    Update,
    check_method,
    default_backprop,
    method_from_flat,
)

__version__ = "0.1.0"

__all__ = [
    "BACKPROP_METHODS",
    "BDIA",
    "RECOMPUTE_MODES",
    "Autodiff",
    "Backprop",
    "ForwardRecord",
    "Remat",
    "Reversible",
    "StackMethod",
    "StackStats",
    "Standard",
    "Update",
    "apply_stack",
    "bdia_all_states",
    "bdia_forward",
    "bdia_invert",
    "bdia_stack",
    "check_method",
    "chunked_cross_entropy",
    "chunked_loss",
    "chunked_token_losses",
    "default_backprop",
    "draw_gammas",
    "exact_range",
    "fixed_point",
    "method_from_flat",
    "prepare_keys_and_gammas",
    "quantize",
    "stable",
    "standard_stack",
]

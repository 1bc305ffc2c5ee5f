"""bdia_jax: exact bit-level reversible BDIA-transformer training in JAX/Flax.

The top level is the core API, one way to do each thing:

* ``apply_stack`` runs K residual blocks and returns ``(x_K, StackStats)``;
* the update (``Standard``, ``BDIA``) and the gradient method (``Autodiff``, ``Remat``,
  ``Reversible``) are values that ``apply_stack`` and the models take;
* ``parse_method`` builds them from strings (a config file, a command line).

Everything else lives in submodules: ``bdia_jax.methods`` (the method types and checks),
``bdia_jax.engine`` (``apply_stack`` and the reversible forward/inverse pair for tests and
debugging), ``bdia_jax.fixed_point``, ``bdia_jax.step``, ``bdia_jax.stable``,
``bdia_jax.chunked_loss``, ``bdia_jax.revnet``, and the Flax NNX models in
``bdia_jax.models`` (imported on demand: the core needs no Flax). Names that moved keep a
deprecated alias here for one release.
"""

import importlib
import warnings

# Submodules, reachable as bdia_jax.<name> after `import bdia_jax`.
from bdia_jax import chunked_loss, engine, fixed_point, methods, stable  # noqa: F401
from bdia_jax.engine import StackStats, apply_stack
from bdia_jax.methods import BDIA, Autodiff, Remat, Reversible, Standard, parse_method

__version__ = "0.1.0"

__all__ = [
    "BDIA",
    "Autodiff",
    "Remat",
    "Reversible",
    "StackStats",
    "Standard",
    "apply_stack",
    "parse_method",
]

# Top-level names of 0.1.0 that moved: old name -> (module, name there). Each resolves, with a
# DeprecationWarning, for one release.
_MOVED = {
    "BACKPROP_METHODS": ("bdia_jax.methods", "BACKPROPS"),
    "RECOMPUTE_MODES": ("bdia_jax.methods", "RECOMPUTE_MODES"),
    "Backprop": ("bdia_jax.methods", "Backprop"),
    "Update": ("bdia_jax.methods", "Update"),
    "StackMethod": ("bdia_jax.methods", "StackMethod"),
    "check_method": ("bdia_jax.methods", "check_method"),
    "default_backprop": ("bdia_jax.methods", "default_backprop"),
    "method_from_flat": ("bdia_jax", "_method_from_flat"),
    "ForwardRecord": ("bdia_jax.engine", "ForwardRecord"),
    "bdia_all_states": ("bdia_jax.engine", "bdia_all_states"),
    "bdia_forward": ("bdia_jax.engine", "bdia_forward"),
    "bdia_invert": ("bdia_jax.engine", "bdia_invert"),
    "draw_gammas": ("bdia_jax.engine", "draw_gammas"),
    "prepare_keys_and_gammas": ("bdia_jax.engine", "prepare_keys_and_gammas"),
    "chunked_cross_entropy": ("bdia_jax.chunked_loss", "chunked_cross_entropy"),
    "chunked_token_losses": ("bdia_jax.chunked_loss", "chunked_token_losses"),
    "exact_range": ("bdia_jax.fixed_point", "exact_range"),
    "quantize": ("bdia_jax.fixed_point", "quantize"),
}
# Removed in 0.2.0: the keyword forms of apply_stack (a second spelling of the method, and a
# return type that depended on a flag).
_REMOVED = {
    "bdia_stack": "bdia_jax.bdia_stack was removed: call bdia_jax.apply_stack(block_fn, params, "
                  "x, update=BDIA(gamma, frac_bits), backprop=Reversible(), key=..., "
                  "reversal_probe=...) and read (x_K, StackStats).",
    "standard_stack": "bdia_jax.standard_stack was removed: call bdia_jax.apply_stack(block_fn, "
                      "params, x, update=Standard(), backprop=Autodiff(), key=...) and read "
                      "(x_K, StackStats).",
}


def _method_from_flat(*, probe=True, **keywords):
    """0.1.0's method_from_flat: (update, backprop), the pair checked; ``probe`` is now
    ``Reversible.reversal_probe``. Use bdia_jax.parse_method."""
    backprop = keywords.get("backprop")
    reversible = backprop == "reversible" or backprop is None and keywords.get(
        "update", "bdia") == "bdia" and keywords.get("frac_bits", 9) is not None
    fields = dict(keywords, reversal_probe=probe) if reversible else keywords
    if not reversible:
        fields.pop("recompute", None)
    if keywords.get("update") == "standard":
        fields = {k: v for k, v in fields.items() if k in ("update", "backprop")}
    method = parse_method(**fields)
    methods.check_method(method["update"], method["backprop"])
    return method["update"], method["backprop"]


def __getattr__(name):
    if name in _MOVED:
        module, new = _MOVED[name]
        target = "bdia_jax.parse_method" if name == "method_from_flat" else f"{module}.{new}"
        warnings.warn(f"bdia_jax.{name} moved to {target}; the alias goes in the next "
                      "release.", DeprecationWarning, stacklevel=2)
        value = getattr(importlib.import_module(module), new)
        return tuple(value) if name == "BACKPROP_METHODS" else value
    if name in _REMOVED:
        raise AttributeError(_REMOVED[name])
    raise AttributeError(f"module 'bdia_jax' has no attribute {name!r}")

"""How a residual stack trains: the update rule and the gradient method, as validated objects.

Two frozen dataclasses describe the update (``Standard`` or ``BDIA``) and three the gradient
method (``Autodiff``, ``Remat`` or ``Reversible``). Each checks its own fields once, in
``__post_init__``; ``check_method`` is the one check of a pair. The engine
(``bdia_jax.engine.apply_stack``), ``bdia_jax.models.ResidualStack`` and the model configs
(through ``StackMethod``) take these objects and pass them on unchanged.
``method_from_flat`` turns the plain keyword form (strings and numbers) into objects.

    from bdia_jax import BDIA, Reversible
    update, backprop = BDIA(gamma=0.5, frac_bits=9), Reversible(recompute="shared")
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

import jax.numpy as jnp

from bdia_jax import fixed_point

UPDATE_NAMES = ("standard", "bdia")
BACKPROP_METHODS = ("reversible", "autodiff", "remat")
RECOMPUTE_MODES = ("separate", "shared")
MAX_SIDE_BITS = 8  # side bits are packed from uint8 values: |γ| >= 2**-8


@dataclasses.dataclass(frozen=True)
class Standard:
    """The conventional residual update x_{k+1} = x_k + h_k(x_k), unquantized."""


@dataclasses.dataclass(frozen=True)
class BDIA:
    """The BDIA update x_{k+1} = γ x_{k-1} + (1-γ) x_k + (1+γ) h_k(x_k), γ = ±gamma drawn
    per sample and block in training (x_1 = x_0 + h_0(x_0)); γ = 0 at inference.

    gamma: |γ|, a real in [0, 1). Exact reversal (``Reversible``) needs a power of two
      2**-m, 1 <= m <= 8; any other value (0 included: the paper's Table 2 ablation) trains
      with ``Autodiff`` or ``Remat``.
    frac_bits: l of the fixed-point grid δ = 2**-l, an int 0 … 48 (the stream dtype's
      limit, ``fixed_point.MAX_FRAC_BITS``, is checked where the dtype is known: 20 for the
      float32 streams of the models); None is the unquantized ablation (no grid at all).
    quantize_at_inference: at inference keep the stream on the grid (x_0 = Q(x),
      x_{k+1} = x_k + Q(h)); False gives exactly the standard transformer. Read only when
      frac_bits is set.

    On the grid the training update is, with |γ| = 2**-m (invertible, m side bits s):
        x_{k+1} = γ (x_{k-1} - s δ) + Q((1-γ) x_k + (1+γ) h_k(x_k)),
    and for any other γ (no inverse, one rounding):
        x_{k+1} = Q(γ x_{k-1} + (1-γ) x_k + (1+γ) h_k(x_k)).
    Without a grid both are the real-arithmetic update.
    """

    gamma: float = 0.5
    frac_bits: int | None = 9
    quantize_at_inference: bool = True

    def __post_init__(self):
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, numbers.Real):
            raise ValueError(f"BDIA gamma must be a Python float such as 0.5 or 0.25, got {g!r}.")
        if g < 0:
            raise ValueError(
                f"BDIA gamma is |γ| (the sign of γ is drawn per sample), got {g}; use "
                f"gamma={-g}."
            )
        if not g < 1:
            raise ValueError(
                f"BDIA gamma must be in [0, 1) (e.g. 0.5 or 0.25), got {g}; at |γ| >= 1 the "
                "update no longer damps x_{k-1}."
            )
        fb = self.frac_bits
        if fb is not None:
            if isinstance(fb, bool) or not isinstance(fb, numbers.Integral):
                raise ValueError(f"frac_bits must be an int (e.g. 9) or None, got {fb!r}.")
            # The widest stream's limit; a float32 stream's is checked where it is known.
            fixed_point.check_frac_bits(fb, jnp.float64)
        if not isinstance(self.quantize_at_inference, bool):
            raise ValueError(
                f"quantize_at_inference must be True or False, got "
                f"{self.quantize_at_inference!r}."
            )

    @property
    def side_bits(self) -> int | None:
        """m with gamma = 2**-m, 1 <= m <= 8 (the invertible grid update); else None."""
        if self.gamma == 0:
            return None
        m = -math.log2(self.gamma)
        return int(round(m)) if m == round(m) and 1 <= round(m) <= MAX_SIDE_BITS else None


@dataclasses.dataclass(frozen=True)
class Autodiff:
    """Plain JAX autodiff through the stored activations (the oracle of ``Reversible``)."""


@dataclasses.dataclass(frozen=True)
class Remat:
    """Per-block ``jax.checkpoint``: keeps one state per block, recomputes the block."""


@dataclasses.dataclass(frozen=True)
class Reversible:
    """A custom VJP that rebuilds x_{k-1} from (x_k, x_{k+1}) bit for bit (BDIA on the grid,
    |γ| = 2**-m only): activation memory constant in depth apart from m bits per element.

    recompute: how the backward pass gets h_k(x_k). "separate" (the default because it is
      exact for any block) runs the forward pass's own fenced call, then the block's VJP;
      "shared" takes the VJP's primal output, one block forward cheaper, exact when the
      block's statistics use ``bdia_jax.stable`` (the models' blocks do).
    probe: keep x_0 (one state) so that the gradient of the engine's ``reversal_probe``
      scalar is the largest |rebuilt - forward| of x_0, the last state rebuilt (0.0 when
      exact).
    """

    recompute: Literal["separate", "shared"] = "separate"
    probe: bool = True

    def __post_init__(self):
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(
                f"recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}: "
                "'separate' is exact for any block; 'shared' saves one block forward per "
                "block when the block's statistics use bdia_jax.stable."
            )
        if not isinstance(self.probe, bool):
            raise ValueError(f"Reversible probe must be True or False, got {self.probe!r}.")


Update = Standard | BDIA
Backprop = Autodiff | Remat | Reversible


def check_method(update: Update, backprop: Backprop) -> None:
    """The one check of an (update, backprop) pair; raises a one-line ValueError."""
    if not isinstance(update, (Standard, BDIA)):
        raise ValueError(
            f"update must be bdia_jax.Standard() or bdia_jax.BDIA(...), got {update!r}; "
            "method_from_flat(update='bdia', ...) builds one from strings."
        )
    if not isinstance(backprop, (Autodiff, Remat, Reversible)):
        raise ValueError(
            f"backprop must be bdia_jax.Autodiff(), Remat() or Reversible(...), got "
            f"{backprop!r}; method_from_flat(backprop='reversible', ...) builds one from strings."
        )
    if not isinstance(backprop, Reversible):
        return
    if isinstance(update, Standard):
        raise ValueError(
            "backprop=Reversible() needs update=BDIA(...): the standard update "
            "x_{k+1} = x_k + h(x_k) has no exact inverse; use Autodiff() or Remat()."
        )
    if update.frac_bits is None:
        raise ValueError(
            "backprop=Reversible() needs the fixed-point grid: set BDIA(frac_bits=9) (e.g.), "
            "or use Autodiff()/Remat() for the unquantized ablation."
        )
    if update.gamma == 0:
        raise ValueError(
            "backprop=Reversible() needs gamma != 0 (the update is not invertible at γ = 0); "
            "use gamma=0.5 or 0.25, or Autodiff()/Remat() for the γ = 0 ablation."
        )
    if update.side_bits is None:
        raise ValueError(
            f"backprop=Reversible() needs gamma = 2**-m with 1 <= m <= {MAX_SIDE_BITS} (e.g. "
            f"0.5 or 0.25), got {update.gamma}: the inverse divides by γ and only powers of "
            "two divide exactly; use Autodiff()/Remat() for other γ."
        )


def default_backprop(update: Update) -> Backprop:
    """Reversible() for BDIA on a grid, Autodiff() otherwise (nothing to invert).

    γ plays no part: a BDIA grid update whose γ has no exact inverse (0.3, 0) then fails in
    ``check_method`` and names the fix, instead of quietly training without reversal.
    """
    if isinstance(update, BDIA) and update.frac_bits is not None:
        return Reversible()
    return Autodiff()


def method_from_flat(*, update="bdia", backprop=None, gamma=0.5, frac_bits=9,
                     quantize_at_inference=True, recompute="separate", probe=True
                     ) -> tuple[Update, Backprop]:
    """The plain keyword form (strings and numbers) → validated (update, backprop) objects.

    update: "standard" | "bdia". gamma, frac_bits, quantize_at_inference are read only for
    "bdia". backprop: "reversible" | "autodiff" | "remat", or None for ``default_backprop``
    (Reversible for BDIA on a grid, else Autodiff). recompute and
    probe are read only for "reversible" (and for None when that resolves to Reversible).
    """
    if update not in UPDATE_NAMES:
        raise ValueError(f"update must be one of {UPDATE_NAMES}, got {update!r}.")
    if backprop is not None and backprop not in BACKPROP_METHODS:
        raise ValueError(f"backprop must be one of {BACKPROP_METHODS} or None, got {backprop!r}.")
    upd = Standard() if update == "standard" else BDIA(gamma, frac_bits, quantize_at_inference)
    if backprop is None:
        backprop = "reversible" if isinstance(default_backprop(upd), Reversible) else "autodiff"
    if backprop == "reversible":
        bp = Reversible(recompute=recompute, probe=probe)
    else:
        bp = Autodiff() if backprop == "autodiff" else Remat()
    check_method(upd, bp)
    return upd, bp


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackMethod:
    """The two method fields of a model config (ViTConfig, GPTConfig, Seq2SeqConfig).

    update: Standard() | BDIA(...). backprop: Autodiff() | Remat() | Reversible(...), or None
    for ``default_backprop(update)`` (resolved here, so the stored config is explicit).
    The models' residual streams are float32, so frac_bits is checked against float32's
    limit here, at construction.
    """

    update: Update = BDIA()
    backprop: Backprop | None = None

    def __post_init__(self):
        if self.backprop is None:
            object.__setattr__(self, "backprop", default_backprop(self.update))
        check_method(self.update, self.backprop)
        if isinstance(self.update, BDIA) and self.update.frac_bits is not None:
            fixed_point.check_frac_bits(self.update.frac_bits, jnp.float32)


FLAT_METHOD_FIELDS = ("gamma", "frac_bits", "quantize_at_inference", "recompute", "probe")


def method_overrides(overrides: dict) -> dict:
    """Turn a ``*_config(name, **overrides)`` dict's flat method keywords (update="bdia",
    backprop="reversible", gamma=..., frac_bits=..., ...) into update/backprop objects.

    Objects (update=BDIA(...)) pass through unchanged; mixing objects with flat keywords
    raises. Returns a new dict with no flat method keys.
    """
    out = dict(overrides)
    flat = {k: out.pop(k) for k in FLAT_METHOD_FIELDS if k in out}
    named = {k: out[k] for k in ("update", "backprop") if isinstance(out.get(k), str)}
    objects = [k for k in ("update", "backprop") if out.get(k) is not None and k not in named]
    if not flat and not named:
        return out
    if objects:
        raise ValueError(
            f"give the method either as objects (update=BDIA(...), backprop=Reversible(...)) "
            f"or as flat keywords, not both: got {objects[0]}={out[objects[0]]!r} with "
            f"{sorted({**flat, **named})}."
        )
    out["update"], out["backprop"] = method_from_flat(
        update=out.get("update", "bdia"), backprop=out.get("backprop"), **flat)
    return out

"""How a residual stack trains: the update rule and the gradient method, as validated values.

Two frozen dataclasses describe the update (``Standard`` or ``BDIA``) and three the gradient
method (``Autodiff``, ``Remat`` or ``Reversible``). Each checks its own fields once, in
``__post_init__``; ``check_method`` is the one check of a pair.

Both carry their behaviour (diffrax's solvers and adjoints are the model). An update picks
the pass a stack kernel runs (``Update.stack_pass``: BDIA's training update, or the
inference update on its grid) and says what its callers need (``has_gamma``: a γ draw that
needs a key, an inference-γ sweep; ``inference_frac_bits``). A gradient method runs that
pass: a stack kernel (``bdia_jax.engine.apply_stack``, ``bdia_jax.revnet.revnet_stack``)
describes one pass as a ``StackPass`` and calls ``backprop.run(stack_pass)``. ``Autodiff``
lets JAX differentiate the stored activations, ``Remat`` wraps each block's call in
``jax.checkpoint``, ``Reversible`` runs the kernel's custom VJP, which gets each block's
output and VJP from ``Reversible.output_and_vjp``. A new gradient method is one ``Backprop``
subclass; a new update is one ``Update`` subclass (plus, for a new kind of pass, a method
of the kernel's ``StackKernel``).

Strings become objects in one place, ``parse_method`` (the config boundary: the experiments'
``config.methods`` entries, ``load_gpt2``'s overrides, the models' ``*_config(name, ...)``).

    from bdia_jax import BDIA, Reversible
    update, backprop = BDIA(gamma=0.5, frac_bits=9), Reversible(recompute="shared")
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp

from bdia_jax import fixed_point

RECOMPUTE_MODES = ("separate", "shared", "fused")
MAX_SIDE_BITS = 8  # side bits are packed from uint8 values: |γ| >= 2**-8


class StackKernel(Protocol):
    """The passes a stack kernel (``bdia_jax.engine.apply_stack``) offers an update, which
    picks one in ``Update.stack_pass``; a gradient method then runs it (``Backprop.run``)."""

    def inference(self, frac_bits: int | None) -> StackPass:
        """x_{k+1} = x_k + h_k(x_k) (γ = 0, or the kernel's explicit inference γ), on the
        grid δ = 2**-frac_bits (x_0 = Q(x), each h quantized) or unquantized (None)."""

    def training(self, update: BDIA) -> StackPass:
        """The BDIA training update of ``update``, γ = ±gamma per sample and block."""


class Update(abc.ABC):
    """A residual update rule: ``stack_pass`` picks the pass a stack kernel runs.

    has_gamma: the update has a γ term, so a training pass draws ±γ per sample and block
    (it needs a PRNG key) and an inference pass takes an explicit γ (the inference-γ sweep).
    """

    has_gamma: bool = False

    @abc.abstractmethod
    def stack_pass(self, kernel: StackKernel, train: bool) -> StackPass:
        """The pass of ``kernel`` that this update runs in training (``train``) or inference."""

    @property
    def inference_frac_bits(self) -> int | None:
        """l of the grid δ = 2**-l on which inference keeps the stream; None: unquantized."""
        return None

    def check_stream_dtype(self, dtype) -> None:  # noqa: B027 (a hook: Standard has no grid)
        """Raise a one-line ValueError if the update's grid does not fit a ``dtype`` stream."""


@dataclasses.dataclass(frozen=True)
class Standard(Update):
    """The conventional residual update x_{k+1} = x_k + h_k(x_k), unquantized: the same
    pass in training and inference."""

    def stack_pass(self, kernel: StackKernel, train: bool) -> StackPass:
        return kernel.inference(None)


@dataclasses.dataclass(frozen=True)
class BDIA(Update):
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

    has_gamma = True

    def stack_pass(self, kernel: StackKernel, train: bool) -> StackPass:
        return kernel.training(self) if train else kernel.inference(self.inference_frac_bits)

    @property
    def inference_frac_bits(self) -> int | None:
        return self.frac_bits if self.quantize_at_inference else None

    def check_stream_dtype(self, dtype) -> None:
        if self.frac_bits is not None:
            fixed_point.check_frac_bits(self.frac_bits, dtype)

    @property
    def side_bits(self) -> int | None:
        """m with gamma = 2**-m, 1 <= m <= 8 (the invertible grid update); else None."""
        if self.gamma == 0:
            return None
        m = -math.log2(self.gamma)
        return int(round(m)) if m == round(m) and 1 <= round(m) <= MAX_SIDE_BITS else None


class StackPass(Protocol):
    """One pass of a stack kernel, as a gradient method sees it (see ``Backprop.run``)."""

    def stored(self, wrap_block: Callable[[Callable], Callable]) -> Any:
        """The pass for JAX to differentiate from its stored activations, each block called
        through ``wrap_block(call)``."""

    def reversible(self, method: Reversible) -> Any:
        """The pass under the kernel's custom VJP, whose backward pass rebuilds each block's
        input from its output and gets the block's output and VJP from
        ``method.output_and_vjp``."""


class Backprop(abc.ABC):
    """How a stack is differentiated: ``run(stack_pass)`` chooses how the kernel's pass runs.

    reversal_probe: whether a training pass reads the kernel's ``reversal_probe`` scalar
    (only ``Reversible`` rebuilds anything to compare).
    """

    reversal_probe: bool = False

    @abc.abstractmethod
    def run(self, stack: StackPass) -> Any:
        """The outputs of ``stack``, differentiated this method's way."""

    def check_update(self, update: Update) -> None:  # noqa: B027 (a hook: most accept all)
        """Raise a one-line ValueError if this method cannot differentiate ``update``
        (``Reversible`` needs an invertible BDIA update; the others take any)."""


def _call_as_is(call):
    return call


@dataclasses.dataclass(frozen=True)
class Autodiff(Backprop):
    """Plain JAX autodiff through the stored activations (the oracle of ``Reversible``)."""

    def run(self, stack: StackPass) -> Any:
        return stack.stored(_call_as_is)


@dataclasses.dataclass(frozen=True)
class Remat(Backprop):
    """Per-block ``jax.checkpoint``: keeps one state per block, recomputes the block."""

    def run(self, stack: StackPass) -> Any:
        return stack.stored(jax.checkpoint)


@dataclasses.dataclass(frozen=True)
class Reversible(Backprop):
    """A custom VJP that rebuilds x_{k-1} from (x_k, x_{k+1}) bit for bit (BDIA on the grid,
    |γ| = 2**-m only): activation memory constant in depth apart from m bits per element.
    RevViT's two-stream stack (``bdia_jax.revnet``) rebuilds its inputs the same way, exact
    in real arithmetic only.

    recompute: how the backward pass gets h_k(x_k). "separate" (the default because it is
      exact for any block) runs the forward pass's own fenced call, then the block's VJP;
      "shared" takes the VJP's primal output, one block forward cheaper, exact when the
      block's statistics use ``bdia_jax.stable`` (the models' blocks do). "fused" is
      "shared" that also gives the block its output's cotangent (1 + γ_k) dL/dx_{k+1},
      known before the rebuild, as ``block(x, context, key, cotangent=...)``: the models'
      blocks then run a chunked MLP's forward and VJP in one loop, not two (their
      ``chunk_mlp``); the block's VJP is pulled back with exactly that cotangent.
    reversal_probe: keep x_0 (one state) so that the gradient of the engine's
      ``reversal_probe`` scalar is the largest |rebuilt - forward| of x_0, the last state
      rebuilt (0.0 when exact).
    """

    recompute: Literal["separate", "shared", "fused"] = "separate"
    reversal_probe: bool = True

    def __post_init__(self):
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(
                f"recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}: "
                "'separate' is exact for any block; 'shared' saves one block forward per "
                "block when the block's statistics use bdia_jax.stable; 'fused' also gives "
                "the block its output's cotangent (the models' blocks take it)."
            )
        if not isinstance(self.reversal_probe, bool):
            raise ValueError(
                f"Reversible reversal_probe must be True or False, got {self.reversal_probe!r}.")

    def run(self, stack: StackPass) -> Any:
        return stack.reversible(self)

    def output_and_vjp(self, fn: Callable, primals: tuple, fenced: Callable, cotangent):
        """(fn(*primals), the VJP of fn at primals), in the backward pass of a rebuild.

        fenced: the call the forward pass made (the engine's fenced block). cotangent: the
        one the VJP will be pulled back with. "shared" takes the output from the VJP's own
        evaluation; "fused" too, calling ``fn(*primals, cotangent=cotangent)``; "separate"
        from ``fenced(*primals)``, so the output has the forward pass's bits whatever the
        block, and the VJP from a second evaluation.
        """
        if self.recompute == "shared":
            return jax.vjp(fn, *primals)
        if self.recompute == "fused":
            return jax.vjp(lambda *args: fn(*args, cotangent=cotangent), *primals)
        # XLA compiles a block whose VJP is also taken with other fusions and reduction
        # orders (on XLA:CPU a jnp.mean in a LayerNorm changed h's last bits at batch >= 64:
        # an inexact rebuild); the fenced call compiles as in the forward pass.
        out = fenced(*primals)
        _, pullback = jax.vjp(fn, *primals)
        return out, pullback

    def check_update(self, update: Update) -> None:
        if isinstance(update, Standard):
            raise ValueError(
                "backprop=Reversible() needs update=BDIA(...): the standard update "
                "x_{k+1} = x_k + h(x_k) has no exact inverse; use Autodiff() or Remat()."
            )
        if update.frac_bits is None:
            raise ValueError(
                "backprop=Reversible() needs the fixed-point grid: set BDIA(frac_bits=9) "
                "(e.g.), or use Autodiff()/Remat() for the unquantized ablation."
            )
        if update.gamma == 0:
            raise ValueError(
                "backprop=Reversible() needs gamma != 0 (the update is not invertible at "
                "γ = 0); use gamma=0.5 or 0.25, or Autodiff()/Remat() for the γ = 0 ablation."
            )
        if update.side_bits is None:
            raise ValueError(
                f"backprop=Reversible() needs gamma = 2**-m with 1 <= m <= {MAX_SIDE_BITS} "
                f"(e.g. 0.5 or 0.25), got {update.gamma}: the inverse divides by γ and only "
                "powers of two divide exactly; use Autodiff()/Remat() for other γ."
            )


UPDATES = {"standard": Standard, "bdia": BDIA}
BACKPROPS = {"autodiff": Autodiff, "remat": Remat, "reversible": Reversible}


def check_method(update: Update, backprop: Backprop) -> None:
    """The one check of an (update, backprop) pair; raises a one-line ValueError."""
    if not isinstance(update, Update):
        raise ValueError(
            f"update must be bdia_jax.Standard() or bdia_jax.BDIA(...), got {update!r}; "
            "bdia_jax.parse_method(update='bdia', ...) builds one from strings."
        )
    if not isinstance(backprop, Backprop):
        raise ValueError(
            f"backprop must be bdia_jax.Autodiff(), Remat() or Reversible(...), got "
            f"{backprop!r}; bdia_jax.parse_method(backprop='reversible', ...) builds one from "
            "strings."
        )
    backprop.check_update(update)


def default_backprop(update: Update) -> Backprop:
    """Reversible() for BDIA on a grid, Autodiff() otherwise (nothing to invert).

    γ plays no part: a BDIA grid update whose γ has no exact inverse (0.3, 0) then fails in
    ``check_method`` and names the fix, instead of quietly training without reversal.
    """
    if isinstance(update, BDIA) and update.frac_bits is not None:
        return Reversible()
    return Autodiff()


UPDATE_FIELDS = ("gamma", "frac_bits", "quantize_at_inference")
BACKPROP_FIELDS = ("recompute", "reversal_probe")
# Every keyword of parse_method: a model config's method, as a config file or a command
# line spells it.
METHOD_KEYWORDS = ("update", "backprop", *UPDATE_FIELDS, *BACKPROP_FIELDS)


def parse_method(*, update: str | Update | None = "bdia", backprop: str | Backprop | None = None,
                 **fields) -> dict:
    """The method of a model config from its plain spelling (strings and numbers): the one
    place strings become method objects. Each object validates its own fields.

    update: "standard" | "bdia" (with ``gamma``, ``frac_bits``, ``quantize_at_inference``:
      ``BDIA``'s fields), or a ``Standard``/``BDIA`` object (then no update fields), or
      None for a model with its own update (RevViT: only ``backprop`` is parsed).
    backprop: "autodiff" | "remat" | "reversible" (with ``recompute``, ``reversal_probe``:
      ``Reversible``'s fields), or an object (then no backprop fields), or None for
      ``default_backprop(update)`` (Reversible for BDIA on a grid, else Autodiff).

    Returns {"update": ..., "backprop": ...}, the fields of a model config
    (``Config(**other_fields, **parse_method(...))``; without "update" when update is None).
    The pair is checked where it is used: the model config (``StackMethod``) or
    ``apply_stack``. A keyword that does not apply raises, naming it.
    """
    unknown = sorted(set(fields) - set(UPDATE_FIELDS) - set(BACKPROP_FIELDS))
    if unknown:
        raise ValueError(f"unknown method keywords {unknown}; valid: {list(METHOD_KEYWORDS)}.")
    update_fields = {k: v for k, v in fields.items() if k in UPDATE_FIELDS}
    backprop_fields = {k: v for k, v in fields.items() if k in BACKPROP_FIELDS}
    method = {}
    if update is not None:
        if isinstance(update, str):
            if update not in UPDATES:
                raise ValueError(f"update must be one of {tuple(UPDATES)}, got {update!r}.")
            if update == "standard" and update_fields:
                raise ValueError(f"{sorted(update_fields)} apply only to update='bdia'; drop "
                                 "them for update='standard'.")
            update = UPDATES[update](**update_fields)
        elif update_fields:
            raise ValueError(f"give the update either as an object (update={update!r}) or as "
                             f"update='bdia' with {sorted(update_fields)}, not both.")
        method["update"] = update
    elif update_fields:
        raise ValueError(f"{sorted(update_fields)} apply only to update='bdia'; this model "
                         "has its own update.")
    if backprop is None:
        if update is None:
            raise ValueError("a model with its own update needs backprop='autodiff', 'remat' "
                             "or 'reversible'.")
        backprop = type(default_backprop(update))
        backprop = next(name for name, cls in BACKPROPS.items() if cls is backprop)
    if isinstance(backprop, str):
        if backprop not in BACKPROPS:
            raise ValueError(f"backprop must be one of {tuple(BACKPROPS)} or None, got "
                             f"{backprop!r}.")
        if backprop != "reversible" and backprop_fields:
            raise ValueError(f"{sorted(backprop_fields)} apply only to "
                             f"backprop='reversible'; drop them for backprop={backprop!r}.")
        backprop = BACKPROPS[backprop](**backprop_fields)
    elif backprop_fields:
        raise ValueError(f"give backprop either as an object (backprop={backprop!r}) or as "
                         f"backprop='reversible' with {sorted(backprop_fields)}, not both.")
    method["backprop"] = backprop
    return method


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackMethod:
    """The two method fields of a model config (ViTConfig, GPTConfig, Seq2SeqConfig).

    update: Standard() | BDIA(...). backprop: Autodiff() | Remat() | Reversible(...), or None
    for ``default_backprop(update)`` (resolved here, so the stored config is explicit).
    The pair is checked here, where a model's method is defined. The models' residual
    streams are float32, so frac_bits is checked against float32's limit here too.
    """

    update: Update = BDIA()
    backprop: Backprop | None = None

    def __post_init__(self):
        if self.backprop is None:
            object.__setattr__(self, "backprop", default_backprop(self.update))
        check_method(self.update, self.backprop)
        self.update.check_stream_dtype(jnp.float32)


"""The method objects validate themselves in one line; check_method is the one pair check."""

import dataclasses

import pytest

import bdia_jax
from bdia_jax import BDIA, Autodiff, Remat, Reversible, StackMethod, Standard


def _one_line(info):
    assert "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: BDIA(gamma=1.0), r"in \[0, 1\)"),
        (lambda: BDIA(gamma=-0.5), r"sign of γ is drawn per sample\), got -0.5; use gamma=0.5"),
        (lambda: BDIA(gamma="0.5"), "Python float"),
        (lambda: BDIA(gamma=True), "Python float"),
        (lambda: BDIA(gamma=float("nan")), r"in \[0, 1\)"),
        (lambda: BDIA(frac_bits=2.5), "must be an int"),
        (lambda: BDIA(frac_bits=True), "must be an int"),
        (lambda: BDIA(frac_bits=-1), "out of range"),
        (lambda: BDIA(frac_bits=49), r"use 0\.\.48"),
        (lambda: BDIA(quantize_at_inference=1), "quantize_at_inference must be True or False"),
        (lambda: Reversible(recompute="twice"), "recompute must be one of"),
        (lambda: Reversible(probe="yes"), "probe must be True or False"),
    ],
)
def test_each_object_checks_its_fields(make, match):
    with pytest.raises(ValueError, match=match) as info:
        make()
    _one_line(info)


def test_valid_objects_are_frozen_and_hashable():
    objects = [Standard(), BDIA(), BDIA(gamma=0.6, frac_bits=None), BDIA(gamma=0.0),
               Autodiff(), Remat(), Reversible(), Reversible(recompute="shared", probe=False)]
    for o in objects:
        hash(o)  # static arguments of jit and custom_vjp must hash
    with pytest.raises(dataclasses.FrozenInstanceError):
        BDIA().gamma = 0.25
    assert BDIA(gamma=0.5).side_bits == 1 and BDIA(gamma=0.25).side_bits == 2
    assert BDIA(gamma=0.6).side_bits is None and BDIA(gamma=0.0).side_bits is None
    assert BDIA(gamma=2.0**-9).side_bits is None  # side bits are packed from uint8


@pytest.mark.parametrize(
    "update,backprop,match",
    [
        (Standard(), Reversible(), "needs update=BDIA.*no exact inverse"),
        (BDIA(frac_bits=None), Reversible(), "needs the fixed-point grid"),
        (BDIA(gamma=0.0), Reversible(), "gamma != 0"),
        (BDIA(gamma=0.6), Reversible(), "2\\*\\*-m with 1 <= m <= 8.*only powers of two"),
        (BDIA(gamma=0.3), Reversible(), "power.*of.*two"),
        ("bdia", Reversible(), "update must be bdia_jax.Standard"),
        (BDIA(), "reversible", "backprop must be bdia_jax.Autodiff"),
        (BDIA(), None, "backprop must be bdia_jax.Autodiff"),
    ],
)
def test_pair_check_rejects_impossible_pairs(update, backprop, match):
    with pytest.raises(ValueError, match=match) as info:
        bdia_jax.check_method(update, backprop)
    _one_line(info)


@pytest.mark.parametrize("update", [Standard(), BDIA(), BDIA(gamma=0.6), BDIA(gamma=0.0),
                                    BDIA(gamma=0.6, frac_bits=None), BDIA(frac_bits=None)])
@pytest.mark.parametrize("backprop", [Autodiff(), Remat()])
def test_any_gamma_is_accepted_where_no_inverse_is_needed(update, backprop):
    bdia_jax.check_method(update, backprop)  # Table 2: γ ∈ {0, ±0.25, ±0.5, ±0.6}


def test_method_from_flat():
    assert bdia_jax.method_from_flat() == (BDIA(), Reversible())
    assert bdia_jax.method_from_flat(update="standard") == (Standard(), Autodiff())
    assert bdia_jax.method_from_flat(update="standard", backprop="remat") == (Standard(), Remat())
    # backprop=None: Reversible only where an inverse exists, else Autodiff.
    assert bdia_jax.method_from_flat(gamma=0.6) == (BDIA(gamma=0.6), Autodiff())
    assert bdia_jax.method_from_flat(gamma=0.0) == (BDIA(gamma=0.0), Autodiff())
    assert bdia_jax.method_from_flat(frac_bits=None) == (BDIA(frac_bits=None), Autodiff())
    assert bdia_jax.method_from_flat(recompute="shared", probe=False) == (
        BDIA(), Reversible(recompute="shared", probe=False))
    assert bdia_jax.method_from_flat(gamma=0.0, backprop="autodiff") == (BDIA(gamma=0.0),
                                                                         Autodiff())
    for kwargs, match in [(dict(update="fancy"), "update must be one of"),
                          (dict(backprop="checkpoint"), "backprop must be one of"),
                          (dict(gamma=0.3, backprop="reversible"), "power"),
                          (dict(update="standard", backprop="reversible"), "no exact inverse")]:
        with pytest.raises(ValueError, match=match) as info:
            bdia_jax.method_from_flat(**kwargs)
        _one_line(info)


def test_stack_method_resolves_backprop_and_checks_float32_frac_bits():
    assert StackMethod().backprop == Reversible()
    assert StackMethod(update=Standard()).backprop == Autodiff()
    assert StackMethod(update=BDIA(gamma=0.6)).backprop == Autodiff()
    assert StackMethod(update=BDIA(frac_bits=20)).update.frac_bits == 20
    with pytest.raises(ValueError, match=r"float32 stream: use 0\.\.20"):
        StackMethod(update=BDIA(frac_bits=25))
    with pytest.raises(ValueError, match="no exact inverse"):
        StackMethod(update=Standard(), backprop=Reversible())
    with pytest.raises(TypeError):
        StackMethod(BDIA())  # keyword-only


def test_method_overrides():
    from bdia_jax.methods import method_overrides

    assert method_overrides(dict(width=3)) == dict(width=3)
    assert method_overrides(dict(update=Standard())) == dict(update=Standard())
    assert method_overrides(dict(gamma=0.25, recompute="shared")) == dict(
        update=BDIA(gamma=0.25), backprop=Reversible(recompute="shared"))
    with pytest.raises(ValueError, match="not both") as info:
        method_overrides(dict(update=BDIA(), gamma=0.25))
    _one_line(info)

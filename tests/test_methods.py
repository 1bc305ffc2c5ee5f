"""The method objects validate themselves in one line; check_method is the one pair check;
parse_method is the one parser of their strings; the engine calls the method's behaviour."""

import dataclasses
import importlib
import warnings

import jax
import jax.numpy as jnp
import pytest

import bdia_jax
from bdia_jax import BDIA, Autodiff, Remat, Reversible, Standard, parse_method
from bdia_jax.methods import Backprop, StackMethod, check_method
from bdia_jax.testing import init_mlp, make_tanh_block


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
        (lambda: Reversible(reversal_probe="yes"), "reversal_probe must be True or False"),
    ],
)
def test_each_object_checks_its_fields(make, match):
    with pytest.raises(ValueError, match=match) as info:
        make()
    _one_line(info)


def test_valid_objects_are_frozen_and_hashable():
    objects = [Standard(), BDIA(), BDIA(gamma=0.6, frac_bits=None), BDIA(gamma=0.0),
               Autodiff(), Remat(), Reversible(), Reversible(recompute="shared", reversal_probe=False)]
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
        check_method(update, backprop)
    _one_line(info)


@pytest.mark.parametrize("update", [Standard(), BDIA(), BDIA(gamma=0.6), BDIA(gamma=0.0),
                                    BDIA(gamma=0.6, frac_bits=None), BDIA(frac_bits=None)])
@pytest.mark.parametrize("backprop", [Autodiff(), Remat()])
def test_any_gamma_is_accepted_where_no_inverse_is_needed(update, backprop):
    check_method(update, backprop)  # Table 2: γ ∈ {0, ±0.25, ±0.5, ±0.6}


def test_parse_method():
    assert parse_method() == dict(update=BDIA(), backprop=Reversible())
    assert parse_method(update="standard") == dict(update=Standard(), backprop=Autodiff())
    assert parse_method(update="standard", backprop="remat") == dict(update=Standard(),
                                                                     backprop=Remat())
    # backprop=None: Reversible on a grid (a γ with no inverse then fails where the pair is
    # checked, naming the fix, rather than training without reversal), Autodiff without one.
    assert parse_method(frac_bits=None) == dict(update=BDIA(frac_bits=None), backprop=Autodiff())
    assert parse_method(gamma=0.6, frac_bits=None) == dict(
        update=BDIA(gamma=0.6, frac_bits=None), backprop=Autodiff())
    assert parse_method(gamma=0.6, backprop="remat") == dict(update=BDIA(gamma=0.6),
                                                             backprop=Remat())
    assert parse_method(recompute="shared", reversal_probe=False) == dict(
        update=BDIA(), backprop=Reversible(recompute="shared", reversal_probe=False))
    # Objects pass through; update=None is a model with its own update (RevViT).
    assert parse_method(update=Standard(), backprop=Remat()) == dict(update=Standard(),
                                                                    backprop=Remat())
    assert parse_method(update=None, backprop="reversible", recompute="shared") == dict(
        backprop=Reversible(recompute="shared"))
    for kwargs, match in [
            (dict(update="fancy"), "update must be one of"),
            (dict(backprop="checkpoint"), "backprop must be one of"),
            (dict(gamma=0.3, frac_bits=2.5), "frac_bits must be an int"),  # BDIA's own check
            (dict(recompute="twice"), "recompute must be one of"),  # Reversible's own check
            (dict(update="standard", gamma=0.25), r"apply only to update='bdia'"),
            (dict(backprop="remat", recompute="shared"), r"apply only to backprop='reversible'"),
            (dict(update=BDIA(), gamma=0.25), "not both"),
            (dict(backprop=Reversible(), recompute="shared"), "not both"),
            (dict(update=None, gamma=0.5, backprop="reversible"), "has its own update"),
            (dict(update=None), "needs backprop="),
            (dict(probe=False), "unknown method keywords")]:
        with pytest.raises(ValueError, match=match) as info:
            parse_method(**kwargs)
        _one_line(info)


def test_impossible_pairs_fail_where_the_pair_is_defined():
    """parse_method builds each object; the model config (or apply_stack) checks the pair."""
    for kwargs, match in [(dict(gamma=0.3, backprop="reversible"), "power"),
                          (dict(gamma=0.3), "power"),
                          (dict(gamma=0.0), "gamma != 0"),
                          (dict(update="standard", backprop="reversible"), "no exact inverse")]:
        with pytest.raises(ValueError, match=match) as info:
            StackMethod(**parse_method(**kwargs))
        _one_line(info)


def test_stack_method_resolves_backprop_and_checks_float32_frac_bits():
    assert StackMethod().backprop == Reversible()
    assert StackMethod(update=Standard()).backprop == Autodiff()
    assert StackMethod(update=BDIA(gamma=0.6, frac_bits=None)).backprop == Autodiff()
    with pytest.raises(ValueError, match="only powers of two"):
        StackMethod(update=BDIA(gamma=0.6))  # on the grid the default is Reversible
    assert StackMethod(update=BDIA(frac_bits=20)).update.frac_bits == 20
    with pytest.raises(ValueError, match=r"float32 stream: use 0\.\.20"):
        StackMethod(update=BDIA(frac_bits=25))
    with pytest.raises(ValueError, match="no exact inverse"):
        StackMethod(update=Standard(), backprop=Reversible())
    with pytest.raises(TypeError):
        StackMethod(BDIA())  # keyword-only


class _Recorded(Backprop):
    """A gradient method of one's own: ``Autodiff`` that records the pass it ran."""

    passes = []

    def run(self, stack):
        self.passes.append(type(stack).__name__)
        return stack.stored(lambda call: call)


def test_the_engine_runs_the_method_it_is_given():
    """apply_stack calls ``backprop.run`` (no switch on the method's type): a new method is
    one Backprop subclass, and this one gives Autodiff's bits."""
    block, params = make_tanh_block(), init_mlp(jax.random.PRNGKey(1), 3, 8)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 8))

    def loss(params, backprop, train):
        y, _ = bdia_jax.apply_stack(block, params, x, update=BDIA(gamma=0.6, frac_bits=None),
                                    backprop=backprop, key=jax.random.PRNGKey(3), train=train)
        return jnp.sum(y * y)

    _Recorded.passes.clear()
    for train in (True, False):
        got = jax.value_and_grad(loss)(params, _Recorded(), train)
        want = jax.value_and_grad(loss)(params, Autodiff(), train)
        bdia_jax.testing.assert_bits_equal(got, want)
    assert _Recorded.passes == ["_TrainPass", "_InferencePass"]


@dataclasses.dataclass(frozen=True)
class _AlwaysOnGrid(bdia_jax.methods.Update):
    """A new update is one Update subclass: here the inference pass on BDIA's grid, always."""

    def stack_pass(self, kernel, train):
        return kernel.inference(9)


def test_the_update_picks_the_pass():
    """apply_stack runs the pass ``update.stack_pass`` picks (no switch on the update's type);
    the models read has_gamma / inference_frac_bits instead of the type."""
    block, params = make_tanh_block(), init_mlp(jax.random.PRNGKey(1), 3, 8)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 8))

    def run(update, train):
        return bdia_jax.apply_stack(block, params, x, update=update, backprop=Autodiff(),
                                    key=jax.random.PRNGKey(3), train=train)

    bdia_jax.testing.assert_bits_equal(run(_AlwaysOnGrid(), True), run(BDIA(), False))
    bdia_jax.testing.assert_bits_equal(run(Standard(), True), run(Standard(), False))
    assert (BDIA().has_gamma, Standard().has_gamma, _AlwaysOnGrid().has_gamma) == (True, False, False)
    assert BDIA(frac_bits=7).inference_frac_bits == 7 and Standard().inference_frac_bits is None
    assert BDIA(quantize_at_inference=False).inference_frac_bits is None
    assert BDIA(frac_bits=None).inference_frac_bits is None


def test_top_level_api_and_deprecated_aliases():
    assert sorted(bdia_jax.__all__) == sorted(
        ["apply_stack", "StackStats", "Standard", "BDIA", "Autodiff", "Remat", "Reversible",
         "parse_method"])
    with pytest.warns(DeprecationWarning, match="moved to bdia_jax.engine.bdia_forward"):
        assert bdia_jax.bdia_forward is bdia_jax.engine.bdia_forward
    with pytest.warns(DeprecationWarning, match="moved to bdia_jax.parse_method"):
        assert bdia_jax.method_from_flat(recompute="shared", probe=False) == (
            BDIA(), Reversible(recompute="shared", reversal_probe=False))
    with pytest.warns(DeprecationWarning, match="moved to bdia_jax.methods.Reversible"):
        from bdia_jax.models import Reversible as moved
    assert moved is Reversible
    for name in ("bdia_stack", "standard_stack"):
        with pytest.raises(AttributeError, match="call bdia_jax.apply_stack"):
            getattr(bdia_jax, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module("bdia_jax.models")  # importing it warns about nothing

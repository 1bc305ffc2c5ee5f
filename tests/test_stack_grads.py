"""Gradients of Reversible, Autodiff (the oracle) and Remat agree, within a rounding bound
derived from the blocks (float_bounds.gradient_rtol), in float32."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from float_bounds import ELEMENTWISE_ULPS, gradient_chain, gradient_rtol, transformer_chain
from grad_utils import assert_bound_catches, assert_grads_close, bdia_rounding_bound

import bdia_jax
from bdia_jax.testing import init_attn_mlp, init_mlp, make_attn_mlp_block, make_tanh_block

BATCH, SEQ, DIM, HIDDEN, DEPTH = 3, 5, 8, 16, 4

CASES = {
    "attn_mlp": dict(block=make_attn_mlp_block(heads=2), context=False),
    "dropout": dict(block=make_attn_mlp_block(heads=2, dropout=0.25), context=False),
    "bfloat16": dict(block=make_attn_mlp_block(heads=2, compute_dtype=jnp.bfloat16),
                     context=False),
    "context": dict(block=make_attn_mlp_block(heads=2, use_context=True), context=True),
}
CONTEXT_LEN = 6


def attn_mlp_grad_rtol(context: bool) -> float:
    """The methods compare on the grid, where their forward states are the same bits (the
    losses are asserted equal), so only the blocks' own roundings differ: each gradient entry
    ends the chain of DEPTH pre-LN blocks (transformer_chain; its head term stands for the
    loss's), forward and transposed, BDIA's update and its cotangent (4 float ops a step,
    each way) and the sum over the BATCH × SEQ positions. bfloat16 blocks round their matmuls'
    outputs to bfloat16 in both methods from the same bits; what reassociates is float32."""
    chain = transformer_chain(width=DIM, mlp_dim=HIDDEN, seq=SEQ, depth=DEPTH, heads=2,
                              cross_seq=CONTEXT_LEN if context else 0) + 4 * DEPTH
    return gradient_rtol(gradient_chain(chain, positions=BATCH * SEQ))


def tanh_stack_grad_rtol() -> float:
    """make_tanh_block's chain per step: the dot product (DIM), tanh and BDIA's update
    (4 float ops), over DEPTH steps; gradients sum over the BATCH × SEQ positions."""
    chain = DEPTH * (DIM + ELEMENTWISE_ULPS + 4)
    return gradient_rtol(gradient_chain(chain, positions=BATCH * SEQ))


def _inputs(case):
    params = init_attn_mlp(jax.random.PRNGKey(0), DEPTH, DIM, HIDDEN)
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, SEQ, DIM))
    context = (jax.random.normal(jax.random.PRNGKey(2), (BATCH, CONTEXT_LEN, DIM))
               if case["context"] else None)
    target = jax.random.normal(jax.random.PRNGKey(3), (BATCH, SEQ, DIM))
    return params, x, context, target


def _loss_fn(block, backprop, gamma, recompute="separate"):
    fields = dict(recompute=recompute) if backprop == "reversible" else {}
    method = bdia_jax.parse_method(gamma=gamma, backprop=backprop, **fields)

    def loss(params, x, context, target, probe):
        # Only the reversible method rebuilds states, so only it reads the probe.
        y, stats = bdia_jax.apply_stack(
            block, params, x, **method, key=jax.random.PRNGKey(4), context=context,
            reversal_probe=probe if backprop == "reversible" else None,
        )
        return jnp.mean((y - target) ** 2), stats

    return loss


class ReversibleGradientTest(chex.TestCase):
    @chex.variants(with_jit=True)
    # Every other block kind at γ = ½, and γ = ¼ (two side bits) on the attention+MLP block:
    # the plain block at ½ would add nothing, since the dropout block at ½ is that block
    # with dropout on and checks every method, and its dropout-off path runs in the rest.
    @parameterized.parameters(*[(name, 0.5) for name in sorted(CASES) if name != "attn_mlp"],
                              ("attn_mlp", 0.25))
    def test_reversible_matches_autodiff_and_remat(self, case_name, gamma):
        # Remat only wraps each block call in jax.checkpoint, so the cases where that could
        # matter (dropout keys replayed inside it, a context cotangent) carry it; each extra
        # method is one more compile of seconds.
        methods = ["reversible", "reversible_shared", "autodiff"]
        if case_name in ("dropout", "context"):
            methods.append("remat")
        self._check(case_name, gamma, methods=tuple(methods))

    # Called outside jit the same pass runs op by op (its scans still compile); one block
    # kind shows it, since which ops run eagerly does not depend on the block.
    @chex.variants(without_jit=True)
    @parameterized.parameters(("dropout", 0.25))
    def test_reversible_matches_autodiff_and_remat_outside_jit(self, case_name, gamma):
        self._check(case_name, gamma, methods=("reversible", "autodiff"))  # eager: slow

    def _check(self, case_name, gamma,
               methods=("reversible", "autodiff", "remat", "reversible_shared")):
        case = CASES[case_name]
        params, x, context, target = _inputs(case)
        argnums = (0, 1, 2, 4) if case["context"] else (0, 1, 4)
        results = {}
        for method in methods:
            backprop, _, recompute = method.partition("_")
            recompute = recompute or "separate"
            grad_fn = self.variant(jax.value_and_grad(
                _loss_fn(case["block"], backprop, gamma, recompute), argnums=argnums,
                has_aux=True))
            (loss, stats), grads = grad_fn(params, x, context, target, jnp.zeros(()))
            assert not bool(stats.overflow) and not bool(stats.nonfinite)
            name = backprop if recompute == "separate" else f"{backprop}_{recompute}"
            results[name] = (loss, grads)

        rev_loss, rev_grads = results["reversible"]
        # The reversal was bit-exact (probe gradient), and the forward losses are identical.
        assert float(rev_grads[-1]) == 0.0
        if "reversible_shared" in results:
            assert float(results["reversible_shared"][1][-1]) == 0.0
        rtol = attn_mlp_grad_rtol(case["context"])
        for backprop in set(results) - {"reversible"}:
            chex.assert_trees_all_equal(rev_loss, results[backprop][0])
            assert_grads_close(rev_grads[:-1], results[backprop][1][:-1], rtol=rtol)
        assert_bound_catches(rev_grads[:-1], results["autodiff"][1][:-1], rtol=rtol)
        # Gradients are not trivially zero (so the comparison means something).
        assert float(jnp.max(jnp.abs(rev_grads[0]["qkv"]))) > 0
        if case["context"]:
            assert float(jnp.max(jnp.abs(rev_grads[2]))) > 0


def test_gradient_wrt_input_is_straight_through_for_quantization():
    """dL/dx of the stack equals dL/dx_0 (Q is straight-through), checked against a
    finite-free reference: with a zero block the stack is linear in x."""
    params = {"w": jnp.zeros((3, DIM, DIM))}

    def zero_block(p, x, c, k):
        return x @ p["w"]

    x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, SEQ, DIM))
    gammas = jnp.array([[0.5, -0.5, 0.5], [-0.5, -0.5, 0.5]])
    # x_1 = x_0, x_2 = γ_1 x_0 + (1-γ_1) x_1 = x_0, x_3 = x_0 too: dx = d(sum x_3) = 1.
    method = dict(update=bdia_jax.BDIA(), backprop=bdia_jax.Reversible(reversal_probe=False))
    g = jax.grad(lambda x: jnp.sum(bdia_jax.apply_stack(zero_block, params, x, **method,
                                                         gammas=gammas)[0]))(x)
    chex.assert_trees_all_equal(g, jnp.ones_like(x))


def _hand_written_bdia(block, params, x, gammas, frac_bits):
    """The recurrence written out: x_1 = x_0 + Q(h_0); x_{k+1} = Q(γ x_{k-1} + (1-γ) x_k +
    (1+γ) h_k) with Q the identity (frac_bits None) or straight-through rounding."""
    def q(v):
        return v if frac_bits is None else bdia_jax.fixed_point.quantize_ste(v, frac_bits)

    def p(k):
        return jax.tree_util.tree_map(lambda a: a[k], params)

    x_prev = q(x)
    x_cur = x_prev + q(block(p(0), x_prev, None, None))
    for k in range(1, DEPTH):
        g = gammas[k - 1][:, None, None]
        h = block(p(k), x_cur, None, None)
        x_prev, x_cur = x_cur, q(g * x_prev + ((x_cur - g * x_cur) + (h + g * h)))
    return x_cur


@pytest.mark.parametrize("gamma,frac_bits", [(0.6, None), (0.0, None), (0.6, 9)])
def test_any_gamma_trains_without_an_inverse(gamma, frac_bits):
    """Table 2's ablation (γ = ±0.6, 0; unquantized, and on the grid): Autodiff and Remat
    match plain JAX autodiff of the hand-written recurrence. On the grid the forward is
    bit-identical; unquantized, XLA compiles the unrolled loop and the engine's scan with
    other fusions (and other ISAs vectorize tanh and the sums otherwise), so the forward agrees
    within a rounding bound derived from the recurrence (``grad_utils.bdia_rounding_bound``),
    not a tolerance tuned on one machine."""
    block = make_tanh_block()
    params = init_mlp(jax.random.PRNGKey(0), DEPTH, DIM)
    _, x, _, target = _inputs(CASES["attn_mlp"])
    gammas = bdia_jax.engine.draw_gammas(jax.random.PRNGKey(5), DEPTH, BATCH, gamma)
    if gamma:
        assert set(np.unique(np.abs(np.asarray(gammas)))) == {np.float32(gamma)}

    def grads_of(fn):
        return jax.jit(jax.grad(lambda p, x: jnp.mean((fn(p, x) - target) ** 2),
                                argnums=(0, 1)))(params, x)

    def reference(p, x):
        return _hand_written_bdia(block, p, x, gammas, frac_bits)

    want_y, want_grads = jax.jit(reference)(params, x), grads_of(reference)
    bound = bdia_rounding_bound(params["w"], x, gammas)
    rtol = tanh_stack_grad_rtol()
    update = bdia_jax.BDIA(gamma=gamma, frac_bits=frac_bits)
    for backprop in (bdia_jax.Autodiff(), bdia_jax.Remat()):
        def engine(p, x, backprop=backprop):
            return bdia_jax.apply_stack(block, p, x, update=update, backprop=backprop,
                                        gammas=gammas)[0]

        y = jax.jit(engine)(params, x)
        if frac_bits is None:
            assert np.all(np.abs(np.asarray(y, np.float64) - np.asarray(want_y)) <= bound)
        else:
            chex.assert_trees_all_equal(y, want_y)
        got_grads = grads_of(engine)
        assert_grads_close(got_grads, want_grads, rtol=rtol)
    assert_bound_catches(got_grads, want_grads, rtol=rtol)
    assert float(jnp.max(jnp.abs(want_grads[0]["w"]))) > 0

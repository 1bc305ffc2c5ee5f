"""Tolerances derived from the computation, for the tests that compare two float32
evaluations of the same maths (another summation order, fusion, vector width or ISA):
never a number tuned on one machine (issue 34: rtol 1e-6 passed on AVX-512, failed on AVX2).

The standard first-order results (Higham, *Accuracy and Stability of Numerical Algorithms*,
ch. 3), with u = 2**-24 the float32 unit roundoff:

* a sum of n terms, in any order, is within (n - 1) u Σ|x_i| of the exact sum;
* a dot product of length n is within n u Σ|a_i b_i| (``matmul_bound``);
* an elementwise function (exp, log, tanh, rsqrt, division) is within a few ulps of its
  value; XLA's polynomial approximations differ with the vector width, so this module
  allows ``ELEMENTWISE_ULPS`` of them;
* two evaluations that are each within B of the exact value are within 2 B of each other.

Every bound is evaluated in float64 from the test's own inputs.
"""

from __future__ import annotations

import numpy as np

U = 2.0**-24  # float32 unit roundoff
ELEMENTWISE_ULPS = 16


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def matmul_bound(a, b) -> np.ndarray:
    """Bound on |fl(a @ b) - a @ b| for any summation order: n u (|a| @ |b|), n the
    contracted length. a: [..., n]; b: [n, m]. Returns float64 of a @ b's shape."""
    a, b = f64(a), f64(b)
    return a.shape[-1] * U * (np.abs(a) @ np.abs(b))


def cross_entropy_bound(logits, logit_err=0.0) -> np.ndarray:
    """Bound on the error of one evaluation of -log_softmax(z)[t] for every t, per token.

    logits: [..., vocab]; logit_err: bound on each logit's own error (broadcasts).
    log Σ exp(z - max) has the sum's relative error ((vocab - 1) u) plus the exps' and the
    log's (ELEMENTWISE_ULPS u each), absolutely; subtracting from it max z and z_t adds u
    of each magnitude; an error e in the logits moves lse(z) - z_t by at most 2 max|e|
    (logsumexp is 1-Lipschitz in the max norm). Returns [...] float64.
    """
    z = f64(logits)
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    vocab = z.shape[-1]
    own = (vocab - 1 + 2 * ELEMENTWISE_ULPS) * U + 2 * U * (np.abs(lse) + np.abs(z).max(-1))
    return own + 2 * np.max(np.broadcast_to(f64(logit_err), z.shape), -1)


def sum_bound(values, value_err=0.0) -> float:
    """Bound on the error of the float32 sum of ``values`` whose own errors are bounded by
    ``value_err`` (broadcasts): Σ value_err + (n - 1) u Σ|values|."""
    v = f64(values)
    return float(np.sum(np.broadcast_to(f64(value_err), v.shape))
                 + max(v.size - 1, 0) * U * np.sum(np.abs(v)))


def attention_bound(q, k, v, mask=None, *, num_chunks=1) -> np.ndarray:
    """Bound on one float32 evaluation's error of softmax(q k^T / sqrt(d) + mask) v.

    q: [..., q_len, d]; k, v: [..., k_len, d]; mask: additive-boolean broadcastable to
    [..., q_len, k_len] (True keeps) or None. Scores: d u Σ|q_i k_i| / sqrt(d) (plus u for the
    scaling); the softmax weights p_j: relative error |Δs_j| + max|Δs| (shift-invariance)
    plus the normaliser's sum and the exps ((k_len + ELEMENTWISE_ULPS) u); an online
    (chunked) softmax rescales its running sums once per chunk (2 u each). The output
    Σ p_j v_j adds k_len u Σ p_j |v_j|. Returns [..., q_len, d] float64.
    """
    q, k, v = f64(q), f64(k), f64(v)
    d, k_len = q.shape[-1], k.shape[-2]
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(d)
    ds = (d + 1) * U * (np.abs(q) @ np.swapaxes(np.abs(k), -1, -2)) / np.sqrt(d)
    if mask is not None:
        keep = np.broadcast_to(np.asarray(mask), s.shape)
        s = np.where(keep, s, -np.inf)
        ds = np.where(keep, ds, 0.0)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    rel = ds + ds.max(-1, keepdims=True) + (k_len + ELEMENTWISE_ULPS + 2 * num_chunks) * U
    return (p * rel) @ np.abs(v) + k_len * U * (p @ np.abs(v))


def network_bound(outputs, *, chain: int) -> float:
    """Bound on how far two float32 evaluations of one network's ``outputs`` may differ,
    to first order: each output ends a chain of ``chain`` roundings (the reassociable sums
    and elementwise ops on the path from the inputs: per block its contraction lengths,
    the softmax's key count and ELEMENTWISE_ULPS), each within u of the values' magnitude,
    taken as max(max|outputs|, 1) (layer norms keep the activations O(1)). Two evaluations:
    2 chain u magnitude."""
    return 2 * chain * U * max(float(np.max(np.abs(f64(outputs)))), 1.0)


def assert_within(got, want, bound, what: str = "") -> None:
    """|got - want| <= bound elementwise (float64), reporting the worst ratio."""
    got, want = f64(got), f64(want)
    bound = np.broadcast_to(f64(bound), got.shape)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(want)), what
    diff = np.abs(got - want)
    worst = np.unravel_index(np.argmax(diff - bound), diff.shape) if diff.size else ()
    assert np.all(diff <= bound), (
        f"{what}: |got - want| = {diff[worst]:.3g} exceeds the rounding bound "
        f"{bound[worst]:.3g} at {worst}")


def transformer_chain(*, width: int, mlp_dim: int, seq: int, depth: int, heads: int,
                      cross_seq: int = 0, head_dim: int | None = None) -> int:
    """``network_bound``'s chain for a pre-LN transformer of ``depth`` blocks and its head:
    per block two layer norms (width sums and an rsqrt), the q/k/v, output and fc1
    contractions (width), the scores (width / heads), the softmax (seq sums and an exp),
    probabilities @ v (seq), fc2 (mlp_dim) and the gelu; a cross-attention (``cross_seq``
    keys) adds a layer norm and one more attention; the head a layer norm and a
    contraction (width). ``head_dim``: when not width / heads (Qwen3), the scores contract
    over it and the output projection over heads × head_dim."""
    head_dim = head_dim or width // heads
    attention = 3 * width + heads * head_dim + head_dim + 2 * seq + ELEMENTWISE_ULPS
    block = 2 * (width + ELEMENTWISE_ULPS) + attention + width + mlp_dim + ELEMENTWISE_ULPS
    if cross_seq:
        block += width + ELEMENTWISE_ULPS + attention - 2 * seq + 2 * cross_seq
    return depth * block + 2 * width + ELEMENTWISE_ULPS


def gradient_chain(forward_chain: int, *, positions: int) -> int:
    """The rounding chain that ends in one gradient entry: the forward's (the activations the
    backward reads, recomputed or stored: ``forward_chain``), the backward's (the same
    contractions transposed, each summing over its matrix's other side, and the softmax's and
    layer norms' sums again: ``forward_chain`` covers it, since transposing swaps the two
    sides of every matrix in the chain and the chain counts both) and the sum over the
    ``positions`` (batch × sequence) that turns per-position products into a weight's
    gradient."""
    return 2 * forward_chain + positions


def gradient_rtol(chain: int, *, u: float = U) -> float:
    """rtol, of each leaf's scale (``grad_utils.assert_grads_close``), for two evaluations of
    one gradient that round differently (another fusion, summation order or ISA).

    First order: backpropagation is linear in the cotangent, so a rounding error made anywhere
    reaches a leaf through the same Jacobians that carry the cotangent there, and relative to
    the leaf's scale (its largest entry) each of the ``chain`` roundings on the way adds at
    most u. Each evaluation is within chain u of exact arithmetic: two within 2 chain u.
    u: the unit roundoff of the dtype both evaluate in (2**-53 for float64)."""
    return 2 * chain * u


def model_grad_rtol(forward_chain: int, *, positions: int) -> float:
    """``gradient_rtol`` for a model's parameter gradients under tests/models_utils.py's loss
    (mean of an elementwise function of the outputs, so one more elementwise op): the
    forward's ``forward_chain`` (``transformer_chain`` of its stacks), its transpose, and the
    sum over the ``positions`` (batch × sequence; an embedding's gradient sums over them too)."""
    return gradient_rtol(gradient_chain(forward_chain + ELEMENTWISE_ULPS, positions=positions))

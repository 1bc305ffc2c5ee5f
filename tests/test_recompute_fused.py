"""Reversible(recompute="fused"): the backward pass gives each block its output's cotangent,
and a chunked MLP computes its output and VJP in one loop over position blocks. The output
must keep the forward pass's bits (the rebuild needs them) and the gradients must be the
ones of the VJP pulled back with that cotangent: both asserted on the bits, against the
plain chunked MLP and against recompute="shared"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from models_utils import probe_total, train_grads

from bdia_jax import BDIA, Reversible, apply_stack, ops
from bdia_jax.methods import RECOMPUTE_MODES
from bdia_jax.models import DecoderLM, LoRA, RevViT, decoder_config, revvit_config
from bdia_jax.models.layers import DecoderBlock, EncoderBlock
from bdia_jax.models.revvit import RevBlock
from bdia_jax.testing import assert_bits_equal, init_attn_mlp, make_attn_mlp_block


def _mlp(params, y):
    """A position-wise SwiGLU-like fn: [..., width] → [..., width] float32."""
    hidden = jax.nn.silu(y @ params["gate"]) * (y @ params["up"])
    return (hidden @ params["down"]).astype(jnp.float32)


def test_position_blocks_at_a_known_cotangent_keep_the_forward_and_vjp_bits():
    keys = jax.random.split(jax.random.key(0), 5)
    params = {"gate": jax.random.normal(keys[0], (8, 24)), "up": jax.random.normal(keys[1], (8, 24)),
              "down": jax.random.normal(keys[2], (24, 8))}
    y = jax.random.normal(keys[3], (2, 11, 8))  # blocks of 4: two full and a tail of 3
    g = jax.random.normal(keys[4], (2, 11, 8))

    @jax.jit
    def both(params, y, g):
        plain, pullback = jax.vjp(lambda p, y: ops.position_blocks(_mlp, p, y, 4), params, y)
        fused, fused_pullback = jax.vjp(
            lambda p, y: ops.position_blocks(_mlp, p, y, 4, cotangent=g), params, y)
        return (plain, pullback(g)), (fused, fused_pullback(g)), _mlp(params, y)

    (plain, grads), (fused, fused_grads), dense = both(params, y, g)
    assert_bits_equal(fused, plain)
    assert_bits_equal(fused_grads, grads)
    assert not jnp.array_equal(grads[0]["down"], jnp.zeros_like(grads[0]["down"]))
    assert jnp.allclose(plain, dense, rtol=1e-5, atol=1e-5)  # sanity: it is the MLP


def _block_case(kind):
    """(block, x, context, key) with a chunked MLP, dropout on, and float32 streams."""
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(1), (2, 10, 16))
    common = dict(dropout=0.25, mlp_chunk_size=4, rngs=rngs)
    if kind == "encoder":  # GQA, SwiGLU, RMSNorm, causal: the Llama block
        block = EncoderBlock(16, 4, 32, causal=True, num_kv_heads=2, norm="rmsnorm",
                             mlp="swiglu", bias="none", **common)
        return block, x, None
    enc = jax.random.normal(jax.random.key(2), (2, 7, 16))
    if kind == "decoder":  # self-, cross-attention, then the MLP
        return DecoderBlock(16, 4, 32, **common), x, (enc, None)
    return RevBlock(16, 4, 32, **common), x, None  # RevViT's G = its MLP branch


@pytest.mark.parametrize("kind", ["encoder", "decoder", "revvit"])
def test_blocks_given_their_cotangent_keep_output_and_vjp_bits(kind):
    """Each block kind passes its MLP the cotangent of the MLP's output (through the
    residual dropout's mask): its output and its VJP at that cotangent are the plain
    block's, bit for bit."""
    block, x, context = _block_case(kind)
    graphdef, params = nnx.split(block)
    key = jax.random.key(3)
    g = jax.random.normal(jax.random.key(4), x.shape)

    def call(params, x, **kw):
        module = nnx.merge(graphdef, params)
        if kind == "revvit":
            return module.mlp_branch(x, key, **kw)
        return module(x, context, key, **kw)

    @jax.jit
    def both(params, x, g):
        out, pullback = jax.vjp(call, params, x)
        fused, fused_pullback = jax.vjp(lambda p, x: call(p, x, cotangent=g), params, x)
        return (out, pullback(g)), (fused, fused_pullback(g))

    (out, grads), (fused, fused_grads) = both(params, x, g)
    assert_bits_equal(fused, out)
    assert_bits_equal(fused_grads, grads)


def _decoder(recompute):
    # 14 positions in blocks of 4 (a tail of 2): attention and MLP chunked; GQA, SwiGLU,
    # dropout: the MLP's cotangent goes through the residual dropout's mask; LoRA adapters on
    # the MLP's projections (their gradients accumulate in the one loop too).
    return DecoderLM(decoder_config("llama-tiny", attention="chunked", chunk_size=4,
                                    dropout=0.1, attention_dropout=0.1, update="bdia",
                                    lora=LoRA(rank=2, targets=("q", "gate", "up", "down")),
                                    backprop="reversible", recompute=recompute),
                     rngs=nnx.Rngs(0))


def _revvit(recompute):
    return RevViT(revvit_config("tiny", depth=2, patch_size=8, attention="chunked",
                                chunk_size=4, dropout=0.1, backprop="reversible",
                                recompute=recompute), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("make, inputs", [
    (_decoder, lambda: (jax.random.randint(jax.random.key(1), (2, 14), 0, 32, jnp.int32),)),
    (_revvit, lambda: (jax.random.normal(jax.random.key(1), (2, 32, 32, 3)),)),
], ids=["bdia-decoder", "revvit"])
def test_fused_recompute_has_shared_recomputes_bits(make, inputs):
    """The engines hand each block the cotangent they pull back with: (1 + γ_k) dL/dx_{k+1}
    (BDIA), dL/dY2 and dL/dY1 (RevNet's G and F). Outputs and every gradient equal
    recompute="shared"'s bit for bit, and the BDIA probe reads 0."""
    runs = {}
    for recompute in ("shared", "fused"):
        model = make(recompute)
        assert model.config.mlp_chunk_size == 4
        runs[recompute] = train_grads(model, lambda m: m(*inputs(), key=jax.random.key(2),
                                                          train=True))
    assert_bits_equal(runs["fused"][:3], runs["shared"][:3])
    if make is _decoder:
        assert probe_total(runs["fused"][3]) == 0.0
        lora_b = runs["fused"][2]["stack"]["blocks"]["mlp"]["down"]["lora_b"][...]
        assert float(jnp.max(jnp.abs(lora_b))) > 0


def test_fused_names_the_keyword_a_block_lacks():
    """A block without ``cotangent=`` fails in one line that names the fix."""
    block = make_attn_mlp_block(stable_stats=True)
    params = init_attn_mlp(jax.random.key(0), 3, 8, 16)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    update = BDIA(gamma=0.5, frac_bits=9)

    def loss(x):
        out, _ = apply_stack(block, params, x, update=update, key=jax.random.key(2),
                             backprop=Reversible(recompute="fused", reversal_probe=False))
        return jnp.sum(out)

    with pytest.raises(TypeError, match="does not take `cotangent`.*use recompute='shared'"):
        jax.grad(loss)(x)
    assert "fused" in RECOMPUTE_MODES

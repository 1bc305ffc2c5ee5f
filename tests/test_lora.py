"""LoRA (bdia_jax.models.LoRA): adapters on a tiny Llama-style decoder. A fresh adapter
changes no bit; training with trainable=nnx.LoRAParam frees the base weights' gradients
and optimizer state in the compiled step; LoRA + BDIA reverses exactly; merge_lora is the
adapted layer within a derived rounding bound; merged models round-trip through
pretrained.save/load bit for bit; PEFT's layout."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_only import compile_for_memory
from flax import nnx

from bdia_jax import pretrained, training
from bdia_jax.methods import BDIA, Autodiff, Remat, Reversible, Standard
from bdia_jax.models import (
    DecoderLM,
    LoRA,
    LoRALinear,
    decoder_config,
    merge_lora,
    vit_config,
    with_lora,
)
from bdia_jax.testing import assert_bits_equal

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def tokens(batch=2, length=8, vocab=32, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


def base_model(seed=0, **overrides):
    return DecoderLM(decoder_config("llama-tiny", **overrides), rngs=nnx.Rngs(seed))


def lm_loss(model, batch, key):
    logits, aux = model(batch[:, :-1], key=key, train=True)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()
    return nll, {"overflow": aux["overflow"], "nonfinite": aux["nonfinite"]}


def perturbed(model, seed=7):
    """``model`` with random nonzero B adapters (as after training)."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    lora = jax.tree_util.tree_map(lambda v: 0.1 * jax.random.normal(next(keys), v.shape), lora)
    return nnx.merge(graphdef, lora, rest)


def test_fresh_adapters_change_no_bit():
    m = base_model()
    lm = with_lora(m, LoRA(rank=4, targets=ALL), rngs=nnx.Rngs(1))
    blocks = lm.stack.blocks
    assert isinstance(blocks.attn.query, LoRALinear) and isinstance(blocks.mlp.gate, LoRALinear)
    assert blocks.attn.query.lora_a.get_value().shape == (2, 32, 4)  # depth-stacked
    assert blocks.mlp.down.lora_b.get_value().shape == (2, 4, 32)
    assert_bits_equal(lm(tokens())[0], m(tokens())[0])
    assert_bits_equal(nnx.state(merge_lora(lm)), nnx.state(m))  # B = 0: merging is a copy
    # The adapters (drawn under jit) are the bits an eager construction with the same Rngs draws.
    eager = base_model(seed=1, lora=LoRA(rank=4, targets=ALL))
    assert_bits_equal(nnx.state(lm, nnx.LoRAParam), nnx.state(eager, nnx.LoRAParam))
    only_q = nnx.eval_shape(lambda: base_model(lora=LoRA(rank=2, targets=("q",)))).stack.blocks
    assert isinstance(only_q.attn.query, LoRALinear)
    assert not isinstance(only_q.attn.key, LoRALinear)
    vit = vit_config("tiny", lora=LoRA(targets=("q", "v", "up", "down")))  # any BlockConfig
    assert vit.lora.targets == ("q", "v", "up", "down")


def _step_memory(trainable):
    m = with_lora(base_model(width=64, mlp_dim=256, num_heads=4, num_kv_heads=2),
                  LoRA(rank=2, targets=("q", "v")), rngs=nnx.Rngs(1))
    optimizer = optax.adamw(1e-3)
    graphdef, state = training.init(m, optimizer, jax.random.key(0), trainable=trainable)
    step = training.make_train_step(graphdef, lm_loss, optimizer, trainable=trainable)
    batch = jax.ShapeDtypeStruct((2, 9), jnp.int32)
    lowered = jax.jit(step, donate_argnums=0).lower(state, batch)
    analysis = compile_for_memory(lowered).memory_analysis()
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    base, adapters = nnx.state(m, frozen), nnx.state(m, nnx.LoRAParam)
    return analysis, _nbytes(base), _nbytes(adapters), _nbytes(nnx.state(m.stack.blocks, frozen))


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_lora_step_holds_no_gradients_or_optimizer_state_for_the_base_weights():
    """Compiled memory of the same LoRA model trained fully vs. adapters only: the
    arguments lose exactly the base weights' two AdamW moments, and the temporaries lose at
    least the gradients of the stacked block weights (accumulated over the blocks, so all
    live at the end of the backward pass; the tied embedding's gradient may reuse a buffer
    that is dead by then)."""
    full, base_bytes, adapter_bytes, block_bytes = _step_memory(nnx.Param)
    lora, *_ = _step_memory(nnx.LoRAParam)
    assert base_bytes > 50 * adapter_bytes  # the base weights dominate
    assert block_bytes > 0.9 * base_bytes
    assert full.argument_size_in_bytes - lora.argument_size_in_bytes == 2 * base_bytes
    assert full.temp_size_in_bytes - lora.temp_size_in_bytes >= block_bytes


def _train(m, trainable, steps=2):
    optimizer = optax.adamw(1e-2)
    graphdef, state = training.init(m, optimizer, jax.random.key(3), trainable=trainable)
    step = jax.jit(training.make_train_step(graphdef, lm_loss, optimizer, trainable=trainable))
    metrics = []
    for i in range(steps):
        state, out = step(state, tokens(length=9, seed=i))
        metrics.append(out)
    return training.merge(graphdef, state), metrics


SLOW = pytest.mark.slow  # a gradient method with no LoRA-specific path (a compile)
# BDIA with Autodiff adds nothing: its forward is the reversible cases' and its backward
# plain autodiff of the adapted model, as in standard-autodiff.
METHODS = [
    pytest.param(dict(update=Standard(), backprop=Autodiff()), id="standard-autodiff"),
    pytest.param(dict(update=Standard(), backprop=Remat()), id="standard-remat", marks=SLOW),
    pytest.param(dict(update=BDIA(gamma=0.5), backprop=Reversible(recompute="separate")),
                 id="bdia-reversible-separate"),
    pytest.param(dict(update=BDIA(gamma=0.5), backprop=Reversible(recompute="shared")),
                 id="bdia-reversible-shared"),
]


@pytest.mark.parametrize("method", METHODS)
def test_lora_trains_only_the_adapters_with_every_method(method):
    """Two AdamW steps with trainable=nnx.LoRAParam (LoRA dropout and residual dropout on):
    the base weights keep their bits, every adapter moves, and a reversible BDIA stack's
    reversal error is exactly 0 (the second step runs with nonzero B)."""
    lora = LoRA(rank=4, alpha=8.0, dropout=0.25, targets=ALL)
    m = base_model(lora=lora, dropout=0.125, **method)
    trained, metrics = _train(m, nnx.LoRAParam)
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    assert_bits_equal(nnx.state(trained, frozen), nnx.state(m, frozen))
    for before, after in zip(jax.tree_util.tree_leaves(nnx.state(m, nnx.LoRAParam)),
                             jax.tree_util.tree_leaves(nnx.state(trained, nnx.LoRAParam))):
        assert not np.array_equal(np.asarray(before), np.asarray(after))
    for out in metrics:
        assert np.isfinite(float(out["loss"])) and not bool(out["skipped"])
        assert float(out["reversal_error"]) == 0.0


def test_lora_adapted_layer_merges_within_the_rounding_bound():
    """merge_lora's kernel W + s·(A@B) against the adapted layer x@W + s·((x@A)@B): each
    side is within γ_m·(|x|@|W| + s·|x|@|A|@|B|) of the exact value (m = in + rank + 3
    float32 roundings along any product-and-sum chain, γ_m = m·u/(1 - m·u)), so they differ
    by at most twice that."""
    lm = perturbed(with_lora(base_model(), LoRA(rank=4, alpha=16.0, targets=ALL),
                             rngs=nnx.Rngs(1)))
    merged = merge_lora(lm)
    x = jax.random.normal(jax.random.key(2), (5, 32), jnp.float32)
    for name in ("query", "key", "value", "out"):
        layer = getattr(lm.stack.blocks.attn, name)
        kernel = getattr(merged.stack.blocks.attn, name).kernel.get_value()
        w, a, b = (np.asarray(v.get_value()[1]) for v in (layer.kernel, layer.lora_a,
                                                           layer.lora_b))
        s = layer.lora_scale
        adapted = np.asarray(x @ w + ((x @ a) @ b) * s)
        merged_out = np.asarray(x @ kernel[1])
        n = w.shape[0] + a.shape[1] + 3
        u = np.finfo(np.float32).eps / 2
        gamma = n * u / (1 - n * u)
        xa = np.abs(np.asarray(x, np.float64))
        bound = 2 * gamma * (xa @ np.abs(w) + s * (xa @ np.abs(a)) @ np.abs(b))
        assert np.all(np.abs(adapted.astype(np.float64) - merged_out) <= bound)
        assert not np.array_equal(kernel[1], w)  # the adapters were merged in


def test_merged_model_saves_and_loads_bit_for_bit(tmp_path):
    standard = dict(update=Standard(), backprop=Autodiff())  # load's default method
    lm = perturbed(with_lora(base_model(**standard), LoRA(rank=4, targets=ALL),
                             rngs=nnx.Rngs(1)))
    with pytest.raises(ValueError, match="merge_lora"):
        pretrained.save(lm, tmp_path / "unmerged")
    merged = merge_lora(lm)
    assert merged.config.lora is None
    pretrained.save(merged, tmp_path / "hf")
    loaded = pretrained.load(tmp_path / "hf")
    assert_bits_equal(loaded(tokens())[0], merged(tokens())[0])
    # load(lora=...) = the checkpoint with fresh seed-0 adapters
    relora = pretrained.load(tmp_path / "hf", lora=LoRA(rank=2))
    assert_bits_equal(nnx.state(relora),
                      nnx.state(with_lora(loaded, LoRA(rank=2), rngs=nnx.Rngs(0))))


def test_peft_layout(tmp_path):
    import safetensors.numpy

    lora = LoRA(rank=4, alpha=8.0, targets=("q", "v", "down"))
    lm = perturbed(with_lora(base_model(), lora, rngs=nnx.Rngs(1)))
    pretrained.save_peft_adapter(lm, tmp_path, base_model_name_or_path="base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 3  # depth × (A, B) × targets
    q = lm.stack.blocks.attn.query
    a1 = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b1 = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a1.shape == (4, 32) and b1.shape == (32, 4)  # [rank, in], [out, rank]
    np.testing.assert_array_equal(a1, np.asarray(q.lora_a.get_value()[1]).T)
    np.testing.assert_array_equal(b1, np.asarray(q.lora_b.get_value()[1]).T)
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in tensors
    with pytest.raises(ValueError, match="GPT-2"):
        gpt = DecoderLM(decoder_config("tiny", lora=LoRA()), rngs=nnx.Rngs(0))
        pretrained.save_peft_adapter(gpt, tmp_path / "gpt")


@pytest.mark.parametrize("fields, match", [
    (dict(rank=0), "rank"),
    (dict(alpha=-1.0), "alpha"),
    (dict(dropout=1.5), "dropout"),
    (dict(targets=("q", "x")), "targets"),
    (dict(targets="q"), "targets"),
    (dict(targets=()), "targets"),
])
def test_bad_lora_settings_fail_in_one_line(fields, match):
    with pytest.raises(ValueError, match=match):
        LoRA(**fields)


def test_lora_config_errors():
    with pytest.raises(ValueError, match="swiglu"):
        decoder_config("tiny", lora=LoRA(targets=("gate",)))  # GPT-2's GELU MLP
    with pytest.raises(ValueError, match="chunk_mlp=False"):
        decoder_config("llama-tiny", attention="chunked",
                       lora=LoRA(dropout=0.25, targets=("up",)))
    with pytest.raises(ValueError, match="merge_lora"):
        with_lora(with_lora(base_model(), LoRA(), rngs=nnx.Rngs(0)), LoRA(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no LoRA|config.lora is None"):
        merge_lora(base_model())

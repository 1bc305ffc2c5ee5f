"""bdia_jax.pretrained: GPT-2 checkpoints in the Hugging Face layout.

tests/fixtures/gpt2_tiny is a random GPT-2 (2 layers, width 64, 4 heads, vocab 100,
32 positions) written by transformers' save_pretrained, with the logits of transformers
(float32) and of jaymody/picoGPT (float64) on tokens.npy; scripts/make_gpt2_tiny_fixture.py
wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import nnx
from float_bounds import ELEMENTWISE_ULPS, model_grad_rtol, transformer_chain
from models_utils import assert_model_grads_close, jitted, probe_total

from bdia_jax.models import GPT, ReversalProbe
from bdia_jax.pretrained import load_gpt2, save_gpt2

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "gpt2_tiny"
TOKENS = np.load(FIXTURE / "tokens.npy")  # [3, 32] int32
REFERENCES = ("transformers", "picogpt")


def rel_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def params_of(model):
    return nnx.state(model, nnx.Param)


@pytest.fixture(scope="module")
def standard():
    return load_gpt2(FIXTURE, update="standard")


@pytest.fixture(scope="module")
def standard_logits(standard):
    return jitted(standard)(TOKENS)


def fixture_tensors() -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(FIXTURE / "model.safetensors")


def write_checkpoint(folder: pathlib.Path, tensors: dict, config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((FIXTURE / "config.json").read_text()) if config is None else config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("reference", REFERENCES)
def test_standard_logits_equal_independent_gpt2(standard_logits, reference):
    want = np.load(FIXTURE / f"logits_{reference}.npy")
    assert standard_logits.shape == want.shape == (3, 32, 100)
    # External implementations' logits: the README's documented bar, 1e-4 of their scale
    # (float32 vs float32 / float64 in other orders: a few ulps of it through 2 blocks).
    assert rel_err(standard_logits, want) <= 1e-4
    # The fixture discriminates: attention is not uniform (the logits differ along the
    # sequence for a repeated token), so a wrong q/k split would show.
    assert np.std(want) > 0.1


def test_fixture_detects_a_wrong_gelu(standard):
    # The exact-erf GELU instead of GPT-2's tanh approximation misses the reference.
    config = dataclasses.replace(standard.config, approximate_gelu=False)
    wrong = GPT(config, rngs=nnx.Rngs(0))
    nnx.update(wrong, params_of(standard))
    assert rel_err(jitted(wrong)(TOKENS), np.load(FIXTURE / "logits_picogpt.npy")) > 1e-4


def test_bdia_inference_unquantized_is_bitwise_the_standard_model(standard_logits):
    bdia = load_gpt2(FIXTURE, update="bdia", quantize_at_inference=False)
    chex.assert_trees_all_equal(jitted(bdia)(TOKENS), standard_logits)
    # Op by op too (eager dispatch rounds differently from the fused jit, so eager vs eager).
    eager = load_gpt2(FIXTURE, update="standard")(jnp.asarray(TOKENS), train=False)[0]
    chex.assert_trees_all_equal(bdia(jnp.asarray(TOKENS), train=False)[0], eager)
    # On the grid (the default) the logits move, slightly.
    quantized = jitted(load_gpt2(FIXTURE, update="bdia"))(TOKENS)
    assert not np.array_equal(quantized, standard_logits)
    assert rel_err(quantized, standard_logits) < 0.05


def lm_loss(model, key):
    logits, _ = model(jnp.asarray(TOKENS[:, :-1]), key=key, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()


def finetune_step(model, key, optimizer):
    """A jitted training step ``step(model) -> (loss, param grads, probe grads, tuned model)``
    for models of ``model``'s structure (one compile for all of them)."""
    graphdef = nnx.graphdef(model)

    @jax.jit
    def run(params, probes):
        def loss(params, probes):
            return lm_loss(nnx.merge(graphdef, params, probes), key)

        value, (g_params, g_probes) = jax.value_and_grad(loss, argnums=(0, 1))(params, probes)
        updates, _ = optimizer.update(g_params, optimizer.init(params), params)
        return value, g_params, g_probes, optax.apply_updates(params, updates)

    def step(model):
        _, params, probes = nnx.split(model, nnx.Param, ReversalProbe)
        value, g_params, g_probes, new_params = run(params, probes)
        return value, g_params, g_probes, nnx.merge(graphdef, new_params, probes)

    return step


def test_reversible_finetuning_step_is_exact():
    key, optimizer = jax.random.key(3), optax.adamw(1e-3)
    # Dropout 0.1 from the checkpoint's config (resid_pdrop, attn_pdrop).
    model = load_gpt2(FIXTURE, update="bdia", backprop="reversible", gamma=0.5, frac_bits=9)
    assert model.config.dropout == model.config.attention_dropout == 0.1
    step = finetune_step(model, key, optimizer)
    loss, grads, probes, tuned = step(model)
    assert probe_total(probes) == 0.0
    oracle = load_gpt2(FIXTURE, update="bdia", backprop="autodiff")
    loss_a, grads_a, _, _ = finetune_step(oracle, key, optimizer)(oracle)
    chex.assert_trees_all_equal(loss, loss_a)
    # The fixture (width 64, 4 heads, MLP 256, 2 blocks) on TOKENS [3, 32]; the loss is a
    # cross-entropy over the 100-token vocabulary (its sum, an exp and a log).
    chain = transformer_chain(width=64, mlp_dim=256, seq=32, depth=2, heads=4) + \
        100 + 2 * ELEMENTWISE_ULPS
    assert_model_grads_close(grads, grads_a, rtol=model_grad_rtol(chain, positions=3 * 32))
    # The step changed the model, and the fine-tuned model's next step is exact too.
    assert not np.array_equal(tuned.token_embed.embedding[...], model.token_embed.embedding[...])
    loss2, _, probes2, _ = step(tuned)
    assert probe_total(probes2) == 0.0
    assert float(loss2) < float(loss)


# ------------------------------------------------------------------ save / load
def test_save_then_load_gives_the_same_bits(standard, tmp_path):
    save_gpt2(standard, tmp_path / "out")
    # The file holds the checkpoint's tensors bit for bit, under the same names.
    chex.assert_trees_all_equal(safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors"),
                                fixture_tensors())
    again = load_gpt2(tmp_path / "out", update="bdia", backprop="autodiff")
    chex.assert_trees_all_equal(params_of(again), params_of(standard))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_inner"] == 256
    assert config["layer_norm_epsilon"] == 1e-5 and config["activation_function"] == "gelu_new"
    # Non-parameter state is what a freshly built GPT has.
    fresh = GPT(again.config, rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal(nnx.state(again, ReversalProbe), nnx.state(fresh, ReversalProbe))


def test_save_writes_a_new_models_weights(tmp_path):
    model = GPT(load_gpt2(FIXTURE).config, rngs=nnx.Rngs(7))
    save_gpt2(model, tmp_path)
    assert "eos_token_id" not in json.loads((tmp_path / "config.json").read_text())
    save_gpt2(model, tmp_path, bos_token_id=99, eos_token_id=99)  # overwrites in place
    chex.assert_trees_all_equal(params_of(load_gpt2(tmp_path)), params_of(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"]) == (99, 99)
    with pytest.raises(ValueError, match=r"eos_token_id must be an int in \[0, 100\), got 100"):
        save_gpt2(model, tmp_path, eos_token_id=100)


def test_prefix_is_optional_and_buffers_are_ignored(standard, tmp_path):
    tensors = {k.removeprefix("transformer."): v for k, v in fixture_tensors().items()}
    causal = np.tril(np.ones((32, 32), np.uint8))[None, None]
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = causal
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"]
    loaded = load_gpt2(write_checkpoint(tmp_path, tensors), update="standard")
    chex.assert_trees_all_equal(params_of(loaded), params_of(standard))


def test_half_precision_checkpoints_load_exactly(tmp_path):
    tensors = {k: v.astype(np.float16) for k, v in fixture_tensors().items()}
    loaded = load_gpt2(write_checkpoint(tmp_path, tensors))
    chex.assert_trees_all_equal(loaded.token_embed.embedding[...],
                                jnp.asarray(tensors["transformer.wte.weight"], jnp.float32))


# ------------------------------------------------------------------ overrides
def test_overrides_reach_the_config():
    model = load_gpt2(FIXTURE, dropout=0.0, attention_dropout=0.05, update="bdia", gamma=0.25,
                      frac_bits=10, quantize_at_inference=False, recompute="separate")
    c = model.config
    assert (c.dropout, c.attention_dropout, c.layer_norm_eps, c.approximate_gelu) == \
        (0.0, 0.05, 1e-5, True)
    assert (c.vocab_size, c.max_len, c.width, c.depth, c.num_heads, c.mlp_dim) == \
        (100, 32, 64, 2, 4, 256)


@pytest.mark.parametrize("overrides, match", [
    (dict(width=32), r"width=32 conflicts with the checkpoint's 64"),
    (dict(vocab_size=50257), r"vocab_size=50257 conflicts with the checkpoint's 100"),
    (dict(dropuot=0.1), r"unknown load overrides \['dropuot'\]"),
    (dict(update="bdia", backprop="reversible", frac_bits=None), r"needs .*frac_bits"),
])
def test_bad_overrides_fail_in_one_line(overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        load_gpt2(FIXTURE, **overrides)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ misfit checkpoints
def _renamed(tensors, old, new):
    return {new if k == old else k: v for k, v in tensors.items()}


def _misfits():
    t = fixture_tensors()
    c_fc = "transformer.h.1.mlp.c_fc.weight"
    yield "wrong shape", {**t, c_fc: t[c_fc][:, :255]}, None, \
        r"tensor 'transformer.h.1.mlp.c_fc.weight' has shape \[64, 255\], expected \[64, 256\]"
    missing = {k: v for k, v in t.items() if k != "transformer.h.1.ln_2.bias"}
    yield "missing", missing, None, \
        r"missing tensor 'transformer.h.1.ln_2.bias' \(expected shape \[64\]\)"
    yield "unexpected", {**t, "transformer.h.2.ln_1.weight": t["transformer.h.1.ln_1.weight"]}, \
        None, r"unexpected tensor 'transformer.h.2.ln_1.weight' \[64\]"
    wte = "transformer.wte.weight"
    yield "vocab mismatch", {**t, wte: np.concatenate([t[wte], t[wte][:1]])}, None, \
        r"'transformer.wte.weight' has shape \[101, 64\], expected \[100, 64\] \(vocab_size " \
        r"mismatch: config.json says 100\)"
    config = json.loads((FIXTURE / "config.json").read_text())
    yield "model type", t, {**config, "model_type": "bert"}, \
        r"model_type='bert' is not supported"
    yield "untied head", {**t, "lm_head.weight": t[wte] + 1}, None, \
        r"lm_head.weight differs from wte.weight"
    yield "integer tensor", {**t, "transformer.ln_f.bias": np.zeros(64, np.int32)}, None, \
        r"'transformer.ln_f.bias' has dtype int32"
    yield "attention scaling", t, {**config, "scale_attn_by_inverse_layer_idx": True}, \
        r"scale_attn_by_inverse_layer_idx=True is not supported"
    yield "activation", t, {**config, "activation_function": "relu"}, \
        r"activation_function='relu' is not supported"


@pytest.mark.parametrize("case", list(_misfits()), ids=lambda case: case[0])
def test_misfit_checkpoints_fail_in_one_line(case, tmp_path):
    _, tensors, config, match = case
    with pytest.raises(ValueError, match=match) as err:
        load_gpt2(write_checkpoint(tmp_path, tensors, config))
    assert "\n" not in str(err.value)


def test_missing_files_name_the_layout(tmp_path):
    shutil.copy(FIXTURE / "config.json", tmp_path)
    with pytest.raises(ValueError, match=r"model.safetensors"):
        load_gpt2(tmp_path)
    with pytest.raises(ValueError, match=r"config.json"):
        load_gpt2(tmp_path / "nowhere")


def test_method_objects_and_flat_keywords_give_the_same_config():
    from bdia_jax import methods
    objects = load_gpt2(FIXTURE, update=methods.BDIA(gamma=0.25, frac_bits=10),
                        backprop=methods.Reversible(recompute="shared"))
    flat = load_gpt2(FIXTURE, update="bdia", gamma=0.25, frac_bits=10, backprop="reversible",
                     recompute="shared")
    assert objects.config == flat.config
    assert objects.config.update == methods.BDIA(gamma=0.25, frac_bits=10)
    with pytest.raises(ValueError, match="not both"):
        load_gpt2(FIXTURE, update=methods.BDIA(), gamma=0.5)

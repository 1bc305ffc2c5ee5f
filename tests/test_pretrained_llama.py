"""bdia_jax.pretrained on the Llama family: tiny random Llama (GQA, llama3 rope scaling,
untied head), Qwen2 (q/k/v biases, tied, bfloat16 weights), Qwen3 (q/k norm, sharded) and
Mistral checkpoints written by transformers' save_pretrained, with transformers' float32
logits (scripts/make_hf_tiny_fixtures.py wrote them, tests/fixtures/<type>_tiny/)."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import safetensors
from flax import nnx
from models_utils import jitted, probe_total, train_grads

from bdia_jax import pretrained
from bdia_jax.methods import BDIA, Standard
from bdia_jax.models import DecoderLM
from bdia_jax.testing import assert_bits_equal

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TYPES = ("llama", "qwen2", "qwen3", "mistral")


def fixture(name) -> pathlib.Path:
    return FIXTURES / f"{name}_tiny"


def rel_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def params_of(model):
    return nnx.state(model, nnx.Param)


@pytest.mark.parametrize("name", TYPES)
def test_logits_equal_transformers(name):
    model = pretrained.load(fixture(name))
    c = model.config
    assert c.update == Standard() and c.norm == "rmsnorm" and c.position == "rope"
    tokens = np.load(fixture(name) / "tokens.npy")
    want = np.load(fixture(name) / "logits_transformers.npy")
    got = jitted(model)(tokens)
    # transformers' float32 logits (an external implementation): the README's bar, 1e-4 of
    # their scale; both sides round in other orders, a few ulps of it through 2 blocks.
    assert rel_err(got, want) <= 1e-4
    assert np.std(want) > 0.05  # the references discriminate (not a constant output)


def test_the_configs_map_to_the_right_architecture():
    llama, qwen2, qwen3, mistral = (pretrained.read_config(fixture(n)) for n in TYPES)
    assert (llama.kv_heads, llama.num_heads, llama.tie_embeddings) == (2, 4, False)
    assert (llama.rope_scaling, llama.rope_factor, llama.rope_original_max_len) == \
        ("llama3", 8.0, 16)
    assert qwen2.bias == "qkv" and qwen2.tie_embeddings and qwen2.rope_theta == 1e6
    assert qwen3.qk_norm and qwen3.bias == "none"
    assert mistral.bias == "none" and not mistral.tie_embeddings


def test_a_wrong_rope_scaling_misses_the_reference():
    """The llama3 scaling matters on this fixture (its original context is 16 positions)."""
    model = pretrained.load(fixture("llama"))
    wrong = DecoderLM(pretrained.read_config(fixture("llama")).__class__(
        **{**_fields(model.config), "rope_scaling": "default"}), rngs=nnx.Rngs(0))
    nnx.update(wrong, params_of(model))
    tokens = np.load(fixture("llama") / "tokens.npy")
    want = np.load(fixture("llama") / "logits_transformers.npy")
    assert rel_err(jitted(wrong)(tokens), want) > 1e-3


def _fields(config):
    import dataclasses
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_unquantized_bdia_is_the_standard_model_bit_for_bit(name):
    tokens = np.load(fixture(name) / "tokens.npy")
    standard = jitted(pretrained.load(fixture(name)))(tokens)
    bdia = pretrained.load(fixture(name), update="bdia", quantize_at_inference=False)
    assert bdia.config.update == BDIA(quantize_at_inference=False)
    assert_bits_equal(jitted(bdia)(tokens), standard)


@pytest.mark.parametrize("recompute", ["separate", "shared"])
def test_reversible_step_is_exact(recompute):
    model = pretrained.load(fixture("qwen3"), update="bdia", backprop="reversible",
                            recompute=recompute, dropout=0.1)
    tokens = np.load(fixture("qwen3") / "tokens.npy")
    _, aux, grads, probes = train_grads(
        model, lambda m: m(tokens, key=jax.random.key(0), train=True))
    assert probe_total(probes) == 0.0
    assert not bool(aux["overflow"])


@pytest.mark.parametrize("name", TYPES)
def test_save_then_load_gives_the_same_bits(name, tmp_path):
    model = pretrained.load(fixture(name))
    pretrained.save(model, tmp_path)
    again = pretrained.load(tmp_path)
    assert again.config == model.config
    assert_bits_equal(params_of(again), params_of(model))


def test_bfloat16_weights_round_trip_bit_for_bit(tmp_path):
    """Qwen2's bfloat16 file → bfloat16 parameters → save: the file's tensors again."""
    model = pretrained.load(fixture("qwen2"), param_dtype="bfloat16")
    pretrained.save(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "qwen2" and written["torch_dtype"] == "bfloat16"
    original = _tensors(fixture("qwen2"))
    saved = _tensors(tmp_path)
    assert sorted(saved) == sorted(original)
    for name in original:
        assert_bits_equal(saved[name], original[name])


def _tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safetensors.safe_open(str(file), framework="flax") as f:
            out.update({n: np.asarray(f.get_tensor(n)) for n in f.keys()})
    return out


def _edited(tmp_path, name, config_edit=None, tensor_edit=None):
    """A copy of fixture ``name`` with config.json keys set (None: removed) / tensors
    replaced."""
    folder = tmp_path / name
    shutil.copytree(fixture(name), folder)
    if config_edit:
        config = json.loads((folder / "config.json").read_text())
        for key, value in config_edit.items():
            config.pop(key, None) if value is None else config.__setitem__(key, value)
        (folder / "config.json").write_text(json.dumps(config))
    if tensor_edit:
        import safetensors.flax
        tensors = _tensors(folder)
        tensor_edit(tensors)
        safetensors.flax.save_file({k: jax.numpy.asarray(v) for k, v in tensors.items()},
                                   str(folder / "model.safetensors"),
                                   metadata={"format": "pt"})
    return folder


REFUSALS = [
    ("mistral", dict(sliding_window=8), None, r"sliding_window=8 is not supported: shorter "
     r"than the context max_len=64.*pass max_len=8"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32), None, r"sliding_window=32"),
    ("llama", dict(num_local_experts=8), None, r"num_local_experts=8 is not supported"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                    "rope_theta": 10000.0}), None,
     r"rope_type='yarn' is not supported"),
    ("llama", dict(hidden_act="gelu"), None, r"hidden_act='gelu' is not supported"),
    ("llama", dict(attention_bias=True), None, r"attention_bias=True is not supported"),
    ("mistral", dict(model_type="mixtral"), None, r"model_type='mixtral' is not supported"),
    ("llama", dict(partial_rotary_factor=0.5), None, r"partial_rotary_factor=0.5"),
    ("qwen2", None, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]
                                            + 1),
     r"lm_head.weight differs from embed_tokens.weight"),
    ("llama", None, lambda t: t.pop("lm_head.weight"), r"missing tensor 'lm_head.weight'"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: f"{c[0]}-{c[3][:24]}")
def test_unsupported_checkpoints_are_refused_in_one_line(case, tmp_path):
    name, config_edit, tensor_edit, match = case
    folder = _edited(tmp_path, name, config_edit, tensor_edit)
    with pytest.raises(ValueError, match=match) as err:
        pretrained.load(folder)
    assert "\n" not in str(err.value)


def test_a_sliding_window_covering_the_context_loads():
    folder = fixture("mistral")
    config = pretrained.read_config(folder, max_len=16)
    assert config.max_len == 16


def test_overrides():
    c = pretrained.read_config(fixture("llama"), attention="chunked", chunk_size=8,
                               param_dtype="bfloat16", max_len=32)
    assert (c.attention, c.chunk_size, c.param_dtype, c.max_len) == ("chunked", 8, "bfloat16",
                                                                     32)
    with pytest.raises(ValueError, match=r"num_kv_heads=4 conflicts with the checkpoint's 2"):
        pretrained.read_config(fixture("llama"), num_kv_heads=4)
    with pytest.raises(ValueError, match=r"gamma=0.25 needs a training method: pass "
                                         r"update='bdia'"):
        pretrained.read_config(fixture("llama"), gamma=0.25)


def test_bfloat16_parameters_compute_the_bfloat16_checkpoint():
    """Qwen2's weights are bfloat16: kept as bfloat16 parameters (the stream, norms and
    matmuls stay float32), the logits are those of the upcast weights."""
    model = pretrained.load(fixture("qwen2"), param_dtype="bfloat16")
    tokens = np.load(fixture("qwen2") / "tokens.npy")
    want = np.load(fixture("qwen2") / "logits_transformers.npy")
    assert rel_err(jitted(model)(tokens), want) <= 1e-4  # the documented bar, as above


def test_save_refuses_what_no_hf_model_type_computes(tmp_path):
    from bdia_jax.models import decoder_config
    mixed = DecoderLM(decoder_config("llama-tiny", norm="layernorm"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"save writes GPT-2 or Llama-family configs"):
        pretrained.save(mixed, tmp_path)
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        pretrained.save(pretrained.load(fixture("llama")), tmp_path, dtype="int8")
    assert not any(tmp_path.iterdir())


def test_load_without_update_is_the_standard_network():
    for name in ("llama", "gpt2"):
        c = pretrained.read_config(fixture(name))
        assert c.update == Standard() and c.backprop.__class__.__name__ == "Autodiff"

"""The real SmolLM2-135M-Instruct (../shared/models, a Q4_1 GGUF) end to end: its
next-token log-probabilities and greedy continuation against transformers' own GGUF import
(tests/fixtures/smollm2_gguf_reference.*, written by scripts/make_hf_tiny_fixtures.py),
unquantized BDIA = the standard model bit for bit, and one reversible BDIA training step
through all 30 blocks with reversal error exactly 0 in both recompute modes."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import numpy as np
import pytest
from models_utils import jitted, probe_total, train_grads

from bdia_jax import pretrained
from bdia_jax.testing import assert_bits_equal

REPO = pathlib.Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
pytestmark = [
    pytest.mark.slow,  # loads and dequantizes 135M parameters, compiles 30-block programs
    pytest.mark.skipif(not GGUF.is_file(), reason=f"the real model is absent ({GGUF})"),
]
MAX_LEN = 32  # the reference text is 23 tokens and its continuation 8


@pytest.fixture(scope="module", autouse=True)
def read_once():
    """Every load in this module reads and dequantizes the file once: the loads differ in
    the method only, and each still builds its model from the checkpoint's tensors."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrained, "read_checkpoint", functools.cache(pretrained.read_checkpoint))
        yield


@pytest.fixture(scope="module")
def reference():
    ref = json.loads((FIXTURES / "smollm2_gguf_reference.json").read_text())
    return ref, np.load(FIXTURES / "smollm2_gguf_reference.npz")


@pytest.fixture(scope="module")
def standard():
    return pretrained.load(GGUF, max_len=MAX_LEN)


def test_log_probabilities_and_greedy_continuation(standard, reference):
    ref, arrays = reference
    c = standard.config
    assert (c.depth, c.width, c.num_heads, c.kv_heads, c.tie_embeddings) == \
        (30, 576, 9, 3, True)
    tokens = arrays["tokens"][None]
    assert tokens[0].tolist() == ref["token_ids"]
    tokenizer = pretrained.load_tokenizer(GGUF)
    assert tokenizer.encode(ref["text"], add_special_tokens=False).ids == ref["token_ids"]
    logits = np.asarray(jitted(standard)(tokens), np.float64)[0]
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                       keepdims=True)) - logits.max(-1, keepdims=True)
    nxt = log_probs[np.arange(22), arrays["tokens"][1:]]
    # Both sides float32 on the same dequantized weights, summed in other orders: per block
    # each dot (at most mlp_dim = 1536 terms) reassociates with error <= n·u of its
    # magnitude, and the depth blocks add theirs; log-softmax at most doubles it.
    bound = 2 * c.depth * c.mlp_dim * 2.0**-24 * float(np.max(np.abs(logits)))
    np.testing.assert_allclose(nxt, arrays["next_logprob"], rtol=0, atol=bound)
    # The top token is the reference's wherever its margin over the second exceeds what the
    # two sides' roundings can move (2 bound); at a nearer tie it is one of the two.
    top = np.argmax(logits, -1)
    clear = arrays["top_logprob"][:, 0] - arrays["top_logprob"][:, 1] > 2 * bound
    np.testing.assert_array_equal(top[clear], arrays["top_ids"][clear, 0])
    assert np.all(np.any(top[~clear, None] == arrays["top_ids"][~clear, :2], -1))
    # Exact while no greedy step is such a near tie (the reference keeps no margins for the
    # generated steps): a bits check with that precondition, not a tolerance.
    greedy = standard.generate(tokens, 8, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(greedy)[0, 23:], arrays["greedy"])
    assert tokenizer.decode(np.asarray(greedy)[0, 23:].tolist()) == ref["greedy_text"]


def test_unquantized_bdia_is_the_standard_model(standard, reference):
    tokens = reference[1]["tokens"][None]
    bdia = pretrained.load(GGUF, max_len=MAX_LEN, update="bdia", quantize_at_inference=False)
    assert_bits_equal(jitted(bdia)(tokens), jitted(standard)(tokens))


@pytest.mark.parametrize("recompute", ["separate", "shared"])
def test_one_reversible_step_through_30_blocks_is_exact(recompute, reference):
    tokens = reference[1]["tokens"][None]
    model = pretrained.load(GGUF, max_len=MAX_LEN, update="bdia", backprop="reversible",
                            recompute=recompute)
    _, aux, grads, probes = train_grads(
        model, lambda m: m(tokens, key=jax.random.key(0), train=True))
    assert probe_total(probes) == 0.0
    assert not bool(aux["overflow"]) and not bool(aux["nonfinite"])
    assert np.any(np.asarray(grads["stack"]["blocks"]["mlp"]["down"]["kernel"][...]) != 0)

"""Write tests/fixtures/gpt2_tiny: a random tiny GPT-2 and its logits from two references.

The checkpoint is written by Hugging Face ``transformers`` itself (GPT2LMHeadModel with random
weights, ``save_pretrained``), so the layout is the real one. The reference logits come from
two GPT-2 implementations nobody in this project wrote:

* ``logits_transformers.npy``: transformers' GPT2LMHeadModel in float32 (PyTorch, CPU);
* ``logits_picogpt.npy``: jaymody/picoGPT's NumPy ``gpt2`` in float64.

tests/test_pretrained.py compares bdia_jax's GPT against both; neither reference is needed to
run the tests. The script also checks that transformers reads back what ``save_gpt2`` writes.

Run (from the repository root, with torch, transformers and a picoGPT checkout outside the
repository; the fixture's files are committed):

    python scripts/make_gpt2_tiny_fixture.py --picogpt_dir /path/to/picoGPT

Tested with transformers 5.24.0, torch 2.13.0+cpu, picoGPT commit 817292b.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gpt2_tiny"
SIZES = dict(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4)
BATCH, SEED = 3, 0


def random_hf_model(torch, transformers):
    """GPT2LMHeadModel of SIZES whose every parameter is random (LayerNorm scales near 1,
    non-zero biases), scaled so that attention is neither uniform nor one-hot."""
    end_of_text = SIZES["vocab_size"] - 1  # GPT-2's <|endoftext|> is its last token
    config = transformers.GPT2Config(**SIZES, bos_token_id=end_of_text, eos_token_id=end_of_text,
                                     attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "wte" in name or "wpe" in name:
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def picogpt_logits(gpt2, tensors: dict, tokens: np.ndarray) -> np.ndarray:
    """picoGPT's gpt2() on each sequence, float64, from the saved tensors."""
    t = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in tensors.items()}

    def lin(name):
        return {"w": t[f"{name}.weight"], "b": t[f"{name}.bias"]}

    def ln(name):
        return {"g": t[f"{name}.weight"], "b": t[f"{name}.bias"]}

    blocks = [dict(ln_1=ln(f"h.{i}.ln_1"), ln_2=ln(f"h.{i}.ln_2"),
                   attn=dict(c_attn=lin(f"h.{i}.attn.c_attn"), c_proj=lin(f"h.{i}.attn.c_proj")),
                   mlp=dict(c_fc=lin(f"h.{i}.mlp.c_fc"), c_proj=lin(f"h.{i}.mlp.c_proj")))
              for i in range(SIZES["n_layer"])]
    return np.stack([gpt2(list(seq), t["wte.weight"], t["wpe.weight"], blocks, ln("ln_f"),
                          SIZES["n_head"]) for seq in tokens])


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--picogpt_dir", required=True, help="folder holding picoGPT's gpt2.py")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    import safetensors.numpy
    import torch
    import transformers

    sys.path.insert(0, args.picogpt_dir)
    from gpt2 import gpt2  # picoGPT

    out = pathlib.Path(args.out)
    model = random_hf_model(torch, transformers)
    model.save_pretrained(out)
    tokens = np.random.default_rng(SEED).integers(0, SIZES["vocab_size"],
                                                  (BATCH, SIZES["n_positions"]), np.int32)
    np.save(out / "tokens.npy", tokens)
    with torch.no_grad():
        hf = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.save(out / "logits_transformers.npy", hf)
    tensors = safetensors.numpy.load_file(out / "model.safetensors")
    pico = picogpt_logits(gpt2, tensors, tokens)
    np.save(out / "logits_picogpt.npy", pico)
    print("tensors:", sorted(tensors))
    print(f"transformers vs picoGPT: rel err {rel_err(hf, pico):.2e}")

    # bdia_jax round trip: load, save, and let transformers read what save_gpt2 wrote.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from bdia_jax.pretrained import load_gpt2, save_gpt2

    ours = load_gpt2(out, update="standard")
    logits = np.asarray(ours(tokens, train=False)[0])
    print(f"bdia_jax vs transformers: rel err {rel_err(logits, hf):.2e}; "
          f"vs picoGPT: {rel_err(logits, pico):.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        save_gpt2(ours, tmp)
        again = transformers.GPT2LMHeadModel.from_pretrained(
            tmp, attn_implementation="eager").eval()
        with torch.no_grad():
            back = again(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     again.state_dict().values()))
        print(f"transformers reads save_gpt2's folder: same parameters {same}, "
              f"logits equal {np.array_equal(back, hf)}")
    print(json.dumps({f.name: f.stat().st_size for f in sorted(out.iterdir())}))


if __name__ == "__main__":
    main()

"""Write the Llama-family test fixtures with Hugging Face ``transformers`` (not with bdia_jax).

1. tests/fixtures/<name>_tiny/: random tiny models written by ``save_pretrained`` itself, each
   with ``tokens.npy`` and ``logits_transformers.npy`` (float32 forward, eager attention):

   llama_tiny    GQA (4 query / 2 key-value heads), untied head, rope_scaling llama3, float32
   qwen2_tiny    q/k/v biases, tied head, saved in bfloat16 (logits from the bf16 weights
                 upcast to float32)
   qwen3_tiny    per-head q/k RMSNorm, tied head, sharded (max_shard_size 24KB), float32
   mistral_tiny  GQA, sliding_window None, untied head, float32

2. tests/fixtures/smollm2_gguf_reference.{json,npz}: for the real GGUF
   (../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf, read where it lies), transformers' own
   GGUF import (AutoModelForCausalLM / AutoTokenizer with gguf_file=...) gives the token ids
   of a fixed text, float32 next-token log-probabilities at every position (of the actual next
   token, and the top 10), and a greedy continuation of 8 tokens.

3. Checks (printed): bdia_jax.formats reads each fixture bit for bit as safetensors holds it;
   transformers reads back what write_hf_folder writes (same parameters, same logits); the GGUF
   read by bdia_jax.formats, written as an HF folder and run by transformers, gives the
   reference log-probabilities; write_tokenizer's folder loads with AutoTokenizer and gives the
   same ids. When bdia_jax.pretrained.load / save support these models (decoder branch), also:
   load's logits against transformers', and transformers reading save's folder.

Run from the repository root (torch, transformers and accelerate -- which transformers needs
to read GGUF -- are needed for this script only):

    python scripts/make_hf_tiny_fixtures.py [--skip_gguf]

Tested with transformers 5.25.0, torch 2.13.0+cpu, accelerate 1.16.0, gguf 0.19.0.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED, BATCH, LENGTH = 0, 2, 16
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              attn_implementation="eager")
# name -> (config class, extra config, save dtype, max_shard_size)
MODELS = {
    "llama_tiny": ("LlamaConfig", dict(
        tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16)),
        "float32", None),
    "qwen2_tiny": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6,
                                       use_sliding_window=False), "bfloat16", None),
    "qwen3_tiny": ("Qwen3Config", dict(tie_word_embeddings=True, rope_theta=1e6,
                                       use_sliding_window=False), "float32", "24KB"),
    "mistral_tiny": ("MistralConfig", dict(tie_word_embeddings=False, rope_theta=1e6,
                                           sliding_window=None), "float32", None),
}
# The GGUF reference text: words, digits (SmolLM2 splits them one by one), punctuation.
TEXT = "The capital of France is Paris. In 2024, about 2 million people lived there, and"
GREEDY_TOKENS, TOP_K = 8, 10


def randomize(model, torch) -> None:
    """Every parameter random (norm scales near 1, biases small), scaled so that attention is
    neither uniform nor one-hot and the logits spread."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


def logits_of(model, tokens, torch) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def write_tiny(name, torch, transformers) -> None:
    cls, extra, dtype, shard = MODELS[name]
    config = getattr(transformers, cls)(**COMMON, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model, torch)
    out = FIXTURES / name
    shutil.rmtree(out, ignore_errors=True)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kwargs)
    # The reference forward: the saved weights, in float32.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = np.random.default_rng(SEED).integers(0, config.vocab_size, (BATCH, LENGTH),
                                                  np.int32)
    np.save(out / "tokens.npy", tokens)
    np.save(out / "logits_transformers.npy", logits_of(model, tokens, torch))
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    print(f"{name}: {sizes}")


def check_tiny(name, torch, transformers) -> None:
    """bdia_jax.formats reads the folder as safetensors holds it; transformers reads back what
    write_hf_folder writes."""
    import safetensors.numpy

    from bdia_jax.formats import read_checkpoint, write_hf_folder

    folder = FIXTURES / name
    ckpt = read_checkpoint(folder)
    files = sorted(folder.glob("*.safetensors"))
    direct = {k: v for f in files for k, v in safetensors.numpy.load_file(f).items()}
    same = direct.keys() == ckpt.tensors.keys() and all(
        direct[k].dtype == ckpt.tensors[k].dtype and
        direct[k].tobytes() == ckpt.tensors[k].tobytes() for k in direct)
    tokens = np.load(folder / "tokens.npy")
    reference = np.load(folder / "logits_transformers.npy")
    original = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_folder(pathlib.Path(tmp) / "m", ckpt.config, ckpt.tensors,
                        max_shard_bytes=16 * 1024)
        again = transformers.AutoModelForCausalLM.from_pretrained(
            pathlib.Path(tmp) / "m", dtype=torch.float32, attn_implementation="eager").eval()
        params = all(torch.equal(a, b) for a, b in zip(original.state_dict().values(),
                                                       again.state_dict().values()))
        back = logits_of(again, tokens, torch)
    print(f"{name}: {ckpt.source}; formats == safetensors bits: {same}; transformers reads "
          f"write_hf_folder (sharded 16 KiB): same parameters {params}, logits equal "
          f"{np.array_equal(back, reference)}")
    check_pretrained(name, folder, tokens, reference, original, torch, transformers)


def check_pretrained(name, folder, tokens, reference, original, torch, transformers) -> None:
    """The decoder branch's load/save, once they read this model_type (skipped until then)."""
    try:
        from bdia_jax.pretrained import load, save
        ours = load(folder, update="standard")
    except Exception as err:  # ImportError, or a model_type load does not read yet
        print(f"{name}: bdia_jax.pretrained.load/save check skipped ({type(err).__name__}: "
              f"{str(err)[:120]})")
        return
    logits = np.asarray(ours(tokens, train=False)[0])
    with tempfile.TemporaryDirectory() as tmp:
        save(ours, tmp)
        again = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager").eval()
        back = logits_of(again, tokens, torch)
    print(f"{name}: bdia_jax load vs transformers rel err {rel_err(logits, reference):.2e}; "
          f"transformers reads save's folder: logits rel err {rel_err(back, reference):.2e}")


def write_gguf_reference(torch, transformers) -> None:
    """Reference ids, log-probabilities and greedy tokens from transformers' GGUF import."""
    from bdia_jax.formats import load_tokenizer, read_checkpoint, write_hf_folder, write_tokenizer

    kw = dict(gguf_file=GGUF.name)
    hf_tok = transformers.AutoTokenizer.from_pretrained(GGUF.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, dtype=torch.float32, attn_implementation="eager", **kw).eval()
    ids = hf_tok(TEXT, add_special_tokens=False)["input_ids"]
    tokens = np.asarray([ids], np.int32)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens.astype(np.int64))).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1).numpy()
        greedy = model.generate(torch.from_numpy(tokens.astype(np.int64)), do_sample=False,
                                max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                                pad_token_id=hf_tok.eos_token_id)[0, len(ids):].tolist()
    top = np.argsort(-logp, axis=-1, kind="stable")[:, :TOP_K]
    np.savez(FIXTURES / "smollm2_gguf_reference.npz",
             tokens=tokens[0],
             next_logprob=np.take_along_axis(logp[:-1], tokens[0, 1:, None], -1)[:, 0],
             top_ids=top.astype(np.int32),
             top_logprob=np.take_along_axis(logp, top, -1).astype(np.float32),
             greedy=np.asarray(greedy, np.int32))
    meta = {"gguf": f"../shared/models/{GGUF.name}", "text": TEXT, "token_ids": ids,
            "greedy_ids": greedy, "greedy_text": hf_tok.decode(greedy),
            "reference": f"transformers {transformers.__version__} GGUF import, float32, eager "
                         f"attention, torch {torch.__version__}"}
    (FIXTURES / "smollm2_gguf_reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"GGUF reference: {len(ids)} tokens, greedy {hf_tok.decode(greedy)!r}")

    # Checks of bdia_jax.formats against it.
    ours_ids = load_tokenizer(GGUF).encode(TEXT, add_special_tokens=False).ids
    print(f"formats tokenizer ids == transformers': {ours_ids == ids}")
    ckpt = read_checkpoint(GGUF)
    state = model.state_dict()
    dequantized = [k for k in ckpt.tensors if k in state and state[k].dtype == torch.float32
                   and tuple(state[k].shape) == ckpt.tensors[k].shape]
    equal = sum(np.array_equal(state[k].numpy(), ckpt.tensors[k]) for k in dequantized)
    print(f"formats GGUF tensors bit-equal to transformers' float32 ones: {equal} of "
          f"{len(dequantized)} comparable (of {len(ckpt.tensors)})")
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_folder(tmp, ckpt.config, ckpt.tensors)
        write_tokenizer(tmp, GGUF)
        mine = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            mine_logp = torch.log_softmax(mine(torch.from_numpy(tokens.astype(np.int64)))
                                          .logits[0].float(), -1).numpy()
        tok_again = transformers.AutoTokenizer.from_pretrained(tmp)
        again_ids = tok_again(TEXT, add_special_tokens=False)["input_ids"]
    print(f"GGUF via formats -> HF folder -> transformers: log-prob max abs diff "
          f"{np.max(np.abs(mine_logp - logp)):.2e}; write_tokenizer's folder ids equal "
          f"{again_ids == ids}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip_gguf", action="store_true", help="tiny fixtures only")
    parser.add_argument("--check_only", action="store_true", help="write nothing; run checks")
    args = parser.parse_args()
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    torch.manual_seed(SEED)
    for name in MODELS:
        if not args.check_only:
            write_tiny(name, torch, transformers)
        check_tiny(name, torch, transformers)
    if not args.skip_gguf and not args.check_only:
        write_gguf_reference(torch, transformers)


if __name__ == "__main__":
    main()

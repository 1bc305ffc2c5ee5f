"""Time one train step of SmolLM2-135M (the GGUF in ../shared/models) per method.

    [FRAC_BITS=7] python scripts/time_finetune_step.py 8x64,8x144 standard,bdia,lora,lora_bdia

Run it from the repository root (the GGUF and the E2E data are read from ../shared).

Arguments: comma-separated BATCHxCONTEXT sizes, comma-separated methods (standard, bdia:
γ=0.5 reversible with recompute="shared" at FRAC_BITS (default 9), lora, lora_bdia: rank 8
on q,k,v,o,gate,up,down, adapters only). Rows are the first E2E devset pairs in the
checkpoint's tokenizer, the library's train step with AdamW. Prints per size: the fastest of
two timed steps after one warm-up, compile time, compiled temp/argument bytes, and the
step's reversal error, overflow flag, stream max |x| and whether the update was held.
"""
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bdia_jax, experiments
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bdia_jax import pretrained, training
from bdia_jax.models import LoRA, with_lora
from experiments.data.text.losses import token_losses

GGUF = "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
methods = {
    "standard": dict(update="standard", backprop="autodiff"),
    "bdia": dict(update="bdia", gamma=0.5, frac_bits=int(__import__("os").environ.get("FRAC_BITS", 9)), backprop="reversible", recompute="shared"),
}
sizes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")]
which = sys.argv[2].split(",")
def loss_fn(model, batch, key):
    logits, aux = model(batch["inputs"], key=key, train=True)
    s = token_losses(logits, batch["targets"], batch["mask"])
    return s["loss_sum"] / jnp.maximum(s["num_tokens"], 1), aux
for name in which:
    lora = name.startswith("lora")
    m = pretrained.load(GGUF, max_len=256, **methods["bdia" if "bdia" in name else "standard"])
    if lora:
        m = with_lora(m, LoRA(rank=8, alpha=16.0, targets=("q","k","v","o","gate","up","down")), rngs=nnx.Rngs(0))
    trainable = nnx.LoRAParam if lora else nnx.Param
    opt = optax.adamw(1e-4)
    graphdef, state = training.init(m, opt, jax.random.key(0), trainable=trainable)
    step = jax.jit(training.make_train_step(graphdef, loss_fn, opt, trainable=trainable), donate_argnums=0)
    for batch, ctx in sizes:
        from experiments.data.text import e2e
        from experiments.finetune_lm import lm_tokenizer
        tok = lm_tokenizer(GGUF)
        ex = e2e.encode_examples(tok, e2e.read_e2e("../shared/data/e2e", "validation"), ctx)
        b = {"inputs": jnp.asarray(ex.inputs[:batch]), "targets": jnp.asarray(ex.targets[:batch]),
             "mask": jnp.asarray(ex.mask[:batch])}
        t0 = time.perf_counter()
        compiled = step.lower(state, b).compile()
        tc = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state, out = compiled(state, b)
        jax.block_until_ready(out["loss"])
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            state, out = compiled(state, b)
            jax.block_until_ready(out["loss"])
            times.append(time.perf_counter() - t0)
        print(f"{name:10s} batch {batch:2d} ctx {ctx:3d}: step {min(times):6.2f}s (min of 2 after 1 warm-up; compile {tc:.0f}s) temp {mem.temp_size_in_bytes/2**20:.0f} MiB args {mem.argument_size_in_bytes/2**20:.0f} MiB rev_err {float(out['reversal_error'])} overflow {bool(out['overflow'])} max_abs {float(out['max_abs']):.0f} skipped {bool(out['skipped'])}", flush=True)
    del state, step

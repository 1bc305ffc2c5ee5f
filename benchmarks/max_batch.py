"""The largest global batch whose compiled GPT train step fits a memory budget.

    python -m benchmarks.max_batch                              # GPT-2 medium, 16 and 80 GiB
    python -m benchmarks.max_batch --small --budget_gib 0.001    # seconds (the test)
    python -m benchmarks.max_batch --loss_chunk 128   # the head and loss in 128-token chunks

For each gradient method (standard autodiff, standard per-block remat, BDIA reversible) and
each attention option (``--attention``; "cudnn" only where it runs) it searches the batch
by compiling the full train step (forward, backward, AdamW update) on abstract inputs and
reading XLA's peak estimate (``experiments.common.memory.compiled_memory``: arguments +
outputs + temporaries - aliased, the donated state included). Nothing is allocated and
nothing is trained: the model comes from ``nnx.eval_shape``, the tokens are a
``jax.ShapeDtypeStruct``.

Search: peak memory is close to affine in the batch, so the compiled peaks at batch 1 and 2
predict the largest batch; secant guesses, with bisection when they stall, narrow the
bracket (fits, does not fit) to one, so every answer is checked by compiling it and the
next batch. Each method's row reports the attention option with the largest batch.

The loss: by default the full float32 logits [batch, context, vocab] and their gradient;
``--loss_chunk N`` (a divisor of the context) computes the tied head and the loss N positions
at a time under ``jax.checkpoint`` (``bdia_jax.chunked_loss``), holding one chunk's logits.

The default model is GPT-2 medium sized: 24 blocks, width 1024, 16 heads, MLP 4096,
context 1024, vocabulary 50257, tied embeddings, no dropout. The step is
``bdia_jax.training``'s (the experiments' step: the update held on a bad step) with AdamW; the
methods are ``benchmarks.registry.METHODS`` (the experiments' settings). Writes
``max_batch.json`` and ``max_batch.md`` to ``--out_dir``, and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform

import jax
from flax import nnx

from bdia_jax.chunked_loss import chunk_problem
from bdia_jax.models import GPT, gpt_config
from bdia_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from benchmarks import registry
from benchmarks.registry import METHODS

GPT2_MEDIUM = dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, context=1024,
                   vocab=50257)
# Activations, not parameters, dominate its peak from batch 1 on, so the peak grows by a
# near-constant step per batch and the search brackets its answer in two or three compiles.
SMALL = dict(width=32, depth=2, num_heads=2, mlp_dim=64, context=64, vocab=128)
GIB = 2**30


def model_config(size: dict, method: str, attention: str, compute_dtype: str = "float32"):
    """The GPT config of ``size`` (GPT2_MEDIUM's keys) trained with ``METHODS[method]``."""
    return gpt_config(
        "nanogpt", vocab_size=size["vocab"], max_len=size["context"], width=size["width"],
        depth=size["depth"], num_heads=size["num_heads"], mlp_dim=size["mlp_dim"],
        dropout=0.0, attention_dropout=0.0, compute_dtype=compute_dtype, attention=attention,
        **METHODS[method][1])


def abstract_step(config, loss_chunk: int = 0):
    """(jitted train step, abstract state) of a GPT with ``config``: the library's step
    (``bdia_jax.training``), AdamW, the state donated."""
    loss = functools.partial(registry.gpt_loss, loss_chunk=loss_chunk)
    return registry.abstract_train_step(lambda: GPT(config, rngs=nnx.Rngs(0)), loss)


def peak_bytes(compiled_step, batch: int, context: int) -> tuple[int, float]:
    """(compiled peak estimate in bytes, compile seconds) at ``batch``."""
    memory, seconds = registry.compiled_token_step_memory(*compiled_step, batch, context)
    return memory["peak_estimate_bytes"], seconds


def largest_batch(peak, budget: int, max_batch: int) -> int:
    """The largest batch b in [0, max_batch] with peak(b) <= budget, for a peak(b) that
    grows with b (and is cached by the caller).

    Each guess is where the line through peak(1) and the last compiled batch meets the
    budget, or the neighbour of the last guess when that line points at it again; once a
    batch that does not fit is known, a guess that does not halve the bracket is followed
    by a bisection. Near-affine peaks take
    four compiles (1, 2, the answer, the answer + 1).
    """
    if peak(1) > budget:
        return 0
    lo, hi = 1, max_batch + 1  # peak(lo) fits; hi is past the answer (compiled or ceiling)
    last, bisect, hi_compiled = 2, False, False
    while hi - lo > 1:
        if bisect:
            guess = (lo + hi) // 2
        else:
            slope = max((peak(last) - peak(1)) / (last - 1), 1.0)
            guess = 1 + int((budget - peak(1)) // slope)
            if guess == last:
                guess = last + 1 if peak(last) <= budget else last - 1
        guess = min(max(guess, lo + 1), hi - 1)
        width = hi - lo
        if peak(guess) <= budget:
            lo = guess
        else:
            hi, hi_compiled = guess, True
        # Bisect only inside a compiled bracket: halving towards the ceiling would compile
        # absurd batches.
        last, bisect = guess, hi_compiled and (hi - lo) > width // 2 and not bisect
    return lo


def attention_options(attention) -> list[str]:
    """The attention options to search, without "cudnn" off a GPU."""
    options = list(attention)
    unknown = [a for a in options if a not in ATTENTION_IMPLEMENTATIONS]
    if unknown:
        raise ValueError(f"attention: unknown {unknown}; choose from "
                         f"{ATTENTION_IMPLEMENTATIONS}.")
    if "cudnn" in options and jax.default_backend() != "gpu":
        print("skipping attention=cudnn: it needs a CUDA GPU", flush=True)
        options.remove("cudnn")
    return options


def run(budgets_gib, size: dict, *, methods=tuple(METHODS),
        attention=ATTENTION_IMPLEMENTATIONS, loss_chunk: int = 0,
        compute_dtype: str = "float32", max_batch: int = 4096) -> dict:
    """The search: for each method of ``methods`` (keys of ``METHODS``) and each
    ``attention`` option, the largest batch whose compiled step fits each budget (GiB).
    ``size``: GPT2_MEDIUM's keys. Returns {"config", "searches", "table", "markdown", ...}."""
    budgets = [float(b) for b in budgets_gib]
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}.")
    config = {**size, "budgets_gib": budgets, "methods": methods,
              "attention": list(attention), "loss_chunk": loss_chunk,
              "compute_dtype": compute_dtype, "max_batch": max_batch}
    results = {"config": config, "backend": jax.default_backend(),
               "device": str(jax.devices()[0]), "platform": platform.platform(),
               "jax": jax.__version__, "searches": {}, "table": {}}
    options = attention_options(attention)
    for method in methods:
        for attention_option in options:
            compiled_step = abstract_step(
                model_config(size, method, attention_option, compute_dtype), loss_chunk)
            cache, seconds = {}, []

            def peak(batch, compiled_step=compiled_step, cache=cache, seconds=seconds,
                     label=f"{method}/{attention_option}"):
                if batch not in cache:
                    cache[batch], took = peak_bytes(compiled_step, batch, size["context"])
                    seconds.append(took)
                    print(f"  {label} batch {batch}: "
                          f"{cache[batch] / GIB:.3f} GiB ({took:.1f} s)", flush=True)
                return cache[batch]

            found = {str(b): largest_batch(peak, int(b * GIB), max_batch) for b in budgets}
            results["searches"][f"{method}/{attention_option}"] = {
                "max_batch": found, "peak_bytes": {str(k): v for k, v in sorted(cache.items())},
                "compile_seconds": seconds}
        for b in budgets:
            best = max(options,
                       key=lambda a: results["searches"][f"{method}/{a}"]["max_batch"][str(b)])
            results["table"].setdefault(method, {})[str(b)] = {
                "batch": results["searches"][f"{method}/{best}"]["max_batch"][str(b)],
                "attention": best}
    results["markdown"] = markdown(results, budgets, methods)
    return results


def markdown(results, budgets, methods) -> str:
    c = results["config"]
    head = (f"head and loss in chunks of {c['loss_chunk']} tokens"
            if c.get("loss_chunk") else "full logits")
    lines = [f"GPT: {c['depth']} blocks, width {c['width']}, {c['num_heads']} heads, MLP "
             f"{c['mlp_dim']}, context {c['context']}, vocab {c['vocab']}, "
             f"{c['compute_dtype']}, {head}; AdamW, the train step of bdia_jax.training; "
             f"XLA:{results['backend'].upper()} compiled peak.",
             "",
             "| method | " + " | ".join(f"max batch at {b:g} GiB" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    table = results["table"]
    for method in methods:
        cells = [f"{table[method][str(b)]['batch']} ({table[method][str(b)]['attention']})"
                 for b in budgets]
        lines.append(f"| {METHODS[method][0]} | " + " | ".join(cells) + " |")
    for other in ("remat", "autodiff"):
        if "bdia" in table and other in table:
            ratios = []
            for b in budgets:
                base = table[other][str(b)]["batch"]
                ratios.append(f"{table['bdia'][str(b)]['batch'] / base:.2f}x" if base else "inf")
            lines.append(f"| BDIA / {other} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget_gib", default="16,80", help="comma-separated budgets, GiB")
    parser.add_argument("--small", action="store_true",
                        help=f"a tiny model for tests ({SMALL}) instead of GPT-2 medium")
    for name, value in GPT2_MEDIUM.items():
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"default {value} (--small: {SMALL[name]})")
    parser.add_argument("--compute_dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--methods", default=",".join(METHODS), help=",".join(METHODS))
    parser.add_argument("--attention", default=",".join(ATTENTION_IMPLEMENTATIONS),
                        help="attention options to try (cudnn is skipped off GPU)")
    parser.add_argument("--loss_chunk", type=int, default=0,
                        help="head and loss over chunks of N tokens (a divisor of "
                             "--context); 0: the full logits")
    parser.add_argument("--max_batch", type=int, default=4096, help="search ceiling")
    parser.add_argument("--out_dir", default="runs/max_batch",
                        help="output folder (max_batch.json and max_batch.md)")
    args = parser.parse_args(argv)
    for name, value in size_of(args.small).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    problem = args.loss_chunk and chunk_problem(args.loss_chunk, args.context)
    if args.loss_chunk < 0 or problem:
        parser.error(f"--loss_chunk {problem or f'must be >= 0, got {args.loss_chunk}'} "
                     f"(--context; 0: full logits).")
    return args


def size_of(small: bool = False, **overrides) -> dict:
    """GPT2_MEDIUM (or SMALL) with the non-None ``overrides``."""
    return {**(SMALL if small else GPT2_MEDIUM),
            **{k: v for k, v in overrides.items() if v is not None}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        results = run(args.budget_gib.split(","), {k: getattr(args, k) for k in GPT2_MEDIUM},
                      methods=args.methods.split(","), attention=args.attention.split(","),
                      loss_chunk=args.loss_chunk, compute_dtype=args.compute_dtype,
                      max_batch=args.max_batch)
    except ValueError as error:
        raise SystemExit(f"benchmarks.max_batch: {error}") from None
    print("\n" + results["markdown"])
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "max_batch.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out_dir, "max_batch.md"), "w") as f:
        f.write(results["markdown"] + "\n")
    print(f"wrote {path} and max_batch.md")
    return results


if __name__ == "__main__":
    main()

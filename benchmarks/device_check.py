"""The accelerator check: exactness, Table 1's memory, step time and the largest batch, in
one command.

    python -m benchmarks.device_check                   # on a GPU/TPU: under 4 minutes
    python -m benchmarks.device_check --small           # CPU, reduced sizes (the test)

Writes ``device_check.json`` and ``device_check.md`` to ``--out_dir`` (rewritten after every
section, so a run cut short keeps what it found). Sections, in this order:

* ``environment``: backend, device kind, jax/jaxlib versions, XLA_FLAGS and the other
  XLA_/JAX_ variables, matmul precision.
* ``exactness``: one AdamW train step at a training size (batch 64) of ViT, GPT and the
  encoder-decoder with ``update=BDIA()``, ``backprop=Reversible(recompute="shared" |
  "separate")``, float32 and bfloat16 compute, and GPT with chunked attention and MLP under
  ``recompute="fused"`` (the MLP's forward and VJP in one loop). The reversal probe (the gradient of each
  stack's ``ReversalProbe``, read like tests/test_models_training_sizes.py) must be exactly
  0.0. On a GPU, a case that is not is run again in a subprocess with
  ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` and both results are kept. RevViT's
  floating-point reconstruction error is reported beside them (small, not zero: it is
  not a failure).
* ``memory``: Table 1's memory column like for like, each model in its own process (the
  three at once): the device's ``peak_bytes_in_use`` over two full train steps (parameters,
  AdamW state, batch 128, donated state) at the paper size, for ViT (standard autodiff),
  BDIA-ViT (reversible) and RevViT (reversible), beside the paper's figures. Where the
  backend has no ``memory_stats()`` (CPU) the compiled peak estimate is the figure, taken in
  this process.
* ``step_time``: BDIA reversible (``registry.METHODS``: the experiments' recompute), standard
  per-block remat and standard autodiff ViT train steps, interleaved round-robin in one process; median seconds per step and the ratio to
  remat.
* ``max_batch``: ``benchmarks.max_batch`` (GPT-2 medium size, compile-only search) with the
  budget = the device's ``memory_stats()["bytes_limit"]``; ``--small``: its small preset.

Every section and every case runs in its own try/except (the error goes into the JSON and
the run carries on). ``--time_budget_s`` is checked before each case: once it is spent the
remaining cases are recorded as skipped. A case already compiling is not interrupted.
The exit status is 1 if a section failed or a BDIA probe was non-zero in every run of it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import max_batch, registry
from benchmarks.registry import METHODS, MODEL_KINDS
from experiments.common.memory import compiled_memory, device_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("exactness", "memory", "step_time", "max_batch")
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
MIB = 2**20
# Table 1 of the paper (CIFAR-10, batch 128), "MB" as printed there.
PAPER_MEMORY_MB = {"vit": 1570.6, "bdia_vit": 693.4, "revvit": 572.7}
MEMORY_MODELS = {  # Table 1's rows: (label, model kind, flat method keywords)
    "vit": ("ViT (standard, autodiff)", "vit", METHODS["autodiff"][1]),
    "bdia_vit": ("BDIA-ViT (reversible)", "vit", METHODS["bdia"][1]),
    "revvit": ("RevViT (reversible)", "revvit", dict(backprop="reversible", recompute="shared")),
}

# Sizes. "full": the experiments' training sizes (ViT: the paper's CIFAR-10 model; GPT:
# nanoGPT shakespeare_char; encoder-decoder: Transformer-base), batch 64 for the probe,
# batch 128 for Table 1. "small": the tiny variants, seconds on a CPU.
PRESETS = {
    "full": dict(
        probe_batch=64,
        models={"vit": ("paper", {}), "gpt": ("nanogpt", {}),
                "seq2seq": ("base", dict(max_len=64)), "revvit": ("paper", {})},
        seq2seq_lengths=(48, 40),  # (source, target) tokens
        memory_batch=128, memory_steps=2,
        timing=dict(batch=128, rounds=5, steps=5),
        exactness_cases=None,  # all
        # The README's headline: GPT-2 medium, the head and loss in 32-position chunks.
        max_batch=dict(size=max_batch.size_of(), loss_chunk=32),
        max_batch_methods=("bdia", "remat", "autodiff"),  # headline first
    ),
    "small": dict(
        probe_batch=8,
        models={"vit": ("tiny", dict(dropout=0.1, attention_dropout=0.1)),
                "gpt": ("tiny", dict(dropout=0.1, attention_dropout=0.1)),
                "seq2seq": ("tiny", {}), "revvit": ("tiny", {})},
        seq2seq_lengths=(12, 10),
        memory_batch=8, memory_steps=2,
        timing=dict(batch=8, rounds=3, steps=2),
        # One case per model, both recompute modes and both dtypes among them: an XLA:CPU
        # compile takes seconds even for the tiny models.
        exactness_cases=("vit/shared/float32", "gpt/shared/bfloat16",
                         "seq2seq/separate/float32", "revvit/reversible/float32"),
        # A budget that holds batch 2, not 3: the search compiles batches 1, 2 and 3 only
        # (a compile per batch). tests/test_max_batch.py compiles the same programs.
        max_batch=dict(size=max_batch.size_of(small=True), loss_chunk=0, budgets_gib=(0.001,)),
        max_batch_methods=("bdia",),
    ),
}


# ------------------------------------------------------------------------------ models


def build(spec: dict, preset: dict, batch: int):
    """``(model, loss_fn, batch inputs)`` of a case ``spec`` = {"model": kind, "method":
    flat method keywords, "dtype": compute dtype, optional "model_overrides": config
    fields}."""
    cls, factory, loss_fn = MODEL_KINDS[spec["model"]]
    name, overrides = preset["models"][spec["model"]]
    config = factory(name, **overrides, **spec.get("model_overrides", {}), **spec["method"],
                     compute_dtype=spec["dtype"])
    model = cls(config, rngs=nnx.Rngs(0))
    inputs = registry.make_batch(spec["model"], config, batch, preset["seq2seq_lengths"])
    return model, loss_fn, inputs


def lowered_step(spec: dict, preset: dict, batch: int, donate: bool = False):
    """``(lowered train step, its arguments (state, batch), model)``: the library's train
    step (``bdia_jax.training``) with AdamW; its metrics hold the reversal error."""
    model, loss_fn, inputs = build(spec, preset, batch)
    step, state = registry.train_step(model, loss_fn, donate=donate)
    args = (state, inputs)
    return step.lower(*args), args, model


def tree_bytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- helpers


class TimeBudget:
    """Wall-clock budget of the run, checked before each case."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


SKIPPED = {"skipped": "the time budget (--time_budget_s) was spent"}


def error_record(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8)}


def timed_compile(low) -> tuple:
    start = time.perf_counter()
    compiled = low.compile()
    return compiled, time.perf_counter() - start


def compile_all(lowered: dict, threads: int) -> dict:
    """{name: future of (lowered.compile(), seconds)}: XLA compiles release the GIL, so
    several at once use the host's cores (threads = 1: one after another, here)."""
    if threads <= 1:
        futures = {}
        for name, low in lowered.items():
            future = concurrent.futures.Future()
            try:
                future.set_result(timed_compile(low))
            except Exception as exc:  # noqa: BLE001 - recorded per case
                future.set_exception(exc)
            futures[name] = future
        return futures
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
    futures = {name: pool.submit(timed_compile, low) for name, low in lowered.items()}
    pool.shutdown(wait=False)
    return futures


def run_worker(kind: str, spec: dict, preset_name: str, timeout: float,
               extra_xla_flags: str = "") -> dict:
    """Run ``worker(kind, spec)`` in a fresh process (its own device memory and XLA
    flags); its JSON result, with the XLA_FLAGS it ran under."""
    env = dict(os.environ)
    if extra_xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra_xla_flags}".strip()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "benchmarks.device_check", "--worker", kind,
                   "--worker_spec", json.dumps(spec), "--worker_out", out]
        if preset_name == "small":
            command.append("--small")
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True,
                                  text=True, timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            return {"skipped": f"the worker ran past the {timeout:.0f} s left of the time "
                    "budget", "xla_flags": env.get("XLA_FLAGS", "")}
        if proc.returncode or not os.path.exists(out):
            return {"error": f"worker exited with {proc.returncode}",
                    "stderr_tail": proc.stderr[-3000:], "xla_flags": env.get("XLA_FLAGS", "")}
        with open(out) as f:
            result = json.load(f)
    result["xla_flags"] = env.get("XLA_FLAGS", "")
    return result


# ---------------------------------------------------------------------------- sections


def environment() -> dict:
    device = jax.devices()[0]
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device": str(device),
        "device_count": jax.device_count(),
        "platform_version": getattr(device.client, "platform_version", None),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("XLA_", "JAX_")) and k != "XLA_FLAGS"},
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "device_memory": device_memory(),
    }


def exactness_specs(names=None) -> dict:
    """{case name: spec}: the BDIA cases, then RevViT's reconstruction error (``names``:
    only those)."""
    specs = {}
    for dtype in ("float32", "bfloat16"):
        for recompute in ("shared", "separate"):
            for model in ("vit", "gpt", "seq2seq"):
                specs[f"{model}/{recompute}/{dtype}"] = {
                    "model": model, "dtype": dtype,
                    "method": {**METHODS["bdia"][1], "recompute": recompute}}
        # The chunked MLP runs its forward and VJP in one loop only under "fused".
        specs[f"gpt/fused-chunked/{dtype}"] = {
            "model": "gpt", "dtype": dtype, "method": {**METHODS["bdia"][1], "recompute": "fused"},
            "model_overrides": dict(attention="chunked", chunk_size=64)}
        specs[f"revvit/reversible/{dtype}"] = {"model": "revvit", "dtype": dtype,
                                               "method": dict(backprop="reversible",
                                                              recompute="shared")}
    return specs if names is None else {name: specs[name] for name in names}


def probe_record(spec: dict, probe: float, loss: float) -> dict:
    record = {"model": spec["model"], "dtype": spec["dtype"], "method": spec["method"],
              "loss": loss, "loss_finite": bool(jnp.isfinite(loss))}
    if spec["model"] == "revvit":
        record["reconstruction_error"] = probe  # floating point: expected small, non-zero
    else:
        record["probe"] = probe
        record["exact"] = probe == 0.0
    return record


def exactness_worker(spec: dict, preset: dict) -> dict:
    low, args, _ = lowered_step(spec, preset, preset["probe_batch"], donate=True)
    _, metrics = timed_compile(low)[0](*args)
    return probe_record(spec, float(metrics["reversal_error"]), float(metrics["loss"]))


def exactness(args, preset: dict, budget: TimeBudget) -> dict:
    specs = exactness_specs(preset["exactness_cases"])
    cases, lowered, inputs, lower_s = {}, {}, {}, {}
    for name, spec in specs.items():
        if budget.spent():
            cases[name] = dict(SKIPPED)
            continue
        try:
            start = time.perf_counter()
            # Donated like the memory section's steps (the state is not used again): where
            # the batches agree (--small) a case is the same program as a memory row, compiled
            # once with a persistent compilation cache.
            lowered[name], inputs[name], _ = lowered_step(spec, preset, preset["probe_batch"],
                                                          donate=True)
            lower_s[name] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            cases[name] = error_record(exc)
    futures = compile_all(lowered, args.compile_threads)
    for name, future in futures.items():
        try:
            compiled, compile_s = future.result(timeout=max(budget.left(), 1.0))
            start = time.perf_counter()
            _, metrics = compiled(*inputs[name])
            cases[name] = probe_record(specs[name], float(metrics["reversal_error"]),
                                       float(metrics["loss"]))
            cases[name].update(build_and_lower_s=lower_s[name], compile_s=compile_s,
                               run_s=time.perf_counter() - start)
        except concurrent.futures.TimeoutError:
            cases[name] = dict(SKIPPED)
        except Exception as exc:  # noqa: BLE001
            cases[name] = error_record(exc)
    cases = {name: cases[name] for name in specs}  # the specs' order
    rerun = args.deterministic_rerun == "always" or (
        args.deterministic_rerun == "auto" and jax.default_backend() == "gpu")
    for name, record in cases.items():
        if record.get("exact") is False and rerun:
            if budget.spent():
                record["deterministic_ops"] = dict(SKIPPED)
                continue
            record["deterministic_ops"] = run_worker(
                "exactness", specs[name], args.preset, budget.left(), DETERMINISTIC_FLAG)
    bdia = [r for r in cases.values() if "exact" in r]
    return {"batch": preset["probe_batch"], "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "cases": cases,
            "all_exact": bool(bdia) and all(r["exact"] for r in bdia)
            and len(bdia) == sum(s["model"] != "revvit" for s in specs.values())}


def memory_worker(spec: dict, preset: dict) -> dict:
    low, args, model = lowered_step(spec, preset, preset["memory_batch"], donate=True)
    compiled = low.compile()
    state, inputs = args
    record = {"param_count": sum(int(x.size) for x in jax.tree_util.tree_leaves(state.params)),
              "param_bytes": tree_bytes(state.params),
              "opt_state_bytes": tree_bytes(state.opt_state),
              "batch_bytes": tree_bytes(inputs), "compiled": compiled_memory(compiled),
              "config": repr(model.config)}
    for _ in range(preset["memory_steps"]):
        state, metrics = compiled(state, inputs)
    jax.block_until_ready((state, metrics))
    record.update(loss=float(metrics["loss"]), reversal_error=float(metrics["reversal_error"]),
                  device_memory=device_memory())
    return record


def memory(args, preset: dict, budget: TimeBudget) -> dict:
    # A process's peak_bytes_in_use cannot be reset: one process per model, all at once
    # (each reports its own allocator's peak). Without memory_stats() (CPU) the figure is
    # the compiled estimate, the same in any process: this one.
    in_process = device_memory() is None
    specs = {name: {"model": kind, "method": method, "dtype": "float32"}
             for name, (_, kind, method) in MEMORY_MODELS.items()}
    if in_process:
        records = {}
        for name, spec in specs.items():
            try:
                records[name] = dict(SKIPPED) if budget.spent() else memory_worker(spec, preset)
            except Exception as exc:  # noqa: BLE001
                records[name] = error_record(exc)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(specs)) as pool:
            futures = {name: pool.submit(run_worker, "memory", spec, args.preset,
                                         budget.left()) for name, spec in specs.items()}
            records = {name: future.result() for name, future in futures.items()}
    rows = {}
    for name, record in records.items():
        record["label"] = MEMORY_MODELS[name][0]
        if status(record):
            rows[name] = record
            continue
        device = (record.get("device_memory") or {}).get("peak_bytes_in_use")
        compiled = (record.get("compiled") or {}).get("peak_estimate_bytes")
        record["peak_bytes"] = device if device is not None else compiled
        record["peak_source"] = ("device memory_stats peak_bytes_in_use" if device is not None
                                 else "compiled memory_analysis peak estimate")
        record["paper_mb"] = PAPER_MEMORY_MB[name]
        rows[name] = record
    vit_peak = rows.get("vit", {}).get("peak_bytes")
    for name, row in rows.items():
        if vit_peak and row.get("peak_bytes"):
            row["vit_over_this"] = vit_peak / row["peak_bytes"]
            row["paper_vit_over_this"] = PAPER_MEMORY_MB["vit"] / PAPER_MEMORY_MB[name]
    return {"batch": preset["memory_batch"], "steps": preset["memory_steps"],
            "processes": "this one" if in_process else "one per model", "rows": rows}


def step_time(args, preset: dict, budget: TimeBudget) -> dict:
    timing = preset["timing"]
    lowered, state, out = {}, {}, {"batch": timing["batch"], "methods": {}}
    for method, (label, keywords) in METHODS.items():
        spec = {"model": "vit", "dtype": args.timing_dtype, "method": dict(keywords)}
        try:
            lowered[method], state[method], _ = lowered_step(spec, preset, timing["batch"],
                                                             donate=True)
            out["methods"][method] = {"label": label}
        except Exception as exc:  # noqa: BLE001
            out["methods"][method] = error_record(exc)
    compiled = {}
    for method, future in compile_all(lowered, args.compile_threads).items():
        try:
            compiled[method], out["methods"][method]["compile_s"] = future.result(
                timeout=max(budget.left(), 1.0))
            train_state, inputs = state[method]
            train_state, metrics = compiled[method](train_state, inputs)  # warm-up
            jax.block_until_ready(metrics)
            state[method] = (train_state, inputs)
        except Exception as exc:  # noqa: BLE001
            out["methods"][method] = error_record(exc)
            compiled.pop(method, None)
    seconds = {method: [] for method in compiled}
    order = list(compiled)
    for r in range(timing["rounds"]):
        if budget.spent():
            break
        for method in order[r % len(order):] + order[:r % len(order)]:  # rotate each round
            train_state, inputs = state[method]
            start = time.perf_counter()
            for _ in range(timing["steps"]):
                train_state, metrics = compiled[method](train_state, inputs)
            jax.block_until_ready((train_state, metrics))
            seconds[method].append((time.perf_counter() - start) / timing["steps"])
            state[method] = (train_state, inputs)
    for method, values in seconds.items():
        if values:
            out["methods"][method].update(median_s=statistics.median(values),
                                          rounds_s=values)
    remat = out["methods"].get("remat", {}).get("median_s")
    for record in out["methods"].values():
        if remat and "median_s" in record:
            record["over_remat"] = record["median_s"] / remat
    out.update(rounds=timing["rounds"], steps_per_round=timing["steps"],
               dtype=args.timing_dtype)
    return out


def largest_batch(args, preset: dict, budget: TimeBudget) -> dict:
    settings = dict(preset["max_batch"])
    device = device_memory()
    if args.small:
        source = "the small preset's budget"
    elif device and device.get("bytes_limit"):
        settings["budgets_gib"] = (round(device["bytes_limit"] / 2**30, 2),)
        source = "memory_stats() bytes_limit"
    else:
        raise RuntimeError("this device reports no memory_stats()['bytes_limit']; run "
                           "benchmarks.max_batch with --budget_gib instead.")
    merged = {"budget_source": source, "searches": {}, "table": {}, "skipped_methods": []}
    methods, last_search_s = [], 0.0
    for method in preset["max_batch_methods"]:
        # A search cannot be interrupted: start one only if the last one's time is left.
        if budget.left() <= last_search_s:
            merged["skipped_methods"].append(method)
            continue
        start = time.monotonic()
        try:
            found = max_batch.run(settings["budgets_gib"], settings["size"], methods=(method,),
                                  attention=args.max_batch_attention.split(","),
                                  loss_chunk=settings["loss_chunk"])
        except Exception as exc:  # noqa: BLE001
            merged.setdefault("errors", {})[method] = error_record(exc)
            continue
        finally:
            last_search_s = time.monotonic() - start
        methods.append(method)
        merged["searches"].update(found["searches"])
        merged["table"].update(found["table"])
        merged.update(config=found["config"], backend=found["backend"])
    if methods:
        merged["markdown"] = max_batch.markdown(merged, merged["config"]["budgets_gib"],
                                                methods)
    return merged


# ---------------------------------------------------------------------------- report


def fmt(value, spec=".1f", missing="–"):
    return missing if value is None else format(value, spec)


def status(record: dict) -> str | None:
    if not record:
        return "not run"
    if "skipped" in record:
        return "skipped (time budget)"
    if "error" in record:
        return "error: " + record["error"].splitlines()[0][:120]
    return None


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [f"# Device check ({results['preset']})", "",
             f"{env.get('device_kind')} ({env.get('backend')}), jax {env.get('jax')}, jaxlib "
             f"{env.get('jaxlib')}, XLA_FLAGS=`{env.get('XLA_FLAGS') or '(none)'}`; "
             f"`{results['command']}`; {results.get('seconds', 0):.0f} s.", ""]
    section = results.get("exactness", {})
    lines += ["## Exactness: reversal probe of one train step", ""]
    if status(section):
        lines += [status(section), ""]
    else:
        lines += [f"Batch {section['batch']}. BDIA rows must read exactly 0.0; RevViT's row is "
                  "its floating-point reconstruction error (expected small, non-zero).", "",
                  "| model | method | compute | probe | exact | with "
                  f"`{DETERMINISTIC_FLAG}` |", "|---|---|---|---:|---|---|"]
        for name, r in section["cases"].items():
            model, method, dtype = name.split("/")
            if status(r):
                lines.append(f"| {model} | {method} | {dtype} | {status(r)} | | |")
                continue
            value = r.get("probe", r.get("reconstruction_error"))
            exact = {True: "yes", False: "**NO**"}.get(r.get("exact"), "(not exact by design)")
            det = r.get("deterministic_ops")
            rerun = "" if det is None else (status(det) or
                                            f"{det.get('probe', 0.0):.3g} "
                                            f"({'exact' if det.get('exact') else 'NOT exact'})")
            lines.append(f"| {model} | {method} | {dtype} | {value:.3g} | {exact} | {rerun} |")
        lines.append("")
    section = results.get("memory", {})
    lines += ["## Table 1's memory column: one train step, parameters and AdamW included", ""]
    if status(section):
        lines += [status(section), ""]
    else:
        lines += [f"Batch {section['batch']}, float32, processes: {section['processes']}. Paper: "
                  "Table 1 of arXiv 2407.09093 (its \"MB\").", "",
                  "| model | peak (MiB) | ViT / this | paper (MB) | paper ViT / this | "
                  "figure |", "|---|---:|---:|---:|---:|---|"]
        for r in section["rows"].values():
            if status(r):
                lines.append(f"| {r.get('label', '')} | {status(r)} | | | | |")
                continue
            peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / MIB
            lines.append(f"| {r['label']} | {fmt(peak)} | {fmt(r.get('vit_over_this'), '.2f')}"
                         f" | {r['paper_mb']} | {fmt(r.get('paper_vit_over_this'), '.2f')} | "
                         f"{r['peak_source']} |")
        lines.append("")
    section = results.get("step_time", {})
    lines += ["## Step time (interleaved, median)", ""]
    if status(section):
        lines += [status(section), ""]
    else:
        lines += [f"ViT, batch {section['batch']}, {section['dtype']}; {section['rounds']} "
                  f"rounds of {section['steps_per_round']} steps.", "",
                  "| train step | ms / step | / remat |", "|---|---:|---:|"]
        for r in section["methods"].values():
            if status(r):
                lines.append(f"| {r.get('label', '')} | {status(r)} | |")
                continue
            ms = None if "median_s" not in r else 1e3 * r["median_s"]
            lines.append(f"| {r['label']} | {fmt(ms, '.2f')} | {fmt(r.get('over_remat'), '.2f')}"
                         " |")
        lines.append("")
    section = results.get("max_batch", {})
    lines += ["## Largest batch (compile-only, benchmarks.max_batch)", ""]
    if status(section):
        lines += [status(section), ""]
    else:
        lines += [f"Budget: {section.get('budget_source')}.", "",
                  section.get("markdown", "(no method finished)"), ""]
        if section.get("skipped_methods"):
            lines += [f"Skipped (time budget): {', '.join(section['skipped_methods'])}.", ""]
        for method, err in section.get("errors", {}).items():
            lines += [f"{method}: {status(err)}", ""]
    return "\n".join(lines)


def write(results: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("device_check.json", json.dumps(results, indent=2, default=str)),
                       ("device_check.md", markdown(results) + "\n")):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def passed(results: dict) -> bool:
    """No section failed, and every BDIA probe read 0.0 in some run of it."""
    if any("error" in results.get(name, {}) for name in SECTIONS):
        return False
    for record in results.get("exactness", {}).get("cases", {}).values():
        if record.get("exact") is False and not record.get("deterministic_ops", {}).get("exact"):
            return False
    return True


# ------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="the tiny models on the CPU, in seconds (tests)")
    parser.add_argument("--out_dir", default="runs/device_check")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from {','.join(SECTIONS)}")
    parser.add_argument("--time_budget_s", type=float, default=None,
                        help="skip the remaining cases once spent (default 210; --small 300)")
    parser.add_argument("--compile_threads", type=int,
                        default=max(1, min(8, (os.cpu_count() or 1) // 2)),
                        help="XLA compiles at once (1: one after another)")
    parser.add_argument("--deterministic_rerun", choices=("auto", "always", "never"),
                        default="auto", help=f"rerun a non-zero probe with {DETERMINISTIC_FLAG}"
                        " (auto: on GPU)")
    parser.add_argument("--timing_dtype", default="float32", help="step time compute dtype")
    parser.add_argument("--max_batch_attention", default="chunked",
                        help="attention options for the largest-batch search")
    parser.add_argument("--worker", choices=("exactness", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--worker_spec", help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.preset = "small" if args.small else "full"
    if args.time_budget_s is None:
        args.time_budget_s = 300.0 if args.small else 210.0
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}.")
    return args


def main(argv=None) -> dict:
    # Before the first device use: each process takes only what it uses, so the per-model
    # worker processes get the device's memory and bytes_limit is what a process can have.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    if args.worker:
        worker = {"exactness": exactness_worker, "memory": memory_worker}[args.worker]
        result = worker(json.loads(args.worker_spec), preset)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return result

    start = time.monotonic()
    budget = TimeBudget(args.time_budget_s)
    results = {"preset": args.preset, "time_budget_s": args.time_budget_s,
               "command": "python -m benchmarks.device_check " + " ".join(argv or sys.argv[1:])}
    try:
        results["environment"] = environment()
    except Exception as exc:  # noqa: BLE001
        results["environment"] = error_record(exc)
    sections = {"exactness": exactness, "memory": memory, "step_time": step_time,
                "max_batch": largest_batch}
    wanted = args.sections.split(",")
    for name in SECTIONS:
        if name not in wanted:
            continue
        if budget.spent():
            results[name] = dict(SKIPPED)
        else:
            section_start = time.monotonic()
            print(f"[device_check] {name} ({budget.left():.0f} s left)", flush=True)
            try:
                results[name] = sections[name](args, preset, budget)
            except Exception as exc:  # noqa: BLE001 - recorded, the next section runs
                results[name] = error_record(exc)
            results[name]["seconds"] = time.monotonic() - section_start
        results["seconds"] = time.monotonic() - start
        write(results, args.out_dir)
    results["passed"] = passed(results)
    results["seconds"] = time.monotonic() - start
    write(results, args.out_dir)
    print(markdown(results))
    print(f"[device_check] wrote {args.out_dir}/device_check.json and .md; "
          f"passed={results['passed']}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main().get("passed", True) else 1)

"""The longest context (batch 1) and the largest batch at context 4096 whose compiled
Llama-family train step fits a memory budget.

    python -m benchmarks.max_context --shapes llama-3.1-8b --modes lora16 --budget_gib 80 \\
        --out_dir runs/max_context
    python -m benchmarks.max_context --shapes llama-3.2-1b --modes full --budget_gib 24 \\
        --searches batch --out_dir runs/max_context
    python -m benchmarks.max_context --shapes test-tiny --budget_gib 0.01 --out_dir /tmp/mc
    python -m benchmarks.max_context --shapes llama-3.2-1b --modes full --methods bdia \\
        --live_at_peak 2,12 --out_dir runs/max_context   # what is live at the peak

Compile-only, like ``benchmarks.max_batch``: the step is ``bdia_jax.training``'s (AdamW,
the state donated), compiled on abstract inputs; a size's memory is XLA's compiled peak
estimate (``experiments.common.memory.compiled_memory``). Nothing is allocated.

Shapes (``SHAPES``): SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B from their config.json
(docs/max_context.md cites them), bfloat16 parameters, float32 residual stream, matmuls in
``--compute_dtype``; "test-tiny" for the tests. Every method runs attention="chunked" with
the same ``--attention_chunk`` and the head and loss over ``--loss_chunk`` tokens
(``bdia_jax.chunked_loss``).

Modes: "full" (AdamW on every parameter) and "lora16" (the library's LoRA,
``BlockConfig.lora``: rank-16 float32 adapters on the q, k, v, o, gate, up and down
projections of every block; the base is frozen with the step's ``trainable=nnx.LoRAParam``:
no gradient, no optimizer state).

Methods (the records' ``method``): "autodiff", "remat" (per-block ``jax.checkpoint``
saving each block's float32 input), "bdia" (reversible, the experiments' recompute="fused"), compiled;
and two *analytic* rows derived from remat's compiled peak at the same size, because the
engine has none of these options: "remat_bf16" (remat minus half of the saved float32 block
inputs: depth·tokens·width·2 bytes) and "remat_offload" (remat with each block's input
offloaded to host memory, which XLA:CPU does not have: remat minus all saved block inputs
but two, the one in flight and the one being recomputed).

``--unchunked_mlp METHODS`` (as in ``benchmarks.step_anatomy``): those methods' MLP runs
over the whole sequence (``chunk_mlp=False``: faster, one block's [len, mlp_dim]
activations more); the analytic rows follow remat's peaks at their own setting. Records
carry ``unchunked_mlp``, and a measurement's key tags its method (``bdia+unchunked_mlp``),
so the two settings' peaks never stand in for each other, in one out_dir or across runs.

Search: a size's peak is cached in ``max_context.json`` (``measurements``), so a rerun
resumes. Peak memory is affine in the batch and, with chunked attention (causal rows built
per query block), nearly affine in the context, so the peaks at three seed sizes are fitted
by a polynomial of degree <= 2 that predicts the largest size; the
prediction is compiled and its neighbour one step above, refitting with the nearest points
(bisecting when the fit stalls) until a size fits and size + step does not.

Breakdown (``breakdown``): each method's per-token bytes at context 4096 (the batch slope of
the compiled peak / 4096) against its analytic floor (side bits, stream buffers, one
block's least working set), one block's forward + VJP and the head + loss compiled alone,
and each method's batch-independent bytes (at context 4096) against parameters, gradients
and optimizer state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bdia_jax import training
from bdia_jax.chunked_loss import chunk_problem, chunked_cross_entropy
from bdia_jax.models import LoRA
from bdia_jax.models.decoder import DecoderConfig, DecoderLM
from bdia_jax.models.lora import LORA_TARGETS
from bdia_jax.models.residual_stack import named_config
from benchmarks import registry
from experiments.common.memory import compiled_memory

GIB = 2**30

_LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias="none",
              layer_norm_eps=1e-5, dropout=0.0, attention_dropout=0.0)

# name -> (DecoderConfig fields from the model's config.json, max_position_embeddings).
SHAPES: dict[str, tuple[dict, int]] = {
    "smollm2-135m": (dict(vocab_size=49152, width=576, depth=30, num_heads=9, num_kv_heads=3,
                          mlp_dim=1536, head_dim=64, tie_embeddings=True,
                          rope_theta=100000.0, **_LLAMA), 8192),
    "llama-3.2-1b": (dict(vocab_size=128256, width=2048, depth=16, num_heads=32,
                          num_kv_heads=8, mlp_dim=8192, head_dim=64, tie_embeddings=True,
                          rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0,
                          rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                          rope_original_max_len=8192, **_LLAMA), 131072),
    "llama-3.1-8b": (dict(vocab_size=128256, width=4096, depth=32, num_heads=32,
                          num_kv_heads=8, mlp_dim=14336, head_dim=128, tie_embeddings=False,
                          rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0,
                          rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                          rope_original_max_len=8192, **_LLAMA), 131072),
    # The tests' shape: a Llama block (GQA, untied head) in seconds.
    "test-tiny": (dict(vocab_size=64, width=32, depth=6, num_heads=4, num_kv_heads=2,
                       mlp_dim=64, tie_embeddings=False, **_LLAMA), 1 << 20),
}
MODES = ("full", "lora16")
LORA_RANK = 16
COMPILED = {"autodiff": "autodiff", "remat": "remat", "bdia": "bdia"}  # -> registry.METHODS
# Derived from remat's compiled peak at the same size (see ANALYTIC_HOW).
ANALYTIC = {"remat_bf16": "remat", "remat_offload": "remat"}
METHODS = ("autodiff", "remat", "remat_bf16", "remat_offload", "bdia")
SEARCHES = ("context", "batch")
BATCH_CONTEXT = 4096  # the context of the largest-batch search


# ------------------------------------------------------------------------------- LoRA

# Mode "lora16": the library's adapters (``BlockConfig.lora``) on every projection.
LORA16 = LoRA(rank=LORA_RANK, alpha=32.0, targets=LORA_TARGETS)


def lora_param_count(fields: dict, rank: int = LORA_RANK) -> int:
    """Adapter parameters of ``LORA16`` on a shape: rank·(in + out) per projection."""
    w, h = fields["width"], fields["num_heads"]
    kv = fields.get("num_kv_heads") or h
    d = fields.get("head_dim") or w // h
    m = fields["mlp_dim"]
    per_block = [(w, h * d), (w, kv * d), (w, kv * d), (h * d, w), (w, m), (w, m), (m, w)]
    return fields["depth"] * sum(rank * (a + b) for a, b in per_block)


# ------------------------------------------------------------------------- the model + step


def model_config(shape: str, method: str, context: int, compute_dtype: str,
                 attention_chunk: int, mode: str = "full",
                 unchunked_mlp: bool = False, recompute: str | None = None) -> DecoderConfig:
    """The DecoderConfig of ``shape`` at ``context`` trained with compiled ``method``, with
    the ``LORA16`` adapters in mode "lora16"; the MLP over the attention's position blocks,
    or over the whole sequence (``chunk_mlp=False``) when ``unchunked_mlp``. ``recompute``:
    BDIA's, in place of the experiments' (``benchmarks.step_anatomy --bdia_recompute``)."""
    fields, _ = SHAPES[shape]
    method_fields = registry.METHODS[COMPILED[method]][1]
    if recompute is not None and method == "bdia":
        method_fields = {**method_fields, "recompute": recompute}
    return named_config(DecoderConfig, {shape: fields}, shape, dict(
        max_len=context, param_dtype="bfloat16", compute_dtype=compute_dtype,
        attention="chunked", chunk_size=attention_chunk,
        chunk_mlp=False if unchunked_mlp else None,
        lora=LORA16 if mode == "lora16" else None, **method_fields))


def make_model(config: DecoderConfig) -> DecoderLM:
    """The DecoderLM of ``config``."""
    return DecoderLM(config, rngs=nnx.Rngs(0))


def trainable_of(mode: str):
    """The train step's ``trainable=`` filter of ``mode``: the adapters, or every Param."""
    return nnx.LoRAParam if mode == "lora16" else nnx.Param


def loss_fn(loss_chunk: int):
    """Next-token cross-entropy of tokens [batch, context+1] int32, the head and loss over
    chunks of ``loss_chunk`` tokens (``bdia_jax.chunked_loss``), for any head (tied or
    not: ``head_embedding``)."""
    def loss(model, tokens, key):
        hidden, aux = model.hidden_states(tokens[:, :-1], key=key, train=True)
        chunk = min(loss_chunk, hidden.shape[1])
        value = chunked_cross_entropy(hidden, model.head_embedding, tokens[:, 1:], chunk=chunk)
        return value, {k: aux[k] for k in ("overflow", "nonfinite") if k in aux}
    return loss


def abstract_step(config: DecoderConfig, mode: str, loss_chunk: int):
    """(jitted step, abstract step-0 state): nothing allocated."""
    opt = registry.optimizer()
    trainable = trainable_of(mode)
    build = lambda: make_model(config)  # noqa: E731
    graphdef = training.split(nnx.eval_shape(build), trainable)[0]
    state = jax.eval_shape(lambda: training.init(build(), opt, jax.random.PRNGKey(2),
                                                 trainable=trainable)[1])
    step = training.make_train_step(graphdef, loss_fn(loss_chunk), opt, trainable=trainable)
    return jax.jit(step, donate_argnums=0), state


def tree_bytes(tree) -> int:
    """Bytes of the (abstract) arrays of ``tree``."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


def measure(shape, mode, method, batch, context, opts, unchunked_mlp=False) -> dict:
    """compiled_memory of the train step at (batch, context), with compile seconds and the
    state's sizes; the MLP unchunked when ``unchunked_mlp`` (``model_config``)."""
    config = model_config(shape, method, context, opts["compute_dtype"],
                          opts["attention_chunk"], mode, unchunked_mlp)
    step, state = abstract_step(config, mode, opts["loss_chunk"])
    memory, seconds = registry.compiled_token_step_memory(step, state, batch, context)
    memory.update(compile_seconds=round(seconds, 2), param_bytes=tree_bytes(state.params),
                  frozen_bytes=tree_bytes(state.rest), opt_state_bytes=tree_bytes(state.opt_state))
    return memory


# ------------------------------------------------------------------------------- search


def largest_fitting(peak, budget: float, ceiling: int, seeds=(1, 4, 16),
                    prior=None) -> int:
    """The largest n in [0, ceiling] with peak(n) <= budget, peak increasing in n (the
    caller caches it). The seeds' peaks are fitted by a polynomial of degree <= 2 (the three
    measured points nearest the budget), its crossing is compiled and so is the next n;
    a guess that does not halve the bracket is followed by a bisection. ``prior``: {n:
    peak} already measured (another budget's search), used by the fit and the bracket."""
    if peak(1) > budget:
        return 0
    known = {n: p for n, p in (prior or {}).items() if 1 <= n <= ceiling}

    def at(n):
        known[n] = peak(n)
        return known[n]

    for n in seeds:
        if n <= ceiling and at(n) > budget:
            break
    lo = max(n for n, p in known.items() if p <= budget)
    over = [n for n, p in known.items() if p > budget]
    hi = min(over) if over else ceiling + 1
    bisect = False
    while hi - lo > 1:
        width = hi - lo
        guess = (lo + hi) // 2 if bisect else predict(known, budget)
        if not over:  # no size known above the budget: extrapolate at most 4x
            guess = min(guess, 4 * lo)
        guess = min(max(guess, lo + 1), hi - 1)
        if at(guess) <= budget:
            lo = guess
            if guess + 1 < hi and at(guess + 1) > budget:
                hi = guess + 1
        else:
            hi = guess
        over = [n for n, p in known.items() if p > budget]
        bisect = (hi - lo) > width // 2 and not bisect
    return lo


def predict(known: dict, budget: float) -> int:
    """The largest n where the polynomial through the (up to) three points of ``known``
    nearest the budget stays <= budget (degree 2 only with three distinct points)."""
    points = sorted(known.items(), key=lambda kv: abs(kv[1] - budget))[:3]
    ns = np.array([n for n, _ in points], float)
    ps = np.array([p for _, p in points], float)
    degree = min(2, len(ns) - 1)
    if degree == 0:
        return int(ns[0]) + 1
    coef = np.polyfit(ns, ps, degree)
    if degree == 2 and coef[0] > 0:
        a, b, c = coef
        disc = b * b - 4 * a * (c - budget)
        if disc >= 0:
            return int(math.floor((-b + math.sqrt(disc)) / (2 * a)))
    slope, intercept = np.polyfit(ns, ps, 1)
    if slope <= 0:
        return int(ns.max()) * 2
    return int(math.floor((budget - intercept) / slope))


def saved_inputs_bytes(shape: str, batch: int, context: int) -> int:
    """Per-block remat's saved block inputs: depth · batch · context · width float32."""
    fields = SHAPES[shape][0]
    return fields["depth"] * batch * context * fields["width"] * 4


def analytic_peak(method: str, shape: str, remat_peak: int, batch: int, context: int) -> int:
    """remat_bf16 / remat_offload's device-side peak from remat's compiled peak."""
    saved = saved_inputs_bytes(shape, batch, context)
    if method == "remat_bf16":
        return remat_peak - saved // 2
    depth = SHAPES[shape][0]["depth"]
    return remat_peak - saved * (depth - 2) // depth


UNCHUNKED_TAG = "+unchunked_mlp"  # on a measured method's name: its MLP ran unchunked


def measured_name(method: str, unchunked_mlp: bool) -> str:
    """The method field of a measurement's cache key: the compiled method (remat for the
    analytic rows), tagged when its MLP ran over the whole sequence, so that a chunked
    peak is never read as an unchunked one."""
    return ANALYTIC.get(method, method) + (UNCHUNKED_TAG if unchunked_mlp else "")


def measurement_key(shape, mode, name, batch, context) -> str:
    """``measurements``' key: shape/mode/measured_name/b<batch>/t<context>."""
    return f"{shape}/{mode}/{name}/b{batch}/t{context}"


class Runner:
    """The cached measurements of one out_dir (``max_context.json``). ``unchunked_mlp``:
    the methods (analytic ones included, through remat's peaks) whose MLP runs unchunked;
    it is part of each measurement's key, not of the options, so both settings can share
    an out_dir."""

    def __init__(self, out_dir: str, opts: dict, unchunked_mlp=()):
        self.path = os.path.join(out_dir, "max_context.json")
        self.opts = opts
        self.unchunked_mlp = frozenset(unchunked_mlp)
        self.data = {"measurements": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)
            old = self.data.get("options")
            if old is not None and old != opts:
                raise ValueError(f"{self.path} was measured with {old}, not {opts}; give "
                                 f"another --out_dir or the same options.")
        self.data["options"] = opts
        os.makedirs(out_dir, exist_ok=True)

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)

    def peak(self, shape, mode, method, batch, context, unchunked_mlp=False) -> int:
        """The compiled peak of compiled ``method``, cached."""
        key = measurement_key(shape, mode, measured_name(method, unchunked_mlp), batch,
                              context)
        cache = self.data["measurements"]
        if key not in cache:
            cache[key] = measure(shape, mode, method, batch, context, self.opts,
                                 unchunked_mlp)
            self.save()
            print(f"  {key}: {cache[key]['peak_estimate_bytes'] / GIB:.3f} GiB "
                  f"({cache[key]['compile_seconds']:.1f} s)", flush=True)
        return cache[key]["peak_estimate_bytes"]

    def method_peak(self, shape, mode, method, batch, context) -> int:
        """The peak of ``method`` (compiled, or derived from remat's) at its MLP setting."""
        unchunked = method in self.unchunked_mlp
        if method in ANALYTIC:
            remat = self.peak(shape, mode, ANALYTIC[method], batch, context, unchunked)
            return analytic_peak(method, shape, remat, batch, context)
        return self.peak(shape, mode, method, batch, context, unchunked)


def search(runner: Runner, shape, mode, method, budget_gib: float, what: str) -> int:
    """max_context (tokens, batch 1) or max_batch_at_4096 (samples)."""
    budget = budget_gib * GIB
    unit = runner.opts["context_step"]
    measured = measured_name(method, method in runner.unchunked_mlp)
    prior = {}
    for key in runner.data["measurements"]:
        s, m, meth, b, t = key.split("/")
        b, t = int(b[1:]), int(t[1:])
        if (s, m, meth) != (shape, mode, measured):
            continue
        if what == "context" and b == 1 and t % unit == 0:
            prior[t // unit] = runner.method_peak(shape, mode, method, 1, t)
        elif what == "batch" and t == BATCH_CONTEXT:
            prior[b] = runner.method_peak(shape, mode, method, b, t)
    if what == "context":
        ceiling = runner.opts["max_context"] // unit
        n = largest_fitting(lambda n: runner.method_peak(shape, mode, method, 1, n * unit),
                            budget, ceiling, prior=prior)
        return n * unit
    return largest_fitting(lambda b: runner.method_peak(shape, mode, method, b,
                                                        BATCH_CONTEXT),
                           budget, runner.opts["max_batch"], prior=prior)


# ---------------------------------------------------------------------------- breakdown


def block_vjp_bytes(shape, mode, batch, context, opts, unchunked_mlp=False) -> int:
    """Temp bytes of one block's forward + VJP (the block's trainable parameters and its
    input differentiated) compiled alone at [batch, context, width]; its MLP unchunked when
    ``unchunked_mlp``."""
    config = model_config(shape, "remat", context, opts["compute_dtype"],
                          opts["attention_chunk"], mode, unchunked_mlp)
    model = nnx.eval_shape(lambda: make_model(config))
    graphdef, params = nnx.split(model.stack.blocks, nnx.Param)
    params = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)
    graphdef, train, frozen = nnx.split(nnx.merge(graphdef, params), trainable_of(mode), ...)
    x = jax.ShapeDtypeStruct((batch, context, config.width), jnp.float32)

    def vjp(train, frozen, x, g):
        h, pullback = jax.vjp(lambda t, x: nnx.merge(graphdef, t, frozen)(x, None, None),
                              train, x)
        return h, pullback(g)

    compiled = jax.jit(vjp).lower(train, frozen, x, x).compile()
    return compiled_memory(compiled)["temp_bytes"]


def loss_vjp_bytes(shape, batch, context, opts) -> int:
    """Temp bytes of the head and chunked loss's forward + VJP (final norm output
    differentiated) compiled alone."""
    fields = SHAPES[shape][0]
    hidden = jax.ShapeDtypeStruct((batch, context, fields["width"]), jnp.float32)
    head = jax.ShapeDtypeStruct((fields["vocab_size"], fields["width"]), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    chunk = min(opts["loss_chunk"], context)

    def vjp(hidden, head, targets):
        return jax.value_and_grad(lambda h: chunked_cross_entropy(
            h, head.astype(jnp.float32), targets, chunk=chunk))(hidden)

    compiled = jax.jit(vjp).lower(hidden, head, targets).compile()
    return compiled_memory(compiled)["temp_bytes"]


def breakdown(runner: Runner, shape, mode, methods) -> dict:
    """Per-token bytes at context 4096 (the batch slope of the compiled peak / 4096) beside
    the analytic parts, and each method's constant bytes (the peak at batch 1 less the
    per-token part) beside parameters, gradients and optimizer state.

    The analytic floor per token (bdia): its side bits, the backward pass's four float32
    stream buffers (x_k, x_k+1, dL/dx_k+2, dL/dx_k+1) and the probe's x_0, and one block's
    working set at its least: q, k, v in the compute dtype, their float32 gradients and one
    float32 branch output (or, if larger, the loss's hidden state and its gradient).
    remat's floor has its saved block inputs instead of the side bits and two streams.
    One block's forward + VJP and the head + loss compiled alone are reported beside them
    (their temporaries per token; not a floor: compiled alone, XLA keeps more), the block
    at each MLP setting of ``methods``. A method whose MLP runs unchunked
    (``runner.unchunked_mlp``) is keyed ``method + UNCHUNKED_TAG``; its floor is the same."""
    opts = runner.opts
    fields = SHAPES[shape][0]
    width, depth = fields["width"], fields["depth"]
    heads, kv = fields["num_heads"], fields.get("num_kv_heads") or fields["num_heads"]
    head_dim = fields.get("head_dim") or width // heads
    compute = jnp.dtype(opts["compute_dtype"]).itemsize
    t = BATCH_CONTEXT
    cache = runner.data.setdefault("parts", {})
    slope = lambda pair: (pair[1] - pair[0]) / t  # noqa: E731
    alone = {}
    for unchunked in sorted({m in runner.unchunked_mlp for m in methods}):
        tag = UNCHUNKED_TAG if unchunked else ""
        key = f"{shape}/{mode}{tag}"
        if key not in cache:
            block = [block_vjp_bytes(shape, mode, b, t, opts, unchunked) for b in (1, 2)]
            loss = [loss_vjp_bytes(shape, b, t, opts) for b in (1, 2)]
            cache[key] = {"block_vjp_temp_bytes_b1_b2": block,
                          "loss_vjp_temp_bytes_b1_b2": loss}
            runner.save()
        alone["one_block_forward_vjp_temp" + tag] = slope(
            cache[key]["block_vjp_temp_bytes_b1_b2"])
        alone["head_and_loss_temp"] = slope(cache[key]["loss_vjp_temp_bytes_b1_b2"])
    stream = width * 4
    qkv = (heads + 2 * kv) * head_dim
    block_min = max(qkv * compute + qkv * 4 + stream, 2 * stream)
    parts = {"side_bits": (depth - 1) * width / 8,
             "streams": 5 * stream,
             "one_block_working_set_min": block_min}
    floors = {"bdia": sum(parts.values()),
              "remat": depth * stream + 2 * stream + block_min,
              "remat_bf16": depth * stream / 2 + 2 * stream + block_min,
              "remat_offload": 2 * stream + 2 * stream + block_min}
    out = {"context": t, "per_token_bytes": {}, "analytic_parts_per_token": parts,
           "compiled_alone_per_token": alone, "batch_independent_bytes": {}}
    for method in methods:
        p1 = runner.method_peak(shape, mode, method, 1, t)
        p2 = runner.method_peak(shape, mode, method, 2, t)
        entry = {"compiled": (p2 - p1) / t, "floor": floors.get(method)}
        if entry["floor"]:
            entry["compiled_over_floor"] = entry["compiled"] / entry["floor"]
        name = method + (UNCHUNKED_TAG if method in runner.unchunked_mlp else "")
        out["per_token_bytes"][name] = entry
        out["batch_independent_bytes"][name] = p1 - (p2 - p1)
    states = [runner.data["measurements"].get(measurement_key(
        shape, mode, measured_name(m, m in runner.unchunked_mlp), 1, t)) for m in methods]
    state = next((s for s in states if s is not None), None)  # the state: any method's
    if state is not None:
        out["batch_independent_bytes"]["analytic"] = {
            "trainable_parameters": state["param_bytes"], "gradients": state["param_bytes"],
            "optimizer_state": state["opt_state_bytes"],
            "frozen_parameters": state["frozen_bytes"]}
    return out


# ---------------------------------------------------------------------------------- run


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(shapes, modes, methods, budgets, out_dir, *, searches=SEARCHES,
        compute_dtype="bfloat16", attention_chunk=128, loss_chunk=512, context_step=1024,
        max_context=1 << 20, max_batch=4096, with_breakdown=True,
        unchunked_mlp=()) -> dict:
    """Search every (shape, mode, method, budget); write and return max_context.json.
    ``unchunked_mlp``: the methods whose MLP runs over the whole sequence
    (``chunk_mlp=False``; the analytic rows through remat's peaks), the others' over the
    attention's position blocks."""
    for name, values, choices in (("shapes", shapes, SHAPES), ("modes", modes, MODES),
                                  ("methods", methods, METHODS), ("searches", searches,
                                                                  SEARCHES),
                                  ("unchunked_mlp", unchunked_mlp, METHODS)):
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise ValueError(f"{name}: unknown {unknown}; choose from {list(choices)}.")
    for value, name in ((context_step, "context_step"), (BATCH_CONTEXT, "context 4096")):
        problem = chunk_problem(loss_chunk, value)
        if problem:
            raise ValueError(f"--loss_chunk {problem} ({name}).")
    opts = dict(compute_dtype=compute_dtype, attention_chunk=attention_chunk,
                loss_chunk=loss_chunk, context_step=context_step, max_context=max_context,
                max_batch=max_batch)
    runner = Runner(out_dir, opts, unchunked_mlp)
    runner.data.update(backend=jax.default_backend(), device=str(jax.devices()[0]),
                       platform=platform.platform(), jax=jax.__version__)
    records = {record_key(r): r for r in runner.data.get("records", [])}
    start = time.perf_counter()
    for shape in shapes:
        fields, max_positions = SHAPES[shape]
        for mode in modes:
            for method in methods:
                for budget in budgets:
                    found = {}
                    for what in searches:
                        found[what] = search(runner, shape, mode, method, budget, what)
                    unchunked = method in runner.unchunked_mlp
                    key = (shape, mode, method, budget, unchunked)
                    old = records.get(key, {})
                    record = {
                        "shape": shape, "mode": mode, "method": method, "budget_gib": budget,
                        "unchunked_mlp": unchunked,
                        "max_context": found.get("context", old.get("max_context")),
                        "max_batch_at_4096": found.get("batch", old.get("max_batch_at_4096")),
                        "analytic": method in ANALYTIC,
                        "max_position_embeddings": max_positions,
                        "lora": ("bdia_jax.models.LoRA rank 16, alpha 32, float32 adapters "
                                 "on q k v o gate up down; base frozen by "
                                 "trainable=nnx.LoRAParam" if mode == "lora16" else None),
                        "lora_params": lora_param_count(fields) if mode == "lora16" else 0,
                        "commit": commit(),
                    }
                    if method in ANALYTIC:
                        record["how"] = ANALYTIC_HOW[method]
                    records[key] = record
                    print(f"{shape} {mode} {method}{' (MLP unchunked)' if unchunked else ''} "
                          f"{budget:g} GiB: context "
                          f"{record['max_context']}, batch at 4096 "
                          f"{record['max_batch_at_4096']}", flush=True)
                    runner.data["records"] = list(records.values())
                    runner.save()
            if with_breakdown:
                runner.data.setdefault("breakdown", {})[f"{shape}/{mode}"] = breakdown(
                    runner, shape, mode, methods)
                runner.save()
    runner.data["wall_seconds_last_run"] = round(time.perf_counter() - start, 1)
    runner.data.setdefault("wall_seconds_runs", []).append(runner.data["wall_seconds_last_run"])
    runner.data["markdown"] = markdown(runner.data)
    runner.save()
    return runner.data


def record_key(record: dict) -> tuple:
    """A record's identity: shape, mode, method, budget and MLP setting (records written
    before the setting existed ran the MLP chunked)."""
    return (record["shape"], record["mode"], record["method"], record["budget_gib"],
            record.get("unchunked_mlp", False))


ANALYTIC_HOW = {
    "remat_bf16": "remat's compiled peak at the same size minus half of its saved float32 "
                  "block inputs (depth*batch*context*width*2 bytes): the engine has no "
                  "bfloat16 checkpoint option",
    "remat_offload": "device side only: remat's compiled peak minus the saved block inputs "
                     "of all blocks but two (XLA:CPU has no host memory space to offload to)",
}


def markdown(data) -> str:
    lines = ["| shape | mode | method | budget GiB | max context (batch 1) | "
             "max batch at 4096 |", "|---|---|---|---:|---:|---:|"]
    for r in sorted(data.get("records", []), key=lambda r: (
            r["shape"], r["mode"], r["budget_gib"], METHODS.index(r["method"]),
            r.get("unchunked_mlp", False))):
        name = (r["method"] + (" (analytic)" if r["analytic"] else "")
                + (" (MLP unchunked)" if r.get("unchunked_mlp") else ""))
        lines.append(f"| {r['shape']} | {r['mode']} | {name} | {r['budget_gib']:g} | "
                     f"{r['max_context']} | {r['max_batch_at_4096']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ step time

TIMED = ("remat", "bdia")  # per-block remat against BDIA (the experiments' recompute)


def time_steps(shape, mode, batch, context, rounds, opts, unchunked_mlp=()) -> dict:
    """Seconds per train step of ``TIMED`` at (batch, context), really run: each method's
    step compiled and run once, then ``rounds`` rounds of one step of each method in turn,
    so that machine noise hits them alike; the MLP unchunked for the methods in
    ``unchunked_mlp``. Returns the medians and BDIA / remat."""
    opt, trainable = registry.optimizer(), trainable_of(mode)
    vocab = SHAPES[shape][0]["vocab_size"]
    tokens = jax.random.randint(jax.random.key(0), (batch, context + 1), 0, vocab, jnp.int32)
    runs = {}
    for method in TIMED:
        config = model_config(shape, method, context, opts["compute_dtype"],
                              opts["attention_chunk"], mode, method in unchunked_mlp)
        graphdef, state = training.init(make_model(config), opt, jax.random.PRNGKey(2),
                                        trainable=trainable)
        step = jax.jit(training.make_train_step(graphdef, loss_fn(opts["loss_chunk"]), opt,
                                                trainable=trainable), donate_argnums=0)
        start = time.perf_counter()
        state, out = jax.block_until_ready(step(state, tokens))
        runs[method] = dict(step=step, state=state, times=[],
                            first_seconds=round(time.perf_counter() - start, 2))
    for _ in range(rounds):
        for method in TIMED:
            r = runs[method]
            start = time.perf_counter()
            r["state"], out = jax.block_until_ready(r["step"](r["state"], tokens))
            r["times"].append(time.perf_counter() - start)
            if not np.isfinite(float(out["loss"])) or float(out.get("reversal_error", 0.0)):
                raise ValueError(f"{method} step at {shape} gave loss {out['loss']} / "
                                 f"reversal error {out.get('reversal_error')}")
    median = {m: float(np.median(runs[m]["times"])) for m in TIMED}
    return {"shape": shape, "mode": mode, "batch": batch, "context": context,
            "rounds": rounds, "seconds": {m: [round(t, 3) for t in runs[m]["times"]]
                                          for m in TIMED},
            "median_seconds": {m: round(v, 3) for m, v in median.items()},
            "first_step_seconds": {m: runs[m]["first_seconds"] for m in TIMED},
            "bdia_over_remat": round(median["bdia"] / median["remat"], 3),
            "unchunked_mlp": sorted(unchunked_mlp), "options": opts, "commit": commit(), "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama-3.1-8b", help=",".join(SHAPES))
    p.add_argument("--modes", default=",".join(MODES), help=",".join(MODES))
    p.add_argument("--methods", default=",".join(METHODS), help=",".join(METHODS))
    p.add_argument("--budget_gib", default="16,24,80", help="comma-separated budgets, GiB")
    p.add_argument("--searches", default=",".join(SEARCHES),
                   help="context (batch 1) and/or batch (context 4096)")
    p.add_argument("--compute_dtype", default="bfloat16", help="matmul dtype")
    p.add_argument("--attention_chunk", type=int, default=128, help="queries per block")
    p.add_argument("--loss_chunk", type=int, default=512,
                   help="tokens per loss chunk (divides the context)")
    p.add_argument("--context_step", type=int, default=1024,
                   help="the context search's unit (tokens)")
    p.add_argument("--max_context", type=int, default=1 << 20, help="context ceiling")
    p.add_argument("--max_batch", type=int, default=4096, help="batch ceiling")
    p.add_argument("--unchunked_mlp", default="", metavar="METHODS",
                   help="methods whose MLP runs over the whole sequence (chunk_mlp=False; "
                        "remat_bf16 / remat_offload through remat's unchunked peaks); the "
                        "others' over the attention's position blocks")
    p.add_argument("--no_breakdown", action="store_true", help="skip the per-token parts")
    p.add_argument("--out_dir", default="runs/max_context", help="output folder")
    p.add_argument("--time", default=None, metavar="BATCHxCONTEXT",
                   help="instead of the searches: time remat and bdia train steps of the "
                        "first shape and mode at this size (e.g. 8x256), really run; "
                        "writes step_time.json")
    p.add_argument("--time_rounds", type=int, default=5, help="timed steps per method")
    p.add_argument("--live_at_peak", default=None, metavar="BATCHES",
                   help="instead of the searches: the buffers live at the compiled peak of "
                        "the first shape, mode and compiled method at these batches "
                        "(comma-separated) and context 4096, from XLA's dumps; writes "
                        "live_at_peak.json")
    p.add_argument("--top", type=int, default=12, help="--live_at_peak: buffers listed")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        unchunked = registry.method_list(args.unchunked_mlp, METHODS, "--unchunked_mlp")
    except ValueError as error:
        raise SystemExit(f"benchmarks.max_context: {error}") from None
    if args.time is not None:
        return main_time(args, unchunked)
    if args.live_at_peak is not None:
        return main_live(args, unchunked)
    try:
        data = run(args.shapes.split(","), args.modes.split(","), args.methods.split(","),
                   [float(b) for b in args.budget_gib.split(",")], args.out_dir,
                   searches=args.searches.split(","), compute_dtype=args.compute_dtype,
                   attention_chunk=args.attention_chunk, loss_chunk=args.loss_chunk,
                   context_step=args.context_step, max_context=args.max_context,
                   max_batch=args.max_batch, with_breakdown=not args.no_breakdown,
                   unchunked_mlp=unchunked)
    except ValueError as error:
        raise SystemExit(f"benchmarks.max_context: {error}") from None
    print("\n" + data["markdown"])
    print(f"wrote {os.path.join(args.out_dir, 'max_context.json')} "
          f"({data['wall_seconds_last_run']} s)")
    return data


def main_time(args, unchunked_mlp=()) -> dict:
    """``--time``: step_time.json of the first shape and mode, the MLP unchunked for the
    methods in ``unchunked_mlp``."""
    try:
        batch, context = (int(v) for v in args.time.lower().split("x"))
    except ValueError:
        raise SystemExit(f"benchmarks.max_context: --time must be BATCHxCONTEXT, e.g. 8x256, "
                         f"got {args.time!r}") from None
    shape, mode = args.shapes.split(",")[0], args.modes.split(",")[0]
    if shape not in SHAPES or mode not in MODES:
        raise SystemExit(f"benchmarks.max_context: --time needs a shape of {sorted(SHAPES)} "
                         f"and a mode of {MODES}, got {shape!r}, {mode!r}")
    opts = dict(compute_dtype=args.compute_dtype, attention_chunk=args.attention_chunk,
                loss_chunk=args.loss_chunk)
    result = time_steps(shape, mode, batch, context, args.time_rounds, opts, unchunked_mlp)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "step_time.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{shape} {mode} batch {batch} context {context}: remat "
          f"{result['median_seconds']['remat']} s, bdia {result['median_seconds']['bdia']} s "
          f"per step (median of {args.time_rounds}): bdia / remat = "
          f"{result['bdia_over_remat']}; wrote {path}")
    return result


def main_live(args, unchunked_mlp=()) -> dict:
    """``--live_at_peak``: the train step compiled with XLA's dumps on, and the buffers
    live at its peak (``benchmarks.memory_anatomy.live_at_peak``: the buffer assignment's
    live-range report, each buffer named by its HLO instruction and the JAX op that made
    it), largest first, per batch."""
    import shutil
    import tempfile

    from benchmarks.memory_anatomy import DUMP_FLAGS, live_at_peak

    shape, mode = args.shapes.split(",")[0], args.modes.split(",")[0]
    method = args.methods.split(",")[0]
    if shape not in SHAPES or mode not in MODES or method not in COMPILED:
        raise SystemExit(f"benchmarks.max_context: --live_at_peak needs a shape of "
                         f"{sorted(SHAPES)}, a mode of {MODES} and a compiled method of "
                         f"{sorted(COMPILED)}, got {shape!r}, {mode!r}, {method!r}")
    dump_dir = tempfile.mkdtemp(prefix="max_context_dump_")
    # XLA reads the dump flags when the backend starts: nothing above has used it.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + DUMP_FLAGS.format(dir=dump_dir)).strip()
    opts = dict(compute_dtype=args.compute_dtype, attention_chunk=args.attention_chunk,
                loss_chunk=args.loss_chunk)
    result = {"shape": shape, "mode": mode, "method": method, "context": BATCH_CONTEXT,
              "unchunked_mlp": method in unchunked_mlp, "options": opts, "commit": commit(),
              "backend": jax.default_backend(), "batches": {}}
    for batch in (int(b) for b in args.live_at_peak.split(",")):
        memory = measure(shape, mode, method, batch, BATCH_CONTEXT, opts,
                         method in unchunked_mlp)
        buffers = sorted(live_at_peak(dump_dir, "jit_train_step"), key=lambda b: -b["bytes"])
        result["batches"][str(batch)] = {"compiled": memory, "live_bytes": sum(
            b["bytes"] for b in buffers), "top": buffers[:args.top]}
        print(f"batch {batch}: peak {memory['peak_estimate_bytes'] / GIB:.3f} GiB; largest "
              f"buffers live at the peak (MiB, HLO buffer, shape, JAX op):")
        for b in buffers[:args.top]:
            print(f"  {b['bytes'] / 2**20:8.1f}  {b['name'][:32]:32s} {b['shape'][:34]:34s} "
                  f"{b['op_name'][-70:]}")
        for name in os.listdir(dump_dir):  # the next compile's report is found by its name
            path = os.path.join(dump_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    shutil.rmtree(dump_dir, ignore_errors=True)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "live_at_peak.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()


"""Where a train step's time goes: the compiled remat and BDIA (``recompute="fused"``)
train steps of ``benchmarks.max_context``, compared op by op without running them.

    python -m benchmarks.step_anatomy --shape smollm2-135m --depth 4,8 --size 4x256
    python -m benchmarks.step_anatomy --shape smollm2-135m --depth 30 --size 4x256 \
        --unchunked_mlp bdia --time_rounds 5

``--bdia_recompute``: BDIA's ``recompute`` (default: the experiments', "fused").
``--unchunked_mlp``: the methods whose MLP runs over the whole sequence
(``chunk_mlp=False``). ``--time_rounds``: also run both steps at the largest depth,
interleaved round by round (``max_context``'s ``--time``, with these configs).

``compiled.cost_analysis()`` counts a while loop's body once, whatever its trip count, so
on a scanned stack it mostly measures the head and the optimizer. This benchmark reads the
optimized HLO instead (``compiled.as_text()``) and weights every instruction by how often
it runs: a while body by its ``known_trip_count`` (nested loops multiply; a loop without
one, the reversible backward pass's held update of at most one trip, once), a fusion's
instructions by their fusion's count. Per method it prints

  * dot FLOPs (2·output·contraction, dots inside fusions included);
  * element ops: the elements computed by every non-dot arithmetic instruction, fused or
    not (what a CPU's vector units do: the quantization, the side bits, the γ mixing); a
    fused instruction counts at most its fusion's output (or fused reduction's input);
  * bytes: operands + outputs of the top-level instructions (fusions, dots, copies; a
    dynamic-update-slice counts its update twice, a slice its output twice, and so do a
    fusion's operand read through dynamic-slices and its in-place root update), an
    estimate of memory traffic;
  * executed counts of the top-level instructions per kind;

and the dots per block by pass: "forward", "recompute" (a forward op run again in the
backward pass) and "gradient" (a transposed op), read from each dot's HLO ``op_name``, and
by operand shapes where the two methods differ. (HLO source frames do not help here: the
ops of a custom VJP's backward rule carry the frame of its call site.)

A smaller ``--depth`` of the same block shape compiles in seconds; the per-block figures
are the difference of two depths' totals divided by their depth difference (``--depth
4,8`` prints them). Depths are even: the reversible backward pass runs two held updates
per loop trip, each a loop of at most one trip without a known count (counted once), and
with an odd depth the first of them does not run.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from bdia_jax import training
from bdia_jax.methods import RECOMPUTE_MODES
from benchmarks import max_context as mc
from benchmarks import registry
from experiments.common.memory import compiled_memory

METHODS = ("remat", "bdia")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "token": 0}
# Instructions that move no data of their own (views, bookkeeping, control flow).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
         "optimization-barrier"}
# Instructions that compute no arithmetic (data movement only).
_MOVES = _FREE | {"copy", "broadcast", "reshape", "transpose", "slice", "dynamic-slice",
                  "dynamic-update-slice", "concatenate", "pad", "iota", "gather", "scatter",
                  "reverse", "dot", "fusion", "custom-call", "copy-start", "copy-done"}

_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\{\s*$")


def _shapes(text: str):
    """[(dtype, dims)] of the array shapes in a type string."""
    return [(d, [int(v) for v in dims.split(",") if v]) for d, dims in _SHAPE.findall(text)
            if d in _DTYPE_BYTES]


def _bytes(shapes) -> int:
    return sum(_DTYPE_BYTES[d] * math.prod(dims) for d, dims in shapes)


def _elements(shapes) -> int:
    return sum(math.prod(dims) for _, dims in shapes)


class Instr:
    """One HLO instruction: name, output type, opcode, operand names, attributes."""

    def __init__(self, name, out_type, opcode, rest):
        self.name, self.opcode = name, opcode
        self.out = _shapes(out_type)
        depth, i = 1, 0
        while i < len(rest) and depth:  # the operand list ends at its matching ")"
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            i += 1
        self.operands = re.findall(r"%([^\s,)]+)", rest[:i - 1])
        self.param_number = int(rest[:i - 1]) if opcode == "parameter" else None
        self.attrs = rest[i:]

    def attr(self, key):
        m = re.search(key + r"=%?([^\s,}]+)", self.attrs)
        return m.group(1) if m else None


def parse_hlo(text: str):
    """(computations {name: [Instr]}, their roots {name: Instr}, entry name)."""
    comps, roots, entry, current = {}, {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            comps[current].append(Instr(*m.groups()))
            if line.lstrip().startswith("ROOT "):
                roots[current] = comps[current][-1]
    return comps, roots, entry


def executions(comps, entry) -> dict[str, float]:
    """How often each computation runs per step: while bodies by their known trip count."""
    counts = collections.Counter()

    def visit(name, times):
        counts[name] += times
        for ins in comps[name]:
            if ins.opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
                # No known trip count: the engine's held-update loop of at most one trip.
                visit(ins.attr("body"), times * (1 if trips is None else int(trips.group(1))))
            elif ins.opcode in ("call", "fusion"):
                visit(ins.attr("to_apply") or ins.attr("calls"), times)
            elif ins.opcode == "conditional":  # each branch counted as if it ran
                for branch in re.findall(r"%([\w.\-]+)", ins.attr("branch_computations")
                                         or ""):
                    visit(branch, times)

    visit(entry, 1)
    return counts


def _fusion_bytes(body: list, root: Instr, operands: list, out) -> int:
    """Bytes a fusion reads and writes: each operand whole, except one read only through
    dynamic-slices (the slices), and an output written in place by a root
    dynamic-update-slice into an operand (the update, read and written)."""
    users = collections.defaultdict(list)
    for ins in body:
        for o in ins.operands:
            users[o].append(ins)
    number = {}
    for ins in body:
        if ins.opcode == "parameter":
            number[ins.name] = ins.param_number
    shapes = {ins.name: ins.out for ins in body}
    read = [_bytes(s) for s in operands]
    written = _bytes(out)
    for name, i in number.items():
        use = users[name]
        if use and all(u.opcode == "dynamic-slice" and u.operands[0] == name for u in use):
            read[i] = sum(_bytes(u.out) for u in use)
        if root.opcode == "dynamic-update-slice" and root.operands[0] == name:
            read[i] = 0
            written = 2 * _bytes(shapes.get(root.operands[1], []))
    return written + sum(read)


def _role(ins: Instr) -> str:
    """A dot's pass from its HLO op_name: "forward" (the forward pass), "recompute" (a
    forward op run again in the backward pass: remat's rematerialization, a custom VJP's or
    the reversible rebuild's recomputation) or "gradient" (a transposed op)."""
    op = re.search(r'op_name="([^"]*)"', ins.attrs)
    path = op.group(1).split("/", 1)[-1] if op else ""
    if not path.startswith("transpose("):
        return "forward"
    marks = re.findall(r"transpose\(jvp\(\)\)|jvp\(\)|rematted_computation",
                       path.split("/", 1)[-1])
    return "recompute" if marks and marks[-1] != "transpose(jvp())" else "gradient"


def anatomy(text: str) -> dict:
    """Executed totals, instruction counts and dots by pass of one optimized HLO module."""
    comps, roots, entry = parse_hlo(text)
    counts = executions(comps, entry)
    fused = {ins.attr("calls") for c in comps.values() for ins in c if ins.opcode == "fusion"}
    totals = collections.Counter()
    ops = collections.Counter()
    dots = collections.Counter()  # "lhs x rhs pass" -> executed flops
    for name, times in counts.items():
        shapes = {}
        for ins in comps[name]:
            shapes[ins.name] = ins.out
        # A fusion computes its instructions on the elements its output (or a fused
        # reduction's input) needs: a convert of a whole weight stack under a dynamic-slice
        # costs the slice.
        cap = math.inf if name not in fused else max(
            [_elements(roots[name].out)] + [_elements(shapes.get(o, [])) for ins in
                                                comps[name] if ins.opcode.startswith("reduce")
                                                for o in ins.operands[:1]])
        for ins in comps[name]:
            if ins.opcode == "dot":
                lhs = shapes.get(ins.operands[0], [("f32", [])])[0][1]
                dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
                dims = [int(v) for v in (dims.group(1) if dims else "").split(",") if v]
                flops = 2 * _elements(ins.out) * math.prod(lhs[d] for d in dims)
                totals["dot_flops"] += times * flops
                rhs = shapes.get(ins.operands[1], [("f32", [])])[0][1]
                dots[f"{lhs} x {rhs} {_role(ins)}"] += times * flops
            elif ins.opcode not in _MOVES:
                n = times * min(_elements(ins.out), cap)
                totals["element_ops"] += n
            if name in fused or ins.opcode in _FREE:
                continue
            kind = ins.opcode + (f":{ins.attr('kind')}" if ins.opcode == "fusion" else "")
            ops[kind] += times
            if ins.opcode in ("dynamic-update-slice",):
                moved = 2 * _bytes(shapes.get(ins.operands[1], []))
            elif ins.opcode in ("dynamic-slice", "slice"):
                moved = 2 * _bytes(ins.out)
            elif ins.opcode == "fusion":
                moved = _fusion_bytes(comps[ins.attr("calls")], roots[ins.attr("calls")],
                                      [shapes.get(o, []) for o in ins.operands], ins.out)
            else:
                moved = _bytes(ins.out) + sum(_bytes(shapes.get(o, [])) for o in ins.operands)
            totals["bytes"] += times * moved
    return {"totals": dict(totals), "ops": dict(ops), "dots": dict(dots)}


def step_config(shape: str, depth: int, method: str, context: int, opts):
    """The max_context DecoderConfig of ``shape`` with ``depth`` blocks trained with
    ``method``; its MLP over the whole sequence (``chunk_mlp=False``) when ``method`` is in
    ``opts["unchunked_mlp"]``, else chunked like the attention (the default)."""
    fields, max_len = mc.SHAPES[shape]
    name = f"{shape}-depth{depth}"
    mc.SHAPES[name] = (dict(fields, depth=depth), max_len)
    return mc.model_config(name, method, context, opts["compute_dtype"],
                           opts["attention_chunk"], "full",
                           unchunked_mlp=method in opts["unchunked_mlp"],
                           recompute=opts["bdia_recompute"])


def compiled_step(shape: str, depth: int, method: str, batch: int, context: int, opts):
    """The compiled max_context train step (full fine-tuning, AdamW) of ``step_config``,
    on abstract inputs."""
    config = step_config(shape, depth, method, context, opts)
    step, state = mc.abstract_step(config, "full", opts["loss_chunk"])
    tokens = jax.ShapeDtypeStruct((batch, context + 1), jnp.int32)
    return step.lower(state, tokens).compile()


def time_steps(shape: str, depth: int, batch: int, context: int, rounds: int, opts) -> dict:
    """Seconds per train step of both methods at ``step_config``, really run: one step each
    (compile), then ``rounds`` rounds of one step of each method in turn, so that machine
    noise hits them alike (``max_context.time_steps``, with this benchmark's configs)."""
    opt, vocab = registry.optimizer(), mc.SHAPES[shape][0]["vocab_size"]
    tokens = jax.random.randint(jax.random.key(0), (batch, context + 1), 0, vocab, jnp.int32)
    runs = {}
    for method in METHODS:
        model = mc.make_model(step_config(shape, depth, method, context, opts))
        graphdef, state = training.init(model, opt, jax.random.PRNGKey(2))
        step = jax.jit(training.make_train_step(graphdef, mc.loss_fn(opts["loss_chunk"]),
                                                   opt), donate_argnums=0)
        state, _ = jax.block_until_ready(step(state, tokens))
        runs[method] = dict(step=step, state=state, times=[])
    for _ in range(rounds):
        for method in METHODS:
            r = runs[method]
            start = time.perf_counter()
            r["state"], out = jax.block_until_ready(r["step"](r["state"], tokens))
            r["times"].append(round(time.perf_counter() - start, 3))
            if not math.isfinite(float(out["loss"])) or float(out.get("reversal_error", 0.0)):
                raise ValueError(f"{method} step gave loss {out['loss']} / reversal error "
                                 f"{out.get('reversal_error')}")
    median = {m: sorted(runs[m]["times"])[rounds // 2] for m in METHODS}
    return {"seconds": {m: runs[m]["times"] for m in METHODS}, "median_seconds": median,
            "bdia_over_remat": round(median["bdia"] / median["remat"], 3),
            "round_ratios": [round(b / r, 3) for r, b in zip(runs["remat"]["times"],
                                                             runs["bdia"]["times"])]}


def measure(shape, depths, batch, context, opts, hlo_dir=None) -> dict:
    """anatomy() and cost_analysis() of both methods at each depth."""
    out = {}
    for depth in depths:
        for method in METHODS:
            start = time.perf_counter()
            compiled = compiled_step(shape, depth, method, batch, context, opts)
            seconds = time.perf_counter() - start
            text = compiled.as_text()
            if hlo_dir:
                os.makedirs(hlo_dir, exist_ok=True)
                with open(os.path.join(hlo_dir, f"{method}_depth{depth}.hlo"), "w") as f:
                    f.write(text)
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            result = anatomy(text)
            result["cost_analysis"] = {k: cost.get(k) for k in ("flops", "bytes accessed")}
            result["memory"] = compiled_memory(compiled)
            result["compile_seconds"] = round(seconds, 1)
            out[f"{method}@{depth}"] = result
    return out


def _fmt(v: float) -> str:
    return f"{v / 1e9:.3f} G"


def report(data: dict, depths) -> str:
    lines = []
    for depth in depths:
        r, b = data[f"remat@{depth}"], data[f"bdia@{depth}"]
        lines.append(f"\n== depth {depth} (executed totals; cost_analysis counts each loop "
                     f"body once) ==")
        lines.append(f"{'':24}{'remat':>14}{'bdia':>14}{'bdia/remat':>12}")
        for key in ("dot_flops", "element_ops", "bytes"):
            lines.append(f"{key:24}{_fmt(r['totals'][key]):>14}{_fmt(b['totals'][key]):>14}"
                         f"{b['totals'][key] / r['totals'][key]:>12.4f}")
        for key in ("flops", "bytes accessed"):
            lines.append(f"{'cost_analysis ' + key:24}{_fmt(r['cost_analysis'][key]):>14}"
                         f"{_fmt(b['cost_analysis'][key]):>14}")
        for key in ("temp_bytes", "peak_estimate_bytes"):
            lines.append(f"{'compiled ' + key:24}{_fmt(r['memory'][key]):>14}"
                         f"{_fmt(b['memory'][key]):>14}")
        lines.append("executed top-level instructions (bdia - remat):")
        for kind in sorted(set(r["ops"]) | set(b["ops"])):
            d = b["ops"].get(kind, 0) - r["ops"].get(kind, 0)
            if d:
                lines.append(f"  {kind:34}{r['ops'].get(kind, 0):>8.0f}"
                             f"{b['ops'].get(kind, 0):>8.0f}{d:>+8.0f}")
    if len(depths) >= 2:
        lo, hi = min(depths), max(depths)
        lines.append(f"\n== per block: (depth {hi} - depth {lo}) / {hi - lo} ==")
        per = {}
        for m in METHODS:
            a, z = data[f"{m}@{lo}"], data[f"{m}@{hi}"]
            per[m] = {k: (z["totals"][k] - a["totals"][k]) / (hi - lo)
                      for k in ("dot_flops", "element_ops", "bytes")}
        for key in ("dot_flops", "element_ops", "bytes"):
            lines.append(f"{key:24}{_fmt(per['remat'][key]):>14}{_fmt(per['bdia'][key]):>14}"
                         f"{per['bdia'][key] / max(per['remat'][key], 1):>12.4f}")
        lines.append("per-block dot GFLOPs by pass (from the HLO op_name), and by operand "
                     "shapes where the methods differ:")
        per_dot = {}
        for m in METHODS:
            a, z = data[f"{m}@{lo}"]["dots"], data[f"{m}@{hi}"]["dots"]
            per_dot[m] = {k: (z.get(k, 0) - a.get(k, 0)) / (hi - lo) for k in set(a) | set(z)}
        for k in sorted(set(per_dot["remat"]) | set(per_dot["bdia"]),
                        key=lambda k: (k.rsplit(" ", 1)[1], k)):
            r, b = per_dot["remat"].get(k, 0), per_dot["bdia"].get(k, 0)
            if r != b:
                lines.append(f"  remat {r / 1e9:7.3f}  bdia {b / 1e9:7.3f}  {(b - r) / 1e9:+8.3f}  {k}")
        for role in ("forward", "recompute", "gradient"):
            r, b = (sum(v for k, v in per_dot[m].items() if k.endswith(role)) for m in METHODS)
            lines.append(f"  {role:9} remat {r / 1e9:7.3f}  bdia {b / 1e9:7.3f}  {(b - r) / 1e9:+8.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="smollm2-135m", help=",".join(mc.SHAPES))
    p.add_argument("--depth", default="4,8", help="comma-separated block counts")
    p.add_argument("--size", default="4x256", help="BATCHxCONTEXT")
    p.add_argument("--compute_dtype", default="bfloat16", help="matmul dtype")
    p.add_argument("--attention_chunk", type=int, default=128, help="queries per block")
    p.add_argument("--loss_chunk", type=int, default=512,
                   help="tokens per loss chunk (divides the context)")
    p.add_argument("--unchunked_mlp", default="",
                   help="methods (remat,bdia) whose MLP runs over the whole sequence "
                        "(chunk_mlp=False); the others' over blocks like the attention")
    p.add_argument("--bdia_recompute", default=None, choices=RECOMPUTE_MODES,
                   help="BDIA's Reversible recompute (default: the experiments', "
                        "benchmarks.registry)")
    p.add_argument("--time_rounds", type=int, default=0,
                   help="also run the steps at the largest depth: this many interleaved "
                        "rounds (0: compile only)")
    p.add_argument("--out_dir", default=None, help="write step_anatomy.json and the HLO here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        batch, context = (int(v) for v in args.size.lower().split("x"))
        depths = [int(v) for v in args.depth.split(",")]
    except ValueError:
        raise SystemExit(f"benchmarks.step_anatomy: --size must be BATCHxCONTEXT and --depth "
                         f"integers, got {args.size!r}, {args.depth!r}") from None
    if any(d < 2 or d % 2 for d in depths):
        # The reversible backward pass runs two held updates per loop trip; with an odd
        # depth the first does not run, and a loop without a trip count is counted once.
        raise SystemExit(f"benchmarks.step_anatomy: --depth takes even depths >= 2, got "
                         f"{args.depth!r}")
    if args.shape not in mc.SHAPES:
        raise SystemExit(f"benchmarks.step_anatomy: --shape must be one of "
                         f"{sorted(mc.SHAPES)}, got {args.shape!r}")
    try:
        unchunked = registry.method_list(args.unchunked_mlp, METHODS, "--unchunked_mlp")
    except ValueError as error:
        raise SystemExit(f"benchmarks.step_anatomy: {error}") from None
    opts = dict(compute_dtype=args.compute_dtype, attention_chunk=args.attention_chunk,
                loss_chunk=args.loss_chunk, unchunked_mlp=unchunked,
                bdia_recompute=args.bdia_recompute)
    data = measure(args.shape, depths, batch, context, opts, args.out_dir)
    recompute = step_config(args.shape, 2, "bdia", context, opts).backprop.recompute
    print(f"{args.shape}, batch {batch} x context {context}, full fine-tuning, MLP unchunked "
          f"for {unchunked or 'none'}, BDIA recompute={recompute!r}, commit {mc.commit()}")
    print(report(data, depths))
    if args.time_rounds:
        data["time"] = time_steps(args.shape, max(depths), batch, context, args.time_rounds,
                                  opts)
        print(f"\nstep seconds at depth {max(depths)}, {args.time_rounds} interleaved rounds: "
              f"{data['time']['seconds']}; medians {data['time']['median_seconds']}, "
              f"bdia / remat {data['time']['bdia_over_remat']}; per round "
              f"{data['time']['round_ratios']}")
    if args.out_dir:
        with open(os.path.join(args.out_dir, "step_anatomy.json"), "w") as f:
            json.dump(dict(data, shape=args.shape, batch=batch, context=context,
                           depths=depths, commit=mc.commit()), f, indent=1)
    return data


if __name__ == "__main__":
    main()

"""The fine-tuning table of ``experiments.finetune_lm`` (issue 32) from a workdir, finished
or not.

    python scripts/finetune_report.py /work/runs/finetune_e2e --out docs/finetune_smollm2_e2e

Reads ``<workdir>/seed_<s>/`` for every seed (or ``<workdir>`` itself, a run without
``config.seeds``): each finished model's result (``checkpoints/<name>_result.json``) and the
records (``metrics.jsonl``) of every model, finished or still training. Writes:

* ``<out>.md``: per method, mean ± std (sample std, ddof 1) over its finished seeds of the
  test loss, BLEU (greedy, beam; E2E only), best validation loss, step time, training time,
  compiled peak memory of the train step, reversal error and overflowed steps; each seed's
  wall time; the dropout sweep at the
  first seed (which rate won, by its best validation loss); a few samples per method. A
  method or seed not finished is shown as missing ("—", "k/n seeds", its last logged step).
* ``<out>_val.png``: the validation loss per method against the step (each seed thin, the
  mean of the seeds that have a point bold).

The "standard+dropout" row is the sweep's winner (``DROPOUT_RATES`` entries of the run's
config): the lowest best validation loss at the first seed, among the finished entries; it
is marked provisional while some entry of the sweep has not finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments.common import metrics  # noqa: E402
from experiments.configs.finetune_lm import DROPOUT_RATES  # noqa: E402
from experiments.finetune_lm import FinetuneLM  # noqa: E402

MISSING = "—"
MAIN = ("standard", "dropout", "bdia", "lora", "lora_bdia")  # "dropout": the sweep's winner
COLUMNS = (  # (header, result → value, format); E2E adds the BLEU columns
    ("test loss", lambda r: r.get("test_loss"), "{:.4f}"),
    ("best val loss", lambda r: r.get("val_loss_best"), "{:.4f}"),
    ("step (s)", lambda r: r.get("step_time_s"), "{:.2f}"),
    ("training (min)", lambda r: r.get("train_seconds") and r["train_seconds"] / 60, "{:.1f}"),
    ("train-step peak (MB)", lambda r: ((r.get("memory") or {}).get("compiled") or {}).get(
        "peak_estimate_bytes") and r["memory"]["compiled"]["peak_estimate_bytes"] / 2**20,
     "{:.0f}"),
)
BLEU = (("BLEU greedy", lambda r: r.get("bleu_greedy"), "{:.2f}"),
        ("BLEU beam", lambda r: r.get("bleu_beam"), "{:.2f}"))


def seed_dirs(workdir: pathlib.Path, seeds) -> dict[int, pathlib.Path]:
    """seed → its folder: ``seed_<s>`` for the asked seeds, or the workdir itself when the
    run had no ``config.seeds`` (its config.json names the seed)."""
    if seeds is None:
        found = sorted(int(p.name[5:]) for p in workdir.glob("seed_*") if p.name[5:].isdigit())
        if found:
            seeds = found
        else:
            config = json.loads((workdir / "config.json").read_text())
            return {int(config["seed"]): workdir}
    return {s: workdir / f"seed_{s}" for s in seeds}


def read_run(workdir: pathlib.Path, seeds=None) -> dict:
    """{"config", "seeds": {seed: {"results": {name: result}, "records": [...]}}}."""
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"error: no {config_path}: pass the --workdir of a finetune_lm run.")
    out = {"config": json.loads(config_path.read_text()), "seeds": {}}
    for seed, folder in seed_dirs(workdir, seeds).items():
        results = {}
        for path in sorted((folder / "checkpoints").glob("*_result.json")):
            results[path.name[:-len("_result.json")]] = json.loads(path.read_text())
        summary = folder / "summary.json"  # written when every model of the seed finished
        wall = None
        if summary.is_file():
            summary = json.loads(summary.read_text())
            # An invocation that reused finished models took less than their training.
            trained = sum(m.get("train_seconds", 0.0) for m in summary["models"].values())
            wall = summary["wall_seconds"] if summary["wall_seconds"] >= trained else None
        out["seeds"][seed] = {"results": results, "records": metrics.read_records(
            str(folder / "metrics.jsonl")), "wall_seconds": wall}
    return out


def display(name: str) -> str:
    return FinetuneLM.display_names.get(name, name)


def cell(values: list, fmt: str) -> str:
    """mean ± std (ddof 1) of the finished seeds' values (one seed: the value); MISSING
    when none has one."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return MISSING
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values, ddof=1))}"


def progress(run: dict, name: str) -> str:
    """"k/n seeds", and the last logged step of an unfinished seed's model."""
    seeds = run["seeds"]
    done = [s for s in seeds if name in seeds[s]["results"]]
    notes = [f"{len(done)}/{len(seeds)} seeds"]
    for s in seeds:
        if name in seeds[s]["results"]:
            continue
        steps = [r["step"] for r in seeds[s]["records"]
                 if r.get("model") == display(name) and r.get("kind") == "train"]
        if steps:
            notes.append(f"seed {s} at step {max(steps)}")
    return ", ".join(notes)


def sweep(run: dict) -> tuple[str | None, list[tuple[str, float, float | None]], bool, int]:
    """(winner, [(name, rate, best val loss at the first seed)], complete, that seed)."""
    names = [n for n in DROPOUT_RATES if n in run["config"]["methods"]]
    first = min(run["seeds"])
    results = run["seeds"][first]["results"]
    rows = [(n, run["config"]["methods"][n]["dropout"],
             results[n]["val_loss_best"] if n in results else None) for n in names]
    done = [(loss, n) for n, _, loss in rows if loss is not None]
    return (min(done)[1] if done else None), rows, len(done) == len(rows), first


def method_rows(run: dict) -> list[tuple[str, str]]:
    """(entry name, label) of the table's rows: the five methods, the dropout row being
    the sweep's winner; entries of the run's config outside MAIN and the sweep follow."""
    winner, _, complete, _ = sweep(run)
    rows = []
    for name in MAIN:
        if name == "dropout":
            chosen = winner or "dropout"
            rate = run["config"]["methods"].get(chosen, {}).get("dropout")
            note = "" if winner is None else (" (sweep winner)" if complete
                                              else " (provisional: sweep unfinished)")
            rows.append((chosen, f"standard + dropout {rate}{note}"))
        elif name in run["config"]["methods"]:
            rows.append((name, display(name)))
    others = [n for n in run["config"]["methods"] if n not in MAIN and n not in DROPOUT_RATES]
    return rows + [(n, display(n)) for n in others]


def table(run: dict) -> str:
    text_format = run["config"]["data"].get("format", "e2e") == "text"
    columns = COLUMNS if text_format else (COLUMNS[0], *BLEU, *COLUMNS[1:])
    header = ["method", "seeds", *[c[0] for c in columns], "reversal error (max)",
              "overflowed steps"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for name, label in method_rows(run):
        results = [run["seeds"][s]["results"].get(name) for s in run["seeds"]]
        done = [r for r in results if r is not None]
        cells = [cell([get(r) for r in done], fmt) for _, get, fmt in columns]
        reversal = [r.get("reversal_error_max") for r in done if r.get("reversal")]
        cells.append(MISSING if not reversal else f"{max(reversal):g}")
        cells.append(MISSING if not done else str(sum(r.get("overflow_steps", 0) for r in done)))
        lines.append(f"| {label} | {progress(run, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def walls(run: dict) -> str:
    """The wall time of each seed's last complete run of its models (summary.json; not
    shown where that run reused finished models instead of training them)."""
    parts = [f"seed {s}: {d['wall_seconds'] / 3600:.2f} h" for s, d in run["seeds"].items()
             if d["wall_seconds"] is not None]
    return ("Wall time of each seed's last complete invocation (training, evaluation, "
            "export; a resumed one counts only itself): " + ", ".join(parts)) if parts else ""


def sweep_table(run: dict) -> str:
    winner, rows, complete, seed = sweep(run)
    if not rows:
        return ""
    lines = [f"Dropout sweep (seed {seed}; the lowest best validation loss wins"
             f"{'' if complete else '; not all rates finished yet'}):", "",
             "| entry | dropout (embedding, residual, attention) | best val loss |",
             "|---|---:|---:|"]
    for name, rate, loss in rows:
        mark = " **(winner)**" if name == winner and complete else ""
        lines.append(f"| `{name}` | {rate} | "
                     f"{MISSING if loss is None else f'{loss:.4f}'}{mark} |")
    return "\n".join(lines)


def samples(run: dict, per_method: int = 2) -> str:
    seed = min(run["seeds"])
    lines = [f"Samples (seed {seed}, greedy):", ""]
    for name, label in method_rows(run):
        result = run["seeds"][seed]["results"].get(name)
        if result is None:
            lines.append(f"- {label}: {MISSING}")
            continue
        for sample in result.get("samples", [])[:per_method]:
            given = sample.get("mr", sample.get("prompt", ""))
            lines.append(f"- {label}: `{given}` → {sample['greedy']!r}")
    return "\n".join(lines)


def plot(run: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = [n for n, _ in method_rows(run)]
    names += [n for n in DROPOUT_RATES if n in run["config"]["methods"] and n not in names]
    for i, name in enumerate(names):
        color = f"C{i}"
        curves = {}
        for seed, data in run["seeds"].items():
            points = {r["step"]: r["val_loss"] for r in data["records"]
                      if r.get("model") == display(name) and r.get("kind") == "eval"}
            if points:
                curves[seed] = points
                steps = sorted(points)
                ax.plot(steps, [points[s] for s in steps], color=color, alpha=0.3, lw=0.8)
        if curves:
            steps = sorted(set().union(*curves.values()))
            mean = [np.mean([c[s] for c in curves.values() if s in c]) for s in steps]
            ax.plot(steps, mean, color=color, marker="o", lw=2,
                    label=f"{display(name)} ({len(curves)} seed{'s' * (len(curves) > 1)})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats / target token)")
    ax.set_title("finetune_lm: validation loss (thin: a seed, bold: their mean)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(workdir, out, seeds=None) -> str:
    """Write ``<out>.md`` and ``<out>_val.png``; returns the markdown."""
    run = read_run(pathlib.Path(workdir), seeds)
    finished = sum(len(d["results"]) for d in run["seeds"].values())
    md = "\n\n".join(part for part in (
        f"`{workdir}`, seeds {sorted(run['seeds'])}: {finished} finished model run(s). "
        f"Cells: mean ± std over the finished seeds (\"seeds\": how many); {MISSING}: none "
        f"finished yet. \"step\" and \"training\" are the runs' own clocks: they count any "
        f"time the process was stopped or shared its cores, so compare step times from "
        f"`python -m benchmarks.experiment_step` (all methods side by side) instead.",
        table(run), walls(run), sweep_table(run), samples(run),
        f"![validation loss]({os.path.basename(out)}_val.png)") if part) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    pathlib.Path(f"{out}.md").write_text(md, encoding="utf-8")
    plot(run, f"{out}_val.png")
    return md


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="the --workdir of a finetune_lm run")
    parser.add_argument("--out", default="docs/finetune_report",
                        help="output path without extension (<out>.md, <out>_val.png)")
    parser.add_argument("--seeds", default="",
                        help="comma-separated seeds expected (default: the seed_* folders)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    print(report(args.workdir, args.out, seeds))


if __name__ == "__main__":
    main()

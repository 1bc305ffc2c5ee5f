"""PNG plots of a run (matplotlib, headless Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(curves: dict[str, dict[str, list]], path: str, *, title: str = "") -> None:
    """Training loss (left) and a metric (right: training curve dashed, evaluations as
    markers, same colour per model) against step.

    curves: {model: {"train_step": [...], "train_loss": [...],
             "train_value": [...] (optional, the metric on training batches),
             "eval_step": [...], "eval_value": [...], "eval_label": str,
             "eval_split": str (optional, legend name of the evaluated split; "test")}}.
    """
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    eval_label = "eval"
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        if c.get("train_step"):
            ax_loss.plot(c["train_step"], c["train_loss"], color=color, label=name)
            if c.get("train_value"):
                ax_eval.plot(c["train_step"], c["train_value"], color=color, linestyle="--",
                             alpha=0.7, label=f"{name} (training batches)")
        if c.get("eval_step"):
            ax_eval.plot(c["eval_step"], c["eval_value"], color=color, marker="o",
                         label=f"{name} ({c.get('eval_split', 'test')})")
            eval_label = c.get("eval_label", eval_label)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_eval.set(xlabel="step", ylabel=eval_label, title=eval_label)
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweeps: dict[str, tuple[list, list]], path: str, *, xlabel: str,
               ylabel: str, title: str = "") -> None:
    """One line per model: sweeps = {model: (x values, y values)}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in sweeps.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

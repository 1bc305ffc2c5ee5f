"""The project's PNG plots (matplotlib figures saved without pyplot: no backend, no global
state, and nothing of matplotlib imported until a plot is drawn): every figure of the
experiments and the benchmarks is drawn here.

* ``plot_records`` – curves of a run's ``metrics.jsonl`` records against step, one colour
  per model, in panels described by ``Panel`` / ``Series`` (each experiment declares its
  panels; the trainer draws them).
* ``plot_lines`` – one line per label over a shared x axis (the inference-γ sweep, memory
  against depth).
"""

from __future__ import annotations

import dataclasses


def _figure(figsize):
    # Imported here: matplotlib costs every process that imports the trainer about a second.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


@dataclasses.dataclass(frozen=True)
class Series:
    """One metric of one record kind, drawn for every model.

    kind: the record kind ("train" or "eval"); key: the metric; label: legend suffix
    ("training batches", "test", ...); linestyle, marker, alpha: matplotlib styles.
    """

    kind: str
    key: str
    label: str
    linestyle: str = "-"
    marker: str | None = None
    alpha: float = 1.0


# The series that every task scored by validation loss draws.
MINIBATCH_LOSS = Series("train", "loss", "minibatch", alpha=0.25)
VALIDATION_LOSS = Series("eval", "val_loss", "validation", marker="o")


@dataclasses.dataclass(frozen=True)
class Panel:
    """One subplot: a title, a y label and the series drawn in it."""

    title: str
    ylabel: str
    series: tuple[Series, ...]


def plot_records(records: dict[str, list[dict]], panels: tuple[Panel, ...], path: str, *,
                 title: str = "") -> None:
    """Draw ``panels`` side by side from ``records`` = {model name: its records}; a series
    whose key a model's records lack is left out for that model."""
    fig = _figure(figsize=(5.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, (name, mine) in enumerate(records.items()):
            for s in panel.series:
                points = [(r["step"], r[s.key]) for r in mine
                          if r.get("kind") == s.kind and isinstance(r.get(s.key), (int, float))]
                if points:
                    ax.plot(*zip(*points, strict=True), color=f"C{i}", linestyle=s.linestyle,
                            marker=s.marker, alpha=s.alpha, label=f"{name} ({s.label})")
        ax.set(xlabel="step", ylabel=panel.ylabel, title=panel.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_lines(lines: dict[str, tuple[list, list]], path: str, *, xlabel: str, ylabel: str,
               title: str = "") -> None:
    """One line per label: lines = {label: (x values, y values)}."""
    fig = _figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

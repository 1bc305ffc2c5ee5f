"""The generic training loop: epochs of steps, progress bars, logging, evaluation,
checkpoints, the non-finite policy and deterministic interruption.

The loop knows nothing of models or data: it calls ``step_fn(state, batch) -> (state,
metrics)`` (a compiled train step), ``get_batch(step) -> batch`` (device arrays for global
step ``step``; the data order must be a function of the step, see ``checkpoint``) and
``evaluate(state) -> dict`` (at the end of every ``eval_every_epochs``-th epoch and of the
last epoch).

Metrics are fetched from the device only at logging steps, so steps are dispatched without
waiting for each other; the step time is measured over those windows (evaluation and
checkpointing excluded).

Multi-host: every process runs the loop (the steps are collective); only process 0 prints,
shows progress bars and writes records (``log`` and ``MetricsWriter`` check it).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments.common.checkpoint import Checkpointer
from experiments.common.metrics import MetricsWriter, log
from experiments.common.sharding import is_primary, to_host

NONFINITE_POLICIES = ("stop", "skip")
PROGRESS_MODES = ("auto", "on", "off")


class TrainingInterrupted(RuntimeError):
    """Raised after ``stop_after_steps`` steps, as if the run had been killed there.
    Rerunning the same command resumes from the last checkpoint."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/Inf (or the BDIA stack overflowed its
    fixed-point range, see ``RangeOverflowError``) and ``on_nonfinite`` is "stop"."""


class RangeOverflowError(NonFiniteError):
    """A BDIA stack left the exact range of its fixed-point grid and ``on_nonfinite`` is
    "stop"."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How the loop runs (see the experiment configs' ``train`` section for the meaning).

    num_epochs, steps_per_epoch: the run has num_epochs * steps_per_epoch steps.
    log_every_steps: write a "train" record (means since the last record) every N steps
      and at the end of every epoch.
    eval_every_epochs: evaluate after every N-th epoch (and always after the last).
    stop_after_steps: if > 0, raise ``TrainingInterrupted`` after this global step.
    on_nonfinite: what to do at a step with a non-finite loss/gradient or a fixed-point
      range overflow: "stop" (raise ``NonFiniteError`` / ``RangeOverflowError`` naming the
      step, counted from 1 like checkpoints and records) or "skip" (drop the update, count
      it, go on). Either way a run with skipped updates ends with one warning line.
    progress: "auto" (bars when stderr is a terminal), "on" or "off".
    examples_per_step: global batch size, for examples per second.
    exact_reversal: a non-zero reversal error is a defect worth a warning (BDIA on its
      grid); False for a floating-point reversal (RevViT), whose error is only measured.
    nonfinite_fix, overflow_fix, reversal_fix, skipped_fix: the end of the message at a
      non-finite step, at a range overflow, at an inexact reversal and after a run with
      skipped updates: what the user can change (the trainer names its config flags here;
      the loop knows no config).
    """

    num_epochs: int
    steps_per_epoch: int
    log_every_steps: int
    eval_every_epochs: int
    stop_after_steps: int = 0
    on_nonfinite: str = "stop"
    progress: str = "auto"
    examples_per_step: int = 1
    exact_reversal: bool = True
    nonfinite_fix: str = "Lower the learning rate or clip the gradients."
    overflow_fix: str = "Use fewer fractional bits or a lower learning rate."
    reversal_fix: str = "Use the separate recompute mode or remat."
    skipped_fix: str = "Lower the learning rate or clip the gradients."

    @property
    def num_steps(self) -> int:
        return self.num_epochs * self.steps_per_epoch


@dataclasses.dataclass
class LoopResult:
    """What the loop measured (persisted in the checkpoint record across resumes)."""

    best: float | None = None  # best value of the tracked eval metric
    best_step: int | None = None
    last_eval: dict | None = None
    train_seconds: float = 0.0  # time in timed windows (no eval, no checkpointing)
    timed_steps: int = 0
    max_reversal_error: float = 0.0
    overflow_steps: int = 0
    nonfinite_steps: int = 0
    skipped_steps: int = 0  # updates held back (bad steps; with "stop", also later ones)

    @property
    def step_time_s(self) -> float | None:
        return self.train_seconds / self.timed_steps if self.timed_steps else None

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict | None) -> LoopResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (record or {}).items() if k in fields})


def progress_enabled(mode: str) -> bool:
    if not is_primary():
        return False
    if mode == "on":
        return True
    if mode == "off":
        return False
    return sys.stderr.isatty()


class _StepTimer:
    """Step time over windows of dispatched steps, excluding logging, evaluation and
    checkpointing (the caller closes a window before them and restarts it after)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0

    def close(self, result: LoopResult, wait_for) -> None:
        if self.steps:
            jax.block_until_ready(wait_for)  # the window's last step has finished
            result.train_seconds += time.perf_counter() - self.start
            result.timed_steps += self.steps
            self.steps = 0

    def restart(self) -> None:
        self.start = time.perf_counter()


def _mean_metrics(host_metrics: list[dict]) -> dict:
    """Means of float metrics; for boolean flags the number of steps they were set."""
    out = {}
    for key in host_metrics[0]:
        values = np.asarray([m[key] for m in host_metrics])
        if values.dtype == bool:
            out[f"{key}_steps"] = int(values.sum())
        else:
            out[key] = float(values.astype(np.float64).mean())
    if "reversal_error" in host_metrics[0]:
        # Over the applied steps only: a step that overflowed the grid (or went non-finite)
        # has no exact reversal to check; it is counted in overflow_steps instead.
        out["reversal_error_max"] = max(
            [float(m["reversal_error"]) for m in host_metrics
             if not (m.get("overflow", False) or m.get("nonfinite", False))], default=0.0)
    return out


def _format(metrics: dict, keys=None) -> str:
    keys = keys or sorted(metrics)
    parts = []
    for k in keys:
        if k not in metrics:
            continue
        v = metrics[k]
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


def run_loop(
    *,
    name: str,
    state,
    step_fn: Callable,
    get_batch: Callable[[int], dict],
    settings: LoopSettings,
    checkpointer: Checkpointer,
    writer: MetricsWriter,
    evaluate: Callable[[object], dict],
    best_metric: str,
    best_mode: str = "max",
    result: LoopResult | None = None,
    summary_keys: tuple[str, ...] = ("loss",),
):
    """Train ``state`` from its current step to ``settings.num_steps``.

    Args:
      name: the model's name in records and messages.
      state: a ``TrainState`` on the mesh; its ``step`` says where to start.
      step_fn: compiled ``(state, batch) -> (state, metrics)``; donates ``state``.
      get_batch: ``step -> batch`` (sharded device arrays).
      evaluate: ``state -> {metric: float}``; written as "eval" records.
      best_metric, best_mode: the eval metric whose best value ("max" or "min") is kept.
      result: the ``LoopResult`` restored with the checkpoint (None for a fresh run).
      summary_keys: training metrics shown in the per-epoch line.

    Returns:
      ``(state, LoopResult)``.
    """
    result = result or LoopResult()
    spe = settings.steps_per_epoch
    start = int(to_host(state.step))
    show_bar = progress_enabled(settings.progress)
    better = (lambda a, b: a > b) if best_mode == "max" else (lambda a, b: a < b)

    def check_nonfinite(state, at_step):
        if settings.on_nonfinite != "stop":
            return
        first_nonfinite, first_overflow = (int(v) for v in to_host(
            (state.first_nonfinite_step, state.first_overflow_step)))
        firsts = [s for s in (first_nonfinite, first_overflow) if s >= 0]
        if not firsts:
            return
        first = min(firsts)
        bad = first + 1  # steps count from 1, like checkpoint folders and records
        kept = (f"that update and all later ones were not applied and no checkpoint holds "
                f"them (the newest checkpoint is from step {first} or earlier)")
        if first == first_nonfinite:
            raise NonFiniteError(
                f"[{name}] non-finite loss or gradients at step {bad} (seen by step "
                f"{at_step}); {kept}. {settings.nonfinite_fix}"
            )
        raise RangeOverflowError(
            f"[{name}] fixed-point range overflow at step {bad} (seen by step {at_step}): "
            f"the BDIA residual stream reached the exact range of the grid "
            f"(|x| < 2**(24 - frac_bits) in float32), so the reversal would not be exact; "
            f"{kept}. {settings.overflow_fix}"
        )

    for epoch in range(start // spe, settings.num_epochs):
        first_step = max(start, epoch * spe)
        epoch_end = (epoch + 1) * spe
        bar = tqdm(total=spe, initial=first_step - epoch * spe, disable=not show_bar,
                   desc=f"{name} epoch {epoch + 1}/{settings.num_epochs}", leave=False,
                   dynamic_ncols=True, unit="step")
        pending: list = []  # device metrics since the last "train" record
        epoch_metrics: list[dict] = []
        epoch_clock = time.perf_counter()
        timer = _StepTimer()
        try:
            for step in range(first_step, epoch_end):
                state, metrics = step_fn(state, get_batch(step))
                pending.append(metrics)
                timer.steps += 1
                done = step + 1
                bar.update(1)
                paused = False  # did logging/eval/checkpointing interrupt the timing?

                if done % settings.log_every_steps == 0 or done == epoch_end:
                    timer.close(result, pending[-1])
                    paused = True
                    host = to_host(pending)
                    pending = []
                    epoch_metrics += host
                    means = _mean_metrics(host)
                    reversal_error = means.get("reversal_error_max", 0.0)
                    if (settings.exact_reversal and reversal_error > 0.0
                            and result.max_reversal_error == 0.0):
                        # Not fatal (the gradients are only slightly off), but never silent.
                        log(f"[{name}] WARNING: the reversible backward pass did not rebuild "
                            f"the states exactly by step {done} (reversal error "
                            f"{reversal_error:.3g}, on a step within the grid's range), so "
                            f"the BDIA gradients are off. {settings.reversal_fix}")
                    result.max_reversal_error = max(result.max_reversal_error, reversal_error)
                    result.overflow_steps += means.get("overflow_steps", 0)
                    result.nonfinite_steps += means.get("nonfinite_steps", 0)
                    result.skipped_steps += means.get("skipped_steps", 0)
                    writer.write({"model": name, "kind": "train", "step": done,
                                  "epoch": done / spe, **means})
                    bar.set_postfix_str(_format(means, summary_keys))
                    check_nonfinite(state, done)

                if done == epoch_end:
                    if (epoch + 1) % settings.eval_every_epochs == 0 or (
                        epoch + 1 == settings.num_epochs
                    ):
                        evaluation = evaluate(state)
                        writer.write({"model": name, "kind": "eval", "step": done,
                                      "epoch": epoch + 1, **evaluation})
                        value = evaluation[best_metric]
                        if result.best is None or better(value, result.best):
                            result.best, result.best_step = value, done
                        result.last_eval = evaluation
                        eval_text = f" | eval {_format(evaluation)} (best {result.best:.4g})"
                    else:
                        eval_text = ""
                    train_means = _mean_metrics(epoch_metrics) if epoch_metrics else {}
                    throughput = (settings.examples_per_step * result.timed_steps
                                  / max(result.train_seconds, 1e-9))
                    log(f"[{name}] epoch {epoch + 1}/{settings.num_epochs} step {done}: "
                        f"train {_format(train_means, summary_keys)}{eval_text} | "
                        f"{throughput:.1f} ex/s | "
                        f"{time.perf_counter() - epoch_clock:.1f}s")

                if checkpointer.is_due(done) or done == epoch_end:
                    timer.close(result, state.step)
                    paused = True
                    check_nonfinite(state, done)
                    checkpointer.save(done, state, {"loop": result.to_record()})

                if paused:
                    timer.restart()

                if settings.stop_after_steps and done == settings.stop_after_steps:
                    checkpointer.wait()
                    raise TrainingInterrupted(
                        f"[{name}] stopped after step {done} (train.stop_after_steps); rerun "
                        f"the same command to resume from the last checkpoint."
                    )
        finally:
            bar.close()
    if result.skipped_steps:
        # One line per model at the end: these updates were never applied.
        log(f"[{name}] WARNING: {result.skipped_steps} of {settings.num_steps} updates were "
            f"skipped (non-finite: {result.nonfinite_steps}, range overflow: "
            f"{result.overflow_steps}); the model trained on the others only, so its "
            f"figures do not describe a full run. {settings.skipped_fix}")
    return state, result

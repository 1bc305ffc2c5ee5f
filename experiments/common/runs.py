"""Run helpers shared by the experiments (ViT/CIFAR-10, translation, language model):
which models a mode trains, the resume-config check, the summary's memory record and the
side-by-side table of the text experiments."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import ml_collections

from experiments.common import config as config_lib
from experiments.common import metrics


def models_for_mode(mode: str) -> list[str]:
    """"compare" → both updates (standard first), else just the one named."""
    return ["standard", "bdia"] if mode == "compare" else [mode]


def check_resume_config(
    config: ml_collections.ConfigDict, workdir: str, *, resumable: Iterable[str]
) -> None:
    """Records the config in ``workdir/config.json``; if one is there already (a resumed
    run), raises ``ConfigError`` naming the fields that changed, apart from ``resumable``."""
    path = os.path.join(workdir, "config.json")
    new = config_lib.to_dict(config)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = config_lib.diff_fields(old, new, ignore=resumable)
        if changed:
            raise config_lib.ConfigError(
                f"{workdir} holds a run with a different config (fields: {', '.join(changed)}); "
                "resume with the same settings or use a new --workdir."
            )
    metrics.write_json(path, new)


def memory_record(compiled_mem: dict | None, device_mem: dict | None) -> dict:
    """The "memory" entry of a model's summary (see experiments.common.memory)."""
    return {
        "compiled": compiled_mem,
        "compiled_note": "per device, from the compiled train step's memory_analysis(); "
        "peak_estimate = argument + output + temp - alias",
        "device": device_mem,
        "device_note": None
        if device_mem is None
        else "memory_stats() process-lifetime peak; in compare mode the later model's "
        "peak includes the earlier one's",
    }


def format_table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A plain side-by-side table: a label column, then one column per model."""
    lines = [f"{'':<34}" + "".join(f"{h:>20}" for h in header)]
    lines += [f"{label:<34}" + "".join(f"{v:>20}" for v in values) for label, values in rows]
    return "\n".join(lines)


def run_experiment(
    name: str,
    train_and_evaluate: Callable[[ml_collections.ConfigDict, str], dict],
    *,
    presets: Iterable[str],
    data_dir_help: str,
    set_data_dir: Callable[[ml_collections.ConfigDict, str], None],
    errors: tuple[type[BaseException], ...],
) -> None:
    """The command line of ``python -m experiments.<name>``.

    Flags: ``--config`` (``experiments/configs/<name>.py:<preset>``, fields overridable as
    ``--config.<field>=<value>``), ``--workdir`` (default ``runs/<name>_<preset>``; rerun to
    resume) and ``--data_dir`` (given to ``set_data_dir``). ``errors`` (bad config, missing
    data, ...) and an interruption end the run with one line instead of a traceback.
    """
    import os

    from absl import flags, logging
    from ml_collections import config_flags

    from experiments.common.loop import TrainingInterrupted
    from experiments.common.workdir import WorkdirError, claimed_workdir

    def define_flags() -> None:
        default = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                               f"{name}.py") + ":quick"
        config_flags.DEFINE_config_file(
            "config", default,
            f"experiments/configs/{name}.py:<{'|'.join(presets)}>; override fields with "
            "--config.<field>=<value>.")
        flags.DEFINE_string("workdir", None,
                            f"output folder (default: runs/{name}_<preset>); rerun to resume.")
        flags.DEFINE_string("data_dir", None, data_dir_help)

    def main(argv) -> None:
        del argv
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # keep library INFO chatter off the console
        config = flags.FLAGS.config
        if flags.FLAGS.data_dir:
            set_data_dir(config, flags.FLAGS.data_dir)
        try:
            config_lib.check_train_examples(config)
            default = os.path.join("runs", f"{name}_{config.preset}")
            with claimed_workdir(flags.FLAGS.workdir, default, config) as workdir:
                train_and_evaluate(config, workdir)
        except (*errors, WorkdirError) as error:
            raise SystemExit(f"error: {error}") from None
        except TrainingInterrupted as stop:
            raise SystemExit(str(stop)) from None

    config_lib.run_app(define_flags, main)

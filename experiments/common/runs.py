"""The command line of the experiments (``python -m experiments.<name>``) and the
workdir's config record (``config.json``: a resumed run must be the same run)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import ml_collections

from experiments.common import config as config_lib
from experiments.common import metrics


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
    import sys

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
        for flag in ("config", "workdir", "data_dir"):  # listed by --help (the main module's)
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag])

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

"""The command line of the experiments (``python -m experiments.<name>``), the workdir's
config record (``config.json``: a resumed run must be the same run) and the config
fingerprint that every result and checkpoint carries (``run_config``, ``fingerprint``)."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable

import ml_collections

from experiments.common import config as config_lib
from experiments.common import metrics


def run_config(config: ml_collections.ConfigDict, model: str, *,
               resumable: Iterable[str]) -> dict:
    """The fields of ``config`` that one model's training depends on, as a plain dict:
    every field but the ``eval`` section, the ``resumable`` ones (they do not change the
    run), ``seeds`` (a run of several seeds trains each seed with its own ``seed``) and the
    ``methods`` entries of the other models. Its ``fingerprint`` is stored with every
    checkpoint and result of ``model``, and compared before either is reused."""
    record = config_lib.to_dict(config)
    record.pop("eval", None)
    record.pop("seeds", None)
    record["methods"] = {model: record.get("methods", {}).get(model)}
    for dotted in resumable:
        *parents, leaf = dotted.split(".")
        section = record
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(leaf, None)
    return record


def fingerprint(record: dict) -> str:
    """A short hash of a plain (JSON) dict, independent of key order."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_fields(recorded: dict | None, current: dict) -> list[str]:
    """Dotted names of the fields where two ``run_config`` records differ (["<none>"] when
    there is no record: written before results carried their config)."""
    if not isinstance(recorded, dict):
        return ["<none>"]
    return config_lib.diff_fields(recorded, current)


def describe_change(recorded: dict | None, current: dict, limit: int = 3) -> str:
    """"model.width 32 -> 64, ..." for the first ``limit`` changed fields."""
    names = changed_fields(recorded, current)
    if names == ["<none>"]:
        return "it records no config: written by an older version"

    def value(record, dotted):
        for part in dotted.split("."):
            if not isinstance(record, dict) or part not in record:
                return "<missing>"
            record = record[part]
        return record

    parts = [f"{name} {value(recorded, name)!r} -> {value(current, name)!r}"
             for name in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(parts) + more


def trained_anything(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint step or a result of any model (also under
    ``seed_<s>/``): a run whose config.json must then be respected. A run that stopped
    before its first checkpoint (a bad batch size, missing data) left neither."""
    for base in (workdir, *glob.glob(os.path.join(workdir, "seed_*"))):
        ckpts = os.path.join(base, "checkpoints")
        if glob.glob(os.path.join(ckpts, "*_result.json")):
            return True
        if any(name.isdigit() for model in glob.glob(os.path.join(ckpts, "*"))
               if os.path.isdir(model) for name in os.listdir(model)):
            return True
    return False


def check_resume_config(
    config: ml_collections.ConfigDict, workdir: str, *, resumable: Iterable[str]
) -> None:
    """Records the config in ``workdir/config.json``; if one is there already and the
    workdir holds a trained checkpoint or result (a resumed run), raises ``ConfigError``
    naming the fields that changed, apart from ``resumable``. A config.json of a run that
    trained nothing (it stopped before its first checkpoint) is replaced: the corrected
    rerun that its error message advised proceeds in the same workdir."""
    path = os.path.join(workdir, "config.json")
    new = config_lib.to_dict(config)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = config_lib.diff_fields(old, new, ignore=resumable)
        if changed and trained_anything(workdir):
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
        try:
            config_lib.check_experiment_config(config, name)  # before any field is read
            if flags.FLAGS.data_dir:
                set_data_dir(config, flags.FLAGS.data_dir)
            config_lib.check_train_examples(config)
            default = os.path.join("runs", f"{name}_{config.preset}")
            with claimed_workdir(flags.FLAGS.workdir, default, config) as workdir:
                train_and_evaluate(config, workdir)
        except (*errors, WorkdirError) as error:
            raise SystemExit(f"error: {error}") from None
        except TrainingInterrupted as stop:
            raise SystemExit(str(stop)) from None
        except OSError as error:  # a full disk under metrics.jsonl, summary.json, ...
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise SystemExit(
                f"error: cannot write {error.filename or 'to the workdir'}: "
                f"{error.strerror}; free some space (or pass another --workdir) and rerun "
                f"the same command to resume") from None

    config_lib.run_app(define_flags, main)

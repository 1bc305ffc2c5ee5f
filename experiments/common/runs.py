"""The command line of the experiments (``python -m experiments.<name>``), the workdir's
config record (``config.json``: a resumed run must be the same run), the config
fingerprint that every result and checkpoint carries (``run_config``, ``fingerprint``) and
a run's records without its checkpoints (``save_records`` / ``restore_records``: what a run
carries from one machine to the next)."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable

import ml_collections

from experiments.common import config as config_lib
from experiments.common import metrics

# Where a checkpoint or a result stores its run config and that config's fingerprint.
CONFIG_KEY, CONFIG_FINGERPRINT_KEY = "run_config", "config_fingerprint"


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


# The files of a run folder (the workdir, each seed_<s>) that describe what it trained and
# measured, without the checkpoints: together a few hundred kB, where one full fine-tuning
# checkpoint is GBs. Plus each finished model's checkpoints/<name>_result.json.
RECORD_FILES = ("config.json", "metrics.jsonl", "summary.json")


class RecordsError(ValueError):
    """Records that would mix two runs, or lose a finished model."""


def _run_folders(root: str) -> list[str]:
    """The run folders under ``root``, relative: "." and every seed_<s>."""
    seeds = sorted(name for name in os.listdir(root) if name.startswith("seed_")
                   and name[5:].isdigit() and os.path.isdir(os.path.join(root, name)))
    return [".", *seeds]


def _results(folder: str) -> dict[str, str]:
    """{model name: path} of the finished models' result records in a run folder."""
    paths = glob.glob(os.path.join(folder, "checkpoints", "*_result.json"))
    return {os.path.basename(p)[:-len("_result.json")]: p for p in paths}


def _check_same_run(a: str, b: str, resumable: Iterable[str]) -> None:
    """Raises ``RecordsError`` when the config.json of run folders ``a`` and ``b`` (both
    present) differ outside ``resumable``."""
    paths = [os.path.join(folder, "config.json") for folder in (a, b)]
    if not all(os.path.isfile(p) for p in paths):
        return
    old, new = (_read_json(p) for p in paths)
    changed = config_lib.diff_fields(old, new, ignore=resumable)
    if changed:
        raise RecordsError(f"{paths[0]} and {paths[1]} are different runs (fields: "
                           f"{', '.join(changed[:5])}); keep each run's records in a folder "
                           f"of its own")


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _fingerprint(path: str) -> str | None:
    return _read_json(path).get(CONFIG_FINGERPRINT_KEY)


def _record_pairs(src: str, dst: str) -> list[tuple[str, str]]:
    """(source, target) paths of the records in run folder ``src``, mirrored under ``dst``."""
    pairs = [(os.path.join(src, f), os.path.join(dst, f)) for f in RECORD_FILES]
    pairs += [(p, os.path.join(dst, "checkpoints", os.path.basename(p)))
              for p in _results(src).values()]
    return [(a, b) for a, b in pairs if os.path.isfile(a)]


def _copy_all(pairs: list[tuple[str, str]]) -> list[str]:
    """Copy every (source, target) pair, after all the checks passed: nothing is written
    unless all of it can be."""
    for a, b in pairs:
        os.makedirs(os.path.dirname(b), exist_ok=True)
        shutil.copyfile(a, b)
    return [b for _, b in pairs]


def save_records(workdir: str, dest: str, *, resumable: Iterable[str]) -> list[str]:
    """Copy the records of the run in ``workdir`` (``RECORD_FILES`` of it and of every
    seed_<s>, and each finished model's ``checkpoints/<name>_result.json``; no checkpoint)
    into ``dest``, which mirrors the workdir's layout; returns the written paths.

    ``dest`` may hold records saved before: ``workdir`` must then be the same run
    (config.json equal outside ``resumable``) and hold every finished model of ``dest``
    (restore ``dest`` into it first, ``restore_records``), trained with the same config
    (the result's fingerprint), so that nothing finished is lost. Raises ``RecordsError``.
    """
    resumable = tuple(resumable)
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise RecordsError(f"{workdir} holds no config.json: pass the --workdir of a run")
    pairs = []
    for rel in _run_folders(workdir):
        src, out = os.path.join(workdir, rel), os.path.join(dest, rel)
        _check_same_run(out, src, resumable)
        ours = _results(src)
        for name, kept in _results(out).items():
            if name not in ours:
                raise RecordsError(f"{kept} is a finished model that {src} lacks; restore "
                                   f"the records into the workdir first (restore_records) "
                                   f"and rerun there")
            if _fingerprint(kept) != _fingerprint(ours[name]):
                raise RecordsError(f"{kept} and {ours[name]} were trained with different "
                                   f"configs; keep each run's records in a folder of its own")
        pairs += _record_pairs(src, out)
    return _copy_all(pairs)


def restore_records(src: str, workdir: str, *, resumable: Iterable[str]) -> list[str]:
    """The inverse of ``save_records``: copy the records in ``src`` into ``workdir``, so that
    rerunning the run's command there reuses every finished model (its result, by the
    config fingerprint) and retrains only the others; returns the written paths.

    A run folder of ``workdir`` may already hold records only if they are the same as
    ``src``'s (a restore done before) or ``src`` has none there: records are never merged
    line by line. Raises ``RecordsError``.
    """
    resumable = tuple(resumable)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise RecordsError(f"{src} holds no config.json: pass a folder written by save_records")
    pairs = []
    for rel in _run_folders(src):
        folder, target = os.path.join(src, rel), os.path.join(workdir, rel)
        _check_same_run(folder, target, resumable)
        for a, b in _record_pairs(folder, target):
            if not os.path.exists(b):
                pairs.append((a, b))
            elif not b.endswith(("config.json", "summary.json")) and not _same_bytes(a, b):
                raise RecordsError(f"{b} already holds other records than {a}; restore into "
                                   f"a new --workdir")
    return _copy_all(pairs)


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as f, open(b, "rb") as g:
        return f.read() == g.read()


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

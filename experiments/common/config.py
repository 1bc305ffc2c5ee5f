"""Config helpers: up-front validation with one clear line per bad field, and plain-dict
records of a config (for ``summary.json`` and for checking that a resumed run is the same
run)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterable
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config field has a bad value. The message has one line per bad field."""


class Checks:
    """Collects config problems so the user sees all of them at once.

    Usage::

        checks = Checks()
        checks.require(cfg.depth >= 1, "model.depth", f"must be >= 1, got {cfg.depth}")
        checks.raise_if_any()
    """

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.fields: set[str] = set()  # the fields with a problem (dotted, as in require)

    def require(self, ok: bool, field: str, message: str) -> bool:
        if not ok:
            self.problems.append(f"  --config.{field}: {message}")
            self.fields.add(field)
        return bool(ok)

    def one_of(self, value: Any, allowed: Iterable[Any], field: str) -> bool:
        allowed = tuple(allowed)
        return self.require(value in allowed, field, f"must be one of {allowed}, got {value!r}")

    def int_at_least(self, value: Any, field: str, low: int = 1, note: str = "") -> bool:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        return self.require(ok, field, f"must be an int >= {low}{note}, got {value!r}")

    def fraction(self, value: Any, field: str) -> bool:
        """A rate in [0, 1) (dropout, label smoothing)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
        return self.require(ok, field, f"must be in [0, 1), got {value!r}")

    def unit_interval(self, value: Any, field: str, *, include_one: bool = False) -> bool:
        """A share in (0, 1), or in (0, 1] with include_one (a fraction of the data)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            0 < value <= 1 if include_one else 0 < value < 1)
        return self.require(ok, field, f"must be in (0, 1{']' if include_one else ')'}, "
                                       f"got {value!r}")

    def positive(self, value: Any, field: str, *, allow_zero: bool = False) -> bool:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value >= 0 if allow_zero else value > 0
        )
        bound = ">= 0" if allow_zero else "> 0"
        return self.require(ok, field, f"must be a number {bound}, got {value!r}")

    def raise_if_any(self, what: str = "config") -> None:
        if self.problems:
            raise ConfigError(
                f"invalid {what} ({len(self.problems)} problem"
                f"{'s' if len(self.problems) > 1 else ''}):\n" + "\n".join(self.problems)
            )


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-serialisable plain dict of ``config`` (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def diff_fields(old: dict, new: dict, *, ignore: Iterable[str] = (), prefix: str = "") -> list:
    """Dotted names of the fields that differ between two plain config dicts."""
    ignore = set(ignore)
    names = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in ignore:
            continue
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        # A section that one side lacks (e.g. added to the configs since the old run)
        # compares field by field, so that ignorable fields stay ignorable.
        if isinstance(a, dict) and b == "<missing>":
            b = {}
        if isinstance(b, dict) and a == "<missing>":
            a = {}
        if isinstance(a, dict) and isinstance(b, dict):
            names += diff_fields(a, b, ignore=ignore, prefix=f"{name}.")
        elif a != b:
            names.append(name)
    return names


# --------------------------------------------------------------------------- command line


def run_app(define_flags, main) -> None:
    """``absl.app.run(main)`` after ``define_flags()``, ending a bad command line with one
    clear line (see ``parse_flags``). ``DEFINE_config_file`` already reads ``sys.argv``
    when it is defined, so an unknown ``--config.<field>`` surfaces there."""
    import sys

    from absl import app

    try:
        define_flags()
    except (AttributeError, KeyError) as error:
        raise SystemExit(f"error: {_unknown_field_line(error, sys.argv)}") from None
    signal.signal(signal.SIGTERM, _on_sigterm)  # a scheduler's stop: like a Ctrl-C
    signal.signal(signal.SIGINT, on_sigint)
    try:
        app.run(main, flags_parser=parse_flags)
    except Terminated:
        print("\nterminated (SIGTERM); rerun the same command to resume from the last "
              "checkpoint", file=sys.stderr)
        raise SystemExit(EXIT_TERMINATED) from None
    except KeyboardInterrupt:
        # Checkpoints are written atomically, so whatever was saved is intact.
        print("\ninterrupted (Ctrl-C); rerun the same command to resume from the last "
              "checkpoint", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except SystemExit as stop:
        # absl ends --help (and --helpshort, --helpfull) with status 1; asking for help is
        # not an error.
        if stop.code == 1 and any(arg.split("=")[0] in HELP_FLAGS for arg in sys.argv[1:]):
            raise SystemExit(0) from None
        raise


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
EXIT_TERMINATED = 143  # 128 + SIGTERM
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler or ``kill``): unwinds like a Ctrl-C, so the workdir
    lock is released and checkpoint writes in flight finish first (``checkpoint``)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def on_sigint(signum, frame) -> None:
    """Ctrl-C, as Python's own handler. Installed because ``asyncio.run`` (Orbax runs it on
    the main thread) swaps Python's handler for one that only cancels its coroutine, and the
    interrupt is lost when the coroutine finishes anyway; asyncio leaves other handlers be."""
    raise KeyboardInterrupt


def parse_flags(argv: list[str], flag_values=None) -> list[str]:
    """absl flag parsing that ends a bad command line with one clear line, not a trace.

    Use as ``app.run(main, flags_parser=config.parse_flags)``. Covers: an unknown preset
    (``get_config`` raises inside the config-file flag), a value of the wrong type, an
    unknown ``--config.<field>``, a config file that cannot be loaded. ``flag_values``:
    absl's global ``FLAGS`` unless given.
    """
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    try:
        rest = flag_values(argv)
        _check_config_files_loaded(flag_values)
        return rest
    except flags.Error as error:
        raise SystemExit(f"error: {_flag_error_line(str(error))}\n"
                         f"Pass --helpshort or --helpfull to see help on flags.") from None
    except (AttributeError, KeyError) as error:
        raise SystemExit(f"error: {_unknown_field_line(error, argv)}") from None
    except SyntaxError as error:  # in the config file itself
        raise SystemExit(f"error: the config file {error.filename} does not parse as Python "
                         f"(line {error.lineno}: {error.msg}); fix it") from None
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: bad command-line value: {' '.join(str(error).split())}"
                         ) from None


def _check_config_files_loaded(flag_values) -> None:
    """ml_collections keeps a config file that fails to load (missing, not Python) as a
    stand-in that raises on first use, deep inside the run; fail here instead."""
    from ml_collections import config_flags

    for name in flag_values:
        flag = flag_values[name]
        try:
            filename = config_flags.get_config_filename(flag)
        except TypeError:
            continue  # not a config-file flag
        try:
            getattr(flag.value, "keys", None)
        except OSError as error:
            cause = error.__cause__ or error
            lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
            why = lines[-1] if lines else type(cause).__name__
            raise SystemExit(
                f"error: --{name}: cannot load the config file {filename} ({why}); pass "
                f"--{name}=experiments/configs/<experiment>.py:<preset>") from None


def check_experiment_config(config, name: str) -> None:
    """Raise ``ConfigError`` (one line) when ``config`` lacks fields of experiment ``name``'s
    own config (``experiments/configs/<name>.py``): the config file of another experiment
    was passed. The ``methods`` entries are the user's to choose, so they are not
    compared."""
    import importlib

    reference = to_dict(importlib.import_module(f"experiments.configs.{name}").get_config())
    given = to_dict(config)
    reference.pop("methods", None)

    def missing(ref: dict, have, prefix: str = "") -> list[str]:
        out = []
        for key, value in ref.items():
            if not isinstance(have, dict) or key not in have:
                out.append(f"{prefix}{key}")
            elif isinstance(value, dict):
                out += missing(value, have[key], f"{prefix}{key}.")
        return out

    lacking = missing(reference, given)
    if lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        raise ConfigError(
            f"--config is not a {name} config: it lacks {', '.join(lacking[:3])}{more}; "
            f"pass --config=experiments/configs/{name}.py:<preset>")


def check_train_examples(config) -> None:
    """Raise ``ConfigError`` when ``data.num_train_examples`` (if set, > 0) is smaller than
    one ``train.batch_size`` batch: every epoch would have no step. Checked from the config
    alone, before any data is loaded."""
    data, train = config.get("data"), config.get("train")
    if data is None or train is None:
        return
    examples, batch = data.get("num_train_examples"), train.get("batch_size")
    if (isinstance(examples, int) and isinstance(batch, int) and not isinstance(examples, bool)
            and 0 < examples < batch):
        raise ConfigError(
            f"--config.data.num_train_examples={examples} is smaller than one batch "
            f"(--config.train.batch_size={batch}), so no training step could run; use at "
            f"least {batch} examples or a smaller batch")


def _flag_error_line(text: str) -> str:
    """``flag --config=...: Error whilst parsing config file: <traceback>`` -> the flag and
    the exception's own message on one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "bad command line"
    head = lines[0].split(": Error whilst parsing")[0].rstrip(":")
    if len(lines) == 1:
        return head
    last = lines[-1]
    for line in reversed(lines):  # the exception line ends the embedded traceback
        if not line.startswith(("File ", "^", "~", "Pass --help")):
            last = line
            break
    return f"{head}: {last}"


def _unknown_field_line(error: BaseException, argv: list[str]) -> str:
    # ml_collections: AttributeError(KeyError("'<key>'\nDid you mean ...?"))
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    first, _, rest = text.partition("\n")
    key = first.strip().strip("'\"")
    hint = " ".join(rest.split())
    culprit = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
               and (a.split("=")[0].endswith(f".{key}") or f".{key}." in a.split("=")[0])]
    where = culprit[0] if culprit else "a --config.<field> flag"
    return (f"{where}: {key!r} is not a config field" + (f"; {hint}" if hint else "")
            + " (see the config file for the fields)")

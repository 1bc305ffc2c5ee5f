"""Config helpers: up-front validation with one clear line per bad field, and plain-dict
records of a config (for ``summary.json`` and for checking that a resumed run is the same
run)."""

from __future__ import annotations

import json
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

    def require(self, ok: bool, field: str, message: str) -> bool:
        if not ok:
            self.problems.append(f"  --config.{field}: {message}")
        return bool(ok)

    def one_of(self, value: Any, allowed: Iterable[Any], field: str) -> bool:
        allowed = tuple(allowed)
        return self.require(value in allowed, field, f"must be one of {allowed}, got {value!r}")

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

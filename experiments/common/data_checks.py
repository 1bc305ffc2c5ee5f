"""Checks of the TFDS data settings the experiments share (one line per bad field)."""

from __future__ import annotations

import difflib
import os

from experiments.common.config import Checks


def check_tfds_name(name, field: str, checks: Checks, *, example: str, kind: str) -> None:
    """``name`` must be a TFDS dataset (optionally ``name/config:version``)."""
    if not checks.require(isinstance(name, str) and bool(name), field,
                          f"must name a TFDS {kind} such as {example!r}, got {name!r}"):
        return
    import tensorflow_datasets as tfds

    known = tfds.list_builders(with_community_datasets=False)
    base = name.split(":")[0].split("/")[0]
    close = difflib.get_close_matches(base, known, n=3)
    checks.require(base in known, field,
                   f"unknown TFDS dataset {name!r}; use one such as {example!r}"
                   + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))


def check_tfds_split(split, field: str, checks: Checks) -> None:
    """``split`` must be a non-empty TFDS split string (TFDS parses it when reading)."""
    checks.require(isinstance(split, str) and bool(split), field,
                   f"must name a TFDS split such as 'train' or 'test[:50%]', got {split!r}")


def check_tfds_data_dir(data_dir, field: str, checks: Checks) -> None:
    """``data_dir`` ("" = $TFDS_DATA_DIR) must be an existing folder (gs://... and other
    remote paths are TFDS's to read)."""
    env = os.environ.get("TFDS_DATA_DIR")
    if data_dir and "://" not in data_dir:
        checks.require(os.path.isdir(data_dir), field,
                       f"must be an existing folder of prepared TFDS datasets (or \"\" for "
                       f"$TFDS_DATA_DIR); {data_dir!r} does not exist")
    elif not data_dir and env and "://" not in env:
        checks.require(os.path.isdir(env), field,
                       f"is empty, so $TFDS_DATA_DIR is used, but {env!r} does not exist; fix "
                       f"TFDS_DATA_DIR or pass --data_dir")

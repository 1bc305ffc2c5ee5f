"""Aligned parallel text: line-per-sentence files (plain or gzip'd) and TFDS translation sets.

File layout: a split is a *prefix*; its two sides are ``{prefix}.{lang}`` or
``{prefix}.{lang}.gz`` (Multi30k's ``train.en.gz`` / ``train.fr.gz``), one sentence per
line, line i of one side the translation of line i of the other.

Input policy (tested in tests/test_text_data.py):
  * Line endings: lines are split on ``\\n`` only; surrounding whitespace (including a
    ``\\r`` from CRLF files) is stripped from every sentence.
  * Unequal line counts: a ``TextDataError`` naming both files and both counts.
  * Empty lines: a pair where EITHER side is empty (after stripping) is dropped, and the
    number of dropped pairs is reported in ``ParallelCorpus.num_dropped_empty``. A split
    with no non-empty pair left is an error.
  * Non-UTF-8 bytes: a ``TextDataError`` naming the file, the 1-based line number and the
    byte offset; nothing is silently replaced.
  * Missing files: ``FileNotFoundError`` naming every path tried and the config field to fix.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Sequence


class TextDataError(ValueError):
    """Malformed text input (bad encoding, misaligned files, empty data)."""


@dataclasses.dataclass(frozen=True)
class ParallelCorpus:
    """One split of aligned sentence pairs.

    src, tgt:          equally long lists of non-empty, whitespace-stripped sentences.
    num_dropped_empty: pairs dropped because one side (or both) was empty.
    source:            where the pairs came from (file paths or a TFDS name), for logs.
    """

    src: list[str]
    tgt: list[str]
    num_dropped_empty: int
    source: str

    def __len__(self) -> int:
        return len(self.src)


def resolve_text_file(prefix: str, lang: str, *, what: str = "data.prefix") -> str:
    """Returns the existing file for ``{prefix}.{lang}``: the plain file, else the ``.gz`` one.

    Raises FileNotFoundError naming both paths tried and ``what`` (the config field to fix).
    """
    candidates = [f"{prefix}.{lang}", f"{prefix}.{lang}.gz"]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"No text file for language {lang!r} at prefix {prefix!r}: tried "
        + " and ".join(repr(os.path.abspath(p)) for p in candidates)
        + f". Set {what} to the right directory/prefix (one sentence per line, "
        "plain or gzip'd), or fetch the data first."
    )


def read_lines(path: str) -> list[str]:
    """Reads a plain or gzip'd (by ``.gz`` suffix) UTF-8 text file into stripped lines.

    Every line is kept (empty ones included), so line numbers stay aligned with the file.
    Raises TextDataError on non-UTF-8 bytes (naming file, line, byte offset) or a corrupt
    gzip stream.
    """
    opener = gzip.open if path.endswith(".gz") else open
    lines: list[str] = []
    try:
        with opener(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                try:
                    lines.append(raw.decode("utf-8").strip())
                except UnicodeDecodeError as err:
                    raise TextDataError(
                        f"{path}: line {line_number} is not valid UTF-8 (byte {err.start} of "
                        f"the line: {raw[err.start : err.start + 4]!r}). Re-encode the file as "
                        "UTF-8, e.g. `iconv -f latin1 -t utf-8`."
                    ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise TextDataError(
            f"{path}: not a readable gzip file ({err}). Re-create it, or drop the .gz "
            "suffix if it is plain text."
        ) from None
    return lines


def _drop_empty_pairs(src: Sequence[str], tgt: Sequence[str], source: str) -> ParallelCorpus:
    keep = [i for i, (s, t) in enumerate(zip(src, tgt, strict=True)) if s and t]
    if not keep:
        raise TextDataError(
            f"{source}: no sentence pair has text on both sides ({len(src)} lines). "
            "Point the config at a non-empty corpus."
        )
    return ParallelCorpus(
        src=[src[i] for i in keep],
        tgt=[tgt[i] for i in keep],
        num_dropped_empty=len(src) - len(keep),
        source=source,
    )


def read_parallel(
    prefix: str, src_lang: str, tgt_lang: str, *, what: str = "data.prefix"
) -> ParallelCorpus:
    """Reads the aligned split ``{prefix}.{src_lang}[.gz]`` / ``{prefix}.{tgt_lang}[.gz]``.

    Applies the module's input policy (see the module docstring). ``what`` names the config
    field holding the prefix, for error messages.
    """
    src_path = resolve_text_file(prefix, src_lang, what=what)
    tgt_path = resolve_text_file(prefix, tgt_lang, what=what)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise TextDataError(
            f"Parallel files are not aligned: {src_path} has {len(src)} lines but "
            f"{tgt_path} has {len(tgt)}. Each line must hold one sentence and its translation "
            "must be on the same line of the other file."
        )
    return _drop_empty_pairs(src, tgt, f"{src_path} | {tgt_path}")


def _decode_tfds_text(value, *, source: str, index: int, lang: str) -> str:
    if isinstance(value, str):
        return value.strip()
    try:
        return bytes(value).decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise TextDataError(
            f"{source}: example {index}, field {lang!r} is not valid UTF-8 (byte {err.start})."
        ) from None


def read_tfds_parallel(
    name: str,
    split: str,
    src_lang: str,
    tgt_lang: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    max_examples: int | None = None,
) -> ParallelCorpus:
    """Reads a TFDS translation dataset (e.g. ``wmt14_translate/fr-en``) with ``tfds.data_source``.

    Each example must be a dict with one text feature per language (TFDS's translation
    datasets are). ``download=True`` lets TFDS download and prepare the dataset on first use
    (needs network access and TensorFlow); a dataset that is neither prepared nor obtainable
    raises a one-line ``DataMissingError`` (a FileNotFoundError) that says how to provide it.
    ``max_examples`` keeps the first n examples. The empty-pair policy of ``read_parallel``
    applies.
    """
    from experiments.common import tfds_download  # local: only this optional path needs TFDS

    source = f"tfds:{name}[{split}]"
    data = tfds_download.open_source(name, split, data_dir=data_dir, download=download,
                                     data_dir_setting="--config.data.tfds_data_dir",
                                     download_setting="--config.data.tfds_download",
                                     alternative="leave --config.data.tfds_name empty and set "
                                                 "--config.data.dir to a folder of text files")
    count = len(data) if max_examples is None else min(len(data), max_examples)
    src, tgt = [], []
    for i in range(count):
        example = data[i]
        missing = [lang for lang in (src_lang, tgt_lang) if lang not in example]
        if missing:
            raise TextDataError(
                f"{source}: examples have fields {sorted(example)}, not {missing}. "
                "Set the config's src_lang/tgt_lang to the dataset's language codes."
            )
        src.append(_decode_tfds_text(example[src_lang], source=source, index=i, lang=src_lang))
        tgt.append(_decode_tfds_text(example[tgt_lang], source=source, index=i, lang=tgt_lang))
    return _drop_empty_pairs(src, tgt, source)

"""Plain text as language-model rows in a pretrained checkpoint's tokenizer (fine-tuning on
a text such as tiny_shakespeare, ``experiments.finetune_lm`` with ``data.format="text"``).

A source is ``"tfds:<name>"`` (the ``text`` feature of the TFDS dataset's train / validation /
test splits, read without TensorFlow) or a UTF-8 file (its first 80 % of the characters
train, the next 10 % validation, the last 10 % test). A split is tokenized as a whole and
cut into consecutive rows of ``max_len + 1`` tokens (the last, shorter piece dropped); every
token of a row but the first is a target.
"""

from __future__ import annotations

import numpy as np

from experiments.data.text import char_lm, e2e
from experiments.data.text.parallel import TextDataError

SPLITS = ("train", "validation", "test")
TFDS_PREFIX = "tfds:"
FILE_FRACTIONS = (0.8, 0.1, 0.1)  # train / validation / test shares of a file's characters


def read_text_splits(source: str, *, tfds_data_dir: str | None = None) -> dict[str, str]:
    """{"train", "validation", "test"} texts of ``source`` (see the module docstring).
    ``tfds_data_dir``: TFDS's data dir (None: $TFDS_DATA_DIR)."""
    if source.startswith(TFDS_PREFIX):
        name = source[len(TFDS_PREFIX):]
        return {s: char_lm.read_tfds_text(name, s, data_dir=tfds_data_dir) for s in SPLITS}
    text = char_lm.read_text_file(source)
    cut_train = int(len(text) * FILE_FRACTIONS[0])
    cut_validation = int(len(text) * (FILE_FRACTIONS[0] + FILE_FRACTIONS[1]))
    return {"train": text[:cut_train], "validation": text[cut_train:cut_validation],
            "test": text[cut_validation:]}


def encode_text_rows(tokenizer: e2e.GPT2BPE, text: str, max_len: int, *, limit: int = 0,
                     source: str = "text") -> e2e.EncodedExamples:
    """The first ``limit`` (0: all) rows of ``max_len + 1`` consecutive tokens of ``text``.

    Returns EncodedExamples: inputs, targets int32 [n, max_len] (targets = inputs shifted
    left by one), mask bool [n, max_len] all True, prompt_lengths int32 [n] zeros. Fewer
    than one row is a TextDataError naming ``source``.
    """
    ids = np.asarray(tokenizer.encode(text), np.int32)
    n = len(ids) // (max_len + 1)
    if n == 0:
        raise TextDataError(f"{source}: {len(ids)} tokens make no row of max_len + 1 = "
                            f"{max_len + 1}; lower --config.data.max_len.")
    n = min(n, limit) if limit else n
    rows = ids[:n * (max_len + 1)].reshape(n, max_len + 1)
    return e2e.EncodedExamples(inputs=rows[:, :-1], targets=rows[:, 1:],
                               mask=np.ones((n, max_len), bool),
                               prompt_lengths=np.zeros((n,), np.int32))


def write_tiny_text(path) -> None:
    """A tiny UTF-8 text for the offline stand-in (the tiny E2E references, repeated)."""
    lines = [ref for refs in e2e.TINY_REFS for ref in refs]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines * 24) + "\n")

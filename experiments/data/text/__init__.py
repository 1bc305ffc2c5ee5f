"""Text data for the translation and language-model experiments (pure Python/numpy).

* ``parallel``  – aligned parallel-text readers (plain or gzip'd files, optional TFDS).
* ``tokenizer`` – SentencePiece tokenizers trained on the training split, saved in the workdir.
* ``batching``  – length-bucketed translation batches with padding masks.
* ``char_lm``   – character-level language-model data (TFDS text datasets or a text file).

No TensorFlow is needed: TFDS datasets are read with ``tfds.data_source``.
"""

from experiments.data.text.parallel import (
    ParallelCorpus,
    TextDataError,
    read_lines,
    read_parallel,
    read_tfds_parallel,
    resolve_text_file,
)

__all__ = [
    "ParallelCorpus",
    "TextDataError",
    "read_lines",
    "read_parallel",
    "read_tfds_parallel",
    "resolve_text_file",
]

"""Character-level language-model data (TFDS text datasets or a plain UTF-8 text file),
and text samples from a trained model.

Sources:
  * TFDS (default ``tiny_shakespeare``), read with ``tfds.data_source`` (no TensorFlow):
    the ``text`` feature of every example of a split, joined with a newline (tiny_shakespeare
    has one example per split: 1,003,854 / 55,770 / 55,770 characters).
  * A plain text file: the first ``1 - val_fraction`` of its characters are the training
    split, the rest the validation split (nanoGPT's ``shakespeare_char`` split).

Vocabulary: the sorted distinct characters of the training text (``vocab_source="train"``,
the default), or of all loaded splits (``"all"``). It is saved as ``vocab.json`` in the
workdir and reused on resume (a changed training text is an error, not a silent remap). A
character outside the vocabulary is an error naming it and the fix.

Batches: training windows are random contiguous slices of ``context + 1`` characters, a pure
function of (seed, step); evaluation uses fixed, evenly spaced windows so its loss is
comparable across evaluations and runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from experiments.data.text.parallel import TextDataError


def read_text_file(path: str) -> str:
    """Reads a UTF-8 text file; TextDataError naming the byte offset on invalid UTF-8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Text file {os.path.abspath(path)!r} does not exist. Set the config's "
            "data.text_file to a UTF-8 text file, or leave it empty to use a TFDS dataset."
        )
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise TextDataError(
            f"{path}: not valid UTF-8 at byte {err.start} (line {line}). Re-encode the file "
            "as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None


def split_text(text: str, val_fraction: float) -> dict[str, str]:
    """Splits one text into {"train": first part, "validation": last val_fraction}."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    return {"train": text[:cut], "validation": text[cut:]}


def read_tfds_text(
    name: str,
    split: str,
    *,
    feature: str = "text",
    data_dir: str | None = None,
    download: bool = False,
) -> str:
    """Concatenates the ``feature`` text of every example of a TFDS split (newline-joined).

    ``download=True`` lets TFDS download and prepare a missing dataset; a dataset that is
    neither prepared nor obtainable raises a one-line ``DataMissingError`` (a
    FileNotFoundError) that says how to provide it.
    """
    from experiments.common import tfds_download  # local: the text-file path must not need TFDS

    data = tfds_download.open_source(name, split, data_dir=data_dir, download=download,
                                     data_dir_setting="--data_dir",
                                     download_setting="--config.data.tfds_download",
                                     alternative="set --config.data.text_file to a UTF-8 file")
    pieces = []
    for i in range(len(data)):
        example = data[i]
        if feature not in example:
            raise TextDataError(
                f"tfds:{name}[{split}] examples have fields {sorted(example)}, not {feature!r}. "
                "Set data.text_feature."
            )
        value = example[feature]
        if isinstance(value, str):
            pieces.append(value)
            continue
        try:
            pieces.append(bytes(value).decode("utf-8"))
        except UnicodeDecodeError as err:
            raise TextDataError(
                f"tfds:{name}[{split}] example {i}: {feature!r} is not valid UTF-8 "
                f"(byte {err.start})."
            ) from None
    text = "\n".join(pieces)
    if not text:
        raise TextDataError(f"tfds:{name}[{split}] holds no text.")
    return text


@dataclasses.dataclass(frozen=True)
class CharVocab:
    """Character vocabulary: id i is ``chars[i]``."""

    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        if not text:
            raise TextDataError("Cannot build a character vocabulary from empty text.")
        return cls(tuple(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, *, what: str = "text") -> np.ndarray:
        """text -> int32 [len(text)] ids; TextDataError on characters outside the vocabulary."""
        lookup = {c: i for i, c in enumerate(self.chars)}
        try:
            return np.fromiter((lookup[c] for c in text), np.int32, count=len(text))
        except KeyError:
            unknown = sorted(set(text) - set(self.chars))
            raise TextDataError(
                f"{what} has characters outside the vocabulary: {unknown[:20]!r}. Set "
                "data.vocab_source='all' to build the vocabulary from every split."
            ) from None

    def detokenize(self, ids: Sequence[int] | np.ndarray) -> str:
        """int ids -> text."""
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"chars": list(self.chars)}, f, ensure_ascii=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> CharVocab:
        with open(path, encoding="utf-8") as f:
            return cls(tuple(json.load(f)["chars"]))


def vocab_train_or_load(path: str, vocab_text: str) -> CharVocab:
    """Builds the vocabulary of ``vocab_text`` and saves it at ``path``, or reloads it.

    A saved vocabulary that differs from the one ``vocab_text`` gives (the data changed
    since the workdir was made) is an error: checkpoints would decode to the wrong text.
    """
    built = CharVocab.from_text(vocab_text)
    if os.path.exists(path):
        saved = CharVocab.load(path)
        if saved != built:
            raise ValueError(
                f"The vocabulary saved at {path} ({saved.size} chars) differs from the one the "
                f"current data gives ({built.size} chars). Use a fresh workdir, or point the "
                "config at the data this workdir was trained on."
            )
        return saved
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    built.save(path)
    return built


def train_windows(
    tokens: np.ndarray, *, seed: int, step: int, batch_size: int, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random training windows for one step, a pure function of (seed, step).

    tokens: int32 [n] the training text.
    Returns (inputs, targets): int32 [batch_size, context] each; targets[:, t] is the
    character after inputs[:, t].
    """
    if len(tokens) < context + 1:
        raise TextDataError(
            f"The text has {len(tokens)} characters, fewer than context + 1 = {context + 1}. "
            "Use a longer text or a shorter context."
        )
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(tokens) - context, size=batch_size)
    positions = starts[:, None] + np.arange(context + 1)
    window = tokens[positions]
    return window[:, :-1], window[:, 1:]


def eval_windows(
    tokens: np.ndarray, *, context: int, max_windows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed evaluation windows: non-overlapping, from the start of the text, every
    character (but the last few) predicted once; if more than ``max_windows``, an evenly
    spaced subset of them.

    Returns (inputs, targets): int32 [num_windows, context] each.
    """
    if len(tokens) < context + 1:
        raise TextDataError(
            f"The evaluation text has {len(tokens)} characters, fewer than context + 1 = "
            f"{context + 1}. Use a shorter context or a larger validation split."
        )
    starts = np.arange(0, len(tokens) - context, context)
    if max_windows is not None and len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
    positions = starts[:, None] + np.arange(context + 1)
    window = tokens[positions]
    return window[:, :-1], window[:, 1:]


def padded_batches(
    inputs: np.ndarray, targets: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cuts evaluation windows into fixed-size batches; the last one padded with zero rows.

    Yields (inputs, targets, row_mask): int32 [batch_size, context] twice and
    bool [batch_size] (False for padding rows), so every batch has one shape.
    """
    for begin in range(0, len(inputs), batch_size):
        x, y = inputs[begin : begin + batch_size], targets[begin : begin + batch_size]
        real = len(x)
        mask = np.zeros((batch_size,), bool)
        mask[:real] = True
        if real < batch_size:
            pad = ((0, batch_size - real), (0, 0))
            x, y = np.pad(x, pad), np.pad(y, pad)
        yield x, y, mask


# --------------------------------------------------------------------------- the experiment


@dataclasses.dataclass(frozen=True)
class LMData:
    """Tokenized text: vocab, train_ids / val_ids int32 [n], where it came from."""

    vocab: CharVocab
    train_ids: np.ndarray
    val_ids: np.ndarray
    source: str


def load_lm_data(d, vocab_path: str) -> LMData:
    """The splits of a ``data`` config section (experiments/configs/lm.py), the vocabulary
    built (or reloaded from ``vocab_path``) and both splits encoded."""
    if d.text_file:
        texts = split_text(read_text_file(d.text_file), d.val_fraction)
        source = f"{d.text_file} (last {d.val_fraction:.0%} = validation)"
    else:
        kwargs = dict(feature=d.text_feature, data_dir=d.tfds_data_dir or None,
                      download=d.tfds_download)
        texts = {"train": read_tfds_text(d.tfds_name, d.train_split, **kwargs),
                 "validation": read_tfds_text(d.tfds_name, d.val_split, **kwargs)}
        source = f"tfds:{d.tfds_name} ({d.train_split} / {d.val_split})"
    if d.train_fraction < 1:  # a data-limited run (the lm overfit preset)
        texts["train"] = texts["train"][:int(len(texts["train"]) * d.train_fraction)]
        source += f", first {d.train_fraction:.0%} of the training text"
    vocab_text = texts["train"] if d.vocab_source == "train" else "".join(texts.values())
    vocab = vocab_train_or_load(vocab_path, vocab_text)
    return LMData(vocab, vocab.encode(texts["train"], what="the training text"),
                  vocab.encode(texts["validation"], what="the validation text"), source)


def sample_texts(model, vocab: CharVocab, e, max_len: int, key) -> list[str]:
    """``e.num_samples`` continuations of ``e.sample_prompt`` (``e``: an ``eval`` config
    section) from a GPT at E[γ] = 0 with the KV cache.

    Longer than the context, a sample is generated in chunks: each chunk restarts the
    cache from the last max_len/2 characters (nanoGPT instead recomputes the last
    `max_len` characters at every step; the model sees at least half a context here).
    """
    import jax
    import jax.numpy as jnp

    prompt = vocab.encode(e.sample_prompt, what="eval.sample_prompt")
    rows = np.repeat(prompt[None, :], e.num_samples, axis=0)
    generated, chunk = 0, 0
    keep = max(1, max_len // 2)
    top_k = min(e.top_k, vocab.size) or None
    while generated < e.sample_length:
        window = rows[:, -keep:] if generated else rows
        new = min(max_len - window.shape[1], e.sample_length - generated)
        out = model.generate(jnp.asarray(window), new, key=jax.random.fold_in(key, chunk),
                             temperature=float(e.temperature), top_k=top_k)
        rows = np.concatenate([rows, np.asarray(out[:, window.shape[1] :])], axis=1)
        generated += new
        chunk += 1
    return [vocab.detokenize(row) for row in rows]


def write_samples(path: str, samples: dict[str, list[str]]) -> None:
    """``samples`` = {model name: its samples}, each under a ``===== name sample i =====``
    line."""
    with open(path, "w", encoding="utf-8") as f:
        for name, texts in samples.items():
            for i, sample in enumerate(texts):
                f.write(f"===== {name} sample {i + 1} =====\n{sample}\n\n")

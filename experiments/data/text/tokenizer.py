"""SentencePiece tokenizers trained on the training split and kept in the workdir.

Special ids (the same for every model trained here):
  PAD_ID = 0, UNK_ID = 1, BOS_ID = 2, EOS_ID = 3.

Each model file ``{name}.model`` has a sidecar ``{name}.json`` recording the training
settings and a fingerprint of the training sentences. On resume the saved model is
reused as is; if the config or the corpus changed since it was trained, loading fails
with an error naming the difference (delete the file or use a fresh workdir) rather
than silently pairing a checkpoint with the wrong vocabulary.

Training runs with ``num_threads=1`` by default: SentencePiece's result depends on the
thread count, and a reproducible vocabulary matters more than the seconds saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Sequence

import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3


@dataclasses.dataclass(frozen=True)
class SentencePieceSettings:
    """What a SentencePiece model is trained with (all recorded in the sidecar JSON)."""

    vocab_size: int = 8000  # target size; tiny corpora may yield fewer pieces (never more)
    model_type: str = "unigram"  # "unigram" | "bpe" | "char" | "word"
    character_coverage: float = 1.0  # 1.0 keeps every character (fine for Latin scripts)
    num_threads: int = 1  # the trained model depends on it; 1 is reproducible


def corpus_fingerprint(sentences: Sequence[str]) -> str:
    """sha256 over the sentences (newline-joined), to detect a changed training corpus."""
    digest = hashlib.sha256()
    for sentence in sentences:
        digest.update(sentence.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _train_model_proto(sentences: Sequence[str], settings: SentencePieceSettings) -> bytes:
    if not sentences:
        raise ValueError("Cannot train a SentencePiece model on an empty corpus.")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        vocab_size=settings.vocab_size,
        model_type=settings.model_type,
        character_coverage=settings.character_coverage,
        num_threads=settings.num_threads,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # A small corpus may not support the requested size; take what it supports.
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return writer.getvalue()


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def train_or_load(
    model_path: str, sentences: Sequence[str], settings: SentencePieceSettings
) -> spm.SentencePieceProcessor:
    """Loads ``model_path`` if it exists (checking it matches), else trains and saves it.

    model_path: ``.../name.model``; its sidecar is ``.../name.json``.
    sentences:  the training sentences (only fingerprinted when the model already exists).
    Raises ValueError if the saved model was trained with other settings or sentences.
    """
    if not model_path.endswith(".model"):
        raise ValueError(f"SentencePiece model path must end in .model, got {model_path!r}")
    meta_path = model_path[: -len(".model")] + ".json"
    meta = {
        "settings": dataclasses.asdict(settings),
        "num_sentences": len(sentences),
        "corpus_sha256": corpus_fingerprint(sentences),
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
    }
    if os.path.exists(model_path):
        if not os.path.exists(meta_path):
            raise ValueError(
                f"{model_path} exists without its sidecar {meta_path}; cannot check it matches "
                "the config. Delete the model to retrain it, or use a fresh workdir."
            )
        with open(meta_path) as f:
            saved = json.load(f)
        saved_view = {k: saved.get(k) for k in meta}
        if saved_view != meta:
            changed = sorted(k for k in meta if saved.get(k) != meta[k])
            raise ValueError(
                f"The tokenizer saved at {model_path} differs from what this run would train "
                f"(differences in: {', '.join(changed)}; saved {[saved.get(k) for k in changed]}"
                f" vs now {[meta[k] for k in changed]}). Use a fresh workdir, or delete the "
                "tokenizer files to retrain (old checkpoints then no longer match)."
            )
        return spm.SentencePieceProcessor(model_file=model_path)

    proto = _train_model_proto(sentences, settings)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    meta["trained_vocab_size"] = processor.get_piece_size()
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    _write_atomically(model_path, proto)
    _write_atomically(meta_path, json.dumps(meta, indent=2).encode())
    return processor


@dataclasses.dataclass(frozen=True)
class TranslationTokenizers:
    """Source and target tokenizers (the same object when the vocabulary is shared)."""

    src: spm.SentencePieceProcessor
    tgt: spm.SentencePieceProcessor
    shared: bool

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()


def translation_tokenizers(
    directory: str,
    src_sentences: Sequence[str],
    tgt_sentences: Sequence[str],
    *,
    src_lang: str,
    tgt_lang: str,
    shared: bool,
    settings: SentencePieceSettings,
) -> TranslationTokenizers:
    """Trains (or reloads from ``directory``) the tokenizer(s) for a language pair.

    shared=True:  one model ``spm_shared.model`` on source + target training sentences.
    shared=False: ``spm_{src_lang}.model`` and ``spm_{tgt_lang}.model``, each on its side
                  (each with ``settings.vocab_size`` pieces).
    """
    if shared:
        model = train_or_load(
            os.path.join(directory, "spm_shared.model"),
            list(src_sentences) + list(tgt_sentences),
            settings,
        )
        return TranslationTokenizers(src=model, tgt=model, shared=True)
    if src_lang == tgt_lang:
        raise ValueError(f"src_lang and tgt_lang are both {src_lang!r}; pick two languages.")
    src = train_or_load(os.path.join(directory, f"spm_{src_lang}.model"), src_sentences, settings)
    tgt = train_or_load(os.path.join(directory, f"spm_{tgt_lang}.model"), tgt_sentences, settings)
    return TranslationTokenizers(src=src, tgt=tgt, shared=False)

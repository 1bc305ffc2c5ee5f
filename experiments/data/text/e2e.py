"""E2E NLG data for fine-tuning GPT-2: CSV reader, GPT-2 BPE, prompt/target encoding, BLEU.

Data (tuetschek/e2e-dataset): ``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv`` with
columns ``mr`` (meaning representation) and ``ref`` (one human reference), one row per pair;
an mr has several rows, one per reference.

An example is the text ``mr → ref<|endoftext|>``: the prompt ``mr + PROMPT_SEPARATOR`` and the
target ``" " + ref`` are tokenized separately and concatenated with the end-of-text token, and
the loss counts the target tokens and the end-of-text token only (``EncodedExamples.mask``).
Decoding starts from the prompt; BLEU compares a decode with all references of its mr
(``group_references``, ``multi_reference_bleu``).

Tokenizer: the checkpoint's own GPT-2 byte-level BPE, read with the ``tokenizers`` package
from its ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``. ``write_tiny_setup`` writes an
offline stand-in: a tiny random GPT-2 (``save_gpt2``), a tiny BPE trained by ``tokenizers`` and
tiny E2E-format CSVs.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers

from experiments.data.text.parallel import TextDataError

SPLIT_FILES = {"train": "trainset.csv", "validation": "devset.csv",
               "test": "testset_w_refs.csv"}
PROMPT_SEPARATOR = " →"
END_OF_TEXT = "<|endoftext|>"
E2E_DOWNLOAD = ("download e2e-dataset.zip from https://github.com/tuetschek/e2e-dataset "
                "(trainset.csv, devset.csv, testset_w_refs.csv) and unpack it into {dir}")


@dataclasses.dataclass(frozen=True)
class E2ESplit:
    """One split: equally long lists of meaning representations and references."""

    mrs: list[str]
    refs: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.mrs)


def read_e2e_csv(path) -> E2ESplit:
    """A CSV with ``mr`` and ``ref`` columns (other columns ignored) → E2ESplit.

    Fields are whitespace-stripped; a row with an empty mr or ref is a TextDataError naming
    the file and row, as are missing columns.
    """
    path = pathlib.Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if not {"mr", "ref"} <= set(columns):
            raise TextDataError(f"{path}: needs the columns 'mr' and 'ref' (E2E NLG format), "
                                f"found {columns}.")
        mrs, refs = [], []
        for row_number, row in enumerate(reader, start=2):  # line 1 is the header
            mr, ref = (row["mr"] or "").strip(), (row["ref"] or "").strip()
            if not mr or not ref:
                raise TextDataError(f"{path}, line {row_number}: empty mr or ref.")
            mrs.append(mr)
            refs.append(ref)
    if not mrs:
        raise TextDataError(f"{path}: no rows.")
    return E2ESplit(mrs, refs, str(path))


def read_e2e(data_dir, split: str) -> E2ESplit:
    """The ``split`` ("train" | "validation" | "test") of the E2E folder ``data_dir``."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown E2E split {split!r}; choose one of {sorted(SPLIT_FILES)}.")
    path = pathlib.Path(data_dir) / SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"no E2E NLG file {path}: "
                                f"{E2E_DOWNLOAD.format(dir=pathlib.Path(data_dir))}.")
    return read_e2e_csv(path)


def group_references(split: E2ESplit) -> tuple[list[str], list[list[str]]]:
    """Distinct mrs in order of first appearance, and each one's references (in order)."""
    grouped: dict[str, list[str]] = {}
    for mr, ref in zip(split.mrs, split.refs):
        grouped.setdefault(mr, []).append(ref)
    return list(grouped), list(grouped.values())


def multi_reference_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]):
    """sacreBLEU corpus BLEU of one hypothesis per mr against that mr's references
    (any number each). Returns the ``sacrebleu`` BLEUScore (``.score`` in 0..100)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets.")
    streams = max(len(r) for r in references)
    # sacreBLEU takes reference *streams*; None marks a missing reference of a shorter set.
    padded = [[refs[i] if i < len(refs) else None for refs in references]
              for i in range(streams)]
    return sacrebleu.corpus_bleu(list(hypotheses), padded)


# ------------------------------------------------------------------ tokenizer
@dataclasses.dataclass(frozen=True)
class GPT2BPE:
    """A GPT-2 byte-level BPE (``tokenizers.Tokenizer``) and its end-of-text id."""

    tokenizer: tokenizers.Tokenizer
    eos_id: int
    source: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids → text, stopping before the first end-of-text token."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids)


def load_gpt2_tokenizer(folder) -> GPT2BPE:
    """The GPT-2 BPE of a checkpoint folder: ``tokenizer.json``, else ``vocab.json`` +
    ``merges.txt``. Needs the ``<|endoftext|>`` token."""
    folder = pathlib.Path(folder)
    if (folder / "tokenizer.json").is_file():
        tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        source = folder / "tokenizer.json"
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # GPT-2's scheme: byte-level pre-tokenization (its regex, no prefix space) + BPE.
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
            str(folder / "vocab.json"), str(folder / "merges.txt")))
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        source = folder / "vocab.json"
    else:
        raise FileNotFoundError(f"no GPT-2 tokenizer in {folder}: put the checkpoint's "
                                f"tokenizer.json, or vocab.json and merges.txt, there (they "
                                f"come with every GPT-2 on huggingface.co).")
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    if eos_id is None:
        raise TextDataError(f"{source}: the tokenizer has no {END_OF_TEXT!r} token.")
    return GPT2BPE(tokenizer, eos_id, str(source))


def train_tiny_gpt2_tokenizer(texts: Sequence[str], folder, *, vocab_size: int = 320):
    """Train a byte-level BPE (GPT-2's scheme: 256 byte tokens, merges, ``<|endoftext|>``)
    on ``texts``; write ``tokenizer.json``, ``vocab.json`` and ``merges.txt`` to ``folder``
    and load it. The vocabulary may come out smaller than ``vocab_size`` on a tiny corpus."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                            show_progress=False, special_tokens=[END_OF_TEXT])
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    bpe.save(str(folder / "tokenizer.json"))
    return load_gpt2_tokenizer(folder)


# ------------------------------------------------------------------ encoding
@dataclasses.dataclass(frozen=True)
class EncodedExamples:
    """Language-model rows of ``mr → ref<|endoftext|>``, padded with end-of-text.

    inputs, targets: [N, max_len] int32 (targets = inputs shifted left by one).
    mask:            [N, max_len] bool, True where the target is a reference token or the
                     closing end-of-text (the loss positions).
    prompt_lengths:  [N] int32, tokens of ``mr →``.
    """

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    prompt_lengths: np.ndarray


def encode_prompt(tokenizer: GPT2BPE, mr: str) -> list[int]:
    """The decoding prompt ``mr →`` as token ids."""
    return tokenizer.encode(mr + PROMPT_SEPARATOR)


def encode_examples(tokenizer: GPT2BPE, split: E2ESplit, max_len: int) -> EncodedExamples:
    """Tokenize every (mr, ref) pair; a pair longer than max_len + 1 tokens is an error."""
    n = len(split)
    inputs = np.full((n, max_len), tokenizer.eos_id, np.int32)
    targets = np.full((n, max_len), tokenizer.eos_id, np.int32)
    mask = np.zeros((n, max_len), bool)
    prompt_lengths = np.zeros((n,), np.int32)
    for i, (mr, ref) in enumerate(zip(split.mrs, split.refs)):
        prompt = encode_prompt(tokenizer, mr)
        target = tokenizer.encode(" " + ref) + [tokenizer.eos_id]
        ids = prompt + target
        if len(ids) > max_len + 1:
            raise TextDataError(f"{split.source}, pair {i}: {len(ids)} tokens do not fit "
                                f"max_len={max_len} (+1 for the shift); raise max_len.")
        inputs[i, :len(ids) - 1] = ids[:-1]
        targets[i, :len(ids) - 1] = ids[1:]
        # Position t predicts token t+1: the first target token is predicted at the prompt's
        # last position.
        mask[i, len(prompt) - 1:len(ids) - 1] = True
        prompt_lengths[i] = len(prompt)
    return EncodedExamples(inputs, targets, mask, prompt_lengths)


# ------------------------------------------------------------------ offline stand-in
TINY_MRS = (
    "name[The Eagle], eatType[coffee shop], food[French], area[riverside]",
    "name[The Mill], eatType[pub], food[Italian], priceRange[cheap], area[city centre]",
    "name[Alimentum], food[Chinese], customer rating[5 out of 5], near[The Bakers]",
    "name[Zizzi], eatType[restaurant], familyFriendly[yes], area[riverside]",
)
TINY_REFS = (
    ("The Eagle is a French coffee shop by the riverside.",
     "By the riverside, The Eagle coffee shop serves French food."),
    ("The Mill is a cheap Italian pub in the city centre.",
     "In the city centre, The Mill is a pub with cheap Italian food."),
    ("Alimentum serves Chinese food near The Bakers and is rated 5 out of 5.",),
    ("Zizzi is a family friendly restaurant by the riverside.",
     "Zizzi, by the riverside, is a restaurant for families."),
)


def write_tiny_setup(root, *, max_len: int = 128, width: int = 32, depth: int = 2):
    """An offline stand-in for GPT-2 + E2E under ``root``: ``root/checkpoint`` (a random GPT-2
    written by save_gpt2, with vocab.json/merges.txt of a BPE trained on the CSVs) and
    ``root/e2e`` (the three split CSVs). Returns (checkpoint folder, data folder)."""
    from flax import nnx

    from bdia_jax.models import GPT, GPTConfig
    from bdia_jax.pretrained import save_gpt2

    root = pathlib.Path(root)
    data = root / "e2e"
    data.mkdir(parents=True, exist_ok=True)
    for split, file in SPLIT_FILES.items():
        with open(data / file, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["mr", "ref"])
            for mr, refs in zip(TINY_MRS, TINY_REFS):
                for ref in refs if split != "train" else refs * 4:
                    writer.writerow([mr, ref])
    checkpoint = root / "checkpoint"
    texts = [f"{mr}{PROMPT_SEPARATOR} {ref}" for mr, refs in zip(TINY_MRS, TINY_REFS)
             for ref in refs]
    tokenizer = train_tiny_gpt2_tokenizer(texts, checkpoint)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, max_len=max_len, width=width,
                       depth=depth, num_heads=2, mlp_dim=4 * width, dropout=0.0,
                       attention_dropout=0.0, layer_norm_eps=1e-5)
    save_gpt2(GPT(config, rngs=nnx.Rngs(0)), checkpoint, bos_token_id=tokenizer.eos_id,
              eos_token_id=tokenizer.eos_id)
    return checkpoint, data

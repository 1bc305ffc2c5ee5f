"""Length-bucketed translation batches with padding masks (pure numpy).

Sequences (ids from ``experiments.data.text.tokenizer``; PAD_ID = 0):
  src     = pieces(source) + [EOS]
  tgt_in  = [BOS] + pieces(target)      (decoder input, teacher forcing)
  tgt_out = pieces(target) + [EOS]      (what the decoder predicts at each position)

A pair's length is max(len(src), len(tgt_in)); it goes to the smallest bucket length that
holds it, and every batch of that bucket is padded to exactly [batch_size(L), L]. So jit
sees one shape per bucket (a handful in all). A bucket's last, partial batch is filled
with all-padding rows (masks False), so no example is dropped and no shape is new.

Pairs longer than the largest bucket are dropped (``too_long="drop"``, for training; the
count is reported) or truncated to fit (``too_long="truncate"``, keeping EOS last).

The order of an epoch is a pure function of (seed, epoch): shuffle within each bucket,
cut into batches, shuffle the batches. Resuming mid-epoch skips the first ``start`` batches
of the same plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from experiments.data.text.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclasses.dataclass(frozen=True)
class EncodedPairs:
    """Token ids of a split, ready for bucketing.

    src:          list of int32 [len_i] arrays, each ending in EOS.
    tgt_in:       list of int32 [len_j] arrays, each starting with BOS.
    tgt_out:      list of int32 [len_j] arrays, each ending in EOS (tgt_in shifted left).
    index:        int64 [n] the pair's position in the corpus it came from.
    num_too_long: pairs dropped (too_long="drop") or truncated (too_long="truncate").
    """

    src: list[np.ndarray]
    tgt_in: list[np.ndarray]
    tgt_out: list[np.ndarray]
    index: np.ndarray
    num_too_long: int

    def __len__(self) -> int:
        return len(self.src)


def _clip(ids: list[int], keep: int) -> list[int]:
    return ids[:keep]


def encode_pairs(
    src_sentences: Sequence[str],
    tgt_sentences: Sequence[str],
    src_tokenizer,
    tgt_tokenizer,
    *,
    max_len: int,
    too_long: str = "drop",
) -> EncodedPairs:
    """Tokenizes sentence pairs into src / tgt_in / tgt_out id arrays (see module docstring).

    max_len:  the largest bucket length; longer pairs are dropped or truncated.
    too_long: "drop" | "truncate".
    """
    if too_long not in ("drop", "truncate"):
        raise ValueError(f"too_long must be 'drop' or 'truncate', got {too_long!r}")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one piece + EOS), got {max_len}")
    src_pieces = src_tokenizer.encode(list(src_sentences))
    tgt_pieces = tgt_tokenizer.encode(list(tgt_sentences))
    src, tgt_in, tgt_out, index = [], [], [], []
    num_too_long = 0
    for i, (s, t) in enumerate(zip(src_pieces, tgt_pieces, strict=True)):
        if max(len(s), len(t)) + 1 > max_len:
            num_too_long += 1
            if too_long == "drop":
                continue
            s, t = _clip(s, max_len - 1), _clip(t, max_len - 1)
        src.append(np.asarray([*s, EOS_ID], np.int32))
        tgt_in.append(np.asarray([BOS_ID, *t], np.int32))
        tgt_out.append(np.asarray([*t, EOS_ID], np.int32))
        index.append(i)
    return EncodedPairs(src, tgt_in, tgt_out, np.asarray(index, np.int64), num_too_long)


def batch_size_for(length: int, tokens_per_batch: int, batch_multiple: int = 1) -> int:
    """Sentences per batch for bucket ``length``: about tokens_per_batch / length tokens,
    rounded down to a multiple of ``batch_multiple`` (e.g. the device count), at least one
    multiple."""
    per_batch = (tokens_per_batch // length) // batch_multiple * batch_multiple
    return max(batch_multiple, per_batch)


class BucketedBatches:
    """Fixed-shape, length-bucketed batches over an ``EncodedPairs`` split.

    A batch is a dict of numpy arrays, L the bucket length, B = batch_size_for(L, ...):
      src:      int32 [B, L]  source ids, PAD_ID-padded
      src_mask: bool  [B, L]  True at real source tokens
      tgt_in:   int32 [B, L]  decoder input ids
      tgt_out:  int32 [B, L]  decoder targets
      tgt_mask: bool  [B, L]  True at real target tokens (the loss weights)
      index:    int64 [B]     corpus position of each row; -1 for padding rows
    """

    def __init__(
        self,
        pairs: EncodedPairs,
        *,
        bucket_lengths: Sequence[int],
        tokens_per_batch: int,
        batch_multiple: int = 1,
    ):
        lengths = tuple(int(b) for b in bucket_lengths)
        if not lengths or list(lengths) != sorted(set(lengths)) or lengths[0] < 2:
            raise ValueError(
                f"bucket_lengths must be strictly increasing and >= 2, got {bucket_lengths}"
            )
        if len(pairs) == 0:
            raise ValueError("No sentence pairs to batch (all empty or too long?).")
        self.pairs = pairs
        self.bucket_lengths = lengths
        pair_lengths = np.asarray(
            [max(len(s), len(t)) for s, t in zip(pairs.src, pairs.tgt_in, strict=True)]
        )
        if pair_lengths.max() > lengths[-1]:
            raise ValueError(
                f"A pair has {pair_lengths.max()} tokens, more than the largest bucket "
                f"({lengths[-1]}); encode with max_len={lengths[-1]}."
            )
        bucket_of = np.searchsorted(np.asarray(lengths), pair_lengths, side="left")
        self.members = {length: np.flatnonzero(bucket_of == b) for b, length in enumerate(lengths)}
        self.batch_sizes = {
            length: batch_size_for(length, tokens_per_batch, batch_multiple) for length in lengths
        }

    @property
    def num_batches(self) -> int:
        """Batches per epoch (the same every epoch)."""
        return sum(-(-len(m) // self.batch_sizes[length]) for length, m in self.members.items())

    def plan(self, *, seed: int | None, epoch: int = 0) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches as (bucket length, member rows); seed=None: unshuffled."""
        rng = None if seed is None else np.random.default_rng((seed, epoch))
        plan = []
        for length, members in self.members.items():
            rows = members if rng is None else rng.permutation(members)
            size = self.batch_sizes[length]
            plan.extend((length, rows[i : i + size]) for i in range(0, len(rows), size))
        if rng is not None:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def make_batch(self, length: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Pads the given member rows into one [batch_size(length), length] batch."""
        size = self.batch_sizes[length]
        if len(rows) > size:
            raise ValueError(f"{len(rows)} rows do not fit a batch of {size}")
        batch = {
            "src": np.full((size, length), PAD_ID, np.int32),
            "tgt_in": np.full((size, length), PAD_ID, np.int32),
            "tgt_out": np.full((size, length), PAD_ID, np.int32),
            "index": np.full((size,), -1, np.int64),
        }
        for r, row in enumerate(rows):
            src, tgt_in, tgt_out = (
                self.pairs.src[row],
                self.pairs.tgt_in[row],
                self.pairs.tgt_out[row],
            )
            batch["src"][r, : len(src)] = src
            batch["tgt_in"][r, : len(tgt_in)] = tgt_in
            batch["tgt_out"][r, : len(tgt_out)] = tgt_out
            batch["index"][r] = self.pairs.index[row]
        batch["src_mask"] = batch["src"] != PAD_ID
        batch["tgt_mask"] = batch["tgt_out"] != PAD_ID
        return batch

    def iterate(
        self, *, seed: int | None, epoch: int = 0, start: int = 0
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields the epoch's batches from batch number ``start`` on (for mid-epoch resume)."""
        for length, rows in self.plan(seed=seed, epoch=epoch)[start:]:
            yield self.make_batch(length, rows)

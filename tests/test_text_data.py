"""Text data: parallel readers (incl. malformed input), tokenizer round trip, batching, char LM."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.data.text import batching, char_lm, parallel, tokenizer
from experiments.data.text.parallel import TextDataError

EN = [
    "A man rides a red bicycle.",
    "Two dogs play in the snow.",
    "A woman is reading a book.",
    "Children are running on the beach.",
    "A cat sleeps on a chair.",
    "The boy throws a blue ball.",
]
FR = [
    "Un homme fait du vélo rouge.",
    "Deux chiens jouent dans la neige.",
    "Une femme lit un livre.",
    "Des enfants courent sur la plage.",
    "Un chat dort sur une chaise.",
    "Le garçon lance une balle bleue.",
]


def write(path, lines_or_bytes, *, gz=False):
    data = (
        lines_or_bytes
        if isinstance(lines_or_bytes, bytes)
        else "".join(line + "\n" for line in lines_or_bytes).encode("utf-8")
    )
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------- parallel reader


@pytest.mark.parametrize("gz", [False, True])
def test_read_parallel_plain_and_gzip(tmp_path, gz):
    suffix = ".gz" if gz else ""
    write(tmp_path / f"train.en{suffix}", EN, gz=gz)
    write(tmp_path / f"train.fr{suffix}", FR, gz=gz)
    corpus = parallel.read_parallel(str(tmp_path / "train"), "en", "fr")
    assert corpus.src == EN and corpus.tgt == FR
    assert corpus.num_dropped_empty == 0 and len(corpus) == len(EN)


def test_plain_file_preferred_over_gzip_and_crlf_stripped(tmp_path):
    write(tmp_path / "x.en", b"Hello there \r\nBye\r\n")
    write(tmp_path / "x.en.gz", ["something else", "entirely"], gz=True)
    write(tmp_path / "x.fr", b"Bonjour\r\nAu revoir\r\n")
    corpus = parallel.read_parallel(str(tmp_path / "x"), "en", "fr")
    assert corpus.src == ["Hello there", "Bye"] and corpus.tgt == ["Bonjour", "Au revoir"]


def test_unequal_line_counts_name_both_files_and_counts(tmp_path):
    write(tmp_path / "t.en", EN)
    write(tmp_path / "t.fr", FR[:-1])
    with pytest.raises(TextDataError) as info:
        parallel.read_parallel(str(tmp_path / "t"), "en", "fr")
    message = str(info.value)
    assert str(tmp_path / "t.en") in message and str(tmp_path / "t.fr") in message
    assert "6 lines" in message and "has 5" in message


def test_empty_lines_drop_the_pair_and_are_counted(tmp_path):
    write(tmp_path / "t.en", ["one", "", "three", "four", "   "])
    write(tmp_path / "t.fr", ["un", "deux", "", "quatre", ""])
    corpus = parallel.read_parallel(str(tmp_path / "t"), "en", "fr")
    assert corpus.src == ["one", "four"] and corpus.tgt == ["un", "quatre"]
    assert corpus.num_dropped_empty == 3


def test_all_empty_is_an_error(tmp_path):
    write(tmp_path / "t.en", ["", " "])
    write(tmp_path / "t.fr", ["x", ""])
    with pytest.raises(TextDataError, match="no sentence pair has text on both sides"):
        parallel.read_parallel(str(tmp_path / "t"), "en", "fr")


@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_names_file_and_line(tmp_path, gz):
    suffix = ".gz" if gz else ""
    write(tmp_path / f"t.en{suffix}", "ok\nfine\ncaf\xe9\n".encode("latin-1"), gz=gz)
    write(tmp_path / f"t.fr{suffix}", ["a", "b", "c"], gz=gz)
    with pytest.raises(TextDataError) as info:
        parallel.read_parallel(str(tmp_path / "t"), "en", "fr")
    message = str(info.value)
    assert f"t.en{suffix}" in message and "line 3" in message and "UTF-8" in message


def test_missing_file_names_paths_and_config_field(tmp_path):
    write(tmp_path / "t.en", EN)
    with pytest.raises(FileNotFoundError) as info:
        parallel.read_parallel(str(tmp_path / "t"), "en", "fr", what="data.train_prefix")
    message = str(info.value)
    assert "t.fr" in message and "t.fr.gz" in message and "data.train_prefix" in message


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    write(tmp_path / "t.en.gz", b"this is not gzip data\n")
    with pytest.raises(TextDataError, match="not a readable gzip file"):
        parallel.read_lines(str(tmp_path / "t.en.gz"))


def test_tfds_parallel_reader_with_mock_data():
    def fake_source(self, split, **kwargs):
        del self, split, kwargs
        return [
            {"en": b"A cat.", "fr": "Un chat élégant.".encode()},
            {"en": b"", "fr": b"Vide."},
            {"en": b"A dog.", "fr": b"Un chien."},
        ]

    with tfds.testing.mock_data(as_data_source_fn=fake_source):
        corpus = parallel.read_tfds_parallel("wmt14_translate/fr-en", "train", "en", "fr")
        assert corpus.src == ["A cat.", "A dog."] and corpus.tgt == [
            "Un chat élégant.",
            "Un chien.",
        ]
        assert corpus.num_dropped_empty == 1
        with pytest.raises(TextDataError, match="src_lang/tgt_lang"):
            parallel.read_tfds_parallel("wmt14_translate/fr-en", "train", "en", "de")


MULTI30K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "multi30k")


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="Multi30k not present at ../shared")
def test_real_multi30k_splits_read_cleanly():
    sizes = {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
    for split, size in sizes.items():
        corpus = parallel.read_parallel(os.path.join(MULTI30K, split), "en", "fr")
        assert len(corpus) + corpus.num_dropped_empty == size


# ----------------------------------------------------------------------------- tokenizer

SETTINGS = tokenizer.SentencePieceSettings(vocab_size=60)


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    tok = tokenizer.translation_tokenizers(
        str(tmp_path), EN, FR, src_lang="en", tgt_lang="fr", shared=True, settings=SETTINGS
    )
    assert tok.src is tok.tgt and tok.shared
    sp = tok.src
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    for sentence in EN + FR:
        ids = sp.encode(sentence)
        assert ids and min(ids) > tokenizer.EOS_ID  # no special id inside a sentence
        assert sp.decode(ids) == sentence
    assert os.path.isfile(tmp_path / "spm_shared.model")
    assert os.path.isfile(tmp_path / "spm_shared.json")


def test_tokenizer_is_reused_on_resume_and_training_is_deterministic(tmp_path):
    first = tokenizer.train_or_load(str(tmp_path / "a" / "m.model"), EN + FR, SETTINGS)
    mtime = os.stat(tmp_path / "a" / "m.model").st_mtime_ns
    again = tokenizer.train_or_load(str(tmp_path / "a" / "m.model"), EN + FR, SETTINGS)
    assert os.stat(tmp_path / "a" / "m.model").st_mtime_ns == mtime  # loaded, not retrained
    assert again.serialized_model_proto() == first.serialized_model_proto()
    fresh = tokenizer.train_or_load(str(tmp_path / "b" / "m.model"), EN + FR, SETTINGS)
    assert fresh.serialized_model_proto() == first.serialized_model_proto()


def test_tokenizer_mismatch_on_resume_is_an_error(tmp_path):
    path = str(tmp_path / "m.model")
    tokenizer.train_or_load(path, EN + FR, SETTINGS)
    other = tokenizer.SentencePieceSettings(vocab_size=50)
    with pytest.raises(ValueError, match="settings"):
        tokenizer.train_or_load(path, EN + FR, other)
    with pytest.raises(ValueError, match="corpus_sha256"):
        tokenizer.train_or_load(path, EN, SETTINGS)


def test_per_language_tokenizers(tmp_path):
    tok = tokenizer.translation_tokenizers(
        str(tmp_path), EN, FR, src_lang="en", tgt_lang="fr", shared=False, settings=SETTINGS
    )
    assert not tok.shared and tok.src is not tok.tgt
    assert os.path.isfile(tmp_path / "spm_en.model") and os.path.isfile(tmp_path / "spm_fr.model")
    assert tok.tgt.decode(tok.tgt.encode(FR[0])) == FR[0]


# ----------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def shared_sp(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    return tokenizer.train_or_load(str(directory / "m.model"), EN + FR, SETTINGS)


def test_encode_pairs_layout(shared_sp):
    pairs = batching.encode_pairs(EN, FR, shared_sp, shared_sp, max_len=64)
    assert len(pairs) == len(EN) and pairs.num_too_long == 0
    for i in range(len(EN)):
        assert pairs.src[i][-1] == tokenizer.EOS_ID
        assert pairs.tgt_in[i][0] == tokenizer.BOS_ID and pairs.tgt_out[i][-1] == tokenizer.EOS_ID
        np.testing.assert_array_equal(pairs.tgt_in[i][1:], pairs.tgt_out[i][:-1])
        assert shared_sp.decode(pairs.src[i][:-1].tolist()) == EN[i]
        assert shared_sp.decode(pairs.tgt_out[i][:-1].tolist()) == FR[i]


def test_too_long_pairs_are_dropped_or_truncated(shared_sp):
    lengths = [
        max(len(shared_sp.encode(e)), len(shared_sp.encode(f))) + 1
        for e, f in zip(EN, FR, strict=True)
    ]
    max_len = sorted(lengths)[len(lengths) // 2]
    too_long = sum(n > max_len for n in lengths)
    assert too_long > 0
    dropped = batching.encode_pairs(EN, FR, shared_sp, shared_sp, max_len=max_len)
    assert len(dropped) == len(EN) - too_long and dropped.num_too_long == too_long
    kept = [i for i, n in enumerate(lengths) if n <= max_len]
    np.testing.assert_array_equal(dropped.index, kept)
    cut = batching.encode_pairs(EN, FR, shared_sp, shared_sp, max_len=max_len, too_long="truncate")
    assert len(cut) == len(EN) and cut.num_too_long == too_long
    assert all(len(s) <= max_len and s[-1] == tokenizer.EOS_ID for s in cut.src)
    assert all(len(t) <= max_len and t[-1] == tokenizer.EOS_ID for t in cut.tgt_out)


def synthetic_pairs(n: int, seed: int = 0) -> batching.EncodedPairs:
    rng = np.random.default_rng(seed)
    src, tgt_in, tgt_out = [], [], []
    for _ in range(n):
        s = rng.integers(4, 50, size=rng.integers(1, 30)).tolist()
        t = rng.integers(4, 50, size=rng.integers(1, 30)).tolist()
        src.append(np.asarray([*s, 3], np.int32))
        tgt_in.append(np.asarray([2, *t], np.int32))
        tgt_out.append(np.asarray([*t, 3], np.int32))
    return batching.EncodedPairs(src, tgt_in, tgt_out, np.arange(n), 0)


def test_buckets_have_fixed_shapes_masks_and_cover_each_pair_once():
    pairs = synthetic_pairs(101)
    batches = batching.BucketedBatches(pairs, bucket_lengths=(8, 16, 32), tokens_per_batch=128)
    assert batches.batch_sizes == {8: 16, 16: 8, 32: 4}
    seen = []
    count = 0
    for batch in batches.iterate(seed=0, epoch=0):
        count += 1
        size, length = batch["src"].shape
        assert batches.batch_sizes[length] == size
        for key in ("tgt_in", "tgt_out", "src_mask", "tgt_mask"):
            assert batch[key].shape == (size, length)
        assert batch["src"].dtype == np.int32 and batch["tgt_mask"].dtype == bool
        for row in range(size):
            i = batch["index"][row]
            if i < 0:  # a padding row
                assert not batch["src_mask"][row].any() and not batch["tgt_mask"][row].any()
                continue
            seen.append(i)
            n_src, n_tgt = len(pairs.src[i]), len(pairs.tgt_out[i])
            np.testing.assert_array_equal(batch["src"][row, :n_src], pairs.src[i])
            np.testing.assert_array_equal(batch["tgt_in"][row, :n_tgt], pairs.tgt_in[i])
            np.testing.assert_array_equal(batch["tgt_out"][row, :n_tgt], pairs.tgt_out[i])
            np.testing.assert_array_equal(batch["src_mask"][row], np.arange(length) < n_src)
            np.testing.assert_array_equal(batch["tgt_mask"][row], np.arange(length) < n_tgt)
            # Smallest bucket that fits.
            assert max(n_src, n_tgt) <= length
            smaller = [b for b in batches.bucket_lengths if b < length]
            assert not smaller or max(n_src, n_tgt) > smaller[-1]
    assert sorted(seen) == list(range(101))
    assert count == batches.num_batches


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes():
    batches = batching.BucketedBatches(
        synthetic_pairs(80), bucket_lengths=(16, 32), tokens_per_batch=64
    )

    def order(seed, epoch, start=0):
        return [b["index"].tolist() for b in batches.iterate(seed=seed, epoch=epoch, start=start)]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(1, 3, start=4) == order(1, 3)[4:]
    unshuffled = [b["index"].tolist() for b in batches.iterate(seed=None)]
    assert unshuffled == [b["index"].tolist() for b in batches.iterate(seed=None)]


def test_batch_multiple_rounds_batch_sizes():
    assert batching.batch_size_for(16, 100, 4) == 4
    assert batching.batch_size_for(64, 100, 4) == 4  # at least one multiple
    assert batching.batch_size_for(8, 1000, 8) == 120


def test_bad_bucket_lengths_are_rejected():
    with pytest.raises(ValueError, match="strictly increasing"):
        batching.BucketedBatches(synthetic_pairs(4), bucket_lengths=(32, 16), tokens_per_batch=64)
    with pytest.raises(ValueError, match="largest bucket"):
        batching.BucketedBatches(synthetic_pairs(4), bucket_lengths=(4,), tokens_per_batch=64)


# ----------------------------------------------------------------------------- char LM

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def test_char_vocab_round_trip_save_and_reuse(tmp_path):
    path = str(tmp_path / "vocab.json")
    vocab = char_lm.vocab_train_or_load(path, TEXT)
    assert vocab.chars == tuple(sorted(set(TEXT)))
    ids = vocab.encode(TEXT)
    assert ids.dtype == np.int32 and vocab.detokenize(ids) == TEXT
    assert char_lm.vocab_train_or_load(path, TEXT) == vocab
    with pytest.raises(ValueError, match="differs"):
        char_lm.vocab_train_or_load(path, TEXT + "Z")


def test_char_vocab_unknown_character_is_an_error():
    vocab = char_lm.CharVocab.from_text("abc")
    with pytest.raises(TextDataError, match=r"\['z'\].*vocab_source='all'"):
        vocab.encode("abz", what="validation text")


def test_train_windows_are_deterministic_contiguous_and_shifted():
    tokens = np.arange(1000, dtype=np.int32)
    x, y = char_lm.train_windows(tokens, seed=0, step=7, batch_size=5, context=16)
    assert x.shape == y.shape == (5, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # next character, contiguous
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)
    x2, _ = char_lm.train_windows(tokens, seed=0, step=7, batch_size=5, context=16)
    np.testing.assert_array_equal(x, x2)
    x3, _ = char_lm.train_windows(tokens, seed=0, step=8, batch_size=5, context=16)
    assert not np.array_equal(x, x3)
    # The last start still leaves a target: windows never run off the end.
    xs, ys = char_lm.train_windows(
        np.arange(17, dtype=np.int32), seed=0, step=0, batch_size=4, context=16
    )
    np.testing.assert_array_equal(xs[:, 0], 0)
    with pytest.raises(TextDataError, match="fewer than context"):
        char_lm.train_windows(tokens[:16], seed=0, step=0, batch_size=1, context=16)


def test_eval_windows_and_padded_batches():
    tokens = np.arange(101, dtype=np.int32)
    x, y = char_lm.eval_windows(tokens, context=10)
    assert x.shape == (10, 10)
    np.testing.assert_array_equal(x[:, 0], np.arange(0, 100, 10))
    np.testing.assert_array_equal(y, x + 1)
    xs, _ = char_lm.eval_windows(tokens, context=10, max_windows=4)
    np.testing.assert_array_equal(xs[:, 0], [0, 30, 60, 90])
    batches = list(char_lm.padded_batches(x, y, 4))
    assert [b[2].sum() for b in batches] == [4, 4, 2]
    assert all(b[0].shape == (4, 10) for b in batches)
    np.testing.assert_array_equal(batches[2][0][:2], x[8:])


def test_text_file_split_and_non_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    splits = char_lm.split_text(char_lm.read_text_file(str(path)), 0.25)
    assert splits["train"] + splits["validation"] == TEXT
    assert len(splits["validation"]) == len(TEXT) - int(len(TEXT) * 0.75)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(TextDataError, match=r"bad.txt: not valid UTF-8 at byte 18 \(line 2\)"):
        char_lm.read_text_file(str(bad))
    with pytest.raises(FileNotFoundError, match="data.text_file"):
        char_lm.read_text_file(str(tmp_path / "missing.txt"))


def test_tfds_text_reader_with_mock_data():
    def fake_source(self, split, **kwargs):
        del self, kwargs
        return [{"text": f"{split} one".encode()}, {"text": b"two"}]

    with tfds.testing.mock_data(as_data_source_fn=fake_source):
        assert char_lm.read_tfds_text("tiny_shakespeare", "validation") == "validation one\ntwo"
        with pytest.raises(TextDataError, match="data.text_feature"):
            char_lm.read_tfds_text("tiny_shakespeare", "train", feature="content")

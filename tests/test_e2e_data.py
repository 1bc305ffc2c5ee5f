"""experiments.data.text.e2e: E2E NLG CSVs, GPT-2 BPE, prompt/target encoding, multi-reference BLEU."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from bdia_jax.pretrained import load_gpt2
from experiments.data.text import e2e
from experiments.data.text.parallel import TextDataError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, data folder, tokenizer) of the offline stand-in."""
    checkpoint, data = e2e.write_tiny_setup(tmp_path_factory.mktemp("tiny"))
    return checkpoint, data, e2e.load_gpt2_tokenizer(checkpoint)


def write_csv(path, rows, header=("mr", "ref")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_reader_keeps_quoted_commas_and_groups_references(tmp_path):
    rows = [("name[A], food[Thai]", "A serves Thai food."), ("name[B]", " B. "),
            ("name[A], food[Thai]", "Thai food, at A.")]
    split = e2e.read_e2e_csv(write_csv(tmp_path / "x.csv", rows))
    assert split.mrs == ["name[A], food[Thai]", "name[B]", "name[A], food[Thai]"]
    assert split.refs == ["A serves Thai food.", "B.", "Thai food, at A."]
    mrs, refs = e2e.group_references(split)
    assert mrs == ["name[A], food[Thai]", "name[B]"]
    assert refs == [["A serves Thai food.", "Thai food, at A."], ["B."]]


def test_csv_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(TextDataError, match=r"needs the columns 'mr' and 'ref'.*found "
                                            r"\['meaning_representation', 'ref'\]"):
        e2e.read_e2e_csv(write_csv(tmp_path / "a.csv", [("x", "y")],
                                   header=("meaning_representation", "ref")))
    with pytest.raises(TextDataError, match=r"b.csv, line 3: empty mr or ref"):
        e2e.read_e2e_csv(write_csv(tmp_path / "b.csv", [("x", "y"), ("x", " ")]))
    with pytest.raises(FileNotFoundError, match=r"devset.csv: download e2e-dataset.zip from "
                                                r"https://github.com/tuetschek/e2e-dataset"):
        e2e.read_e2e(tmp_path, "validation")


def test_tokenizer_json_and_vocab_merges_encode_alike(tiny, tmp_path):
    checkpoint, _, from_json = tiny
    assert from_json.source.endswith("tokenizer.json")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(checkpoint / name, tmp_path)
    from_files = e2e.load_gpt2_tokenizer(tmp_path)
    text = "name[The Eagle], food[French] → The Eagle serves French food, café-style."
    assert from_files.encode(text) == from_json.encode(text)
    assert from_files.eos_id == from_json.eos_id
    assert from_json.decode(from_json.encode(text) + [from_json.eos_id, 5]) == text
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json, or vocab.json and merges.txt"):
        e2e.load_gpt2_tokenizer(tmp_path / "nowhere")


def test_loss_covers_the_reference_and_end_of_text_only(tiny):
    _, data, tokenizer = tiny
    split = e2e.read_e2e(data, "validation")
    enc = e2e.encode_examples(tokenizer, split, max_len=128)
    for i in range(len(split)):
        prompt = e2e.encode_prompt(tokenizer, split.mrs[i])
        assert enc.prompt_lengths[i] == len(prompt)
        loss_targets = enc.targets[i][enc.mask[i]]
        assert loss_targets[-1] == tokenizer.eos_id
        assert tokenizer.decode(loss_targets) == " " + split.refs[i]
        # The first loss position reads the prompt's last token; targets are inputs shifted.
        first = int(np.argmax(enc.mask[i]))
        assert enc.inputs[i, first] == prompt[-1]
        np.testing.assert_array_equal(enc.inputs[i, 1:first + 1], enc.targets[i, :first])
        np.testing.assert_array_equal(enc.inputs[i, :len(prompt)], prompt)
    with pytest.raises(TextDataError, match=r"do not fit max_len=8"):
        e2e.encode_examples(tokenizer, split, max_len=8)


def test_multi_reference_bleu_matches_any_reference():
    refs = [["the cat sat on the mat", "a cat was on the mat"], ["dogs bark at night"]]
    # sacreBLEU's float64 score of a perfect match: approx only absorbs its last ulp.
    assert e2e.multi_reference_bleu(["a cat was on the mat", "dogs bark at night"],
                                    refs).score == pytest.approx(100.0)
    one_ref = e2e.multi_reference_bleu(["a cat was on the mat", "dogs bark at night"],
                                       [["the cat sat on the mat"], ["dogs bark at night"]])
    assert one_ref.score < 100.0
    with pytest.raises(ValueError, match="2 hypotheses for 1 reference sets"):
        e2e.multi_reference_bleu(["a", "b"], refs[:1])


def test_tiny_setup_loads_as_a_gpt2_of_its_tokenizer(tiny):
    checkpoint, _, tokenizer = tiny
    model = load_gpt2(checkpoint, update="standard")
    assert model.config.vocab_size == tokenizer.vocab_size
    assert model.config.layer_norm_eps == 1e-5

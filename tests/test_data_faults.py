"""Damaged TFDS files and a batch larger than the split end in one line, before anything
is compiled (issue 34, items 4 and 5)."""

import os
import shutil
import subprocess
import sys

import pytest
from subprocess_env import REPO, child_env

from experiments import vit_cifar
from experiments.common import config as config_lib
from experiments.common import sharding, tfds_download
from experiments.configs.vit_cifar import get_config
from experiments.data import cifar as cifar_data

SHARED = os.path.join(os.path.dirname(REPO), "shared", "tensorflow_datasets", "cifar10",
                      "3.0.2")
needs_cifar = pytest.mark.skipif(not os.path.isdir(SHARED),
                                 reason="needs ../shared/tensorflow_datasets/cifar10")


def _damaged_copy(tmp_path, how):
    """A prepared cifar10 whose test file is the first MB of the real one (truncated), or
    that MB with random bytes in its middle (garbage)."""
    folder = tmp_path / "tfds" / "cifar10" / "3.0.2"
    folder.mkdir(parents=True)
    for name in ("dataset_info.json", "features.json", "label.labels.txt"):
        shutil.copy(os.path.join(SHARED, name), folder / name)
    test_file = "cifar10-test.array_record-00000-of-00001"
    with open(os.path.join(SHARED, test_file), "rb") as f:
        data = bytearray(f.read(2**20))
    if how == "garbage":
        data[2**19:2**19 + 4096] = os.urandom(4096)
    (folder / test_file).write_bytes(bytes(data))
    return tmp_path / "tfds", str(folder / test_file)


@needs_cifar
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_tfds_file_is_one_line_naming_it_and_the_fix(tmp_path, how):
    data_dir, damaged = _damaged_copy(tmp_path, how)
    with pytest.raises(cifar_data.DataCorruptError) as caught:
        cifar_data.load_split("cifar10", "test", data_dir=str(data_dir), num_examples=0)
    message = str(caught.value)
    assert "\n" not in message
    assert f"cannot read split 'test' of TFDS dataset 'cifar10': {damaged} is damaged" in message
    assert f"delete {data_dir}/cifar10/3.0.2 and rerun to let TFDS prepare it again" in message
    assert "TFDS_DATA_DIR" in message


def test_a_reader_error_becomes_the_corrupt_data_line(monkeypatch):
    class Broken:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            raise RuntimeError("Corrupted Riegeli/records file: block header hash mismatch")

    monkeypatch.setattr(tfds_download, "open_source", lambda *a, **k: Broken())
    with pytest.raises(cifar_data.DataCorruptError, match=r"cannot read split 'train' of TFDS "
                       r"dataset 'cifar10': .* \(RuntimeError: Corrupted Riegeli"):
        cifar_data.load_split("cifar10", "train", data_dir=None)


@pytest.mark.parametrize("num_train_examples", [0, 200])
def test_a_batch_larger_than_the_split_is_refused_from_the_metadata(monkeypatch,
                                                                     num_train_examples):
    monkeypatch.setattr(tfds_download, "split_size", lambda name, split, data_dir: 100)
    config = get_config("tiny")
    config.data.num_train_examples = num_train_examples
    config.train.batch_size = 128
    with pytest.raises(config_lib.ConfigError, match=r"--config.train.batch_size: 128 is "
                       r"larger than the 100 training examples \(cifar10 'train' has 100"):
        vit_cifar.validate_config(config, sharding.make_mesh())
    config.train.batch_size = 100
    vit_cifar.validate_config(config, sharding.make_mesh())


@needs_cifar
def test_the_command_line_refuses_an_oversized_batch_at_once(tmp_path):
    """The issue's case: the full split and a batch of 60000 (it used to load and compile
    for 99 s, then fail in a traceback); the workdir is left as it was."""
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.vit_cifar",
         "--config=experiments/configs/vit_cifar.py:tiny",
         "--config.data.num_train_examples=0", "--config.train.batch_size=60000",
         f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, env=child_env(TFDS_DATA_DIR=os.path.dirname(os.path.dirname(SHARED))),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "--config.train.batch_size: 60000 is larger than the 50000 training examples" in \
        proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(SHARED), "..",
                                                   "tiny_shakespeare")),
                    reason="needs ../shared/tensorflow_datasets/tiny_shakespeare")
def test_the_text_readers_name_a_damaged_file_too(tmp_path):
    from experiments.data.text import char_lm

    shared = os.path.join(os.path.dirname(os.path.dirname(SHARED)), "tiny_shakespeare")
    version = os.listdir(shared)[0]
    folder = tmp_path / "tiny_shakespeare" / version
    folder.mkdir(parents=True)
    for name in os.listdir(os.path.join(shared, version)):
        data = open(os.path.join(shared, version, name), "rb").read()
        if "train.array_record" in name:
            data = data[:len(data) // 2]  # truncated
        (folder / name).write_bytes(data)
    with pytest.raises(tfds_download.DataCorruptError, match=r"cannot read split 'train' of "
                       r"TFDS dataset 'tiny_shakespeare': .*tiny_shakespeare-train.array_record"
                       r".* is damaged or truncated .*; delete .* and rerun"):
        char_lm.read_tfds_text("tiny_shakespeare", "train", data_dir=str(tmp_path))

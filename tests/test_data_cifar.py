"""CIFAR-10 pipeline: TFDS loading (mocked and, when present, real), the missing-data
error, the per-epoch order, evaluation batches and on-device augmentation."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.common import tfds_download
from experiments.data import cifar


def test_load_split_under_mock_data():
    with tfds.testing.mock_data(num_examples=40):
        split = cifar.load_split("cifar10", "train", num_examples=24)
        full = cifar.load_split("cifar10", "test")
    assert split.images.shape == (24, 32, 32, 3) and split.images.dtype == np.uint8
    assert split.labels.shape == (24,) and split.labels.dtype == np.int32
    assert len(full) == 40
    assert split.labels.min() >= 0 and split.labels.max() < 10
    # The subset is the first examples of the split, in order.
    with tfds.testing.mock_data(num_examples=40):
        again = cifar.load_split("cifar10", "train", num_examples=40)
    np.testing.assert_array_equal(again.images[:24], split.images)


def test_missing_data_raises_a_clear_error(tmp_path):
    with pytest.raises(cifar.DataMissingError) as info:
        cifar.load_split("cifar10", "train", data_dir=str(tmp_path), download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "point --data_dir (or TFDS_DATA_DIR, when that is empty) at" in message
    assert "set --config.data.download=true where www.cs.toronto.edu is reachable" in message


def test_data_dir_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/from/env")
    assert tfds_download.resolve_data_dir(None) == "/from/env"
    assert tfds_download.resolve_data_dir("/explicit") == "/explicit"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert tfds_download.resolve_data_dir("") is None


def _has_real_cifar():
    data_dir = os.environ.get("TFDS_DATA_DIR")
    return bool(data_dir) and os.path.isdir(os.path.join(data_dir, "cifar10"))


@pytest.mark.skipif(not _has_real_cifar(), reason="needs TFDS_DATA_DIR with a prepared cifar10")
def test_real_cifar10_reads():
    split = cifar.load_split("cifar10", "test", num_examples=64, download=False)
    assert split.images.shape == (64, 32, 32, 3)
    assert set(np.unique(split.labels)) <= set(range(10)) and len(np.unique(split.labels)) > 5
    assert 50 < split.images.mean() < 200  # real photographs, not blank


def _split(n):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    return cifar.ImageSplit(images, np.arange(n, dtype=np.int32))


def test_train_batches_order_is_a_function_of_seed_and_epoch():
    data = _split(50)
    batches = cifar.TrainBatches(data, batch_size=8, seed=3)
    assert batches.steps_per_epoch == 6  # 50 // 8, last partial batch dropped
    epoch0 = np.concatenate([batches(s)["label"] for s in range(6)])
    assert len(np.unique(epoch0)) == 48  # no repeats within an epoch
    epoch1 = np.concatenate([batches(s)["label"] for s in range(6, 12)])
    assert not np.array_equal(epoch0, epoch1)
    # A fresh iterator (a resumed run) jumping straight to step 9 sees the same batch.
    fresh = cifar.TrainBatches(data, batch_size=8, seed=3)
    np.testing.assert_array_equal(fresh(9)["label"], batches(9)["label"])
    np.testing.assert_array_equal(fresh(9)["image"][:, 0, 0, 0], fresh(9)["label"])
    other_seed = cifar.TrainBatches(data, batch_size=8, seed=4)
    assert not np.array_equal(other_seed(0)["label"], batches(0)["label"])


def test_train_batches_reject_a_split_smaller_than_a_batch():
    with pytest.raises(ValueError, match="fewer than one batch"):
        cifar.TrainBatches(_split(5), batch_size=8, seed=0)


def test_eval_batches_cover_every_example_once_with_a_mask():
    data = _split(21)
    batches = list(cifar.eval_batches(data, 8))
    assert [b["image"].shape[0] for b in batches] == [8, 8, 8]
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(21))
    assert batches[-1]["mask"].sum() == 5


def test_normalize_uses_the_cifar_statistics():
    images = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
    out = cifar.normalize(images)
    expected = (1.0 - np.asarray(cifar.CIFAR10_MEAN)) / np.asarray(cifar.CIFAR10_STD)
    chex.assert_trees_all_close(out[0, 0, 0], jnp.asarray(expected, jnp.float32), rtol=1e-6)
    assert out.dtype == jnp.float32


def test_crop_and_flip_are_windows_of_the_padded_image():
    images = jax.random.randint(jax.random.PRNGKey(0), (16, 8, 8, 3), 1, 255).astype(jnp.uint8)
    out = np.asarray(cifar.random_crop_flip(images, jax.random.PRNGKey(1), padding=2))
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    shifted = 0
    for i in range(16):
        candidates = [padded[i, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        candidates += [c[:, ::-1] for c in candidates]
        match = [k for k, c in enumerate(candidates) if np.array_equal(c, out[i])]
        assert match, f"example {i} is not a (flipped) crop of its padded image"
        shifted += not np.array_equal(out[i], np.asarray(images[i]))
    assert shifted > 8  # random offsets/flips actually happen


def test_no_padding_and_no_flip_is_the_identity():
    images = jax.random.randint(jax.random.PRNGKey(0), (4, 8, 8, 3), 0, 255).astype(jnp.uint8)
    out = cifar.random_crop_flip(images, jax.random.PRNGKey(1), padding=0, flip=False)
    chex.assert_trees_all_equal(out, images)


def test_augmentation_is_deterministic_in_its_key():
    images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    a = cifar.random_crop_flip(images, jax.random.PRNGKey(5))
    b = cifar.random_crop_flip(images, jax.random.PRNGKey(5))
    chex.assert_trees_all_equal(a, b)

"""CIFAR-10 (or another TFDS image-classification dataset) for the ViT experiments.

Host side (numpy): the split is read once through ``tfds.data_source`` (random access,
no TensorFlow needed) into uint8 arrays; training batches are numpy gathers from a
per-epoch permutation that depends only on (seed, epoch), so batch k of a run is the same
whether or not the run was interrupted. Device side (jitted): random crop with zero padding,
horizontal flip, normalisation with the dataset's mean and standard deviation, and the
evaluation sums of a classifier on one batch.

Missing data: TFDS downloads and prepares the dataset when it can; when it cannot (no
network, ``download=False``) ``DataMissingError`` says in one line how to provide it
(``experiments/common/tfds_download.py``). There is no fallback to fake data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import tfds_download
from experiments.common.tfds_download import DataMissingError  # noqa: F401  (callers catch it here)

# Per-channel statistics of the CIFAR-10 training images (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class ImageSplit:
    """One split in host memory.

    images: [n, height, width, channels] uint8.
    labels: [n] int32.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_split(name: str, split: str, *, data_dir: str | None = None, download: bool = True,
               num_examples: int = 0, image_key: str = "image",
               label_key: str = "label") -> ImageSplit:
    """Read the first ``num_examples`` (0: all) examples of a split into memory."""
    source = tfds_download.open_source(name, split, data_dir=data_dir, download=download,
                                       data_dir_setting="--data_dir",
                                       download_setting="--config.data.download")
    total = len(source)
    count = total if num_examples <= 0 else min(num_examples, total)
    first = source[0]
    images = np.empty((count, *np.shape(first[image_key])), np.uint8)
    labels = np.empty((count,), np.int32)
    for i in range(count):
        example = first if i == 0 else source[i]
        images[i] = example[image_key]
        labels[i] = example[label_key]
    return ImageSplit(images, labels)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of ``epoch``: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class TrainBatches:
    """Batch ``step`` of the run: examples ``perm[i*b:(i+1)*b]`` of epoch ``step // spe``.

    The last partial batch of every epoch is dropped (``steps_per_epoch = n // b``).
    """

    def __init__(self, data: ImageSplit, batch_size: int, seed: int) -> None:
        if len(data) < batch_size:
            raise ValueError(
                f"the training split has {len(data)} examples, fewer than one batch of "
                f"{batch_size}; lower --config.train.batch_size or raise "
                f"--config.data.num_train_examples."
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.steps_per_epoch = len(data) // batch_size
        self._epoch, self._perm = None, None

    def __call__(self, step: int, rows: np.ndarray | None = None) -> dict:
        """{"image": [b, H, W, C] uint8, "label": [b] int32} numpy arrays.

        rows: which rows of the global batch to read (multi-host: this process's rows,
        ``sharding.process_rows``); None reads all ``batch_size``.
        """
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, len(self.data))
        examples = self._perm[index * self.batch_size:(index + 1) * self.batch_size]
        if rows is not None:
            examples = examples[rows]
        return {"image": self.data.images[examples], "label": self.data.labels[examples]}


def eval_batches(data: ImageSplit, batch_size: int):
    """Yield every example once, in order: {"image", "label", "mask"}; the last batch is
    zero-padded to ``batch_size`` and ``mask`` ([b] bool) marks the real examples."""
    n = len(data)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        pad = batch_size - (stop - start)
        images, labels = data.images[start:stop], data.labels[start:stop]
        mask = np.ones(stop - start, bool)
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
            labels = np.concatenate([labels, np.zeros(pad, np.int32)])
            mask = np.concatenate([mask, np.zeros(pad, bool)])
        yield {"image": images, "label": labels, "mask": mask}


# --------------------------------------------------------------------------- device side


def normalize(images: jax.Array, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> jax.Array:
    """uint8 (or [0, 255] float) [b, H, W, C] -> float32 standardised per channel."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop_flip(images: jax.Array, key: jax.Array, *, padding: int = 4,
                     flip: bool = True) -> jax.Array:
    """Per-example random crop after zero-padding by ``padding`` pixels, and a random
    horizontal flip with probability 1/2.

    images: [b, H, W, C] (any dtype); returns the same shape and dtype.
    """
    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if padding > 0:
        padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * padding + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (b,))
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
    return images


def eval_sums(model, batch: dict, gamma: jax.Array | None) -> dict[str, jax.Array]:
    """{"correct", "loss_sum", "count"} (float32 scalars) of a classifier on one padded
    batch {"image": uint8 [b, H, W, C], "label": int32 [b], "mask": bool [b] (real
    examples)}, at E[γ] = 0 (``gamma`` None) or at a traced inference γ (one compilation
    serves a whole sweep)."""
    kwargs = {} if gamma is None else {"inference_gamma": gamma}  # RevViT: always None
    logits, _ = model(normalize(batch["image"]), train=False, **kwargs)
    mask = batch["mask"].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": jnp.sum(correct * mask), "loss_sum": jnp.sum(losses * mask),
            "count": jnp.sum(mask)}

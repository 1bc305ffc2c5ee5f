"""A checkpoint write that fails for lack of space ends in one line naming the workdir, the
free space and the last good checkpoint; its temporary folder is removed and the next
run resumes from the last good checkpoint (issue 34, item 3). The writer is stubbed to
raise TensorStore's error for a full disk (a small tmpfs needs root)."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import checkpoint
from experiments.common.checkpoint import Checkpointer, CheckpointWriteError

TENSORSTORE_DISK_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file '
    '"{tmp}/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write 79572 bytes to '
    "file 18: No space left on device [os_error_code='28']")


def _state(value=1.0):
    return {"w": jnp.full((64,), value, jnp.float32)}


def _checkpointer(tmp_path, **kwargs):
    return Checkpointer(str(tmp_path / "checkpoints" / "bdia"), save_every_steps=1, keep=3,
                        **kwargs)


def test_a_full_disk_during_a_write_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    ckpt = _checkpointer(tmp_path)
    ckpt.save(1, _state(1.0), {})
    real_save = ckpt._manager.save

    def full_disk(step, *args, **kwargs):
        tmp = os.path.join(ckpt.directory, f"{step}.orbax-checkpoint-tmp-1765000000")
        os.makedirs(os.path.join(tmp, "state"))  # what Orbax leaves behind mid-write
        raise ValueError(TENSORSTORE_DISK_FULL.format(tmp=tmp))

    monkeypatch.setattr(ckpt._manager, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as caught:
        ckpt.save(2, _state(2.0), {})
    message = str(caught.value)
    assert "\n" not in message
    assert f"in the workdir {tmp_path}:" in message
    assert "no space left on the device (" in message and "MB free)" in message
    assert f"the last good checkpoint is step 1 in {ckpt.directory}" in message
    assert message.endswith("rerun the same command to resume.")
    assert sorted(os.listdir(ckpt.directory)) == ["1"]  # the temporary folder is gone
    ckpt.close()  # no second error
    monkeypatch.setattr(ckpt._manager, "save", real_save)

    again = _checkpointer(tmp_path)
    state, _ = again.restore(_state(0.0), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    np.testing.assert_array_equal(state["w"], np.ones(64, np.float32))
    again.save(2, _state(2.0), {})  # space is back
    assert again.all_steps() == [1, 2]
    again.close()


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    ckpt = _checkpointer(tmp_path)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: usage(2**30, 2**30 - 100, 100))
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint step 1 in the "
                       r"workdir .*: 0.0 MB free, the state needs 0.0 MB; no checkpoint was "
                       r"written yet in .*checkpoints/bdia\. Free some space"):
        ckpt.save(1, _state(), {})
    assert os.listdir(ckpt.directory) == []
    ckpt.close()


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    ckpt = _checkpointer(tmp_path)

    def broken(*args, **kwargs):
        raise ValueError("PERMISSION_DENIED: something else")

    monkeypatch.setattr(ckpt._manager, "save", broken)
    with pytest.raises(ValueError, match="PERMISSION_DENIED"):
        ckpt.save(1, _state(), {})
    ckpt.close()

"""Orbax checkpoints of a ``TrainState`` plus a small JSON record.

Saves every ``save_every_steps`` steps (and whenever ``force=True``, e.g. at the end of an
epoch), keeps the last ``keep`` checkpoints, restores the latest onto the mesh. The state's
``step`` is the data-iterator position (the data order of every epoch is a function of
(seed, epoch)) and the RNG position (step keys are ``fold_in(base_key, step)``), so a resumed
run continues with the same batches and keys. A state with a non-finite leaf is never
written.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from experiments.common.train_state import all_finite


class Checkpointer:
    """Checkpoints of one model's training under ``directory``.

    Args:
      directory: where the step folders go (created if missing).
      save_every_steps: periodic save interval in steps (>= 1).
      keep: how many of the latest checkpoints to keep (>= 1).
      async_save: write in a background thread (worthwhile for large models on
        accelerators); False writes synchronously.
    """

    def __init__(self, directory: str, *, save_every_steps: int, keep: int,
                 async_save: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        self.save_every_steps = int(save_every_steps)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def is_due(self, step: int) -> bool:
        return step > 0 and step % self.save_every_steps == 0

    def save(self, step: int, state, record: dict) -> None:
        """Write ``state`` and the JSON-serialisable ``record`` as checkpoint ``step``."""
        if not all_finite(state):
            raise FloatingPointError(
                f"refusing to checkpoint step {step}: the train state has NaN/Inf values."
            )
        if step in self._manager.all_steps():
            return  # already saved (e.g. an epoch end that was also a periodic save)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
            ),
            force=True,
        )

    def restore(self, like_state, sharding) -> tuple | None:
        """``(state, record)`` of the latest checkpoint, placed with ``sharding`` at every
        leaf, or None when there is none. ``like_state`` gives the tree structure/shapes."""
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like_state
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.record)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

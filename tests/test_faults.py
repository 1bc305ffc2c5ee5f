"""Faults: a run killed with SIGKILL resumes to the same parameters; corrupted or incomplete
checkpoints are reported and skipped; non-finite and fixed-point overflow steps follow the
configured policy and never reach a checkpoint."""

import asyncio
import functools
import gc
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from checkpoint_utils import restore_on_one_device
from flax import nnx
from subprocess_env import child_env

from bdia_jax import training
from bdia_jax.models import ViT, vit_config
from experiments.common import sharding
from experiments.common import train_state as ts
from experiments.common.checkpoint import FINGERPRINT_KEY, Checkpointer, CheckpointMismatchError
from experiments.common.loop import LoopSettings, RangeOverflowError, run_loop
from experiments.common.metrics import MetricsWriter, read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


# --------------------------------------------------------------------------- helpers


def _optim():
    return ml_collections.ConfigDict(dict(
        name="adamw", schedule="warmup_cosine", learning_rate=3e-3, warmup_epochs=0.0,
        end_learning_rate_factor=0.1, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
        momentum=0.9, grad_clip_norm=1.0))


def _fresh_state(frac_bits=9):
    """(graphdef, optimizer, schedule, step-0 state) of a tiny BDIA-ViT."""
    model = ViT(vit_config("tiny", update="bdia", backprop="reversible", frac_bits=frac_bits),
                rngs=nnx.Rngs(0))
    optimizer, schedule = ts.make_optimizer(_optim(), 20, 10)
    graphdef, state = training.init(model, optimizer, jax.random.PRNGKey(0))
    return graphdef, optimizer, schedule, state


def _loss_fn(model, batch, key):
    """Cross-entropy on images multiplied by the batch's "scale" ([b] float32): a huge
    scale drives the BDIA stream out of its fixed-point range at exactly that step."""
    images = batch["image"] * batch["scale"][:, None, None, None]
    logits, aux = model(images, key=key, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"overflow": aux["overflow"], "nonfinite": aux["nonfinite"]}


def _batch(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, BATCH).astype(np.int32),
            "scale": np.full(BATCH, scale, np.float32)}


@functools.cache
def _overflow_setup(stop_on_nonfinite):
    # frac_bits=20: the grid is exact only for |x| < 2**(24-20) = 16, so images scaled by
    # 1e4 overflow while unscaled ones do not.
    mesh = sharding.make_mesh()
    graphdef, optimizer, schedule, state = _fresh_state(frac_bits=20)
    rep = sharding.replicated_sharding(mesh)
    step = ts.compile_train_step(
        training.make_train_step(graphdef, _loss_fn, optimizer, schedule=schedule,
                                 stop_on_nonfinite=stop_on_nonfinite),
        sharding.replicate(state, mesh), sharding.shard_batch(_batch(), mesh),
        state_sharding=rep, batch_sharding=sharding.batch_sharding(mesh), metrics_sharding=rep)
    return mesh, step


def _state_on_mesh(frac_bits=9):
    mesh = sharding.make_mesh()
    _, _, _, state = _fresh_state(frac_bits)
    return mesh, sharding.replicate(state, mesh)


def _biggest_array_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and os.sep + "d" + os.sep in f]
    return max(files, key=os.path.getsize)


def _garble(path, offset_fraction=0.5, count=64):
    data = bytearray(pathlib.Path(path).read_bytes())
    start = int(len(data) * offset_fraction)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    pathlib.Path(path).write_bytes(bytes(data))


# --------------------------------------------------------------------------- overflow policy


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_overflow_step_follows_the_policy_and_is_never_checkpointed(tmp_path, policy):
    mesh, step = _overflow_setup(policy == "stop")
    _, state = _state_on_mesh(frac_bits=20)
    overflow_step = 5  # the 6th step (0-based), in epoch 2 of 2

    def get_batch(s):
        return sharding.shard_batch(_batch(seed=s, scale=1e4 if s == overflow_step else 1.0),
                                    mesh)

    settings = LoopSettings(num_epochs=2, steps_per_epoch=4, log_every_steps=2,
                            eval_every_epochs=1, on_nonfinite=policy, progress="off",
                            examples_per_step=BATCH)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every_steps=3, keep=10)
    writer = MetricsWriter(str(tmp_path / "metrics.jsonl"))

    def run():
        try:
            return run_loop(name="m", state=state, step_fn=step, get_batch=get_batch,
                            settings=settings, checkpointer=ckpt, writer=writer,
                            evaluate=lambda s: {"score": 0.0}, best_metric="score")
        finally:
            ckpt.close()

    if policy == "stop":
        with pytest.raises(RangeOverflowError,
                           match=f"fixed-point range overflow at step {overflow_step + 1} "):
            run()
        saved = Checkpointer(str(tmp_path / "ckpt"), save_every_steps=3, keep=10)
        assert saved.all_steps() == [3, 4]  # nothing after the bad step was written
        restored, _ = saved.restore(state, sharding.replicated_sharding(mesh))
        saved.close()
        assert int(restored.first_overflow_step) == -1 and int(restored.num_overflow) == 0
        return

    final, result = run()
    assert int(final.step) == 8
    assert result.overflow_steps == 1 and result.skipped_steps == 1
    assert result.nonfinite_steps == 0
    assert int(final.num_overflow) == 1 and int(final.first_overflow_step) == overflow_step
    train = read_records(str(tmp_path / "metrics.jsonl"), kind="train")
    assert sum(r.get("overflow_steps", 0) for r in train) == 1


def test_overflow_update_is_held_back():
    """The update of the overflowing step is not applied: params and optimizer state keep
    their values; the next good step trains on ("skip" policy)."""
    mesh, step = _overflow_setup(False)
    _, state = _state_on_mesh(frac_bits=20)
    state, metrics = step(state, sharding.shard_batch(_batch(0), mesh))
    assert not bool(metrics["overflow"]) and not bool(metrics["skipped"])
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = step(state, sharding.shard_batch(_batch(1, scale=1e4), mesh))
    assert bool(metrics["overflow"]) and bool(metrics["skipped"])
    assert not bool(metrics["nonfinite"])
    chex.assert_trees_all_equal(jax.device_get((state.params, state.opt_state)), before)
    state, metrics = step(state, sharding.shard_batch(_batch(2), mesh))
    assert not bool(metrics["skipped"])
    assert int(state.num_overflow) == 1 and int(state.first_overflow_step) == 1


# --------------------------------------------------------------------------- corruption


def _three_checkpoints(directory):
    """Checkpoints at steps 1, 2, 3 whose states differ (params shifted by the step)."""
    mesh, state = _state_on_mesh()
    ckpt = Checkpointer(directory, save_every_steps=1, keep=5)
    states = {}
    for s in (1, 2, 3):
        states[s] = state.replace(
            step=jnp.int32(s),
            params=jax.tree_util.tree_map(lambda p, s=s: p + s, state.params))
        ckpt.save(s, states[s], {"note": s})
    ckpt.close()
    return mesh, state, states


def test_corrupted_checkpoints_are_reported_and_skipped(tmp_path, capsys):
    directory = str(tmp_path / "ckpt")
    mesh, like, states = _three_checkpoints(directory)
    rep = sharding.replicated_sharding(mesh)
    # Step 3: an array file garbled in place. Step 2: its recorded fingerprint no longer
    # matches its arrays (as if an array file had been silently replaced).
    _garble(_biggest_array_file(os.path.join(directory, "3")))
    record_path = pathlib.Path(directory, "2", "record", "metadata")
    record = json.loads(record_path.read_text())
    record[FINGERPRINT_KEY] = (record[FINGERPRINT_KEY] + 1) % 2**32
    record_path.write_text(json.dumps(record))
    # A leftover of a write that was killed half-way: never picked, cleared on open.
    leftover = os.path.join(directory, "4.orbax-checkpoint-tmp-1700000000")
    os.makedirs(os.path.join(leftover, "state"))

    ckpt = Checkpointer(directory, save_every_steps=1, keep=5)
    assert ckpt.all_steps() == [1, 2, 3]
    capsys.readouterr()
    state, record = ckpt.restore(like, rep)
    out = capsys.readouterr().out.splitlines()
    chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(states[1]))
    assert record == {"note": 1}
    assert len(out) == 3, out  # one line per bad checkpoint, one for the fallback
    assert out[0].startswith(f"checkpoint step 3 in {directory} is unusable (")
    assert out[1].startswith(f"checkpoint step 2 in {directory} is unusable (")
    assert "fingerprint" in out[1] and "altered" in out[1]
    assert out[2] == "resuming from checkpoint step 1 instead of the unusable steps 3, 2"
    # The bad ones were moved aside (kept for inspection), so the run can write steps 2
    # and 3 again.
    assert ckpt.all_steps() == [1]
    assert sorted(n.split("-")[0] for n in os.listdir(directory + ".corrupt")) == ["2", "3"]
    ckpt.save(2, states[2], {"note": "again"})
    ckpt.wait()
    assert not os.path.exists(leftover)  # cleared (in the background) since the open
    assert ckpt.restore(like, rep)[1] == {"note": "again"}
    ckpt.close()


@pytest.mark.parametrize("damage", ["truncate", "delete_state", "bad_record"])
def test_no_usable_checkpoint_starts_fresh_with_a_message(tmp_path, capsys, damage):
    directory = str(tmp_path / "ckpt")
    mesh, like, _ = _three_checkpoints(directory)
    for s in (1, 2, 3):
        step_dir = os.path.join(directory, str(s))
        if damage == "truncate":
            path = pathlib.Path(_biggest_array_file(step_dir))
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        elif damage == "delete_state":
            for f in glob.glob(os.path.join(step_dir, "state", "*")):
                if os.path.isfile(f):
                    os.remove(f)
        else:
            pathlib.Path(step_dir, "record", "metadata").write_text("{cut sh")
    ckpt = Checkpointer(directory, save_every_steps=1, keep=5)
    capsys.readouterr()
    assert ckpt.restore(like, sharding.replicated_sharding(mesh)) is None
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" in ")[0] for line in out[:3]] == [
        "checkpoint step 3", "checkpoint step 2", "checkpoint step 1"]
    assert all("is unusable (" in line and "Traceback" not in line for line in out[:3])
    assert out[3] == f"no usable checkpoint left in {directory}; starting from step 0"
    ckpt.close()


# --------------------------------------------------------------------------- SIGKILL


KILL_SCRIPT = r"""
import sys
import tensorflow_datasets as tfds
from experiments import vit_cifar
from experiments.configs.vit_cifar import get_config

config = get_config("tiny")
config.mode = "bdia"  # random γ signs and dropout masks every step: the RNG stream matters
# TINY_BDIA_FLAGS' model: the session's compilation cache then serves its programs.
config.model.update(dropout=0.1, attention_dropout=0.1)
config.train.update(num_epochs=EPOCHS, checkpoint_every_steps=2, keep_checkpoints=3,
                    log_every_steps=1, eval_every_epochs=EPOCHS, progress="off")
config.eval.sweep_gammas = ()
with tfds.testing.mock_data(num_examples=256):
    vit_cifar.train_and_evaluate(config, sys.argv[1])
"""
EPOCHS = 2
STEPS = EPOCHS * 256 // 32


def _launch(workdir):
    return subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.replace("EPOCHS", str(EPOCHS)), str(workdir)],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished_steps(directory):
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _records(workdir):
    out = []
    for record in read_records(str(workdir / "metrics.jsonl")):
        record.pop("time")
        out.append(record)
    return out


@pytest.mark.slow
def test_sigkill_mid_run_then_corrupted_latest_checkpoint_resume_bit_identical(tmp_path):
    """Kill -9 a training process once it has written checkpoints, garble its newest
    checkpoint, rerun the same command: the rerun reports the bad checkpoint in one line,
    resumes from the one before, and ends with bit-identical parameters, optimizer state
    and metric records to an uninterrupted run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    victim = _launch(killed)
    ckpt_dir = killed / "checkpoints" / "bdia"
    deadline = time.monotonic() + 300
    reference = None
    while len(_finished_steps(ckpt_dir)) < 3 and victim.poll() is None:
        assert time.monotonic() < deadline, "no checkpoints appeared"
        if reference is None and _finished_steps(ckpt_dir):
            # Concurrently with the run that gets killed, once that one has compiled its
            # train step: the reference loads it from the session's compilation cache.
            reference = _launch(straight)
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim_out, _ = victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, victim_out[-3000:]
    kept = _finished_steps(ckpt_dir)
    assert len(kept) >= 2 and kept[-1] < STEPS, kept  # killed in the middle of the run
    assert not (killed / "summary.json").exists()

    _garble(_biggest_array_file(str(ckpt_dir / str(kept[-1]))))
    # The rerun starts after the reference has ended, so it finds both of the reference's
    # compiled steps (train and evaluation) in the cache.
    reference = reference or _launch(straight)
    reference_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_out[-3000:]
    rerun = _launch(killed)
    rerun_out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, rerun_out[-3000:]
    assert "Traceback" not in rerun_out
    assert f"checkpoint step {kept[-1]} in {ckpt_dir} is unusable (" in rerun_out
    assert f"resumed from the checkpoint at step {kept[-2]}/{STEPS}" in rerun_out

    a = restore_on_one_device(str(straight / "checkpoints" / "bdia" / str(STEPS) / "state"))
    b = restore_on_one_device(str(ckpt_dir / str(STEPS) / "state"))
    assert int(a["step"]) == int(b["step"]) == STEPS
    chex.assert_trees_all_equal(a["params"], b["params"])
    chex.assert_trees_all_equal(a["opt_state"], b["opt_state"])
    assert _records(straight) == _records(killed)


# --------------------------------------------------------------------------- quiet restore


def test_random_bytes_in_the_manifest_give_one_line_and_the_fallback(tmp_path, capfd,
                                                                    monkeypatch):
    """A garbled manifest.ocdbt fails the step's first read: one line, the fallback, and
    nothing from Orbax's async reader or TensorStore's threads (they report through
    sys.unraisablehook, which pytest would turn into a mere warning)."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    directory = str(tmp_path / "ckpt")
    mesh, like, states = _three_checkpoints(directory)
    manifests = glob.glob(os.path.join(directory, "3", "state", "**", "manifest.ocdbt"),
                          recursive=True)
    assert manifests
    rng = np.random.default_rng(0)
    for path in manifests:
        size = os.path.getsize(path)
        pathlib.Path(path).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    ckpt = Checkpointer(directory, save_every_steps=1, keep=5)
    # Whether the leaked reads print depends on thread timing; what must hold every time is
    # that the bad step never reaches Orbax's async reader.
    orbax_restored = []
    orbax_restore = ckpt._manager.restore
    monkeypatch.setattr(ckpt._manager, "restore", lambda step, **kwargs: (
        orbax_restored.append(step), orbax_restore(step, **kwargs))[1])
    capfd.readouterr()
    state, record = ckpt.restore(like, sharding.replicated_sharding(mesh))
    ckpt.close()
    assert orbax_restored == [2]
    gc.collect()  # abandoned coroutines would report here...
    time.sleep(0.5)  # ...and TensorStore's callbacks on their threads
    out, err = capfd.readouterr()
    assert not unraisable, [f"{u.exc_type.__name__}: {u.exc_value} in {u.object}"
                            for u in unraisable]
    assert err == "", err
    chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(states[2]))
    assert record == {"note": 2}
    assert out.splitlines() == [
        out.splitlines()[0],
        "resuming from checkpoint step 2 instead of the unusable step 3"], out
    assert out.startswith(f"checkpoint step 3 in {directory} is unusable (")
    assert "manifest" in out.splitlines()[0]


# --------------------------------------------------------------------------- config mismatch


def _like_state(**model):
    """A step-0 state of the tiny BDIA-ViT of ``_fresh_state`` with ``model`` changed."""
    model = ViT(vit_config("tiny", update="bdia", backprop="reversible", frac_bits=9, **model),
                rngs=nnx.Rngs(0))
    optimizer, _ = ts.make_optimizer(_optim(), 20, 10)
    return training.init(model, optimizer, jax.random.PRNGKey(0))[1]


@pytest.mark.parametrize("change,fragment", [
    (dict(width=16, num_heads=2, mlp_dim=32),
     "params.cls_token.value is float32[1, 1, 32] there but float32[1, 1, 16] in this config"),
    (dict(depth=1), "float32[2, 32] there but float32[1, 32] in this config"),
    (dict(pool="mean"), "it has 'params.cls_token.value', which this config lacks (0 missing, 3 extra arrays)"),
])
def test_a_config_mismatch_stops_without_touching_the_checkpoints(tmp_path, change, fragment):
    directory = str(tmp_path / "ckpt")
    mesh, _, _ = _three_checkpoints(directory)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    ckpt = Checkpointer(directory, save_every_steps=1, keep=5)
    with pytest.raises(CheckpointMismatchError) as error:
        ckpt.restore(_like_state(**change), sharding.replicated_sharding(mesh))
    ckpt.close()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"checkpoint step 3 in {directory} was written with a different config: ")
    assert fragment in message
    assert message.endswith("resume with the config it was written with, or use a new "
                            "--workdir")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert not os.path.exists(directory + ".corrupt")


# --------------------------------------------------------------------------- one run per workdir


# ``python -m experiments.vit_cifar <flags>`` on mock CIFAR-10 (256 images of each split).
CLI_SCRIPT = r"""
import runpy, sys
import tensorflow_datasets as tfds
with tfds.testing.mock_data(num_examples=256):
    runpy.run_module("experiments.vit_cifar", run_name="__main__", alter_sys=True)
"""
# The tiny BDIA-ViT with dropout: the model (so the train and evaluation programs) of the
# SIGKILL test, tests/test_vit_cifar_resume.py and the one-device run of
# tests/test_vit_cifar_multidevice.py, which the session's compilation cache shares.
TINY_BDIA_FLAGS = ("--config=experiments/configs/vit_cifar.py:tiny", "--config.mode=bdia",
                   "--config.model.dropout=0.1", "--config.model.attention_dropout=0.1")
HOLD_SCRIPT = r"""
import sys, time
from experiments.common.workdir import claimed_workdir
with claimed_workdir(sys.argv[1], "unused"):
    print("holding", flush=True)
    time.sleep(600)
"""


def _python(script, *args):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                            env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*"))


def test_a_second_run_on_a_workdir_in_use_stops_naming_the_owner(tmp_path, capsys):
    import socket

    from experiments.common.workdir import LOCK_NAME, claimed_workdir

    workdir = tmp_path / "run"
    holder = _python(HOLD_SCRIPT, workdir)
    try:
        assert holder.stdout.readline() == "holding\n", holder.stderr.read()
        held = json.loads((workdir / LOCK_NAME).read_text())
        owner = f"pid {holder.pid} on host {socket.gethostname()}, started {held['started']}"
        assert held["pid"] == holder.pid
        before = _listing(workdir)
        second = _python(CLI_SCRIPT, "--config=experiments/configs/vit_cifar.py:tiny",
                         f"--workdir={workdir}")
        out, err = second.communicate(timeout=300)
        assert second.returncode == 1, out + err
        assert "Traceback" not in out + err
        assert err.strip().splitlines() == [
            f"error: --workdir {workdir} is in use by another run ({owner}); wait for it to "
            f"end, stop it, or pass another --workdir"], err
        assert _listing(workdir) == before  # the second run wrote nothing
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the kernel drops the lock
        holder.communicate(timeout=60)
    assert (workdir / LOCK_NAME).exists()
    capsys.readouterr()
    with claimed_workdir(str(workdir), "unused") as claimed:
        assert claimed == str(workdir)
        assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert capsys.readouterr().out == (
        f"{workdir}: taking over the lock of a run that ended without releasing it "
        f"({owner})\n")
    assert not (workdir / LOCK_NAME).exists()


def _signal_after_a_new_checkpoint(process, ckpt_dir, signum, after=0):
    """Send ``signum`` once a checkpoint later than step ``after`` exists; its output, and
    a line saying when the signal went out (for the failure messages)."""
    start = time.monotonic()
    while not [s for s in _finished_steps(ckpt_dir) if s > after] and process.poll() is None:
        assert time.monotonic() < start + 300, "no checkpoint appeared"
        time.sleep(0.02)
    sent = (f"signal {signum} sent after {time.monotonic() - start:.1f}s, seeing checkpoints "
            f"{_finished_steps(ckpt_dir)}, to a process that "
            f"{'was running' if process.poll() is None else 'had exited'}\n")
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return out, sent + err


def test_a_ctrl_c_during_asyncio_run_is_not_lost():
    """asyncio.run (Orbax runs it on the main thread) swaps Python's SIGINT handler for one
    that only cancels its coroutine, so a Ctrl-C is lost when the coroutine finishes anyway
    (a run then trained to the end, exit 0). The command line's own handler is left alone
    and raises."""
    from experiments.common.config import on_sigint

    async def finishes_anyway():
        os.kill(os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            pass  # a library's coroutine that cleans up and returns

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asyncio.run(finishes_anyway())  # Python's handler: the interrupt is gone
        signal.signal(signal.SIGINT, on_sigint)
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(finishes_anyway())
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_ctrl_c_or_kill_9_then_the_same_command_resumes(tmp_path):
    """Ctrl-C (SIGINT) ends the run with one line and exit code 130 and releases the lock;
    SIGTERM (a scheduler's stop) likewise, with exit code 143; kill -9 leaves the lock file
    behind, and the next run takes it over. Each time the same command resumes from the
    last checkpoint."""
    import socket

    from experiments.common.workdir import LOCK_NAME

    workdir = tmp_path / "run"
    epochs, steps = 50, 50 * 256 // 32
    flags = [*TINY_BDIA_FLAGS, f"--workdir={workdir}", f"--config.train.num_epochs={epochs}",
             f"--config.train.eval_every_epochs={epochs}", "--config.train.progress=off"]
    ckpt_dir = workdir / "checkpoints" / "bdia"

    first = _python(CLI_SCRIPT, *flags)
    out, err = _signal_after_a_new_checkpoint(first, ckpt_dir, signal.SIGINT)
    assert first.returncode == 130, err + out  # err begins with when the signal went out
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1] == (
        "interrupted (Ctrl-C); rerun the same command to resume from the last checkpoint")
    assert not (workdir / LOCK_NAME).exists()
    after_ctrl_c = _finished_steps(ckpt_dir)[-1]

    term = _python(CLI_SCRIPT, *flags)
    out, err = _signal_after_a_new_checkpoint(term, ckpt_dir, signal.SIGTERM, after_ctrl_c)
    assert term.returncode == 143, err + out
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1] == (
        "terminated (SIGTERM); rerun the same command to resume from the last checkpoint")
    assert f"[BDIA-ViT] resumed from the checkpoint at step {after_ctrl_c}/{steps}" in out
    assert not (workdir / LOCK_NAME).exists()
    after_term = _finished_steps(ckpt_dir)[-1]

    second = _python(CLI_SCRIPT, *flags)
    out, err = _signal_after_a_new_checkpoint(second, ckpt_dir, signal.SIGKILL, after_term)
    assert second.returncode == -signal.SIGKILL, err + out
    assert f"[BDIA-ViT] resumed from the checkpoint at step {after_term}/{steps}" in out
    assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == second.pid
    after_kill = _finished_steps(ckpt_dir)[-1]
    assert after_ctrl_c < after_term < after_kill < steps, "the run ended before the signal"

    third = _python(CLI_SCRIPT, *flags, f"--config.train.stop_after_steps={after_kill + 1}")
    out, err = third.communicate(timeout=300)
    assert "Traceback" not in out + err
    assert (f"taking over the lock of a run that ended without releasing it (pid "
            f"{second.pid} on host {socket.gethostname()}, started ") in out, out + err
    assert f"[BDIA-ViT] resumed from the checkpoint at step {after_kill}/{steps}" in out
    assert f"stopped after step {after_kill + 1}" in out + err
    assert not (workdir / LOCK_NAME).exists()

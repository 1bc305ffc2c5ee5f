"""Shared training infrastructure (experiments/common): train step, non-finite policy,
checkpoints, loop, optimizer, config checks, metrics records."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from float_bounds import ELEMENTWISE_ULPS, U

from bdia_jax import training
from bdia_jax.models import ViT, vit_config
from experiments.common import config as config_lib
from experiments.common import sharding, trainer
from experiments.common import train_state as ts
from experiments.common.checkpoint import Checkpointer
from experiments.common.loop import (
    LoopSettings,
    NonFiniteError,
    TrainingInterrupted,
    run_loop,
)
from experiments.common.metrics import MetricsWriter, read_records

BATCH = 8


def _optim(**overrides):
    c = ml_collections.ConfigDict(dict(
        name="adamw", schedule="warmup_cosine", learning_rate=3e-3, warmup_epochs=0.0,
        end_learning_rate_factor=0.1, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
        momentum=0.9, grad_clip_norm=1.0))
    c.update(overrides)
    return c


def _loss_fn(model, batch, key):
    """Cross-entropy; the batch's "scale" ([b] float32) multiplies the loss, so a NaN in it
    poisons exactly that step."""
    logits, aux = model(batch["image"], key=key, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss * jnp.mean(batch["scale"]), {"overflow": aux["overflow"],
                                             "nonfinite": aux["nonfinite"]}


def _batch(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, BATCH).astype(np.int32),
            "scale": np.full(BATCH, scale, np.float32)}


def _fresh_state(update):
    backprop = "reversible" if update == "bdia" else "autodiff"
    model = ViT(vit_config("tiny", update=update, backprop=backprop), rngs=nnx.Rngs(0))
    optimizer, schedule = ts.make_optimizer(_optim(), 20, 10)
    graphdef, state = training.init(model, optimizer, jax.random.PRNGKey(0))
    return graphdef, optimizer, schedule, state


@functools.cache
def _compiled_step(update, stop_on_nonfinite):
    # Compiling is the slow part: one executable per variant, shared by the tests.
    mesh = sharding.make_mesh()
    graphdef, optimizer, schedule, state = _fresh_state(update)
    rep = sharding.replicated_sharding(mesh)
    return ts.compile_train_step(
        training.make_train_step(graphdef, _loss_fn, optimizer, schedule=schedule,
                                 stop_on_nonfinite=stop_on_nonfinite),
        sharding.replicate(state, mesh), sharding.shard_batch(_batch(), mesh),
        state_sharding=rep, batch_sharding=sharding.batch_sharding(mesh),
        metrics_sharding=rep)


def _setup(update="bdia", stop_on_nonfinite=True):
    """(mesh, graphdef, fresh replicated step-0 state, compiled step)."""
    mesh = sharding.make_mesh()
    graphdef, _, _, state = _fresh_state(update)
    return (mesh, graphdef, sharding.replicate(state, mesh),
            _compiled_step(update, stop_on_nonfinite))


def _host(tree):
    return jax.device_get(tree)


def test_train_step_learns_and_reports_exact_reversal():
    mesh, _, state, step = _setup("bdia")
    batch = sharding.shard_batch(_batch(), mesh)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["reversal_error"]) == 0.0
        assert not bool(metrics["nonfinite"])
    assert int(state.step) == 6
    assert losses[-1] < losses[0] - 0.1, losses
    # Probes are never updated: they stay exactly 0.
    chex.assert_trees_all_equal(
        jax.tree_util.tree_leaves(state.probes), [jnp.zeros((), jnp.float32)])


def test_step_keys_follow_the_step_not_the_history():
    """fold_in(base_key, step): two states at the same step with the same params give the
    same update, however they got there (this is what makes resume exact)."""
    mesh, _, state, step = _setup("bdia")
    batch = sharding.shard_batch(_batch(), mesh)
    state, _ = step(state, batch)
    twin = jax.tree_util.tree_map(lambda x: x.copy(), state)
    a, ma = step(state, batch)
    b, mb = step(twin, batch)
    chex.assert_trees_all_equal(_host(a.params), _host(b.params))
    chex.assert_trees_all_equal(_host(ma), _host(mb))


def test_nonfinite_update_is_held_back():
    # stop_on_nonfinite=False ("skip": the next good update goes through) is the same
    # training.make_train_step hold, asserted in tests/test_training.py
    # (test_a_bad_step_holds_the_update); this checks the hold through the compiled,
    # donated step of the experiments, whose one executable (BDIA) every test here shares.
    mesh, _, state, step = _setup("bdia")
    good = sharding.shard_batch(_batch(), mesh)
    bad = sharding.shard_batch(_batch(scale=np.nan), mesh)
    state, _ = step(state, good)
    before = _host(state.params)
    before_opt = _host(state.opt_state)
    state, metrics = step(state, bad)
    assert bool(metrics["nonfinite"])
    chex.assert_trees_all_equal(_host(state.params), before)
    chex.assert_trees_all_equal(_host(state.opt_state), before_opt)
    assert int(state.num_nonfinite) == 1 and int(state.first_nonfinite_step) == 1
    state, metrics = step(state, good)
    assert not bool(metrics["nonfinite"])
    chex.assert_trees_all_equal(_host(state.params), before)  # every later update is held
    assert int(state.step) == 3


def _run(tmp_path, step, state, mesh, *, poison_step=None, policy="stop", stop_after=0,
         epochs=2, spe=4):
    def get_batch(s):
        return sharding.shard_batch(_batch(seed=s, scale=np.nan if s == poison_step else 1.0),
                                    mesh)

    settings = LoopSettings(num_epochs=epochs, steps_per_epoch=spe, log_every_steps=2,
                            eval_every_epochs=1, stop_after_steps=stop_after,
                            on_nonfinite=policy, progress="off", examples_per_step=BATCH)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every_steps=3, keep=10)
    writer = MetricsWriter(str(tmp_path / "metrics.jsonl"))
    try:
        return run_loop(name="m", state=state, step_fn=step, get_batch=get_batch,
                        settings=settings, checkpointer=ckpt, writer=writer,
                        evaluate=lambda s: {"score": float(s.step)}, best_metric="score"), ckpt
    finally:
        ckpt.close()


def test_loop_stops_at_a_nonfinite_step_and_never_checkpoints_it(tmp_path):
    mesh, _, state, step = _setup("bdia")
    # Batch 4 (0-based) is step 5: steps count from 1, like checkpoints and records.
    with pytest.raises(NonFiniteError, match="at step 5 .*from step 4 or earlier"):
        _run(tmp_path, step, state, mesh, poison_step=4)
    saved = Checkpointer(str(tmp_path / "ckpt"), save_every_steps=3, keep=10)
    assert saved.latest_step() == 4  # saved after step 3 and at the epoch end (step 4)
    restored, _ = saved.restore(state, sharding.replicated_sharding(mesh))
    assert int(restored.first_nonfinite_step) == -1  # the poisoned update is not in it
    saved.close()


def test_loop_skip_policy_counts_and_continues(tmp_path, capsys):
    mesh, _, state, step = _setup("bdia")
    (state, result), _ = _run(tmp_path, step, state, mesh, poison_step=5, policy="skip")
    assert int(state.step) == 8 and result.nonfinite_steps == 1
    # ...and says so once, at the end.
    assert capsys.readouterr().out.count("of 8 updates were skipped (non-finite: 1,") == 1
    assert result.best == 8.0 and result.best_step == 8
    records = read_records(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]


def test_loop_interruption_and_resume(tmp_path):
    mesh, _, state, step = _setup("bdia")
    with pytest.raises(TrainingInterrupted):
        _run(tmp_path, step, state, mesh, stop_after=5)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every_steps=3, keep=10)
    assert ckpt.latest_step() == 4
    _, _, fresh, _ = _setup("bdia")
    restored, record = ckpt.restore(fresh, sharding.replicated_sharding(mesh))
    ckpt.close()
    assert int(restored.step) == 4 and record["loop"]["best_step"] == 4


def test_checkpointer_round_trip_and_nan_refusal(tmp_path):
    mesh, _, state, step = _setup("bdia")
    state, _ = step(state, sharding.shard_batch(_batch(), mesh))
    ckpt = Checkpointer(str(tmp_path / "c"), save_every_steps=1, keep=2)
    ckpt.save(1, state, {"note": "x"})
    ckpt.wait()
    restored, record = ckpt.restore(state, sharding.replicated_sharding(mesh))
    chex.assert_trees_all_equal(_host(restored), _host(state))
    assert record == {"note": "x"}
    poisoned = state.replace(params=jax.tree_util.tree_map(lambda x: x * jnp.nan, state.params))
    with pytest.raises(FloatingPointError, match="refusing to checkpoint step 2"):
        ckpt.save(2, poisoned, {})
    for s in (3, 4, 5):
        ckpt.save(s, state, {})
    ckpt.wait()
    assert ckpt.latest_step() == 5
    ckpt.close()


def test_schedule_warms_up_then_decays():
    schedule = ts.make_schedule(_optim(learning_rate=1.0, warmup_epochs=1.0), 100, 10)
    assert float(schedule(0)) == 0.0
    # float32: the cosine within ELEMENTWISE_ULPS u, times (peak - end) / 2 = 0.45, and a few
    # roundings (u each) of values <= 1.
    err = (ELEMENTWISE_ULPS * 0.45 + 4) * U
    assert float(schedule(5)) == pytest.approx(0.5, abs=err)
    assert float(schedule(10)) == pytest.approx(1.0, abs=err)
    assert float(schedule(100)) == pytest.approx(0.1, abs=err)
    constant = ts.make_schedule(_optim(schedule="warmup_constant", learning_rate=2.0), 50, 10)
    assert float(constant(0)) == float(constant(49)) == 2.0


@pytest.mark.parametrize("name", ts.OPTIMIZERS)
def test_every_optimizer_updates_and_clips(name):
    optimizer, _ = ts.make_optimizer(_optim(name=name, grad_clip_norm=0.5,
                                            weight_decay=0.1), 10, 10)
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))}
    opt_state = optimizer.init(params)
    grads = {"w": jnp.full((3, 3), 100.0), "b": jnp.full((3,), 100.0)}
    updates, _ = optimizer.update(grads, opt_state, params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree_util.tree_leaves(updates))


def test_bad_optimizer_config_lists_every_problem():
    checks = config_lib.Checks()
    ts.validate_optim(_optim(name="adagrad", learning_rate=-1.0, b1=1.5), checks)
    with pytest.raises(config_lib.ConfigError) as info:
        checks.raise_if_any()
    lines = str(info.value).splitlines()
    assert "3 problems" in lines[0]
    assert any("--config.optim.name" in line and "adagrad" in line for line in lines)
    assert any("--config.optim.learning_rate" in line for line in lines)
    assert any("--config.optim.b1" in line for line in lines)


def test_batch_divisibility_check():
    mesh = sharding.make_mesh()
    n = sharding.num_data_shards(mesh)
    assert sharding.check_batch_divisible(4 * n, mesh, "train.batch_size") is None
    if n > 1:
        assert "train.batch_size" in sharding.check_batch_divisible(4 * n + 1, mesh,
                                                                    "train.batch_size")


def test_metrics_writer_drops_records_after_a_resumed_step(tmp_path):
    writer = MetricsWriter(str(tmp_path / "m.jsonl"))
    for step in (2, 4, 6):
        writer.write({"model": "a", "kind": "train", "step": step, "loss": np.float32(1.5)})
        writer.write({"model": "b", "kind": "train", "step": step})
    writer.write({"model": "a", "kind": "sweep", "step": 6, "x": float("nan")})
    assert writer.drop_after("a", 4) == 2
    assert [(r["model"], r["step"]) for r in writer.records()] == [
        ("a", 2), ("b", 2), ("a", 4), ("b", 4), ("b", 6)]
    writer.write({"model": "a", "kind": "sweep", "step": 4})
    assert writer.drop_kind("a", "sweep") == 1
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line)["time"], float) for line in lines)


def test_diff_fields_names_changed_leaves():
    old = {"a": 1, "b": {"c": 2, "d": 3}}
    new = {"a": 1, "b": {"c": 5, "d": 3}, "e": 0}
    assert config_lib.diff_fields(old, new) == ["b.c", "e"]
    assert config_lib.diff_fields(old, new, ignore=["b.c", "e"]) == []


def test_loop_warns_once_when_the_reversal_is_not_exact(tmp_path, capsys):
    mesh, _, state, step = _setup("bdia")

    def inexact_step(state, batch):  # the real step, reporting a rebuilt-state error
        state, metrics = step(state, batch)
        return state, {**metrics, "reversal_error": jnp.float32(0.5)}

    (_, result), _ = _run(tmp_path, inexact_step, state, mesh)
    assert result.max_reversal_error == 0.5
    out = capsys.readouterr().out
    assert out.count("did not rebuild the states exactly") == 1
    assert "separate recompute mode" in out  # LoopSettings.reversal_fix


def test_loop_does_not_blame_the_recompute_mode_for_an_overflow(tmp_path, capsys):
    """A step that left the grid's range has no exact reversal to check: it counts as an
    overflow (skipped under "skip"), not as an inexact reversal."""
    # The overflow is reported by the wrapper below, never by the step itself, so the
    # step's own policy variant plays no part: reuse the compiled default one.
    mesh, _, state, step = _setup("bdia")

    def overflowing_step(state, batch):
        state, metrics = step(state, batch)
        return state, {**metrics, "reversal_error": jnp.float32(0.5), "overflow": jnp.asarray(True)}

    (_, result), _ = _run(tmp_path, overflowing_step, state, mesh, policy="skip")
    assert result.max_reversal_error == 0.0 and result.overflow_steps == 8
    assert "did not rebuild" not in capsys.readouterr().out


def test_trainer_names_the_flags_of_the_fixes():
    fixes = trainer._fixes("bdia")
    assert "--config.methods.bdia.recompute=separate" in fixes["reversal_fix"]
    assert "--config.methods.bdia.frac_bits" in fixes["overflow_fix"]
    assert "--config.optim.learning_rate" in fixes["nonfinite_fix"]

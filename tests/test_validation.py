"""Bad input: every config field of vit_cifar rejects a bad value with one line naming the
field and the allowed values; bad command lines end with one line, not a traceback; the
multi-host and FSDP helpers of experiments/common/sharding.py."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from bdia_jax import models, training
from experiments import vit_cifar
from experiments.common import config as config_lib
from experiments.common import sharding
from experiments.common import train_state as ts
from experiments.configs.vit_cifar import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FakeMesh:
    """Stands in for a mesh of ``devices`` devices (validation reads only its sizes)."""

    def __init__(self, devices):
        self.shape = {"data": devices, "fsdp": 1}
        self.size = devices


def _set(config, path, value):
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value


# (field, bad value, fragment of the one line that must name it)
BAD_VALUES = [
    ("preset", "huge", "must be one of ('quick', 'paper', 'tiny', 'overfit', 'gamma_ablation'), "
     "got 'huge'"),
    ("seed", -1, "must be an int >= 0, got -1"),
    ("mode", "both", "must be one of ('compare', 'table1', 'gamma_ablation', 'standard', 'bdia', "
     "'bdia_g000', 'bdia_g025', 'bdia_g050', 'bdia_g060', 'revvit'), got 'both'"),
    ("model.image_size", 0, "must be an int >= 1, got 0"),
    ("model.patch_size", 5, "image_size (32) must be a multiple of patch_size (5)"),
    ("model.num_classes", 0, "must be an int >= 1, got 0"),
    ("model.width", 0, "must be an int >= 1, got 0"),
    ("model.depth", 0, "must be an int >= 1, got 0"),
    ("model.num_heads", 3, "width (32) must be divisible by num_heads (3)"),
    ("model.mlp_dim", -4, "must be an int >= 1, got -4"),
    ("model.dropout", 1.0, "dropout must be in [0, 1), got 1.0"),
    ("model.attention_dropout", -0.1, "attention_dropout must be in [0, 1), got -0.1"),
    ("model.dropout", 0.001, "dropout 0.001 rounds to 0/256 on the uint8 grid of dropout masks"),
    ("model.pool", "max", "pool must be 'cls' or 'mean', got 'max'"),
    ("methods.bdia.backprop", "magic", "backprop must be one of"),
    ("methods.standard.backprop", "reversible", "has no exact inverse; use Autodiff() or Remat()"),
    ("methods.bdia.recompute", "twice", "recompute must be one of"),
    ("methods.bdia.gamma", 0.3, "needs gamma = 2**-m with 1 <= m <= 8 (e.g. 0.5 or 0.25), got 0.3"),
    ("methods.bdia.frac_bits", 21, "frac_bits=21 is out of range for a float32 stream: use 0..20"),
    ("methods.bdia.frac_bits", -1, "frac_bits=-1 is out of range"),
    ("model.compute_dtype", "float8", "compute_dtype must be"),
    ("data.name", "cifar11", "unknown TFDS dataset 'cifar11'"),
    ("data.name", "", "must name a TFDS image dataset such as 'cifar10', got ''"),
    ("data.data_dir", "/nonexistent/tfds", "'/nonexistent/tfds' does not exist"),
    ("data.train_split", "", "must name a TFDS split such as 'train'"),
    ("data.test_split", "", "must name a TFDS split such as 'train'"),
    ("data.num_train_examples", -1, "must be an int >= 0, got -1"),
    ("data.num_test_examples", -5, "must be an int >= 0, got -5"),
    ("data.crop_padding", -2, "must be an int >= 0, got -2"),
    ("optim.name", "adagrad", "must be one of ('adamw', 'adam', 'sgd', 'lamb')"),
    ("optim.schedule", "linear", "must be one of ('warmup_cosine', 'warmup_constant')"),
    ("optim.learning_rate", 0.0, "must be a number > 0, got 0.0"),
    ("optim.warmup_epochs", -1.0, "must be a number >= 0, got -1.0"),
    ("optim.weight_decay", -0.1, "must be a number >= 0, got -0.1"),
    ("optim.b1", 1.0, "must be in [0, 1), got 1.0"),
    ("optim.b2", 1.5, "must be in [0, 1), got 1.5"),
    ("optim.eps", 0.0, "must be a number > 0, got 0.0"),
    ("optim.momentum", 1.0, "must be in [0, 1), got 1.0"),
    ("optim.grad_clip_norm", -1.0, "must be a number >= 0, got -1.0"),
    ("optim.label_smoothing", 1.0, "must be in [0, 1), got 1.0"),
    ("train.num_epochs", 0, "must be an int >= 1, got 0"),
    ("train.batch_size", 0, "must be an int >= 1, got 0"),
    ("train.log_every_steps", 0, "must be an int >= 1, got 0"),
    ("train.eval_every_epochs", 0, "must be an int >= 1, got 0"),
    ("train.checkpoint_every_steps", 0, "must be an int >= 1, got 0"),
    ("train.keep_checkpoints", 0, "must be an int >= 1, got 0"),
    ("train.stop_after_steps", -1, "must be an int >= 0 (0: never), got -1"),
    ("train.on_nonfinite", "ignore", "must be one of ('stop', 'skip'), got 'ignore'"),
    ("train.progress", "maybe", "must be one of ('auto', 'on', 'off'), got 'maybe'"),
    ("eval.batch_size", 0, "must be an int >= 1, got 0"),
    ("eval.sweep_gammas", (0.0, 1.5), "values must be numbers in (-1, 1), got (0.0, 1.5)"),
    ("eval.sweep_num_examples", -1, "must be an int >= 0 (0: all), got -1"),
    ("mesh.fsdp", 0, "must be an int >= 1, got 0"),
    ("mesh.fsdp", 3, "must divide the 4 devices, got 3; use one of (1, 2, 4)"),
    ("distributed.initialize", "maybe", "must be one of ('auto', 'always', 'never')"),
    ("distributed.coordinator_address", "nohost", "must be 'host:port' or empty"),
    ("distributed.num_processes", -1, "must be an int >= 0 (0: from the environment)"),
    ("distributed.process_id", -2, "must be an int >= -1 (-1: from the environment)"),
]


CHECKED_BY_THE_MODEL_CONFIG = ("model.patch_size", "model.num_heads", "model.pool",
                               "model.compute_dtype", "model.dropout", "model.attention_dropout")


@pytest.mark.parametrize("field,value,fragment", BAD_VALUES,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_one_bad_field_gives_one_line_naming_it(field, value, fragment):
    config = get_config("tiny")
    _set(config, field, value)
    with pytest.raises(config_lib.ConfigError) as info:
        vit_cifar.validate_config(config, _FakeMesh(4))
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid vit_cifar config (1 problem):", lines
    assert len(lines) == 2, lines
    # A method is checked by its own objects (the line names the entry); a cross-field rule
    # of the architecture by the model config (the line names config.model).
    owner = (".".join(field.split(".")[:2]) if field.startswith("methods.")
             else "model" if field in CHECKED_BY_THE_MODEL_CONFIG else field)
    assert lines[1].startswith(f"  --config.{owner}: "), lines
    assert fragment in lines[1], lines


def test_batch_not_divisible_by_the_devices():
    config = get_config("tiny")
    config.train.batch_size, config.eval.batch_size = 30, 66
    with pytest.raises(config_lib.ConfigError) as info:
        vit_cifar.validate_config(config, _FakeMesh(4))
    lines = str(info.value).splitlines()[1:]
    assert lines == [
        "  --config.train.batch_size: 30 is not divisible by the 4 devices; use a multiple of 4",
        "  --config.eval.batch_size: 66 is not divisible by the 4 devices; use a multiple of 4",
    ]


def test_process_id_must_be_below_the_process_count():
    config = get_config("tiny")
    config.distributed.update(num_processes=2, process_id=2)
    with pytest.raises(config_lib.ConfigError,
                       match=r"--config.distributed.process_id: must be < "
                             r"distributed.num_processes=2, got 2"):
        vit_cifar.validate_config(config, _FakeMesh(4))


def test_missing_tfds_data_dir_from_the_environment(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/nonexistent/tfds_env")
    config = get_config("tiny")
    with pytest.raises(config_lib.ConfigError,
                       match=r"--config.data.data_dir: is empty, so \$TFDS_DATA_DIR is used, "
                             r"but '/nonexistent/tfds_env' does not exist"):
        vit_cifar.validate_config(config, _FakeMesh(1))


def test_every_preset_validates_on_one_and_on_eight_devices():
    for preset in ("quick", "paper", "tiny"):
        for devices in (1, 8):
            config = get_config(preset)
            config.data.data_dir = ""
            vit_cifar.validate_config(config, _FakeMesh(devices))


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.Popen([sys.executable, "-m", "experiments.vit_cifar", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_command_lines_end_with_one_line():
    runs = {  # concurrently: each is mostly interpreter start-up
        "preset": _cli("--config=experiments/configs/vit_cifar.py:huge"),
        "field": _cli("--config.model.dpth=3"),
        "type": _cli("--config.model.depth=abc"),
    }
    errors = {}
    for name, process in runs.items():
        _, errors[name] = process.communicate(timeout=300)
        assert process.returncode != 0, name
        assert "Traceback" not in errors[name], errors[name]
    assert ("error: flag --config=experiments/configs/vit_cifar.py:huge: ValueError: unknown "
            "vit_cifar preset 'huge'; use one of ('quick', 'paper', 'tiny', 'overfit', "
            "'gamma_ablation')") in errors["preset"]
    assert ("error: --config.model.dpth: 'dpth' is not a config field; Did you mean "
            "\"depth\" instead of \"dpth\"?") in errors["field"]
    assert "error: flag --config.model.depth=abc: invalid literal for int()" in errors["type"]


# --------------------------------------------------------------------------- multi-host


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-4]", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env,wanted", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({**SLURM, "SLURM_NTASKS": "1"}, False),  # a one-task SLURM job is a single process
    ({**SLURM, "SLURM_NTASKS": "4"}, True),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:9", "OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t1"}, False),  # a single TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, True),  # a pod slice
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, True),
])
def test_distributed_wanted_reads_the_launch_environment(env, wanted):
    assert (sharding.distributed_wanted(env) is not None) is wanted


def _dist(**overrides):
    config = get_config("tiny")
    config.distributed.update(overrides)
    return config.distributed


def test_initialize_distributed_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert sharding.initialize_distributed(_dist(initialize="never"), env) is False
    assert sharding.initialize_distributed(_dist(initialize="auto"), {}) is False
    assert calls == []
    sharding.initialize_distributed(_dist(initialize="auto"), env)
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                         "process_id": 3}
    # Config fields win over the environment; "always" needs no environment.
    sharding.initialize_distributed(_dist(initialize="always", coordinator_address="h:5",
                                          num_processes=2, process_id=1), env)
    assert calls[-1] == {"coordinator_address": "h:5", "num_processes": 2, "process_id": 1}
    sharding.initialize_distributed(_dist(initialize="always"), {})
    assert calls[-1] == {}  # JAX's own cluster detection (e.g. on a TPU VM pod)


def test_failed_initialize_is_one_clear_error(monkeypatch):
    def fail(**kwargs):
        raise RuntimeError("connection refused\nmore detail")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(sharding.DistributedInitError) as info:
        sharding.initialize_distributed(_dist(initialize="always"), {})
    text = str(info.value)
    assert "\n" not in text
    assert "RuntimeError: connection refused" in text
    assert "--config.distributed.initialize=never" in text


def test_process_rows_single_process_is_the_whole_batch():
    mesh = sharding.make_mesh()
    np.testing.assert_array_equal(sharding.process_rows(mesh, 12), np.arange(12))


# --------------------------------------------------------------------------- FSDP layout


@pytest.mark.parametrize("shape,size,spec", [
    ((4, 32, 64), 4, P(None, None, "fsdp")),  # the largest divisible axis
    ((64, 32), 4, P("fsdp")),
    ((2, 32, 32), 8, P(None, None, "fsdp")),  # equal sizes: the last one
    ((3, 5), 4, P()),  # nothing divisible: replicated
    ((), 4, P()),  # scalars: replicated
    ((4, 32, 64), 1, P()),  # no fsdp axis: replicated
])
def test_fsdp_spec(shape, size, spec):
    assert sharding.fsdp_spec(shape, size) == spec


def test_train_state_shardings_shard_params_and_optimizer_state_only():
    from flax import nnx

    from bdia_jax.models import ViT, vit_config

    model = ViT(vit_config("tiny", update="bdia"), rngs=nnx.Rngs(0))
    optimizer, _ = ts.make_optimizer(get_config("tiny").optim, 10, 10)
    _, state = training.init(model, optimizer, jax.random.PRNGKey(0))

    # An abstract 1 x 4 mesh: shardings are only built here, not used to place arrays.
    mesh = AbstractMesh((1, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    specs = jax.tree_util.tree_map(lambda s: s.spec, sharding.train_state_shardings(state, mesh))
    param_specs = jax.tree_util.tree_leaves(specs.params, is_leaf=lambda x: isinstance(x, P))
    assert any(s != P() for s in param_specs)
    for leaf, spec in zip(jax.tree_util.tree_leaves(state.params), param_specs, strict=True):
        assert spec == sharding.fsdp_spec(leaf.shape, 4)
    for name in ("step", "base_key", "num_nonfinite", "first_overflow_step"):
        assert getattr(specs, name) == P()


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_sees_any_single_changed_element():
    tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "k": jnp.arange(3),
            "b": jnp.array([True, False])}
    finite, base = ts.finite_and_fingerprint(tree)
    assert finite
    assert ts.finite_and_fingerprint(jax.tree_util.tree_map(jnp.copy, tree)) == (True, base)
    tiny = {**tree, "w": tree["w"].at[2, 3].set(jnp.nextafter(11.0, 12.0))}  # one ulp
    swapped = {**tree, "w": tree["w"].at[0, 0].set(1.0).at[0, 1].set(0.0)}  # two swapped
    flipped = {**tree, "b": jnp.array([True, True])}
    for changed in (tiny, swapped, flipped):
        assert ts.finite_and_fingerprint(changed)[1] != base
    assert ts.finite_and_fingerprint({**tree, "w": tree["w"] * jnp.nan})[0] is False


@pytest.mark.parametrize("experiment", ["lm", "translation"])
@pytest.mark.parametrize("field,value,fragment", [
    ("mesh.fsdp", 3, "must divide the 4 devices, got 3; use one of (1, 2, 4)"),
    ("distributed.initialize", "maybe", "must be one of ('auto', 'always', 'never')"),
    ("train.on_nonfinite", "ignore", "must be one of ('stop', 'skip'), got 'ignore'"),
    ("optim.learning_rate", -1.0, "must be a number > 0, got -1.0"),
])
def test_text_experiments_share_the_checks(experiment, field, value, fragment):
    import importlib

    module = importlib.import_module(f"experiments.{experiment}")
    configs = importlib.import_module(f"experiments.configs.{experiment}")
    config = configs.get_config("tiny")
    _set(config, field, value)
    with pytest.raises(config_lib.ConfigError) as info:
        module.validate_config(config, _FakeMesh(4))
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"  --config.{field}: "), lines
    assert fragment in lines[1], lines


# --------------------------------------------------------------------------- workdir, config file


def test_empty_workdir_flag_is_an_error_not_the_default():
    from experiments.common import workdir as workdir_lib

    assert workdir_lib.resolve(None, "runs/x_tiny") == "runs/x_tiny"
    assert workdir_lib.resolve("out", "runs/x_tiny") == "out"
    for empty in ("", "  "):
        with pytest.raises(workdir_lib.WorkdirError, match=r"^--workdir is empty; give an "
                           r"output folder, or leave the flag out to use runs/x_tiny$"):
            workdir_lib.resolve(empty, "runs/x_tiny")


def _claim(path):
    from experiments.common import workdir as workdir_lib

    with workdir_lib.claimed_workdir(str(path), "unused"):
        pass


def test_workdir_that_is_a_file_or_not_writable_is_one_line(tmp_path, monkeypatch):
    from experiments.common import workdir as workdir_lib

    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    with pytest.raises(workdir_lib.WorkdirError,
                       match=f"^--workdir {a_file} is a file, not a folder; pass a folder"):
        _claim(a_file)
    with pytest.raises(workdir_lib.WorkdirError,
                       match=f"^cannot create --workdir {a_file}/run \\(Not a directory\\); "):
        _claim(a_file / "run")
    assert a_file.read_text() == "keep me"

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: let the check see what a user would
        monkeypatch.setattr(workdir_lib.os, "access", lambda path, mode: False)
    try:
        with pytest.raises(workdir_lib.WorkdirError, match=f"^--workdir {read_only} is not "
                           "writable; pass a folder you can write to$"):
            _claim(read_only)
    finally:
        read_only.chmod(0o755)
    assert os.listdir(read_only) == []


@pytest.mark.parametrize("content,why", [
    ("{garbage", "cannot be read \\(Expecting property name enclosed in double quotes"),
    ("", "cannot be read \\(Expecting value: line 1 column 1"),
    ("[1, 2]", "holds a JSON list, not a config"),
])
def test_garbage_config_json_in_the_workdir_names_the_file(tmp_path, content, why):
    from experiments.common import workdir as workdir_lib

    (tmp_path / "config.json").write_text(content)
    with pytest.raises(workdir_lib.WorkdirError,
                       match=f"^{tmp_path}/config.json (\\(the config .*\\) )?{why}"):
        _claim(tmp_path)
    assert os.listdir(tmp_path) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == content


def test_a_run_stopped_by_its_config_leaves_the_workdir_as_it_was(tmp_path):
    from experiments.common import workdir as workdir_lib

    new = tmp_path / "new"
    with pytest.raises(config_lib.ConfigError):
        with workdir_lib.claimed_workdir(str(new), "unused") as workdir:
            assert os.listdir(workdir) == [workdir_lib.LOCK_NAME]
            (new / "config.json").write_text("{}")  # as check_resume_config does
            raise config_lib.ConfigError("bad field")
    assert not new.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "config.json").write_text('{"seed": 0}')
    with pytest.raises(config_lib.ConfigError):
        with workdir_lib.claimed_workdir(str(kept), "unused"):
            raise config_lib.ConfigError("bad field")
    assert os.listdir(kept) == ["config.json"]


def test_fewer_train_examples_than_one_batch_is_one_line():
    config = get_config("tiny")
    config.data.num_train_examples = 10
    with pytest.raises(config_lib.ConfigError, match=(
            r"^--config.data.num_train_examples=10 is smaller than one batch "
            r"\(--config.train.batch_size=32\), so no training step could run; use at least "
            r"32 examples or a smaller batch$")):
        config_lib.check_train_examples(config)
    for examples in (0, 32, 33):  # 0: all
        config.data.num_train_examples = examples
        config_lib.check_train_examples(config)


def test_a_config_file_that_cannot_be_loaded_is_one_line(tmp_path):
    from absl import flags
    from ml_collections import config_flags

    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    for path, fragment in [
        (tmp_path / "missing.py",
         f"error: --config: cannot load the config file {tmp_path}/missing.py:tiny "
         f"([Errno 2] No such file or directory: '{tmp_path}/missing.py'); pass "
         "--config=experiments/configs/<experiment>.py:<preset>"),
        (broken, f"error: the config file {broken} does not parse as Python (line 1: "),
    ]:
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
        with pytest.raises(SystemExit) as stop:
            config_lib.parse_flags(["prog", f"--config={path}:tiny"], flag_values=flag_values)
        assert str(stop.value).startswith(fragment), str(stop.value)


@pytest.mark.slow
def test_bad_workdirs_and_config_files_end_with_one_line(tmp_path):
    """End to end through ``python -m experiments.vit_cifar``: each fails before any data is
    read, in one line, and leaves the workdir as it was."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "config.json").write_text("{not json")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    tiny = "--config=experiments/configs/vit_cifar.py:tiny"
    runs = {  # concurrently: each is mostly interpreter start-up
        "missing config": _cli(f"--config={tmp_path}/missing.py:tiny",
                               f"--workdir={tmp_path}/new"),
        "empty workdir": _cli(tiny, "--workdir="),
        "file workdir": _cli(tiny, f"--workdir={a_file}"),
        "garbled config.json": _cli(tiny, f"--workdir={garbled}"),
        "small data": _cli(tiny, f"--workdir={tmp_path}/new",
                           "--config.data.num_train_examples=8"),
    }
    expected = {
        "missing config": f"error: --config: cannot load the config file {tmp_path}/missing.py",
        "empty workdir": "error: --workdir is empty; give an output folder, or leave the "
                         "flag out to use runs/vit_cifar_tiny",
        "file workdir": f"error: --workdir {a_file} is a file, not a folder",
        "garbled config.json": f"error: {garbled}/config.json (the config this workdir's run "
                               "was started with) cannot be read (Expecting property name",
        "small data": "error: --config.data.num_train_examples=8 is smaller than one batch",
    }
    for name, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 1, (name, out, err)
        assert "Traceback" not in out + err, (name, err)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and lines[0].startswith(expected[name]), (name, err)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("make, field", [
    (lambda: models.ViTConfig(patch_size=0), "patch_size"),
    (lambda: models.RevViTConfig(image_size=0), "image_size"),
    (lambda: models.Seq2SeqConfig(decoder_depth=0), "decoder_depth"),
    (lambda: models.DecoderConfig(max_len=0), "max_len"),
    (lambda: models.ViTConfig(num_heads=0), "num_heads"),
])
def test_a_bad_model_field_is_a_field_error_naming_it(make, field):
    """Checked before the cross-field rules divide by it; the harness reads ``field``."""
    with pytest.raises(models.FieldError) as info:
        make()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field} must be an int >= 1, got 0")


def test_a_bad_model_field_is_reported_once():
    """The harness lists the model's int fields (every bad one at once) and the model config
    raises a FieldError for the first: the line appears once, by the field's name."""
    config = get_config("tiny")
    config.model.depth = 0
    with pytest.raises(config_lib.ConfigError) as info:
        vit_cifar.validate_config(config, _FakeMesh(4))
    assert str(info.value).splitlines()[1:] == [
        "  --config.model.depth: must be an int >= 1, got 0"]

"""The one training driver of the experiments.

An experiment is a ``Task``: it supplies its data, its model (config class and module),
its loss, its evaluation and its extra reports (the inference-γ sweep, samples, BLEU).
The trainer does everything else, the same way for every experiment:

* config validation: the shared sections here (``seed``, ``mode``, ``models``,
  ``methods`` through the library's method objects, ``train``, ``optim``, ``mesh``,
  ``distributed``), the task's own fields in ``Task.validate``, and the model config's
  own checks by building it;
* the models of a run: ``config.mode`` is "compare" (every name of ``config.models``, in
  order), a mode of the task's ``mode_models`` (its list of names, e.g. vit_cifar's
  "table1"), or one name of ``config.methods``; each entry of ``config.methods`` holds the
  keywords of ``bdia_jax.parse_method``, or ``architecture=<name>`` and that
  architecture's own method fields (``Task.architectures``, e.g. RevViT);
* the seeds: ``config.seeds`` empty trains ``config.seed`` in ``workdir``; else every seed
  in its own ``workdir/seed_<s>/`` (a complete, separately resumable run) and the summary
  and table give mean ± standard deviation over the seeds (``aggregate``);
* per model: the same initialisation, data order and keys; train state on the mesh
  (replicated, or FSDP-sharded with the weights all-gathered in the train AND the eval
  steps); checkpoint and resume (records past the restored step, or all of a model's
  records when no checkpoint is usable, are dropped); the loop; the task's reports; a
  result record (``checkpoints/<name>_result.json``) that a rerun reuses, unless the
  ``eval`` settings changed since: then the final checkpoint is evaluated again. Every
  checkpoint and result carries the fingerprint of the config it was trained with
  (``runs.run_config``: every field but ``eval`` and the resumable ones); one of another
  config (or of none) is never resumed or reused: the run stops in one line;
* the run: ``summary.json``, the side-by-side table, the curves plot.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

import bdia_jax
from bdia_jax import training
from bdia_jax.models import FieldError
from experiments.common import config as config_lib
from experiments.common import memory, metrics, plots, runs, sharding
from experiments.common import train_state as ts
from experiments.common.checkpoint import (
    CONFIG_FINGERPRINT_KEY,
    CONFIG_KEY,
    Checkpointer,
    CheckpointWriteError,
)
from experiments.common.loop import (
    NONFINITE_POLICIES,
    PROGRESS_MODES,
    LoopResult,
    LoopSettings,
    NonFiniteError,
    log,
    run_loop,
)

# Fields of the shared sections that may change between an interrupted run and its
# resumption (a task adds its own, e.g. data paths and eval settings).
RESUMABLE = (
    "mode", "models", "train.stop_after_steps", "train.progress", "train.log_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.async_checkpoints",
    "mesh.fsdp", "distributed.initialize", "distributed.coordinator_address",
    "distributed.num_processes", "distributed.process_id",
)
# Fields that may differ between the configs of one workdir's invocations although they
# change a model's training: each model's result and checkpoints carry the fingerprint of
# its own entry of them (runs.run_config), which is checked before either is reused. So a
# method entry can be added to a run (a new variant beside the finished models).
PER_MODEL = ("methods",)
# Record kinds the loop writes; every other kind is a task report, redone on re-evaluation.
LOOP_KINDS = ("train", "eval")


# --------------------------------------------------------------------------- model configs
# The one place that turns a config's flat method keywords into model-config fields.


def method_fields(method: Mapping[str, Any]) -> dict:
    """The ``update`` / ``backprop`` objects of a model config from the keywords of
    ``bdia_jax.parse_method`` (an architecture entry's: only ``backprop`` and its fields,
    the architecture has its own update). The objects validate their fields; the model
    config checks the pair."""
    method = dict(method)
    if method.pop("architecture", None) is not None:
        return bdia_jax.parse_method(update=None, **method)
    return bdia_jax.parse_method(**method)


def backprop_name(model_config) -> str:
    """"reversible", "autodiff" or "remat": how ``model_config``'s stack is differentiated."""
    return type(model_config.backprop).__name__.lower()


def is_reversible(model_config) -> bool:
    """BDIA's exact reversal: a Reversible method on a model with a BDIA update."""
    return (isinstance(model_config.backprop, bdia_jax.Reversible)
            and isinstance(getattr(model_config, "update", None), bdia_jax.BDIA))


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A model a task trains besides its own (``config.methods.<name>.architecture``).

    config_class(**config.model fields it has, **method_fields(the entry)) builds its
    config (``backprop``: a method object parsed from "reversible" | "autodiff" | "remat"
    and its fields); model_class(config, rngs=...) the model, with the call and aux of the
    task's model. Its reversal (``Reversible``) is exact only in real arithmetic: the
    probe's error is reported, never warned about.
    """

    config_class: type
    model_class: type


def models_for_mode(config: ml_collections.ConfigDict, task: Task | None = None
                    ) -> tuple[str, ...]:
    """"compare" → every name of ``config.models``; a mode of ``task.mode_models`` → its
    names; else the one name ``mode`` gives."""
    if config.mode == "compare":
        return tuple(config.models)
    if task is not None and config.mode in task.mode_models:
        return tuple(task.mode_models[config.mode])
    return (config.mode,)


def seeds_of(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The seeds a run trains: ``config.seeds``, or ``(config.seed,)`` when it is empty."""
    return tuple(config.seeds) or (config.seed,)


def _architecture(task: Task, method: Mapping[str, Any]) -> Architecture | None:
    name = method.get("architecture")
    if name is None:
        return None
    if name not in task.architectures:
        raise ValueError(f"architecture must be one of {tuple(task.architectures)}, got "
                         f"{name!r}.")
    return task.architectures[name]


def split_method(task: Task, method: Mapping[str, Any]) -> tuple[dict, dict]:
    """(model fields, method keywords) of a ``config.methods`` entry: its keys named in
    ``task.method_model_fields`` (e.g. a per-method dropout) override ``config.model``;
    those named in ``task.method_optim_fields`` are neither (``method_optim``)."""
    own = {k: v for k, v in method.items() if k in task.method_model_fields}
    return own, {k: v for k, v in method.items()
                 if k not in own and k not in task.method_optim_fields}


def method_optim(task: Task, config, method: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """``config.optim`` with a ``config.methods`` entry's keys named in
    ``task.method_optim_fields`` (e.g. a per-method learning rate) put over it."""
    own = {k: v for k, v in method.items() if k in task.method_optim_fields}
    optim = config.optim.copy_and_resolve_references()
    optim.update(own)
    return optim


def build_model_config(task: Task, config, method: Mapping[str, Any], data):
    """(model config, model class) of one ``config.methods`` entry (``data`` None while
    validating). An architecture entry gets the ``config.model`` fields its config class
    has; a field it lacks must keep the task's default (else a ValueError naming it)."""
    arch = _architecture(task, method)
    model_fields = {**config.model, **task.model_fields(config, data)}
    if arch is None:
        own, method = split_method(task, method)
        return (task.config_class(**{**model_fields, **own}, **method_fields(method)),
                task.model_class)
    own = {f.name for f in dataclasses.fields(arch.config_class)}
    defaults = {f.name: f.default for f in dataclasses.fields(task.config_class)}
    for field, value in model_fields.items():
        if field not in own and field in defaults and value != defaults[field]:
            raise ValueError(f"{arch.config_class.__name__} has no field {field!r}: keep "
                             f"--config.model.{field}={defaults[field]!r} to train it.")
    fields = {k: v for k, v in model_fields.items() if k in own}
    method = {k: v for k, v in method.items() if k not in task.method_optim_fields}
    return arch.config_class(**fields, **method_fields(method)), arch.model_class


def reversal_kind(model_config) -> str | None:
    """"exact" (BDIA's Reversible: a non-zero error is a defect), "floating-point" (an
    architecture's own reversible backward, e.g. RevViT: its error is only measured) or
    None (no reversal: autodiff or remat)."""
    if is_reversible(model_config):
        return "exact"
    return ("floating-point" if isinstance(model_config.backprop, bdia_jax.Reversible)
            else None)


# --------------------------------------------------------------------------- the task


@dataclasses.dataclass
class ModelRun:
    """One model of a run, as the task's hooks see it.

    name: the ``config.methods`` entry; display: its name in records and tables; method:
    that entry (flat keywords); model_config: the built model config; graphdef: the
    model's NNX graph; gather: the sharding the parameters are all-gathered to inside
    jitted steps (None without FSDP; pass it to ``bdia_jax.training.gathered``); num_steps.
    """

    name: str
    display: str
    seed: int
    method: dict
    config: ml_collections.ConfigDict
    data: Any
    mesh: Any
    workdir: str
    writer: metrics.MetricsWriter
    model_config: Any
    graphdef: Any
    gather: Any
    num_steps: int


class Task:
    """What an experiment supplies; subclass it and set the attributes.

    name: the experiment (``experiments/configs/<name>.py``, ``runs/<name>_<preset>``).
    presets: its presets. config_class, model_class: the model (``model_class(
      config_class(...), rngs=...)``). architectures: other models it trains (name →
      ``Architecture``). mode_models: modes that name a list of models (e.g. "table1").
      display_names: model name → name in records.
    resumable: the task's fields that may change on resume. errors: the task's data
      errors, ended with one line by the command line. data_dir_field, data_dir_help: the
      config field that --data_dir sets, and its help.
    batch_fields: config fields holding batch sizes that must split over the devices.
    int_fields: the task's int fields → their least value; fraction_fields: its rates in
      [0, 1) (validated here; ``validate`` checks the rest). The model's int fields are
      listed too, although its config checks them: the config stops at its first bad field,
      and the user should see every one at once.
    best: (eval metric, "max" | "min", result key) of the best evaluation.
    final: result key → eval metric of the last evaluation.
    method_model_fields: keys a ``config.methods`` entry may hold besides the method, which
      override ``config.model`` for that model (``split_method``).
    method_optim_fields: keys of ``config.optim`` a ``config.methods`` entry may hold, which
      override it for that model (``method_optim``; e.g. LoRA's higher learning rate).
    summary_keys: training metrics of the per-epoch line.
    throughput: (result key, what an example is): examples per second of training.
    table: rows (label, result key, format) at the top of the side-by-side table.
    panels, plot_file, plot_title: the curves plot (``plots.Panel``s).
    """

    name = ""
    presets: tuple[str, ...] = ()
    config_class: type = object
    model_class: type = object
    architectures: Mapping[str, Architecture] = {}
    mode_models: Mapping[str, tuple[str, ...]] = {}
    display_names: Mapping[str, str] = {}
    resumable: tuple[str, ...] = ()
    errors: tuple[type[BaseException], ...] = ()
    data_dir_field, data_dir_help = "data.dir", ""
    batch_fields: tuple[str, ...] = ()
    int_fields: Mapping[str, int] = {}
    fraction_fields: tuple[str, ...] = ()
    best = ("accuracy", "max", "accuracy_best")
    final: Mapping[str, str] = {}
    method_model_fields: tuple[str, ...] = ()
    method_optim_fields: tuple[str, ...] = ()
    summary_keys: tuple[str, ...] = ("loss",)
    throughput = ("examples_per_s", "examples")
    table: tuple[tuple[str, str, str], ...] = ()
    panels: tuple[plots.Panel, ...] = ()
    plot_file = "curves.png"
    plot_title = ""

    def validate(self, config, checks: config_lib.Checks, mesh) -> None:
        """Append problems with the task's own fields (model, data, eval, its train
        fields) to ``checks``."""

    def trainable(self, model_config) -> nnx.filterlib.Filter:
        """The parameters the model trains (``bdia_jax.training``'s ``trainable=``)."""
        del model_config
        return nnx.Param

    def load_data(self, config, workdir: str, mesh):
        raise NotImplementedError

    def data_record(self, data) -> dict:
        """What the data is (summary.json's "data", and the log)."""
        raise NotImplementedError

    def model_fields(self, config, data) -> dict:
        """Model-config fields that come from the data (vocabulary sizes, ...); ``data``
        is None while validating (the config's defaults then stand in)."""
        return {}

    def schedule(self, config, data) -> tuple[int, int, int, int]:
        """(num_epochs, steps_per_epoch, eval_every_epochs, examples_per_step)."""
        raise NotImplementedError

    def batch_fn(self, run: ModelRun) -> Callable[[int], dict]:
        """``step -> batch`` of sharded device arrays (a function of the step alone)."""
        raise NotImplementedError

    def example_batches(self, run: ModelRun, get_batch) -> list[dict]:
        """One batch of every shape the train step will see: each shape is compiled up
        front, so compilation never lands in the timed training windows."""
        return [get_batch(0)]

    def loss_fn(self, config) -> training.LossFn:
        raise NotImplementedError

    def train_batch_shapes(self, config) -> tuple[dict, dict]:
        """For compiling the train step without data: (the largest training batch as
        {name: (shape, numpy dtype)}, the model fields the data would supply, at the
        config's values: vocabulary sizes and the like)."""
        raise NotImplementedError

    def evaluator(self, run: ModelRun) -> Callable[[training.TrainState], dict]:
        raise NotImplementedError

    def report(self, run: ModelRun, state: training.TrainState) -> dict:
        """The task's extra figures of a trained model (merged into its result)."""
        return {}

    def extra_rows(self, results: list[dict]) -> list[tuple[str, Callable, str]]:
        """More rows of the side-by-side table: (label, result -> value or None, format);
        ``results``: one result per model (of the first seed)."""
        return []

    def write_files(self, config, workdir: str, results: list[dict]) -> list[str]:
        """Extra files of the whole run (process 0); returns their names."""
        return []

    def versions(self) -> dict:
        return {}

    def display(self, name: str) -> str:
        return self.display_names.get(name, name)


class ValLossTask(Task):
    """A task scored by validation loss, lower is better (the text tasks): its evaluator
    returns "val_loss" and "val_perplexity"; ``VAL_ROWS`` (below) are their table rows."""

    best = ("val_loss", "min", "val_loss_best")
    final: Mapping[str, str] = {"val_loss_final": "val_loss",
                                "val_perplexity_final": "val_perplexity"}


VAL_ROWS = {"best": ("validation loss (best)", "val_loss_best", "{:.4f}"),
            "final": ("validation loss (final)", "val_loss_final", "{:.4f}"),
            "perplexity": ("validation perplexity (final)", "val_perplexity_final", "{:.2f}")}


# --------------------------------------------------------------------------- task helpers


@functools.lru_cache(maxsize=32)  # the same model in one process (a resumed run): reuse
def _jit_on_model(graphdef, gather, fn, static):
    kwargs = dict(static)

    @jax.jit
    def step(params, probes, rest, *args):
        model = nnx.merge(graphdef, training.gathered(params, gather), probes, rest)
        return fn(model, *args, **kwargs)

    return step


def model_step(run: ModelRun, fn: Callable, *, graphdef=None, **static):
    """``step(state, *args) = fn(model, *args, **static)`` jitted, with the model rebuilt
    from the state inside the jit and its weights all-gathered under FSDP, as in the train
    step. ``fn``: a module-level function (compilations are cached by it); ``graphdef``:
    another graph for the same parameters (default the run's)."""
    step = _jit_on_model(run.graphdef if graphdef is None else graphdef, run.gather, fn,
                         tuple(sorted(static.items())))
    return lambda state, *args: step(state.params, state.probes, state.rest, *args)


def sum_over(step, state, batches, mesh, *args) -> dict[str, float]:
    """Sums of ``step(state, batch, *args)``'s outputs over host ``batches`` (each batch
    sharded over the mesh)."""
    totals: dict[str, float] = {}
    for batch in batches:
        out = sharding.to_host(step(state, sharding.shard_batch(batch, mesh), *args))
        for key, value in out.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


# --------------------------------------------------------------------------- validation


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _set(config, value, *, field: str) -> None:
    *parents, leaf = field.split(".")
    _get(config, ".".join(parents))[leaf] = value


def validate_config(task: Task, config: ml_collections.ConfigDict, mesh) -> None:
    """Raise ``ConfigError`` listing every bad field (one line each, naming the field)."""
    checks = config_lib.Checks()
    checks.one_of(config.preset, task.presets, "preset")
    checks.int_at_least(config.seed, "seed", 0)
    seeds = tuple(config.seeds)
    checks.require(all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
                   and len(set(seeds)) == len(seeds), "seeds",
                   f"must be distinct ints >= 0 (empty: config.seed alone), got {seeds}")
    models, names = tuple(config.models), tuple(config.methods)
    in_order = (*[n for n in models if n in names], *[n for n in names if n not in models])
    checks.one_of(config.mode, ("compare", *task.mode_models, *in_order), "mode")
    checks.require(bool(models) and set(models) <= set(names) and len(set(models)) == len(models),
                   "models", f"must name distinct entries of config.methods {names}, got {models}")
    for mode, listed in task.mode_models.items():
        if config.mode == mode:
            checks.require(set(listed) <= set(names), "methods",
                           f"mode {mode!r} trains {listed}; config.methods lacks "
                           f"{tuple(n for n in listed if n not in names)}")
    methods = {}
    for name in names:
        method = config.methods[name].to_dict()
        try:
            _architecture(task, method)
            methods[name] = method_fields(split_method(task, method)[1])
        except (TypeError, ValueError) as error:
            checks.require(False, f"methods.{name}", str(error).splitlines()[0])
    for field, low in task.int_fields.items():
        checks.int_at_least(_get(config, field), field, low)
    for field in task.fraction_fields:
        checks.fraction(_get(config, field), field)
    task.validate(config, checks, mesh)
    # The model config checks the model's fields (a bad one is a FieldError naming it; one
    # reported above is not reported again), the cross-field rules and a method against its
    # stream: an error with every method is the architecture's, else the method's.
    model_reported = any(f.startswith("model.") for f in checks.fields)
    failures = {}
    for name in methods:
        try:
            build_model_config(task, config, config.methods[name].to_dict(), None)
        except FieldError as error:
            failures[name] = (error.field, error.reason)
        except (TypeError, ValueError, ArithmeticError) as error:
            # Not a ValueError: the model config tripped over a field reported above.
            if isinstance(error, ValueError) or not model_reported:
                failures[name] = (None, str(error).splitlines()[0])
    for name, failure in failures.items():
        field, message = failure
        if len(methods) > 1 and list(failures.values()).count(failure) < len(methods):
            owner, message = f"methods.{name}", f"{field} {message}" if field else message
        else:  # every method's (or the only method's): the architecture's
            owner = f"model.{field}" if field else "model"
        if owner not in checks.fields:  # task.validate reported the field already
            checks.require(False, owner, message)

    if "compute_dtype" in config.model:  # the model config checks the other values
        checks.require(str(config.model.compute_dtype) not in ("float16", "half"),
                       "model.compute_dtype", "float16 is not supported (the training has "
                       "no loss scaling, so small gradients vanish); use 'float32' or "
                       "'bfloat16'")
    t = config.train
    for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        checks.int_at_least(t[field], f"train.{field}")
    checks.int_at_least(t.stop_after_steps, "train.stop_after_steps", 0, " (0: never)")
    checks.one_of(t.async_checkpoints, (True, False), "train.async_checkpoints")
    checks.one_of(t.on_nonfinite, NONFINITE_POLICIES, "train.on_nonfinite")
    checks.one_of(t.progress, PROGRESS_MODES, "train.progress")
    ts.validate_optim(config.optim, checks)
    for name in names:  # a method's own optim fields, under its name
        method = config.methods[name].to_dict()
        own = [k for k in method if k in task.method_optim_fields]
        if own:
            method_checks = config_lib.Checks()
            ts.validate_optim(method_optim(task, config, method), method_checks,
                              prefix=f"methods.{name}")
            checks.problems += [p for p in method_checks.problems
                                if any(f"--config.methods.{name}.{k}:" in p for k in own)]
    sharding.validate_parallel_config(config, mesh, checks)
    for field in task.batch_fields:
        size = _get(config, field)
        if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
            problem = sharding.check_batch_divisible(size, mesh, field)
            if problem:
                checks.problems.append(problem)
    checks.raise_if_any(f"{task.name} config")


# --------------------------------------------------------------------------- one model


def _fixes(name: str) -> dict:
    """The loop's advice, in this config's flags."""
    nonfinite = ("Lower --config.optim.learning_rate, set --config.optim.grad_clip_norm, or "
                 "pass --config.train.on_nonfinite=skip to drop such steps and continue.")
    return dict(
        nonfinite_fix=nonfinite,
        overflow_fix=(f"Lower --config.methods.{name}.frac_bits or "
                      f"--config.optim.learning_rate, or pass "
                      f"--config.train.on_nonfinite=skip to drop such steps and continue."),
        reversal_fix=(f"Set --config.methods.{name}.recompute=separate (or "
                      f"--config.methods.{name}.backprop=remat) and please report the "
                      f"backend and model size."),
        skipped_fix=("Lower --config.optim.learning_rate or set "
                     "--config.optim.grad_clip_norm (summary.json: skipped_steps)."),
    )


@dataclasses.dataclass
class PreparedModel:
    """A model of a run, initialised and placed, its train step compiled (``prepare_model``).

    state: the initial TrainState, placed by state_sharding; step_fn(state, batch) ->
    (state, metrics), compiled for every batch shape the task feeds (``example_batches``);
    get_batch(step) -> the batch of that step; compiled_mem: the compiled memory of the
    largest batch's step (``memory.compiled_memory``); schedule: (num_epochs,
    steps_per_epoch, eval_every_epochs, examples_per_step)."""

    run: ModelRun
    state: Any
    state_sharding: Any
    step_fn: Callable
    get_batch: Callable
    compiled_mem: dict | None
    compile_seconds: float
    num_params: int
    schedule: tuple[int, int, int, int]


def prepare_model(task: Task, config, name: str, data, mesh, workdir: str,
                  writer: metrics.MetricsWriter) -> PreparedModel:
    """The model ``config.methods[name]`` at its seed's initialisation, with the optimizer,
    schedule and train step it trains with (``train_model``; ``benchmarks.experiment_step``
    times this step)."""
    seed = config.seed
    method = config.methods[name].to_dict()
    model_config, model_class = build_model_config(task, config, method, data)
    model = model_class(model_config, rngs=nnx.Rngs(seed))  # same init for all models
    num_epochs, spe, eval_every, examples_per_step = task.schedule(config, data)
    num_steps = num_epochs * spe
    optimizer, schedule = ts.make_optimizer(method_optim(task, config, method), num_steps, spe)
    base_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    trainable = task.trainable(model_config)
    graphdef, state = training.init(model, optimizer, base_key, trainable=trainable)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    del model
    # Parameters and optimizer state: replicated, or FSDP-sharded when mesh.fsdp > 1.
    state_sharding = sharding.train_state_shardings(state, mesh)
    state = sharding.place(state, state_sharding)
    run = ModelRun(name=name, display=task.display(name), seed=seed, method=method,
                   config=config, data=data, mesh=mesh, workdir=workdir, writer=writer,
                   model_config=model_config, graphdef=graphdef,
                   gather=sharding.gather_sharding(mesh), num_steps=num_steps)

    get_batch = task.batch_fn(run)
    compile_start = time.perf_counter()
    train_step = training.make_train_step(graphdef, task.loss_fn(config), optimizer,
                                          trainable=trainable, schedule=schedule,
                                          stop_on_nonfinite=config.train.on_nonfinite == "stop",
                                          gather_params=run.gather)
    step_fn, measured = _compile_per_shape(train_step, state, state_sharding,
                                           task.example_batches(run, get_batch), mesh)
    return PreparedModel(
        run=run, state=state, state_sharding=state_sharding, step_fn=step_fn,
        get_batch=get_batch, compiled_mem=memory.compiled_memory(measured),
        compile_seconds=time.perf_counter() - compile_start, num_params=num_params,
        schedule=(num_epochs, spe, eval_every, examples_per_step))


def train_model(task: Task, config, name: str, data, mesh, workdir: str,
                writer: metrics.MetricsWriter) -> dict:
    """Train (or resume, or reload) the model ``config.methods[name]``, evaluate it, run
    the task's reports; return its result (also in ``checkpoints/<name>_result.json``)."""
    display = task.display(name)
    eval_settings = config_lib.to_dict(config)["eval"]
    run_config = runs.run_config(config, name, resumable=RESUMABLE + task.resumable)
    result_path = os.path.join(workdir, "checkpoints", f"{name}_result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            previous = json.load(f)
        if previous.get(CONFIG_FINGERPRINT_KEY) != runs.fingerprint(run_config):
            # Never reuse (or re-evaluate) another config's model as this one's.
            raise config_lib.ConfigError(
                f"{result_path} was trained with a different config "
                f"({runs.describe_change(previous.get(CONFIG_KEY), run_config)}); rerun "
                f"with the config it was trained with, or use a new --workdir")
        changed = config_lib.diff_fields(previous.get("eval_settings", {}), eval_settings,
                                         prefix="eval.")
        if not changed:
            log(f"[{display}] already finished in this workdir; reusing {result_path}")
            return previous
        log(f"[{display}] already finished in this workdir, but {', '.join(changed)} "
            f"changed since; evaluating its final checkpoint again")

    prepared = prepare_model(task, config, name, data, mesh, workdir, writer)
    run, state, state_sharding = prepared.run, prepared.state, prepared.state_sharding
    method, model_config, num_steps = run.method, run.model_config, run.num_steps
    num_epochs, spe, eval_every, examples_per_step = prepared.schedule
    compiled_mem, compile_seconds = prepared.compiled_mem, prepared.compile_seconds

    t = config.train
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints", name), save_every_steps=t.checkpoint_every_steps,
        keep=t.keep_checkpoints, async_save=t.async_checkpoints, run_config=run_config,
    )
    loop_result = None
    restored = checkpointer.restore(state, state_sharding)
    if restored is not None:
        state, record = restored
        step = int(sharding.to_host(state.step))
        loop_result = LoopResult.from_record(record.get("loop"))
        dropped = writer.drop_after(display, step)
        log(f"[{display}] resumed from the checkpoint at step {step}/{num_steps}"
            f"{f' (dropped {dropped} later records)' if dropped else ''}")
    elif writer.drop_after(display, 0):  # records of a run whose checkpoints are all unusable
        log(f"[{display}] starting from step 0; dropped this model's earlier records")

    fsdp = sharding.fsdp_size(mesh)
    kind = method.get("update", method.get("architecture"))
    log(f"[{display}] {prepared.num_params:,} parameters, update={kind}, "
        f"backprop={backprop_name(model_config)}; {num_steps} steps ({num_epochs} epochs x "
        f"{spe}) of {examples_per_step:.4g} {task.throughput[1]} on "
        f"{sharding.num_data_shards(mesh)} device(s)"
        f"{f' (FSDP over {fsdp})' if fsdp > 1 else ''}; train step compiled in "
        f"{compile_seconds:.1f}s"
        + (f", peak memory estimate {memory.megabytes(compiled_mem['peak_estimate_bytes']):.1f}"
           f" MB/device (temp {memory.megabytes(compiled_mem['temp_bytes']):.1f} MB)"
           if compiled_mem else ""))

    metric, mode, best_key = task.best
    settings = LoopSettings(
        num_epochs=num_epochs, steps_per_epoch=spe, log_every_steps=t.log_every_steps,
        eval_every_epochs=eval_every, stop_after_steps=t.stop_after_steps,
        on_nonfinite=t.on_nonfinite, progress=t.progress,
        examples_per_step=examples_per_step,
        exact_reversal=reversal_kind(model_config) != "floating-point", **_fixes(name),
    )
    try:
        state, loop_result = run_loop(
            name=display, state=state, step_fn=prepared.step_fn, get_batch=prepared.get_batch,
            settings=settings, checkpointer=checkpointer, writer=writer,
            evaluate=task.evaluator(run), best_metric=metric, best_mode=mode,
            result=loop_result, summary_keys=task.summary_keys,
        )
    finally:
        checkpointer.close()
    device_mem = memory.device_memory()

    for kind in {r.get("kind") for r in writer.records(model=display)} - set(LOOP_KINDS):
        writer.drop_kind(display, kind)  # the reports below write them again
    extras = task.report(run, state)

    final = loop_result.last_eval or {}
    step_time = loop_result.step_time_s
    throughput_key, _ = task.throughput
    result = {
        "name": display,
        "update": method.get("update"),
        "backprop": backprop_name(model_config),
        "method": method,
        "num_params": prepared.num_params,
        "steps": num_steps,
        "epochs": num_epochs,
        **{key: final.get(eval_key) for key, eval_key in task.final.items()},
        best_key: loop_result.best,
        "best_step": loop_result.best_step,
        **extras,
        "memory": memory_record(compiled_mem, device_mem),
        "compile_seconds": compile_seconds,
        "step_time_s": step_time,
        throughput_key: examples_per_step / step_time if step_time else None,
        "train_seconds": loop_result.train_seconds,
        "timed_steps": loop_result.timed_steps,
        "reversal": reversal_kind(model_config),
        "reversal_error_max": loop_result.max_reversal_error,
        # Claimed only for BDIA's exact reversal; a floating-point one is just measured.
        "reversal_exact": (loop_result.max_reversal_error == 0.0
                           if reversal_kind(model_config) == "exact" else None),
        "overflow_steps": loop_result.overflow_steps,
        "nonfinite_steps": loop_result.nonfinite_steps,
        "skipped_steps": loop_result.skipped_steps,
        "eval_settings": eval_settings,
        CONFIG_FINGERPRINT_KEY: runs.fingerprint(run_config),
        CONFIG_KEY: run_config,
    }
    metrics.write_json(result_path, result)
    return result


def _shapes(batch) -> tuple:
    return tuple(np.shape(x) for x in jax.tree_util.tree_leaves(batch))


def _compile_per_shape(train_step, state, state_sharding, examples: list[dict], mesh):
    """(step dispatching on the batch shapes, the executable of the largest batch: its
    memory is reported). The shapes compile in parallel (XLA compiles outside the GIL)."""

    def compile_for(batch):
        return _shapes(batch), ts.compile_train_step(
            train_step, state, batch, state_sharding=state_sharding,
            batch_sharding=sharding.batch_sharding(mesh),
            metrics_sharding=sharding.replicated_sharding(mesh))

    with ThreadPoolExecutor(max_workers=min(len(examples), os.cpu_count() or 1)) as pool:
        compiled = dict(pool.map(compile_for, examples))
    largest = compiled[max(compiled, key=lambda shapes: sum(map(np.prod, shapes)))]
    if len(compiled) == 1:
        return largest, largest
    return (lambda s, batch: compiled[_shapes(batch)](s, batch)), largest


def memory_record(compiled_mem: dict | None, device_mem: dict | None) -> dict:
    """The "memory" entry of a model's result (see experiments.common.memory)."""
    return {
        "compiled": compiled_mem,
        "compiled_note": "per device, from the compiled train step's memory_analysis(); "
        "peak_estimate = argument + output + temp - alias",
        "device": device_mem,
        "device_note": None
        if device_mem is None
        else "memory_stats() process-lifetime peak; in compare mode a later model's "
        "peak includes the earlier ones'",
    }


# --------------------------------------------------------------------------- whole run


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mean_std(values: list):
    """(mean, std) trees over per-seed values of one shape: numbers → their mean and sample
    standard deviation (ddof=1; None for one seed), lists of numbers element-wise, dicts by
    their common keys; anything else (strings, None, a mix) is left out (None)."""
    first = values[0]
    if all(_number(v) for v in values):
        data = np.asarray(values, np.float64)
        return float(data.mean()), (float(data.std(ddof=1)) if len(data) > 1 else None)
    if all(isinstance(v, dict) for v in values):
        means, stds = {}, {}
        for key in first:
            if all(key in v for v in values):
                pair = mean_std([v[key] for v in values])
                if pair is not None:
                    means[key], stds[key] = pair
        return (means, stds) if means else None
    if all(isinstance(v, list) and len(v) == len(first) for v in values) and first:
        pairs = [mean_std(list(column)) for column in zip(*values, strict=True)]
        if all(p is not None for p in pairs):
            return [p[0] for p in pairs], [p[1] for p in pairs]
    return None


def aggregate(per_seed: Mapping[int, dict]) -> dict:
    """One model's entry of a several-seed summary: {"seeds", "mean", "std", "per_seed"}
    (``per_seed``: seed → that seed's result; ``mean``/``std``: ``mean_std`` of them)."""
    seeds = list(per_seed)
    pair = mean_std([{k: v for k, v in per_seed[s].items() if k != CONFIG_KEY}
                     for s in seeds]) or ({}, {})
    return {"seeds": seeds, "mean": pair[0], "std": pair[1],
            "per_seed": {str(s): per_seed[s] for s in seeds}}


def _cell(values: list, fmt: str) -> str:
    """One table cell over the seeds: the value, or "mean ± std"; "n/a" if any is None."""
    if not values or any(v is None for v in values):
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    mean, std = mean_std(values)
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def _mb(where: str, key: str):
    def get(r):
        value = (r["memory"][where] or {}).get(key)
        return None if value is None else value / 2**20
    return get


def side_by_side(task: Task, runs: list[list[dict]]) -> str:
    """The table printed at the end of a run: one column per model; ``runs``: per model,
    its results at every seed (a cell is "mean ± std" over several)."""
    throughput_key, throughput_label = task.throughput
    rows = [(label, lambda r, key=key: r.get(key), fmt) for label, key, fmt in task.table]
    rows += [
        ("train-step memory (compiled)", _mb("compiled", "peak_estimate_bytes"), "{:.1f} MB"),
        ("  of which temp (activations)", _mb("compiled", "temp_bytes"), "{:.1f} MB"),
        ("device peak (memory_stats)", _mb("device", "peak_bytes_in_use"), "{:.1f} MB"),
        ("step time", lambda r: None if r["step_time_s"] is None else r["step_time_s"] * 1e3,
         "{:.1f} ms"),
        (f"{throughput_label} / s", lambda r: r.get(throughput_key), "{:.1f}"),
        # BDIA's (exact) and RevViT's (floating-point) reversals alike; n/a without one.
        ("reversal error (max)",
         lambda r: r["reversal_error_max"] if r.get("reversal") else None, "{:.3g}"),
        *task.extra_rows([seeds[0] for seeds in runs]),
    ]
    cells = [(label, [_cell([get(r) for r in seeds], fmt) for seeds in runs])
             for label, get, fmt in rows]
    cells.append(("overflow/non-finite/skipped" + (" (sum)" if len(runs[0]) > 1
                                                         else ""),
                  [" / ".join(str(sum(r.get(k, 0) for r in seeds)) for k in
                              ("overflow_steps", "nonfinite_steps", "skipped_steps"))
                   for seeds in runs]))
    width = max(20, *(len(v) + 2 for _, values in cells for v in values))
    lines = [f"{'':<34}" + "".join(f"{seeds[0]['name']:>{width}}" for seeds in runs)]
    lines += [f"{label:<34}" + "".join(f"{v:>{width}}" for v in values)
              for label, values in cells]
    return "\n".join(lines)


def _mean_records(per_seed: list[list[dict]]) -> list[dict]:
    """The records of one model averaged over seeds, per (kind, step): numeric fields
    that every seed has (the curves of a several-seed run)."""
    groups: dict[tuple, list[dict]] = {}
    for records in per_seed:
        for r in records:
            groups.setdefault((r.get("kind"), r.get("step")), []).append(r)
    out = []
    for (kind, step), group in groups.items():
        if len(group) == len(per_seed):
            keys = [k for k in group[0] if all(_number(g.get(k)) for g in group)]
            out.append({"kind": kind, "step": step,
                        **{k: float(np.mean([g[k] for g in group])) for k in keys}})
    return out


def _train_one_seed(task: Task, config, data, mesh, workdir: str
                    ) -> tuple[list[dict], list[str]]:
    """Every model of ``config`` at ``config.seed`` in ``workdir``: their results, and the
    names of the run's files (curves, the task's files; written by process 0)."""
    writer = metrics.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
    results = [train_model(task, config, name, data, mesh, workdir, writer)
               for name in models_for_mode(config, task)]
    files = []
    if sharding.is_primary():  # multi-host: process 0 writes the files
        records = {r["name"]: metrics.read_records(writer.path, model=r["name"])
                   for r in results}
        plots.plot_records(records, task.panels, os.path.join(workdir, task.plot_file),
                           title=task.plot_title)
        files = [task.plot_file, *task.write_files(config, workdir, results)]
    return results, files


def train_and_evaluate(task: Task, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the experiment that ``config`` describes; write everything to ``workdir``.

    Several seeds (``config.seeds``): each in ``workdir/seed_<s>`` with its own config.json,
    metrics, checkpoints, files and summary.json (resumable on its own); ``workdir``'s
    summary.json then holds ``aggregate`` per model and its plot the seed-mean curves.

    Returns the summary (also written to ``workdir/summary.json``). Raises ``ConfigError``
    for bad fields, the task's data errors, ``NonFiniteError`` under the "stop" policy,
    ``TrainingInterrupted`` after ``train.stop_after_steps``.
    """
    start = time.perf_counter()
    mesh = sharding.mesh_from_config(config)  # jax.distributed first when multi-host
    validate_config(task, config, mesh)
    os.makedirs(workdir, exist_ok=True)
    # Seeds may be added to a run (the finished ones are reused).
    runs.check_resume_config(config, workdir,
                             resumable=RESUMABLE + task.resumable + PER_MODEL + ("seeds",))

    load_start = time.perf_counter()
    data = task.load_data(config, workdir, mesh)
    record = task.data_record(data)
    log(f"data: {', '.join(f'{k} {v}' for k, v in record.items())}; loaded in "
        f"{time.perf_counter() - load_start:.1f}s;"
        f" {sharding.num_data_shards(mesh)} {jax.default_backend()} device(s) (mesh "
        f"{dict(mesh.shape)}, {jax.process_count()} process(es)); workdir {workdir}")

    names = models_for_mode(config, task)
    base = {
        "config": config_lib.to_dict(config),
        "versions": {**metrics.versions(), **task.versions()},
        "devices": metrics.device_info(mesh),
        "data": record,
    }
    if not config.seeds:
        results, files = _train_one_seed(task, config, data, mesh, workdir)
        runs_by_model = [[r] for r in results]
        models = dict(zip(names, results, strict=True))
    else:
        per_seed: dict[int, list[dict]] = {}
        for seed in config.seeds:
            seed_config = config.copy_and_resolve_references()
            seed_config.seed, seed_config.seeds = seed, ()
            seed_dir = os.path.join(workdir, f"seed_{seed}")
            os.makedirs(seed_dir, exist_ok=True)
            runs.check_resume_config(seed_config, seed_dir,
                                     resumable=RESUMABLE + task.resumable + PER_MODEL)
            log(f"--- seed {seed} ({len(per_seed) + 1}/{len(config.seeds)}) in {seed_dir}")
            seed_start = time.perf_counter()
            per_seed[seed], seed_files = _train_one_seed(task, seed_config, data, mesh,
                                                         seed_dir)
            metrics.write_json(os.path.join(seed_dir, "summary.json"), {
                **base, "config": config_lib.to_dict(seed_config), "seeds": [seed],
                "models": dict(zip(names, per_seed[seed], strict=True)),
                "plots": [f for f in seed_files if f.endswith(".png")],
                "wall_seconds": time.perf_counter() - seed_start})
        runs_by_model = [[per_seed[s][i] for s in config.seeds] for i in range(len(names))]
        models = {name: aggregate(dict(zip(config.seeds, seeds_results, strict=True)))
                  for name, seeds_results in zip(names, runs_by_model, strict=True)}
        files = []
        if sharding.is_primary():
            files = [task.plot_file]
            records = {seeds_results[0]["name"]: _mean_records([
                metrics.read_records(os.path.join(workdir, f"seed_{s}", "metrics.jsonl"),
                                     model=seeds_results[0]["name"]) for s in config.seeds])
                for seeds_results in runs_by_model}
            plots.plot_records(records, task.panels, os.path.join(workdir, task.plot_file),
                               title=f"{task.plot_title} (mean of {len(config.seeds)} seeds)")
    summary = {**base, "seeds": list(seeds_of(config)), "models": models,
               "plots": [f for f in files if f.endswith(".png")], "wall_seconds": time.perf_counter() - start}
    metrics.write_json(os.path.join(workdir, "summary.json"), summary)
    log("\n" + side_by_side(task, runs_by_model))
    where = (f"; each seed's metrics.jsonl, files and checkpoints/ in {workdir}/seed_<s>/"
             if config.seeds else ", metrics.jsonl and checkpoints/")
    log(f"\nwrote {os.path.join(workdir, 'summary.json')}, {', '.join(files)}{where} "
        f"({summary['wall_seconds']:.0f}s)")
    return summary


def entry_points(task: Task):
    """``(train_and_evaluate(config, workdir), validate_config(config, mesh))`` of a task."""
    return (functools.partial(train_and_evaluate, task),
            functools.partial(validate_config, task))


def main(task: Task) -> None:
    """``python -m experiments.<task.name>``: the command line (see ``runs.run_experiment``)."""
    runs.run_experiment(
        task.name, functools.partial(train_and_evaluate, task), presets=task.presets,
        set_data_dir=functools.partial(_set, field=task.data_dir_field),
        data_dir_help=task.data_dir_help,
        # NonFiniteError includes RangeOverflowError.
        errors=(config_lib.ConfigError, sharding.DistributedInitError, NonFiniteError,
                CheckpointWriteError, *task.errors))

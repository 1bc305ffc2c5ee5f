"""Fine-tune a pretrained decoder LM (GPT-2 or the Llama family, from a Hugging Face folder or a
GGUF file) on E2E NLG or on plain text with five methods side by side: standard full
fine-tuning, standard + dropout, BDIA full fine-tuning (γ = ±0.5, reversible), LoRA, and
LoRA + BDIA. A method entry may set its own model fields (dropout, lora_*) and learning rate.

    python -m experiments.finetune_lm                      # quick: the tiny offline stand-in
    python -m experiments.finetune_lm --config=experiments/configs/finetune_lm.py:smollm2_e2e
    python -m experiments.finetune_lm --config=experiments/configs/finetune_lm.py:smollm2_e2e \\
        --config.model.checkpoint=/path/to/hub/download/SmolLM2-135M-Instruct
    python -m experiments.finetune_lm \\
        --config=experiments/configs/finetune_lm.py:smollm2_shakespeare
    python scripts/finetune_report.py <workdir> --out docs/<name>     # the table, the curves

Every model of ``config.models`` starts from the same checkpoint (``bdia_jax.pretrained.load``
with that model's method; LoRA models get adapters from the run's seed,
``bdia_jax.models.with_lora``, and train only them: ``trainable=nnx.LoRAParam``) and trains
on the same rows in the same order: ``mr → ref<eos>`` in the checkpoint's own tokenizer
(``bdia_jax.formats.load_tokenizer``; <eos> = ``<|endoftext|>``), loss on the reference
tokens and the closing <eos> only. With ``data.split="devset_by_mr"`` the training and
validation rows come from devset.csv split by mr (no mr on both sides); BLEU (sacreBLEU, all
references per mr) and the test loss are on testset_w_refs.csv. With ``data.format="text"``
the rows are consecutive tokens of ``data.text`` (``tfds:tiny_shakespeare`` or a file;
``experiments.data.text.lm_text``), every token a target, and the samples continue the
beginnings of test rows instead of BLEU. At the end each model is
written as a Hugging Face folder ``<workdir>/<model>/hf`` (adapters merged) with the
tokenizer files beside it, which ``pretrained.load`` and ``transformers`` read. Other outputs
as ``experiments.finetune_gpt2`` (metrics.jsonl, summary.json, curves.png, decodes, resumable
Orbax checkpoints).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
from flax import nnx

from bdia_jax import formats, pretrained, training
from bdia_jax.models import DecoderConfig, DecoderLM, LoRA, merge_lora, with_lora
from experiments import finetune_gpt2 as gpt2
from experiments.common import trainer
from experiments.common.loop import log
from experiments.configs.finetune_lm import PRESETS
from experiments.data.text import e2e, lm_text
from experiments.data.text.parallel import TextDataError

CHECKPOINT_HELP = ("pass --config.model.checkpoint=<a Hugging Face folder (config.json, "
                   "*.safetensors, tokenizer files) or a .gguf file>, e.g. a download of "
                   "huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct")
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
# A Llama block stands in for the checkpoint's while the config is validated before the
# data (and so the architecture) is read: it accepts every LoRA target.
_VALIDATION_ARCHITECTURE = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias="none")


# --------------------------------------------------------------------------- the model
@dataclasses.dataclass(frozen=True)
class PretrainedLMConfig(DecoderConfig):
    """A DecoderConfig whose weights come from the checkpoint ``folder`` (folder or .gguf)."""

    folder: str = ""


def lm_config(*, checkpoint: str, folder: str = "", lora_rank: int = 0,
              lora_alpha: float = 16.0, lora_dropout: float = 0.0,
              lora_targets=LoRA.targets, **fields) -> PretrainedLMConfig:
    """``config.model`` (+ a method entry's model fields) + the data's fields → the model
    config; ``lora_rank`` > 0 gives it ``LoRA(lora_rank, lora_alpha, lora_dropout,
    lora_targets)``."""
    lora = LoRA(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                targets=tuple(lora_targets)) if lora_rank else None
    return PretrainedLMConfig(folder=folder or checkpoint, lora=lora, **fields)


def load_pretrained_lm(config: PretrainedLMConfig, *, rngs=None) -> DecoderLM:
    """The checkpoint of ``config.folder`` with ``config``'s method and dropout, plus fresh
    adapters from ``rngs`` when ``config.lora`` is set."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(DecoderConfig)
              if f.name != "lora"}
    model = pretrained.load(config.folder, **fields)
    if config.lora is not None:
        model = with_lora(model, config.lora, rngs=rngs if rngs is not None else nnx.Rngs(0))
    return model


def architecture(checkpoint) -> dict:
    """The DecoderConfig fields that the checkpoint fixes."""
    config = pretrained.read_config(checkpoint)
    return {name: getattr(config, name) for name in pretrained.ARCHITECTURE_FIELDS}


def lm_tokenizer(checkpoint) -> e2e.GPT2BPE:
    """The checkpoint's tokenizer (folder or .gguf) and its <|endoftext|> id."""
    tokenizer = formats.load_tokenizer(checkpoint)
    eos_id = tokenizer.token_to_id(e2e.END_OF_TEXT)
    if eos_id is None:
        raise TextDataError(f"{checkpoint}: the tokenizer has no {e2e.END_OF_TEXT!r} token, "
                            f"which ends every E2E reference here.")
    return e2e.GPT2BPE(tokenizer, eos_id, str(checkpoint))


# --------------------------------------------------------------------------- the data
def write_tiny_lm_setup(root, *, max_len: int = 128) -> tuple[pathlib.Path, pathlib.Path]:
    """An offline stand-in under ``root``: ``root/llama`` (a random 2-block Llama-family
    checkpoint of context 2·max_len written by ``pretrained.save``, GQA and a tied head, with
    the tiny BPE of
    ``e2e.write_tiny_setup``) and ``root/e2e`` (tiny E2E CSVs). Returns (checkpoint folder,
    data folder)."""
    root = pathlib.Path(root)
    gpt2_folder, data = e2e.write_tiny_setup(root / "gpt2", max_len=max_len)
    tokenizer = e2e.load_gpt2_tokenizer(gpt2_folder)
    # Twice the rows' context, as a rope checkpoint's own context exceeds E2E rows.
    config = DecoderConfig(vocab_size=tokenizer.vocab_size, max_len=2 * max_len, width=32,
                           depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64, norm="rmsnorm",
                           position="rope", mlp="swiglu", bias="none", layer_norm_eps=1e-5,
                           dropout=0.0, attention_dropout=0.0)
    folder = root / "llama"
    pretrained.save(DecoderLM(config, rngs=nnx.Rngs(0)), folder,
                    bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    formats.write_tokenizer(folder, gpt2_folder)
    return folder, data


def _tiny_setup(config, workdir: str) -> pathlib.Path:
    """<workdir>/tiny_setup, written on first use (``write_tiny_lm_setup``)."""
    root = pathlib.Path(workdir) / "tiny_setup"
    if not (root / "llama" / pretrained.CONFIG_FILE).is_file():
        write_tiny_lm_setup(root, max_len=max(config.data.max_len, 128))
    return root


def resolve_checkpoint(config, workdir: str) -> pathlib.Path:
    """The configured checkpoint, or the tiny stand-in's random Llama when it is empty and
    ``data.tiny_standin``; a missing one is a one-line FileNotFoundError."""
    checkpoint = config.model.checkpoint
    if not checkpoint:
        if not config.data.tiny_standin:
            raise FileNotFoundError(f"--config.model.checkpoint is empty: {CHECKPOINT_HELP}")
        checkpoint = str(_tiny_setup(config, workdir) / "llama")
        log(f"no model.checkpoint: using the tiny offline stand-in's random Llama-family "
            f"model and tiny BPE in {checkpoint}")
    checkpoint = pathlib.Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"no checkpoint {checkpoint}: {CHECKPOINT_HELP}.")
    return checkpoint


def resolve_paths(config, workdir: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(checkpoint, E2E folder): the configured ones, or the tiny stand-in's for the empty
    ones when ``data.tiny_standin``; a missing one is a one-line FileNotFoundError."""
    checkpoint, data_dir = config.model.checkpoint, config.data.dir
    if not data_dir and checkpoint and not config.data.tiny_standin:
        raise FileNotFoundError(f"--config.data.dir is empty: "
                                f"{e2e.E2E_DOWNLOAD.format(dir='a folder')} and pass "
                                f"--config.data.dir=/path/to/it")
    checkpoint = resolve_checkpoint(config, workdir)
    if not data_dir:
        data_dir = str(_tiny_setup(config, workdir) / "gpt2" / "e2e")
        log(f"no data.dir: using the tiny offline stand-in's E2E CSVs in {data_dir}")
    files = ("devset.csv", "testset_w_refs.csv") if config.data.split == "devset_by_mr" \
        else tuple(e2e.SPLIT_FILES.values())
    for file in files:
        if not (pathlib.Path(data_dir) / file).is_file():
            raise FileNotFoundError(f"no E2E NLG file {pathlib.Path(data_dir) / file}: "
                                    f"{e2e.E2E_DOWNLOAD.format(dir=data_dir)}.")
    return checkpoint, pathlib.Path(data_dir)


def text_source(config, workdir: str) -> str:
    """format "text": ``data.text``, or the tiny stand-in's text file (written into
    <workdir>/tiny_setup) when it is empty and ``data.tiny_standin``."""
    if config.data.text:
        return config.data.text
    if not config.data.tiny_standin:
        raise FileNotFoundError("--config.data.text is empty: pass --config.data.text="
                                "tfds:tiny_shakespeare or a UTF-8 text file.")
    path = pathlib.Path(workdir) / "tiny_setup" / "text.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        lm_text.write_tiny_text(path)
    log(f"no data.text: using the tiny offline stand-in's text {path}")
    return str(path)


def _subset(split: e2e.E2ESplit, rows) -> e2e.E2ESplit:
    return e2e.E2ESplit([split.mrs[i] for i in rows], [split.refs[i] for i in rows],
                        split.source)


def split_by_mr(split: e2e.E2ESplit, fraction: float, seed: int
                ) -> tuple[e2e.E2ESplit, e2e.E2ESplit]:
    """(training, validation) rows of ``split`` (file order kept): ``round(fraction · mrs)``
    distinct mrs, drawn by a permutation from ``seed``, hold out all their rows."""
    mrs = list(dict.fromkeys(split.mrs))
    held = max(1, round(fraction * len(mrs)))
    if not 0 < fraction < 1 or held >= len(mrs):
        raise TextDataError(f"{split.source}: {len(mrs)} distinct mrs cannot be split with "
                            f"--config.data.validation_fraction={fraction}.")
    order = np.random.default_rng(seed).permutation(len(mrs))
    validation = {mrs[i] for i in order[:held]}
    rows = np.arange(len(split))
    is_val = np.asarray([mr in validation for mr in split.mrs])
    return _subset(split, rows[~is_val]), _subset(split, rows[is_val])


def _first_rows(split: e2e.E2ESplit, limit: int, seed: int) -> e2e.E2ESplit:
    """At most ``limit`` rows (0: all), drawn by a permutation from ``seed`` and kept in
    file order, so that a small limit still covers many mrs."""
    if not limit or limit >= len(split):
        return split
    rows = np.sort(np.random.default_rng(seed).permutation(len(split))[:limit])
    return _subset(split, rows)


def read_splits(config, data_dir) -> dict[str, e2e.E2ESplit]:
    """{"train", "validation", "test"} rows of the E2E folder, as ``data.split`` says."""
    d = config.data
    test = e2e.read_e2e(data_dir, "test")
    if d.split == "devset_by_mr":
        train, validation = split_by_mr(e2e.read_e2e(data_dir, "validation"),
                                        d.validation_fraction, d.split_seed)
    else:
        train, validation = e2e.read_e2e(data_dir, "train"), e2e.read_e2e(data_dir, "validation")
    return {"train": _first_rows(train, d.max_train_rows, d.split_seed),
            "validation": _first_rows(validation, d.max_validation_rows, d.split_seed + 1),
            "test": _first_rows(test, d.max_test_rows, d.split_seed + 2)}


@dataclasses.dataclass(frozen=True)
class LMData(gpt2.FinetuneData):
    """``FinetuneData`` plus the encoded test rows (the test loss) and the checkpoint's own
    context (a rope model trains at data.max_len; its export keeps the checkpoint's)."""

    test: e2e.EncodedExamples = None
    checkpoint_max_len: int = 0


def _checkpoint_and_tokenizer(checkpoint, max_len: int) -> tuple[dict, e2e.GPT2BPE]:
    arch, tokenizer = architecture(checkpoint), lm_tokenizer(checkpoint)
    gpt2.check_checkpoint_fits(tokenizer, arch, max_len)
    return arch, tokenizer


def _context(arch: dict, max_len: int) -> dict:
    # Decoding and the model's context stop at data.max_len (a rope model's own context is
    # far longer than a row).
    return {**arch, "max_len": max_len} if arch["position"] == "rope" else arch


def load_text_data(config, workdir: str) -> LMData:
    """format "text": rows of data.text's splits (``lm_text``); the samples continue the
    first eval.prompt_tokens tokens of the first eval.num_samples test rows (no BLEU)."""
    d, e = config.data, config.eval
    checkpoint = resolve_checkpoint(config, workdir)
    arch, tokenizer = _checkpoint_and_tokenizer(checkpoint, d.max_len)
    source = text_source(config, workdir)
    texts = lm_text.read_text_splits(source, tfds_data_dir=d.dir or None)
    limits = {"train": d.max_train_rows, "validation": d.max_validation_rows,
              "test": d.max_test_rows}
    rows = {s: lm_text.encode_text_rows(tokenizer, texts[s], d.max_len, limit=limits[s],
                                        source=f"{source}[{s}]") for s in lm_text.SPLITS}
    gpt2.check_one_batch(f"{source}[train]", len(rows["train"].inputs),
                         config.train.batch_size)
    prompts = [row[:e.prompt_tokens].tolist() for row in rows["test"].inputs[:e.num_samples]]
    return LMData(
        checkpoint_max_len=arch["max_len"], checkpoint=str(checkpoint),
        architecture=_context(arch, d.max_len), tokenizer=tokenizer, train=rows["train"],
        validation=rows["validation"], bleu_split="test", bleu_mrs=[], bleu_prompts=prompts,
        bleu_refs=[], source=source, test=rows["test"])


def load_lm_data(config, workdir: str) -> LMData:
    if config.data.format == "text":
        return load_text_data(config, workdir)
    checkpoint, data_dir = resolve_paths(config, workdir)
    max_len = config.data.max_len
    arch, tokenizer = _checkpoint_and_tokenizer(checkpoint, max_len)
    splits = read_splits(config, data_dir)
    gpt2.check_one_batch(splits["train"].source, len(splits["train"]), config.train.batch_size)
    # Decoding stops at data.max_len (the model's context here).
    mrs, refs, prompts = gpt2.bleu_prompts(config, tokenizer, splits[config.eval.bleu_split],
                                           max_len)
    return LMData(checkpoint_max_len=arch["max_len"],
        checkpoint=str(checkpoint), architecture=_context(arch, max_len), tokenizer=tokenizer,
        train=e2e.encode_examples(tokenizer, splits["train"], max_len),
        validation=e2e.encode_examples(tokenizer, splits["validation"], max_len),
        bleu_split=config.eval.bleu_split, bleu_mrs=mrs, bleu_prompts=prompts, bleu_refs=refs,
        source=str(data_dir), test=e2e.encode_examples(tokenizer, splits["test"], max_len))


# --------------------------------------------------------------------------- the task
class FinetuneLM(gpt2.FinetuneGPT2):
    name = "finetune_lm"
    presets = PRESETS
    config_class = staticmethod(lm_config)
    model_class = staticmethod(load_pretrained_lm)
    display_names = {"standard": "standard", "dropout": "standard+dropout0.1", "bdia": "BDIA",
                     "lora": "LoRA", "lora_bdia": "LoRA+BDIA",
                     "dropout_05": "standard+dropout0.05", "dropout_20": "standard+dropout0.2",
                     "bdia_25": "BDIA γ=0.25", "bdia_125": "BDIA γ=0.125"}
    method_model_fields = ("dropout", "attention_dropout", *LORA_FIELDS)
    method_optim_fields = ("learning_rate",)
    resumable = (*gpt2.FinetuneGPT2.resumable, "eval.num_samples", "eval.export_hf",
                 "eval.export_dtype")
    data_dir_help = "E2E NLG folder (devset.csv, testset_w_refs.csv[, trainset.csv])."
    int_fields = {**gpt2.FinetuneGPT2.int_fields, "data.max_train_rows": 0,
                  "data.max_validation_rows": 0, "data.max_test_rows": 0,
                  "data.split_seed": 0, "eval.num_samples": 0, "eval.prompt_tokens": 1,
                  "model.lora_rank": 0}
    table = (*gpt2.FinetuneGPT2.table, ("test loss", "test_loss", "{:.4f}"))
    plot_title = "Fine-tuning a pretrained LM: full, dropout, BDIA, LoRA, LoRA+BDIA"

    def validate(self, config, checks, mesh):
        super().validate(config, checks, mesh)
        checks.one_of(config.data.format, ("e2e", "text"), "data.format")
        if config.data.format == "text":
            checks.require(config.eval.prompt_tokens < config.data.max_len, "eval.prompt_tokens",
                           f"must be below data.max_len={config.data.max_len} (a sample "
                           f"continues it), got {config.eval.prompt_tokens}")
        checks.one_of(config.data.split, ("devset_by_mr", "official"), "data.split")
        checks.fraction(config.data.validation_fraction, "data.validation_fraction")
        checks.one_of(config.eval.export_hf, (True, False), "eval.export_hf")
        checks.one_of(config.eval.export_dtype, ("float32", "bfloat16", "float16"),
                      "eval.export_dtype")

    def load_data(self, config, workdir, mesh):
        return load_lm_data(config, workdir)

    def data_record(self, data):
        return {**super().data_record(data), "test_pairs": len(data.test.inputs)}

    def model_fields(self, config, data):
        if data is None:
            return dict(_VALIDATION_ARCHITECTURE)
        return {**data.architecture, "folder": data.checkpoint}

    def write_files(self, config, workdir, results):
        return [] if config.data.format == "text" else super().write_files(
            config, workdir, results)

    def trainable(self, model_config):
        return nnx.LoRAParam if model_config.lora is not None else nnx.Param

    def report(self, run, state):
        """E2E: BLEU of greedy and beam decodes; text: greedy continuations of test rows'
        beginnings. Then the test loss, a few samples, and the fine-tuned model as a
        Hugging Face folder."""
        data, e = run.data, run.config.eval
        if run.config.data.format == "text":
            out = {"samples": [
                {"prompt": data.tokenizer.decode(p), "greedy": g} for p, g in zip(
                    data.bleu_prompts, gpt2.decode_all(run, state, beam_size=0)
                    if data.bleu_prompts else [])]}
        else:
            out = super().report(run, state)
            out["samples"] = [{"mr": mr, "greedy": g, "beam": b} for mr, g, b in zip(
                data.bleu_mrs, out["decodes_greedy"], out["decodes_beam"])][:e.num_samples]
        out["test_loss"] = gpt2.mean_nll(run, state, data.test)
        log(f"[{run.display}] test loss {out['test_loss']:.4f}; samples: "
            + " | ".join(s["greedy"] for s in out["samples"]))
        if e.export_hf:
            out["hf_folder"] = export_hf(run, state)
        return out


def export_hf(run, state) -> str:
    """Write ``state``'s model (LoRA merged) as ``<workdir>/<model>/hf`` with the
    checkpoint's tokenizer files; returns the folder."""
    model = training.merge(run.graphdef, state)
    if model.config.lora is not None:
        model = merge_lora(model)
    if model.config.max_len != run.data.checkpoint_max_len:  # rope: the tables only
        config = dataclasses.replace(model.config, max_len=run.data.checkpoint_max_len)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
        model = nnx.merge(graphdef, nnx.state(model))
    folder = os.path.join(run.workdir, run.name, "hf")
    eos = run.data.tokenizer.eos_id
    pretrained.save(model, folder, dtype=run.config.eval.export_dtype, bos_token_id=eos,
                    eos_token_id=eos)
    formats.write_tokenizer(folder, run.data.checkpoint)
    log(f"[{run.display}] wrote the fine-tuned model to {folder}")
    return folder


TASK = FinetuneLM()
train_and_evaluate, validate_config = trainer.entry_points(TASK)

if __name__ == "__main__":
    trainer.main(TASK)

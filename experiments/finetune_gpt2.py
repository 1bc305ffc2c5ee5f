"""Fine-tune a pretrained GPT-2 on E2E NLG, the standard way and the BDIA way, side by side.

    python -m experiments.finetune_gpt2                     # quick preset: the tiny stand-in
    python -m experiments.finetune_gpt2 --config=experiments/configs/finetune_gpt2.py:paper \\
        --config.model.checkpoint=/path/to/gpt2-medium --config.data.dir=/path/to/e2e

Every model of ``config.models`` starts from the same checkpoint (``bdia_jax.pretrained.
load_gpt2`` with that model's method) and trains on the same pairs in the same order: the
text ``mr → ref<|endoftext|>`` in the checkpoint's own GPT-2 BPE, loss on the reference tokens
(and the closing end-of-text) only. Every ``train.eval_every_epochs`` epochs: the validation
loss and perplexity on devset.csv, at E[γ] = 0. At the end: greedy and beam-search decodes
(KV cache, ``bdia_jax.models.decoding``) of every distinct mr of ``eval.bleu_split`` and their
multi-reference sacreBLEU. Writes to ``--workdir``: metrics.jsonl, summary.json, config.json,
curves.png, decodes_<model>_{greedy,beam}.txt (one line per mr, in file order) and Orbax
checkpoints (rerunning the same command resumes).
"""

from __future__ import annotations

if __name__ == "__main__":  # --help at once, before the imports below load JAX
    from experiments.common.quick_help import exit_if_help

    exit_if_help("finetune_gpt2", __doc__)

import dataclasses
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from bdia_jax import pretrained
from bdia_jax.models import GPT, GPTConfig, decoding
from experiments.common import plots, sharding, trainer
from experiments.common.loop import log
from experiments.configs.finetune_gpt2 import PRESETS
from experiments.data.text import e2e
from experiments.data.text.losses import lm_nll_sums, token_losses
from experiments.data.text.parallel import TextDataError

GPT2_DOWNLOAD = ("download a GPT-2 checkpoint folder (config.json, model.safetensors, "
                 "vocab.json, merges.txt; e.g. huggingface.co/openai-community/gpt2-medium) "
                 "and pass --config.model.checkpoint=/path/to/it")


# --------------------------------------------------------------------------- the model
@dataclasses.dataclass(frozen=True)
class PretrainedGPTConfig(GPTConfig):
    """A GPTConfig whose weights come from the GPT-2 checkpoint folder ``folder``."""

    folder: str = ""


def pretrained_config(*, checkpoint: str, folder: str = "", **fields) -> PretrainedGPTConfig:
    """``config.model`` + the data's fields → the model config. ``folder``: the checkpoint
    that ``load_data`` resolved (the tiny stand-in's when ``checkpoint`` is "")."""
    return PretrainedGPTConfig(folder=folder or checkpoint, **fields)


def load_pretrained(config: PretrainedGPTConfig, *, rngs=None) -> GPT:
    """The GPT of ``config.folder`` with the method and dropout of ``config``."""
    del rngs  # the weights come from the checkpoint, the same for every model
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(GPTConfig)}
    return pretrained.load_gpt2(config.folder, **fields)


def architecture(folder: pathlib.Path) -> dict:
    """The GPTConfig fields that the checkpoint's config.json fixes."""
    gpt = pretrained.read_gpt2_config(folder)
    return {name: getattr(gpt, name) for name in pretrained.ARCHITECTURE_FIELDS}


# --------------------------------------------------------------------------- the data
@dataclasses.dataclass(frozen=True)
class FinetuneData:
    """The checkpoint, its tokenizer and the encoded splits.

    train, validation: EncodedExamples (rows [n, data.max_len]); bleu_mrs: the distinct
    mrs of ``eval.bleu_split`` (at most eval.bleu_max_mrs), bleu_prompts their encoded
    prompts, bleu_refs their references.
    """

    checkpoint: str
    architecture: dict
    tokenizer: e2e.GPT2BPE
    train: e2e.EncodedExamples
    validation: e2e.EncodedExamples
    bleu_split: str
    bleu_mrs: list[str]
    bleu_prompts: list[list[int]]
    bleu_refs: list[list[str]]
    source: str


def resolve_paths(config, workdir: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(checkpoint folder, E2E folder): the configured ones, or the tiny stand-in's (written
    into <workdir>/tiny_setup) for the empty ones when ``data.tiny_standin``. A missing
    folder or file is a one-line FileNotFoundError that says what to download."""
    checkpoint, data_dir = config.model.checkpoint, config.data.dir
    if not checkpoint or not data_dir:
        if not config.data.tiny_standin:
            raise FileNotFoundError(
                f"--config.model.checkpoint is empty: {GPT2_DOWNLOAD}" if not checkpoint else
                f"--config.data.dir is empty: "
                f"{e2e.E2E_DOWNLOAD.format(dir='a folder')} and pass "
                f"--config.data.dir=/path/to/it")
        root = pathlib.Path(workdir) / "tiny_setup"
        if not (root / "checkpoint" / pretrained.WEIGHTS_FILE).is_file():
            e2e.write_tiny_setup(root, max_len=max(config.data.max_len, 128))
        # Name each part by where it really comes from: only the empty ones are stand-ins.
        model_from = (f"the checkpoint {checkpoint}" if checkpoint else
                      f"the tiny offline stand-in's random GPT-2 and tiny BPE in "
                      f"{root / 'checkpoint'} (no model.checkpoint)")
        data_from = (f"the E2E CSVs in {data_dir}" if data_dir else
                     f"the tiny offline stand-in's E2E CSVs in {root / 'e2e'} (no data.dir)")
        log(f"model: {model_from}; data: {data_from}")
        checkpoint = checkpoint or str(root / "checkpoint")
        data_dir = data_dir or str(root / "e2e")
    folder = pathlib.Path(checkpoint)
    for name in (pretrained.CONFIG_FILE, pretrained.WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in {folder}: {GPT2_DOWNLOAD}.")
    for file in e2e.SPLIT_FILES.values():
        if not (pathlib.Path(data_dir) / file).is_file():
            raise FileNotFoundError(f"no E2E NLG file {pathlib.Path(data_dir) / file}: "
                                    f"{e2e.E2E_DOWNLOAD.format(dir=data_dir)}.")
    return folder, pathlib.Path(data_dir)


def check_checkpoint_fits(tokenizer: e2e.GPT2BPE, arch: dict, max_len: int) -> None:
    """The tokenizer's ids fit the checkpoint's vocabulary and ``data.max_len`` its
    context; else a one-line TextDataError."""
    if tokenizer.vocab_size > arch["vocab_size"]:
        raise TextDataError(f"{tokenizer.source}: {tokenizer.vocab_size} tokens do not fit "
                            f"the checkpoint's vocab_size={arch['vocab_size']}; use the "
                            f"checkpoint's own tokenizer.")
    if max_len > arch["max_len"]:
        raise TextDataError(f"--config.data.max_len={max_len} exceeds the checkpoint's "
                            f"context of {arch['max_len']} positions; lower it.")


def check_one_batch(source: str, rows: int, batch_size: int) -> None:
    if rows < batch_size:
        raise TextDataError(f"{source}: {rows} training rows are fewer than one batch "
                            f"(--config.train.batch_size={batch_size}).")


def bleu_prompts(config, tokenizer: e2e.GPT2BPE, split: e2e.E2ESplit, context: int
                 ) -> tuple[list[str], list[list[str]], list[list[int]]]:
    """(mrs, their references, their encoded prompts) of ``split``'s first
    eval.bleu_max_mrs distinct mrs (0: all); a prompt that leaves no room to decode within
    ``context`` positions is a one-line TextDataError."""
    mrs, refs = e2e.group_references(split)
    if config.eval.bleu_max_mrs:
        mrs, refs = mrs[:config.eval.bleu_max_mrs], refs[:config.eval.bleu_max_mrs]
    prompts = [e2e.encode_prompt(tokenizer, mr) for mr in mrs]
    for mr, prompt in zip(mrs, prompts):
        if not 2 <= len(prompt) < context:
            raise TextDataError(f"the prompt of mr {mr!r} has {len(prompt)} tokens; decoding "
                                f"needs 2 to {context - 1}.")
    return mrs, refs, prompts


def load_finetune_data(config, workdir: str) -> FinetuneData:
    folder, data_dir = resolve_paths(config, workdir)
    arch = architecture(folder)
    tokenizer = e2e.load_gpt2_tokenizer(folder)
    max_len = config.data.max_len
    check_checkpoint_fits(tokenizer, arch, max_len)
    splits = {s: e2e.read_e2e(data_dir, s) for s in ("train", "validation",
                                                      config.eval.bleu_split)}
    check_one_batch(splits["train"].source, len(splits["train"]), config.train.batch_size)
    mrs, refs, prompts = bleu_prompts(config, tokenizer, splits[config.eval.bleu_split],
                                      arch["max_len"])
    return FinetuneData(
        checkpoint=str(folder), architecture=arch, tokenizer=tokenizer,
        train=e2e.encode_examples(tokenizer, splits["train"], max_len),
        validation=e2e.encode_examples(tokenizer, splits["validation"], max_len),
        bleu_split=config.eval.bleu_split, bleu_mrs=mrs, bleu_prompts=prompts, bleu_refs=refs,
        source=str(data_dir))


# --------------------------------------------------------------------------- steps
def _prefill(model, prompts, *, rows_per_prompt: int):
    """prompts int32 [b, p] (p >= 2), each repeated rows_per_prompt times → the KV cache
    after prompts[:, :-1] and the last prompt tokens int32 [rows], which the search feeds at
    its position 0. One compilation per prompt length (a forward pass)."""
    prompts = jnp.repeat(prompts, rows_per_prompt, axis=0)
    _, cache = model.decode_step(model.init_cache(prompts.shape[0]), prompts[:, :-1], 0)
    return cache, prompts[:, -1]


def _step_fn(model, last, offset):
    """decoding's step_fn: decoder position pos is model position offset + pos (offset: a
    traced int32 scalar, so one compiled search serves every prompt length)."""

    def step_fn(cache, tokens, pos):
        tokens = jnp.where(pos == 0, last, tokens)
        logits, cache = model.decode_step(cache, tokens[:, None], offset + pos)
        return jax.nn.log_softmax(logits[:, -1]), cache

    return step_fn


def _greedy(model, cache, last, offset, *, max_new: int, eos_id: int):
    """Greedy continuations int32 [rows, max_new] of prefilled prompts."""
    return decoding.greedy_search(_step_fn(model, last, offset), cache,
                                  batch_size=last.shape[0], max_len=max_new, bos_id=eos_id,
                                  eos_id=eos_id, pad_id=eos_id)


def _reorder(cache, rows):
    return jax.tree.map(lambda x: x[:, rows], cache)  # KVCache leaves: [depth, rows, ...]


def _beam(model, cache, last, offset, *, max_new: int, eos_id: int, beam_size: int,
          alpha: float):
    """The best beam int32 [rows / beam_size, max_new] of each prefilled prompt (its
    beam_size rows adjacent)."""
    tokens, _ = decoding.beam_search(
        _step_fn(model, last, offset), _reorder, cache, batch_size=last.shape[0] // beam_size,
        beam_size=beam_size, max_len=max_new, bos_id=eos_id, eos_id=eos_id, pad_id=eos_id,
        alpha=alpha)
    return tokens


def new_token_budget(config, data: FinetuneData) -> int:
    """The decodes' new tokens: eval.max_new_tokens, within the context after the longest
    prompt (a prompt of length p leaves max_len - p + 1 positions)."""
    context = data.architecture["max_len"]
    return min(config.eval.max_new_tokens,
               context - max(len(p) for p in data.bleu_prompts) + 1)


def decode_all(run, state, *, beam_size: int) -> list[str]:
    """Greedy (beam_size 0) or beam-search decodes of every prompt of
    ``run.data.bleu_prompts``, in mr order. Prompts go in batches of one length (the
    prefill compiles once per length, the search once), a length's last batch filled up
    with copies of its first prompt."""
    e, data = run.config.eval, run.data
    eos, size = data.tokenizer.eos_id, e.decode_batch_size
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(data.bleu_prompts):
        by_length.setdefault(len(prompt), []).append(i)
    max_new = new_token_budget(run.config, data)
    prefill = trainer.model_step(run, _prefill, rows_per_prompt=max(beam_size, 1))
    if beam_size:
        search = trainer.model_step(run, _beam, max_new=max_new, eos_id=eos,
                                    beam_size=beam_size, alpha=float(e.length_penalty))
    else:
        search = trainer.model_step(run, _greedy, max_new=max_new, eos_id=eos)
    texts = [""] * len(data.bleu_prompts)
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), size):
            chunk = indices[start:start + size]
            rows = chunk + [chunk[0]] * (size - len(chunk))
            prompts = np.asarray([data.bleu_prompts[i] for i in rows], np.int32)
            cache, last = prefill(state, sharding.shard_batch(prompts, run.mesh))
            out = sharding.to_host(search(state, cache, last, jnp.int32(length - 1)))
            for i, ids in zip(chunk, np.asarray(out)):
                texts[i] = data.tokenizer.decode(ids.tolist()).strip()
    return texts


def _rows(examples: e2e.EncodedExamples, index) -> dict:
    return {"inputs": examples.inputs[index], "targets": examples.targets[index],
            "mask": examples.mask[index]}


def mean_nll(run, state, examples: e2e.EncodedExamples) -> float:
    """Mean NLL (nats per target token) of ``examples`` at E[γ] = 0, in batches of
    eval.batch_size rows (the last batch wraps around, its extra rows masked out)."""
    step, size = trainer.model_step(run, lm_nll_sums), run.config.eval.batch_size
    n = len(examples.inputs)

    def batches():
        for start in range(0, n, size):
            index = np.arange(start, start + size) % n
            rows = _rows(examples, index)
            rows["mask"] = rows["mask"] & (np.arange(start, start + size) < n)[:, None]
            yield rows

    sums = trainer.sum_over(step, state, batches(), run.mesh)
    return sums["nll_sum"] / sums["count"]


# --------------------------------------------------------------------------- the task
class FinetuneGPT2(trainer.ValLossTask):
    name = "finetune_gpt2"
    presets = PRESETS
    config_class = staticmethod(pretrained_config)
    model_class = staticmethod(load_pretrained)
    display_names = {"standard": "GPT-2", "bdia": "BDIA-GPT-2"}
    resumable = ("eval.batch_size", "eval.decode_batch_size")
    errors = (TextDataError, FileNotFoundError)
    data_dir_help = "E2E NLG folder (trainset.csv, devset.csv, testset_w_refs.csv)."
    batch_fields = ("train.batch_size", "eval.batch_size", "eval.decode_batch_size")
    int_fields = {"data.max_len": 2, "train.num_epochs": 1, "train.eval_every_epochs": 1,
                  "eval.bleu_max_mrs": 0, "eval.max_new_tokens": 1, "eval.beam_size": 1}
    fraction_fields = ("train.label_smoothing",)
    summary_keys = ("loss", "reversal_error_max", "overflow_steps")
    throughput = ("pairs_per_s", "pairs")
    table = (trainer.VAL_ROWS["best"], trainer.VAL_ROWS["final"], trainer.VAL_ROWS["perplexity"],
             ("BLEU greedy", "bleu_greedy", "{:.2f}"),
             ("BLEU beam", "bleu_beam", "{:.2f}"))
    panels = (plots.Panel("fine-tuning loss (faint: minibatch loss, label-smoothed)",
                          "loss (nats / reference token)", (
                              plots.MINIBATCH_LOSS, plots.VALIDATION_LOSS)),
              plots.Panel("validation perplexity", "perplexity", (
                  plots.Series("eval", "val_perplexity", "validation", marker="o"),)))
    plot_title = "GPT-2 fine-tuned on E2E NLG: standard vs BDIA"

    def validate(self, config, checks, mesh):
        checks.one_of(config.data.tiny_standin, (True, False), "data.tiny_standin")
        checks.one_of(config.eval.bleu_split, ("validation", "test"), "eval.bleu_split")
        for field in ("batch_size", "decode_batch_size"):
            checks.int_at_least(config.eval[field], f"eval.{field}")
        checks.int_at_least(config.train.batch_size, "train.batch_size")
        checks.positive(config.eval.length_penalty, "eval.length_penalty", allow_zero=True)

    def load_data(self, config, workdir, mesh):
        return load_finetune_data(config, workdir)

    def data_record(self, data):
        return {"source": data.source, "checkpoint": data.checkpoint,
                "tokenizer": data.tokenizer.source, "architecture": data.architecture,
                "train_pairs": len(data.train.inputs),
                "validation_pairs": len(data.validation.inputs),
                "bleu_split": data.bleu_split, "bleu_mrs": len(data.bleu_mrs)}

    def model_fields(self, config, data):
        return {} if data is None else {**data.architecture, "folder": data.checkpoint}

    def schedule(self, config, data):
        t = config.train
        spe = (len(data.train.inputs) if data else t.batch_size) // t.batch_size
        return t.num_epochs, spe, t.eval_every_epochs, t.batch_size

    def batch_fn(self, run):
        batch, n = run.config.train.batch_size, len(run.data.train.inputs)
        spe = n // batch

        def get_batch(step):
            epoch, i = divmod(step, spe)
            order = np.random.default_rng([run.seed, epoch]).permutation(n)
            rows = _rows(run.data.train, order[i * batch:(i + 1) * batch])
            return sharding.shard_batch(rows, run.mesh)

        return get_batch

    def loss_fn(self, config):
        """batch {"inputs", "targets": int32 [b, L], "mask": bool [b, L]}; loss: mean
        label-smoothed cross-entropy over the reference tokens."""
        smoothing = float(config.train.label_smoothing)

        def loss_fn(model, batch, key):
            logits, aux = model(batch["inputs"], key=key, train=True)
            sums = token_losses(logits, batch["targets"], batch["mask"],
                                label_smoothing=smoothing)
            count = jnp.maximum(sums["num_tokens"], 1)
            return sums["loss_sum"] / count, {
                "accuracy": sums["correct_sum"] / count, **aux}

        return loss_fn

    def evaluator(self, run):
        def evaluate(state):
            loss = mean_nll(run, state, run.data.validation)
            return {"val_loss": loss, "val_perplexity": float(np.exp(loss))}

        return evaluate

    def report(self, run, state):
        """BLEU of greedy and beam decodes of the final parameters."""
        data, out = run.data, {}
        for kind, beam_size in (("greedy", 0), ("beam", run.config.eval.beam_size)):
            start = time.perf_counter()
            texts = decode_all(run, state, beam_size=beam_size)
            out[f"bleu_{kind}"] = e2e.multi_reference_bleu(texts, data.bleu_refs).score
            out[f"decodes_{kind}"] = texts
            log(f"[{run.display}] {kind} decode of {len(texts)} {data.bleu_split} mrs: BLEU "
                f"{out[f'bleu_{kind}']:.2f} ({time.perf_counter() - start:.1f}s); the first: "
                f"{texts[0]!r}")
        return out

    def write_files(self, config, workdir, results):
        files = []
        for r in results:
            for kind in ("greedy", "beam"):
                name = f"decodes_{r['name']}_{kind}.txt"
                with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                    f.writelines(text + "\n" for text in r[f"decodes_{kind}"])
                files.append(name)
        return files

    def versions(self):
        import sacrebleu
        import tokenizers

        return {"sacrebleu": sacrebleu.__version__, "tokenizers": tokenizers.__version__}


TASK = FinetuneGPT2()
train_and_evaluate, validate_config = trainer.entry_points(TASK)

if __name__ == "__main__":
    trainer.main(TASK)

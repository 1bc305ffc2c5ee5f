"""Test-set translation of the translation experiment: greedy and beam-search decoding
with the KV cache at E[γ] = 0, detokenization and corpus sacreBLEU."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import sacrebleu

from bdia_jax.models import decoding
from experiments.common import sharding
from experiments.data.text import tokenizer


def translate_batch(model, src, src_mask, *, max_len: int, beam_size: int, alpha: float):
    """Target ids int32 [b, max_len] for sources ``src`` int32 [b, len] (``src_mask``: real
    tokens): greedy (beam_size 1) or beam search with GNMT length penalty ``alpha``. PAD and
    BOS are never generated. Jit it with ``trainer.model_step``."""
    banned = jnp.asarray([tokenizer.PAD_ID, tokenizer.BOS_ID])

    def step_fn(state, tokens, pos):
        log_probs, state = model.decode_step(state, tokens, pos)
        return log_probs.at[:, banned].set(-jnp.inf), state

    ids = dict(bos_id=tokenizer.BOS_ID, eos_id=tokenizer.EOS_ID, pad_id=tokenizer.PAD_ID)
    if beam_size == 1:
        state = model.init_decode_state(src, max_len, src_mask=src_mask)
        return decoding.greedy_search(step_fn, state, batch_size=src.shape[0],
                                      max_len=max_len, **ids)
    state = model.init_decode_state(src, max_len, src_mask=src_mask, beam_size=beam_size)
    tokens, _ = decoding.beam_search(step_fn, model.reorder_state, state,
                                     batch_size=src.shape[0], beam_size=beam_size,
                                     max_len=max_len, alpha=alpha, **ids)
    return tokens


def ids_until_eos(row) -> list[int]:
    """Decoder output ids up to (not including) EOS / padding."""
    out = []
    for t in row:
        if t in (tokenizer.EOS_ID, tokenizer.PAD_ID):
            break
        out.append(int(t))
    return out


def translate_all(translate, state, test_src: list, target_tokenizer, *, batch_size: int,
                  bucket_lengths, mesh) -> list[str]:
    """Detokenized translations of every test source (int32 [len] ids each). One compiled
    shape: sources padded to the smallest bucket that holds the longest one; a partial
    last batch padded with one-token rows that are thrown away. ``translate(state, src,
    src_mask)``: a jitted ``translate_batch``."""
    longest = max(len(s) for s in test_src)
    length = next(n for n in bucket_lengths if n >= longest)
    outputs = []
    for begin in range(0, len(test_src), batch_size):
        rows = test_src[begin : begin + batch_size]
        src = np.full((batch_size, length), tokenizer.PAD_ID, np.int32)
        src[:, 0] = tokenizer.EOS_ID  # padding rows: a lone EOS (no all-masked attention)
        for r, ids in enumerate(rows):
            src[r, : len(ids)] = ids
        batch = sharding.shard_batch({"src": src, "src_mask": src != tokenizer.PAD_ID}, mesh)
        tokens = sharding.to_host(translate(state, batch["src"], batch["src_mask"]))
        outputs += [ids_until_eos(row) for row in tokens[: len(rows)]]
    return [target_tokenizer.decode(ids) for ids in outputs]


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus sacreBLEU (default 13a tokenization) of detokenized text, and its signature."""
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


def translate_test_set(make_step, state, data, e, bucket_lengths, mesh) -> dict:
    """Greedy and beam-search translations of the test split with their sacreBLEU.

    make_step(beam_size): a jitted ``translate_batch``; data: a
    ``translation_data.TranslationData``; e: the ``eval`` config section. Returns
    {"greedy", "beam": translations, "bleu_greedy", "bleu_beam", "seconds": {method: s},
    "signature": sacreBLEU's}.
    """
    out = {"seconds": {}}
    for method, beam in (("greedy", 1), ("beam", e.beam_size)):
        start = time.perf_counter()
        out[method] = translate_all(make_step(beam), state, data.test_src, data.tokenizers.tgt,
                                    batch_size=e.decode_batch_size,
                                    bucket_lengths=bucket_lengths, mesh=mesh)
        out["seconds"][method] = time.perf_counter() - start
        out[f"bleu_{method}"], out["signature"] = bleu(out[method], data.test_references)
    return out


def first_examples(data, out: dict, count: int) -> list[dict]:
    """The first ``count`` test sentences: source, reference and both translations of ``out``
    (``translate_test_set``'s result)."""
    return [{"source": data.test_sources[i], "reference": data.test_references[i],
             "greedy": out["greedy"][i], "beam": out["beam"][i]}
            for i in range(min(count, len(data.test_references)))]


def write_translations(path: str, out: dict) -> None:
    """Two lines per test sentence: ``i<TAB>greedy<TAB>text`` and ``i<TAB>beam<TAB>text``."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (g, b) in enumerate(zip(out["greedy"], out["beam"], strict=True)):
            f.write(f"{i}\tgreedy\t{g}\n{i}\tbeam\t{b}\n")

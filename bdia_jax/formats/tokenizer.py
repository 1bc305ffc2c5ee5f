"""Tokenizers of checkpoints: tokenizer.json, vocab.json + merges.txt, or GGUF metadata.

A GGUF file holds no tokenizer.json: its BPE (``tokenizer.ggml.model == "gpt2"``) is rebuilt
from the vocabulary, merges and token types in its metadata, with the pre-tokenizer that
``tokenizer.ggml.pre`` names (llama.cpp's table, e.g. "smollm": single digits, then GPT-2's
byte-level split), so the ids equal the original tokenizer.json's. Control tokens are
registered as special tokens, user-defined ones as added tokens.
"""

from __future__ import annotations

import json
import pathlib
import shutil

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Files write_tokenizer copies from a folder as they are.
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG, "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json")
HOLDS = ("a checkpoint folder's tokenizer is tokenizer.json, or vocab.json + merges.txt "
         "(GPT-2 byte-level BPE), as the model's hub repository ships them")

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split digits one by one first, the split regex or None for GPT-2's
# own byte-level regex), after llama.cpp's llama-vocab.cpp.
_GGUF_PRE = {
    "default": (False, None), "gpt2": (False, None), "gpt-2": (False, None),
    "smollm": (True, None),
    "llama3": (False, _LLAMA3_SPLIT), "llama-v3": (False, _LLAMA3_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT), "smaug-bpe": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT), "deepseek-r1-qwen": (False, _QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def load_tokenizer(path):
    """The ``tokenizers.Tokenizer`` of a checkpoint: folder or .gguf file.

    Folder: tokenizer.json, else vocab.json + merges.txt (GPT-2 byte-level BPE; the special
    tokens named in tokenizer_config.json, or <|endoftext|>, registered as special).
    .gguf: rebuilt from ``tokenizer.ggml.*`` (model "gpt2" only).
    Raises a one-line ValueError naming the file for anything missing or unreadable.
    """
    import tokenizers

    path = pathlib.Path(path)
    if _is_gguf(path):
        return _gguf_tokenizer(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such folder or .gguf file; {HOLDS}.")
    file = path / TOKENIZER_FILE
    if file.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:
            raise ValueError(f"{file}: cannot be read by tokenizers ({_reason(err)}); "
                             f"{HOLDS}.") from None
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise ValueError(f"{path}: no {TOKENIZER_FILE}, nor vocab.json + merges.txt; {HOLDS}.")
    try:
        tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
    except Exception as err:
        raise ValueError(f"{vocab} + {merges.name}: cannot be read as a BPE ({_reason(err)}); "
                         f"{HOLDS}.") from None
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    special = [t for t in _named_special_tokens(path) if tok.token_to_id(t) is not None]
    if not special and tok.token_to_id("<|endoftext|>") is not None:
        special = ["<|endoftext|>"]
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t in special])
    return tok


def tokenizer_info(path) -> dict:
    """The tokenizer's special ids and chat template.

    Returns {"bos_token_id", "eos_token_id", "pad_token_id": int | None (eos: a list where
    the checkpoint lists several), "chat_template": str | None, "special_tokens": [str]}.
    Folder: tokenizer_config.json, then config.json, then generation_config.json; the chat
    template from tokenizer_config.json, chat_template.jinja or chat_template.json.
    .gguf: tokenizer.ggml.*_token_id, tokenizer.chat_template, control tokens.
    """
    path = pathlib.Path(path)
    if _is_gguf(path):
        from bdia_jax.formats import gguf_file

        reader = gguf_file.open_reader(path)
        tokens = _gguf_list(reader, "tokenizer.ggml.tokens") or []
        types = _gguf_list(reader, "tokenizer.ggml.token_type") or []
        ids = {name: gguf_file.field(reader, f"tokenizer.ggml.{key}")
               for name, key in (("bos_token_id", "bos_token_id"),
                                 ("eos_token_id", "eos_token_id"),
                                 ("pad_token_id", "padding_token_id"))}
        return {**{k: (None if v is None else int(v)) for k, v in ids.items()},
                "chat_template": gguf_file.field(reader, "tokenizer.chat_template"),
                "special_tokens": [t for t, k in zip(tokens, types) if k == _CONTROL]}
    tok = load_tokenizer(path)
    tconfig = _json(path / TOKENIZER_CONFIG)
    configs = [_json(path / "config.json"), _json(path / "generation_config.json")]
    info = {}
    for name in ("bos", "eos", "pad"):
        value = None
        token = tconfig.get(f"{name}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            value = tok.token_to_id(token)
        for config in configs:
            if value is None:
                value = config.get(f"{name}_token_id")
        info[f"{name}_token_id"] = value
    template = tconfig.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _json(path / "chat_template.json").get("chat_template")
    info["chat_template"] = template
    decoder = tok.get_added_tokens_decoder()
    info["special_tokens"] = [decoder[i].content for i in sorted(decoder) if decoder[i].special]
    return info


def write_tokenizer(path, source) -> None:
    """Write ``source``'s tokenizer (folder or .gguf) into the HF folder ``path`` so that
    ``transformers.AutoTokenizer.from_pretrained(path)`` loads it.

    From a folder its tokenizer files are copied as they are (tokenizer.json written when it
    has only vocab.json + merges.txt; tokenizer_config.json written when absent). From a .gguf
    file: tokenizer.json and a tokenizer_config.json with the special tokens and chat template.
    """
    source, folder = pathlib.Path(source), pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(source)
    if source.is_dir() and source.resolve() == folder.resolve():
        return
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
    if not (folder / TOKENIZER_FILE).is_file():
        tok.save(str(folder / TOKENIZER_FILE))
    if not (folder / TOKENIZER_CONFIG).is_file():
        info = tokenizer_info(source)
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "clean_up_tokenization_spaces": False, "add_bos_token": False,
                  "add_eos_token": False}
        for name in ("bos", "eos", "pad"):
            token_id = info[f"{name}_token_id"]
            if isinstance(token_id, int):
                config[f"{name}_token"] = tok.id_to_token(token_id)
        if info["chat_template"] is not None:
            config["chat_template"] = info["chat_template"]
        config["additional_special_tokens"] = [
            t for t in info["special_tokens"]
            if t not in {config.get(f"{n}_token") for n in ("bos", "eos", "pad")}]
        (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------- GGUF
def _gguf_tokenizer(path: pathlib.Path):
    import tokenizers
    from tokenizers import decoders, pre_tokenizers, processors

    from bdia_jax.formats import gguf_file

    reader = gguf_file.open_reader(path)
    model = gguf_file.field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model {model!r} is not supported; only "
                         f"'gpt2' (byte-level BPE) tokenizers are rebuilt from GGUF metadata.")
    pre = gguf_file.field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE:
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (known: "
                         f"{', '.join(sorted(_GGUF_PRE))}); load the model's tokenizer.json "
                         f"from its Hugging Face folder instead.")
    tokens = _gguf_list(reader, "tokenizer.ggml.tokens")
    merges = _gguf_list(reader, "tokenizer.ggml.merges")
    types = _gguf_list(reader, "tokenizer.ggml.token_type") or []
    if not tokens or merges is None:
        raise ValueError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing; "
                         f"a GGUF of a BPE model carries both.")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise ValueError(f"{path}: tokenizer.ggml.merges entry {bad!r} is not 'left right'.")
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, pairs))
    digits, split = _GGUF_PRE[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [tokenizers.AddedToken(t, special=k == _CONTROL, normalized=False)
             for t, k in zip(tokens, types) if k in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    return tok


def _gguf_list(reader, key):
    """A GGUF array field as a Python list (strings decoded), or None when absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


# ---------------------------------------------------------------------------------- helpers
def _named_special_tokens(folder: pathlib.Path) -> list[str]:
    """Special tokens a tokenizer_config.json / special_tokens_map.json names."""
    names = []
    for config in (_json(folder / TOKENIZER_CONFIG), _json(folder / "special_tokens_map.json")):
        for key in ("bos_token", "eos_token", "unk_token", "pad_token",
                    "additional_special_tokens"):
            values = config.get(key)
            for value in values if isinstance(values, list) else [values]:
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value not in names:
                    names.append(value)
        for entry in (config.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and entry.get("special") and entry.get("content"):
                if entry["content"] not in names:
                    names.append(entry["content"])
    return names


def _json(file: pathlib.Path) -> dict:
    """A JSON object file, {} when absent; a one-line ValueError when unreadable."""
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: cannot be read as JSON ({_reason(err)}).") from None
    return value if isinstance(value, dict) else {}


def _is_gguf(path: pathlib.Path) -> bool:
    if path.suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."

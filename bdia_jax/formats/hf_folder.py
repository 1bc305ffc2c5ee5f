"""Hugging Face checkpoint folders: config.json + safetensors (one file or index + shards).

Reading checks each safetensors header (size, JSON, data offsets against the file's length)
before safetensors reads the data, so a truncated or garbage file is named in one line rather
than surfacing as safetensors' own ``SafetensorError`` without a path.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import struct
import tempfile

import numpy as np

from bdia_jax.formats.checkpoint import Checkpoint

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Files of other frameworks' checkpoints: named in the refusal, never read.
OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                 "flax_model.msgpack", "model.ckpt.index")
# dtypes write_hf_folder writes (safetensors' names); reading passes any dtype on.
WRITE_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
# safetensors element sizes, for the header check.
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# A header this large is garbage, not a checkpoint (safetensors' own limit is 100 MB).
_MAX_HEADER_BYTES = 100_000_000

HOLDS = (f"a Hugging Face checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (or "
         f"{INDEX_FILE} and the shards it lists), as save_pretrained(..., "
         f"safe_serialization=True) writes them")


def _bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------------- reading
def read_hf_folder(folder: pathlib.Path) -> Checkpoint:
    """config.json + safetensors weights of ``folder`` -> Checkpoint (see read_checkpoint)."""
    if not folder.exists():
        raise ValueError(f"{folder}: no such folder; {HOLDS}.")
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder or .gguf file; pass the checkpoint folder "
                         f"({HOLDS}) or a .gguf file.")
    config = read_config(folder / CONFIG_FILE)
    single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
    if single.exists() and index.exists():
        raise ValueError(f"{folder}: holds both {WEIGHTS_FILE} and {INDEX_FILE}, so which "
                         f"weights belong to {CONFIG_FILE} is ambiguous; delete the stale one.")
    if single.exists():
        tensors = read_safetensors(single)
        source = f"{folder} (Hugging Face safetensors, {_dtypes(tensors)})"
    elif index.exists():
        tensors, shards = _read_sharded(index)
        source = f"{folder} (Hugging Face safetensors, {shards} shards, {_dtypes(tensors)})"
    else:
        others = [name for name in OTHER_WEIGHTS if (folder / name).exists()]
        hint = (f" It holds {', '.join(others)} only: other frameworks' files are not read; "
                f"convert with transformers (from_pretrained, then save_pretrained(..., "
                f"safe_serialization=True))." if others else "")
        raise ValueError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}; {HOLDS}.{hint}")
    return Checkpoint(config=config, tensors=tensors, source=source)


def read_config(file: pathlib.Path) -> dict:
    """A config.json as a dict with a "model_type", or a one-line ValueError."""
    if not file.is_file():
        raise ValueError(f"{file}: missing; {HOLDS}.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: cannot be read as JSON ({_reason(err)}); {HOLDS}.") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"{file}: has no \"model_type\"; a Hugging Face config.json names its "
                         f"model_type (e.g. \"llama\"), as save_pretrained writes it.")
    return config


def read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file, dtype as stored (bfloat16 as ml_dtypes.bfloat16)."""
    header = check_safetensors_header(file)
    import safetensors

    if any(e["dtype"] == "BF16" for e in header.values()) and _old_safetensors(safetensors):
        raise ValueError(f"{file}: holds bfloat16 tensors, which safetensors "
                         f"{safetensors.__version__} cannot read into numpy; pip install "
                         f"'safetensors>=0.8,<0.9'.")
    try:
        with safetensors.safe_open(str(file), framework="numpy") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # SafetensorError, OSError, dtype errors: one line with the path
        raise ValueError(f"{file}: cannot be read by safetensors ({_reason(err)}); {HOLDS}.") \
            from None
    for name, entry in header.items():
        if tuple(tensors[name].shape) != tuple(entry["shape"]):
            raise ValueError(f"{file}: tensor {name!r} read as shape {tensors[name].shape}, "
                             f"header says {entry['shape']}; the file is damaged.")
    return tensors


def check_safetensors_header(file: pathlib.Path) -> dict:
    """The header {name: {"dtype", "shape", "data_offsets"}} of a safetensors file, checked
    against the file's size; a one-line ValueError for a truncated or garbage file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _Damaged(f"{size} bytes, shorter than a safetensors header")
            (header_bytes,) = struct.unpack("<Q", head)
            if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
                raise _Damaged(f"its first 8 bytes announce a {header_bytes}-byte header in a "
                               f"{size}-byte file: truncated, or not a safetensors file")
            raw = f.read(header_bytes)
    except OSError as err:
        raise ValueError(f"{file}: cannot be read ({_reason(err)}); {HOLDS}.") from None
    except _Damaged as err:
        raise ValueError(f"{file}: {err}; {HOLDS}.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{file}: its header is not safetensors JSON ({_reason(err)}): "
                         f"garbage or not a safetensors file; {HOLDS}.") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_bytes
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            want = int(np.prod(entry["shape"], dtype=np.int64)) * _ITEM_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{file}: header entry {name!r} is malformed ({entry!r:.80}); "
                             f"{HOLDS}.") from None
        if stop - begin != want:
            raise ValueError(f"{file}: tensor {name!r} ({entry['dtype']} {entry['shape']}) "
                             f"spans {stop - begin} bytes, its shape needs {want}; the file is "
                             f"damaged; {HOLDS}.")
        end = max(end, stop)
    if end != data_bytes:
        what = "truncated" if end > data_bytes else "has trailing bytes"
        raise ValueError(f"{file}: {what} (its header describes {end} bytes of tensor data, "
                         f"the file holds {data_bytes}); {HOLDS}.")
    return header


def _read_sharded(index: pathlib.Path) -> tuple[dict, int]:
    """Tensors of every shard listed in model.safetensors.index.json, and the shard count."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not {tensor name: shard file}")
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{index}: cannot be read as a safetensors index ({_reason(err)}); "
                         f"it should hold {{\"weight_map\": {{tensor name: shard file}}}} as "
                         f"save_pretrained writes it.") from None
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if pathlib.Path(s).name != s]
    if bad:
        raise ValueError(f"{index}: shard name {bad[0]!r} is not a file name in the folder.")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise ValueError(f"{index.parent}: shard {missing[0]} listed in {INDEX_FILE} is missing"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                         f"the folder should hold all {len(shards)} shards the index lists.")
    tensors = {}
    for shard in shards:
        file = index.parent / shard
        held = read_safetensors(file)
        for name, listed in weight_map.items():
            if listed == shard:
                if name not in held:
                    raise ValueError(f"{file}: lacks tensor {name!r}, which {INDEX_FILE} "
                                     f"places there; the shard does not belong to this index.")
                tensors[name] = held[name]
    return tensors, len(shards)


def _old_safetensors(safetensors) -> bool:
    """True before 0.8.0, the first release whose numpy API reads BF16 (as ml_dtypes')."""
    version = tuple(int(p) for p in re.findall(r"\d+", safetensors.__version__)[:2])
    return version < (0, 8)


def _dtypes(tensors: dict) -> str:
    names = sorted({str(t.dtype) for t in tensors.values()})
    return "/".join(names) if names else "no tensors"


class _Damaged(Exception):
    pass


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------------- writing
def write_hf_folder(path, config: dict, tensors: dict, *,
                    max_shard_bytes: int = 2 * 2**30) -> None:
    """Write ``config`` and ``tensors`` as a Hugging Face checkpoint folder.

    Args:
      path: the folder (created, with missing parents; other files in it, such as tokenizer
        files, are kept, and any older weights of the folder are removed).
      config: the config.json dict; needs "model_type".
      tensors: HF name -> array (np or jax), float32, float16 or bfloat16, written in that
        dtype and shape.
      max_shard_bytes: above this total, tensors go to model-0000i-of-0000n.safetensors shards
        (each at most this size, unless one tensor alone is larger) + model.safetensors.index.json,
        as save_pretrained(max_shard_size=...) writes them.

    The files are written in a temporary folder beside ``path`` and moved in afterwards, so a
    crash never leaves a half-written file under a checkpoint name; file modes follow the umask.
    Safetensors metadata: {"format": "pt"}, as transformers writes and expects.
    """
    import safetensors.numpy

    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError("write_hf_folder: config needs a \"model_type\" string, as config.json "
                         "has.")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"write_hf_folder: max_shard_bytes must be a positive int, got "
                         f"{max_shard_bytes!r}.")
    arrays = {}
    allowed = {**WRITE_DTYPES, _bfloat16(): "BF16"}
    for name, value in tensors.items():
        array = np.ascontiguousarray(np.asarray(value))
        if array.dtype not in allowed:
            raise ValueError(f"write_hf_folder: tensor {name!r} has dtype {array.dtype}; "
                             f"write float32, float16 or bfloat16.")
        arrays[name] = array
    shards = _plan_shards(arrays, max_shard_bytes)
    folder = pathlib.Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        written = []
        if len(shards) == 1:
            safetensors.numpy.save_file(shards[0], str(tmp / WEIGHTS_FILE),
                                        metadata={"format": "pt"})
            written.append(WEIGHTS_FILE)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                safetensors.numpy.save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
                written.append(name)
            total = sum(a.nbytes for a in arrays.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(
                weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            written.append(INDEX_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        written.append(CONFIG_FILE)
        mask = _umask()  # mkdtemp makes 0700, safetensors' save_file 0600: the umask's modes
        os.chmod(tmp, 0o777 & ~mask)
        for name in written:
            os.chmod(tmp / name, 0o666 & ~mask)
        if not folder.exists():
            os.rename(tmp, folder)
            return
        # An existing folder: drop its old weights first (a crash then leaves a folder that
        # refuses to load, never one whose weights and config.json disagree), then move in.
        for old in folder.iterdir():
            if old.name in (WEIGHTS_FILE, INDEX_FILE, CONFIG_FILE) or \
                    SHARD_PATTERN.fullmatch(old.name):
                old.unlink()
        for name in written:  # config.json last
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plan_shards(arrays: dict, max_shard_bytes: int) -> list[dict]:
    """Tensors in order into shards of at most max_shard_bytes (a larger tensor alone)."""
    shards, current, size = [], {}, 0
    for name, array in arrays.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    return shards


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

"""``Checkpoint`` and ``read_checkpoint``: one entry for every checkpoint file format."""

from __future__ import annotations

import dataclasses
import pathlib

# config.json model_type values bdia_jax.pretrained knows; other values are passed on for it
# to refuse by name (this package knows no model).
MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "mistral")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as its files hold it, before any model is built.

    config:  the Hugging Face config.json dict; always has "model_type" (GGUF: a LlamaConfig-
             style dict with rope_theta / rope_scaling, as hub config.json files spell them).
    tensors: HF parameter name -> np.ndarray in HF's own names and layouts (e.g.
             "model.layers.0.self_attn.q_proj.weight" [out, in]; GPT-2's Conv1D
             "h.0.attn.c_attn.weight" [in, out]); dtype as stored (float32, float16,
             ml_dtypes.bfloat16); GGUF tensors dequantized to float32 with llama.cpp's q/k row
             permutation undone. Tied heads: no "lm_head.weight" and
             config["tie_word_embeddings"] is True (GGUF; an HF folder's config says so itself).
    source:  one human line for logs: path, format and (GGUF) quantization types.
    """

    config: dict
    tensors: dict
    source: str


def read_checkpoint(path) -> Checkpoint:
    """Read an HF checkpoint folder or a .gguf file (architecture llama) into a ``Checkpoint``.

    Args:
      path: a folder with config.json and model.safetensors (or model.safetensors.index.json
        and its shards), or a .gguf file.

    Raises:
      ValueError (one line naming the file and what the folder or file should hold): missing,
        unreadable, truncated or garbage files, pytorch_model.bin-only folders, a shard the
        index lists but the folder lacks, unsupported GGUF architectures or quantizations.
    """
    path = pathlib.Path(path)
    if path.suffix == ".gguf" or (path.is_file() and _is_gguf(path)):
        from bdia_jax.formats import gguf_file

        return gguf_file.read_gguf(path)
    from bdia_jax.formats import hf_folder

    return hf_folder.read_hf_folder(path)


def _is_gguf(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False

"""Checkpoint FILE formats: Hugging Face folders (safetensors, single or sharded) and GGUF.

This package knows no model: it turns files into ``Checkpoint`` (a config.json-style dict and
HF-named numpy tensors) and back, and reads tokenizers. ``bdia_jax.pretrained`` maps a
``Checkpoint`` onto a bdia_jax model. Every file problem is a one-line ``ValueError`` that names
the file and what it should hold. ``gguf`` is imported only when a .gguf file is read.
"""

from bdia_jax.formats.checkpoint import Checkpoint, read_checkpoint
from bdia_jax.formats.hf_folder import write_hf_folder
from bdia_jax.formats.tokenizer import load_tokenizer, tokenizer_info, write_tokenizer

__all__ = ["Checkpoint", "read_checkpoint", "write_hf_folder", "load_tokenizer",
           "tokenizer_info", "write_tokenizer"]

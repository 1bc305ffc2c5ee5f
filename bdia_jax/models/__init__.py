"""Flax NNX models on the BDIA engine: ordinary pre-LN transformers whose training update
(``update=Standard() | BDIA(...)``) and gradient method (``backprop=Autodiff() | Remat() |
Reversible(...)``) are switches (import them from ``bdia_jax``).

* ``layers``:  ``BlockConfig`` (the block settings every config shares), attention (GQA,
  rotary positions, q/k norm), MLPs (GELU, SwiGLU), LayerNorm/RMSNorm, encoder/decoder
  residual branches, KV caches.
* ``lora``:    ``LoRA`` (the ``BlockConfig.lora`` option: low-rank adapters), ``LoRALinear``,
  ``merge_lora``, ``with_lora``.
* ``residual_stack``: ``ResidualStack`` (depth-stacked parameters → ``bdia_jax.apply_stack``).
* ``vit``:     ``ViT`` / ``ViTConfig`` / ``vit_config``.
* ``revvit``:  ``RevViT`` / ``RevViTConfig`` / ``revvit_config`` (two-stream reversible ViT).
* ``decoder``: ``DecoderLM`` / ``DecoderConfig`` / ``decoder_config``: the decoder-only LM
  (GPT-2 and the Llama family: Llama 3.x, Qwen2/3, Mistral, SmolLM2), KV cache, sampling.
* ``gpt``:     ``GPT`` / ``GPTConfig`` / ``gpt_config``: the GPT names of ``decoder``.
* ``seq2seq``: ``Seq2SeqTransformer`` / ``Seq2SeqConfig`` / ``seq2seq_config`` (translation).
* ``decoding``: greedy and beam search over a KV-cached step function.
"""

from bdia_jax.models import decoding
from bdia_jax.models.decoder import (
    DECODER_VARIANTS,
    DecoderConfig,
    DecoderLM,
    decoder_config,
)
from bdia_jax.models.gpt import GPT, GPT_VARIANTS, GPTConfig, gpt_config
from bdia_jax.models.layers import (
    MLP,
    BlockConfig,
    DecoderBlock,
    DecoderCache,
    EncoderBlock,
    FieldError,
    GatedMLP,
    KVCache,
    LayerNorm,
    MultiHeadAttention,
    ReversalProbe,
    RMSNorm,
    Rope,
    causal_mask,
    dot_product_attention,
    padding_mask,
)
from bdia_jax.models.lora import LORA_TARGETS, LoRA, LoRALinear, merge_lora, with_lora
from bdia_jax.models.residual_stack import ResidualStack, stats_to_aux
from bdia_jax.models.revvit import RevBlock, RevViT, RevViTConfig, TwoStreamStack, revvit_config
from bdia_jax.models.seq2seq import (
    SEQ2SEQ_VARIANTS,
    DecodeState,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    seq2seq_config,
)
from bdia_jax.models.vit import VIT_VARIANTS, ViT, ViTConfig, vit_config

__all__ = [
    "BlockConfig",
    "DECODER_VARIANTS",
    "DecoderConfig",
    "DecoderLM",
    "FieldError",
    "GatedMLP",
    "RMSNorm",
    "Rope",
    "decoder_config",
    "LayerNorm",
    "LORA_TARGETS",
    "LoRA",
    "LoRALinear",
    "merge_lora",
    "with_lora",
    "SEQ2SEQ_VARIANTS",
    "DecodeState",
    "Seq2SeqConfig",
    "Seq2SeqTransformer",
    "decoding",
    "seq2seq_config",
    "GPT",
    "GPTConfig",
    "GPT_VARIANTS",
    "gpt_config",
    "MLP",
    "VIT_VARIANTS",
    "DecoderBlock",
    "DecoderCache",
    "EncoderBlock",
    "KVCache",
    "MultiHeadAttention",
    "ResidualStack",
    "ReversalProbe",
    "RevBlock",
    "RevViT",
    "RevViTConfig",
    "TwoStreamStack",
    "revvit_config",
    "ViT",
    "ViTConfig",
    "causal_mask",
    "dot_product_attention",
    "padding_mask",
    "stats_to_aux",
    "vit_config",
]


# The method objects were re-exported here in 0.1.0; they live at bdia_jax's top level.
_MOVED_METHODS = ("BDIA", "Autodiff", "Remat", "Reversible", "StackMethod", "Standard")


def __getattr__(name):
    if name in _MOVED_METHODS:
        import warnings

        from bdia_jax import methods

        warnings.warn(f"bdia_jax.models.{name} moved to bdia_jax.methods.{name}; the alias "
                      "goes in the next release.", DeprecationWarning, stacklevel=2)
        return getattr(methods, name)
    raise AttributeError(f"module 'bdia_jax.models' has no attribute {name!r}")

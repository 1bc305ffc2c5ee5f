"""GPT names of the decoder-only LM (``bdia_jax.models.decoder``): GPT-2 is a
``DecoderConfig`` with its defaults (LayerNorm, learned positions, GELU MLP, biases, tied
head). ``GPT`` is ``DecoderLM``, ``GPTConfig`` is ``DecoderConfig`` and ``gpt_config`` picks
among ``GPT_VARIANTS`` ("tiny", "small", "nanogpt")."""

from bdia_jax.models.decoder import (
    GPT,
    GPT_VARIANTS,
    KEY_EMBED,
    KEY_STACK,
    GPTConfig,
    gpt_config,
    sample_logits,
)

__all__ = ["GPT", "GPTConfig", "GPT_VARIANTS", "KEY_EMBED", "KEY_STACK", "gpt_config",
           "sample_logits"]

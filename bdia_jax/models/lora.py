"""LoRA (low-rank adapters, Hu et al. 2021) as an option of every transformer config.

``BlockConfig.lora = LoRA(rank, alpha, dropout, targets)`` gives the chosen projections of
every block (attention "q", "k", "v", "o"; MLP "gate", "up", "down") a ``LoRALinear``:

    y = x W + b + (alpha / rank) · (dropout(x) A) B,   A: [in, rank], B: [rank, out]

A and B are ``nnx.LoRAParam`` variables (a subclass of ``nnx.Param``) stored in float32
beside the base ``kernel`` / ``bias`` (same paths as without LoRA, so checkpoints map the
same way). They are created inside the blocks, so a ``ResidualStack`` stacks them with a
leading [depth] axis like every other block parameter. A is drawn as PEFT draws it
(uniform ±1/√in), B is zero: a fresh LoRA model computes the base model's outputs.

Train only the adapters with ``bdia_jax.training``'s ``trainable=nnx.LoRAParam``: the base
weights then get no gradients and no optimizer state. ``merge_lora`` folds the adapters
into the base kernels (a model without adapters, e.g. for ``pretrained.save``);
``with_lora`` adds fresh adapters to a model that has none (e.g. a loaded checkpoint).

Dropout on the adapters' input is drawn from the block key (``fold_in`` of the block's
LoRA key with the projection's index), so the reversible backward pass redraws the same
masks; it is not supported with the position-blocked MLP (``chunk_mlp``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bdia_jax.ops import dropout, dropout_threshold

# Projection names, with their index (folded into the LoRA dropout key) and PEFT's names.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
LORA_KEY = 3  # fold_in index of a block key that gives the block's LoRA dropout key


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adapters on the ``targets`` projections of every block."""

    rank: int = 8  # r: the adapters' inner dimension
    alpha: float = 16.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # dropout on the adapters' input (PEFT's lora_dropout)
    # Projections with adapters, from LORA_TARGETS: "q", "k", "v", "o" (attention), "gate",
    # "up", "down" (MLP; a GELU MLP has "up" = fc1 and "down" = fc2, no "gate").
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {self.rank!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a number > 0, got {self.alpha!r}.")
        dropout_threshold(self.dropout, "LoRA dropout")
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets \
                or any(t not in LORA_TARGETS for t in targets) \
                or len(set(targets)) != len(targets):
            raise ValueError(f"LoRA targets must be a non-empty tuple of distinct names from "
                             f"{LORA_TARGETS}, got {targets!r}.")
        object.__setattr__(self, "targets", tuple(targets))
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of the adapters' update."""
        return self.alpha / self.rank


class LoRALinear(nnx.Linear):
    """``nnx.Linear`` (params ``kernel`` [in, out], ``bias``) plus ``lora_a`` [in, rank] and
    ``lora_b`` [rank, out], float32 ``nnx.LoRAParam``s; see the module docstring.

    ``index``: the projection's place in ``LORA_TARGETS`` (its dropout key is
    ``fold_in(key, index)``)."""

    def __init__(self, in_features: int, out_features: int, *, lora: LoRA, index: int,
                 rngs: nnx.Rngs, **linear_options):
        super().__init__(in_features, out_features, rngs=rngs, **linear_options)
        bound = 1.0 / math.sqrt(in_features)  # PEFT: kaiming_uniform(a=√5) on [rank, in]
        self.lora_a = nnx.LoRAParam(jax.random.uniform(
            rngs.params(), (in_features, lora.rank), jnp.float32, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, out_features), jnp.float32))
        self.lora_scale = lora.scale
        self.lora_dropout = lora.dropout
        self.lora_index = index

    def __call__(self, inputs: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """inputs [..., in] → [..., out] in the compute dtype; ``key``: the block's LoRA
        dropout key (None: no dropout)."""
        y = super().__call__(inputs)
        if self.lora_dropout and key is not None:
            inputs = dropout(inputs, self.lora_dropout, jax.random.fold_in(key, self.lora_index))
        a = self.lora_a[...].astype(y.dtype)
        b = self.lora_b[...].astype(y.dtype)
        update = (inputs.astype(y.dtype) @ a) @ b
        return y + update * jnp.asarray(self.lora_scale, y.dtype)


def linear(n_in: int, n_out: int, *, target: str, lora: LoRA | None, rngs: nnx.Rngs,
           **linear_options) -> nnx.Linear:
    """An ``nnx.Linear``, or a ``LoRALinear`` when ``target`` is one of ``lora.targets``."""
    if lora is not None and target in lora.targets:
        return LoRALinear(n_in, n_out, lora=lora, index=LORA_TARGETS.index(target), rngs=rngs,
                          **linear_options)
    return nnx.Linear(n_in, n_out, rngs=rngs, **linear_options)


def apply(layer: nnx.Linear, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """``layer(x)``, giving a ``LoRALinear`` its dropout key."""
    return layer(x, key) if isinstance(layer, LoRALinear) else layer(x)


def lora_key(key: jax.Array | None, lora: LoRA | None) -> jax.Array | None:
    """The block's LoRA dropout key (None when there is no LoRA dropout or no key)."""
    if key is None or lora is None or not lora.dropout:
        return None
    return jax.random.fold_in(key, LORA_KEY)


def _config(model: nnx.Module):
    config = getattr(model, "config", None)
    if config is None or not any(f.name == "lora" for f in dataclasses.fields(config)):
        raise TypeError(f"{type(model).__name__} has no config with a lora field; LoRA works "
                        "on the models of bdia_jax.models built from a BlockConfig.")
    return config


def merge_lora(model: nnx.Module) -> nnx.Module:
    """The same model without adapters: every adapted kernel becomes
    ``kernel + (alpha / rank) · (A @ B)`` (computed in float32, stored in the kernel's
    dtype); every other variable is kept bit for bit. The model's config gets lora=None."""
    config = _config(model)
    if config.lora is None:
        raise ValueError("merge_lora needs a model with adapters (config.lora is None).")
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    merged = dataclasses.replace(config, lora=None)
    abstract = nnx.eval_shape(lambda: type(model)(merged, rngs=nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract)
    values = []
    for path, var in nnx.to_flat_state(target):
        value = flat[path].get_value()
        a_path = path[:-1] + ("lora_a",)
        if path[-1] == "kernel" and a_path in flat:
            a = flat[a_path].get_value().astype(jnp.float32)
            b = flat[path[:-1] + ("lora_b",)].get_value().astype(jnp.float32)
            delta = jnp.einsum("...ir,...ro->...io", a, b,
                               precision=jax.lax.Precision.HIGHEST) * config.lora.scale
            value = (value.astype(jnp.float32) + delta).astype(value.dtype)
        values.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def with_lora(model: nnx.Module, lora: LoRA, *, rngs: nnx.Rngs) -> nnx.Module:
    """The same model with fresh adapters ``lora`` (A drawn from ``rngs``, B = 0, so its
    outputs are the model's); every variable of ``model`` is kept bit for bit."""
    config = _config(model)
    if config.lora is not None:
        raise ValueError("with_lora needs a model without adapters; merge_lora(model) first.")
    if not isinstance(lora, LoRA):
        raise TypeError(f"lora must be a bdia_jax.models.LoRA, got {type(lora).__name__}.")
    lora_config = dataclasses.replace(config, lora=lora)
    # Under jit, returning only the adapters lets XLA drop the base weights' random init (most
    # of an eager construction's time); the adapters' draws are the same bits as eagerly.
    adapters = nnx.jit(lambda r: nnx.state(type(model)(lora_config, rngs=r), nnx.LoRAParam))(
        rngs)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: type(model)(lora_config,
                                                                   rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    flat.update(nnx.to_flat_state(adapters))
    values = [(p, v.replace(flat[p].get_value())) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(values))

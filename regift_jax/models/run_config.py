"""How a decoder runs, apart from what it is.

:class:`~regift_jax.models.config.ModelConfig` is the architecture (what a checkpoint's
``config.json`` fixes).  :class:`RunConfig` is how it is computed: numerics, rematerialisation,
the attention kernel and the chunking of attention and of the training loss; none of it changes a
parameter's shape.  :class:`LoraConfig` says which projections carry LoRA adapters (rank 0 = off);
it changes the parameter tree, but not the base weights a checkpoint holds.  All three are frozen
and hashable, so jitted functions take them as static arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "splash")
HALF_DTYPES = ("bfloat16", "bf16", "float16", "fp16")
RUN_FIELDS = ("param_dtype", "dtype", "remat_policy", "attention_chunk", "loss_chunk",
              "attention_impl")
LORA_FIELDS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "lora_targets": "targets"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims | nothing_saveable
    # Causal query chunking of attention without a KV cache (training, scoring): queries in
    # chunks of this many tokens attend only to the keys up to their chunk's end (0 = off).
    attention_chunk: int = 0
    # Training loss: LM head + cross-entropy over the loss positions only, in chunks of this many
    # positions (regift_jax.models.head_loss; 0 = full [B, T, V] logits then the loss).
    loss_chunk: int = 0
    # Attention kernel without a KV cache (training, scoring): "einsum" (the decoder's own two
    # matmuls, query-chunked by attention_chunk), "xla" or "cudnn" (jax.nn.dot_product_attention
    # with that implementation; "cudnn" = cuDNN flash attention on NVIDIA GPUs, bf16/fp16 only),
    # "splash" (the Pallas TPU splash-attention kernel, regift_jax.models.splash; interpreted off
    # TPU).  Cached calls (prefill/decode) always use "einsum" (the cache layout is the decoder's).
    attention_impl: str = "einsum"

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; valid: "
                             f"{', '.join(ATTENTION_IMPLS)}")
        if self.attention_impl == "cudnn" and self.dtype not in HALF_DTYPES:
            raise ValueError(f"attention_impl='cudnn' needs a bfloat16 or float16 compute dtype "
                             f"(cuDNN flash attention), got dtype={self.dtype!r}; use "
                             f"attention_impl='einsum' or 'xla' for float32")

    def replace(self, **kw) -> "RunConfig":
        return dataclasses.replace(self, **kw)


def resolve_attention_impl(name: str, platform: str) -> str:
    """A config's ``attention_impl`` for a platform: ``"auto"`` is the splash kernel on TPU and
    the decoder's einsum elsewhere (splash runs interpreted, slowly, off TPU); others as given."""
    if name == "auto":
        return "splash" if platform == "tpu" else "einsum"
    return name


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the projections named in ``targets`` (q_proj k_proj v_proj o_proj
    gate_proj up_proj down_proj), ``y += dropout(x) @ a @ b * alpha / rank``; rank 0 = off."""
    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    targets: Sequence[str] = ("q_proj", "v_proj")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"LoRA rank must be >= 0 (0 = off), got {self.rank}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def applies_to(self, name: str) -> bool:
        return self.rank > 0 and name in self.targets

    def replace(self, **kw) -> "LoraConfig":
        return dataclasses.replace(self, **kw)


NO_LORA = LoraConfig()


def split_overrides(overrides: dict):
    """``(architecture, run, lora)`` keyword dicts from one dict of flat field names
    (``dtype``, ``remat_policy``, ``lora_rank`` ... and :class:`ModelConfig` fields), the form
    ``models.load`` and the presets take."""
    arch, run, lora = {}, {}, {}
    for k, v in overrides.items():
        if k in RUN_FIELDS:
            run[k] = v
        elif k in LORA_FIELDS:
            lora[LORA_FIELDS[k]] = v
        else:
            arch[k] = v
    return arch, run, lora

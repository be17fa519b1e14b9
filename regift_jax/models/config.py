"""Model configuration shared by every decoder family.

One frozen dataclass describes Llama-3.x, Mistral, Qwen2 and Phi-3/Phi-4 decoders; the differences
between the families are flags (``attention_bias``, ``sliding_window``, ``fused_qkv`` ...), never
separate model classes.  ``ModelConfig.from_hf_config`` reads a Hugging Face ``config.json`` dict
and ``to_hf_config`` writes one back for export.

``ModelConfig`` is the architecture only: every field follows from a checkpoint's config.json.
How the decoder is computed (dtypes, remat, attention kernel, chunking) is a
:class:`~regift_jax.models.run_config.RunConfig`, and LoRA adapters a
:class:`~regift_jax.models.run_config.LoraConfig`; functions that run the model take them as
separate (jit-static) arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

FAMILIES = ("llama", "mistral", "qwen2", "phi3")

# Hugging Face ``architectures`` / ``model_type`` for every family we support.
HF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
}


class _HashableDict(dict):
    """A read-only dict that can live in a hashable (jit-static) dataclass."""

    def __hash__(self):
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))

    def _ro(self, *a, **k):
        raise TypeError("ModelConfig.rope_scaling is read-only; use ModelConfig.replace")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _ro


class UnsupportedArchitectureError(ValueError):
    """Raised for a checkpoint whose architecture this project cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, or {"rope_type": "linear", "factor"}.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    sliding_window: Optional[int] = None  # Mistral-7B-v0.1: 4096
    fused_qkv: bool = False  # Phi-3: checkpoint stores qkv_proj / gate_up_proj fused
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2  # int or tuple of ints
    pad_token_id: Optional[int] = None
    name: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, _HashableDict):
            # the config is a static argument of jitted functions: it must hash
            object.__setattr__(self, "rope_scaling", _HashableDict(self.rope_scaling))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def eos_token_ids(self) -> tuple:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (tuple, list)) else (int(e),)

    # ------------------------------------------------------------------ HF config I/O
    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> "ModelConfig":
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "")
        family = None
        for fam, (arch, mt) in HF_ARCHITECTURES.items():
            if arch in archs or model_type == mt:
                family = fam
                break
        if family is None:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {archs or model_type!r}; supported: "
                + ", ".join(a for a, _ in HF_ARCHITECTURES.values()))
        n_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        # transformers >= 5 nests rope settings under "rope_parameters".
        rp = hf.get("rope_parameters")
        if isinstance(rp, dict):
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rt = rope_scaling.get("rope_type", rope_scaling.get("type"))
            rope_scaling["rope_type"] = rt
            if rt in (None, "default"):
                rope_scaling = None
            elif rt not in ("llama3", "linear"):
                raise UnsupportedArchitectureError(
                    f"unsupported rope_scaling type {rt!r} (supported: llama3, linear)")
        if family == "phi3" and hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedArchitectureError(
                "Phi-3 with partial_rotary_factor != 1 is not supported")
        sliding = hf.get("sliding_window")
        if family == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        if family == "llama":
            sliding = None
        kw = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hidden // n_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=(family == "qwen2") or bool(hf.get("attention_bias", False)),
            sliding_window=sliding,
            fused_qkv=(family == "phi3"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            name=hf.get("_name_or_path", ""),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict:
        arch, model_type = HF_ARCHITECTURES[self.family]
        hf = {
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.family in ("llama",):
            hf["attention_bias"] = False
            hf["mlp_bias"] = False
        if self.family == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.family == "qwen2":
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
            hf["max_window_layers"] = self.num_layers
        if self.family == "phi3":
            hf["sliding_window"] = self.sliding_window
            hf["original_max_position_embeddings"] = self.max_position_embeddings
            hf["resid_pdrop"] = 0.0
            hf["embd_pdrop"] = 0.0
            hf["attention_dropout"] = 0.0
        return hf

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        """Exact parameter count (base weights, no LoRA), as transformers counts it."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hq = self.num_heads * self.head_dim
        hkv = self.num_kv_heads * self.head_dim
        attn = d * hq + 2 * d * hkv + hq * d
        if self.attention_bias:
            attn += hq + 2 * hkv
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N_matmul + 12 * L * H * hd * T (causal attention counted
        in full, PaLM appendix B convention).  N excludes the embedding gather."""
        n = self.num_params() - self.vocab_size * self.hidden_size * (
            0 if self.tie_word_embeddings else 1)
        return 6.0 * n + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len

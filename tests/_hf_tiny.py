"""Tiny random transformers models of each family (test-only helper; needs torch)."""

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "phi3")


def make_hf_model(family, seed=0):
    import torch
    import transformers
    common = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
    if family == "llama":
        c = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                   "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 16})
    elif family == "mistral":
        c = transformers.MistralConfig(**common, sliding_window=7)  # window < sequence (33)
    elif family == "qwen2":
        c = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    elif family == "phi3":
        c = transformers.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(c, attn_implementation="eager").eval()
    # Randomise every tensor (biases and norms too), so nothing is trivially zero or one.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def batch(vocab=101, B=2, T=33, pad_row=1, n_pad=5, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[pad_row, :n_pad] = 0
    ids[pad_row, :n_pad] = 0
    return ids, mask


def hf_logits(m, ids, mask):
    import torch
    with torch.no_grad():
        return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()

"""Mistral students: the paper's Mistral-7B (authors' repo: ``mistralai/Mistral-7B-v0.1``).

    python -m regift_jax.train --config=configs/mistral.py[:mistral_7b|mistral_7b_full] ...

Presets: ``mistral_7b`` (default; the paper's LoRA r16 alpha 32 dropout 0.05 on q_proj/v_proj,
lr 2e-4) and ``mistral_7b_full`` (full fine-tuning, lr 2e-5: not in the paper, which fine-tunes
with LoRA only; for comparison); the rest of the recipe is the paper's (see
``configs/llama.py: paper_recipe``: 32 examples per optimizer step, ...).  Mistral-7B-v0.1 uses
a SentencePiece tokenizer, so the data pipeline's prompt/response boundary resolves to ``joint``
tokenization (``data.boundary=auto``).
The model name ``mistral-7b-v0.1`` must resolve through ``regift_jax.models.load`` (or override
``--config.model.name`` with an HF directory).
"""

from regift_jax.core import configs_util

PRESETS = ("mistral_7b", "mistral_7b_full")


def get_config(arg=None):
    paper_recipe = configs_util.sibling_config(__file__, "llama").paper_recipe
    a = configs_util.parse_arg(arg, preset="mistral_7b")
    if a.preset not in PRESETS:
        raise ValueError(f"configs/mistral.py: unknown preset {a.preset!r}; valid: "
                         f"{', '.join(PRESETS)}")
    c = configs_util.base_config()
    c.preset = a.preset
    return paper_recipe(c, "mistral-7b-v0.1", full_ft=a.preset.endswith("_full"))

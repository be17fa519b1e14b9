"""Phi-4 students: the paper's Phi-4 (authors' repo: ``microsoft/phi-4``, 14B, Phi-3 architecture
with fused qkv / gate_up projections, split on import by ``regift_jax.models.checkpoints``).

    python -m regift_jax.train --config=configs/phi4.py[:phi4|phi4_full] ...

Presets: ``phi4`` (default; the paper's LoRA r16 alpha 32 dropout 0.05 on q_proj/v_proj, lr 2e-4)
and ``phi4_full`` (full fine-tuning, lr 2e-5: not in the paper, which fine-tunes with LoRA only;
for comparison); the rest is the paper's recipe (``configs/llama.py: paper_recipe``), with
``remat_policy=full`` for the 14B model's activations.  The model name
``phi-4`` must resolve through ``regift_jax.models.load`` (or override ``--config.model.name``).
"""

from regift_jax.core import configs_util

PRESETS = ("phi4", "phi4_full")


def get_config(arg=None):
    paper_recipe = configs_util.sibling_config(__file__, "llama").paper_recipe
    a = configs_util.parse_arg(arg, preset="phi4")
    if a.preset not in PRESETS:
        raise ValueError(f"configs/phi4.py: unknown preset {a.preset!r}; valid: "
                         f"{', '.join(PRESETS)}")
    c = configs_util.base_config()
    c.preset = a.preset
    paper_recipe(c, "phi-4", full_ft=a.preset.endswith("_full"))
    c.model.remat_policy = "full"
    return c

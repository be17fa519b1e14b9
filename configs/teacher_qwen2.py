"""Teacher config: the paper's teacher, DeepSeek-R1-Distill-Qwen (Qwen2 architecture).

    python -m regift_jax.generate_traces --config=configs/teacher_qwen2.py:r1_distill_qwen_32b \
        --config.data.squad_dir=/data/squad_v2 --config.out_dir=/shared/traces_r1_qwen

Needs the weights as a local Hugging Face directory (``REGIFT_MODELS_DIR/<preset>``), SQuAD-v2
train (``data.squad_dir`` holding the official ``train-v2.0.json``, or a Hugging Face ``squad_v2``
dataset saved there with ``save_to_disk``; or ``data.squad_file``) and an accelerator.  Paper
settings (the defaults of ``configs/teacher_base.py``): the whole train split, greedy, 512 new
tokens, one sample per question.  R1-Distill's chat template already opens ``<think>``, so the
prompt is sent raw (``chat=False``) with the authors' prefill, as in their script; the model
answers as plain text after ``</think>``, which the trace parser takes as the answer (the
authors' rule, recorded as ``answer_source: after_think``).  The teacher label is derived from
the model directory.

The 32B teacher does not fit one chip (61 GiB of weights in bf16, loaded in the compute dtype):
its preset shards one teacher over every chip of the slice with ``teacher.mesh="fsdp=-1,tensor=8"``
(40 query / 8 KV heads, MLP and vocabulary over ``tensor``, the model width over ``fsdp``; the KV
cache follows), every host running the same batches in lockstep.  By the TPU preflight
(``python -m regift_jax.preflight --config=configs/teacher_qwen2.py --accelerator_type=v5e-16
--stages=decode``; BENCHMARKS.md "TPU by compilation") its decode step of 64 prompts of 1,024
tokens with a 1,536-slot cache fits a v5e-16 (fsdp=2 x tensor=8, 7.2 of 16 GiB per chip), a v5e-8
(13.7 of 16) and a v4-32.  A 4-chip slice (v4-8, v5p-8) cannot split 8 ways:
``--config.teacher.mesh=fsdp=-1,tensor=4`` fits both (27.3 of 32 GiB per chip on a v4-8, 27.5 of
95 on a v5p-8).  The smaller presets load unsharded on one chip (``teacher.mesh=""``);
``--config.teacher.mesh=...`` shards them over a slice too.
"""

from regift_jax.core import configs_util

# The paper's teacher is too large for one chip: one teacher over the slice (see the docstring).
MESHES = {"r1_distill_qwen_32b": "fsdp=-1,tensor=8"}

PRESETS = {
    "r1_distill_qwen_32b": "deepseek-r1-distill-qwen-32b",
    "r1_distill_qwen_14b": "deepseek-r1-distill-qwen-14b",
    "r1_distill_qwen_7b": "deepseek-r1-distill-qwen-7b",
}


def get_config(arg=None):
    arg = arg or "r1_distill_qwen_32b"
    if arg not in PRESETS:
        raise ValueError(f"configs/teacher_qwen2.py: unknown preset {arg!r}; valid: "
                         f"{', '.join(PRESETS)}")
    c = configs_util.sibling_config(__file__, "teacher_base").base_config()
    c.teacher.update(dict(model=PRESETS[arg], dtype="bfloat16", chat=False,
                          mesh=MESHES.get(arg, "")))
    c.data.split = "train"  # the paper's source: all of SQuAD-v2 train
    c.out_dir = "traces_r1_qwen"
    return c

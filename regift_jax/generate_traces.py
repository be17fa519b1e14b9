"""Command line: offline teacher trace generation (:mod:`regift_jax.traces.generate`).

    python -m regift_jax.generate_traces --config=configs/teacher_smollm2.py
    python -m regift_jax.generate_traces --config=configs/teacher_qwen2.py:r1_distill_qwen_32b
"""

from absl import app, flags
from ml_collections import config_flags

from regift_jax.traces import generate

_CONFIG = config_flags.DEFINE_config_file("config", None, "teacher config file (configs/teacher_*.py)")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    generate.run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)

"""Command line: offline teacher trace generation (:mod:`regift_jax.traces.generate`).

    python -m regift_jax.generate_traces --config=configs/teacher_smollm2.py
    python -m regift_jax.generate_traces --config=configs/teacher_qwen2.py:r1_distill_qwen_32b

Expected failures (a refused resume, a missing model or SQuAD file, a malformed source file) end
with one ``error: ...`` line and exit status 1.
"""

from absl import app, flags
from ml_collections import config_flags

from regift_jax.models.checkpoints import CheckpointError
from regift_jax.models.config import UnsupportedArchitectureError
from regift_jax.models.tokenizer import TokenizerError
from regift_jax.traces import generate

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "teacher config file (configs/teacher_*.py)")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    try:
        generate.run(_CONFIG.value)
    except (generate.TraceConfigError, CheckpointError, UnsupportedArchitectureError,
            TokenizerError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)

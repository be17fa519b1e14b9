"""regift_jax: Reasoning-Guided Fine-Tuning (ReGiFT, arXiv 2504.05632) in JAX/Flax.

Stages in data-flow order, each importing only from those before it (ARCHITECTURE.md):

    core/      paths, atomic I/O and the JSONL reader, configs, prompts, sharding rules
    models/    decoder + LM head, LoRA, checkpoints, tokenizer, presets, sampler; models.load()
    data/      readers (SQuAD-v2, BBQ, trace records), TFDS builders, tokenize, pack, stream
    traces/    teacher trace generation and judging
    training/  train step, optimiser, checkpoints, metrics, loop
    eval/      BBQ/StereoSet scoring, generation, metrics, reports, lm-eval backend
    experiment.py    before -> train -> after, in-process
    train.py, evaluate.py, generate_traces.py, lm_eval.py    thin command lines
"""

import logging as _logging
import os as _os

# The product uses transformers for tokenizers only; its "PyTorch was not found" advice would tell
# every user that something is missing when nothing is.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# TensorFlow serves only the TFDS input pipeline; its C++ INFO lines (oneDNN notices) are noise.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# absl puts the root logger at INFO; matplotlib's font-cache notice is not progress.
_logging.getLogger("matplotlib").setLevel(_logging.WARNING)

__version__ = "0.1.0"

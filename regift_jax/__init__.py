"""regift_jax: Reasoning-Guided Fine-Tuning (ReGiFT, arXiv 2504.05632) in JAX/Flax.

Data flow: prompts/traces -> data -> models -> train -> eval.
"""

import logging as _logging
import os as _os

# The product uses transformers for tokenizers only; its "PyTorch was not found" advice would tell
# every user that something is missing when nothing is.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# absl puts the root logger at INFO; matplotlib's font-cache notice is not progress.
_logging.getLogger("matplotlib").setLevel(_logging.WARNING)

__version__ = "0.1.0"

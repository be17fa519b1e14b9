"""regift_jax: Reasoning-Guided Fine-Tuning (ReGiFT, arXiv 2504.05632) in JAX/Flax.

Data flow: prompts/traces -> data -> models -> train -> eval.
"""

__version__ = "0.1.0"

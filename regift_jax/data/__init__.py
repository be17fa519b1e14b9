"""Data: one reader per source (SQuAD-v2, BBQ, trace records), the TFDS builders on top of them
(:mod:`regift_jax.data.builders`), tokenisation, packing and the streaming input pipeline.

Where the source files live: :mod:`regift_jax.core.paths`.
"""

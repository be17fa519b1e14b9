"""Shared core: paths and the data root, configs, prompts, sharding rules.

Imports nothing else from regift_jax; every stage above may import it.
"""

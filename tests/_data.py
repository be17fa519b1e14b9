"""Shared test paths: the repository, the shared offline data folder, the BBQ files and the
environment for CLI subprocesses."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("REGIFT_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


def bbq_dir():
    """The folder holding the official BBQ jsonl files (vendored first, then the shared copy);
    skips the test when neither has them."""
    for d in (os.path.join(REPO, "data", "bbq"), os.path.join(SHARED, "bbq")):
        if os.path.exists(os.path.join(d, "Religion.jsonl")):
            return d
    pytest.skip("no BBQ Religion.jsonl in data/bbq or the shared data folder")


def cli_env():
    """Environment for ``python -m regift_jax...`` subprocesses: this checkout first, CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env
